"""Clients nobody here wrote, each used as its own documentation shows, as workers
of a real broker: at least 20 batches received and reported 200, well within
the lease timeout.

Each third-party client is a test-only dependency (requirements-test.txt);
curl and ab (apache2-utils) are Debian's. A missing one skips, unless
REQUIRE_INTEROP=1 (as .ci/run sets) makes that a failure.
"""

import json
import re
import shutil
import subprocess
import time

import pytest

from conftest import skip_or_fail

BATCHES = 20


@pytest.fixture
def db(tmp_path):
    return tmp_path / "broker.db"


def need(module):
    try:
        return __import__(module)
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
