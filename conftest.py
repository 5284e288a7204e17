"""What the tests share: real broker, worker and NATS processes on loopback
(`processes`, `nats_server`), the `db` path, a strict SSE client written from
the WHATWG algorithm, the Go interop helper, headless Chromium, the trace's
audit, and the rule that CI never skips an interop test.

Tests that need Go (the real bbolt and rs/xid libraries), chromium,
prometheus_client or NATS skip without them, unless REQUIRE_INTEROP=1 is set
(as .ci/run does): then a missing one fails them.
"""

import codecs
import collections
import concurrent.futures
import contextlib
import http.client
import http.server
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRE_INTEROP = os.environ.get("REQUIRE_INTEROP") == "1"
sys.path.insert(0, os.path.join(HERE, "interop"))
from gobuild import GoMissing, build as build_go  # noqa: E402

sys.path.insert(0, os.path.join(HERE, "bench"))
from jetstream_bench import nats_configs  # noqa: E402


def skip_or_fail(reason):
    """Skip, or fail when REQUIRE_INTEROP=1 forbids skipping interop tests."""
    if REQUIRE_INTEROP:
        pytest.fail("REQUIRE_INTEROP=1 but " + reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def boltcheck(tmp_path_factory):
    """Path of the Go helper built from interop/boltcheck against real bbolt and xid."""
    try:
        return build_go("boltcheck", tmp_path_factory.mktemp("go"))
    except GoMissing as missing:
        skip_or_fail(str(missing))


def safe_seed(count, limit=800):
    """A broker --seed whose first `count` periods are all <= `limit` (800: no
    task fails; 900: no task ends its worker)."""
    import broker
    seed = 0
    while True:
        rng = random.Random(seed)
        if all(broker.draw_period(rng) <= limit for _ in range(count)):
            return seed
        seed += 1


def wait_until(predicate, timeout=10, what=None):
    """Poll `predicate` until it is true; fail after `timeout` s, naming `what`
    (a string, or a callable giving one: the broker's output, say)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail("timed out after %g s%s" % (
                timeout, ": " + (what() if callable(what) else what) if what else ""))
        time.sleep(0.02)


@contextlib.contextmanager
def headless_chromium():
    """Debian's chromium driven by Playwright: yields the browser, closed after."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if chromium is None or sync_playwright is None:
        skip_or_fail("no chromium (apt-get install chromium) or playwright "
                     "(pip install playwright)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def dashboard_page(url):
    """The dashboard of the broker at `url`, opened in headless Chromium:
    yields (page, errors), where the page's uncaught exceptions are listed."""
    errors = []
    with headless_chromium() as browser:
        page = browser.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        yield page, errors


def run_boltcheck(binary, *args, timeout=120):
    return subprocess.run([binary] + [str(a) for a in args], capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------------------
# The trace (broker.py --trace): one JSON line an event
# ---------------------------------------------------------------------------

def read_trace(path):
    """The events of a trace file, in the order they were written."""
    with open(str(path)) as f:
        return [json.loads(line) for line in f]


def audit_trace(path, max_attempts=3):
    """The trace of one broker checked for what every run keeps (PROTOCOL.md):
    a message is leased to one worker at a time (each lease ends, by done,
    failed or dead of the same worker, before the next begins), each lease
    is its next attempt, at most `max_attempts` of them, and it is settled
    (done or dead) at most once, as its last event. Returns (done ids, dead
    ids, unsettled ids, problems); a test asserts on what it needs."""
    history = collections.defaultdict(list)
    for event in read_trace(path):
        history[event["id"]].append(event)
    done, dead, unsettled, problems = set(), set(), set(), []
    for message_id, events in history.items():
        holder, leases = None, 0
        for event in events:
            if event["event"] == "lease":
                leases += 1
                if holder is not None:
                    problems.append(("leased while held", message_id, events))
                if event["attempt"] != leases:
                    problems.append(("attempt is not its lease count", message_id, events))
                holder = event["worker"]
            else:
                if holder != event["worker"]:
                    problems.append(("ended by another worker", message_id, events))
                holder = None
        settled = [e["event"] for e in events if e["event"] in ("done", "dead")]
        if leases > max_attempts:
            problems.append(("leased more than %d times" % max_attempts, message_id, events))
        if len(settled) > 1 or (settled and events[-1]["event"] not in ("done", "dead")):
            problems.append(("settled twice, or used after it settled", message_id, events))
        if not settled:
            unsettled.add(message_id)
        else:
            (done if settled[0] == "done" else dead).add(message_id)
    return done, dead, unsettled, problems


def dead_now(b):
    """The ids GET /dead lists, oldest first."""
    return [d["id"] for d in b.request("GET", "/dead?limit=1000")[2]["dead"]]


def live_dead_letters(b, count):
    """On a running --max-attempts 1 broker: `count` dead letters, saved; their ids."""
    client = b.stream(count)
    client.hello()
    batch = client.batch()
    assert b.request("POST", "/report?worker=%s&batch=%d&last=1" % (
        client.token, batch[0]["batch"]), b"[]")[0] == 200  # all dead, and no next batch
    client.close()
    wait_until(lambda: len(dead_now(b)) >= count)  # (saved by their own thread)
    return [m["id"] for m in batch]


def dead_letters_made(processes, db, count, *flags):
    """A --total `count` run on `db` whose messages all die (one attempt
    each, none reported): their ids, sorted, once the broker has stopped."""
    b = processes.broker(db, "--total", count, "--max-attempts", "1", "--heartbeat", "600",
                         *flags)
    client = b.stream(count)
    client.hello()
    batch = client.batch()
    assert b.report(client.token, batch[0]["batch"], [])[0] == 200
    assert b.wait() == 0, b.output()[-2000:]
    client.close()
    return sorted(m["id"] for m in batch)


# ---------------------------------------------------------------------------
# Real processes: the broker and the worker, on ephemeral loopback ports
# ---------------------------------------------------------------------------

PROCESS_TIMEOUT = 60


@pytest.fixture
def db(tmp_path):
    """Where a test's broker keeps its bbolt file."""
    return tmp_path / "broker.db"


class Process:
    """A child process whose stderr is collected line by line, for awaiting."""

    def __init__(self, args, cwd=HERE, env=None, preexec_fn=None, program=sys.executable):
        self.args = args
        self.popen = subprocess.Popen([program] + args, cwd=cwd, env=env,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True, preexec_fn=preexec_fn)
        self.lines = []
        self._new_line = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.popen.stdout:
            with self._new_line:
                self.lines.append(line.rstrip("\n"))
                self._new_line.notify_all()
        with self._new_line:
            self.lines.append(None)  # end of output
            self._new_line.notify_all()

    def wait_for_line(self, pattern, timeout=20, start=0):
        """The first output line from `start` on matching `pattern` (a regex)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = start
        with self._new_line:
            while True:
                while index < len(self.lines):
                    line = self.lines[index]
                    if line is None:
                        raise AssertionError("process ended before %r:\n%s" % (
                            pattern, self.output()))
                    if regex.search(line):
                        return line
                    index += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError("no line matching %r within %ss:\n%s" % (
                        pattern, timeout, self.output()))
                self._new_line.wait(remaining)

    def output(self):
        with self._new_line:
            return "\n".join(line for line in self.lines if line is not None)

    def signal(self, signum):
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signum) if signum == signal.SIGKILL else \
                self.popen.send_signal(signum)

    def wait(self, timeout=PROCESS_TIMEOUT):
        code = self.popen.wait(timeout)
        self._reader.join(timeout)
        return code

    def stop(self):
        """SIGTERM, then SIGKILL to the whole group if it lingers."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.popen.wait(10)


class BrokerProcess(Process):
    def __init__(self, db, *flags, port=0, **popen_options):
        super().__init__(["broker.py", "--port", str(port), "--db", str(db),
                          "--log-level", "DEBUG"] + [str(f) for f in flags], **popen_options)
        line = self.wait_for_line(r"listening on https?://")
        self.url = re.search(r"listening on (https?://[0-9.]+:\d+)", line).group(1)
        self.host, port_text = self.url.split("://")[1].split(":")
        self.port = int(port_text)
        self.bearer = None  # a --token the requests and streams below send

    def request(self, method, path, body=None, headers=None, timeout=10):
        """(status, headers, parsed JSON or text)."""
        headers = dict(headers or {})
        if self.bearer is not None:
            headers.setdefault("Authorization", "Bearer " + self.bearer)
        return http_request(self.host, self.port, method, path, body, headers, timeout)

    def threads(self):
        """The broker process's thread count now."""
        with open("/proc/%d/status" % self.popen.pid) as f:
            return int(re.search(r"Threads:\s+(\d+)", f.read()).group(1))

    def report(self, token, batch, ids):
        return self.request("POST", "/report?worker=%s&batch=%d" % (token, batch),
                            json.dumps(ids).encode())

    def stats(self):
        status, _headers, body = self.request("GET", "/stats")
        assert status == 200
        return body

    def stream(self, batchsize, name="batchsize"):
        return SSEClient(self.host, self.port, "/task?%s=%s" % (name, batchsize),
                         headers="" if self.bearer is None else
                         "Authorization: Bearer %s\r\n" % self.bearer)


def http_request(host, port, method, path, body=None, headers=None, timeout=10):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        content_type = response.getheader("Content-Type", "")
        parsed = json.loads(raw) if content_type.startswith("application/json") else \
            raw.decode("utf-8", "replace")
        return response.status, dict(response.getheaders()), parsed
    finally:
        conn.close()


# --- the quick first run: python -m pytest -m "not slow" -----------------------------------

# Whole files that run real systems for seconds or need what is outside
# Python; and the tests of the other files that take a second or more.
SLOW_FILES = {"test_chaos.py", "test_edges.py", "test_end_to_end.py", "test_fuzz.py",
              "test_interop.py", "test_jetstream.py", "test_jobs.py", "test_operability.py",
              "test_packaging.py", "test_reliability.py", "test_retry.py", "test_security.py"}
SLOW_WORDS = ("jetstream", "go_bbolt", "written_by_go", "sigkill", "compact", "dashboard",
              "two_exec_workers", "touch_extends", "second_broker", "drain", "second_signal",
              "processes_backs_off", "time_scale", "abandoning", "not_renewed", "handler_that",
              "report_says", "a_dict_model", "dead_letters_made", "killed", "restart")


EXTERNAL_FIXTURES = {"boltcheck", "nats_server", "pki"}  # (Go, NATS, openssl)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if os.path.basename(str(item.fspath)) in SLOW_FILES or any(
                word in item.nodeid for word in SLOW_WORDS) or EXTERNAL_FIXTURES & set(
                getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def processes():
    """Start processes through this; every one is stopped at the end."""
    started = []

    class Starter:
        broker_flags = []  # given to every broker (test_broker.py: the queue's mode)

        def broker(self, db, *flags, port=0, **popen_options):
            process = BrokerProcess(db, *flags, *self.broker_flags, port=port, **popen_options)
            started.append(process)
            return process

        def worker(self, *args, env=None):
            process = Process(["worker.py"] + [str(a) for a in args], env=env)
            started.append(process)
            return process

        def python(self, *args):
            process = Process([str(a) for a in args])
            started.append(process)
            return process

        def started_elsewhere(self, more):
            """Processes started by other means, stopped at the end as these are."""
            started.extend(more)

        def nats_cluster(self, folder, nodes=3):
            """`nodes` nats-server processes with JetStream, clustered on
            loopback when more than one; returns them (NatsServer)."""
            servers = NatsServer.cluster(folder, nodes)
            started.extend(servers)
            return servers

    yield Starter()
    for process in started:
        process.stop()


# ---------------------------------------------------------------------------
# NATS servers with JetStream, for broker.py --jetstream
# ---------------------------------------------------------------------------

def jetstream_missing():
    """Why --jetstream cannot be tested here (None when it can)."""
    if shutil.which("nats-server") is None:
        return "nats-server is not installed (Debian: apt install nats-server)"
    if importlib.util.find_spec("nats") is None:
        return "nats-py is not installed (pip install nats-py)"
    return None


def require_jetstream():
    """Skip (or, with REQUIRE_INTEROP=1, fail) a test that needs NATS JetStream
    when it cannot be had here."""
    missing = jetstream_missing()
    if missing:
        skip_or_fail(missing)


class NatsServer(Process):
    """nats-server -js on loopback, its client port chosen by the OS."""

    def __init__(self, config):
        super().__init__(["-c", str(config)], program=shutil.which("nats-server"))
        line = self.wait_for_line(r"Listening for client connections on", timeout=20)
        self.port = int(line.rsplit(":", 1)[1])
        self.url = "nats://127.0.0.1:%d" % self.port
        self.wait_for_line(r"Server is ready", timeout=20)

    @classmethod
    def cluster(cls, folder, nodes):
        configs = nats_configs(str(folder), nodes)
        servers = []
        try:
            # (All at once: a clustered node waits for a quorum before it is ready.)
            with concurrent.futures.ThreadPoolExecutor(nodes) as pool:
                for server in pool.map(cls, configs):
                    servers.append(server)
        except BaseException:
            for server in servers:
                server.stop()
            raise
        return servers


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory):
    """One nats-server with JetStream for the session (each test uses a stream
    of its own)."""
    require_jetstream()
    server = NatsServer.cluster(tmp_path_factory.mktemp("nats"), 1)[0]
    yield server
    server.stop()


_streams = iter(range(1, 1 << 30))


def jetstream_flags(nats_server):
    """broker.py flags for a queue in JetStream, on a stream no other test uses."""
    return ["--jetstream", nats_server.url, "--js-stream", "t%d" % next(_streams)]


# ---------------------------------------------------------------------------
# A strict Server-Sent Events client, written from the WHATWG algorithm
# (HTML Living Standard, 9.2.6 "Interpreting an event stream"), independent of
# worker.py's parser. Strict: the bytes must be valid UTF-8.
# ---------------------------------------------------------------------------

class StrictSSEParser:
    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._line = ""
        self._started = False
        self.data = ""
        self.event_type = ""
        self.last_event_id = ""
        self.reconnection_time = None
        self.pending_cr = False

    def feed(self, raw):
        """Feed bytes; return dispatched items: ("event", type, data) or ("comment", text)."""
        try:
            text = self._decoder.decode(raw)  # keeps a split sequence for the next feed
        except UnicodeDecodeError as error:
            raise AssertionError("stream is not valid UTF-8: %r" % error)
        if not self._started and text:
            self._started = True
            if text[0] == "\ufeff":
                text = text[1:]
        return self._process(text)

    def _process(self, text):
        out = []
        for char in text:
            if self.pending_cr:
                self.pending_cr = False
                if char == "\n":
                    continue
            if char == "\r" or char == "\n":
                self.pending_cr = char == "\r"
                out.extend(self._process_line(self._line))
                self._line = ""
            else:
                self._line += char
        return out

    def _process_line(self, line):
        if line == "":
            return self._dispatch()
        if line[0] == ":":
            return [("comment", line[1:])]
        if ":" in line:
            field, value = line.split(":", 1)
            if value.startswith(" "):
                value = value[1:]
        else:
            field, value = line, ""
        if field == "event":
            self.event_type = value
        elif field == "data":
            self.data += value + "\n"
        elif field == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif field == "retry":
            if value and all("0" <= c <= "9" for c in value):
                self.reconnection_time = int(value)
        return []

    def _dispatch(self):
        if self.data == "":
            self.event_type = ""
            return []
        data = self.data[:-1] if self.data.endswith("\n") else self.data
        event = ("event", self.event_type or "message", data)
        self.data = ""
        self.event_type = ""
        return [event]


class Dechunker:
    """Transfer-Encoding: chunked, read strictly (RFC 9112, 7.1): feed it the
    bytes off the wire, get the body's bytes. `ended` once the last chunk came."""

    def __init__(self):
        self.buffer = b""
        self.ended = False

    def feed(self, data):
        self.buffer += data
        body = b""
        while not self.ended:
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                break
            size_text = self.buffer[:line_end]
            assert re.fullmatch(rb"[0-9a-f]+", size_text), "bad chunk size %r" % size_text[:20]
            size = int(size_text, 16)
            start = line_end + 2
            if len(self.buffer) < start + size + 2:
                break
            assert self.buffer[start + size:start + size + 2] == b"\r\n", "chunk not ended by CRLF"
            body += self.buffer[start:start + size]
            self.buffer = self.buffer[start + size + 2:]
            self.ended = size == 0
        assert not (self.ended and self.buffer), "bytes after the last chunk: %r" % self.buffer[:40]
        return body


class SSEClient:
    """GET a stream over a raw socket; read events with the strict parser.

    `raw` is the stream's body (de-chunked when the answer is chunked);
    `wire` is every byte that came after the head, as it came."""

    def __init__(self, host, port, path, timeout=10, headers=""):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: %s:%d\r\nAccept: text/event-stream\r\n%s\r\n"
                           % (path, host, port, headers)).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            head += chunk
        head, _sep, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("iso-8859-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {}
        for line in lines[1:]:
            name, _colon, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.wire = rest
        self.dechunker = Dechunker() if self.headers.get("transfer-encoding") == "chunked" \
            else None
        self.raw = self.dechunker.feed(rest) if self.dechunker and self.status == 200 else rest
        self.parser = StrictSSEParser()
        self.items = collections.deque()
        self.closed = False
        if self.status == 200:
            self.items.extend(self.parser.feed(self.raw))
        else:
            length = int(self.headers.get("content-length", "0"))
            while len(self.raw) < length:
                chunk = self.sock.recv(4096)
                if not chunk:
                    break
                self.raw += chunk
            self.body = json.loads(self.raw[:length]) if length else None

    def next_item(self, timeout=10):
        """The next event or comment; None when the broker closed the stream."""
        deadline = time.monotonic() + timeout
        while not self.items:
            if self.closed:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("nothing on the stream within %ss" % timeout)
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionError:
                chunk = b""
            if not chunk:
                self.closed = True
                continue
            self.wire += chunk
            if self.dechunker is not None:
                chunk = self.dechunker.feed(chunk)
            self.raw += chunk
            self.items.extend(self.parser.feed(chunk))
        return self.items.popleft()

    def next_event(self, timeout=10):
        """The next event (comments skipped) as (type, parsed JSON); None at EOF."""
        while True:
            item = self.next_item(timeout)
            if item is None:
                return None
            if item[0] == "event":
                return item[1], json.loads(item[2])

    def hello(self, timeout=10):
        kind, data = self.next_event(timeout)
        assert kind == "hello", (kind, data)
        self.token = data["worker"]
        return data

    def batch(self, timeout=10):
        """All msg events of the next batch."""
        kind, first = self.next_event(timeout)
        assert kind == "msg", (kind, first)
        messages = [first]
        while len(messages) < first["size"]:
            kind, data = self.next_event(timeout)
            assert kind == "msg" and data["batch"] == first["batch"], (kind, data)
            messages.append(data)
        return messages

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# --- a fake broker, for worker.py ---------------------------------------------------

class FakeBroker:
    """An HTTP server in the test that plays the broker from a script.

    `script(index, stream)` runs for the index-th GET /task (from 0) in its
    handler thread; the stream closes when it returns. Reports are recorded
    and answered with the statuses in `report_statuses` (then 200).
    """

    def __init__(self, script):
        self.script = script
        self.streams = []        # the query of each GET /task
        self.reports = []        # (query, headers, body) of each POST /report
        self.report_statuses = []
        self.touches = []        # the query of each POST /touch
        self.stall_touches = False  # a touch is never answered (a broker that stalled)
        self.changed = threading.Condition()
        self.release = threading.Event()  # ends scripts that hold their stream
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                with fake.changed:
                    index = len(fake.streams)
                    fake.streams.append(urllib.parse.parse_qs(url.query))
                    fake.changed.notify_all()
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                try:
                    fake.script(index, FakeStream(self.wfile, fake))
                except OSError:
                    pass

            def do_POST(self):
                url = urllib.parse.urlsplit(self.path)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if url.path == "/touch":
                    with fake.changed:
                        fake.touches.append(urllib.parse.parse_qs(url.query))
                        fake.changed.notify_all()
                    if fake.stall_touches:
                        fake.release.wait(PROCESS_TIMEOUT)
                        return
                    answer = b'{"batch": 1, "lease_ms": 600}'
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                    return
                with fake.changed:
                    status = fake.report_statuses.pop(0) if fake.report_statuses else 200
                    fake.reports.append((urllib.parse.parse_qs(url.query), dict(self.headers),
                                         json.loads(body)))
                    fake.changed.notify_all()
                answer = json.dumps({"done": 0, "retried": 0, "dead": 0, "ignored": []}
                                    if status == 200 else {"error": "scripted"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, predicate, timeout=20):
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                assert remaining > 0, "timed out: streams %r reports %r" % (
                    self.streams, self.reports)
                self.changed.wait(remaining)

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class FakeStream:
    def __init__(self, wfile, fake):
        self.wfile = wfile
        self.fake = fake

    def send(self, text):
        self.wfile.write(text.encode())
        self.wfile.flush()

    def hello(self, token="tok", batchsize=2, heartbeat_ms=15000, lease_ms=10000):
        self.send("retry: 2000\n\nevent: hello\ndata: %s\n\n" % json.dumps(
            {"worker": token, "batchsize": batchsize, "lease_ms": lease_ms,
             "heartbeat_ms": heartbeat_ms}))

    def batch(self, number, periods, size=None):
        """msg events for `periods`; returns their ids."""
        ids = ["id-%d-%d" % (number, i) for i in range(len(periods))]
        self.send("".join("event: msg\ndata: %s\n\n" % json.dumps(
            {"id": i, "period": p, "attempt": 1, "batch": number,
             "size": size or len(periods)}) for i, p in zip(ids, periods)))
        return ids

    def jobs(self, number, messages):
        """msg events of batch `number`: `messages` (dicts of their fields
        but `batch` and `size`: an `id`, a `payload` and/or a `period`...)."""
        self.send("".join("event: msg\ndata: %s\n\n" % json.dumps(
            dict({"attempt": 1}, **m, batch=number, size=len(messages))) for m in messages))
        return [m["id"] for m in messages]

    def hold(self):
        self.fake.release.wait(PROCESS_TIMEOUT)


@pytest.fixture
def fake_broker():
    made = []

    def make(script):
        fake = FakeBroker(script)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.close()
