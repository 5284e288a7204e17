"""Clients nobody here wrote, each used as its own documentation shows, as workers
of a real broker: at least 20 batches received and reported 200, well within
the lease timeout. README.md's "Tested clients" lists each one and
examples/clients.md shows it; its Python programs are run here as written.

The Python clients are test-only dependencies (requirements-test.txt); curl,
ab (apache2-utils), chromium and Go are Debian's. A missing one skips, unless
REQUIRE_INTEROP=1 (as .ci/run sets) makes that a failure.
"""

import asyncio
import http.server
import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse

import pytest

import bbolt_lite

from conftest import (HERE, GoMissing, build_go, headless_chromium, safe_seed, skip_or_fail,
                      wait_until)

BATCHES = 20


def need(module):
    try:
        return importlib.import_module(module)
    except ImportError:
        skip_or_fail("%s is not installed (pip install -r requirements-test.txt)" % module)


def need_program(name, package):
    path = shutil.which(name)
    if path is None:
        skip_or_fail("%s is missing (apt-get install %s)" % (name, package))
    return path


def work_through(events, report):
    """Take (event type, data text) pairs; report each whole batch with
    `report(token, batch, ids)` (its status); stop after BATCHES."""
    token, batch, statuses = None, [], []
    for kind, data in events:
        if not data:
            continue  # (some clients hand on the `retry:` line as an event of its own)
        message = json.loads(data)
        if kind == "hello":
            token = message["worker"]
        elif kind == "msg":
            batch.append(message)
            if len(batch) == message["size"]:
                statuses.append(report(token, message["batch"], [m["id"] for m in batch]))
                batch = []
                if len(statuses) == BATCHES:
                    return statuses
    return statuses


def test_sseclient_py_over_requests(processes, db):
    requests = need("requests")
    sseclient = need("sseclient")
    b = processes.broker(db, "--heartbeat", "600")
    started = time.monotonic()
    # As sseclient-py's README: a streaming requests response, then .events().
    response = requests.get(b.url + "/task?batchsize=4", stream=True,
                            headers={"Accept": "text/event-stream"})
    client = sseclient.SSEClient(response)

    def report(token, number, ids):
        return requests.post(b.url + "/report", params={"worker": token, "batch": number},
                             json=ids).status_code

    statuses = work_through(((e.event, e.data) for e in client.events()), report)
    client.close()
    assert statuses == [200] * BATCHES
    assert time.monotonic() - started < 5  # the lease timeout is 10 s


def test_httpx_with_httpx_sse(processes, db):
    httpx = need("httpx")
    httpx_sse = need("httpx_sse")
    b = processes.broker(db, "--heartbeat", "600")
    started = time.monotonic()
    # As httpx-sse's README: connect_sse(client, method, url), then iter_sse().
    with httpx.Client(timeout=10) as client:
        with httpx_sse.connect_sse(client, "GET", b.url + "/task?batchsize=4") as source:
            def report(token, number, ids):
                return client.post(b.url + "/report",
                                   params={"worker": token, "batch": number},
                                   json=ids).status_code

            statuses = work_through(((e.event, e.data) for e in source.iter_sse()), report)
    assert statuses == [200] * BATCHES
    assert time.monotonic() - started < 5


def test_curl_as_a_worker_by_hand(processes, db):
    curl = need_program("curl", "curl")
    b = processes.broker(db, "--heartbeat", "600")
    statuses = []
    for _ in range(BATCHES):  # each time: a stream for one batch, then the report
        stream = subprocess.Popen([curl, "-sN", b.url + "/task?batchsize=3"],
                                  stdout=subprocess.PIPE, text=True)
        events, kind = [], None
        for line in stream.stdout:
            if line.startswith("event: "):
                kind = line[7:].strip()
            elif line.startswith("data: "):
                events.append((kind, line[6:].strip()))
                if kind == "msg" and len(events) == 1 + json.loads(line[6:])["size"]:
                    break

        def report(token, number, ids):
            done = subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                   "-H", "Content-Type: application/json", "--data",
                                   json.dumps(ids), "%s/report?worker=%s&batch=%d"
                                   % (b.url, token, number)],
                                  capture_output=True, text=True, timeout=10)
            return int(done.stdout)

        statuses += work_through(events, report)
        stream.terminate()
        stream.wait(10)
    assert statuses == [200] * BATCHES


def test_ab_keep_alive_has_no_failed_request(processes, db):
    ab = need_program("ab", "apache2-utils")
    b = processes.broker(db)
    for path in ("/healthz", "/stats"):
        done = subprocess.run([ab, "-k", "-n", "500", "-c", "4", b.url + path],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert re.search(r"Complete requests:\s+500\b", done.stdout), done.stdout
        assert re.search(r"Keep-Alive requests:\s+500\b", done.stdout), done.stdout
        assert "Non-2xx" not in done.stdout, done.stdout
        failed = re.search(r"Failed requests:\s+(\d+)(?:\s+\(Connect: (\d+), Receive: (\d+), "
                           r"Length: (\d+), Exceptions: (\d+)\))?", done.stdout)
        if path == "/healthz":
            assert failed.group(1) == "0", done.stdout
        else:  # ab counts a body of another length than the first as "failed":
            # /stats's figures change with each request. None failed otherwise.
            assert failed.group(1) == "0" or (failed.group(2), failed.group(3),
                                               failed.group(5)) == ("0", "0", "0"), done.stdout


def test_aiohttp_with_aiohttp_sse_client(processes, db):
    need("aiohttp")
    sse_client = need("aiohttp_sse_client.client")
    b = processes.broker(db, "--heartbeat", "600")
    started = time.monotonic()

    async def run():
        # As aiohttp-sse-client's README: `async with EventSource(url)`, then `async for`;
        # the reports go through the session it was given.
        import aiohttp
        async with aiohttp.ClientSession() as session:
            async with sse_client.EventSource(b.url + "/task?batchsize=4",
                                              session=session) as source:
                token, batch, statuses = None, [], []
                async for event in source:
                    message = json.loads(event.data)
                    if event.type == "hello":
                        token = message["worker"]
                    elif event.type == "msg":
                        batch.append(message["id"])
                        if len(batch) == message["size"]:
                            async with session.post(
                                    b.url + "/report", json=batch,
                                    params={"worker": token, "batch": message["batch"]}) as r:
                                statuses.append(r.status)
                            batch = []
                            if len(statuses) == BATCHES:
                                return statuses
        return statuses

    statuses = asyncio.run(asyncio.wait_for(run(), 30))
    assert statuses == [200] * BATCHES
    assert time.monotonic() - started < 5


# A page of another origin as a worker: its EventSource takes the batches, its
# fetch() reports them with Content-Type: application/json (a request that
# needs a preflight). What it saw is left in window.seen for the test to read.
WORKER_PAGE = b"""<!doctype html>
<meta charset="utf-8">
<title>a worker page of another origin</title>
<script>
const broker = new URLSearchParams(location.search).get("broker");
const seen = window.seen = {messages: 0, statuses: [], closed: false};
const source = new EventSource(broker + "/task?batchsize=4");
let token = null, batch = [];
source.addEventListener("hello", e => { token = JSON.parse(e.data).worker; });
source.addEventListener("msg", async e => {
  const m = JSON.parse(e.data);
  seen.messages++;
  batch.push(m.id);
  if (batch.length < m.size) return;
  const ids = batch; batch = [];
  const answer = await fetch(broker + "/report?worker=" + token + "&batch=" + m.batch,
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(ids)});
  seen.statuses.push(answer.status);
  if (seen.statuses.length >= %d) source.close();
});
source.onerror = () => { if (source.readyState === EventSource.CLOSED) seen.closed = true; };
</script>
""" % BATCHES


@pytest.fixture
def page_origin():
    """A second local HTTP server, of another origin than the broker's: it
    serves WORKER_PAGE at /; yields its origin."""
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(WORKER_PAGE)))
            self.end_headers()
            self.wfile.write(WORKER_PAGE)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d" % server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(10)


def open_worker_page(browser, origin, broker_url):
    page = browser.new_page()
    page.goto("%s/?broker=%s" % (origin, urllib.parse.quote(broker_url, safe="")))
    return page


def test_a_page_of_another_origin_is_a_worker_with_cors_origin(processes, db, page_origin):
    b = processes.broker(db, "--heartbeat", "600", "--cors-origin", page_origin)
    started = time.monotonic()
    with headless_chromium() as browser:
        page = open_worker_page(browser, page_origin, b.url)
        page.wait_for_function("window.seen && window.seen.statuses.length >= %d" % BATCHES,
                               timeout=20000)
        seen = page.evaluate("window.seen")
    assert seen["statuses"][:BATCHES] == [200] * BATCHES
    assert time.monotonic() - started < 10


def test_the_same_page_is_refused_without_cors_origin_and_costs_no_attempt(
        processes, db, page_origin):
    b = processes.broker(db, "--heartbeat", "600")
    with headless_chromium() as browser:
        page = open_worker_page(browser, page_origin, b.url)
        page.wait_for_function("window.seen && window.seen.closed", timeout=20000)
        seen = page.evaluate("window.seen")
    assert seen["messages"] == 0 and seen["statuses"] == []
    stats = b.stats()
    assert stats["dispatched"] == 0 and stats["workers"] == 0, stats  # refused before a batch


def test_a_go_net_http_worker(processes, db, tmp_path):
    try:
        goworker = build_go("goworker", tmp_path)
    except GoMissing as missing:
        skip_or_fail(str(missing))
    b = processes.broker(db, "--heartbeat", "600")
    started = time.monotonic()
    done = subprocess.run([goworker, b.url, str(BATCHES), "4"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert re.findall(r"^batch \d+: (\d+)$", done.stdout, re.M) == ["200"] * BATCHES
    assert time.monotonic() - started < 5


class Relay:
    """A TCP relay in front of the broker that keeps each answer's head (status
    line and headers); with `http10`, it turns each request into HTTP/1.0 on
    its way, as an HTTP/1.0 proxy would, so the broker answers as to HTTP/1.0."""

    def __init__(self, broker_port, http10):
        self.broker_port, self.http10 = broker_port, http10
        self.heads = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.broker_port))
            for source, sink, request in ((client, upstream, True), (upstream, client, False)):
                thread = threading.Thread(target=self._pipe, args=(source, sink, request),
                                          daemon=True)
                thread.start()
                self.threads.append(thread)

    def _pipe(self, source, sink, request):
        head = b""  # the request's or the answer's head, held until it is whole
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if head is not None:
                    head += data
                    if b"\r\n\r\n" not in head:
                        continue
                    if request and self.http10:
                        head = re.sub(rb"^([A-Z]+ \S+) HTTP/1\.1\r\n", rb"\1 HTTP/1.0\r\n", head)
                    elif not request:
                        self.heads.append(head.split(b"\r\n\r\n")[0].decode("latin-1"))
                    data, head = head, None
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stream_heads(self):
        return [h for h in self.heads if "text/event-stream" in h]

    def close(self):
        self.listener.close()


@pytest.mark.parametrize("http10", [False, True], ids=["http11-chunked", "http10-close-delimited"])
def test_worker_py_reads_a_chunked_stream_and_a_close_delimited_one(processes, db, http10):
    b = processes.broker(db, "--heartbeat", "600", "--total", 2 * BATCHES,
                         "--seed", safe_seed(2 * BATCHES))
    relay = Relay(b.port, http10)
    try:
        w = processes.worker("--url", relay.url, "--batchsize", "2", "--time-scale", "0.01")
        assert b.wait() == 0  # all done by the worker; the broker said bye and left
        assert "%d done, 0 dead" % (2 * BATCHES) in b.output()
        reports = [line for line in w.output().splitlines()
                   if re.search(r"batch \d+: \d+ messages, \d+ done", line)]
        assert len(reports) == BATCHES, w.output()
        heads = relay.stream_heads()
        assert heads, relay.heads
        for head in heads:  # (the status line says what the broker speaks: HTTP/1.1)
            assert head.startswith("HTTP/1.1 200 ")
            assert ("Transfer-Encoding: chunked" in head) is not http10, head
        assert w.popen.poll() is None
    finally:
        relay.close()


def readme_examples():
    """The Python programs of examples/clients.md (README.md's "Tested
    clients" points there), as written there."""
    with open(os.path.join(HERE, "examples", "clients.md"), encoding="utf-8") as f:
        programs = f.read()
    return re.findall(r"^```python\n(.*?)^```$", programs, re.S | re.M)


def imported(code):
    """The top-level modules an example imports."""
    names = []
    for line in re.findall(r"^(?:import|from) ([\w., ]+?)(?: import .*)?$", code, re.M):
        names += [name.strip().split(".")[0] for name in line.split(",")]
    return names


def test_the_readme_has_an_example_for_each_python_client():
    assert [imported(code) for code in readme_examples()] == [
        ["json", "requests", "sseclient"], ["httpx", "httpx_sse"],
        ["asyncio", "json", "aiohttp", "aiohttp_sse_client"]]


@pytest.mark.parametrize("index", range(3), ids=["sseclient-py", "httpx-sse",
                                                  "aiohttp-sse-client"])
def test_the_readme_examples_run_as_written(processes, db, index):
    code = readme_examples()[index]
    for module in imported(code):
        need(module)
    total = 4 * BATCHES
    b = processes.broker(db, "--heartbeat", "600", "--total", total)
    code = code.replace('url = "http://127.0.0.1:8080"', "url = %r" % b.url)
    assert "url = %r" % b.url in code
    example = processes.python("-c", code)
    assert example.wait(60) == 0, example.output()
    assert b.wait() == 0
    assert "%d done, 0 dead" % total in b.output()  # every batch reported, in time


def test_the_go_benchmark_tools_load_both_brokers(processes, db, tmp_path):
    """bench/gobench.py's goload drives broker.py and bench's gobroker, whose
    dead letters are a bbolt file that bbolt_lite reads."""
    try:
        gobroker, goload = build_go("gobroker", tmp_path), build_go("goload", tmp_path)
    except GoMissing as missing:
        skip_or_fail(str(missing))

    def load(url):
        done = subprocess.run([goload, "-url", url, "-c", "4", "-b", "5", "-s", "1.5",
                               "-f", "0.5"], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    b = processes.broker(db, "--heartbeat", "600")
    row = load(b.url)
    assert row["errors"] == 0 and row["done"] > 0 and row["dead"] > 0, row
    go_db = tmp_path / "go.db"
    go = subprocess.Popen([gobroker, "--port", "0", "--db", str(go_db), "--lease-timeout", "30"],
                          stdout=subprocess.PIPE, text=True)
    try:
        url = re.match(r"listening on (http://\S+)", go.stdout.readline()).group(1)
        row = load(url)
        assert row["errors"] == 0 and row["done"] > 0 and row["dead"] > 0, row
    finally:
        go.send_signal(signal.SIGTERM)
        go.wait(15)
    with bbolt_lite.open(go_db, readonly=True) as saved:
        with saved.view() as tx:
            letters = [json.loads(v) for _k, v in tx.bucket(b"failed").items()]
    # (and a few more: batches in flight when the load stopped, on their last attempt)
    assert row["dead"] <= len(letters) <= row["dead"] + 4 * 5
    assert all(d["attempts"] == 3 for d in letters)


# --- producers (broker.py --source api, POST /enqueue) -------------------------------------

PRODUCED = 1000


def drain_jobs(b, count):
    """A worker of our own: takes and reports `count` jobs; their payloads."""
    client = b.stream(100)
    client.hello()
    payloads = []
    while len(payloads) < count:
        batch = client.batch(timeout=30)
        payloads += [m["payload"] for m in batch]
        assert b.report(client.token, batch[0]["batch"], [m["id"] for m in batch])[0] == 200
    client.close()
    return payloads


def test_curl_as_a_producer(processes, db):
    curl = need_program("curl", "curl")
    b = processes.broker(db, "--source", "api", "--heartbeat", "600")
    for start in range(0, PRODUCED, 100):
        body = json.dumps([{"payload": {"n": n}} for n in range(start, start + 100)])
        done = subprocess.run([curl, "-s", "-w", "\n%{http_code}", "--data", body,
                               b.url + "/enqueue"], capture_output=True, text=True, timeout=30)
        answer, status = done.stdout.rsplit("\n", 1)
        assert status == "200" and len(json.loads(answer)["ids"]) == 100, done.stdout
    assert sorted(p["n"] for p in drain_jobs(b, PRODUCED)) == list(range(PRODUCED))


def test_requests_as_a_producer(processes, db):
    requests = need("requests")
    b = processes.broker(db, "--source", "api", "--heartbeat", "600")
    with requests.Session() as session:  # as its docs show: json= on a POST
        for start in range(0, PRODUCED, 250):
            response = session.post(b.url + "/enqueue", json=[
                {"payload": {"n": n}, "key": "job-%d" % n} for n in range(start, start + 250)])
            response.raise_for_status()
            assert len(response.json()["ids"]) == 250
        again = session.post(b.url + "/enqueue", json={"payload": {"n": 0}, "key": "job-0"})
        assert again.json()["duplicates"] == [0]  # a producer's retry is one job
    assert sorted(p["n"] for p in drain_jobs(b, PRODUCED)) == list(range(PRODUCED))


def test_a_browser_page_of_another_origin_is_a_producer_with_cors_origin(
        processes, db, page_origin):
    # fetch() with a JSON body: the browser asks first (a preflight), which
    # --cors-origin allows; the same page is also the worker that settles them.
    b = processes.broker(db, "--source", "api", "--heartbeat", "600",
                         "--cors-origin", page_origin)
    with headless_chromium() as browser:
        page = open_worker_page(browser, page_origin, b.url)
        statuses = page.evaluate("""async (broker) => {
            const statuses = [];
            for (let start = 0; start < %d; start += 100) {
                const jobs = [];
                for (let n = start; n < start + 100; n++) jobs.push({payload: {n}});
                const answer = await fetch(broker + "/enqueue", {method: "POST",
                    headers: {"Content-Type": "application/json"}, body: JSON.stringify(jobs)});
                statuses.push(answer.status, (await answer.json()).ids.length);
            }
            return statuses;
        }""" % PRODUCED, b.url)
        assert statuses == [200, 100] * (PRODUCED // 100)
        page.wait_for_function("window.seen.statuses.length >= %d" % BATCHES, timeout=20000)
    wait_until(lambda: b.stats()["in_flight"] == 0)  # (the page's worker has left)
    stats = b.stats()
    drain_jobs(b, PRODUCED - stats["done"])  # (the rest, by a worker of ours)
    assert b.stats()["done"] == PRODUCED


def test_a_go_net_http_producer(processes, db, tmp_path):
    try:
        goproducer = build_go("goproducer", tmp_path)
    except GoMissing as missing:
        skip_or_fail(str(missing))
    b = processes.broker(db, "--source", "api", "--heartbeat", "600", "--max-backlog", 500)
    done = subprocess.Popen([goproducer, b.url, str(PRODUCED), "100"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    b.wait_for_line(r"/enqueue HTTP/1.1\" 503")  # (500 at most wait: it waits, then goes on)
    payloads = drain_jobs(b, PRODUCED)
    out, err = done.communicate(timeout=60)
    assert done.returncode == 0, err
    assert len(set(out.split())) == PRODUCED
    assert sorted(p["n"] for p in payloads) == list(range(PRODUCED))
