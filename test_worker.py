"""worker.py against PROTOCOL.md: a real worker process and a scripted fake broker."""

import os
import re
import signal
import socket
import threading
import time

import pytest

import worker
from conftest import safe_seed


# --- running messages -----------------------------------------------------------

def test_a_message_beyond_batchsize_running_tasks_is_refused_and_not_reported(fake_broker,
                                                                               processes):
    sent = {}

    def script(index, stream):
        stream.hello(batchsize=2)
        sent["ids"] = stream.batch(1, [400, 400, 400])  # one more than batchsize
        stream.hold()

    fake = fake_broker(script)
    w = processes.worker("--url", fake.url, "--batchsize", "2")
    fake.wait_for(lambda: fake.reports)
    query, headers, body = fake.reports[0]
    assert body == sent["ids"][:2]
    assert query == {"worker": ["tok"], "batch": ["1"]}
    assert headers["Content-Type"] == "application/json"
    assert re.search(r"ERROR.*over capacity.*refusing message %s" % sent["ids"][2], w.output())


def test_a_raising_task_is_logged_with_its_id_and_the_worker_lives_on(fake_broker, processes):
    sent = {}

    def script(index, stream):
        stream.hello(batchsize=3)
        sent["first"] = stream.batch(1, [850, 10, 20])
        stream.fake.wait_for(lambda: stream.fake.reports)
        sent["second"] = stream.batch(2, [5])
        stream.hold()

    fake = fake_broker(script)
    w = processes.worker("--url", fake.url, "--batchsize", "3")
    fake.wait_for(lambda: len(fake.reports) == 2)
    assert sorted(fake.reports[0][2]) == sent["first"][1:]
    assert fake.reports[1][2] == sent["second"]
    line = w.wait_for_line(r"INFO.*raised TaskFailed")
    assert sent["first"][0] in line
    assert len(fake.streams) == 1  # the same process, the same stream


def one_batch(*periods):
    """A fake broker's script: hello, one batch of `periods` (batchsize 2), then nothing."""
    def script(index, stream):
        stream.hello(batchsize=2)
        stream.batch(1, list(periods))
        stream.hold()
    return script


def test_a_period_over_900_ends_the_worker_process_with_status_3(fake_broker, processes):
    fake = fake_broker(one_batch(950, 10))
    w = processes.worker("--url", fake.url, "--batchsize", "2")
    assert w.wait() == 3
    assert "period 950 ms > 900" in w.output()
    assert fake.reports == []


def test_time_scale_lengthens_the_sleep_too(fake_broker, processes):
    def script(index, stream):
        stream.hello(batchsize=2)
        stream.batch(1, [800])  # 8 s at --time-scale 10; 0.8 s if the scale were ignored
        stream.hold()

    fake = fake_broker(script)
    processes.worker("--url", fake.url, "--batchsize", "2", "--time-scale", "10")
    fake.wait_for(lambda: fake.streams)
    with pytest.raises(AssertionError, match="timed out"):
        fake.wait_for(lambda: fake.reports, timeout=3)  # (a slow machine only delays it more)


def test_time_scale_shortens_the_sleep(fake_broker, processes):
    def script(index, stream):
        stream.hello(batchsize=2)
        stream.batch(1, [800, 800])
        stream.hold()

    fake = fake_broker(script)
    processes.worker("--url", fake.url, "--batchsize", "2", "--time-scale", "0")
    fake.wait_for(lambda: fake.reports, timeout=20)
    assert fake.reports[0][2] == ["id-1-0", "id-1-1"]


# --- the stream ---------------------------------------------------------------------

def test_a_lost_stream_abandons_its_batch_unreported_and_reconnects(fake_broker, processes):
    def script(index, stream):
        stream.hello(token="t%d" % index, batchsize=2)
        if index == 0:
            stream.batch(1, [300])  # then the stream is lost
            return
        stream.batch(2, [600])
        stream.hold()

    fake = fake_broker(script)
    w = processes.worker("--url", fake.url, "--batchsize", "2")
    fake.wait_for(lambda: fake.reports)
    # Batch 1 would have ended first (300 ms < 600 ms) had it not been abandoned.
    assert [(q["batch"], q["worker"]) for q, _h, _b in fake.reports] == [(["2"], ["t1"])]
    assert "abandoning batch 1" in w.output()


def test_a_chunked_stream_cut_before_its_last_chunk_is_lost_not_a_crash(processes):
    """A broker killed mid-stream leaves a chunked body unfinished: http.client
    raises IncompleteRead, which the worker must take as a lost stream."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(20)
    hello = (b'retry: 2000\n\nevent: hello\ndata: {"worker":"tok","batchsize":2,'
             b'"lease_ms":10000,"heartbeat_ms":15000}\n\n')
    try:
        w = processes.worker("--url", "http://127.0.0.1:%d" % listener.getsockname()[1],
                             "--batchsize", "2")
        for _ in range(2):  # cut, then it comes back
            conn, _address = listener.accept()
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                         b"%x\r\n%s\r\n" % (len(hello), hello))
            w.wait_for_line(r"connected to")
            conn.close()  # no last chunk
        w.wait_for_line(r"stream lost: IncompleteRead")
        assert w.popen.poll() is None, w.output()
        assert "Traceback" not in w.output()
    finally:
        listener.close()


def test_a_silent_stream_is_dead_after_three_heartbeats(fake_broker, processes):
    hellos = []

    def script(index, stream):
        stream.hello(batchsize=2, heartbeat_ms=200)
        hellos.append(time.monotonic())
        stream.hold()  # and say nothing more

    fake = fake_broker(script)
    processes.worker("--url", fake.url, "--batchsize", "2")
    fake.wait_for(lambda: len(fake.streams) >= 2)
    reconnected_at = time.monotonic()  # (just after the second GET /task came)
    # It gave up no sooner than three silent heartbeats (0.6 s) after hello.
    assert reconnected_at - hellos[0] >= 0.6


def test_a_report_is_retried_on_server_errors_and_dropped_on_409(fake_broker, processes):
    def script(index, stream):
        stream.hello(batchsize=2)
        stream.batch(1, [1])
        stream.fake.wait_for(lambda: len(stream.fake.reports) == 3)
        stream.batch(2, [1])
        stream.hold()

    fake = fake_broker(script)
    fake.report_statuses = [503, 500, 200, 409]
    w = processes.worker("--url", fake.url, "--batchsize", "2")
    fake.wait_for(lambda: len(fake.reports) == 4)
    assert [r[2] for r in fake.reports] == [["id-1-0"]] * 3 + [["id-2-0"]]
    w.wait_for_line(r"batch 2: settled already \(409\)")


def test_the_default_batchsize_is_random_in_2_to_10(fake_broker, processes):
    def script(index, stream):
        stream.hello()
        stream.hold()

    fake = fake_broker(script)
    workers = [processes.worker("--url", fake.url, "--seed", str(seed)) for seed in range(8)]
    fake.wait_for(lambda: len(fake.streams) == 8)
    sizes = [int(q["batchsize"][0]) for q in fake.streams]
    assert all(2 <= s <= 10 for s in sizes) and len(set(sizes)) > 1
    for w in workers:
        w.stop()


def test_the_worker_reconnects_after_a_broker_restart(processes, tmp_path):
    seed = str(safe_seed(4))
    first = processes.broker(tmp_path / "a.db", "--total", "4", "--seed", seed)
    w = processes.worker("--url", first.url, "--time-scale", "0.01", "--batchsize", "2")
    assert first.wait() == 0  # all 4 done by the worker; the broker said bye and left
    assert "4 done, 0 dead" in first.output()
    w.wait_for_line(r"broker said bye")
    second = processes.broker(tmp_path / "b.db", "--total", "4", "--seed", seed,
                              port=first.port)
    assert second.wait() == 0  # the same worker came back and did them all
    assert "4 done, 0 dead" in second.output()
    assert w.popen.poll() is None


def test_with_several_urls_a_worker_fails_over_to_the_next_broker(processes, tmp_path):
    seed = str(safe_seed(6))
    first = processes.broker(tmp_path / "a.db", "--total", "2", "--seed", seed)
    second = processes.broker(tmp_path / "b.db", "--total", "4", "--seed", seed)
    w = processes.worker("--url", "%s,%s" % (first.url, second.url), "--time-scale", "0.01",
                         "--batchsize", "2")
    assert first.wait() == 0 and "2 done, 0 dead" in first.output()  # then it left
    assert second.wait() == 0 and "4 done, 0 dead" in second.output(), w.output()
    w.wait_for_line(r"trying the next broker: " + re.escape(second.url))


def test_a_refused_stream_ends_the_worker_with_a_clear_error(processes, tmp_path):
    b = processes.broker(tmp_path / "b.db", "--max-batchsize", "10")
    w = processes.worker("--url", b.url, "--batchsize", "11")
    assert w.wait() == 2
    assert "broker refused the stream: 400" in w.output()


# --- --processes --------------------------------------------------------------------

def test_processes_restarts_each_worker_that_exits_and_sigterm_stops_them_all(fake_broker,
                                                                                processes):
    def script(index, stream):
        stream.hello(batchsize=2)
        if index == 0:
            stream.batch(1, [999])  # that worker exits with status 3
        stream.hold()

    fake = fake_broker(script)
    supervisor = processes.worker("--url", fake.url, "--processes", "2", "--batchsize", "2")
    fake.wait_for(lambda: len(fake.streams) >= 3)  # two, then the restarted one
    supervisor.wait_for_line(r"ended after .*: exit 3 \(a message with period > 900 ms\)")
    pids = [int(p) for p in re.findall(r"started \(pid (\d+)\)", supervisor.output())]
    assert len(pids) >= 3
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait() == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# --- a graceful stop ---------------------------------------------------------------

def test_a_first_sigterm_finishes_and_reports_the_batch_in_hand_then_exits_0(fake_broker,
                                                                             processes):
    sent = {}

    def script(index, stream):
        stream.hello(batchsize=3)
        if index == 0:
            sent["ids"] = stream.batch(1, [700, 700, 850])
        stream.hold()

    fake = fake_broker(script)
    w = processes.worker("--url", fake.url, "--batchsize", "3", "--log-level", "DEBUG")
    w.wait_for_line(r"batch 1: starting message id-1-2")  # in hand: two tasks sleep 0.7 s
    w.signal(signal.SIGTERM)
    assert w.wait() == 0
    assert len(fake.reports) == 1
    query, _headers, body = fake.reports[0]
    assert query == {"worker": ["tok"], "batch": ["1"], "last": ["1"]}  # no next batch, please
    assert sorted(body) == sorted(sent["ids"][:2])
    assert len(fake.streams) == 1  # and it did not come back
    assert "SIGTERM: stopping once the batch in hand is reported" in w.output()


def test_a_first_sigterm_with_no_batch_in_hand_ends_the_stream_and_exits_0(fake_broker,
                                                                          processes):
    fake = fake_broker(hello_then_hold)
    w = processes.worker("--url", fake.url, "--batchsize", "2")
    w.wait_for_line(r"connected to")
    started = time.monotonic()
    w.signal(signal.SIGTERM)
    assert w.wait() == 0
    assert time.monotonic() - started < 5  # not a heartbeat timeout later
    assert fake.reports == [] and len(fake.streams) == 1
    assert "draining: no batch in hand, closing the stream" in w.output()


def test_a_second_signal_abandons_the_batch_and_exits_at_once(fake_broker, processes):
    fake = fake_broker(one_batch(700, 700))
    w = processes.worker("--url", fake.url, "--batchsize", "2", "--time-scale", "20",
                         "--log-level", "DEBUG")
    w.wait_for_line(r"batch 1: starting message id-1-1")  # in hand, for 14 s
    w.signal(signal.SIGTERM)
    w.wait_for_line(r"draining: finishing and reporting the batch in hand")
    w.signal(signal.SIGINT)
    assert w.wait(10) == 0
    assert fake.reports == []
    assert "SIGINT again: abandoning the batch in hand, stopping now" in w.output()


def test_processes_passes_sigterm_on_and_waits_for_the_batches_to_be_reported(fake_broker,
                                                                              processes):
    def script(index, stream):
        stream.hello(token="tok%d" % index, batchsize=2)
        if index < 2:
            stream.batch(index + 1, [600, 600])
        stream.hold()

    fake = fake_broker(script)
    supervisor = processes.worker("--url", fake.url, "--processes", "2", "--batchsize", "2",
                                  "--log-level", "DEBUG")
    for number in (1, 2):  # both batches in hand: 0.6 s each
        supervisor.wait_for_line(r"batch %d: starting message id-%d-1" % (number, number))
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait() == 0
    assert sorted(q["worker"][0] for q, _h, _b in fake.reports) == ["tok0", "tok1"]
    assert all(q["last"] == ["1"] for q, _h, _b in fake.reports)
    assert len(fake.streams) == 2  # none restarted
    assert supervisor.output().count("stopped: exit 0") == 2


WORKER_FLAGS = {"--help", "--url", "--batchsize", "--time-scale", "--seed", "--token",
                "--processes", "--parent-pid", "--log-level", "--token-file", "--cafile",
                "--version", "--exec", "--handler", "--task-timeout"}


def test_help_explains_every_flag():
    import subprocess
    import sys
    from conftest import HERE
    result = subprocess.run([sys.executable, "worker.py", "--help"], cwd=HERE,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    options = re.findall(r"^  (?:-\w, )?(--[a-z][a-z-]*)", result.stdout, re.M)
    assert set(options) == WORKER_FLAGS
    for flag in WORKER_FLAGS - {"--help"}:  # and the module's docstring, the usage page
        assert flag in worker.__doc__, flag


# --- the worker's SSE parser -----------------------------------------------------------

def test_sse_parser_handles_every_line_ending_split_anywhere():
    stream = (b"\xef\xbb\xbfretry: 1500\r\n\r\n: comment\n\nevent: msg\r\ndata: {\"a\":\r\n"
              b"data: 1}\r\rid: 7\ndata:x\n\nevent: bye\ndata: \xc3\xa9\n\n")
    expected = [("msg", "{\"a\":\n1}", ""), ("message", "x", "7"), ("bye", "é", "7")]
    for step in (1, 2, 3, 5, len(stream)):
        parser = worker.SSEParser()
        events = []
        for i in range(0, len(stream), step):
            events += parser.feed(stream[i:i + step])
        assert events == expected
        assert parser.retry_ms == 1500 and parser.comments == 1


def test_sse_parser_ignores_empty_events_and_unknown_fields():
    parser = worker.SSEParser()
    assert parser.feed(b"event: x\n\nfoo: bar\ndata\n\n") == [("message", "", "")]


# --- edges: the batches in hand, a failing stream thread, failing restarts ------------

def test_abandoning_a_stream_while_its_tasks_end_never_breaks_the_stream_thread():
    # The stream thread lists the batches in hand while task threads take
    # complete ones out: without the stream's lock this raised "dictionary
    # changed size during iteration" and the worker exited 0.
    import sys
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over as often as possible
    try:
        for _round in range(40):
            w = worker.Worker("http://127.0.0.1:9", 10)
            w._report = lambda stream, batch, last=False: None
            stream = worker.Stream(w.url)
            # Each task thread saw the stream alive just before it was lost:
            # it takes its batch out whatever the stream thread does meanwhile.
            stream.lost = type("NeverSet", (), {"set": lambda self: None,
                                                "is_set": lambda self: False})()
            batches = [worker.BatchInHand(n, 1) for n in range(3000)]
            stream.batches.update((b.number, b) for b in batches)
            ender = threading.Thread(target=lambda: [
                w._task_ended(stream, b, "id", True) for b in batches])
            ender.start()
            w._abandon(stream)  # must not raise
            ender.join()
    finally:
        sys.setswitchinterval(switch)


def hello_then_hold(index, stream):
    """A fake broker's script: a stream that says hello, then nothing."""
    stream.hello(batchsize=2)
    stream.hold()


def run_worker_with_fault(*args):
    """worker.py in a process of its own, with its SSE parser made to raise."""
    return ["-c", "import sys, worker\n"
                  "def broken(self, chunk): raise RuntimeError('injected fault')\n"
                  "worker.SSEParser.feed = broken\n"
                  "sys.exit(worker.main(sys.argv[1:]))", *args]


def test_an_unexpected_error_in_the_stream_thread_exits_1_with_its_traceback(fake_broker,
                                                                           processes):
    fake = fake_broker(hello_then_hold)
    w = processes.python(*run_worker_with_fault("--url", fake.url, "--batchsize", "2"))
    assert w.wait() == 1
    output = w.output()
    assert "the stream thread failed" in output
    assert "Traceback" in output and "RuntimeError: injected fault" in output


def test_processes_backs_off_restarting_a_worker_that_keeps_failing_at_once(fake_broker,
                                                                          processes):
    fake = fake_broker(hello_then_hold)
    supervisor = processes.python(*run_worker_with_fault(
        "--url", fake.url, "--processes", "1", "--batchsize", "2"))
    supervisor.wait_for_line(r"worker 0 ended 4 times in a row .*: restarting it in 4\.0 s",
                             timeout=30)
    # 0.5 + 1 + 2 s of back-off so far: a few restarts, not hundreds.
    assert len(re.findall(r"worker 0 started", supervisor.output())) <= 5
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait() == 0


def test_workers_stop_when_their_parent_pid_is_gone(fake_broker, processes):
    fake = fake_broker(hello_then_hold)
    # A parent that is not this worker's: as if its broker had been killed.
    supervisor = processes.worker("--url", fake.url, "--processes", "2", "--batchsize", "2",
                                  "--parent-pid", "1")
    supervisor.wait_for_line(r"parent process 1 is gone: stopping")
    assert supervisor.wait() == 0


def test_a_batch_whose_lease_is_not_renewed_in_time_is_abandoned_and_the_worker_moves_on(
        fake_broker, processes):
    # PROTOCOL.md, "Worker rules": a broker that stalls cannot close the stream,
    # and may have lost the lease to another broker: the worker is the fence.
    def script(index, stream):
        if index == 0:
            stream.hello(lease_ms=600)
            stream.batch(1, [700, 700])  # 7 s each at --time-scale 10
        else:
            stream.hello()
        stream.hold()

    stalled, next_broker = fake_broker(script), fake_broker(lambda index, stream: (
        stream.hello(), stream.hold()))
    stalled.stall_touches = True
    worker = processes.worker("--url", "%s,%s" % (stalled.url, next_broker.url),
                              "--batchsize", 2, "--time-scale", 10, "--log-level", "DEBUG")
    stalled.wait_for(lambda: stalled.touches)
    started = time.monotonic()
    next_broker.wait_for(lambda: next_broker.streams, timeout=5)
    assert time.monotonic() - started < 2.0  # (at 0.6 s from the batch's start, not at 7 s)
    line = worker.wait_for_line(r"batch 1: its lease was not renewed within 0.6 s")
    assert "abandoning it and reconnecting" in line
    worker.wait_for_line(r"batch 1: message id-1-1 ended, not done")
    assert stalled.reports == [] and next_broker.reports == []
