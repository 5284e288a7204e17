"""Jobs from producers (PROTOCOL.md v1.2, "POST /enqueue"): broker.py --source
api takes them, saves each before it answers, remembers their keys, bounds
its backlog, and hands their payloads to workers."""

import json
import random
import re
import resource
import signal
import subprocess
import sys
import threading

import pytest

import bbolt_lite
from conftest import HERE, read_trace, run_boltcheck, wait_until


def enqueue(b, body, headers=None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return b.request("POST", "/enqueue", raw, headers)


def buckets(db):
    with bbolt_lite.open(str(db), readonly=True, timeout=5) as store, store.view() as tx:
        found = {}
        for name in (b"failed", b"pending", b"keys"):
            bucket = tx.bucket(name)
            found[name.decode()] = {k.decode(): json.loads(v) for k, v in bucket.items()} \
                if bucket else {}
        return found


def settle_all(b, count, done=True, batchsize=50):
    """A worker by hand: take `count` messages and report them (done or not);
    the msg events it got, in order."""
    client = b.stream(batchsize)
    client.hello()
    got = []
    while len(got) < count:
        batch = client.batch()
        got += batch
        ids = [m["id"] for m in batch] if done else []
        assert b.report(client.token, batch[0]["batch"], ids)[0] == 200
    client.close()
    return got


# --- the source ----------------------------------------------------------------------

def test_a_job_s_payload_and_period_reach_the_worker_and_its_report_settles_it(processes, db):
    b = processes.broker(db, "--source", "api", "--heartbeat", 600)
    status, _h, answer = enqueue(b, [{"payload": {"url": "https://example.org/1"}},
                                     {"period": 5}, {"payload": [1, "two"], "period": 7}])
    assert status == 200 and answer["duplicates"] == [] and len(set(answer["ids"])) == 3
    events = settle_all(b, 3)
    assert [(e["id"], e.get("payload"), e.get("period")) for e in events] == [
        (answer["ids"][0], {"url": "https://example.org/1"}, None),
        (answer["ids"][1], None, 5), (answer["ids"][2], [1, "two"], 7)]
    assert all(e["attempt"] == 1 and e["size"] == 3 for e in events)
    wait_until(lambda: b.stats()["done"] == 3)
    stats = b.stats()
    assert (stats["enqueued"], stats["backlog"], stats["duplicates"]) == (3, 0, 0)


def test_one_job_object_is_a_request_of_one(processes, db):
    b = processes.broker(db, "--source", "api", "--heartbeat", 600)
    status, _h, answer = enqueue(b, {"payload": "x"})
    assert status == 200 and len(answer["ids"]) == 1


def test_total_is_refused_with_source_api_and_enqueue_with_the_generator(processes, db):
    result = subprocess.run([sys.executable, "broker.py", "--source", "api", "--total", "5",
                             "--db", str(db)], cwd=HERE, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2 and "--total" in result.stderr and not db.exists()
    b = processes.broker(db, "--heartbeat", 600)
    status, _h, answer = enqueue(b, [{"payload": 1}])
    assert status == 409 and answer["error"] == \
        "this broker generates its messages (--source generator)"


def test_with_a_token_an_enqueue_needs_it(processes, db):
    b = processes.broker(db, "--source", "api", "--token", "s3cret", "--heartbeat", 600)
    assert enqueue(b, [{"payload": 1}])[0] == 401
    assert enqueue(b, [{"payload": 1}], {"Authorization": "Bearer s3cret"})[0] == 200


# --- all or nothing, and hostile bodies ------------------------------------------------

BAD_JOBS = [
    ([{"payload": 1}, {"period": 0}], "job 1: period must be an integer in 1..1000"),
    ([{"period": 1001}], "job 0: period"),
    ([{"period": 5.5}], "job 0: period"),
    ([{"period": True}], "job 0: period"),
    ([{"key": "k"}], "job 0: needs a payload or a period"),
    ([{}], "job 0: needs a payload or a period"),
    ([{"payload": None}], "job 0: needs a payload or a period"),
    ([{"payload": 1, "period": None}], "job 0: period"),
    ([{"payload": 1, "delay_ms": -1}], "job 0: delay_ms"),
    ([{"payload": 1, "delay_ms": 10 ** 12}], "job 0: delay_ms"),
    ([{"payload": 1, "key": "k" * 257}], "job 0: key"),
    ([{"payload": 1, "key": 7}], "job 0: key"),
    ([{"payload": 1, "key": ""}], "job 0: key"),
    ([{"payload": "x" * (64 * 1024)}], "job 0: the payload is"),
    ([{"payload": 1, "colour": "red"}], "job 0: unknown field 'colour'"),
    ([1, 2], "job 0: not a JSON object"),
    ("not json", "the body is not JSON"),
]


@pytest.mark.parametrize("body, says", BAD_JOBS, ids=[s for _b, s in BAD_JOBS])
def test_a_malformed_job_is_400_naming_it_and_no_job_of_the_request_is_enqueued(
        processes, db, body, says):
    b = processes.broker(db, "--source", "api", "--heartbeat", 600)
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    status, _h, answer = enqueue(b, raw)
    assert status == 400 and answer["error"].startswith(says), answer
    assert b.stats()["enqueued"] == 0 and b.stats()["backlog"] == 0


@pytest.mark.parametrize("raw, says", [
    (b'[{"payload": NaN}]', "the body is not JSON: NaN"),
    (b'[{"payload": [Infinity]}]', "the body is not JSON: Infinity"),
    (b'[{"payload": -Infinity}]', "the body is not JSON: -Infinity"),
    (b'[{"payload": {"x": [1e400]}}]', "job 0: the payload has a number out of range"),
    (b'[{"payload": -1E999}]', "job 0: the payload has a number out of range"),
    (b'[{"payload": "\xff\xfe"}]', "the body is not UTF-8"),
    (b'[{"payload": ' + b"[" * 100000 + b"]" * 100000 + b"}]", "the body is nested too deep"),
], ids=["NaN", "Infinity", "-Infinity", "1e400", "-1E999", "invalid UTF-8",
        "nested 100,000 deep"])
def test_a_body_that_json_does_not_allow_is_400(processes, db, raw, says):
    b = processes.broker(db, "--source", "api", "--heartbeat", 600)
    status, _h, answer = enqueue(b, raw)
    assert status == 400 and answer["error"].startswith(says), answer
    assert b.stats()["enqueued"] == 0


def test_a_body_over_max_enqueue_body_is_413_from_its_content_length(processes, db):
    b = processes.broker(db, "--source", "api", "--max-enqueue-body", 1000, "--heartbeat", 600)
    assert enqueue(b, [{"payload": "x" * 2000}])[0] == 413
    assert enqueue(b, [{"payload": "x" * 900}])[0] == 200


# --- accepted means saved ----------------------------------------------------------------

def test_every_job_answered_200_survives_sigkill_and_is_delivered_once(processes, db):
    """Three producers enqueue (keyed and not) while the broker is killed at
    random moments, five times; then one broker delivers what is left: every
    job answered 200 exactly once, and no other."""
    rng = random.Random(7)
    accepted = []  # ids answered 200
    for _round in range(5):
        b = processes.broker(db, "--source", "api", "--heartbeat", 600, "--log-level", "INFO")
        stop = threading.Event()

        def produce(number):
            sent = 0
            while not stop.is_set():
                jobs = [{"payload": {"producer": number, "n": sent + i}} if i % 2 else
                        {"payload": sent + i, "key": "p%d-%d-%d" % (number, _round, sent + i)}
                        for i in range(rng.randint(1, 30))]
                sent += len(jobs)
                try:
                    status, _h, answer = enqueue(b, jobs)
                except OSError:
                    return  # (killed: no answer; these were not accepted)
                if status == 200:
                    accepted.extend(answer["ids"])

        producers = [threading.Thread(target=produce, args=(n,)) for n in range(3)]
        for producer in producers:
            producer.start()
        wait_until(lambda: len(accepted) > 0, timeout=20)
        threading.Event().wait(rng.uniform(0.2, 0.8))
        b.signal(signal.SIGKILL)
        b.wait()
        stop.set()
        for producer in producers:
            producer.join(30)
    last = processes.broker(db, "--source", "api", "--heartbeat", 600)
    backlog = last.stats()["backlog"]
    assert backlog >= len(accepted)  # (and those unanswered that were saved)
    delivered = [e["id"] for e in settle_all(last, backlog)]
    assert len(delivered) == len(set(delivered)) == backlog, "a job was delivered twice"
    assert set(accepted) <= set(delivered), "a job answered 200 was lost"
    last.stop()
    assert buckets(db)["pending"] == {}
    print("%d jobs answered 200 over 5 SIGKILLs, %d delivered once each"
          % (len(accepted), len(delivered)))


def test_a_full_disk_answers_503_and_enqueues_nothing(processes, db):
    limit = 128 * 1024

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    b = processes.broker(db, "--source", "api", "--heartbeat", 600, "--read-timeout", 1,
                         preexec_fn=small_disk)
    accepted = []
    for _ in range(100):
        status, headers, answer = enqueue(b, [{"payload": "x" * 900} for _ in range(20)])
        if status == 503:
            break
        accepted += answer["ids"]
    else:
        raise AssertionError("the disk never filled")
    assert headers.get("Retry-After") and "could not be saved" in answer["error"]
    resource.prlimit(b.popen.pid, resource.RLIMIT_FSIZE,
                     (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    b.wait_for_line(r"saving works again", timeout=30)
    assert b.stats()["backlog"] == len(accepted)  # the 503's jobs: none
    assert sorted(e["id"] for e in settle_all(b, len(accepted))) == sorted(accepted)


# --- idempotency keys ----------------------------------------------------------------------

def test_a_key_seen_twice_is_one_job_across_a_restart_and_after_it_is_done(processes, db):
    b = processes.broker(db, "--source", "api", "--heartbeat", 600)
    status, _h, first = enqueue(b, [{"payload": 1, "key": "order-17"},
                                    {"payload": 2, "key": "order-17"}])
    assert status == 200 and first["ids"][0] == first["ids"][1] and first["duplicates"] == [1]
    settle_all(b, 1)  # done
    b.stop()
    again = processes.broker(db, "--source", "api", "--heartbeat", 600)
    status, _h, second = enqueue(again, [{"payload": 3}, {"payload": 1, "key": "order-17"}])
    assert status == 200 and second["ids"][1] == first["ids"][0] and second["duplicates"] == [1]
    assert again.stats()["backlog"] == 1 and again.stats()["duplicates"] == 1


def test_keys_past_the_dedup_window_are_dropped_from_the_db(processes, db):
    b = processes.broker(db, "--source", "api", "--heartbeat", 600, "--dedup-window", 1,
                         "--max-backlog", 200000)
    count = 100000
    for start in range(0, count, 1000):
        status, _h, _answer = enqueue(b, [{"period": 1, "key": "k%d" % i}
                                          for i in range(start, start + 1000)])
        assert status == 200
    assert b.stats()["enqueued"] == count
    # Expired keys leave in the commits that pass by: the bucket shrinks.
    wait_until(lambda: enqueue(b, [{"period": 1}])[0] == 200 and
               len(buckets_while_running(db)) < count // 10, timeout=60,
               what="the keys bucket did not shrink")
    status, _h, answer = enqueue(b, [{"period": 1, "key": "k5"}])  # forgotten: a new job
    assert status == 200 and answer["duplicates"] == []


def buckets_while_running(db):
    """The keys bucket of a running broker's db: read from a copy (the broker
    holds the file's lock)."""
    import shutil
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        copy = folder + "/copy.db"
        shutil.copyfile(str(db), copy)
        return buckets(copy)["keys"]


# --- the backlog ---------------------------------------------------------------------------

def test_past_max_backlog_an_enqueue_is_503_with_retry_after_and_enqueues_nothing(
        processes, db):
    b = processes.broker(db, "--source", "api", "--heartbeat", 600, "--max-backlog", 50)
    assert enqueue(b, [{"period": 1}] * 40)[0] == 200
    status, headers, answer = enqueue(b, [{"period": 1}] * 11)
    assert status == 503 and headers["Retry-After"] == "2" and "backlog is full" in answer["error"]
    assert b.stats()["backlog"] == 40 and b.stats()["refused"]["backlog full"] == 1
    assert enqueue(b, [{"period": 1}] * 10)[0] == 200
    # A full backlog shows as 503s, not as memory.
    rss = []
    for _round in range(3):
        for _ in range(100):
            assert enqueue(b, [{"payload": "x" * 1000}] * 50)[0] == 503
        with open("/proc/%d/status" % b.popen.pid) as f:
            rss.append(int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)))
    assert rss[-1] <= rss[0] * 1.05, rss  # (15,000 refused jobs of 1 KB: none kept)
    metrics = b.request("GET", "/metrics")[2]
    assert "broker_enqueued_total 50" in metrics and "broker_backlog 50" in metrics
    assert 'broker_enqueue_refused_total{reason="backlog full"} 301' in metrics


# --- dead letters keep the job --------------------------------------------------------------

def test_a_dead_job_keeps_its_payload_and_key_through_requeue_and_go_reads_it(
        processes, db, boltcheck):
    b = processes.broker(db, "--source", "api", "--heartbeat", 600, "--max-attempts", 1)
    _s, _h, answer = enqueue(b, [{"payload": {"to": "a@example.org"}, "key": "mail-1"},
                                 {"period": 9}])
    settle_all(b, 2, done=False)
    wait_until(lambda: len(b.request("GET", "/dead")[2]["dead"]) == 2)
    dead = {d["id"]: d for d in b.request("GET", "/dead")[2]["dead"]}
    assert dead[answer["ids"][0]]["payload"] == {"to": "a@example.org"}
    assert dead[answer["ids"][0]]["key"] == "mail-1"
    assert dead[answer["ids"][1]]["period"] == 9 and "payload" not in dead[answer["ids"][1]]
    # Live requeue: sent again with its payload.
    assert b.request("POST", "/requeue", json.dumps([answer["ids"][0]]).encode())[0] == 200
    again = settle_all(b, 1, done=False)
    assert again[0]["payload"] == {"to": "a@example.org"}
    b.stop()
    # Offline requeue, then a start: the same.
    result = subprocess.run([sys.executable, "broker.py", "requeue", "--db", str(db), "--all"],
                            cwd=HERE, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert buckets(db)["pending"][answer["ids"][0]]["payload"] == {"to": "a@example.org"}
    result = run_boltcheck(boltcheck, "check", str(db))
    assert result.stdout.strip() == "OK", result.stdout + result.stderr
    c = processes.broker(db, "--source", "api", "--heartbeat", 600)
    events = settle_all(c, 2)
    assert {e["id"]: e.get("payload") for e in events}[answer["ids"][0]] == \
        {"to": "a@example.org"}


# --- broker.py put ---------------------------------------------------------------------------

def put(b, *args, stdin=""):
    return subprocess.run([sys.executable, "broker.py", "put", "--url", b.url] + list(args),
                          cwd=HERE, input=stdin, capture_output=True, text=True, timeout=60)


def test_put_enqueues_arguments_and_lines_and_names_a_refused_one(processes, db):
    b = processes.broker(db, "--source", "api", "--heartbeat", 600)
    done = put(b, '{"payload": {"n": 1}}', '{"period": 3}')
    assert done.returncode == 0 and len(done.stdout.split()) == 2
    lines = "".join('{"payload": %d}\n' % i for i in range(2500)) + '{"period": 0}\n'
    done = put(b, stdin=lines)
    assert done.returncode == 1 and len(done.stdout.split()) == 2500  # (3 requests)
    assert "line 2501: refused: period must be an integer" in done.stderr
    keyed = [put(b, "--key", "once", '{"payload": 1}') for _ in range(2)]
    assert keyed[0].stdout == keyed[1].stdout and keyed[1].returncode == 0
    assert put(b, "--key", "k", '{"payload": 1}', '{"payload": 2}').returncode == 2
    assert b.stats()["enqueued"] == 2 + 2500 + 1


def test_put_retries_a_full_backlog_until_it_drains(processes, db):
    b = processes.broker(db, "--source", "api", "--heartbeat", 600, "--max-backlog", 5)
    assert enqueue(b, [{"period": 1}] * 5)[0] == 200
    waiting = subprocess.Popen([sys.executable, "broker.py", "put", "--url", b.url,
                                '{"payload": "later"}'], cwd=HERE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    b.wait_for_line(r'"POST /enqueue HTTP/1.1" 503')
    settle_all(b, 5)
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0 and len(out.split()) == 1, err


def test_the_trace_records_jobs_that_have_no_period(processes, db, tmp_path):
    trace = tmp_path / "trace.jsonl"
    b = processes.broker(db, "--source", "api", "--heartbeat", 600, "--trace", trace)
    [job] = enqueue(b, [{"payload": "p"}])[2]["ids"]
    client = b.stream(1)
    client.hello()
    for ids in ([], [job]):  # (its first attempt fails: not reported)
        [event] = client.batch()
        assert event["id"] == job and b.report(client.token, event["batch"], ids)[0] == 200
    client.close()
    b.stop()
    assert [(e["event"], e["id"], e["period"], e["attempt"]) for e in read_trace(trace)] == [
        ("lease", job, None, 1), ("failed", job, None, 1), ("lease", job, None, 2),
        ("done", job, None, 2)]
