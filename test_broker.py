"""broker.py against PROTOCOL.md: a real broker process, spoken to over loopback."""

import collections
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from unittest.mock import ANY as mock_any

import bbolt_lite
import broker
from conftest import HERE, jetstream_flags, run_boltcheck

# The protocol suite runs twice: with the queue in the broker's memory, and
# in NATS JetStream (broker.py --jetstream), apart from the tests named here,
# whose behaviour PROTOCOL.md (appendix B, "With --jetstream") says differs there.
JETSTREAM_DIFFERS = {
    "test_stats_counts_what_happened":
        "`generated` counts what this broker published to keep --backlog waiting, and a "
        "failed message waits in the stream, not in `retrying`",
}
pytestmark = pytest.mark.usefixtures("queue")


def pytest_generate_tests(metafunc):
    if "queue" in metafunc.fixturenames:
        modes = ["memory"]
        if "processes" in metafunc.fixturenames and \
                metafunc.function.__name__ not in JETSTREAM_DIFFERS:
            modes.append("jetstream")
        metafunc.parametrize("queue", modes, indirect=True)


@pytest.fixture
def queue(request):
    """Where the broker keeps its queue: "memory", or "jetstream"."""
    if request.param == "jetstream" and "processes" in request.fixturenames:
        processes = request.getfixturevalue("processes")
        processes.broker_flags = jetstream_flags(request.getfixturevalue("nats_server"))
    return request.param


def dead_letters(db):
    with bbolt_lite.open(str(db), readonly=True, timeout=5) as store, store.view() as tx:
        bucket = tx.bucket(b"failed")
        return {k.decode(): json.loads(v) for k, v in bucket.items()} if bucket else {}


def is_xid(text):
    try:
        broker.xid_decode(text)
        return True
    except ValueError:
        return False


# --- the stream -------------------------------------------------------------

def test_stream_starts_with_retry_then_hello_and_protocol_headers(processes, db):
    b = processes.broker(db, "--heartbeat", "7", "--lease-timeout", "4")
    client = b.stream(6)
    assert client.status == 200
    assert client.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert client.headers["cache-control"] == "no-store"
    assert client.headers["x-accel-buffering"] == "no"
    hello = client.hello()
    assert client.raw.startswith(b"retry: 2000\n\nevent: hello\ndata: {")
    assert client.parser.reconnection_time == 2000
    assert set(hello) == {"worker", "batchsize", "lease_ms", "heartbeat_ms"}
    assert (hello["batchsize"], hello["lease_ms"], hello["heartbeat_ms"]) == (6, 4000, 7000)
    assert len(hello["worker"]) >= 22  # at least 128 random bits in base64url
    client.close()


def test_an_http_1_1_stream_is_chunked_a_chunk_per_write_and_ends_with_the_last_chunk(
        processes, db):
    b = processes.broker(db, "--heartbeat", "600")
    client = b.stream(3)
    assert client.headers["transfer-encoding"] == "chunked"
    client.hello()
    batch = client.batch()
    # The whole batch is one chunk: its size line, then exactly its events.
    events = b"".join(b'event: msg\ndata: {"id":"%s","period":%d,"attempt":1,"batch":%d,'
                      b'"size":3}\n\n' % (m["id"].encode(), m["period"], m["batch"])
                      for m in batch)
    assert (b"\r\n%x\r\n" % len(events)) + events + b"\r\n" in client.wire
    b.signal(signal.SIGTERM)  # a drain: the report is still taken, then bye
    b.wait_for_line(r"draining: waiting")
    assert b.report(client.token, batch[0]["batch"], [m["id"] for m in batch])[0] == 200
    assert client.next_event() == ("bye", {"reason": "shutdown"})
    assert client.next_item() is None and client.dechunker.ended  # the last chunk, then EOF
    client.close()


def test_an_http_1_0_stream_is_close_delimited(processes, db):
    b = processes.broker(db, "--heartbeat", "600")
    conn = socket.create_connection((b.host, b.port), timeout=10)
    conn.sendall(b"GET /task?batchsize=2 HTTP/1.0\r\n\r\n")
    data = b""
    while b"event: msg" not in data:
        data += conn.recv(65536)
    head, _sep, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert body.startswith(b"retry: 2000\n\nevent: hello\n")
    conn.close()


def test_each_message_is_one_msg_event_of_compact_json_with_attempt_batch_and_size(processes, db):
    b = processes.broker(db)
    client = b.stream(5)
    client.hello()
    messages = client.batch()
    assert len(messages) == 5
    assert len({m["batch"] for m in messages}) == 1
    for m in messages:
        assert set(m) == {"id", "period", "attempt", "batch", "size"}
        assert is_xid(m["id"])
        assert 1 <= m["period"] <= 1000
        assert (m["attempt"], m["size"]) == (1, 5)
    # The raw bytes (hello and the batch may have come in one read).
    events = client.raw[client.raw.index(b"event: msg"):].split(b"\n\n")[:5]
    for event, m in zip(events, messages):
        assert event == b"event: msg\ndata: " + json.dumps(m, separators=(",", ":")).encode()
    client.close()


def test_the_batchsize_alias_is_accepted(processes, db):
    b = processes.broker(db)
    client = b.stream(3, name="batchSize")
    assert client.hello()["batchsize"] == 3
    assert len(client.batch()) == 3
    client.close()


@pytest.mark.parametrize("query", ["", "batchsize=", "batchsize=0", "batchsize=-1",
                                   "batchsize=abc", "batchsize=1000000000", "batchsize=2.5",
                                   "batchsize=1001", "batchsize=2&batchsize=2",
                                   "batchsize=2&batchSize=2", "batchsize=%205"])
def test_bad_batchsize_is_400_with_a_json_error_never_a_stream(processes, db, query):
    b = processes.broker(db)
    status, headers, body = b.request("GET", "/task?" + query)
    assert status == 400
    assert headers["Content-Type"] == "application/json"
    assert isinstance(body["error"], str) and body["error"]


def test_max_batchsize_flag_bounds_the_batchsize(processes, db):
    b = processes.broker(db, "--max-batchsize", "4")
    assert b.request("GET", "/task?batchsize=5")[0] == 400
    client = b.stream(4)
    assert client.status == 200
    client.close()


def test_idle_and_busy_streams_get_ping_comments_every_heartbeat(processes, db):
    b = processes.broker(db, "--total", "1", "--heartbeat", "0.2")
    busy = b.stream(2)
    busy.hello()
    busy.batch()
    idle = b.stream(2)
    idle.hello()
    for client in (busy, idle, busy, idle):
        assert client.next_item() == ("comment", " ping")
    busy.close()
    idle.close()


def test_a_worker_with_a_batch_in_flight_gets_nothing_more(processes, db):
    b = processes.broker(db, "--heartbeat", "0.2")
    client = b.stream(3)
    client.hello()
    client.batch()
    # Three heartbeats pass: only pings, no new message.
    for _ in range(3):
        assert client.next_item() == ("comment", " ping")
    client.close()


def test_free_workers_get_messages_in_the_order_they_became_free(processes, db):
    b = processes.broker(db, "--total", "2", "--heartbeat", "60")
    first, second = b.stream(1), b.stream(1)
    first.hello()
    [m1] = first.batch()
    second.hello()
    [m2] = second.batch()
    third = b.stream(1)   # free first
    third.hello()
    fourth = b.stream(1)  # free second
    fourth.hello()
    assert b.report(first.token, m1["batch"], [])[0] == 200  # m1 fails its attempt
    [again] = third.batch()
    assert (again["id"], again["attempt"]) == (m1["id"], 2)
    second.close()                                              # m2 fails its attempt
    [again] = fourth.batch()
    assert (again["id"], again["attempt"]) == (m2["id"], 2)
    for c in (first, third, fourth):
        c.close()


def test_a_reported_message_is_never_sent_again_and_total_runs_exit_0(processes, db):
    b = processes.broker(db, "--total", "3", "--heartbeat", "0.2")
    client = b.stream(3)
    client.hello()
    batch = client.batch()
    status, _, body = b.report(client.token, batch[0]["batch"], [m["id"] for m in batch])
    assert status == 200
    assert body == {"batch": batch[0]["batch"], "done": 3, "retried": 0, "dead": 0, "ignored": []}
    # Nothing more is sent: the broker says bye and exits 0.
    while True:
        kind, data = client.next_event()
        assert kind != "msg"
        if kind == "bye":
            break
    assert b.wait() == 0
    assert "all 3 messages settled: 3 done, 0 dead" in b.output()
    assert dead_letters(db) == {}


def test_unreported_message_comes_back_with_attempt_plus_one_then_is_dead_lettered(processes, db):
    b = processes.broker(db, "--total", "1")
    client = b.stream(1)
    client.hello()
    seen = []
    for attempt in (1, 2, 3):
        [m] = client.batch()
        assert m["attempt"] == attempt
        seen.append(m["id"])
        status, _, body = b.report(client.token, m["batch"], [])
        assert status == 200
        if attempt < 3:
            assert (body["done"], body["retried"], body["dead"]) == (0, 1, 0)
        else:
            assert (body["done"], body["retried"], body["dead"]) == (0, 0, 1)
    assert len(set(seen)) == 1
    assert client.next_event() == ("bye", {"reason": "shutdown"})  # never sent again
    assert b.wait() == 0
    letter = dead_letters(db)[seen[0]]
    assert letter["attempts"] == 3 and letter["reason"] == "not reported"
    assert letter["id"] == seen[0] and 1 <= letter["period"] <= 1000
    assert letter["failed_at"].endswith("Z") and letter["failed_at"][10] == "T"


def test_a_closed_stream_ends_the_lease_at_once_not_at_the_next_heartbeat(processes, db):
    b = processes.broker(db, "--total", "1", "--heartbeat", "600", "--max-attempts", "2")
    holder = b.stream(1)
    holder.hello()
    [m] = holder.batch()
    other = b.stream(1)
    other.hello()
    holder.close()
    [again] = other.batch(timeout=10)  # the heartbeat is 600 s away
    assert (again["id"], again["attempt"]) == (m["id"], 2)
    other.close()
    assert b.wait() == 0
    assert dead_letters(db)[m["id"]]["reason"] == "stream closed"


def test_lease_timeout_closes_the_stream_first_then_offers_the_messages_again(processes, db):
    b = processes.broker(db, "--total", "1", "--lease-timeout", "0.5", "--heartbeat", "600")
    slow = b.stream(1)
    slow.hello()
    [m] = slow.batch()
    other = b.stream(1)
    other.hello()
    # The broker said why, then closed the slow stream.
    assert slow.next_event(timeout=10) == ("bye", {"reason": "lease expired"})
    assert slow.next_item(timeout=10) is None
    [again] = other.batch()
    assert (again["id"], again["attempt"]) == (m["id"], 2), "\n".join(
        l for l in b.output().splitlines() if "fetched" in l or "lease" in l or "w2" in l)
    assert b.report(slow.token, m["batch"], [m["id"]])[0] == 404  # its token died
    other.close()


def test_a_lease_that_expires_on_the_last_attempt_is_dead_with_reason_lease_expired(processes, db):
    b = processes.broker(db, "--total", "1", "--lease-timeout", "0.3", "--max-attempts", "1")
    client = b.stream(1)
    client.hello()
    [m] = client.batch()
    assert b.wait() == 0
    assert dead_letters(db)[m["id"]]["reason"] == "lease expired"


def test_late_and_repeated_reports_answer_409_and_change_nothing(processes, db):
    b = processes.broker(db, "--heartbeat", "600")
    client = b.stream(2)
    client.hello()
    first = client.batch()
    number = first[0]["batch"]
    assert b.report(client.token, number, [first[0]["id"]])[0] == 200
    second = client.batch()
    before = b.stats()
    status, _, body = b.report(client.token, number, [m["id"] for m in first])
    assert status == 409 and "error" in body
    assert b.report(client.token, second[0]["batch"] + 5, [])[0] == 409
    after = b.stats()
    assert (after["done"], after["dead"], after["in_flight"]) == (
        before["done"], before["dead"], before["in_flight"])
    client.close()


def test_ids_not_in_the_batch_come_back_ignored_and_are_not_marked(processes, db):
    b = processes.broker(db, "--heartbeat", "600")
    one, two = b.stream(2), b.stream(2)
    one.hello()
    two.hello()
    mine, theirs = one.batch(), two.batch()
    foreign = [theirs[0]["id"], "not-an-id", theirs[0]["id"]]
    status, _, body = b.report(one.token, mine[0]["batch"], [mine[0]["id"]] + foreign)
    assert status == 200
    assert body["done"] == 1 and body["retried"] == 1
    assert body["ignored"] == [theirs[0]["id"], "not-an-id"]
    # Theirs is still theirs: its report settles it.
    status, _, body = b.report(two.token, theirs[0]["batch"], [m["id"] for m in theirs])
    assert (status, body["done"]) == (200, 2)
    one.close()
    two.close()


def test_report_errors_have_their_status_in_the_protocol_order(processes, db):
    b = processes.broker(db, "--heartbeat", "600")
    client = b.stream(2)
    client.hello()
    [m, _] = client.batch()
    good = "/report?worker=%s&batch=%d" % (client.token, m["batch"])

    def post(path, body=b"[]", headers=None):
        status, _headers, parsed = b.request("POST", path, body, headers)
        assert isinstance(parsed, dict) and parsed.get("error"), parsed
        return status

    # 413 is decided from Content-Length, before anything else.
    conn = socket.create_connection((b.host, b.port), timeout=10)
    conn.sendall(b"POST /report?batch=x HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n")
    assert conn.recv(4096).startswith(b"HTTP/1.1 413")
    conn.close()
    conn = socket.create_connection((b.host, b.port), timeout=10)
    conn.sendall(("POST %s HTTP/1.1\r\nHost: x\r\n\r\n" % good).encode())
    assert conn.recv(4096).startswith(b"HTTP/1.1 411")
    conn.close()
    assert post("/report?batch=%d" % m["batch"]) == 400                     # no worker
    assert post("/report?worker=%s" % client.token) == 400                  # no batch
    assert post("/report?worker=%s&batch=abc" % client.token) == 400        # malformed
    assert post(good + "&batch=1") == 400                                   # given twice
    assert post(good, b'"x"') == 400                                        # not an array
    assert post(good, b'{"done": "x"}') == 400                              # nor an object
    assert post(good, b"[1, 2]") == 400                                     # not strings
    assert post(good, b"[\"a\"") == 400                                     # not JSON
    assert post(good, b"[\"\xff\xfe\"]") == 400                             # not UTF-8
    assert post("/report?worker=guessed&batch=%d" % m["batch"]) == 404
    assert post("/report?worker=%s&batch=%d" % (client.token, m["batch"] + 1)) == 409
    # None of it changed the batch: it is still in flight and reportable.
    assert b.report(client.token, m["batch"], [m["id"]])[2]["done"] == 1
    client.close()


def test_unknown_paths_are_404_and_wrong_methods_405_with_json_errors(processes, db):
    b = processes.broker(db)
    status, _, body = b.request("GET", "/nope")
    assert status == 404 and body["error"]
    status, headers, body = b.request("POST", "/task?batchsize=2", b"")
    assert status == 405 and headers["Allow"] == "GET, OPTIONS" and body["error"]
    status, headers, body = b.request("GET", "/report?worker=x&batch=1")
    assert status == 405 and headers["Allow"] == "OPTIONS, POST"
    status, headers, body = b.request("DELETE", "/stats")
    assert status == 405 and headers["Allow"] == "GET, HEAD, OPTIONS"


def test_head_answers_as_get_without_a_body_and_options_lists_the_methods(processes, db):
    b = processes.broker(db, "--token", "secret")
    auth = {"Authorization": "Bearer secret"}
    for path in ("/healthz", "/stats", "/metrics", "/dead", "/"):
        get_status, get_headers, _body = b.request("GET", path, headers=auth)
        conn = http.client.HTTPConnection(b.host, b.port, timeout=10)
        conn.request("HEAD", path, headers=auth)
        head = conn.getresponse()
        assert head.read() == b"" and head.status == get_status == 200, path
        assert head.getheader("Content-Type") == get_headers["Content-Type"]
        if path in ("/healthz", "/"):  # the same bytes each time
            assert int(head.getheader("Content-Length")) == int(get_headers["Content-Length"])
        conn.close()
    conn = http.client.HTTPConnection(b.host, b.port, timeout=10)
    conn.request("HEAD", "/task?batchsize=1", headers=auth)  # a stream has no HEAD
    head = conn.getresponse()
    assert head.status == 405 and head.getheader("Allow") == "GET, OPTIONS"
    assert head.read() == b""
    conn.close()
    # OPTIONS needs no token (a browser's preflight carries none).
    status, headers, body = b.request("OPTIONS", "/report")
    assert status == 204 and headers["Allow"] == "OPTIONS, POST" and body == ""
    status, headers, _body = b.request("OPTIONS", "/stats")
    assert status == 204 and headers["Allow"] == "GET, HEAD, OPTIONS"


def test_malformed_requests_get_an_error_and_the_broker_serves_on(processes, db):
    b = processes.broker(db)
    for raw in (b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                b"GET /stats HTTP/1.1\r\n" + b"X: " + b"a" * 70000 + b"\r\n\r\n"):
        conn = socket.create_connection((b.host, b.port), timeout=10)
        conn.sendall(raw)
        assert conn.recv(4096).startswith(b"HTTP/1.")
        conn.close()
    assert b.stats()["workers"] == 0


def test_stats_counts_what_happened(processes, db):
    b = processes.broker(db, "--heartbeat", "600")
    client = b.stream(4)
    client.hello()
    batch = client.batch()
    b.report(client.token, batch[0]["batch"], [m["id"] for m in batch[:3]])
    client.batch()
    stats = b.stats()
    assert set(stats) == {"uptime_s", "generated", "dispatched", "done", "dead", "retrying", "delayed",
                          "in_flight", "workers", "busy_workers", "done_per_s"}
    assert stats["done"] == 3 and stats["dispatched"] == 8 and stats["in_flight"] == 4
    assert stats["workers"] == 1 and stats["busy_workers"] == 1
    assert stats["generated"] == 7  # the failed one was resent, not regenerated
    client.close()


def test_healthz_says_ok(processes, db):
    b = processes.broker(db)
    assert b.request("GET", "/healthz")[::2] == (200, "ok\n")


def test_sigterm_drains_busy_workers_report_then_every_stream_gets_bye_and_it_exits_0(
        processes, db, queue):
    b = processes.broker(db, "--heartbeat", "600")
    busy = [b.stream(2) for _ in range(3)]
    batches = []
    for c in busy:
        c.hello()
        batches.append(c.batch())
    free = b.stream(2)
    free.hello()
    free_batch = free.batch()
    assert b.report(free.token, free_batch[0]["batch"], [])[0] == 200  # all failed: retried
    free.batch()  # its next batch: the two retries
    b.signal(signal.SIGTERM)
    b.wait_for_line(r"draining: waiting up to 10\.0 s for 4 busy workers to report 8 messages")
    status, _headers, body = b.request("GET", "/task?batchsize=2")
    assert status == 503 and "shutting down" in body["error"]  # no new stream while draining
    for c, batch in zip(busy, batches):
        assert b.report(c.token, batch[0]["batch"], [m["id"] for m in batch])[0] == 200
        assert c.next_event() == ("bye", {"reason": "shutdown"})  # and no next batch
        assert c.next_item() is None
    assert b.popen.poll() is None  # one worker is still busy
    free.close()  # its stream ends: its lease with it
    assert b.wait() == 0
    assert re.search(r"drained in [0-9.]+ s", b.output())
    waiting = 2 if queue == "memory" else 0  # (with --jetstream they wait in the stream)
    assert re.search(r"6 done, 0 dead; when it stopped 0 messages were leased and %d waiting"
                     % waiting,
                     b.output())
    with bbolt_lite.open(str(db), timeout=1) as store:  # the lock was released
        assert store.check() == []


def test_a_last_report_gets_no_next_batch_and_its_stream_ends_with_bye(processes, db):
    b = processes.broker(db, "--heartbeat", "600")
    client = b.stream(2)
    client.hello()
    batch = client.batch()
    ids = json.dumps([m["id"] for m in batch]).encode()
    path = "/report?worker=%s&batch=%d" % (client.token, batch[0]["batch"])
    assert b.request("POST", path + "&last=yes", ids)[0] == 400
    status, _headers, answer = b.request("POST", path + "&last=1", ids)
    assert status == 200 and answer["done"] == 2
    assert client.next_event() == ("bye", {"reason": "last batch reported"})
    assert client.next_item() is None
    assert b.stats()["dispatched"] == 2  # nothing more was sent


def test_a_touch_extends_the_lease_by_a_whole_lease_timeout_from_now(processes, db):
    b = processes.broker(db, "--heartbeat", "600", "--lease-timeout", "1")
    client = b.stream(2)
    client.hello()
    batch = client.batch()
    number = batch[0]["batch"]
    touch = "/touch?worker=%s&batch=%d" % (client.token, number)
    for _ in range(3):  # 1.8 s in all, well past the 1 s lease
        time.sleep(0.6)
        assert b.request("POST", touch) == (200, mock_any, {"batch": number, "lease_ms": 1000})
    assert b.report(client.token, number, [m["id"] for m in batch])[0] == 200
    assert "expired" not in b.output()
    client.batch()  # untouched, the next batch's lease expires
    assert client.next_event(timeout=5) == ("bye", {"reason": "lease expired"})


def test_a_touch_is_refused_as_a_report_is(processes, db):
    b = processes.broker(db, "--heartbeat", "600")
    client = b.stream(2)
    client.hello()
    number = client.batch()[0]["batch"]
    assert b.request("POST", "/touch?worker=nobody&batch=%d" % number)[0] == 404
    assert b.request("POST", "/touch?worker=%s&batch=%d" % (client.token, number + 1))[0] == 409
    assert b.request("POST", "/touch?worker=%s" % client.token)[0] == 400
    assert b.request("POST", "/touch?worker=%s&batch=%d" % (client.token, number),
                     b"[]")[0] == 400  # a touch has no body
    assert b.request("GET", "/touch")[0] == 405


def test_a_second_signal_ends_the_drain_at_once(processes, db):
    b = processes.broker(db, "--heartbeat", "600", "--drain-timeout", "60")
    holder = b.stream(2)
    holder.hello()
    holder.batch()
    b.signal(signal.SIGTERM)
    b.wait_for_line(r"draining: waiting up to 60\.0 s for 1 busy workers")
    b.signal(signal.SIGINT)
    assert holder.next_event(timeout=5) == ("bye", {"reason": "shutdown"})
    assert b.wait(10) == 0
    assert "SIGINT again: stopping now" in b.output()
    assert "when it stopped 2 messages were leased" in b.output()


def test_the_drain_ends_after_drain_timeout_and_a_free_stream_ends_at_once(processes, db):
    b = processes.broker(db, "--heartbeat", "600", "--drain-timeout", "0.5")
    holder, free = b.stream(2), b.stream(2)
    holder.hello()
    holder.batch()
    free.hello()
    batch = free.batch()
    assert b.report(free.token, batch[0]["batch"], [m["id"] for m in batch])[0] == 200
    free.batch()
    started = time.monotonic()
    b.signal(signal.SIGHUP)  # as SIGTERM
    b.wait_for_line(r"SIGHUP: stopping")
    assert holder.next_event(timeout=5) == ("bye", {"reason": "shutdown"})
    assert b.wait(10) == 0
    assert time.monotonic() - started < 5
    assert "drain timeout: 2 busy workers had not reported after 0.5 s" in b.output()


def test_a_second_broker_on_the_same_db_refuses_clearly(processes, db):
    processes.broker(db)
    second = subprocess.run([sys.executable, "broker.py", "--port", "0", "--db", str(db)],
                            cwd=HERE, capture_output=True, text=True, timeout=30)
    assert second.returncode == 2
    assert "locked by another process" in second.stderr


BROKER_FLAGS = {"--help", "--host", "--port", "--db", "--max-attempts", "--lease-timeout",
                "--heartbeat", "--max-batchsize", "--total", "--seed", "--durable",
                "--max-workers", "--max-body", "--read-timeout", "--token", "--cors-origin",
                "--drain-timeout", "--token-file", "--tls-cert", "--tls-key", "--version",
                "--workers", "--jetstream", "--js-stream", "--js-replicas", "--backlog",
                "--progress-every", "--trace", "--log-level", "--pin", "--source",
                "--max-backlog", "--dedup-window", "--max-enqueue-body", "--retry-delay", "--retry-delay-max"}


def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, "broker.py", "--help"], cwd=HERE,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    options = re.findall(r"^  (?:-\w, )?(--[a-z][a-z-]*)", result.stdout, re.M)
    assert set(options) == BROKER_FLAGS
    for flag in BROKER_FLAGS - {"--help"}:  # and the module's docstring, the usage page
        assert flag in broker.__doc__, flag


# --- ids -------------------------------------------------------------------------

def test_xid_text_matches_the_rs_xid_reference_vector():
    # From rs/xid's README: 9m4e2mr0ui3e8a215n4g.
    raw = bytes.fromhex("4d88e15b60f486e428412dc9")
    assert broker.xid_encode(raw) == "9m4e2mr0ui3e8a215n4g"
    assert broker.xid_decode("9m4e2mr0ui3e8a215n4g") == raw
    for bad in ("9m4e2mr0ui3e8a215n4h", "9m4e2mr0ui3e8a215n4", "9M4E2MR0UI3E8A215N4G", 17):
        with pytest.raises(ValueError):
            broker.xid_decode(bad)


def test_vendored_xids_are_unique_and_ordered_across_threads():
    import threading
    generator = broker.XidGenerator()
    ids = []
    lock = threading.Lock()

    def make():
        mine = [generator.new() for _ in range(2000)]
        with lock:
            ids.extend(mine)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(set(ids)) == 8000
    counters = sorted(int.from_bytes(broker.xid_decode(i)[9:], "big") for i in ids)
    assert counters[-1] - counters[0] == 7999 or counters[0] < 8000  # consecutive, or wrapped


@pytest.mark.parametrize("start", [0x00FFF8, 0xFFFFF8, 0x123456, 0x12343A, 0x1234C0])
def test_a_batch_of_ids_at_once_counts_on_across_the_high_byte_and_the_wrap(start):
    generator = broker.XidGenerator()
    generator._counter = start - 1
    ids = generator.take(13) + [generator.new()]
    raw = [broker.xid_decode(i) for i in ids]
    assert [int.from_bytes(r[9:], "big") for r in raw] == \
        [(start + n) & 0xFFFFFF for n in range(14)]
    assert len({r[:9] for r in raw}) <= 2  # the same machine and pid (the second may tick)
    assert [broker.xid_encode(r) for r in raw] == ids  # canonical text


def test_ids_carry_the_second_they_were_made_in_as_the_clock_moves(monkeypatch):
    generator = broker.XidGenerator()
    clock = [1_800_000_000.9]
    monkeypatch.setattr(broker.time, "time", lambda: clock[0])
    seconds = []
    for step in (0.0, 0.05, 0.2, 3.0, -7.5, 0.0):  # (the clock may be set back)
        clock[0] += step
        text = generator.take(3)[2]
        seconds.append(int.from_bytes(broker.xid_decode(text)[:4], "big"))
    assert seconds == [int(c) for c in (1_800_000_000.9, 1_800_000_000.95, 1_800_000_001.15,
                                        1_800_000_004.15, 1_799_999_996.65, 1_799_999_996.65)]


def test_periods_drawn_a_batch_at_a_time_are_those_drawn_one_at_a_time():
    import random
    one, batches = random.Random(11), random.Random(11)
    singly = [broker.draw_period(one) for _ in range(20000)]
    together = []
    sizes = random.Random(3)
    while len(together) < len(singly):
        together += broker.draw_periods(batches, sizes.randint(0, 12))
    assert together[:len(singly)] == singly
    assert min(singly) == broker.MIN_PERIOD_MS and max(singly) == broker.MAX_PERIOD_MS
    # Uniform: each tenth of the range holds a tenth of the draws, give or take.
    tenths = collections.Counter((p - 1) * 10 // 1000 for p in singly)
    assert sorted(tenths) == list(range(10))
    assert all(abs(n - 2000) < 300 for n in tenths.values()), tenths


def test_batch_events_are_the_compact_json_of_each_message_whatever_its_attempts():
    batch = broker.Batch(7, None, False)
    messages = [broker.Message("9m4e2mr0ui3e8a215n4g", 1), broker.Message("9m4e2mr0ui3e8a215n50", 1000),
                broker.Message("9m4e2mr0ui3e8a215n5g", 917)]
    for message, attempts in zip(messages, (1, 1000, 123456)):
        message.attempts = attempts
    batch.messages = {m.id: m for m in messages}
    text = broker.batch_events(batch).decode("ascii")
    assert text == "".join(broker.sse_event("msg", {
        "id": m.id, "period": m.period, "attempt": m.attempts, "batch": 7, "size": 3}).decode()
        for m in messages)


def test_ids_parse_with_go_xid_from_string(processes, db, boltcheck):
    b = processes.broker(db)
    client = b.stream(10)
    client.hello()
    ids = [m["id"] for m in client.batch()] + [broker.XidGenerator().new() for _ in range(5)]
    client.close()
    result = run_boltcheck(boltcheck, "xid", *ids)
    assert result.returncode == 0, result.stdout + result.stderr
    parsed = [json.loads(line) for line in result.stdout.splitlines()]
    import time
    for record, text in zip(parsed, ids):
        assert record["string"] == text
        assert abs(record["time"] - time.time()) < 600
        assert record["machine"] == broker._machine_id().hex()
    counters = [r["counter"] for r in parsed[:10]]
    assert counters == sorted(counters) or max(counters) - min(counters) > 1 << 23  # or wrapped


def test_dead_letter_file_passes_go_bbolt_check(processes, db, boltcheck):
    b = processes.broker(db, "--total", "20", "--max-attempts", "1")
    client = b.stream(20)
    client.hello()
    seen = 0
    while seen < 20:  # (one batch, or more while a queue in JetStream fills)
        batch = client.batch()
        done = [m["id"] for m in batch][:max(0, 5 - seen)]
        seen += len(batch)
        b.report(client.token, batch[0]["batch"], done)
    assert b.wait() == 0
    assert len(dead_letters(db)) == 15
    result = run_boltcheck(boltcheck, "check", str(db))
    assert result.stdout.strip() == "OK", result.stdout + result.stderr
    assert os.path.getsize(db) > 0


def test_a_broken_pypi_xid_package_falls_back_to_the_vendored_ids(monkeypatch):
    import types

    class Broken:
        def string(self):
            raise TypeError("like xid 1.0.4 on Python 3")

    monkeypatch.setitem(sys.modules, "xid", types.SimpleNamespace(Xid=Broken))
    assert broker._pypi_xid_generator() is None
    new_id = broker.new_id_function()
    assert is_xid(new_id())


def test_a_sound_pypi_xid_package_is_used(monkeypatch):
    import types
    vendored = broker.XidGenerator()

    made = []  # every id the package made

    class Sound:
        def string(self):
            made.append(vendored.new())
            return made[-1]

    monkeypatch.setitem(sys.modules, "xid", types.SimpleNamespace(Xid=Sound))
    new_id = broker.new_id_function()
    first = new_id()
    assert first == made[-1] and is_xid(first)  # the package's id, not one of our own
    assert new_id() == made[-1] != first
    monkeypatch.setitem(sys.modules, "xid", None)  # not installed
    assert broker._pypi_xid_generator() is None


# --- transport: HTTP/1.0 keep-alive, CORS ---------------------------------------------

def exchange(conn, request):
    """Send one request on an open connection; its answer's head and body."""
    conn.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _sep, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    while len(body) < length:
        body += conn.recv(65536)
    return head.decode("latin-1"), body


def test_an_http_1_0_keep_alive_request_is_answered_keep_alive_and_kept_open(processes, db):
    b = processes.broker(db)
    conn = socket.create_connection((b.host, b.port), timeout=10)
    for _ in range(3):  # as ab -k does: one connection, many requests
        head, body = exchange(conn, b"GET /stats HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert head.startswith("HTTP/1.1 200") and "Connection: keep-alive" in head
        assert json.loads(body)["workers"] == 0  # the answer is /stats
    head, _body = exchange(conn, b"GET /stats HTTP/1.0\r\n\r\n")  # no keep-alive: closed
    assert "Connection: close" in head
    assert conn.recv(10) == b""
    conn.close()
