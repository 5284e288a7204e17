"""The broker's edges: stopping, bytes that never left, failed writes, poison batches.

Each test names the rule it proves (PROTOCOL.md, "Dispatch and retry rules",
"Graceful stop"), against a real broker process where the rule crosses the
wire.
"""

import json
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

import broker
from conftest import HERE, SSEClient, dead_letters_made, http_request, read_trace


def fixed_ids():
    counter = iter(range(10 ** 6))
    return lambda: "m%05d" % next(counter)


# --- no lease after stop ----------------------------------------------------------

def test_once_the_stop_begins_a_closing_stream_s_messages_go_to_no_other_stream():
    leases = []
    dispatcher = broker.Dispatcher(total=1, new_id=fixed_ids(),
                                   on_event=lambda kind, m, s: leases.append((kind, s.number)))
    sessions = [dispatcher.connect(1) for _ in range(4)]
    holder = sessions[0]
    dispatcher.batch_written(holder, holder.batch)
    dispatcher.stop()
    for session in sessions:  # each stream closes as the broker stops
        dispatcher.disconnect(session)
        assert all(s.batch is None for s in sessions if s is not holder)
    assert [kind for kind, _ in leases] == ["lease", "failed"]
    assert dispatcher.snapshot()["retry"] == ["m00000"]
    assert dispatcher.wait_for_batch(sessions[1], 0) is None


def test_a_batch_assigned_but_not_written_when_the_stop_begins_goes_back_uncharged():
    dispatcher = broker.Dispatcher(total=3, new_id=fixed_ids())
    session = dispatcher.connect(3)
    assert session.outbox is not None
    dispatcher.stop()
    assert dispatcher.wait_for_batch(session, 0) is None
    state = dispatcher.snapshot()
    assert state["retry"] == ["m00000", "m00001", "m00002"]
    assert set(state["attempts"].values()) == {0}
    assert dispatcher.stop_counts == (0, 3)


def test_sigterm_with_one_message_and_four_streams_leases_it_once(processes, db, tmp_path):
    trace = tmp_path / "trace.jsonl"
    b = processes.broker(db, "--total", "1", "--heartbeat", "600", "--trace", trace)
    streams = [b.stream(1) for _ in range(4)]
    for stream in streams:
        stream.hello()
    holder = streams[0]
    holder.batch()
    b.signal(signal.SIGTERM)
    assert b.wait() == 0
    events = read_trace(trace)
    assert [e["event"] for e in events] == ["lease", "failed"]
    for stream in streams:
        stream.close()


def test_no_batch_is_given_out_once_the_stop_signal_has_been_handled(processes, db, tmp_path):
    # PROTOCOL.md, "Graceful stop": "no new batch from that moment". A
    # lease may still start after the signal only for a batch whose bytes
    # were already going out; the signal's log line is written once the
    # handler has stopped the leasing.
    import calendar
    for round_number in range(3):
        trace = tmp_path / ("trace%d.jsonl" % round_number)
        run_db = tmp_path / ("broker%d.db" % round_number)
        b = processes.broker(run_db, "--trace", trace, "--heartbeat", "600",
                             "--drain-timeout", "5")
        workers = processes.worker("--url", b.url, "--processes", 4, "--time-scale", 0,
                                   "--batchsize", 10)
        b.wait_for_line(r"progress|w4: connected", timeout=30)
        time.sleep(0.5)  # (under way)
        b.signal(signal.SIGTERM)
        assert b.wait(30) == 0, b.output()[-2000:]
        workers.stop()
        stamp = re.search(r"^(\S+)T(\S+)\.(\d{3})Z INFO broker: SIGTERM: stopping",
                          b.output(), re.M)
        signalled = calendar.timegm(time.strptime(stamp.group(1) + "T" + stamp.group(2),
                                                  "%Y-%m-%dT%H:%M:%S")) + int(stamp.group(3)) / 1000
        late = [e for e in read_trace(trace) if e["event"] == "lease"
                and e["t"] > signalled + 0.002]
        # (At most the batches whose bytes were going out as the signal came:
        # one a worker.)
        assert len({e["batch"] for e in late}) <= 4, (round_number, len(late), late[:3])


# --- no attempt for bytes that never left ---------------------------------------------

def test_clients_gone_before_their_first_batch_are_charged_no_attempt(processes, db, tmp_path):
    trace = tmp_path / "trace.jsonl"
    b = processes.broker(db, "--heartbeat", "600", "--trace", trace, "--max-attempts", "1")
    b.signal(signal.SIGSTOP)  # their requests wait in the listen queue meanwhile
    try:
        gone = []
        for index in range(6):
            conn = socket.create_connection((b.host, b.port), timeout=10)
            conn.sendall(b"GET /task?batchsize=5 HTTP/1.1\r\nHost: x\r\n\r\n")
            if index % 2:  # half of them reset the connection, half close it
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            gone.append(conn)
    finally:
        b.signal(signal.SIGCONT)
    for _ in range(3):  # (those that reset may be refused before they are streams)
        b.wait_for_line(r"w\d+: stream closed")
    honest = b.stream(10)
    honest.hello()
    number = int(b.wait_for_line(r"w\d+: connected from .*, batchsize 10").split(
        ": connected")[0].rsplit("w", 1)[1])
    batch = honest.batch()
    assert {m["attempt"] for m in batch} == {1}
    assert b.report(honest.token, batch[0]["batch"], [m["id"] for m in batch])[0] == 200
    stats = b.stats()
    assert stats["dead"] == 0
    honest.close()
    b.stop()
    leased = [e for e in read_trace(trace) if e["event"] == "lease"]
    assert {e["id"] for e in leased} >= {m["id"] for m in batch}
    assert {e["worker"] for e in leased} == {number}  # the gone streams leased nothing


def test_a_lease_waiting_to_be_saved_runs_no_clock_and_its_stream_gets_pings(processes, db):
    b = processes.broker(db, "--durable", "--heartbeat", "0.3", "--lease-timeout", "1")
    # The disk fails: no page past the two meta pages can be written, so
    # the lease cannot be saved.
    resource.prlimit(b.popen.pid, resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))
    client = b.stream(5)
    client.hello()
    pings = 0
    started = time.monotonic()
    while time.monotonic() - started < 3:  # three lease timeouts
        item = client.next_item(timeout=5)
        assert item == ("comment", " ping"), item  # no batch yet, and the stream lives
        pings += 1
    assert pings >= 5
    resource.prlimit(b.popen.pid, resource.RLIMIT_FSIZE,
                     (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    batch = client.batch(timeout=15)
    assert {m["attempt"] for m in batch} == {1}
    assert b.report(client.token, batch[0]["batch"], [m["id"] for m in batch])[0] == 200
    assert "lease expired" not in b.output()
    client.close()


# --- a failed write ends the stream at once ---------------------------------------------

def test_a_next_batch_that_cannot_be_written_ends_the_stream_and_goes_back_uncharged(
        processes, db):
    b = processes.broker(db, "--read-timeout", "1", "--heartbeat", "600",
                         "--max-batchsize", "1000", "--max-attempts", "1000")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect((b.host, b.port))
    sock.sendall(b"GET /task?batchsize=1000 HTTP/1.1\r\nHost: x\r\n\r\n")
    head = b""
    while b"event: msg" not in head:
        head += sock.recv(4096)
    token = json.loads(head.split(b"event: hello\ndata: ")[1].split(b"\n")[0])["worker"]
    number = int(head.split(b'"batch":')[1].split(b",")[0])
    # Report each batch without reading the stream: the next batches pile up
    # in the socket buffers until one cannot be written within --read-timeout.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, _h, body = b.request("POST", "/report?worker=%s&batch=%d" % (token, number),
                                     b"[]")
        if status != 200:
            break  # the stream was cut: its token is gone
        number += 1
    assert status == 404, "the socket buffers never filled"
    cut_number = int(b.wait_for_line(r"batch \d+ not delivered \(write failed").split(
        "batch ")[1].split()[0])
    assert cut_number == number  # the batch after the last report answered 200
    # The stream ends right after the cut event: nothing follows it.
    rest = head
    sock.settimeout(5)  # (not at its lease's expiry, 10 s on)
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        rest += chunk
    sock.close()
    tail = rest[rest.rindex(b"\n\n") + 2:]
    assert tail == b"" or b"event: msg\ndata: {".startswith(tail[:17]), tail[:100]
    assert b": ping" not in tail
    # The cut batch's messages come back with their attempt count unchanged.
    client = b.stream(1000)
    client.hello()
    again = client.batch()
    cut = [json.loads(line[6:]) for line in rest.split(b"\n")
           if line.startswith(b"data: {") and b'"batch":%d,' % cut_number in line
           and line.endswith(b"}")]
    by_id = {m["id"]: m["attempt"] for m in again}
    assert cut and all(by_id[m["id"]] == m["attempt"] for m in cut)
    client.close()


# --- retries isolate a poison message ------------------------------------------------

def connect_written(dispatcher, batchsize):
    """A new stream whose first batch (if any) was written in full."""
    session = dispatcher.connect(batchsize)
    if session.batch is not None:
        dispatcher.batch_written(session, session.batch)
    return session


def batch_ids(session):
    return [(m.id, m.attempts) for m in session.batch.messages.values()]


def test_a_batch_whose_worker_died_is_retried_as_two_halves_each_a_batch_of_its_own():
    dispatcher = broker.Dispatcher(new_id=fixed_ids())
    first = connect_written(dispatcher, 4)
    assert batch_ids(first) == [("m%05d" % i, 1) for i in range(4)]
    dispatcher.disconnect(first)  # the worker died: one of the four may be why
    assert dispatcher.snapshot()["halves"] == [["m00000", "m00001"], ["m00002", "m00003"]]
    second, third = connect_written(dispatcher, 10), connect_written(dispatcher, 10)
    assert batch_ids(second) == [("m00000", 2), ("m00001", 2)]  # alone: no new messages
    assert batch_ids(third) == [("m00002", 2), ("m00003", 2)]
    dispatcher.disconnect(second)  # it died again: split again
    assert dispatcher.snapshot()["halves"] == [["m00000"], ["m00001"]]
    fourth = connect_written(dispatcher, 10)
    assert batch_ids(fourth) == [("m00000", 3)]
    dispatcher.disconnect(fourth)  # the last attempt: dead, alone
    fifth = connect_written(dispatcher, 10)
    assert batch_ids(fifth) == [("m00001", 3)]
    assert dispatcher.dead == 1


def test_an_expired_lease_bisects_its_batch_too():
    clock = type("Clock", (), {"now": 0.0, "__call__": lambda self: self.now})()
    dispatcher = broker.Dispatcher(new_id=fixed_ids(), clock=clock, lease_timeout=10)
    hung = connect_written(dispatcher, 3)
    clock.now = 11
    dispatcher.dispatch_once()
    assert hung.closed and hung.close_reason == "lease expired"
    assert dispatcher.snapshot()["halves"] == [["m00000", "m00001"], ["m00002"]]


def test_a_report_or_touch_after_its_lease_s_deadline_is_refused_before_the_loop_sees_it():
    # A broker that stalled (its dispatch loop did not run) answers the late
    # report 409 and ends the lease then: the lease never outlives its deadline.
    clock = type("Clock", (), {"now": 0.0, "__call__": lambda self: self.now})()
    dispatcher = broker.Dispatcher(new_id=fixed_ids(), clock=clock, lease_timeout=10)
    for call in ("report", "touch"):
        late = connect_written(dispatcher, 3)
        clock.now += 10.5
        with pytest.raises(broker.ReportError) as refused:
            if call == "report":
                dispatcher.report(late.token, late.batch.number, ["m00000"])
            else:
                dispatcher.touch(late.token, late.batch.number)
        assert refused.value.status == 409 and "expired" in str(refused.value)
        assert late.closed and late.close_reason == "lease expired"
        assert dispatcher.done == 0
    touched = connect_written(dispatcher, 1)  # before its deadline: extended, as before
    clock.now += 9.0
    assert dispatcher.touch(touched.token, touched.batch.number)[0] == 10000
    clock.now += 9.0
    assert dispatcher.report(touched.token, touched.batch.number, [])[0]["retried"] == 1


def test_messages_a_live_worker_did_not_report_are_retried_as_in_v1_mixed_with_others():
    dispatcher = broker.Dispatcher(new_id=fixed_ids())
    worker = connect_written(dispatcher, 3)
    _result, _seq, next_batch = dispatcher.report(worker.token, worker.batch.number,
                                                  ["m00001"])
    # m00000 and m00002 failed on their own: retries first, then new messages.
    assert [(m.id, m.attempts) for m in next_batch.messages.values()] == [
        ("m00000", 2), ("m00002", 2), ("m00003", 1)]
    assert dispatcher.snapshot()["halves"] == []


def test_halves_go_before_other_retries_and_a_large_half_is_given_in_parts():
    dispatcher = broker.Dispatcher(new_id=fixed_ids())
    reporter = connect_written(dispatcher, 2)            # m0, m1
    died = connect_written(dispatcher, 6)                # m2..m7
    dispatcher.disconnect(died)                          # halves m2..m4, m5..m7
    dispatcher.report(reporter.token, reporter.batch.number, [])  # m0, m1 to retry
    # The reporter was free again at once: it took the first half's first two.
    assert [m.id for m in reporter.batch.messages.values()] == ["m00002", "m00003"]
    small = connect_written(dispatcher, 2)
    assert [m.id for m in small.batch.messages.values()] == ["m00004"]  # the rest of that half
    big = connect_written(dispatcher, 10)
    assert [m.id for m in big.batch.messages.values()] == ["m00005", "m00006", "m00007"]
    last = connect_written(dispatcher, 10)
    assert [m.id for m in last.batch.messages.values()][:2] == ["m00000", "m00001"]


def test_a_written_batch_whose_stream_closes_before_any_report_is_bisected_on_the_wire(
        processes, db):
    b = processes.broker(db, "--heartbeat", "600")
    dying = b.stream(6)
    dying.hello()
    first = dying.batch()
    dying.close()
    b.wait_for_line(r"stream closed \(stream closed; batch %d in flight" % first[0]["batch"])
    taker = b.stream(10)
    taker.hello()
    half = taker.batch()
    assert [(m["id"], m["attempt"], m["size"]) for m in half] == [
        (m["id"], 2, 3) for m in first[:3]]
    taker.close()


# --- no I/O under the dispatcher's lock ----------------------------------------------

def test_a_stderr_nobody_reads_never_stops_dispatch(db):
    b = subprocess.Popen([sys.executable, "broker.py", "--port", "0", "--db", str(db),
                          "--log-level", "DEBUG", "--max-attempts", "1", "--heartbeat", "600"],
                         cwd=HERE, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = ""
        while "listening on" not in line:
            line = b.stderr.readline()
            assert line, "the broker ended"
        host, port = re.search(r"listening on http://([0-9.]+):(\d+)", line).groups()
        # From here on nobody reads stderr: its pipe (64 KiB) fills at once.
        client = SSEClient(host, int(port), "/task?batchsize=10")
        client.hello()
        for _ in range(300):  # 3000 dead letters: a log line each, and a request line each
            batch = client.batch(timeout=5)
            status, _h, _body = http_request(host, int(port), "POST", "/report?worker=%s&batch=%d"
                                             % (client.token, batch[0]["batch"]), b"[]",
                                             timeout=5)
            assert status == 200
        assert http_request(host, int(port), "GET", "/healthz")[0] == 200
        client.close()
    finally:
        os.killpg(b.pid, signal.SIGKILL)
        b.wait(10)


def test_a_trace_file_that_cannot_be_written_never_stops_dispatch(processes, db):
    b = processes.broker(db, "--total", "40", "--trace", "/dev/full", "--heartbeat", "600")
    client = b.stream(10)
    client.hello()
    for number in range(4):
        batch = client.batch()
        if number == 3:  # (before the last report, which ends the run)
            b.wait_for_line(r"ERROR.*cannot write the trace file /dev/full")
            status, _h, body = b.request("GET", "/healthz")
            assert status == 503 and "trace file cannot be written" in body
        assert b.report(client.token, batch[0]["batch"], [m["id"] for m in batch])[0] == 200
    assert b.wait() == 1  # the run settled; the audit trail is incomplete, and it says so
    assert re.search(r"ERROR.* trace lines could not be written to /dev/full", b.output())
    assert "all 40 messages settled: 40 done, 0 dead" in b.output()


def test_a_trace_that_cannot_be_written_keeps_its_newest_64_kib_and_counts_the_rest():
    class Session:
        number = 1

    trace = broker.TraceFile("/dev/full")
    trace.RETRY_SECONDS = 0.05
    trace.thread.start()
    message = broker.Message("9m4e2mr0ui3e8a215n4g", 5)
    trace("lease", message, Session())
    deadline = time.monotonic() + 10
    while trace.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert trace.error is not None
    for _ in range(3000):  # about 400 KiB of lines
        trace("lease", message, Session())
    while trace.dropped == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert 0 < len(trace._unwritten) <= broker.TraceFile.MAX_BACKLOG_BYTES
    assert trace._unwritten.endswith(b"}\n") and trace._unwritten.count(b"\n") > 400
    assert trace.close(5.0) == 3001  # every line is counted: dropped, or kept unwritten


def test_healthz_reports_a_thread_of_the_broker_that_died(processes, db):
    b = processes.python("-c", "import sys, broker\n"
                               "def broken(self): raise RuntimeError('injected fault')\n"
                               "broker.StreamWatcher.run = broken\n"
                               "sys.exit(broker.main(sys.argv[1:]))",
                         "--port", "0", "--db", db)
    line = b.wait_for_line(r"listening on http://")
    host, port = re.search(r"listening on http://([0-9.]+):(\d+)", line).groups()
    deadline = time.monotonic() + 10
    status, body = 200, ""
    while status == 200 and time.monotonic() < deadline:  # (the thread may not have run yet)
        status, _h, body = http_request(host, int(port), "GET", "/healthz")
    assert status == 503 and "the stream watcher has stopped" in body


# --- a clean stop never hides lost dead letters --------------------------------------

def test_a_stop_while_a_commit_hangs_exits_1_and_counts_the_dead_letters_not_saved(
        processes, db, tmp_path):
    trigger = tmp_path / "hang"
    b = processes.python("-c", "import os, sys, time, bbolt_lite, broker\n"
                               "sync = bbolt_lite._fdatasync\n"
                               "def failing(fd):\n"
                               "    if os.path.exists(%r):\n"
                               "        time.sleep(30)\n"
                               "        raise OSError(5, 'injected I/O error')\n"
                               "    sync(fd)\n"
                               "bbolt_lite._fdatasync = failing\n"
                               "sys.exit(broker.main(sys.argv[1:]))" % str(trigger),
                         "--port", "0", "--db", db, "--max-attempts", "1", "--heartbeat", "600")
    line = b.wait_for_line(r"listening on http://")
    host, port = re.search(r"listening on http://([0-9.]+):(\d+)", line).groups()
    client = SSEClient(host, int(port), "/task?batchsize=3")
    client.hello()
    batch = client.batch()
    trigger.touch()  # the disk hangs from now on
    assert http_request(host, int(port), "POST", "/report?worker=%s&batch=%d" % (
        client.token, batch[0]["batch"]), b"[]")[0] == 200
    b.signal(signal.SIGTERM)
    assert b.wait(timeout=40) == 1
    output = b.output()
    assert "the state writer is stuck in a commit" in output
    assert re.search(r"ERROR.*[1-9]\d* dead letters could not be saved", output)
    client.close()


def test_an_unexpected_error_in_the_state_writer_keeps_its_changes_and_shows_in_healthz(
        tmp_path):
    import bbolt_lite
    dispatcher = broker.Dispatcher(max_attempts=1, total=1,
                                   new_id=iter(["not-ascii-\u00e9"]).__next__)
    session = dispatcher.connect(1)
    dispatcher.batch_written(session, session.batch)
    dispatcher.report(session.token, session.batch.number, [])  # dead at once
    with bbolt_lite.open(str(tmp_path / "x.db")) as db:
        writer = broker.StateWriter(dispatcher, db)
        assert writer.save(dispatcher.take_changes(timeout=0)) is False
        assert writer.error.startswith("UnicodeEncodeError")
        assert dispatcher.figures().unsaved_dead_letters == 1  # given back, not lost
        changes = dispatcher.take_changes(timeout=0)
        assert [m.id for m, _at in changes.dead_letters] == ["not-ascii-\u00e9"]


# --- the stop line says what was lost --------------------------------------------------

def test_the_stop_line_counts_the_leased_and_waiting_messages_it_loses(processes, db):
    b = processes.broker(db, "--heartbeat", "600", "--max-workers", "2", "--drain-timeout", "0")
    holder = b.stream(3)
    holder.hello()
    holder.batch()
    b.signal(signal.SIGTERM)
    assert b.wait() == 0
    assert re.search(r"when it stopped 3 messages were leased and 0 waiting for a retry; "
                     r"3 unsettled messages lost", b.output())
    holder.close()


def test_the_stop_line_of_a_durable_broker_counts_what_stays_pending(processes, db):
    b = processes.broker(db, "--durable", "--heartbeat", "600", "--drain-timeout", "0")
    holder = b.stream(4)
    holder.hello()
    batch = holder.batch()
    assert b.report(holder.token, batch[0]["batch"], [batch[0]["id"]])[0] == 200
    holder.batch()  # three retries and one new message, leased
    b.signal(signal.SIGTERM)
    assert b.wait() == 0
    assert re.search(r"when it stopped 4 messages were leased and 0 waiting for a retry; "
                     r"4 stay pending in the db", b.output())
    holder.close()


def test_the_stop_line_does_not_call_requeued_dead_letters_lost(processes, db):
    # They stay in the db (their `pending` records) and go out first at the next start.
    ids = dead_letters_made(processes, db, 20)
    result = subprocess.run([sys.executable, "broker.py", "requeue", "--db", str(db), "--all"],
                            cwd=HERE, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    b = processes.broker(db, "--heartbeat", "600", "--drain-timeout", "0")
    holder = b.stream(3)
    holder.hello()
    assert len(holder.batch()) == 3  # three of them leased, seventeen waiting
    b.signal(signal.SIGTERM)
    assert b.wait() == 0
    assert re.search(r"when it stopped 3 messages were leased and 17 waiting for a retry; "
                     r"0 unsettled messages lost .*; 20 requeued dead letters stay in the db",
                     b.output()), b.output()[-1500:]
    assert "20 requeued dead letters go out first" in processes.broker(
        db, "--heartbeat", "600").wait_for_line("requeued dead letters go out first")
    holder.close()
    assert len(ids) == 20
