"""Faults and hostile input: durable restarts, a failing disk, bad requests, limits, tokens."""

import json
import os
import random
import re
import resource
import select
import signal
import socket
import sys
import threading
import time


import bbolt_lite
from conftest import HERE, audit_trace, read_trace, safe_seed, wait_until

sys.path.insert(0, os.path.join(HERE, "bench"))
from client import Client  # noqa: E402


def read_db(db):
    """(dead letters {id: record}, pending {id: record}, counters {name: n})."""
    with bbolt_lite.open(str(db), readonly=True, timeout=5) as store, store.view() as tx:
        def bucket(name):
            b = tx.bucket(name)
            return {k.decode(): v for k, v in b.items()} if b else {}
        dead = {k: json.loads(v) for k, v in bucket(b"failed").items()}
        pending = {k: json.loads(v) for k, v in bucket(b"pending").items()}
        counters = {k: int(v) for k, v in bucket(b"state").items()}
    return dead, pending, counters


# --- durable mode -------------------------------------------------------------

def test_a_durable_drain_answers_a_busy_workers_report_200_once_it_is_saved(processes, db):
    """PROTOCOL.md, graceful stop: a busy worker's report is answered 200.
    With --durable that answer waits for the commit, which the stop that
    follows the last report must not cut short."""
    b = processes.broker(db, "--durable", "--heartbeat", "600")
    client = b.stream(3)
    client.hello()
    batch = client.batch()
    b.signal(signal.SIGTERM)
    b.wait_for_line(r"draining: waiting")
    ids = [m["id"] for m in batch]
    assert b.report(client.token, batch[0]["batch"], ids)[0] == 200
    assert b.wait() == 0
    _dead, pending, counters = read_db(db)
    assert counters["done"] == 3 and not set(ids) & set(pending)


def test_durable_broker_killed_resumes_its_messages_counting_the_lost_lease_as_a_failure(
        processes, db):
    b = processes.broker(db, "--durable", "--total", "6", "--heartbeat", "600")
    client = b.stream(3)
    client.hello()
    first = client.batch()
    b.report(client.token, first[0]["batch"], [first[0]["id"]])
    second = client.batch()  # the two failed ones (attempt 2) and a new one
    assert sorted((m["attempt"], m["id"]) for m in second)[1:] == sorted(
        (2, m["id"]) for m in first[1:])
    b.signal(signal.SIGKILL)
    b.wait()
    client.close()
    _dead, pending, counters = read_db(db)
    assert set(pending) == {m["id"] for m in second}
    assert all(p["in_flight"] for p in pending.values())
    assert counters == {"generated": 4, "done": 1, "dead": 0, "requeued": 0}

    again = processes.broker(db, "--durable", "--total", "6", "--heartbeat", "600")
    assert "resuming from" in again.output()
    client = again.stream(10)
    client.hello()
    batch = client.batch()
    resumed = {m["id"]: m["attempt"] for m in batch if m["id"] in pending}
    assert resumed == {m["id"]: m["attempt"] + 1 for m in second}  # the lost lease failed
    assert len(batch) == 5 and first[0]["id"] not in {m["id"] for m in batch}
    assert again.report(client.token, batch[0]["batch"], [m["id"] for m in batch])[0] == 200
    assert again.wait() == 0
    dead, pending, counters = read_db(db)
    assert (dead, pending, counters) == ({}, {}, {"generated": 6, "done": 6, "dead": 0,
                                                  "requeued": 0})


def test_durable_broker_killed_at_random_moments_settles_each_message_exactly_once(
        processes, db):
    total = 400
    rng = random.Random(5)
    stop = threading.Event()
    flags = ("--durable", "--total", total, "--lease-timeout", "2", "--max-attempts", "3")
    b = processes.broker(db, *flags)
    clients = [Client(b.url, batchsize=rng.randint(2, 10), fail_share=0.2, seed=i)
               for i in range(4)]
    threads = [threading.Thread(target=c.run, args=(stop,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    try:
        for _kill in range(6):
            time.sleep(rng.uniform(0.2, 0.8))
            if b.popen.poll() is not None:
                break  # it finished already
            b.signal(signal.SIGKILL)
            b.wait()
            b = processes.broker(db, *flags, port=b.port)
        assert b.wait(timeout=120) == 0, b.output()[-2000:]
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    dead, pending, counters = read_db(db)
    acked = [i for c in clients for i in c.acked]
    assert len(acked) == len(set(acked)), "a message was acknowledged done twice"
    assert not set(acked) & set(dead), "a message is both done and dead"
    assert len(acked) + len(dead) == total
    assert pending == {} and counters == {"generated": total, "done": len(acked),
                                          "dead": len(dead), "requeued": 0}
    received = {i for c in clients for i, _attempt in c.received}
    assert received == set(acked) | set(dead)  # nothing sent was lost
    with bbolt_lite.open(str(db), readonly=True) as store:
        assert store.check() == []


def test_a_durable_broker_restarted_five_times_under_real_workers_charges_no_busy_batch(
        processes, db, tmp_path):
    """Each SIGTERM drains: the batches in hand when it came are reported, and
    none of their messages is charged an attempt; nothing is lost."""
    total, trace = 3000, tmp_path / "trace.jsonl"
    flags = ["--durable", "--total", total, "--trace", trace, "--seed", 7, "--heartbeat", 2,
             "--progress-every", 0.5]
    b = processes.broker(db, *flags)
    workers = processes.worker("--url", b.url, "--processes", 4, "--time-scale", 0.1)
    signals = []  # (broker pid, when the signal was sent)
    for _ in range(5):
        b.wait_for_line(r"progress: .* [1-9]\d* in flight", timeout=30)  # workers are busy
        signals.append((b.popen.pid, time.time()))
        b.signal(signal.SIGTERM)
        assert b.wait() == 0, b.output()
        assert "drain timeout" not in b.output()
        b = processes.broker(db, *flags, port=b.port)
    assert b.wait(120) == 0, b.output()
    workers.stop()
    events = read_trace(trace)

    # Charged for nothing: a failure for a stream that ended ("stream closed",
    # "lease expired") only ever hits a batch whose worker ended by the rules
    # (a message in it has period > 900); no lease is left over at a restart.
    batches = {}
    for e in events:
        batches.setdefault((e["pid"], e["batch"]), set()).add(e["period"])
    for e in events:
        if e["event"] in ("failed", "dead") and e["reason"] != "not reported":
            assert e["worker"] != 0, e  # left leased by a stop, failed at the next start
            assert max(batches[e["pid"], e["batch"]]) > 900, e
    # The messages in a batch when a signal came, whose tasks succeed: each was done by
    # that same broker, on that attempt.
    in_hand = 0
    for pid, signalled in signals:
        run = [e for e in events if e["pid"] == pid]
        state = {}
        for e in run:
            if e["t"] <= signalled:
                state[e["id"]] = e
        for message_id, e in state.items():
            if e["event"] != "lease" or max(batches[pid, e["batch"]]) > 800:
                continue
            after = [x for x in run if x["id"] == message_id and x["t"] > signalled]
            assert [x["event"] for x in after] == ["done"], (e, after)
            in_hand += 1
    assert in_hand > 0
    print("%d messages in hand at %d signals: all done by the same broker, none charged"
          % (in_hand, len(signals)))

    # Nothing lost: every message settled once, the dead ones in the db.
    done, dead_ids, unsettled, problems = audit_trace(trace)
    assert problems == [] and unsettled == set() and len(done | dead_ids) == total
    dead, pending, counters = read_db(db)
    assert set(dead) == dead_ids
    assert pending == {} and counters["generated"] == total


def test_slow_batches_are_touched_and_keep_their_lease(processes, db, tmp_path):
    """--lease-timeout 1 with tasks of up to 2.4 s (--time-scale 3): worker.py
    touches its batches, so no lease expires."""
    trace = tmp_path / "trace.jsonl"
    b = processes.broker(db, "--lease-timeout", 1, "--total", 40, "--trace", trace,
                         "--heartbeat", 0.5)
    workers = processes.worker("--url", b.url, "--processes", 4, "--batchsize", 5,
                               "--time-scale", 3)
    assert b.wait(120) == 0, b.output()
    workers.stop()
    events = read_trace(trace)
    assert [e for e in events if e.get("reason") == "lease expired"] == []
    assert "expired" not in b.output()
    slow = {e["id"] for e in events if e["event"] == "done" and e["period"] * 3 > 1000}
    assert slow  # done though each took longer than a lease
    touches = len(re.findall(r'"POST /touch\?', b.output()))
    print("%d messages done that ran longer than the 1 s lease, %d touches, 0 leases expired"
          % (len(slow), touches))


def test_a_stopped_worker_touches_nothing_and_loses_its_lease(processes, db):
    """Touches come from a live worker only: a SIGSTOPped one loses its lease."""
    b = processes.broker(db, "--lease-timeout", 1, "--heartbeat", 600,
                         "--seed", safe_seed(2))  # (no task ends the worker before the stop)
    worker = processes.worker("--url", b.url, "--batchsize", 2, "--time-scale", 3,
                              "--log-level", "DEBUG")
    worker.wait_for_line(r"batch \d+: starting message")
    worker.signal(signal.SIGSTOP)
    try:
        b.wait_for_line(r"lease of batch \d+ expired after [0-9.]+ s \(\d+ touches\)",
                        timeout=10)
    finally:
        worker.signal(signal.SIGCONT)


def test_without_durable_a_restart_leaves_earlier_pending_records_alone(processes, db):
    b = processes.broker(db, "--durable", "--heartbeat", "600")
    client = b.stream(2)
    client.hello()
    client.batch()
    b.signal(signal.SIGKILL)
    b.wait()
    again = processes.broker(db)
    again.wait_for_line(r"holds 2 unsettled messages of a --durable run")
    assert len(read_db_after_stop(again, db)[1]) == 2


def read_db_after_stop(process, db):
    process.stop()
    return read_db(db)


# --- a failing disk -------------------------------------------------------------

def test_a_failing_disk_keeps_dead_letters_in_memory_says_503_then_recovers(processes, db):
    limit = 64 * 1024  # the file may not grow past this: writes fail with EFBIG

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    b = processes.broker(db, "--max-attempts", "1", "--heartbeat", "600",
                         preexec_fn=small_disk)
    client = b.stream(100)
    client.hello()
    for _ in range(10):  # 1000 dead letters: far more than 64 KiB
        batch = client.batch()
        assert b.report(client.token, batch[0]["batch"], [])[0] == 200
    b.wait_for_line(r"ERROR.*cannot save .* keeping them in memory")
    status, _headers, body = b.request("GET", "/healthz")
    assert status == 503 and "cannot be written" in body
    dead_before = b.stats()["dead"]
    # The disk has room again: the writer catches up, nothing was dropped.
    resource.prlimit(b.popen.pid, resource.RLIMIT_FSIZE,
                     (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    b.wait_for_line(r"saving works again", timeout=30)
    assert b.request("GET", "/healthz")[0] == 200
    client.close()
    b.stop()
    dead, _pending, _counters = read_db(db)
    assert len(dead) >= dead_before and len(dead) == b.output().count("dead letter ")


def test_a_durable_report_answered_503_on_a_full_disk_gets_409_on_its_retry(processes, db):
    # PROTOCOL.md, appendix A, "Durable mode": the outcome is applied and
    # saved once the disk recovers; the worker's stream and session stay.
    limit = 64 * 1024

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    b = processes.broker(db, "--durable", "--heartbeat", "600", "--read-timeout", "1",
                         "--max-attempts", "1", preexec_fn=small_disk)
    client = b.stream(100)
    client.hello()
    for _ in range(50):  # 100 dead letters a batch: the file soon reaches 64 KiB
        batch = client.batch(timeout=20)
        path = "/report?worker=%s&batch=%d" % (client.token, batch[0]["batch"])
        ids = b"[]"
        status, _headers, _body = b.request("POST", path, ids)
        if status == 503:
            break
        assert status == 200
    else:
        raise AssertionError("the disk never filled")
    assert b.request("POST", path, ids)[0] == 409  # the same session: settled already
    resource.prlimit(b.popen.pid, resource.RLIMIT_FSIZE,
                     (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    b.wait_for_line(r"saving works again", timeout=30)
    following = client.batch(timeout=20)  # the stream lives on: its next batch comes
    assert following[0]["batch"] > batch[0]["batch"]
    client.close()


# --- hostile and broken input ----------------------------------------------------

def raw_exchange(b, payload, timeout=10):
    """Send raw bytes; return all the broker answers until it closes (or times out)."""
    conn = socket.create_connection((b.host, b.port), timeout=timeout)
    conn.sendall(payload)
    answer = b""
    try:
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    except socket.timeout:
        pass
    conn.close()
    return answer


def test_malformed_and_oversized_requests_are_answered_and_honest_workers_go_on(processes, db):
    b = processes.broker(db, "--heartbeat", "600", "--read-timeout", "2")
    honest = b.stream(2)
    honest.hello()
    cases = {
        b"GET /stats HTTP/1.1\r\nNoColonHere\r\n\r\n": (b"HTTP/1.1 ",),
        b"GET /stats HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n":
            (b"HTTP/1.1 431",),
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n": (b"HTTP/1.1 414",),
        b"\x00\xff\xfe garbage\r\n\r\n": (b"HTTP/1.0 400", b"HTTP/1.1 400"),
        b"POST /report?worker=x&batch=1 HTTP/1.1\r\nContent-Length: -5\r\n\r\n": (b"HTTP/1.1 400",),
        b"POST /report?worker=x&batch=1 HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]EXTRA BYTES\r\n\r\n":
            (b"HTTP/1.1 404",),
        # RFC 9112: no line folding, no space before the colon, no HTTP/0.9 or 2
        b"GET /stats HTTP/1.1\r\nX-Folded: a\r\n b\r\n\r\n": (b"HTTP/1.1 400",),
        b"GET /stats HTTP/1.1\r\nHost : x\r\n\r\n": (b"HTTP/1.1 400",),
        b"GET /stats HTTP/1.1\r\nX-Nul: a\x00b\r\n\r\n": (b"HTTP/1.1 400",),
        b"GET /stats\r\n\r\n": (b"HTTP/1.1 400",),
        b"GET /stats HTTP/2.0\r\n\r\n": (b"HTTP/1.1 505",),
        b"GET /stats HTTP/x.y\r\n\r\n": (b"HTTP/1.1 400",),
    }
    for payload, starts in cases.items():
        answer = raw_exchange(b, payload)
        assert answer.startswith(starts), (payload[:60], answer[:200])
    batch = honest.batch()
    assert b.report(honest.token, batch[0]["batch"], [m["id"] for m in batch])[0] == 200
    honest.close()


def test_well_formed_requests_of_every_shape_are_served(processes, db):
    """HTTP/1.0 closes unless asked to keep alive, 1.1 keeps alive unless asked to
    close, values lose their surrounding spaces, and Expect: 100-continue works."""
    b = processes.broker(db)
    answer = raw_exchange(b, b"GET /stats HTTP/1.0\r\n\r\n")  # ends: the broker closes
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1
    two = b"GET /stats HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" \
          b"GET /healthz HTTP/1.1\r\nconnection:close\r\n\r\n"
    assert raw_exchange(b, two).count(b"HTTP/1.1 200") == 2
    answer = raw_exchange(b, b"GET /stats HTTP/1.1\r\nX-Tab:\tvalue \t\r\n"
                             b"Connection:   close  \r\n\n")
    assert answer.startswith(b"HTTP/1.1 200")
    conn = socket.create_connection((b.host, b.port), timeout=10)
    conn.sendall(b"POST /report?worker=nobody&batch=1 HTTP/1.1\r\nContent-Length: 2 \r\n"
                 b"Expect: 100-continue\r\n\r\n")
    assert conn.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    conn.sendall(b"[]")
    assert b"HTTP/1.1 404" in conn.recv(1000)  # read the body, then: unknown worker
    conn.close()


def test_a_body_never_finished_times_out_and_frees_its_thread(processes, db):
    b = processes.broker(db, "--read-timeout", "1")
    baseline = b.threads()
    conn = socket.create_connection((b.host, b.port), timeout=10)
    conn.sendall(b"POST /report?worker=x&batch=1 HTTP/1.1\r\nContent-Length: 100\r\n\r\n[\"a")
    assert conn.recv(100) == b""  # the broker closed it after the read timeout
    conn.close()
    wait_until(lambda: b.threads() <= baseline, what="its thread is still there")


def test_a_client_that_stops_reading_is_cut_after_the_read_timeout(processes, db):
    """Requests sent by the thousand, no answer read: once the socket buffers
    are full, the broker's write waits --read-timeout, then gives up."""
    b = processes.broker(db, "--read-timeout", "1")
    baseline = b.threads()
    conn = socket.socket()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn.settimeout(10)
    conn.connect((b.host, b.port))
    requests = 20000  # ~117 MB of answers: more than any socket buffer holds
    conn.sendall(b"GET / HTTP/1.1\r\n\r\n" * requests)
    wait_until(lambda: b.threads() > baseline, what="no thread started")
    wait_until(lambda: b.threads() <= baseline, what="its thread did not end")  # nothing read
    received = 0
    try:
        while True:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            received += len(chunk)
    except ConnectionResetError:
        pass  # the broker closed with requests unread
    conn.close()
    assert received < requests * 5000
    assert "Traceback" not in b.output()
    assert b.request("GET", "/healthz")[0] == 200


def test_hostile_report_bodies_are_400_or_413_and_change_nothing(processes, db):
    b = processes.broker(db, "--heartbeat", "600")
    client = b.stream(2)
    client.hello()
    batch = client.batch()
    path = "/report?worker=%s&batch=%d" % (client.token, batch[0]["batch"])
    for body in (b"[" * 30000 + b"]" * 30000, b'[{"id": 1}]', b'"a string"', b"null",
                 b"\xc3\x28", b'["a", 1]', b"[" + b"9" * 5000 + b"]"):
        status, _h, answer = b.request("POST", path, body)
        assert status == 400, (body[:40], status, answer)
    too_many = json.dumps(["x%05d" % i for i in range(10000)]).encode()
    assert b.request("POST", path, too_many)[0] == 413  # over the default 64 KiB
    assert b.report(client.token, batch[0]["batch"], [m["id"] for m in batch])[2]["done"] == 2
    client.close()


def test_ten_thousand_ids_within_a_raised_body_limit_are_ignored_not_marked(processes, db):
    b = processes.broker(db, "--heartbeat", "600", "--max-body", "1000000")
    client = b.stream(2)
    client.hello()
    batch = client.batch()
    foreign = ["x%05d" % i for i in range(10000)]
    status, _h, answer = b.report(client.token, batch[0]["batch"],
                                  foreign + [batch[0]["id"]])
    assert status == 200 and answer["done"] == 1 and answer["ignored"] == foreign
    client.close()


def test_hundreds_of_idle_connections_do_not_stop_honest_workers(processes, db):
    b = processes.broker(db, "--heartbeat", "600", "--read-timeout", "2")
    baseline = b.threads()
    idle = [socket.create_connection((b.host, b.port), timeout=10) for _ in range(300)]
    honest = b.stream(3)
    honest.hello()
    for _ in range(5):
        batch = honest.batch()
        assert b.report(honest.token, batch[0]["batch"], [m["id"] for m in batch])[0] == 200
    for conn in idle:
        assert conn.recv(10) == b""  # closed by the broker after the read timeout
        conn.close()
    honest.close()
    wait_until(lambda: b.threads() <= baseline, what="their threads are still there")


def test_more_streams_than_max_workers_get_503(processes, db):
    b = processes.broker(db, "--max-workers", "2", "--heartbeat", "600")
    first, second = b.stream(1), b.stream(1)
    first.hello()
    second.hello()
    third = b.stream(1)
    assert third.status == 503 and "too many workers" in third.body["error"]
    assert third.headers["retry-after"] == "2"
    first.close()
    streams = []  # a place is free again once a stream closes

    def admitted():
        streams.append(b.stream(1))
        return streams[-1].status == 200

    wait_until(admitted, what="a fourth stream admitted")
    second.close()
    for stream in streams:
        stream.close()


# --- access control -----------------------------------------------------------------

def test_read_timeout_bounds_a_whole_request_trickled_a_byte_at_a_time(processes, db):
    """A request cut by --read-timeout closes its connection at that moment,
    with no answer: its next bytes are never read as a new request."""
    b = processes.broker(db, "--read-timeout", "2")
    for head, trickle in ((b"GET /stats HTTP/1.1\r\nX-Slow: ", b"a"),  # a header line
                          (b"GET /stats HTTP/1.1\r\n", b"X-Pad: GET /stats HTTP/1.1\r\n"),
                          (b"POST /report?worker=x&batch=1 HTTP/1.1\r\n"
                           b"Content-Length: 100\r\n\r\n[", b" ")):  # a body
        conn = socket.create_connection((b.host, b.port), timeout=10)
        conn.sendall(head)
        started = time.monotonic()
        closed, answer = False, b""
        while time.monotonic() - started < 8 and not closed:
            try:
                conn.sendall(trickle)  # every 0.3 s: each recv() alone would wait on
            except OSError:
                closed = True
                break
            readable = select.select([conn], [], [], 0.3)[0]
            if readable:
                try:
                    data = conn.recv(100)
                except ConnectionResetError:
                    data = b""
                answer += data
                closed = data == b""
        elapsed = time.monotonic() - started
        conn.close()
        assert closed and answer == b"" and elapsed < 3.5, (head, elapsed, answer)


def test_a_burst_of_300_connects_is_answered_at_once(processes, db):
    b = processes.broker(db)
    clients = []
    for _ in range(300):
        conn = socket.socket()
        conn.setblocking(False)
        conn.connect_ex((b.host, b.port))
        clients.append(conn)
    answered = set()
    pending = {conn: b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n" for conn in clients}
    deadline = time.monotonic() + 10  # with a listen queue of 5: SYN retries of 1, 3, 7 s...
    try:
        while len(answered) < len(clients) and time.monotonic() < deadline:
            readable, writable, _ = select.select(
                [c for c in clients if c not in answered and c not in pending],
                list(pending), [], 0.2)
            for conn in writable:
                try:
                    conn.send(pending.pop(conn))
                except BlockingIOError:
                    pass
            for conn in readable:
                if conn.recv(4096).startswith(b"HTTP/1.1 200"):
                    answered.add(conn)
    finally:
        for conn in clients:
            conn.close()
    assert len(answered) == 300
