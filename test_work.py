"""worker.py runs real work (PROTOCOL.md, "worker.py runs real work"): --exec,
--handler, --task-timeout, and the reports that say why a job failed, against a
scripted fake broker (conftest.FakeBroker) and real processes."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import worker
from conftest import HERE, audit_trace, dashboard_page, dead_now, read_trace, wait_until

JOB_PY = textwrap.dedent("""\
    import json, os, sys
    text = sys.stdin.read()
    payload = json.loads(text) if text else None
    print("got", json.dumps(payload), os.environ["BROKER_MSG_ATTEMPT"],
          os.environ.get("BROKER_MSG_PERIOD", "-"))
    do = (payload or {}).get("do", "ok")
    if do == "fail":
        print("a line before", file=sys.stderr)
        sys.exit("boom: " + payload.get("why", ""))
    if do == "final":
        print("never will", file=sys.stderr)
        sys.exit(100)
    if do == "long-error":
        sys.stderr.write("x" * 3000 + "THE END")
        sys.exit(2)
    """)

HANDLER_PY = textwrap.dedent("""\
    import sys
    import time

    class Hopeless(Exception):
        final = True

    def work(payload, message):
        do = payload.get("do") if isinstance(payload, dict) else None
        if do == "fail":
            raise ValueError("bad input: %s" % payload["why"])
        if do == "final":
            raise Hopeless("it can never succeed")
        if do == "hang":
            while True:  # (Python code: it can be told to stop)
                time.sleep(0.01)
        if do == "swallow":
            while True:
                try:
                    time.sleep(0.01)
                except BaseException:  # (stubborn: even TaskInterrupted)
                    pass
        sys.stdout.write("handled %s %s %s\\n" % (message["id"], message["attempt"], payload))
        sys.stdout.flush()
    """)


def reports_of(fake, count):
    fake.wait_for(lambda: len(fake.reports) >= count)
    return [body for _query, _headers, body in fake.reports]


def script_of(*batches, batchsize=5, lease_ms=10000):
    """A fake broker's script: hello, then each batch of messages (dicts)
    once the previous one is reported, then nothing."""
    def script(index, stream):
        stream.hello(batchsize=batchsize, lease_ms=lease_ms)
        for number, messages in enumerate(batches, 1):
            stream.jobs(number, messages)
            stream.fake.wait_for(lambda: len(stream.fake.reports) >= number)
        stream.hold()
    return script


def failed_of(body):
    return {f["id"]: f for f in body["failed"]}


# --- --exec ------------------------------------------------------------------------------

def test_exec_runs_a_process_per_message_and_reports_why_each_failed(fake_broker, processes,
                                                                      tmp_path):
    (tmp_path / "job.py").write_text(JOB_PY)
    fake = fake_broker(script_of([
        {"id": "ok", "payload": {"do": "ok", "text": "héllo"}, "attempt": 2},
        {"id": "fails", "payload": {"do": "fail", "why": "no disk"}},
        {"id": "final", "payload": {"do": "final"}},
        {"id": "slept", "period": 5},                  # a generated message: no payload
        {"id": "long", "payload": {"do": "long-error"}}]))
    w = processes.worker("--url", fake.url, "--batchsize", "5",
                         "--exec", "%s %s" % (sys.executable, tmp_path / "job.py"))
    [body] = reports_of(fake, 1)
    assert sorted(body["done"]) == ["ok", "slept"]
    failed = failed_of(body)
    assert set(failed) == {"fails", "final", "long"}
    # Its standard error's end is the error; exit status 100 is final.
    assert failed["fails"]["error"] == "a line before\nboom: no disk"
    assert "final" not in failed["fails"]
    assert failed["final"] == {"id": "final", "error": "never will", "final": True}
    long = failed["long"]["error"]
    assert long.endswith("THE END") and len(long.encode()) == worker.ERROR_BYTES
    # The payload on standard input, the attempt and the period in the
    # environment, and its output the worker's, each line with its id.
    out = w.wait_for_line(r"^ok: got")
    assert out.strip() == 'ok: got {"do": "ok", "text": "h\\u00e9llo"} 2 -'
    assert w.wait_for_line(r"^slept: got").strip() == "slept: got null 1 5"
    assert re.search(r"WARNING.*message fails failed: a line before", w.output())


def test_a_command_that_fails_or_cannot_run_fails_its_job_and_the_worker_lives_on(
        fake_broker, processes):
    fake = fake_broker(script_of([{"id": "a", "payload": 1}], [{"id": "b", "payload": 2}]))
    w = processes.worker("--url", fake.url, "--batchsize", "2", "--exec", "false")
    first, second = reports_of(fake, 2)
    assert first == {"done": [], "failed": [{"id": "a", "error": "exit status 1"}]}
    assert second["failed"][0]["id"] == "b"
    w.stop()

    fake = fake_broker(script_of([{"id": "a", "payload": 1}], [{"id": "b", "period": 3}]))
    w = processes.worker("--url", fake.url, "--batchsize", "2",
                         "--exec", "no-such-command-here --flag")
    first, second = reports_of(fake, 2)  # (the same stream: it lived on)
    assert first["failed"] == [{"id": "a", "error": "cannot run no-such-command-here: No such "
                                                    "file or directory"}]
    assert second["failed"][0]["id"] == "b"
    assert len(fake.streams) == 1 and w.popen.poll() is None


def test_exec_through_sh_c_with_its_own_quoting(fake_broker, processes):
    fake = fake_broker(script_of([{"id": "q", "payload": {"n": 7}}]))
    w = processes.worker("--url", fake.url, "--batchsize", "2", "--exec",
                         """sh -c 'read line; echo "$BROKER_MSG_ID says $line" >&2; exit 3'""")
    [body] = reports_of(fake, 1)
    assert body["failed"] == [{"id": "q", "error": 'q says {"n": 7}'}]
    assert w.wait_for_line(r'^q: q says').strip() == 'q: q says {"n": 7}'  # (its stderr too)


def processes_with(marker):
    """Pids of the task processes (sh or sleep) whose command line holds `marker`."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) in (b"sh", b"sleep") and marker.encode() in b" ".join(argv):
            found.append(int(pid))
    return found


def test_a_task_past_its_timeout_is_ended_with_its_whole_process_group(fake_broker, processes):
    marker = "31.%d" % os.getpid()  # (a sleep nobody else runs)
    fake = fake_broker(script_of([{"id": "slow", "payload": None}]))
    started = time.monotonic()
    processes.worker("--url", fake.url, "--batchsize", "2", "--task-timeout", "0.5",
                     "--exec", "sh -c 'sleep %s & sleep %s; true'" % (marker, marker))
    [body] = reports_of(fake, 1)
    assert body == {"done": [], "failed": [{"id": "slow", "error": "timed out"}]}
    assert time.monotonic() - started < 10
    wait_until(lambda: not processes_with(marker), timeout=5, what="the group's sleeps gone")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts processes in /proc")
def test_a_worker_killed_mid_exec_leaves_no_task_process_behind(fake_broker, processes):
    marker = "32.%d" % os.getpid()
    fake = fake_broker(script_of([{"id": "a", "payload": 1}, {"id": "b", "payload": 2}]))
    w = processes.worker("--url", fake.url, "--batchsize", "2",
                         "--exec", "sh -c 'sleep %s & sleep %s'" % (marker, marker))
    wait_until(lambda: len(processes_with(marker)) >= 4, timeout=20,
               what="two tasks of two sleeps each")
    w.signal(signal.SIGKILL)
    w.wait()
    wait_until(lambda: not processes_with(marker), timeout=5,
               what=lambda: "orphans left: %s" % processes_with(marker))


def test_an_abandoned_batch_ends_its_commands(fake_broker, processes):
    marker = "33.%d" % os.getpid()

    def script(index, stream):
        if index == 0:
            stream.hello(batchsize=2)
            stream.jobs(1, [{"id": "a", "payload": 1}])
            wait_until(lambda: processes_with(marker), timeout=20)
            return  # (the stream ends: the batch is abandoned)
        stream.hold()

    fake = fake_broker(script)
    w = processes.worker("--url", fake.url, "--batchsize", "2",
                         "--exec", "sh -c 'sleep %s'" % marker)
    w.wait_for_line(r"abandoning batch 1")
    wait_until(lambda: not processes_with(marker), timeout=5, what="the command ended")
    assert fake.reports == []


# --- --handler ---------------------------------------------------------------------------

def test_a_handler_is_called_with_the_payload_and_its_exceptions_are_the_errors(
        fake_broker, processes, tmp_path):
    (tmp_path / "handler.py").write_text(HANDLER_PY)
    fake = fake_broker(script_of([
        {"id": "ok", "payload": {"do": "ok"}, "attempt": 3},
        {"id": "fails", "payload": {"do": "fail", "why": "x" * 2000}},
        {"id": "final", "payload": {"do": "final"}},
        {"id": "hangs", "payload": {"do": "hang"}},
        {"id": "slept", "period": 2}]))
    w = processes.worker("--url", fake.url, "--batchsize", "5", "--task-timeout", "1",
                         "--handler", "%s:work" % (tmp_path / "handler.py"))
    [body] = reports_of(fake, 1)
    assert sorted(body["done"]) == ["ok", "slept"]  # (with a handler, a period is its business)
    failed = failed_of(body)
    assert failed["fails"]["error"].startswith("ValueError: bad input: xxx")
    assert len(failed["fails"]["error"].encode()) == worker.ERROR_BYTES
    assert failed["final"] == {"id": "final", "error": "Hopeless: it can never succeed",
                               "final": True}
    assert failed["hangs"] == {"id": "hangs", "error": "timed out"}
    assert "handled ok 3 {'do': 'ok'}" in w.output()
    assert w.popen.poll() is None


def test_a_handler_module_is_found_from_the_working_directory(fake_broker, processes, tmp_path):
    (tmp_path / "myjobs.py").write_text(HANDLER_PY)
    fake = fake_broker(script_of([{"id": "ok", "payload": {"do": "ok"}}]))
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "worker.py"), "--url", fake.url,
                             "--handler", "myjobs:work"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        [body] = reports_of(fake, 1)
        assert body == ["ok"]  # (all done: the v1 array)
    finally:
        proc.kill()
        proc.wait()


def test_a_handler_that_does_not_stop_when_told_ends_the_worker(fake_broker, processes,
                                                                 tmp_path):
    (tmp_path / "handler.py").write_text(HANDLER_PY)
    fake = fake_broker(script_of([{"id": "stubborn", "payload": {"do": "swallow"}}]))
    w = processes.worker("--url", fake.url, "--batchsize", "2", "--task-timeout", "0.3",
                         "--handler", "%s:work" % (tmp_path / "handler.py"))
    assert w.wait(20) == worker.EXIT_STATUS_STUCK
    assert "its handler did not stop" in w.output()
    assert fake.reports == []  # (not reported: the broker's lease decides)


@pytest.mark.parametrize("spec, why", [
    ("missing.py:work", "no such file"),
    ("handler.py:nothing", "has no function nothing"),
    ("broken.py:work", "cannot import it: SyntaxError"),
    ("no_such_module_here:work", "cannot import it: ModuleNotFoundError"),
    ("handler.py", "expected PATH.py:FUNCTION or MODULE:FUNCTION"),
])
def test_a_handler_that_cannot_be_imported_stops_the_worker_with_one_line(tmp_path, spec, why):
    (tmp_path / "handler.py").write_text(HANDLER_PY)
    (tmp_path / "broken.py").write_text("def work(:\n")
    for processes_flag in ([], ["--processes", "2"]):
        result = subprocess.run([sys.executable, os.path.join(HERE, "worker.py"), "--url",
                                 "http://127.0.0.1:9", "--handler", spec] + processes_flag,
                                cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert result.returncode == 2
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and why in lines[0] and "cannot start" in lines[0], lines


# --- with no handler: the seed's worker ----------------------------------------------------

def test_with_no_handler_a_payload_fails_with_the_protocol_s_error(fake_broker, processes):
    fake = fake_broker(script_of([{"id": "job", "payload": {"a": 1}}, {"id": "msg", "period": 3}]))
    processes.worker("--url", fake.url, "--batchsize", "2")
    [body] = reports_of(fake, 1)
    assert body == {"done": ["msg"], "failed": [
        {"id": "job", "error": "no handler for a payload (use --exec or --handler)"}]}


def test_a_sleep_past_the_task_timeout_fails_timed_out(fake_broker, processes):
    fake = fake_broker(script_of([{"id": "long", "period": 700}, {"id": "short", "period": 5}]))
    processes.worker("--url", fake.url, "--batchsize", "2", "--task-timeout", "0.2")
    [body] = reports_of(fake, 1)
    assert body == {"done": ["short"], "failed": [{"id": "long", "error": "timed out"}]}


def test_exec_and_handler_are_exclusive_and_the_timeout_positive():
    for flags in (["--exec", "true", "--handler", "x.py:f"], ["--task-timeout", "0"],
                  ["--exec", ""], ["--exec", "'unclosed"]):
        result = subprocess.run([sys.executable, os.path.join(HERE, "worker.py")] + flags,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and "error:" in result.stderr, (flags, result.stderr)


# --- the broker's side: POST /report with outcomes, and the dead letters' errors ---------------

def post_report(b, client, number, body):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return b.request("POST", "/report?worker=%s&batch=%d" % (client.token, number), raw)


def test_a_report_says_which_failed_why_and_which_are_final(processes, db):
    b = processes.broker(db, "--source", "api", "--heartbeat", 600)
    status, _h, answer = b.request("POST", "/enqueue", json.dumps(
        [{"payload": {"n": n}, "key": "k%d" % n} for n in range(3)]).encode())
    assert status == 200
    one, two, three = answer["ids"]
    client = b.stream(3)
    client.hello()
    number = client.batch()[0]["batch"]
    long_error = "é" * 1000  # 2000 bytes of UTF-8
    status, _h, result = post_report(b, client, number, {
        "done": [one], "failed": [{"id": two, "error": "boom", "retry_in_ms": 50},
                                  {"id": three, "error": long_error, "final": True},
                                  {"id": "not-in-the-batch"}]})
    assert status == 200
    assert (result["done"], result["retried"], result["dead"]) == (1, 1, 1)
    assert result["ignored"] == ["not-in-the-batch"]
    # final: a dead letter at once (its first attempt), reason failed, its
    # error cut to 1 KiB of UTF-8 (on a character's boundary), its payload and key kept.
    [dead] = b.request("GET", "/dead")[2]["dead"]
    assert dead["id"] == three and dead["reason"] == "failed" and dead["attempts"] == 1
    assert dead["error"] == "é" * 512 and dead["payload"] == {"n": 2} and dead["key"] == "k2"
    # The other failed attempt goes again; a later attempt not reported drops its error.
    again = client.batch()
    assert [m["id"] for m in again] == [two] and again[0]["attempt"] == 2
    assert post_report(b, client, again[0]["batch"],
                       {"failed": [{"id": two, "error": "boom again"}]})[0] == 200
    third = client.batch()
    assert post_report(b, client, third[0]["batch"], {"done": []})[0] == 200
    wait_until(lambda: len(b.request("GET", "/dead")[2]["dead"]) == 2)
    letter = [d for d in b.request("GET", "/dead")[2]["dead"] if d["id"] == two][0]
    assert letter["reason"] == "not reported" and "error" not in letter
    stats = b.stats()
    assert stats["done"] == 1 and stats["dead"] == 2
    client.close()


def test_a_malformed_outcome_is_400_naming_the_entry_and_changes_nothing(processes, db):
    b = processes.broker(db, "--heartbeat", 600)
    client = b.stream(2)
    client.hello()
    batch = client.batch()
    number, a = batch[0]["batch"], batch[0]["id"]
    for body, says in [
            ({"done": [a], "failed": [{"id": a}]}, "in both done and failed"),
            ({"failed": [{"error": "x"}]}, "failed[0]: must be an object with an id"),
            ({"failed": [{"id": a}, 3]}, "failed[1]: must be an object"),
            ({"failed": [{"id": a, "final": "yes"}]}, "failed[0]: final must be true or false"),
            ({"failed": [{"id": a, "error": 5}]}, "failed[0]: error must be a string"),
            ({"failed": [{"id": a, "retry_in_ms": -1}]}, "failed[0]: retry_in_ms"),
            ({"failed": [{"id": a}, {"id": a}]}, "failed[1]: id %s is in failed twice" % a),
            ({"failed": {"id": a}}, "failed must be an array"),
            ({"done": [1]}, "done must be an array of id strings")]:
        status, _h, answer = post_report(b, client, number, body)
        assert status == 400 and says in answer["error"], (body, answer)
    assert b.stats()["in_flight"] == 2
    assert post_report(b, client, number, [m["id"] for m in batch])[2]["done"] == 2
    client.close()


def test_broker_dead_prints_the_error_and_the_payload(processes, db):
    b = processes.broker(db, "--source", "api", "--heartbeat", 600)
    [job] = b.request("POST", "/enqueue", b'[{"payload": {"to": "a@b.c"}}]')[2]["ids"]
    client = b.stream(2)
    client.hello()
    number = client.batch()[0]["batch"]
    assert post_report(b, client, number, {"failed": [
        {"id": job, "error": "SMTPError: 550 no such user\n\x1b[31mred", "final": True}]})[0] == 200
    wait_until(lambda: b.request("GET", "/dead")[2]["dead"])
    client.close()
    b.stop()
    out = subprocess.run([sys.executable, "broker.py", "dead", "--db", str(db)], cwd=HERE,
                         capture_output=True, text=True, timeout=30).stdout
    row = [line for line in out.splitlines() if line.startswith(job)][0]
    assert "failed" in row and "SMTPError: 550 no such user\\n\\x1b[31mred" in row
    assert '  payload {"to":"a@b.c"}' in out and "\x1b" not in out


def test_the_dashboard_shows_a_dead_letter_s_error_and_payload_as_text(processes, db):
    b = processes.broker(db, "--source", "api", "--heartbeat", 600)
    payload = {"html": "<script>window.pwned = 1</script><img src=x onerror='window.pwned=2'>"}
    error = "<img src=x onerror='window.pwned=3'><b>bold</b>"
    [job] = b.request("POST", "/enqueue", json.dumps([{"payload": payload}]).encode())[2]["ids"]
    client = b.stream(2)
    client.hello()
    number = client.batch()[0]["batch"]
    assert post_report(b, client, number,
                       {"failed": [{"id": job, "error": error, "final": True}]})[0] == 200
    with dashboard_page(b.url) as (page, errors):
        page.wait_for_selector("#dead tr", timeout=15000)
        cells = page.eval_on_selector_all("#dead tr td", "tds => tds.map(td => td.textContent)")
        pwned = page.evaluate("window.pwned")
        markup = page.eval_on_selector_all("#dead img, #dead script, #dead b", "e => e.length")
    assert pwned is None and markup == 0 and errors == []
    assert cells[0] == job and cells[1] == "" and "failed" in cells
    assert error in cells and json.dumps(payload, separators=(",", ":")) in cells
    client.close()


# --- end to end --------------------------------------------------------------------------

E2E_JOB_PY = textwrap.dedent("""\
    import json, os, signal, sys, time
    job = json.load(sys.stdin)
    attempt = int(os.environ["BROKER_MSG_ATTEMPT"])
    do = job["do"]
    if do == "flaky" and attempt < 3:
        sys.exit("not yet (attempt %d)" % attempt)
    if do == "fail":
        sys.exit("broken: " + job["why"])
    if do == "final":
        print("this can never work", file=sys.stderr)
        sys.exit(100)
    if do == "hang":
        time.sleep(60)
    if do == "exit-worker" and attempt == 1:
        os.kill(os.getppid(), signal.SIGKILL)  # (its worker: the task's parent)
        time.sleep(60)
    print("done", job)
    """)


def test_jobs_from_a_producer_settle_as_their_payloads_say_on_two_exec_workers(
        processes, db, tmp_path):
    (tmp_path / "job.py").write_text(E2E_JOB_PY)
    trace = tmp_path / "trace.jsonl"
    b = processes.broker(db, "--source", "api", "--lease-timeout", 5, "--trace", trace)
    kinds = ["ok"] * 20 + ["flaky"] * 4 + ["fail"] * 3 + ["final"] * 2 + ["hang"] * 2 + \
        ["exit-worker"]
    jobs = [{"payload": {"do": kind, "why": "disk %d" % n}} for n, kind in enumerate(kinds)]
    status, _h, answer = b.request("POST", "/enqueue", json.dumps(jobs).encode())
    assert status == 200
    kind_of = dict(zip(answer["ids"], kinds))
    command = "%s %s" % (sys.executable, tmp_path / "job.py")
    workers = [processes.worker("--url", b.url, "--processes", 1, "--batchsize", 4,
                                "--task-timeout", 1, "--exec", command) for _ in range(2)]
    # Settled, and the dead letters saved (counted at once, saved by their own thread).
    wait_until(lambda: (lambda s: s["done"] + s["dead"] == len(jobs)
                        and len(dead_now(b)) == s["dead"])(b.stats()), timeout=90,
               what=lambda: "%s\n%s" % (b.stats(), "\n".join(w.output()[-3000:] for w in workers)))
    dead = {d["id"]: d for d in b.request("GET", "/dead?limit=100")[2]["dead"]}
    assert {kind_of[i] for i in dead} == {"fail", "final", "hang"}
    assert sorted(kind_of[i] for i in dead) == sorted(k for k in kinds
                                                      if k in ("fail", "final", "hang"))
    for message_id, letter in dead.items():
        kind = kind_of[message_id]
        assert letter["reason"] == "failed" and letter["payload"]["do"] == kind
        assert letter["error"] == {"fail": "broken: " + letter["payload"]["why"],
                                   "final": "this can never work", "hang": "timed out"}[kind]
        assert letter["attempts"] == (3 if kind != "final" else letter["attempts"])
    b.stop()
    done, dead_ids, unsettled, problems = audit_trace(trace)
    assert problems == [] and unsettled == set()
    assert {kind_of[i] for i in done} == {"ok", "flaky", "exit-worker"}
    assert len(done) == 25 and dead_ids == set(dead)
    flaky = [e for e in read_trace(trace) if e["event"] == "done" and kind_of[e["id"]] == "flaky"]
    assert all(e["attempt"] == 3 for e in flaky)
