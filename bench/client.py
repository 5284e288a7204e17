"""A protocol client of our own: zero work, every id reported, faults on demand.

Used by the benchmarks (so that their figures are the broker's, not
worker.py's) and by the reliability tests (so that every acknowledged id is
known). It speaks PROTOCOL.md over a raw socket for the stream and a
keep-alive HTTP connection for the reports; standard library only.

    client = Client("http://127.0.0.1:8080", batchsize=10, fail_share=0.2)
    client.run(stop_event)          # until stop_event is set
    client.acked                    # ids the broker acknowledged as done
"""

import json
import random
import socket
import struct
import sys
import threading
import time
import urllib.parse


# Linux: the kernel stamps each received packet (SO_TIMESTAMPNS, not in the
# socket module), so a batch's arrival is known even if this process is
# scheduled late to read it.
SO_TIMESTAMPNS = 35 if sys.platform.startswith("linux") else None
_TIMESPEC = struct.Struct("@ll")


class Faults:
    """Probabilities, per batch, of misbehaving in the ways a real worker can."""

    def __init__(self, cut=0.0, drop=0.0, delay=0.0, delay_seconds=0.0):
        self.cut = cut                      # close the stream in the middle of the batch
        self.drop = drop                    # never report; keep the stream open
        self.delay = delay                  # report only after delay_seconds
        self.delay_seconds = delay_seconds  # (past the lease: the report is late)


class Client:
    def __init__(self, url, batchsize, fail_share=0.0, seed=None, token=None, faults=None):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.batchsize = batchsize
        self.fail_share = fail_share
        self.rng = random.Random(seed)
        self.auth = "Authorization: Bearer %s\r\n" % token if token else ""
        self.faults = faults or Faults()
        self.lock = threading.Lock()
        self.received = []          # every msg event: (id, attempt)
        self.acked = []             # ids acknowledged done by a 200
        self.batches = 0
        self.latencies = []         # seconds from sending a report to reading the next batch
        self.arrivals = []          # ... to the next batch's arrival on the socket (Linux)
        self.errors = 0
        self.injected = {"cut": 0, "drop": 0, "delay": 0}
        self._report_conn = None

    # -- the stream ---------------------------------------------------------

    def run(self, stop, seconds=None):
        """Serve streams until `stop` is set (or `seconds` pass); reconnect on errors."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            try:
                self._session(stop, deadline)
            except (OSError, ValueError):
                with self.lock:
                    self.errors += 1
                stop.wait(0.05)

    def _session(self, stop, deadline):
        sock = socket.create_connection((self.host, self.port), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stamped = False
        if SO_TIMESTAMPNS is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                stamped = True
            except OSError:
                pass
        try:
            sock.sendall(("GET /task?batchsize=%d HTTP/1.1\r\nHost: %s\r\n%s"
                          "Accept: text/event-stream\r\n\r\n"
                          % (self.batchsize, self.host, self.auth)).encode())
            buffer = b""
            while b"\r\n\r\n" not in buffer:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            head, _sep, buffer = buffer.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                stop.wait(0.2)
                return
            chunks = _Chunks() if b"transfer-encoding: chunked" in head.lower() else None
            if chunks is not None:
                buffer = chunks.feed(buffer)
            token = None
            batch = []
            sent_report_at = None
            sock.settimeout(1.0)
            while True:
                *events, buffer = buffer.split(b"\n\n")  # the complete events, and the rest
                for event in events:
                    kind, data = _parse_event(event)
                    if kind == "hello":
                        token = data["worker"]
                    elif kind == "bye":
                        return
                    elif kind == "msg":
                        batch.append(data)
                        with self.lock:
                            self.received.append((data["id"], data["attempt"]))
                        if self.faults.cut and self.rng.random() < self.faults.cut / data["size"]:
                            self.injected["cut"] += 1
                            return  # the stream is cut in the middle of the batch
                        if len(batch) == data["size"]:
                            sent_report_at = self._finish(token, batch)
                            batch = []
                if stop.is_set() or (deadline is not None and time.monotonic() >= deadline):
                    return
                try:
                    if stamped:
                        chunk, ancillary, _flags, _addr = sock.recvmsg(65536, 64)
                    else:
                        chunk, ancillary = sock.recv(65536), ()
                except socket.timeout:
                    continue
                if not chunk:
                    return
                if sent_report_at is not None:
                    read_at, sent_at, sent_wall = time.perf_counter(), *sent_report_at
                    with self.lock:
                        self.latencies.append(read_at - sent_at)
                        for level, kind, data in ancillary:
                            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                                seconds, nanoseconds = _TIMESPEC.unpack_from(data)
                                self.arrivals.append(seconds + nanoseconds / 1e9 - sent_wall)
                    sent_report_at = None
                buffer += chunk if chunks is None else chunks.feed(chunk)
        finally:
            sock.close()

    def _finish(self, token, batch):
        """Report a whole batch (or misbehave); when the report was sent, as
        (time.perf_counter(), time.time()), or None."""
        number = batch[0]["batch"]
        if self.faults.drop and self.rng.random() < self.faults.drop:
            self.injected["drop"] += 1
            return None  # the lease will expire and the broker will close the stream
        if self.faults.delay and self.rng.random() < self.faults.delay:
            self.injected["delay"] += 1
            time.sleep(self.faults.delay_seconds)
        ids = [m["id"] for m in batch if not (self.fail_share and
                                              self.rng.random() < self.fail_share)]
        sent = time.perf_counter(), time.time()
        status, answer = self.report(token, number, ids)
        with self.lock:
            self.batches += 1
            if status == 200:
                ignored = set(answer.get("ignored", ()))
                self.acked.extend(i for i in ids if i not in ignored)
        return sent

    def report(self, token, number, ids):
        """POST a report on a keep-alive connection; (status, parsed answer)."""
        path = "/report?worker=%s&batch=%d" % (urllib.parse.quote(token), number)
        for _attempt in range(2):  # once more on a keep-alive connection the server closed
            if self._report_conn is None:
                self._report_conn = KeepAlive(self.host, self.port, self.auth)
            try:
                status, closing, body = self._report_conn.post(path, json.dumps(ids).encode())
                if closing:
                    self._report_conn.close()
                    self._report_conn = None
                return status, json.loads(body or b"{}")
            except (OSError, ValueError):
                self._report_conn.close()
                self._report_conn = None
        return 0, {}


class KeepAlive:
    """A lean HTTP/1.1 client for one keep-alive connection: POST, read the answer.

    http.client parses headers with the email package; at a thousand
    requests a second on two cores that is the load generator's own cost
    showing up in the broker's figures.
    """

    def __init__(self, host, port, auth=""):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.prefix = "Host: %s\r\n%sContent-Type: application/json\r\n" % (host, auth)
        self.buffer = b""

    def post(self, path, body):
        self.sock.sendall(("POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n"
                           % (path, self.prefix, len(body))).encode() + body)
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _sep, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length, closing = 0, False
        for line in lines[1:]:
            name, _colon, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                closing = True
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, closing, body

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    def close(self):
        self.sock.close()


class _Chunks:
    """Transfer-Encoding: chunked, undone: feed the wire, get the body."""

    def __init__(self):
        self.wire = b""

    def feed(self, data):
        wire = self.wire + data
        body = []
        position = 0
        while True:
            line_end = wire.find(b"\r\n", position)
            if line_end < 0:
                break
            size = int(wire[position:line_end], 16)
            end = line_end + 2 + size
            if size == 0 or len(wire) < end + 2:
                break
            body.append(wire[line_end + 2:end])
            position = end + 2
        self.wire = wire[position:]
        return b"".join(body)


def _parse_event(raw):
    kind, data = None, None
    for line in raw.decode("utf-8").split("\n"):
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
    return kind, data
