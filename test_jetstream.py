"""broker.py --jetstream beyond one machine's failures: two brokers over a
three-node NATS cluster, one broker and one NATS node killed mid-run.

The protocol suite itself runs against --jetstream in test_broker.py."""

import collections
import json
import re
import signal
import socket
import subprocess
import sys
import time


from conftest import HERE, jetstream_flags, jetstream_missing, read_trace, skip_or_fail

TOTAL = 3000


def dead_stream(urls, stream):
    result = subprocess.run([sys.executable, "broker.py", "dead", "--jetstream", urls,
                             "--js-stream", stream, "--json"], cwd=HERE, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_two_brokers_over_a_nats_cluster_lose_nothing_when_a_broker_and_a_node_are_killed(
        processes, tmp_path):
    missing = jetstream_missing()
    if missing:
        skip_or_fail(missing)
    nodes = processes.nats_cluster(tmp_path / "nats", 3)
    urls = ",".join(node.url for node in nodes)
    flags = ["--jetstream", urls, "--js-stream", "work", "--total", TOTAL,
             "--lease-timeout", 2, "--heartbeat", 1, "--progress-every", 0.5]
    traces = {name: tmp_path / ("%s.jsonl" % name) for name in "ab"}
    brokers = {name: processes.broker(tmp_path / ("%s.db" % name), *flags, "--trace", traces[name])
               for name in "ab"}
    a, b = brokers["a"], brokers["b"]
    a_workers = processes.worker("--url", "%s,%s" % (a.url, b.url), "--processes", 3,
                                 "--time-scale", 0.01)
    processes.worker("--url", "%s,%s" % (b.url, a.url), "--processes", 3, "--time-scale", 0.01)

    # Mid-run: the first broker dies (its workers move to the other), then a NATS node.
    a.wait_for_line(r"progress: [1-9]\d{2,} done", timeout=60)
    a.signal(signal.SIGKILL)
    a.wait()
    killed_at = time.time()
    nodes[0].signal(signal.SIGKILL)
    nodes[0].wait()
    a_workers.wait_for_line(r"trying the next broker: " + re.escape(b.url))  # they moved
    assert b.wait(180) == 0, b.output()[-3000:]
    assert "all %d messages settled" % TOTAL in b.output()
    warnings = [line for broker in (a, b) for line in broker.output().splitlines()
                if " WARNING " in line or " ERROR " in line]

    events = {name: read_trace(path) for name, path in traces.items()}
    dead = dead_stream(",".join(node.url for node in nodes[1:]), "work")
    done = [e["id"] for name in "ab" for e in events[name] if e["event"] == "done"]
    dead_ids = [d["id"] for d in dead]
    # Every message done or dead exactly once.
    assert len(done) == len(set(done)), "a message was done twice"
    assert len(dead_ids) == len(set(dead_ids)), "a message was dead-lettered twice"
    assert not set(done) & set(dead_ids), "a message is both done and dead"
    leased = {e["id"] for name in "ab" for e in events[name] if e["event"] == "lease"}
    unexplained = leased - set(done) - set(dead_ids)
    # Acked by the killed broker, its trace line not yet written: it leased
    # them last, and JetStream (empty at the end) sends nothing again that
    # was neither acked nor terminated.
    last_lease = {}
    for name in "ab":
        for e in events[name]:
            if e["event"] == "lease":
                last_lease[e["id"]] = max(last_lease.get(e["id"], (0, "")), (e["t"], name))
    assert all(last_lease[i][1] == "a" for i in unexplained), (unexplained, warnings)
    assert len(unexplained) <= 20, (unexplained, warnings)
    assert len(set(done) | set(dead_ids) | unexplained) == TOTAL  # nothing lost
    # Attempts <= 3 (leases counted in both traces), and the dead letters used them all.
    assert max(e["attempt"] for name in "ab" for e in events[name]) <= 3
    leases = collections.Counter(e["id"] for name in "ab" for e in events[name]
                                 if e["event"] == "lease")
    assert max(leases.values()) <= 3, [(i, n) for i, n in leases.items() if n > 3]
    assert all(d["attempts"] == 3 for d in dead)
    # No message leased to two workers at once while both brokers lived.
    spans = collections.defaultdict(list)  # id -> [(start, end, broker, worker)]
    for name in "ab":
        open_leases = {}
        for e in events[name]:
            key = (e["id"], e["worker"])
            if e["event"] == "lease":
                open_leases[key] = e["t"]
            elif key in open_leases:
                spans[e["id"]].append((open_leases.pop(key), e["t"], name, e["worker"]))
        # A lease with no end in the trace of the killed broker was open as
        # far as its trace tells: to its last line. (The lines queued after
        # that one were lost with the broker, an end among them maybe.)
        known_until = min(killed_at, max(e["t"] for e in events[name]))
        for (message_id, worker), start in open_leases.items():
            spans[message_id].append((start, known_until, name, worker))
    overlaps = []
    for message_id, intervals in spans.items():
        intervals.sort()
        for (s1, e1, n1, w1), (s2, _e2, n2, w2) in zip(intervals, intervals[1:]):
            if s2 < min(e1, killed_at) and (n1, w1) != (n2, w2):
                overlaps.append((message_id, n1, w1, s1, e1, n2, w2, s2, killed_at))
    assert overlaps == []
    print("%d done, %d dead, %d done by the killed broker with its trace line lost; "
          "no message leased twice at once; warnings in the brokers' logs: %s"
          % (len(set(done) | unexplained), len(dead_ids), len(unexplained),
             collections.Counter(re.sub(r"^\S+ \w+ broker: (w\d+: )?", "", line)[:40]
                                 for line in warnings).most_common(4)))


# --- one broker over one NATS server: what differs, and the start errors ------------------

def test_dead_letters_are_listed_from_the_dead_letter_stream(processes, db, nats_server):
    flags = jetstream_flags(nats_server)
    b = processes.broker(db, "--max-attempts", "1", "--heartbeat", "600", *flags)
    client = b.stream(3)
    client.hello()
    batch = client.batch()
    assert b.report(client.token, batch[0]["batch"], [])[0] == 200  # all three dead
    status, _headers, body = b.request("GET", "/dead?limit=2")
    assert status == 200 and body["more"] is True
    status, _headers, rest = b.request("GET", "/dead?limit=10&after=" + body["next_after"])
    listed = [d["id"] for d in body["dead"] + rest["dead"]]
    assert sorted(listed) == sorted(m["id"] for m in batch) and rest["more"] is False
    assert all(d["reason"] == "not reported" for d in body["dead"] + rest["dead"])
    tool = dead_stream(nats_server.url, flags[flags.index("--js-stream") + 1])
    assert sorted(d["id"] for d in tool) == sorted(listed)


def test_requeue_is_refused_with_501_naming_the_dead_letter_stream(processes, db, nats_server):
    b = processes.broker(db, *jetstream_flags(nats_server))
    status, _headers, body = b.request("POST", "/requeue", b'{"all": true}')
    assert status == 501 and "-dead" in body["error"]


def test_without_nats_py_the_start_error_says_how_to_install_it(tmp_path):
    hide = ("import runpy, sys; sys.modules['nats'] = None; "
            "sys.argv = ['broker.py'] + sys.argv[1:]; runpy.run_path('broker.py', "
            "run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", hide, "--port", "0", "--db",
                             str(tmp_path / "b.db"), "--jetstream", "nats://127.0.0.1:1"],
                            cwd=HERE, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "pip install nats-py" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "b.db").exists()


def test_durable_and_jetstream_together_are_refused(tmp_path):
    result = subprocess.run([sys.executable, "broker.py", "--db", str(tmp_path / "b.db"),
                             "--jetstream", "nats://127.0.0.1:1", "--durable"], cwd=HERE,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--durable is not needed" in result.stderr


def test_an_unreachable_cluster_is_a_start_error_naming_it(tmp_path):
    missing = jetstream_missing()
    if missing:
        skip_or_fail(missing)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = "nats://127.0.0.1:%d" % s.getsockname()[1]
    result = subprocess.run([sys.executable, "broker.py", "--port", "0", "--db",
                             str(tmp_path / "b.db"), "--jetstream", url], cwd=HERE,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert url in result.stderr and "Traceback" not in result.stderr


def test_a_fetched_message_without_an_id_and_a_period_in_range_is_refused():
    missing = jetstream_missing()
    if missing:
        skip_or_fail(missing)
    import types
    import broker
    import broker_jetstream
    # (_message reads its stream and the checker broker.py hands it, only.)
    queue = object.__new__(broker_jetstream.JetStreamQueue)
    queue.stream, queue._checked_message = "test", broker.checked_message

    def fetched(body):
        metadata = types.SimpleNamespace(num_delivered=2, sequence=types.SimpleNamespace(stream=9))
        return types.SimpleNamespace(data=json.dumps(body).encode(), metadata=metadata)

    message = queue._message(fetched({"id": "9m4e2mr0ui3e8a215n4g", "period": 1000}))
    assert (message.id, message.period, message.attempts) == ("9m4e2mr0ui3e8a215n4g", 1000, 1)
    for body in ({"id": "9m4e2mr0ui3e8a215n4g", "period": 1001},
                 {"id": "9m4e2mr0ui3e8a215n4g", "period": 0},
                 {"id": "9m4e2mr0ui3e8a215n4g", "period": 5.0},
                 {"id": "9m4e2mr0ui3e8a215n4g"}, [1, 2], {"id": 'ab"c', "period": 5},
                 {"id": "9m4e2mr0ui3e8a215n4\u00e9", "period": 5}, {"id": 7, "period": 5},
                 {"period": 5}):
        assert queue._message(fetched(body)) is None, body


def test_a_fetched_message_whose_id_is_not_an_xid_is_terminated_and_never_written(
        processes, tmp_path, nats_server):
    # A NATS client publishes to the stream what no broker made: an id with a
    # quote (invalid JSON if written as it is) and one with a non-ASCII
    # character, before one good message. Only the good one reaches a worker.
    import asyncio
    import nats
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig

    stream = jetstream_flags(nats_server)[-1]
    good = "9m4e2mr0ui3e8a215n4g"

    async def publish():
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await js.add_stream(StreamConfig(
                name=stream, subjects=[stream + ".tasks"], retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE, num_replicas=1, duplicate_window=120.0))
            for body in ({"id": 'ab"c', "period": 5}, {"id": "caf\u00e9", "period": 5},
                         {"id": good, "period": 5}):
                await js.publish(stream + ".tasks", json.dumps(body).encode())
        finally:
            await nc.close()

    asyncio.run(publish())
    b = processes.broker(tmp_path / "b.db", "--jetstream", nats_server.url, "--js-stream",
                         stream, "--total", 3, "--heartbeat", 600)
    client = b.stream(10)
    client.hello()
    batch = client.batch()  # (the strict client: valid UTF-8, and each event's JSON parses)
    assert [m["id"] for m in batch] == [good]
    assert b.report(client.token, batch[0]["batch"], [good])[0] == 200
    assert b.wait(60) == 0, b.output()[-3000:]
    output = b.output()
    assert "all 3 messages settled: 1 done, 0 dead" in output
    assert output.count("not an xid") == 2 and "terminated" in output


def test_broker_jetstream_does_not_import_broker():
    # broker.py hands it what it needs: no import circle.
    missing = jetstream_missing()
    if missing:
        skip_or_fail(missing)
    result = subprocess.run([sys.executable, "-c", "import sys, broker_jetstream; "
                             "print(sorted(m for m in sys.modules if m.startswith('broker')))"],
                            cwd=HERE, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['broker_jetstream']"]


def test_an_unpublished_dead_letter_is_retried_with_backoff():
    # In an outage every dead letter retries its publish: at a fixed 0.2 s,
    # 15 tries in 3 s each (and as many warnings held back); backing off, a few.
    missing = jetstream_missing()
    if missing:
        skip_or_fail(missing)
    import asyncio
    import broker
    import broker_jetstream
    queue = object.__new__(broker_jetstream.JetStreamQueue)
    queue.dead_subject, queue.dead_stream, queue._stopping = "t.dead", "t-dead", False
    queue._warned = {}
    tries = []

    class Unavailable:
        async def publish(self, subject, data, headers):
            tries.append(time.monotonic())
            raise RuntimeError("JetStream system temporarily unavailable")

    queue._js = Unavailable()
    message = broker.Message("9m4e2mr0ui3e8a215n4g", 5)

    async def outage():
        publish = asyncio.ensure_future(queue._publish_dead(message, {"id": message.id}))
        await asyncio.sleep(3.0)
        queue._stopping = True
        return await publish

    assert asyncio.run(outage()) is False
    assert 3 <= len(tries) <= 7, len(tries)
