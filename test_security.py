"""Who may speak to the broker: TLS (against a throw-away CA made here with
the openssl command), --token (checked on every endpoint but /healthz, and
kept out of the process list and the log) and --cors-origin."""

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest

import broker
from conftest import HERE, SSEClient, skip_or_fail, wait_until


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, and a certificate it signed for 127.0.0.1: (ca.pem, cert.pem, key.pem)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        skip_or_fail("no openssl command (apt-get install openssl)")
    d = tmp_path_factory.mktemp("pki")

    def run(*args):
        subprocess.run([openssl] + list(args), cwd=d, check=True, capture_output=True,
                       timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
        "-keyout", "ca.key", "-out", "ca.pem",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "key.pem", "-out", "server.csr")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n"
                               "extendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", "cert.pem", "-extfile", "ext.cnf")
    return d / "ca.pem", d / "cert.pem", d / "key.pem"


def tls_broker(processes, db, pki, *flags):
    _ca, cert, key = pki
    return processes.broker(db, "--tls-cert", cert, "--tls-key", key, *flags)


def https(url, ca, method="GET", body=None, headers=None):
    """(status, body bytes) over HTTPS, trusting `ca` only."""
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_https_serves_every_endpoint_and_the_dashboard(processes, db, pki):
    ca = pki[0]
    b = tls_broker(processes, db, pki, "--heartbeat", "600")
    assert b.url.startswith("https://127.0.0.1:")
    assert https(b.url + "/healthz", ca) == (200, b"ok\n")
    status, page = https(b.url + "/", ca)
    assert status == 200 and b"<title>broker.py</title>" in page
    assert json.loads(https(b.url + "/stats", ca)[1])["workers"] == 0
    assert https(b.url + "/metrics", ca)[0] == 200
    # The dashboard's event stream, chunked, over TLS.
    context = ssl.create_default_context(cafile=str(ca))
    with urllib.request.urlopen(b.url + "/events", timeout=10, context=context) as events:
        assert events.headers["Transfer-Encoding"] == "chunked"
        received = b""
        for _ in range(5):  # (retry:, then the chart's history, then a stats event)
            received += events.read1(65536)
            if b"event: stats" in received:
                break
        assert b"event: history" in received and b"event: stats" in received


def test_plain_http_on_the_tls_port_is_refused_and_the_broker_goes_on(
        processes, db, pki):
    ca = pki[0]
    b = tls_broker(processes, db, pki)
    with socket.create_connection((b.host, b.port), timeout=10) as plain:
        plain.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = plain.recv(100)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"HTTP/1.1 200")
    # TLS 1.2 at the least (this machine's OpenSSL may not offer 1.1 even to
    # try, so the broker's own context is checked as well as a handshake).
    assert broker._tls_context(str(pki[1]), str(pki[2])).minimum_version == \
        ssl.TLSVersion.TLSv1_2
    with socket.create_connection((b.host, b.port), timeout=10) as raw:
        context = ssl.create_default_context(cafile=str(ca))
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    assert https(b.url + "/healthz", ca) == (200, b"ok\n")
    assert "Traceback" not in b.output()


def test_worker_py_without_cafile_refuses_a_certificate_it_cannot_verify(processes, db, pki):
    b = tls_broker(processes, db, pki, "--total", "40")
    untrusting = processes.worker("--url", b.url, "--batchsize", "4", "--time-scale", "0")
    untrusting.wait_for_line(r"ERROR .*the certificate is not trusted")
    assert untrusting.wait(30) == 2  # (retrying cannot fix it)
    assert json.loads(https(b.url + "/stats", pki[0])[1])["dispatched"] == 0


def test_worker_py_over_https_with_cafile_settles_a_run(processes, db, pki, tmp_path):
    ca = pki[0]
    b = tls_broker(processes, db, pki, "--total", "40", "--trace", tmp_path / "t.jsonl")
    w = processes.worker("--url", b.url, "--cafile", ca, "--processes", "2",
                         "--batchsize", "4", "--time-scale", "0.01")
    assert b.wait(60) == 0
    assert re.search(r"all 40 messages settled: \d+ done, \d+ dead", b.output())
    w.stop()


def test_a_tls_stream_that_closes_ends_its_lease_at_once(processes, db, pki, tmp_path):
    ca = pki[0]
    trace = tmp_path / "trace.jsonl"
    b = tls_broker(processes, db, pki, "--heartbeat", "600", "--trace", trace)
    context = ssl.create_default_context(cafile=str(ca))
    raw = socket.create_connection((b.host, b.port), timeout=10)
    tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
    tls.sendall(b"GET /task?batchsize=2 HTTP/1.1\r\nHost: x\r\n\r\n")
    received = b""
    while received.count(b"event: msg") < 2:
        received += tls.recv(65536)
    tls.close()  # close_notify, then FIN
    wait_until(lambda: trace.exists() and '"event":"failed"' in trace.read_text(),
               what=b.output)
    failed = [json.loads(line) for line in trace.read_text().splitlines()
              if '"failed"' in line]
    assert {e["reason"] for e in failed} == {"stream closed"}


def test_bad_tls_files_refuse_the_start_with_exit_2(db, tmp_path, pki):
    _ca, cert, key = pki
    for flags, message in ((["--tls-cert", cert], "--tls-cert and --tls-key go together"),
                           (["--tls-cert", cert, "--tls-key", tmp_path / "none.pem"],
                            "cannot use --tls-cert")):
        result = subprocess.run([sys.executable, "broker.py", "--port", "0", "--db", str(db)]
                                + [str(f) for f in flags], cwd=HERE, capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not db.exists()


# --- tokens out of the process list -----------------------------------------------------

def test_token_file_keeps_the_token_out_of_the_process_list(processes, db, tmp_path):
    secret = "s3cret-from-a-file"
    token_file = tmp_path / "token"
    token_file.write_text(secret + "\n")
    b = processes.broker(db, "--token-file", token_file, "--total", "20")
    with open("/proc/%d/cmdline" % b.popen.pid, "rb") as f:
        assert secret.encode() not in f.read()
    assert b.request("GET", "/stats")[0] == 401
    assert b.request("GET", "/stats", headers={"Authorization": "Bearer " + secret})[0] == 200
    env = dict(os.environ, BROKER_TOKEN_FILE=str(token_file))
    w = processes.worker("--url", b.url, "--time-scale", "0", "--batchsize", "5",
                         "--processes", "2", env=env)
    assert b.wait(60) == 0 and "all 20 messages settled" in b.output(), w.output()
    w.stop()
    assert secret not in b.output() + w.output()


def test_an_empty_or_missing_token_file_refuses_the_start(db, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for program, args, message in (
            ("broker.py", ["--token-file", empty, "--db", db], "is empty"),
            ("broker.py", ["--token-file", tmp_path / "none", "--db", db], "cannot read"),
            ("worker.py", ["--token-file", empty], "is empty"),
            ("broker.py", ["--token", "x", "--token-file", empty], "not allowed with")):
        result = subprocess.run([sys.executable, program] + [str(a) for a in args], cwd=HERE,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and message in result.stderr, (program, result.stderr)
    assert not db.exists()


# --- access control: --token ------------------------------------------------------------

def test_with_a_token_every_endpoint_but_healthz_needs_the_bearer(processes, db):
    secret = "s3cret-token-value"
    b = processes.broker(db, "--token", secret, "--heartbeat", "600")
    for path in ("/stats", "/task?batchsize=2", "/nope"):
        status, headers, body = b.request("GET", path)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert b.request("GET", path, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert b.request("POST", "/report?worker=x&batch=1", b"[]")[0] == 401
    assert b.request("GET", "/healthz")[0] == 200
    good = {"Authorization": "Bearer " + secret}
    assert b.request("GET", "/stats", headers=good)[0] == 200
    client = SSEClient(b.host, b.port, "/task?batchsize=2",
                       headers="Authorization: Bearer %s\r\n" % secret)
    assert client.status == 200
    client.close()
    assert "401 for GET /stats" in b.output() and secret not in b.output()


def test_the_worker_sends_its_token_and_a_wrong_one_ends_it_clearly(processes, db, tmp_path):
    b = processes.broker(db, "--token", "right", "--total", "4", "--seed", "3")
    wrong = processes.worker("--url", b.url, "--token", "wrong", "--batchsize", "2")
    assert wrong.wait() == 2
    assert "broker refused the stream: 401" in wrong.output()
    env = dict(os.environ, BROKER_TOKEN="right")
    processes.worker("--url", b.url, "--batchsize", "4", "--time-scale", "0", env=env)
    assert b.wait() == 0  # the worker settled all four


def test_an_empty_token_is_refused_not_taken_as_no_authentication(processes, db):
    for args, env in ((["--token", ""], {}), ([], {"BROKER_TOKEN": ""}),
                      (["--token", "   "], {}), ([], {"BROKER_TOKEN": " \t "})):
        result = subprocess.run([sys.executable, "broker.py", "--port", "0", "--db", str(db)]
                                + args, cwd=HERE, capture_output=True, text=True, timeout=30,
                                env=dict(os.environ, **env))
        assert result.returncode == 2
        assert "token (--token or $BROKER_TOKEN) is empty" in result.stderr, args
    assert not db.exists()


def test_a_non_ascii_token_is_compared_as_the_utf_8_bytes_clients_send(processes, db):
    b = processes.broker(db, "--token", "s3cr\u00e9t-\u00fcber", "--heartbeat", "600")
    for token, status in ((b"s3cr\xc3\xa9t-\xc3\xbcber", b"200"), (b"s3cr\xe9t-\xfcber", b"401")):
        conn = socket.create_connection((b.host, b.port), timeout=10)
        conn.sendall(b"GET /stats HTTP/1.1\r\nAuthorization: Bearer " + token +
                     b"\r\nConnection: close\r\n\r\n")
        answer = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
        conn.close()
        assert answer.startswith(b"HTTP/1.1 " + status), (token, answer[:60])
    worker = processes.worker("--url", b.url, "--token", "s3cr\u00e9t-\u00fcber",
                              "--batchsize", 2, "--time-scale", 0)
    b.wait_for_line(r"w\d+: connected")
    worker.stop()
    # The dashboard's stream takes it percent-encoded in its URL, as a browser sends it.
    events = SSEClient(b.host, b.port, "/events?access_token=" +
                       urllib.parse.quote("s3cr\u00e9t-\u00fcber"))
    assert events.status == 200
    events.close()


def test_no_token_is_written_to_the_log_at_any_level(processes, db):
    secret = "s3cret-token-value"
    b = processes.broker(db, "--token", secret, "--heartbeat", "600")
    auth = {"Authorization": "Bearer " + secret}
    client = SSEClient(b.host, b.port, "/task?batchsize=2",
                       headers="Authorization: Bearer %s\r\n" % secret)
    client.hello()
    batch = client.batch()
    status, _h, _body = b.request("POST", "/report?worker=%s&batch=%d" % (
        client.token, batch[0]["batch"]), b"[]", headers=auth)
    assert status == 200
    events = SSEClient(b.host, b.port, "/events?access_token=" + secret)
    assert events.status == 200
    events.next_event()
    events.close()
    client.close()
    b.wait_for_line(r"/report\?worker=<redacted>&batch=")
    b.wait_for_line(r"/events\?access_token=<redacted>")
    b.stop()
    assert secret not in b.output() and client.token not in b.output()


# --- access control: --cors-origin ------------------------------------------------------

def test_cors_only_for_the_origins_given_with_preflight(processes, db):
    page = "http://127.0.0.1:9999"
    b = processes.broker(db, "--cors-origin", page, "--heartbeat", "600")
    status, headers, _ = b.request("OPTIONS", "/report", headers={
        "Origin": page, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == page
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "Authorization, Content-Type"
    assert headers["Vary"] == "Origin"
    stream = SSEClient(b.host, b.port, "/task?batchsize=1", headers="Origin: %s\r\n" % page)
    assert stream.status == 200 and stream.headers["access-control-allow-origin"] == page
    stream.close()
    # Another origin: no CORS headers, and its stream is refused before any batch.
    status, headers, _ = b.request("GET", "/stats", headers={"Origin": "http://evil.test"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    refused = SSEClient(b.host, b.port, "/task?batchsize=1",
                        headers="Origin: http://evil.test\r\n")
    assert refused.status == 403
    assert b.stats()["dispatched"] <= 1  # the refused one took nothing
    # Its log says why, once for that origin (a page's EventSource retries).
    again = SSEClient(b.host, b.port, "/task?batchsize=1", headers="Origin: http://evil.test\r\n")
    assert again.status == 403
    said = [line for line in b.output().splitlines() if "refused a stream" in line]
    assert len(said) == 1 and "WARNING" in said[0] and "http://evil.test" in said[0] \
        and page in said[0]


def test_without_cors_origin_there_are_no_cors_headers(processes, db):
    b = processes.broker(db)
    status, headers, _ = b.request("GET", "/stats", headers={"Origin": "http://127.0.0.1:9999"})
    assert status == 200 and not any(h.startswith("Access-Control") for h in headers)


# --- TLS: the workers of --workers, and errors that retrying cannot fix --------------------

# The README's recipe: a throw-away CA, and a certificate it signs for localhost.
TLS_RECIPE = [
    "req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=throwaway-ca -addext "
    "basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign -keyout ca.key "
    "-out ca.pem",
    "req -newkey rsa:2048 -nodes -subj /CN=localhost -addext subjectAltName=DNS:localhost "
    "-keyout key.pem -out cert.csr",
    "x509 -req -in cert.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 "
    "-copy_extensions copy -out cert.pem"]


def test_the_readme_s_tls_recipe_works_with_workers_on_a_name(tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        skip_or_fail("no openssl command (apt-get install openssl)")
    readme = open(os.path.join(HERE, "README.md")).read()
    for line in TLS_RECIPE:
        assert "openssl " + line in readme  # (the recipe as the README gives it)
        subprocess.run([openssl] + line.split(), cwd=tmp_path, check=True, capture_output=True,
                       timeout=60)
    # Certified for localhost only: the workers must be given that name, not 127.0.0.1.
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "broker.py"), "--host", "localhost", "--port", "0",
         "--tls-cert", "cert.pem", "--tls-key", "key.pem", "--workers", "2", "--total", "60",
         "--db", "b.db"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, SSL_CERT_FILE=str(tmp_path / "ca.pem")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"all 60 messages settled", result.stderr)
    assert "IP address mismatch" not in result.stderr


def test_a_tls_error_that_retrying_cannot_fix_ends_the_worker_with_one_line(
        processes, db, pki, tmp_path):
    ca, cert, key = pki
    plain = processes.broker(db)  # https:// to a plain HTTP broker: wrong version number
    secure = processes.broker(tmp_path / "tls.db", "--tls-cert", cert, "--tls-key", key)
    cases = [(plain.url.replace("http://", "https://"), [], "wrong version number"),
             (secure.url, [], "certificate is not trusted")]  # (not our CA)
    for url, flags, says in cases:
        for processes_flag in ([], ["--processes", "2"]):
            result = subprocess.run([sys.executable, "worker.py", "--url", url] + flags +
                                    processes_flag, cwd=HERE, capture_output=True, text=True,
                                    timeout=60)
            assert result.returncode == 2, (url, result.stderr)
            errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
            assert says in errors[0] and "Traceback" not in result.stderr, result.stderr
            assert len(errors) == (1 if not processes_flag else 3), result.stderr
