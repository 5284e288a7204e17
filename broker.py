#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""broker.py: hands out work over Server-Sent Events, retries what fails.

The broker generates messages ``{"id": <rs/xid>, "period": 1..1000}`` and
pushes them, a batch at a time, to the workers that are free, in the order
they became free. A worker streams ``GET /task?batchsize=N`` and reports the
ids it finished with ``POST /report``. A message that is not reported is sent
again, up to ``--max-attempts`` deliveries in all; after the last one fails it
is written to the ``failed`` bucket of a bbolt file (``--db``) as a dead
letter. A message is leased to one worker at a time, from the moment its
batch is written in full, and a reported message is never sent again; a
batch whose worker died is retried in halves, so that a message that kills
its worker takes few others with it. The wire protocol is PROTOCOL.md.

Run::

    python broker.py                        # http://127.0.0.1:8080, broker.db here
    python broker.py --port 0 --total 2000  # any free port; exit once 2000 settle

Flags (``python broker.py --help`` says more): where to listen and store
(--host, --port, --db), the rules (--max-attempts, --lease-timeout,
--heartbeat, --max-batchsize, --total, --seed, --durable, --retry-delay,
--retry-delay-max: the wait before a retry, doubling), jobs from
producers (--source api, --max-backlog, --dedup-window,
--max-enqueue-body: POST /enqueue and ``broker.py put``), limits and access
(--max-workers, --max-body, --read-timeout, --token, --token-file,
--cors-origin, --tls-cert, --tls-key), and
running and watching (--workers, --progress-every, --trace, --log-level,
--drain-timeout, --pin), more than one machine (--jetstream, --js-stream,
--js-replicas, --backlog: the queue in NATS JetStream, shared by several
brokers; needs nats-py), and --version. SIGTERM, SIGINT or SIGHUP stop it gracefully: it leases
nothing more and lets busy workers report, up to --drain-timeout; a second
signal stops it at once. Subcommands
``broker.py dead`` and ``broker.py requeue`` read and requeue the dead
letters of a stopped broker's db (``requeue --url``: of a running broker);
``broker.py put`` enqueues jobs on a running ``--source api`` broker.

Endpoints: ``GET /task`` (the work stream), ``POST /report``, ``POST /touch``
(a slow batch keeps its lease), ``POST /enqueue`` (producers' jobs, with
--source api); for people and monitoring ``GET /`` (a
dashboard), ``/events``, ``/stats``, ``/metrics``, ``/healthz``, ``/dead``,
and ``POST /requeue`` (dead letters back to the queue, live).

Inside, the threads are: one per connection (ThreadingHTTPServer), the
dispatch loop (leases that expire), the stream watcher (streams that close),
the state writer (the bbolt file's one writer), and the log and trace
writers. All dispatch state is the Dispatcher's, behind one lock; each of its
Conditions is named for what its waiters wait for (see `Dispatcher.__init__`).
Two threads write a batch on a stream: the stream's own, for the first batch
and for any batch assigned while its worker was free; and the thread of the
worker's report, for the next batch at once. Handing that batch to the
stream's thread instead costs a wake-up and a GIL hand-off per batch
(under Go's load client, 8 workers, batches of 10: 113,000 messages/s and a
p50 of 0.66 ms so, against 136,000 and 0.56 ms).
The threads run on one CPU (--pin, see `OneCore`): they take turns at the
GIL, and a turn that passes to another core waits for that core to wake.
The file reads top down: the core (ids, messages, the queues, the
Dispatcher, the db, streams, a lean HTTP/1.1 layer, the broker's endpoints,
the wiring, main), then appendices that a reader can skip (the dashboard
page, Prometheus text, the dead-letter tools, One CPU, the trace file).

Read the dead letters with ``python bbolt_lite.py dump broker.db`` (or Go's
``bbolt`` tool). Standard library only, Python 3.9 or newer; needs
``bbolt_lite.py`` beside it.
"""

__version__ = "1.1.0"

import argparse
import base64
import bisect
import collections
import datetime
import functools
import hashlib
import heapq
import hmac
import http
import http.server
import io
import itertools
import json
import logging
import logging.handlers
import os
import queue
import random
import re
import secrets
import select
import selectors
import signal
import socket
import subprocess
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib

try:
    import ssl
except ImportError:  # a Python built without OpenSSL: no --tls-cert here
    ssl = None

import bbolt_lite


# ---------------------------------------------------------------------------
# Constants, and the loggers
# ---------------------------------------------------------------------------

log = logging.getLogger("broker")
# The lines an operator always wants: listening, progress, drain, stopped.
# --log-level WARNING quietens the rest but not these.
status_log = logging.getLogger("broker.status")

DEFAULT_PORT = 8080
DEFAULT_DB = "broker.db"
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_LEASE_TIMEOUT = 10.0
DEFAULT_HEARTBEAT = 15.0
DEFAULT_MAX_BATCHSIZE = 1000
DEFAULT_MAX_WORKERS = 1000
MAX_REPORT_BYTES = 64 * 1024
# Jobs from producers (--source api, POST /enqueue; PROTOCOL.md v1.2):
MAX_PAYLOAD_BYTES = 64 * 1024        # a job's payload, as compact JSON
MAX_KEY_BYTES = 256                  # an idempotency key, as UTF-8
MAX_DELAY_MS = 30 * 24 * 3600 * 1000  # a job's delay_ms: 30 days at most
DEFAULT_MAX_ENQUEUE_BODY = 4 * 1024 * 1024
DEFAULT_DEDUP_WINDOW = 300.0         # seconds a key is remembered (as SQS FIFO's)
DEFAULT_MAX_BACKLOG = 100000         # jobs waiting (not leased) at most
DEFAULT_RETRY_DELAY_MAX = 300.0      # seconds a failed attempt's wait grows to at most
DEFAULT_RETRY_DELAY_API = 1.0        # --source api's --retry-delay (the generator's: 0)
SSE_RETRY_MS = 2000
# A request must arrive whole within this many seconds (a slow or stalled
# client holds a thread no longer), and a stream write may block no longer.
DEFAULT_READ_TIMEOUT = 30.0
# Why an attempt failed (a dead letter's `reason` is its last attempt's).
FAILURE_REASONS = ("not reported", "stream closed", "lease expired", "failed")
MAX_ERROR_BYTES = 1024  # of a failed attempt's error (UTF-8), kept with its message
MIN_PERIOD_MS, MAX_PERIOD_MS = 1, 1000
# Upper bounds (seconds) of the /metrics histogram of batch round trips.
ROUND_TRIP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DEFAULT_PROGRESS_EVERY = 10.0  # seconds between progress lines in the log
# A thread of the broker that has not come round its loop for this long is
# stuck (each comes round at least once a second): /healthz says so.
STUCK_SECONDS = 10.0
# At a stop, how long the state writer may go on trying to save what is left.
STOP_SAVE_SECONDS = 10.0
# Without --durable, the state writer's pause between commits: dead letters
# reach the db within this (and a commit) of their last attempt.
COALESCE_SECONDS = 0.1
HISTORY_SECONDS = 300  # the dashboard's chart: the last 5 minutes
# How often a broker kept on one CPU checks whether other work crowds it (OneCore).
BALANCE_SECONDS = 5.0

# The bbolt file (--db):
# bucket `failed`:  id -> {"id", "period", "attempts", "reason", "failed_at"}
# bucket `pending`: id -> {"id", "period", "attempts", "in_flight", "reason"} of each
#                   message not yet done or dead: with --durable every one; without,
#                   the dead letters requeued, until settled again. A record with
#                   "requeued": true is a dead letter requeued that no --durable run
#                   has counted yet (in `state`'s b"requeued")
# bucket `state`:   (--durable) b"generated", b"done", b"dead", b"requeued" -> decimal counts
# bucket `keys`:    (--source api) idempotency key -> {"id", "expires" (Unix seconds)}
# A job's records (pending, and failed) also hold its "payload" and "key" when it
# has them; its "period" is null when it has none.
DEAD_LETTER_BUCKET = b"failed"
PENDING_BUCKET = b"pending"
STATE_BUCKET = b"state"
KEYS_BUCKET = b"keys"
# Where requeued dead letters waited before they had a `pending` record (read
# at the start: moved into `pending`).
OLD_REQUEUE_BUCKET = b"requeue"
_COUNTER_KEYS = (b"generated", b"done", b"dead", b"requeued")


# ---------------------------------------------------------------------------
# Message ids: rs/xid
# ---------------------------------------------------------------------------
#
# 12 bytes: 4-byte big-endian Unix time, 3-byte machine id, 2-byte pid, 3-byte
# counter (starting at a random value), written as 20 characters of lowercase
# base32hex. The PyPI package `xid` is used when it is installed and passes a
# self-check; it is not thread-safe, so it runs under a lock. Otherwise (and
# in practice: xid 1.0.4 fails on Python 3) the implementation here runs.

XID_ALPHABET = "0123456789abcdefghijklmnopqrstuv"
XID_PATTERN = re.compile(r"[0-9a-v]{19}[0gw]")  # the last character holds 1 bit + 4 zero bits


# Standard base32 (RFC 4648, A-Z2-7) to lowercase base32hex, letter for letter.
_BASE32_TO_XID = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", XID_ALPHABET.encode())


def xid_encode(raw):
    """The 20-character text of a 12-byte xid."""
    # 96 bits are 19.2 characters: base32 pads the last one with zero bits, as xid does.
    return base64.b32encode(raw)[:20].translate(_BASE32_TO_XID).decode("ascii")


def xid_decode(text):
    """The 12 bytes of an xid's text; ValueError if it is not one."""
    if not isinstance(text, str) or not XID_PATTERN.fullmatch(text):
        raise ValueError("not an xid: %r" % (text,))
    n = 0
    for char in text:
        n = n << 5 | XID_ALPHABET.index(char)
    return (n >> 4).to_bytes(12, "big")


def _machine_id():
    """3 bytes of md5 of the platform machine id, as rs/xid derives them."""
    for path in ("/etc/machine-id", "/sys/class/dmi/id/product_uuid"):
        try:
            with open(path, "rb") as f:
                platform_id = f.read()
        except OSError:
            continue
        if platform_id:
            return hashlib.md5(platform_id).digest()[:3]
    try:
        return hashlib.md5(socket.gethostname().encode()).digest()[:3]
    except OSError:
        return os.urandom(3)


def _process_id():
    """The pid as rs/xid takes it: xor-ed with crc32 of the cpuset in a container."""
    pid = os.getpid()
    try:
        with open("/proc/self/cpuset", "rb") as f:
            cpuset = f.read()
        if len(cpuset) > 1:
            pid ^= zlib.crc32(cpuset)
    except OSError:
        pass
    return pid & 0xFFFF


# Two characters (10 bits) at a time: the last four characters of an id.
_XID_PAIRS = [a + b for a in XID_ALPHABET for b in XID_ALPHABET]
# The last two of those for the counter's low 6 bits (padded with 4 zero bits).
_XID_TAILS = [_XID_PAIRS[low << 4] for low in range(64)]


class XidGenerator:
    """Thread-safe rs/xid ids, made cheaply.

    Base32 turns each 5 bytes into 8 characters: characters 0-7 are the time
    and the first machine byte (they change once a second), 8-15 the other
    machine bytes, the pid and the counter's high byte (once every 65,536
    ids), 16-19 the counter's low 16 bits (every id). The first two groups
    are cached; the last is two table lookups, shared by runs of 64 ids.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._machine = _machine_id()
        self._pid = struct.pack(">H", _process_id())
        self._counter = int.from_bytes(os.urandom(3), "big")
        self._second_ends = 0.0  # the time the second of `_head` ends
        self._high = None
        self._head = self._middle = ""

    def new(self):
        return self.take(1)[0]

    def take(self, count):
        """`count` new ids, in order. (A batch's 10 took 9.9 µs one call
        each; here, one lock and one clock read for all: 3.3 µs.)"""
        with self._lock:
            first = (self._counter + 1) & 0xFFFFFF
            here = 0x10000 - (first & 0xFFFF)  # ids until the high byte changes
            if count < here:  # (not min(): see _prefix_locked)
                here = count
            self._counter = first + here - 1
            prefix = self._prefix_locked(first)
        # Characters 16-19 are the counter's low 16 bits, padded to 20: the
        # first two its high 10 bits, the last two its low 6. So ids in a
        # run of 64 counters share 18 characters, and C adds their tails (a
        # Python step an id took 17 bytecodes, a sixth of making a message).
        ids, counter, end = [], first & 0xFFFF, (first & 0xFFFF) + here
        while counter < end:
            run_end = (counter | 63) + 1
            if end < run_end:
                run_end = end
            head = prefix + _XID_PAIRS[counter >> 6]
            ids += map(head.__add__, _XID_TAILS[counter & 63:((run_end - 1) & 63) + 1])
            counter = run_end
        return ids if here == count else ids + self.take(count - here)

    def _prefix_locked(self, counter):
        """Characters 0-15 of the ids made now with this counter's high byte."""
        # (Only a new second is made an int, and take() compares where
        # min() would do. Under CPython 3.11, int() of a float costs 1,000
        # instructions and min() of two numbers 2,000, as they parse their
        # arguments as keywords (timeit: 51 and 94 ns; a comparison 10 ns).
        # This is a fast path of the ids alone: the Dispatcher's one or two
        # such calls a batch, under 1% of its cost, stay plain.)
        now = time.time()
        if now >= self._second_ends or now < self._second_ends - 1.0:
            second = int(now)
            self._second_ends = second + 1.0
            raw = struct.pack(">I", second & 0xFFFFFFFF) + self._machine + self._pid + b"\0\0\0"
            self._head = xid_encode(raw)[:8]
        if counter >> 16 != self._high:
            self._high = counter >> 16
            raw = b"\0\0\0\0" + self._machine + self._pid + bytes((self._high, 0, 0))
            self._middle = xid_encode(raw)[8:16]
        return self._head + self._middle


def _pypi_xid_generator():
    """A generator from the PyPI `xid` package, or None if it is absent or broken."""
    try:
        import xid as pypi_xid
    except ImportError:
        return None
    lock = threading.Lock()

    def new():
        with lock:
            return str(pypi_xid.Xid().string())

    try:
        first, second = new(), new()
        for text in (first, second):
            seconds = int.from_bytes(xid_decode(text)[:4], "big")
            if abs(seconds - time.time()) > 300:
                return None
        if first == second:
            return None
    except Exception:  # a broken package must not stop the broker
        return None
    return new


def new_ids_function():
    """The id source the broker uses, as a function of how many: PyPI's xid
    if sound, else ours."""
    pypi = _pypi_xid_generator()
    if pypi is not None:
        return lambda count: [pypi() for _ in range(count)]
    return XidGenerator().take


def new_id_function():
    """One id at a time, from the same source."""
    new_ids = new_ids_function()
    return lambda: new_ids(1)[0]


# ---------------------------------------------------------------------------
# Messages and batches, and the records saved of them
# ---------------------------------------------------------------------------

_PERIOD_SPAN = MAX_PERIOD_MS - MIN_PERIOD_MS + 1
_PERIOD_BITS = (_PERIOD_SPAN - 1).bit_length()


def draw_periods(rng, count):
    """`count` periods in 1..1000 ms, uniformly, one after the other: so a
    seed gives the same periods drawn a batch or one at a time.

    Each is 10 random bits, drawn again while over 999 (2.3% of draws).
    (getrandbits() gives the int in C: 12,000 instructions for a batch of
    10, where random() and int() of it took 22,000.)
    """
    bits = rng.getrandbits
    periods = []
    for _ in range(count):
        period = bits(_PERIOD_BITS)
        while period >= _PERIOD_SPAN:
            period = bits(_PERIOD_BITS)
        periods.append(MIN_PERIOD_MS + period)
    return periods


def draw_period(rng):
    """One period, as draw_periods draws them."""
    return draw_periods(rng, 1)[0]


class Message:
    __slots__ = ("id", "period", "attempts", "reason", "requeued", "batch", "handle", "error",
                 "retry_in_ms", "due")

    def __init__(self, message_id, period, requeued=False):
        self.id = message_id
        self.period = period
        self.attempts = 0      # deliveries so far
        self.reason = None     # why the last attempt failed
        self.requeued = requeued  # a dead letter brought back: it stays in `pending` until settled
        self.batch = 0         # the number of its last batch (0: none in this run)
        # (`handle`: what a queue kept elsewhere settles it by, a JetStream
        # message; set by that queue on the messages it makes, and unset on
        # the others: one more store here made __init__ a seventh slower.
        # So too `error`, the last failed attempt's error text,
        # `retry_in_ms`, its worker's wish, and `due`, the time (the
        # Dispatcher's clock) before which it is not leased again: set once
        # an attempt failed.)


class MessageMaker:
    """The seed's new messages: an xid and a random period each (a seed
    gives the same periods)."""

    def __init__(self, seed=None, new_id=None):
        self._rng = random.Random(seed)
        # (The ids of a batch are made at once: see XidGenerator.take.)
        self._new_ids = new_ids_function() if new_id is None else \
            (lambda count: [new_id() for _ in range(count)])

    def __call__(self, count):
        """`count` new messages (an iterator)."""
        return map(Message, self._new_ids(count), draw_periods(self._rng, count))


def checked_message(message_id, period):
    """A message that comes from outside this process (a queue kept
    elsewhere): ValueError unless its id is an xid and its period an integer
    in 1..1000, as `batch_events` writes them without escaping."""
    if not (type(message_id) is str and XID_PATTERN.fullmatch(message_id)):
        raise ValueError("its id is not an xid")
    if not _is_int(period, MIN_PERIOD_MS, MAX_PERIOD_MS):
        raise ValueError("its period is not an integer in %d..%d" % (MIN_PERIOD_MS, MAX_PERIOD_MS))
    return Message(message_id, period)


class Batch:
    """Messages given to one worker together.

    A batch is assigned first (its messages are reserved for that worker,
    and their `attempts` count this delivery), then written: its lease, and
    its clock, start only once its bytes are in the socket in full
    (`written`). A batch that could not be written never started: its
    messages go back uncharged. While its bytes go out (`writing`), only its
    writer may settle it: a stream that ends meanwhile leaves it to the
    writer, who alone knows whether the bytes left.
    """

    __slots__ = ("number", "session", "messages", "deadline", "started", "saved_seq",
                 "writing", "written", "half", "touches")

    def __init__(self, number, session, half):
        self.number = number
        self.session = session
        self.messages = {}        # id -> Message, in delivery order (see _reserve_locked)
        self.half = half          # made of one half of a batch whose worker died
        self.writing = False      # its bytes are going out now: its writer settles it
        self.written = False
        self.started = self.deadline = None  # the lease's, once written
        self.saved_seq = 0  # with --durable: written once this change is on disk
        self.touches = 0    # POST /touch calls that extended its lease


class Session:
    """One worker's stream: its token, its batch in flight, its outbox."""

    __slots__ = ("token", "number", "batchsize", "batch", "outbox", "closed",
                 "close_reason", "channel", "batch_ready", "connected_at", "batches_done",
                 "leaving", "end_note")

    def __init__(self, token, number, batchsize, lock, now):
        self.token = token
        self.number = number            # for logs: the token is a secret
        self.batchsize = batchsize
        self.batch = None               # the Batch leased to this worker
        self.outbox = None              # that Batch, until its writer takes it
        self.closed = False
        self.close_reason = None
        self.channel = None             # set by the HTTP layer: writes to and cuts the stream
        # Wakes this stream's writer: a batch is in its outbox, the stream
        # was closed, or the broker is stopping.
        self.batch_ready = threading.Condition(lock)
        self.connected_at = now
        self.batches_done = 0
        self.leaving = False            # its worker reported its last batch (`last=1`)
        self.end_note = None            # what its end did to its batch, for its closing line

    @property
    def name(self):
        return "w%d" % self.number


class Job(Message):
    """A message a producer enqueued (POST /enqueue): its `payload` (any JSON
    value, decoded; None: it has none, and then a `period`), its idempotency
    `key` (or None), and `due`, the time (the Dispatcher's clock) before
    which it is not leased."""

    __slots__ = ("payload", "payload_json", "key")

    def __init__(self, message_id, period, payload=None, key=None, requeued=False,
                 payload_json=None):
        super().__init__(message_id, period, requeued)
        self.payload = payload
        # (Its compact JSON, made once: each msg event of it writes it.)
        self.payload_json = payload_json if payload_json is not None or payload is None \
            else _compact_json(payload)
        self.key = key
        self.due = 0.0


def _job_fields(record, message):
    """`record` with a job's payload and key, and the last attempt's error,
    where it has them."""
    error = getattr(message, "error", None)
    if error is not None:
        record["error"] = error
    if type(message) is Job:
        if message.payload is not None:
            record["payload"] = message.payload
        if message.key is not None:
            record["key"] = message.key
    return record


def dead_letter_record(message, failed_at):
    """A dead letter's record in the `failed` bucket (PROTOCOL.md)."""
    return _job_fields({"id": message.id, "period": message.period,
                        "attempts": message.attempts, "reason": message.reason,
                        "failed_at": failed_at}, message)


def pending_record(message, in_flight, not_before=None):
    """A message's record in the `pending` bucket; `not_before`: the Unix
    time before which it is not leased (its retry delay, or its delay_ms)."""
    record = _job_fields({"id": message.id, "period": message.period,
                          "attempts": message.attempts, "in_flight": in_flight,
                          "reason": message.reason}, message)
    if not_before is not None:
        record["not_before"] = not_before
    return record


def pending_record_json(message, in_flight, not_before=None):
    """_compact_json(pending_record(...)), formatted directly: with
    --durable every lease and every job enqueued writes one (0.69 µs
    against 3.15 for a job's, timeit)."""
    reason, error = message.reason, getattr(message, "error", None)
    text = '{"id":"%s","period":%s,"attempts":%d,"in_flight":%s,"reason":%s' % (
        message.id, "null" if message.period is None else message.period, message.attempts,
        "true" if in_flight else "false", "null" if reason is None else _compact_json(reason))
    if error is not None:
        text += ',"error":' + _compact_json(error)
    if type(message) is Job:
        if message.payload_json is not None:
            text += ',"payload":' + message.payload_json
        if message.key is not None:
            text += ',"key":' + _compact_json(message.key)
    if not_before is not None:
        text += ',"not_before":' + _compact_json(not_before)
    return text + "}"


def message_from_record(record, requeued=False):
    """The Message (or Job) a `pending` or `failed` record describes, its
    attempts as none yet."""
    if "payload" in record or "key" in record or record.get("period") is None:
        message = Job(record["id"], record.get("period"), record.get("payload"),
                      record.get("key"), requeued=requeued)
    else:
        message = Message(record["id"], record["period"], requeued=requeued)
    if record.get("error") is not None:
        message.error = record["error"]
    return message


def requeued_record(record):
    """The `pending` record of a dead letter requeued (its `failed` record):
    its attempts reset, and not yet counted by a --durable run."""
    return dict(pending_record(message_from_record(record), False), requeued=True)


class Changes:
    """What the state writer takes in one go: all saved in one transaction."""

    __slots__ = ("seq", "pending", "dead_letters", "counters", "keys")

    def __init__(self, seq, pending, dead_letters, counters, keys=None):
        self.seq = seq                    # the last change included
        self.pending = pending            # id -> record's JSON text, or None to delete
        self.dead_letters = dead_letters  # [(Message, failed_at)]
        self.counters = counters          # --durable: (generated, done, dead, requeued)
        self.keys = keys or {}            # --source api: key -> record, or None to delete


def _rfc3339_now():
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (now.microsecond // 1000)


# ---------------------------------------------------------------------------
# Queues: where messages wait for a worker
# ---------------------------------------------------------------------------
#
# The Dispatcher keeps the workers and the leases; the messages that wait for
# a worker are a queue's. The Dispatcher calls its queue through these hooks
# alone, always under its own lock, which it hands the queue in bind() and
# which guards the queue's fields too. Override these methods to implement
# other queue organizations:
#
#   bind(dispatcher, lock)  once, at the Dispatcher's start
#   waiting()               how many messages wait here (for the figures)
#   delayed()               how many of them are not due yet (for the figures)
#   next_due()              the earliest time (the Dispatcher's clock) at which one
#                           not due now will be, or None: the loop wakes then
#   take(count)             (messages, half): up to `count` for one batch, and
#                           whether they are a half (it goes alone); no messages
#                           when none wait now
#   put(messages, where)    messages back in line: FIRST (a batch never written,
#                           its attempt uncharged, or dead letters requeued),
#                           FIRST_HALF (such a batch that was a half), RETRY (failed
#                           attempts), BISECT (a batch whose worker died); or NEW (jobs
#                           producers enqueued, once saved: a JobQueue's only)
#   settled(messages, outcome, session, failed_at, tickets)
#                           done, or dead; a queue that has it confirmed elsewhere
#                           appends to `tickets` what the report's answer waits for
#                           (None: no report waits)
#   touched(messages, tickets)
#                           a worker is still at them; a queue that must confirm it
#                           elsewhere appends to `tickets`, and the lease is extended
#                           only once it has
#   lease_bound(messages)   the latest time (the Dispatcher's clock) until which the
#                           queue vouches that no one else gets them, or None; read
#                           where a lease starts or is extended, if `bounds_leases`
#   run_settled(settled)    whether a --total run is over, `settled` being this
#                           broker's messages done or dead (and saved)
#   generated               messages made or taken in so far (for the figures)
#   traces_settled          True: the queue writes the trace's done and dead lines
#                           itself, once they are confirmed
# and outside the lock: wait_confirmed(tickets, timeout), and (not for the
# Dispatcher: for the wiring) start(), stop() and `problem` (why the queue
# cannot be used now, for /healthz, or None).
#
# LocalQueue keeps the messages in this process, made by the seed's loop;
# JobQueue, a LocalQueue whose new messages are the jobs producers enqueue;
# broker_jetstream.JetStreamQueue keeps them in a NATS JetStream stream that
# several brokers share.

FIRST, FIRST_HALF, RETRY, BISECT, NEW = "first", "first half", "retry", "bisect", "new"


class LocalQueue:
    """The messages that wait, in this process: the retries (first in line),
    the halves of batches whose worker died (each given alone, before the
    retries), then new messages (up to --total): `new_messages(count)` makes
    up to `count` of them, an iterable (fewer, or none, when no more are
    there now); the
    seed's loop (MessageMaker) unless another source is given."""

    traces_settled = False
    bounds_leases = False
    problem = None

    def __init__(self, total=None, new_messages=None):
        self.total = total
        self.generated = 0
        self._new_messages = new_messages or MessageMaker()
        self._clock = time.monotonic  # (the Dispatcher's: see bind)
        # (Guarded by the Dispatcher's lock: see bind.)
        self._retry = collections.deque()    # Messages waiting for another attempt, due
        self._not_due = []                   # heap of (due, order, Message) not yet due
        self._order = 0                      # (ties in the heaps: first put, first out)
        self._halves = collections.deque()   # [Message]: halves of a batch whose worker died
        self._waiting_in_halves = 0          # messages in all those halves
        self._halves_due = 0.0               # when the latest of them is due

    def bind(self, dispatcher, lock):
        self._clock = dispatcher.clock  # (nothing here runs outside the dispatcher's lock)

    def waiting(self):
        return self.retrying() + len(self._not_due)

    def retrying(self):
        """(For the figures) the messages waiting for another attempt, due."""
        return len(self._retry) + (self._waiting_in_halves if self._halves_due <= self._clock()
                                   else 0)

    def delayed(self):
        return len(self._not_due) + (self._waiting_in_halves if self._halves_due > self._clock()
                                     else 0)

    def next_due(self):
        times = [self._not_due[0][0]] if self._not_due else []
        if self._halves and self._halves_due > self._clock():
            times.append(self._halves_due)
        return min(times) if times else None

    def _move_due(self, now):
        """The retries now due, from the heap to the line (in due order)."""
        not_due, retry = self._not_due, self._retry
        while not_due and not_due[0][0] <= now:
            retry.append(heapq.heappop(not_due)[2])

    def take(self, count):
        # (The clock only when something waits for its due time: a batch's hot path.)
        now = self._clock() if self._halves or self._not_due else 0.0
        if self._halves and self._halves_due <= now:  # a half goes alone, and first
            half = self._halves[0]
            messages = half[:count]
            if len(messages) == len(half):
                self._halves.popleft()
            else:
                del half[:count]
            self._waiting_in_halves -= len(messages)
            return messages, True
        if self._not_due and self._not_due[0][0] <= now:
            self._move_due(now)
        retry = self._retry
        messages = [retry.popleft() for _ in range(min(count, len(retry)))] if retry else []
        new = count - len(messages)
        if self.total is not None:
            new = min(new, self.total - self.generated)
        if new > 0:
            taken = len(messages)
            messages += self._new_messages(new)
            self.generated += len(messages) - taken
        return messages, False

    def put(self, messages, where):
        if where == RETRY:
            now = None
            for message in messages:
                due = getattr(message, "due", 0.0)
                if due:
                    if now is None:
                        now = self._clock()
                    if due > now:
                        self._order += 1
                        heapq.heappush(self._not_due, (due, self._order, message))
                        continue
                self._retry.append(message)
        elif where == FIRST:
            self._retry.extendleft(reversed(messages))
        elif where == FIRST_HALF:
            self._halves.appendleft(messages)
            self._waiting_in_halves += len(messages)
        elif where == BISECT:  # two halves, each a batch of its own (PROTOCOL.md
            # rule 6: one of them may have ended the worker; it takes fewer
            # batch-mates down each time)
            # A half is given once all its messages are due: all the
            # halves wait for the latest (they go one at a time, first).
            self._halves_due = max([self._halves_due] + [getattr(m, "due", 0.0)
                                                         for m in messages])
            middle = (len(messages) + 1) // 2
            for half in (messages[:middle], messages[middle:]):
                if half:
                    self._halves.append(half)
                    self._waiting_in_halves += len(half)
        else:
            raise ValueError("%r: no such place in this queue" % where)

    def settled(self, messages, outcome, session, failed_at, tickets):
        pass  # (nothing more to do here: the state writer saves them)

    def touched(self, messages, tickets):
        pass

    def lease_bound(self, messages):
        return None  # (only this broker hands them out)

    def run_settled(self, settled):
        return self.total is not None and self.generated == self.total and settled == self.total

    def wait_confirmed(self, tickets, timeout):
        return True  # (it appends no tickets)

    def snapshot(self):
        """(For the invariant tests) the halves, and the retries in line
        order (those not due yet last, in due order)."""
        return [list(half) for half in self._halves], list(self._retry) + [
            m for _due, _order, m in sorted(self._not_due)]


class JobQueue(LocalQueue):
    """--source api: the new messages are the jobs producers enqueued, in
    the order they were accepted, each once it is due (its delay_ms, to
    within a turn of the dispatch loop: a second at most)."""

    def __init__(self, clock=time.monotonic):
        super().__init__(None, self._due_jobs)
        self._clock = clock
        self._ready = collections.deque()  # Jobs due, in the order they were accepted
        self._delayed = []                  # heap of (due, order, Job) not yet due

    def waiting(self):
        return super().waiting() + len(self._ready) + len(self._delayed)

    def delayed(self):
        return super().delayed() + len(self._delayed)

    def next_due(self):
        times = [t for t in (super().next_due(), self._delayed[0][0] if self._delayed else None)
                 if t is not None]
        return min(times) if times else None

    def put(self, messages, where):
        if where != NEW:
            super().put(messages, where)
            return
        now = self._clock()
        for job in messages:
            if getattr(job, "due", 0.0) > now:
                self._order += 1
                heapq.heappush(self._delayed, (job.due, self._order, job))
            else:
                self._ready.append(job)

    def _due_jobs(self, count):
        delayed, ready = self._delayed, self._ready
        if delayed and delayed[0][0] <= self._clock():
            now = self._clock()
            while delayed and delayed[0][0] <= now:
                ready.append(heapq.heappop(delayed)[2])
        return [ready.popleft() for _ in range(min(count, len(ready)))]


# ---------------------------------------------------------------------------
# The Dispatcher: who holds which message
# ---------------------------------------------------------------------------

class ReportError(Exception):
    """A report refused, with the HTTP status that says why."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Dispatcher:
    """All dispatch state, behind one lock (see `_lock` in __init__): the
    workers and the leases. The messages that wait are its queue's, called
    through the hooks of "Queues" above (a LocalQueue of --total and
    --seed's messages unless a `queue` is given).

    Batches are given out by `_assign_locked`, from whichever call freed a
    worker or a message (connect, report, disconnect, the loop's lease
    expiry): a worker that reports gets its next batch within that report,
    with no hop through another thread. The HTTP layer and the wiring use
    the public methods only.
    """

    def __init__(self, max_attempts=DEFAULT_MAX_ATTEMPTS, lease_timeout=DEFAULT_LEASE_TIMEOUT,
                 total=None, seed=None, new_id=None, clock=time.monotonic, on_event=None,
                 durable=False, max_workers=None, queue=None, max_backlog=DEFAULT_MAX_BACKLOG,
                 dedup_window=DEFAULT_DEDUP_WINDOW, wall_clock=time.time, retry_delay=0.0,
                 retry_delay_max=DEFAULT_RETRY_DELAY_MAX, rng=None):
        self.max_attempts = max_attempts
        self.durable = durable
        self.max_workers = max_workers
        self.lease_timeout = lease_timeout
        self.total = total
        self.queue = queue if queue is not None else \
            LocalQueue(total, MessageMaker(seed, new_id))
        self._clock = self.clock = clock
        # After its n-th failed attempt a message waits min(max, delay * 2^(n-1))
        # times a uniform factor in [0.5, 1] (seconds; PROTOCOL.md, "Retry delay").
        self.retry_delay = retry_delay
        self.retry_delay_max = retry_delay_max
        self._rng = rng or random.Random()
        self._on_event = on_event  # on_event(kind, message, session), under the lock
        # (The done and dead lines of a queue that confirms them elsewhere are its own.)
        self._on_settled = None if self.queue.traces_settled else on_event
        self._bounded = self.queue.bounds_leases  # (see _bound_lease_locked)
        # (--source api: jobs' msg events; in a JobQueue, or a queue kept elsewhere)
        self.jobs = type(self.queue) is JobQueue or getattr(self.queue, "jobs", False)
        self.max_backlog = max_backlog
        self.dedup_window = dedup_window
        self._wall_clock = wall_clock  # (a key's expiry outlives a restart: Unix time)

        # `_lock` guards every field below it, and the queue's: the sessions
        # and free workers, the leases, the changes not yet saved, the flags
        # and the counters. Every method takes it; nothing
        # does I/O while holding it (log records and trace lines are queued
        # for threads of their own; the one system call is the shutdown()
        # that cuts an expired lease's stream, which does not block). Each
        # Condition below is named for what its waiters wait for, and each
        # wait is a `while not <that>:` loop in the method that waits:
        self._lock = threading.Lock()
        # a lease whose deadline the dispatch loop must watch (or a stop)
        self.lease_to_watch = threading.Condition(self._lock)
        # changes for the state writer to save (or a requeue, or a stop)
        self.changes_to_save = threading.Condition(self._lock)
        # changes on disk (--durable writes a batch and answers a report then)
        self.changes_saved = threading.Condition(self._lock)
        # the --total run has settled (each message done or dead, and saved)
        self.settled = threading.Condition(self._lock)
        # while draining: a worker no longer holds a batch
        self.worker_freed = threading.Condition(self._lock)
        # (and one per stream, Session.batch_ready: a batch for its writer)
        # [Unix second, done, dead] once a second for 5 minutes: the
        # dashboard's chart, sent whole to a page as it opens.
        self.history = collections.deque(maxlen=HISTORY_SECONDS)
        self._sessions = {}                       # token -> Session
        self._free_workers = collections.deque()  # Sessions, in the order they became free
        self._leases = {}                         # message id -> Batch holding it
        self._batches = collections.OrderedDict()  # number -> Batch in flight, by deadline
        self._dead_letters = []                   # (Message, failed_at) not yet saved
        self._unsaved = {}                        # `pending`: id -> JSON record, or None
        self._change_seq = 0                      # changes made so far
        self._saved_seq = 0                       # changes on disk so far
        self._writer_called = False               # wake_writer() since the last take
        self._writer_ended = False                # the state writer saves nothing more
        self._batch_number = 0
        self._session_number = 0
        self.stopping = False
        self.draining = False  # give out nothing more; busy workers may still report
        self.started_at = self.loop_beat = clock()  # loop_beat: the dispatch loop's last turn
        self.stop_counts = None  # (leased, waiting for a retry) when stop() began
        self.dispatched = self.done = self.dead = self.dead_saved = 0
        self.requeued = 0                         # dead letters brought back by `requeue`
        self.requeued_unsettled = 0               # of those, not settled again (not --durable)
        self.failed_by_reason = dict.fromkeys(FAILURE_REASONS, 0)  # failed attempts
        self.dead_by_reason = dict.fromkeys(FAILURE_REASONS, 0)    # dead letters, this run
        self.round_trips = [0] * (len(ROUND_TRIP_BUCKETS) + 1)  # batch dispatch -> report
        self.round_trip_sum = 0.0
        self.recent_dead = collections.deque(maxlen=20)  # for the dashboard
        self._done_times = collections.deque()    # (second, done count) for done_per_s
        # Jobs from producers (--source api):
        self._held = collections.deque()  # (change seq, [Job]) enqueued, not yet saved
        self._held_jobs = 0               # jobs in all those
        self._taken_seq = 0               # the changes the state writer has taken so far
        self._keys = {}                   # idempotency key -> (first id, expires: Unix s)
        self._key_expiry = collections.deque()  # (expires, key), in the order they expire
        self._unsaved_keys = {}           # key -> record of bucket `keys`, or None to delete
        self.enqueued = self.duplicates = 0
        self.refused = {"backlog full": 0, "stopping": 0, "not saved": 0}  # enqueues: 503s
        self.queue.bind(self, self._lock)

    # -- workers come and go ---------------------------------------------

    def connect(self, batchsize):
        """A new stream: a free worker. None while draining, stopping or full."""
        with self._lock:
            if self.stopping or self.draining:
                return None
            if self.max_workers is not None and len(self._sessions) >= self.max_workers:
                return None
            self._session_number += 1
            token = secrets.token_urlsafe(24)  # 192 random bits
            session = Session(token, self._session_number, batchsize, self._lock, self._clock())
            self._sessions[token] = session
            self._free_workers.append(session)
            self._assign_locked()
            return session

    def disconnect(self, session, reason="stream closed"):
        """The stream is gone: its lease ends now. Idempotent."""
        with self._lock:
            self._end_session_locked(session, reason)
            self._assign_locked()

    def _end_session_locked(self, session, reason):
        if session.closed:
            return
        session.closed = True
        session.close_reason = reason
        self._sessions.pop(session.token, None)
        try:
            self._free_workers.remove(session)
        except ValueError:
            pass
        batch = session.batch
        session.outbox = None
        if batch is None or (batch.writing and not batch.written):
            pass  # (a batch being written: batch_written() or batch_not_written() settles it)
        elif not batch.written:
            session.batch = None
            self._give_back_locked(batch)
        else:
            self._end_lease_locked(session, batch, reason)
        session.batch_ready.notify_all()

    def _end_lease_locked(self, session, batch, reason):
        """The worker holding `batch` died or hung: each message failed this attempt."""
        session.batch = None
        del self._batches[batch.number]
        if self.draining:
            self.worker_freed.notify_all()
        survivors = [m for m in batch.messages.values()
                     if not self._fail_locked(m, reason, session)]
        self.queue.put(survivors, BISECT)
        # (Told in the stream's one closing line.)
        session.end_note = "batch %d in flight: %d messages back in halves" % (
            batch.number, len(survivors))

    def _give_back_locked(self, batch):
        """A batch that was never written: its messages go back to the head
        of the line, their attempt counts as they were (PROTOCOL.md rule 3)."""
        messages = list(batch.messages.values())
        for message in messages:
            del self._leases[message.id]
            message.attempts -= 1
        self._save_locked(messages, "waiting")
        self.queue.put(messages, FIRST_HALF if batch.half else FIRST)

    # -- the dispatch loop -------------------------------------------------

    def run(self):
        """The dispatch loop: expire leases at their deadlines, and give the
        messages they free to the free workers."""
        with self._lock:
            while not self.stopping:
                self.loop_beat = self._clock()
                second = int(self._wall_clock())
                if not self.history or self.history[-1][0] != second:
                    self.history.append([second, self.done, self.dead])
                self._expire_leases_locked()
                self._assign_locked()
                wait = self._until_next_deadline_locked()
                due = self.queue.next_due()
                if due is not None:  # (a message waiting for its retry delay, or its delay_ms)
                    due = max(0.0, due - self._clock())
                    wait = due if wait is None else min(wait, due)
                # (At least once a second: /healthz tells a stuck loop by its beat.)
                self.lease_to_watch.wait(1.0 if wait is None else min(wait, 1.0))

    def dispatch_once(self):
        """One turn of the loop, without waiting (for tests)."""
        with self._lock:
            self._expire_leases_locked()
            self._assign_locked()

    def _until_next_deadline_locked(self):
        if not self._batches:
            return None
        oldest = next(iter(self._batches.values()))  # (in deadline order: see touch())
        return max(0.0, oldest.deadline - self._clock())

    def _expire_leases_locked(self):
        now = self._clock()
        while self._batches:
            batch = next(iter(self._batches.values()))
            if batch.deadline > now:
                break
            self._expire_locked(batch, now)

    def _expire_locked(self, batch, now):
        session = batch.session
        log.warning("%s: lease of batch %d expired after %.1f s (%d touches): closing its "
                    "stream", session.name, batch.number, now - batch.started, batch.touches)
        # Close the stream first, then offer the messages again.
        if session.channel is not None:
            session.channel.close(reason="lease expired")
        self._end_session_locked(session, "lease expired")

    def _assign_locked(self, caller=None):
        """Give batches to free workers while there are messages (none once
        the broker stops).

        The batch of `caller` (a reporting session) is returned instead of put
        in its outbox: the report's thread writes it, saving a thread hop.
        """
        taken = None
        free_workers, take = self._free_workers, self.queue.take
        while free_workers and not (self.stopping or self.draining):
            messages, half = take(free_workers[0].batchsize)
            if not messages:
                break
            session = free_workers.popleft()
            self._batch_number += 1
            batch = Batch(self._batch_number, session, half)
            self._reserve_locked(batch, messages)
            batch.saved_seq = self._change_seq
            session.batch = batch
            if session is caller:
                taken = batch
            else:
                session.outbox = batch
                session.batch_ready.notify()
        return taken

    def _reserve_locked(self, batch, messages):
        """Lease `messages` to `batch`: this delivery is an attempt of each.
        (A batch at once, as the saves and hooks below: a call a message
        cost the dispatcher a third of its bytecodes.)"""
        number = batch.number
        for message in messages:
            message.attempts += 1
            message.batch = number
        batch.messages = {message.id: message for message in messages}
        self._leases.update(dict.fromkeys(batch.messages, batch))
        self._save_locked(messages, "leased")

    # -- stream writers ---------------------------------------------------

    def wait_for_batch(self, session, timeout):
        """The batch to write on this stream, or None (closed, stopping, timeout,
        or the stream is to end: see `stream_ends`)."""
        with self._lock:
            deadline = self._clock() + timeout
            while session.outbox is None and not session.closed and not self.stopping \
                    and not self._stream_ends_locked(session):
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                session.batch_ready.wait(remaining)
            batch, session.outbox = session.outbox, None
            return None if session.closed or self.stopping else batch

    def stream_ends(self, session):
        """Why this stream is to say bye and end now, or None: the broker
        stops or drains and the worker holds no batch (`shutdown`), or its
        worker reported its last batch (`last batch reported`)."""
        with self._lock:
            return self._stream_ends_locked(session)

    def _stream_ends_locked(self, session):
        if self.stopping:
            return "shutdown"
        if session.batch is not None:
            return None
        if self.draining:
            return "shutdown"
        return "last batch reported" if session.leaving else None

    def hand_to_stream(self, session, batch):
        """A report's thread will not write `batch` (its lease is not saved in
        time): the stream's own thread takes it, and the session lives on."""
        with self._lock:
            if session.batch is batch and not batch.writing and not session.closed:
                session.outbox = batch
                session.batch_ready.notify()

    def begin_write(self, session, batch):
        """The batch's bytes are about to go out; False if it is no longer
        this stream's to write (the stream ended, or the broker stopped)."""
        with self._lock:
            if session.batch is not batch or session.closed or batch.written:
                return False
            batch.writing = True
            return True

    def batch_written(self, session, batch):
        """The batch's bytes are in the socket in full: its lease starts now."""
        with self._lock:
            if session.batch is batch and not batch.written:
                self._start_lease_locked(batch)
                if session.closed:  # the stream ended while the bytes went out
                    self._end_lease_locked(session, batch, session.close_reason)
                    self._assign_locked()

    def _start_lease_locked(self, batch):
        batch.written = True
        batch.started = now = self._clock()
        batch.deadline = now + self.lease_timeout
        if self._bounded:
            self._bound_lease_locked(batch)
        self.dispatched += len(batch.messages)
        if not self._batches:
            self.lease_to_watch.notify()  # the loop may be waiting with no deadline
        # In the order leases started: by deadline. (A bounded one may end
        # sooner, rarely: then it expires with the ones before it, and a
        # report or touch after its deadline is refused all the same.)
        self._batches[batch.number] = batch
        if self._on_event:
            for message in batch.messages.values():
                self._on_event("lease", message, batch.session)

    def _bound_lease_locked(self, batch):
        """A queue kept elsewhere gives the messages to another broker after
        a time of its own: no lease here outlasts what it vouches for."""
        bound = self.queue.lease_bound(batch.messages.values())
        if bound is not None and bound < batch.deadline:
            batch.deadline = bound

    def batch_not_written(self, session, batch, reason):
        """The batch could not be written (or its client had gone): it never
        started. Its messages go back uncharged, and the stream is closed."""
        with self._lock:
            if session.batch is batch and not batch.written:
                session.end_note = "batch %d not delivered (%s): %d messages back, uncharged" % (
                    batch.number, reason, len(batch.messages))
                batch.writing = False
                if session.closed:  # it ended meanwhile and left the batch to us
                    session.batch = None
                    self._give_back_locked(batch)
            if session.channel is not None:
                session.channel.close()
            self._end_session_locked(session, reason)
            self._assign_locked()

    # -- reports ------------------------------------------------------------

    def report(self, token, batch_number, ids, last=False, failures=None):
        """Settle a worker's batch: `ids` done, the rest failed this attempt,
        those in `failures` ({id: Failure}) with their error, the others not
        reported. `last`: the worker takes no next batch; its stream ends.

        Returns (the answer, what to wait for before answering: a ticket for
        `wait_reported`, and the worker's next batch, for the caller to write
        on its stream, or None).
        """
        with self._lock:
            session, batch = self._batch_in_flight_locked(token, batch_number)
            # (Set operations in C: 0.5 µs for a batch of 10, 0.66 µs in a Python loop.)
            done_ids = batch.messages.keys() & ids
            ignored = [] if len(done_ids) == len(ids) else \
                [i for i in dict.fromkeys(ids) if i not in batch.messages]  # (in order, once each)
            if failures:
                ignored += [i for i in failures if i not in batch.messages]
            retried = dead = 0
            round_trip = self._clock() - batch.started
            self.round_trip_sum += round_trip
            self.round_trips[bisect.bisect_left(ROUND_TRIP_BUCKETS, round_trip)] += 1
            self.done += len(done_ids)
            leases, messages = self._leases, batch.messages
            for message_id in messages:
                del leases[message_id]
            if len(done_ids) == len(messages):
                done, failed = list(messages.values()), ()
            else:
                done = [m for m in messages.values() if m.id in done_ids]
                failed = [m for m in messages.values() if m.id not in done_ids]
            tickets = []  # (what the queue has confirmed elsewhere, if it does)
            self._save_locked(done, "done")
            self.queue.settled(done, "done", session, None, tickets)
            if self._on_settled:
                for message in done:
                    self._on_settled("done", message, session)
            if failed and failures:
                survivors = [m for m in failed if not self._fail_reported_locked(
                    m, failures.get(m.id), session, tickets)]
                self.queue.put(survivors, RETRY)
                retried, dead = len(survivors), len(failed) - len(survivors)
            elif failed:
                survivors = [m for m in failed if not self._fail_locked(
                    m, "not reported", session, leased=False, tickets=tickets)]
                self.queue.put(survivors, RETRY)
                retried, dead = len(survivors), len(failed) - len(survivors)
            self._count_done_locked(len(done_ids))
            session.batch = session.outbox = None
            del self._batches[batch.number]
            session.batches_done += 1
            next_batch = None
            if last or self.draining:
                session.leaving = session.leaving or last
                session.batch_ready.notify()  # its writer says bye and ends the stream
                self.worker_freed.notify_all()  # (a drain waits for the last reports)
            else:
                self._free_workers.append(session)
                next_batch = self._assign_locked(caller=session)
            self._notify_if_settled_locked()
            result = {"batch": batch.number, "done": len(done_ids), "retried": retried,
                      "dead": dead, "ignored": ignored}
            return result, (self._change_seq, tickets), next_batch

    def _batch_in_flight_locked(self, token, batch_number):
        """The session and batch a report or a touch names; ReportError (404:
        no such stream, 409: not its batch in flight) otherwise."""
        session = self._sessions.get(token)
        if session is None:
            raise ReportError(404, "unknown worker token (never issued, or its stream closed)")
        batch = session.batch
        if batch is None or batch.number != batch_number:
            raise ReportError(409, "batch %d is not in flight for this worker" % batch_number)
        if not batch.written:  # its writer has not said so yet: the bytes did leave
            self._start_lease_locked(batch)
        else:
            now = self._clock()
            if batch.deadline <= now:  # (a broker that stalled: its loop has not seen it yet)
                self._expire_locked(batch, now)
                self._assign_locked()
                raise ReportError(409, "the lease of batch %d has expired" % batch_number)
        return session, batch

    def touch(self, token, batch_number):
        """The worker is still at its batch: the lease runs a whole lease
        timeout from now. ReportError (404, 409) as for a report.

        Returns (the lease in ms, or None: the queue must confirm the touch
        elsewhere first (wait_reported on the ticket, then touch_confirmed
        with the ticket's time), ticket)."""
        with self._lock:
            _session, batch = self._batch_in_flight_locked(token, batch_number)
            tickets, sent_at = [], self._clock()
            self.queue.touched(batch.messages.values(), tickets)
            if tickets:
                return None, (self._change_seq, tickets), sent_at
            self._extend_locked(batch, sent_at)
            return int(self.lease_timeout * 1000), None, sent_at

    def touch_confirmed(self, token, batch_number, sent_at):
        """The queue confirmed the touch sent at `sent_at`: the lease runs a
        lease timeout from then. Returns the lease in ms; ReportError as for
        a report (the batch may have been settled, or expired, meanwhile)."""
        with self._lock:
            _session, batch = self._batch_in_flight_locked(token, batch_number)
            self._extend_locked(batch, sent_at)
            return int(self.lease_timeout * 1000)

    def _extend_locked(self, batch, since):
        batch.deadline = since + self.lease_timeout
        if self._bounded:
            self._bound_lease_locked(batch)
        self._batches.move_to_end(batch.number)  # (the latest deadline: still in order)
        batch.touches += 1

    def _fail_reported_locked(self, message, failure, session, tickets):
        """A message of a report: in its `failed` list (`failure`), or not reported."""
        if failure is None:
            return self._fail_locked(message, "not reported", session, leased=False,
                                     tickets=tickets)
        message.retry_in_ms = failure.retry_in_ms  # (for the retry delay)
        return self._fail_locked(message, "failed", session, leased=False, tickets=tickets,
                                 error=failure.error, final=failure.final)

    def _fail_locked(self, message, reason, session, leased=True, tickets=None, error=None,
                     final=False):
        """A failed attempt: dead-letter it (True), or leave it to the caller
        to put back in the queue (False). `tickets`: see LocalQueue.settled.
        `error`: the attempt's error text (kept with the message, None for
        none); `final`: dead-letter it whatever its attempts."""
        if leased:
            del self._leases[message.id]
        message.reason = reason
        if error is not None or getattr(message, "error", None) is not None:
            message.error = error  # (the last attempt's: none when it was not reported)
        self.failed_by_reason[reason] = self.failed_by_reason.get(reason, 0) + 1
        if final or message.attempts >= self.max_attempts:
            self.dead += 1
            self.dead_by_reason[reason] = self.dead_by_reason.get(reason, 0) + 1
            failed_at = _rfc3339_now()
            self._dead_letters.append((message, failed_at))
            self.recent_dead.append(dead_letter_record(message, failed_at))
            self._save_locked([message], "dead")
            self.queue.settled([message], "dead", session, failed_at, tickets)
            if self._on_settled:
                self._on_settled("dead", message, session)
            log.debug("dead letter %s after %d attempts (%s)", message.id, message.attempts,
                      reason)
            return True
        self._delay_locked(message)
        self._save_locked([message], "waiting")
        if self._on_event:
            self._on_event("failed", message, session)
        return False

    def _delay_locked(self, message):
        """A failed attempt's wait before the next: the worker's wish
        (`retry_in_ms`, capped) or the backoff of --retry-delay; `due` set."""
        wish = getattr(message, "retry_in_ms", None)
        if wish is not None:
            message.retry_in_ms = None  # (this attempt's only)
            delay = min(wish / 1000.0, self.retry_delay_max)
        elif self.retry_delay > 0:
            delay = min(self.retry_delay_max,
                        self.retry_delay * 2 ** (message.attempts - 1)) * \
                self._rng.uniform(0.5, 1.0)
        else:
            delay = 0.0
        if delay > 0:
            message.due = self._clock() + delay
        elif getattr(message, "due", 0.0):
            message.due = 0.0

    def _count_done_locked(self, count):
        second = int(self._clock())
        if self._done_times and self._done_times[-1][0] == second:
            self._done_times[-1][1] += count
        else:
            self._done_times.append([second, count])
        while self._done_times and self._done_times[0][0] < second - 10:
            self._done_times.popleft()

    # -- saving state -----------------------------------------------------------

    def _save_locked(self, messages, state):
        """Record a change of `messages` for the state writer: dead letters
        always; with --durable, every message's state too (`leased`,
        `waiting`, or gone once `done` or `dead`)."""
        if self.durable:
            if state in ("done", "dead"):
                self._unsaved.update(dict.fromkeys([m.id for m in messages]))
            elif state == "leased":
                self._unsaved.update({m.id: pending_record_json(m, True) for m in messages})
            else:  # (waiting: its due time too, as Unix time, for a restart)
                now, wall = self._clock(), self._wall_clock()
                self._unsaved.update({m.id: pending_record_json(
                    m, False, round(wall + m.due - now, 3) if getattr(m, "due", 0.0) > now
                    else None) for m in messages})
        elif state in ("done", "dead"):
            # Dead letters brought back and settled again leave `pending`
            # in the same commit.
            settled_again = [m.id for m in messages if m.requeued]
            self.requeued_unsettled -= len(settled_again)
            if state == "done" and not settled_again:
                return
            self._unsaved.update(dict.fromkeys(settled_again))
        else:
            return
        self._change_seq += 1
        self.changes_to_save.notify()

    def take_changes(self, timeout):
        """Wait (up to `timeout`, or until wake_writer) for changes to save,
        and take them all; None if there are none."""
        with self._lock:
            deadline = self._clock() + timeout
            while self._change_seq == self._saved_seq and not self._writer_called:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                self.changes_to_save.wait(remaining)
            self._writer_called = False
            if self._key_expiry:
                self._expired_keys_locked()
            if self._change_seq == self._saved_seq and not self._unsaved_keys:
                return None
            changes = Changes(self._change_seq, self._unsaved, self._dead_letters,
                              (self.queue.generated, self.done, self.dead, self.requeued)
                              if self.durable else None, self._unsaved_keys)
            self._unsaved, self._dead_letters, self._unsaved_keys = {}, [], {}
            self._taken_seq = self._change_seq
            return changes

    def changes_written(self, changes, ok):
        """The writer saved `changes` (ok), or failed and gives them back."""
        with self._lock:
            if ok:
                self._saved_seq = max(self._saved_seq, changes.seq)
                self.dead_saved += len(changes.dead_letters)
                self.changes_saved.notify_all()
                if self._held:
                    self._release_held_locked()
            else:
                for message_id, record in changes.pending.items():
                    self._unsaved.setdefault(message_id, record)  # newer ones win
                for key, record in changes.keys.items():
                    self._unsaved_keys.setdefault(key, record)
                self._dead_letters[:0] = changes.dead_letters
                self._taken_seq = self._saved_seq
            self._notify_if_settled_locked()

    def wait_reported(self, ticket, timeout):
        """A report's outcome (`ticket`, from report()) is kept for good:
        with --durable, once on disk; with a queue kept elsewhere, once it
        confirmed it; True at once otherwise. False on timeout."""
        # (Not cut short by the stop: a drain's last reports are answered 200
        # once saved, and the state writer goes on saving after the stop.)
        seq, tickets = ticket
        if self.durable and not self.wait_saved(seq, timeout, until_stop=False):
            return False
        return not tickets or self.queue.wait_confirmed(tickets, timeout)

    def wait_saved(self, seq, timeout, until_stop=True):
        """Wait until change `seq` is on disk; False on timeout, or once the
        state writer has ended (or, `until_stop`, once the broker stops)."""
        with self._lock:
            deadline = self._clock() + timeout
            while self._saved_seq < seq and not self._writer_ended and \
                    not (until_stop and self.stopping):
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return False
                self.changes_saved.wait(remaining)
            return self._saved_seq >= seq

    def requeue(self, records, counted=False):
        """Dead letters brought back by `broker.py requeue`: first in line,
        with their attempts reset. (`counted`: the `requeued` counter that
        restore() read counts them already.)"""
        with self._lock:
            messages = [message_from_record(record, requeued=True) for record in records]
            self.queue.put(messages, FIRST)
            self._save_locked(messages, "waiting")
            if not self.durable:  # (with it, every unsettled message stays in the db)
                self.requeued_unsettled += len(messages)
            if not counted:
                self.requeued += len(records)
            self._forget_dead_locked({record["id"] for record in records})
            self._assign_locked()

    def forget_dead(self, ids):
        """Dead letters deleted: no longer among the latest shown."""
        with self._lock:
            self._forget_dead_locked(set(ids))

    def _forget_dead_locked(self, ids):
        if any(d["id"] in ids for d in self.recent_dead):
            kept = [d for d in self.recent_dead if d["id"] not in ids]
            self.recent_dead.clear()
            self.recent_dead.extend(kept)

    def restore(self, records, counters):
        """--durable: take back the state a previous run saved.

        A message that was leased when that run ended failed that attempt:
        its stream closed with the broker.
        """
        with self._lock:
            if counters is not None:
                self.queue.generated, self.done, self.dead, self.requeued = counters
                self.dead_saved = self.dead
            waiting = []
            now, wall = self._clock(), self._wall_clock()
            for record in records:
                message = message_from_record(record)
                message.attempts = record["attempts"]
                message.reason = record.get("reason")
                if record.get("not_before") is not None:  # (still waiting for its delay)
                    message.due = now + max(0.0, record["not_before"] - wall)
                if not record.get("in_flight") or \
                        not self._fail_locked(message, "stream closed", None, leased=False):
                    waiting.append(message)
            self.queue.put(waiting, RETRY)
            self.lease_to_watch.notify()

    # -- jobs from producers (--source api) -----------------------------------

    def count_enqueue(self, enqueued, duplicates, refused=None):
        """(For the figures) an enqueue a queue kept elsewhere took, or refused."""
        with self._lock:
            self.enqueued += enqueued
            self.duplicates += duplicates
            if refused is not None:
                self.refused[refused] = self.refused.get(refused, 0) + 1

    def enqueue(self, jobs):
        """POST /enqueue: `jobs` (Jobs, ids given) into the queue, all or
        none. A job whose key is remembered (or taken by an earlier job of
        the same request) is a duplicate: not enqueued, its id the first's.
        ReportError(503) while stopping or when the backlog would exceed
        --max-backlog. Returns (ids, indexes of duplicates, and the ticket
        to wait for: the jobs are given out, and the answer may be 200,
        once they are saved; see cancel_enqueue)."""
        with self._lock:
            if self.stopping or self.draining:
                self.refused["stopping"] += 1
                raise ReportError(503, "the broker is stopping")
            now = self._wall_clock()
            ids, duplicates, fresh, taken = [], [], [], {}
            for index, job in enumerate(jobs):
                key = job.key
                if key is not None:
                    first = taken.get(key) or self._live_key_locked(key, now)
                    if first is not None:
                        ids.append(first)
                        duplicates.append(index)
                        continue
                    taken[key] = job.id
                ids.append(job.id)
                fresh.append(job)
            if self.queue.waiting() + self._held_jobs + len(fresh) > self.max_backlog:
                self.refused["backlog full"] += 1
                raise ReportError(503, "the backlog is full (--max-backlog %d jobs wait)"
                                  % self.max_backlog)
            expires = now + self.dedup_window
            for key, message_id in taken.items():
                self._keys[key] = (message_id, expires)
                self._key_expiry.append((expires, key))
                self._unsaved_keys[key] = {"id": message_id, "expires": round(expires, 3)}
            self.enqueued += len(fresh)
            self.duplicates += len(duplicates)
            self._save_locked(fresh, "waiting")
            if not fresh:
                return ids, duplicates, (self._saved_seq, [])
            self._held.append((self._change_seq, fresh))
            self._held_jobs += len(fresh)
            return ids, duplicates, (self._change_seq, [])

    def _live_key_locked(self, key, now):
        first = self._keys.get(key)
        return first[0] if first is not None and first[1] > now else None

    def cancel_enqueue(self, ticket):
        """The enqueue of `ticket` was not saved in time: True if it was
        saved after all (the answer is 200). Else (the answer is 503) its
        jobs are dropped, unless the state writer has taken them already:
        then they are enqueued once that commit succeeds."""
        seq = ticket[0]
        with self._lock:
            if seq <= self._saved_seq:
                return True
            self.refused["not saved"] += 1
            if seq <= self._taken_seq:
                return False
            for i, (held_seq, jobs) in enumerate(self._held):
                if held_seq == seq:
                    del self._held[i]
                    self._held_jobs -= len(jobs)
                    for job in jobs:
                        self._unsaved.pop(job.id, None)
                        if job.key is not None and self._keys.get(job.key, ("",))[0] == job.id:
                            del self._keys[job.key]
                            self._unsaved_keys.pop(job.key, None)
                    self.enqueued -= len(jobs)
                    return False
            return False

    def _release_held_locked(self):
        """Enqueued jobs now saved: into the queue, and out to free workers."""
        released = False
        while self._held and self._held[0][0] <= self._saved_seq:
            _seq, jobs = self._held.popleft()
            self._held_jobs -= len(jobs)
            self.queue.put(jobs, NEW)
            released = True
        if released:
            self._assign_locked()

    def _expired_keys_locked(self):
        """Keys past their window: forgotten, and deleted from the db in the
        commit that passes by."""
        now, expiry, keys = self._wall_clock(), self._key_expiry, self._keys
        while expiry and expiry[0][0] <= now:
            expires, key = expiry.popleft()
            first = keys.get(key)
            if first is not None and first[1] <= now:
                del keys[key]
                self._unsaved_keys[key] = None

    def restore_keys(self, records):
        """The keys a run before saved (bucket `keys`): {key: (id, expires)}."""
        with self._lock:
            for key, (message_id, expires) in sorted(records.items(), key=lambda r: r[1][1]):
                self._keys[key] = (message_id, expires)
                self._key_expiry.append((expires, key))

    # -- for a queue kept elsewhere, from its own thread ---------------------

    def free_capacity(self):
        """Messages the free workers would take now (0 while draining or stopping)."""
        with self._lock:
            if self.stopping or self.draining:
                return 0
            return sum(session.batchsize for session in self._free_workers)

    def give_out(self):
        """The queue has messages for the free workers: give them batches
        now. True if free workers still wait for more."""
        with self._lock:
            self._assign_locked()
            return bool(self._free_workers) and not (self.stopping or self.draining)

    def dead_on_arrival(self, messages):
        """Messages delivered again after their last attempt (the broker that
        held it died, and the queue's own lease ran out): dead here, as that
        broker would have made them."""
        with self._lock:
            for message in messages:
                message.attempts, message.batch = self.max_attempts, 0
                self._fail_locked(message, "lease expired", None, leased=False)

    def check_settled(self):
        """The queue says a --total run may be over: wake who waits for that."""
        with self._lock:
            self._notify_if_settled_locked()

    # -- the run as a whole --------------------------------------------------

    def settled_locked(self):
        return (self.total is not None and self._saved_seq == self._change_seq
                and self.queue.run_settled(self.done + self.dead_saved - self.requeued))

    def _notify_if_settled_locked(self):
        # Only then: the main thread waits on `settled`, and a notify per
        # report cost a wake-up of it each time (8 µs of CPU a notify with
        # a waiter against none, on one core, the notifier letting go of
        # the GIL after each as a report's I/O does: about 5% of a report).
        if self.settled_locked():
            self.settled.notify_all()

    def wait_until_settled(self, timeout):
        """Wait (up to `timeout`) for a --total run to settle; True if it has."""
        with self._lock:
            deadline = self._clock() + timeout
            while not self.settled_locked() and not self.stopping:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                self.settled.wait(remaining)
            return self.settled_locked()

    def writer_ended(self):
        """The state writer has ended: nothing more will be saved."""
        with self._lock:
            self._writer_ended = True
            self.changes_saved.notify_all()

    def wake_writer(self):
        """The state writer has something else to do (a requeue, the stop)."""
        with self._lock:
            self._writer_called = True
            self.changes_to_save.notify_all()

    def stop_leasing(self):
        """From a signal handler, before it returns: give out nothing more
        from this moment (PROTOCOL.md, "Graceful stop"); drain() does the rest.
        (Without the lock, which the main thread, interrupted by the signal,
        may hold: one flag, set once, that every assignment reads under it.)"""
        self.draining = True

    def drain(self):
        """The first step of a graceful stop: give out nothing more (batches
        assigned but not yet written go back uncharged), end the streams of
        free workers, and let busy ones report. Returns (batches, messages)
        leased or being written now."""
        with self._lock:
            self.draining = True
            self._take_back_unwritten_locked()
            self._free_workers.clear()
            for session in self._sessions.values():
                session.batch_ready.notify_all()
            busy = [s.batch for s in self._sessions.values() if s.batch is not None]
            return len(busy), sum(len(b.messages) for b in busy)

    def wait_drained(self, timeout):
        """Wait (up to `timeout`) until no worker holds a batch; True then."""
        with self._lock:
            deadline = self._clock() + timeout
            while not self._drained_locked():
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return False
                self.worker_freed.wait(remaining)
            return True

    def _drained_locked(self):
        return not any(s.batch is not None for s in self._sessions.values())

    def _take_back_unwritten_locked(self):
        for session in self._sessions.values():
            batch = session.batch  # (one being written is on the wire already)
            if batch is not None and not batch.written and not batch.writing:
                session.batch = session.outbox = None
                self._give_back_locked(batch)

    def stop(self):
        """Lease nothing more: batches assigned but not yet written go back
        uncharged, and every waiter wakes to see `stopping`."""
        with self._lock:
            self.stopping = True
            self._take_back_unwritten_locked()
            self.stop_counts = (len(self._leases), self.queue.waiting())
            self.lease_to_watch.notify_all()
            self.changes_to_save.notify_all()
            self.changes_saved.notify_all()
            self.settled.notify_all()
            self.worker_freed.notify_all()
            for session in self._sessions.values():
                session.batch_ready.notify_all()

    def history_now(self):
        """(The dashboard's chart) the last 5 minutes, a sample a second."""
        with self._lock:
            return list(self.history)

    def figures(self):
        """The figures of the run, copied under the lock in one go (a Figures)."""
        with self._lock:
            return Figures(self, self._clock())

    # -- for the invariant tests ---------------------------------------------

    def snapshot(self):
        """Copies of the state, for tests that check invariants."""
        with self._lock:
            halves, retry = self.queue.snapshot()
            waiting = [m for half in halves for m in half] + retry
            return {
                "leases": {mid: (b.session.token, b.number) for mid, b in self._leases.items()
                           if b.written},
                "assigned": {mid: (b.session.token, b.number)
                             for mid, b in self._leases.items() if not b.written},
                "retry": [m.id for m in waiting],
                "due": {m.id: m.due for m in waiting if getattr(m, "due", 0.0)},
                "halves": [[m.id for m in half] for half in halves],
                "attempts": dict([(m.id, m.attempts) for m in waiting] + [
                    (mid, b.messages[mid].attempts) for mid, b in self._leases.items()]),
                "free": [s.token for s in self._free_workers],
                "sessions": {t: (s.batch.number if s.batch else None)
                             for t, s in self._sessions.items()},
            }


# ---------------------------------------------------------------------------
# Figures: what the run shows (/stats, /metrics, the dashboard, the log)
# ---------------------------------------------------------------------------

class Figures:
    """What /stats, /metrics, the dashboard and the log lines show: a copy of
    the Dispatcher's counters, taken under its lock (`Dispatcher.figures()`),
    read without it."""

    def __init__(self, dispatcher, now):  # (under the dispatcher's lock)
        d = dispatcher
        self.wall_time = d._wall_clock()
        self.uptime_s = now - d.started_at
        self.total, self.requeued = d.total, d.requeued
        self.generated, self.dispatched, self.done, self.dead = (
            d.queue.generated, d.dispatched, d.done, d.dead)
        self.delayed = d.queue.delayed()
        self.retrying = d.queue.waiting() - self.delayed
        self.in_flight = len(d._leases)
        self.workers = len(d._sessions)
        self.workers_detail = [
            {"worker": s.name, "batchsize": s.batchsize, "batches_done": s.batches_done,
             "batch_age_s": None if s.batch is None else  # (0: assigned, not yet written)
             round(now - s.batch.started, 3) if s.batch.started is not None else 0.0}
            for s in d._sessions.values()]
        self.busy_workers = sum(1 for s in d._sessions.values() if s.batch is not None)
        second = int(now)
        recent = sum(count for when, count in d._done_times if when >= second - 10)
        self.done_per_s = recent / min(10.0, max(now - d.started_at, 1e-9))
        self.failed_by_reason = dict(d.failed_by_reason)
        self.dead_by_reason = dict(d.dead_by_reason)
        self.round_trips, self.round_trip_sum = list(d.round_trips), d.round_trip_sum
        self.recent_dead = list(d.recent_dead)
        self.unsaved_changes = d._change_seq - d._saved_seq
        self.unsaved_dead_letters = d.dead - d.dead_saved
        self.requeued_unsettled = d.requeued_unsettled  # (counted without --durable)
        self.jobs = d.jobs  # (--source api)
        if self.jobs:
            self.retrying = d.queue.retrying()
            self.backlog = d.queue.waiting() + d._held_jobs if type(d.queue) is JobQueue \
                else d.queue.jobs_waiting  # (JetStream's count, as last read)
            self.enqueued, self.duplicates = d.enqueued, d.duplicates
            self.refused = dict(d.refused)

    def unsettled(self):
        """Messages generated (or requeued) and neither done nor dead."""
        return self.in_flight + self.retrying + self.delayed

    def stats(self):
        """GET /stats (PROTOCOL.md)."""
        stats = {"uptime_s": round(self.uptime_s, 3), "generated": self.generated,
                 "dispatched": self.dispatched, "done": self.done, "dead": self.dead,
                 "retrying": self.retrying, "delayed": self.delayed,
                 "in_flight": self.in_flight, "workers": self.workers, "busy_workers": self.busy_workers,
                 "done_per_s": round(self.done_per_s, 3)}
        if self.jobs:
            stats.update(enqueued=self.enqueued, duplicates=self.duplicates,
                         backlog=self.backlog, refused=self.refused)
        return stats

    def dashboard(self):
        """The dashboard's `stats` event: /stats, the workers, the latest dead
        letters, the dead by reason, and the time (for the chart)."""
        return dict(self.stats(), workers_detail=self.workers_detail,
                    recent_dead=self.recent_dead, total=self.total, requeued=self.requeued,
                    dead_by_reason=self.dead_by_reason, time=int(self.wall_time))

    def dead_reasons(self):
        """' (3 stream closed, 1 not reported)': this run's dead letters by reason."""
        by_reason = ", ".join("%d %s" % (count, reason)
                              for reason, count in self.dead_by_reason.items() if count)
        return " (%s)" % by_reason if by_reason else ""


# ---------------------------------------------------------------------------
# The bbolt file: dead letters, and with --durable every unsettled message
# ---------------------------------------------------------------------------

class RecordError(ValueError):
    """A record in the db that is not what the broker writes there."""


def _is_int(value, low, high=None):
    return type(value) is int and value >= low and (high is None or value <= high)


def parse_record(bucket, key, raw):
    """The record stored under `key` in `bucket` (failed or pending),
    checked for the shape the broker writes; RecordError if it is not."""
    where = "bucket %r, key %r" % (bucket.decode(), key.decode("utf-8", "replace"))
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RecordError("%s: not a JSON record" % where) from None
    if not isinstance(record, dict):
        raise RecordError("%s: not a JSON object" % where)
    problems = []
    if not isinstance(record.get("id"), str) or record["id"].encode("utf-8") != key:
        problems.append("its id is not its key")
    elif not XID_PATTERN.fullmatch(record["id"]):
        problems.append("its id is not an xid")
    if not _is_int(record.get("period"), MIN_PERIOD_MS, MAX_PERIOD_MS) and not (
            record.get("period") is None and "payload" in record):
        problems.append("period is not an integer in %d..%d" % (MIN_PERIOD_MS, MAX_PERIOD_MS))
    if record.get("key") is not None and not isinstance(record["key"], str):
        problems.append("key is not text")
    if not _is_int(record.get("attempts"), 0):
        problems.append("attempts is not a non-negative integer")
    if record.get("reason") is not None and not isinstance(record["reason"], str):
        problems.append("reason is not text")
    if record.get("error") is not None and not isinstance(record["error"], str):
        problems.append("error is not text")
    if record.get("not_before") is not None and (
            type(record["not_before"]) not in (int, float) or not record["not_before"] >= 0):
        problems.append("not_before is not a time")
    if bucket == PENDING_BUCKET and not isinstance(record.get("in_flight"), bool):
        problems.append("in_flight is not true or false")
    if not isinstance(record.get("requeued", False), bool):
        problems.append("requeued is not true or false")
    if problems:
        raise RecordError("%s: %s" % (where, "; ".join(problems)))
    return record


def load_state(db):
    """What a broker starting on `db` takes back, every record checked
    first (RecordError names the first bad one, and nothing is changed):
    the dead letters requeued by an older broker.py (OLD_REQUEUE_BUCKET),
    the pending records, and the --durable counters (None if there are none)."""
    with db.view() as tx:
        found = {}
        for name in (OLD_REQUEUE_BUCKET, PENDING_BUCKET):
            bucket = tx.bucket(name)
            found[name] = [parse_record(name, key, value) for key, value in bucket.items()] \
                if bucket is not None else []
        state = tx.bucket(STATE_BUCKET)
        counters = None
        if state is not None:
            values = []
            for key in _COUNTER_KEYS:
                raw = state.get(key) or b"0"
                if not re.fullmatch(rb"[0-9]{1,19}", raw):
                    raise RecordError("bucket 'state', key %r: %r is not a count"
                                      % (key.decode(), raw[:40]))
                values.append(int(raw))
            counters = tuple(values)
    return found[OLD_REQUEUE_BUCKET], found[PENDING_BUCKET], counters


def load_keys(db):
    """The idempotency keys a run before saved: {key: (id, expires)}; a
    record that is not one is skipped, and said in the log."""
    keys = {}
    with db.view() as tx:
        bucket = tx.bucket(KEYS_BUCKET)
        for raw_key, raw in bucket.items() if bucket is not None else ():
            try:
                record = json.loads(raw.decode("utf-8"))
                keys[raw_key.decode("utf-8")] = (record["id"], float(record["expires"]))
            except (UnicodeDecodeError, ValueError, KeyError, TypeError):
                log.warning("bucket 'keys', key %r: not a key's record (skipped)", raw_key[:80])
    return keys


def count_pending(db):
    """How many messages a --durable run left unsettled in `db`."""
    with db.view() as tx:
        pending = tx.bucket(PENDING_BUCKET)
        return sum(1 for _ in pending.items()) if pending is not None else 0


class RequeueError(Exception):
    """A live requeue that could not be done; nothing changed."""


def delete_dead_letters(failed, ids):
    """Delete dead letters `ids` (None: all) from the bucket `failed` (or
    None) of a transaction: (the ids deleted, the ids that were not there)."""
    if failed is None:
        return [], [] if ids is None else list(dict.fromkeys(ids))
    keys = [k for k, _v in failed.items()] if ids is None else \
        list(dict.fromkeys(i.encode("utf-8") for i in ids))
    deleted, missing = [], []
    for key in keys:
        if failed.get(key) is None:
            missing.append(key.decode("utf-8", "replace"))
        else:
            failed.delete(key)
            deleted.append(key.decode("utf-8", "replace"))
    return deleted, missing


class RequeueRequest:
    """One POST /requeue or DELETE /dead (`delete`), handed to the state
    writer (the db's one writer)."""

    def __init__(self, ids, delete=False):
        self.ids = ids                  # None: every dead letter
        self.delete = delete
        self.lock = threading.Lock()    # guards started and cancelled
        self.started = self.cancelled = False
        self.done = threading.Event()
        self.requeued, self.missing, self.error = [], [], None


class StateWriter:
    """Saves what the dispatcher changed, all that is ready in one transaction.

    One commit (two fdatasyncs) covers every dead letter and, with --durable,
    every message state that changed since the last one: group commit. On a
    disk error the changes go back to the dispatcher, stay in memory, and
    are tried again; /healthz reports the error meanwhile.
    """

    RETRY_SECONDS = 1.0

    def __init__(self, dispatcher, db):
        self.dispatcher = dispatcher
        self.db = db
        self.error = None  # the last write's error, while it lasts
        self.commits = 0
        self.errors = 0    # commits that failed
        self.commit_seconds = [0] * (len(COMMIT_BUCKETS) + 1)  # a histogram, for /metrics
        self.commit_seconds_sum = 0.0
        self.beat = time.monotonic()  # the last turn of its loop (for /healthz)
        self.saving_since = None      # when the commit under way began
        # Set by Broker.stop once nothing more can change: save what is left,
        # then end. Only this thread ever writes the db: a second writer
        # could take an empty change set and count it all saved.
        self.finish = threading.Event()
        self.give_up = threading.Event()  # the stop's wait is over: end even if unsaved
        self._requeues = queue.SimpleQueue()  # RequeueRequests from POST /requeue
        self.thread = threading.Thread(target=self.run, name="state-writer", daemon=True)

    def run(self):
        try:
            while True:
                self.beat = time.monotonic()
                self._serve_requeues()
                changes = self.dispatcher.take_changes(timeout=1.0)
                if changes is None:
                    if self.finish.is_set():
                        return
                    continue
                if not self.save(changes):
                    if self.give_up.wait(self.RETRY_SECONDS):
                        return
                elif not self.dispatcher.durable:
                    # Without --durable nothing waits for a save: gather what
                    # comes for a moment before the next commit. With 20% of
                    # messages unreported, 47 commits a second of 10 dead
                    # letters each took 8% of the broker's CPU; 9 commits of
                    # 55 take 2% (yappi).
                    self.finish.wait(COALESCE_SECONDS)
        finally:
            self.dispatcher.writer_ended()  # (a report waiting for a save hears it)

    def requeue(self, ids, timeout):
        """POST /requeue: move the dead letters `ids` (None: all) from `failed`
        back to the retry queue, in one transaction of this thread's (with
        them into `pending`, or into `requeue` without --durable, so that a
        crash loses none). Returns (requeued ids, missing ids); raises
        RequeueError when it could not be done (nothing changed)."""
        request = RequeueRequest(ids)
        return self._submit(request, timeout)

    def delete(self, ids, timeout):
        """DELETE /dead: delete the dead letters `ids` (None: all) from
        `failed`, in one transaction of this thread's. Returns (deleted ids,
        missing ids); raises RequeueError when it could not be done."""
        return self._submit(RequeueRequest(ids, delete=True), timeout)

    def _submit(self, request, timeout):
        self._requeues.put(request)
        self.dispatcher.wake_writer()
        if not request.done.wait(timeout):
            with request.lock:
                if not request.started:  # it will never run: nothing changed
                    request.cancelled = True
                    raise RequeueError("the db is busy: try again")
            request.done.wait()  # its transaction is under way: wait for its end
        if request.error is not None:
            raise RequeueError(request.error)
        return request.requeued, request.missing

    def _serve_requeues(self):
        while True:
            try:
                request = self._requeues.get_nowait()
            except queue.Empty:
                return
            with request.lock:
                if request.cancelled:
                    continue
                request.started = True
            try:
                if self.finish.is_set():
                    raise RequeueError("the broker is stopping")
                if request.delete:
                    request.requeued, request.missing = self._delete_dead_letters(request.ids)
                    self.dispatcher.forget_dead(request.requeued)
                    if request.requeued:
                        log.info("%d dead letters deleted", len(request.requeued))
                    continue
                records, request.missing = self._move_dead_letters(request.ids)
                request.requeued = [r["id"] for r in records]
                self.dispatcher.requeue(records)
                if records:
                    log.info("%d dead letters requeued: they go out first", len(records))
            except RequeueError as error:
                request.error = str(error)
            except Exception as error:  # a disk error: the transaction changed nothing
                self.errors += 1
                what = "delete" if request.delete else "requeue"
                request.error = "cannot %s: %s" % (what, error)
                log.error("cannot %s dead letters: %s", what, error)
            finally:
                request.done.set()

    def _count_commit(self, seconds):
        self.commits += 1
        self.commit_seconds[bisect.bisect_left(COMMIT_BUCKETS, seconds)] += 1
        self.commit_seconds_sum += seconds

    def _delete_dead_letters(self, ids):
        started = time.monotonic()
        with self.db.update() as tx:
            failed = tx.bucket(DEAD_LETTER_BUCKET)
            deleted, missing = delete_dead_letters(failed, ids)
        self._count_commit(time.monotonic() - started)
        return deleted, missing

    def _move_dead_letters(self, ids):
        durable = self.dispatcher.durable
        started = time.monotonic()
        with self.db.update() as tx:
            failed = tx.bucket(DEAD_LETTER_BUCKET)
            if ids is None:
                keys = [k for k, _v in failed.items()] if failed is not None else []
            else:
                keys = list(dict.fromkeys(i.encode("utf-8") for i in ids))
            moved, missing = [], []  # moved: (key, its value, its record)
            for key in keys:
                raw = failed.get(key) if failed is not None else None
                try:
                    if raw is not None:
                        moved.append((key, raw, parse_record(DEAD_LETTER_BUCKET, key, raw)))
                        continue
                except RecordError as error:
                    log.warning("not requeued: %s", error)
                missing.append(key.decode("utf-8", "replace"))
            if not moved:
                return [], missing
            pending = tx.create_bucket_if_not_exists(PENDING_BUCKET)
            for key, _raw, record in moved:
                pending.put(key, _compact_json(pending_record(message_from_record(record), False)
                                               if durable else requeued_record(record)).encode())
                failed.delete(key)
            if durable:
                state = tx.create_bucket_if_not_exists(STATE_BUCKET)
                state.put(b"requeued", b"%d" % (self.dispatcher.requeued + len(moved)))
        self._count_commit(time.monotonic() - started)
        return [record for _key, _raw, record in moved], missing

    def stuck_for(self):
        """Seconds the commit under way has lasted (0 if none)."""
        since = self.saving_since
        return 0.0 if since is None else time.monotonic() - since

    def save(self, changes):
        self.saving_since = time.monotonic()
        try:
            with self.db.update() as tx:
                if changes.dead_letters:
                    failed = tx.create_bucket_if_not_exists(DEAD_LETTER_BUCKET)
                    failed.fill_percent = 0.9  # ids grow with time: pack pages
                    for message, failed_at in changes.dead_letters:
                        failed.put(message.id.encode("ascii"), _compact_json(
                            dead_letter_record(message, failed_at)).encode())
                if changes.pending:
                    pending = tx.create_bucket_if_not_exists(PENDING_BUCKET)
                    pending.fill_percent = 0.9
                    for message_id, record in changes.pending.items():
                        if record is None:
                            pending.delete(message_id.encode("ascii"))
                        else:
                            pending.put(message_id.encode("ascii"), record.encode())
                if changes.counters is not None:
                    state = tx.create_bucket_if_not_exists(STATE_BUCKET)
                    for key, value in zip(_COUNTER_KEYS, changes.counters):
                        state.put(key, b"%d" % value)
                if changes.keys:
                    keys = tx.create_bucket_if_not_exists(KEYS_BUCKET)
                    for key, record in changes.keys.items():
                        if record is None:
                            keys.delete(key.encode("utf-8"))
                        else:
                            keys.put(key.encode("utf-8"), _compact_json(record).encode())
        except Exception as error:  # a disk error, or a bug: the changes are kept either way
            self.saving_since = None
            self.errors += 1
            if self.error is None:
                log.error("cannot save %d dead letters and %d message states (%s); keeping "
                          "them in memory and retrying: %s", len(changes.dead_letters),
                          len(changes.pending),
                          ", ".join(m.id for m, _ in changes.dead_letters[:5]) or "no dead letters",
                          error, exc_info=not isinstance(error, (bbolt_lite.Error, OSError)))
            self.error = "%s: %s" % (type(error).__name__, error)
            self.dispatcher.changes_written(changes, ok=False)
            return False
        self._count_commit(time.monotonic() - self.saving_since)
        self.saving_since = None
        recovered, self.error = self.error is not None, None
        if recovered:
            log.info("saving works again")  # (after clearing the error /healthz reports)
        self.dispatcher.changes_written(changes, ok=True)
        return True


# ---------------------------------------------------------------------------
# Streams: SSE framing, writing a batch, closed streams noticed at once
# ---------------------------------------------------------------------------
#
# Server-Sent Events framing is WHATWG HTML's, "server-sent events".

# (Kept: json.dumps makes an encoder a call, 2.4 µs of a hello event's JSON
# against 1.6 by a kept JSONEncoder; and JSONEncoder.encode makes its C
# encoder a call too: a job's payload of 100 bytes took 1.54 µs by it, 0.79
# by the C encoder made once, timeit.)
_COMPACT_ENCODER = json.JSONEncoder(separators=(",", ":"))
# A producer's payload: JSON has no NaN or Infinity, and Python's parser
# reads a number past a double's range (1e400) as Infinity.
_PAYLOAD_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _made_once(encoder):
    """`encoder`'s C encoder, made once as JSONEncoder.iterencode makes it,
    less the check for cycles (what it encodes comes from a JSON decoder or
    from this program, and nesting too deep still raises RecursionError);
    else (no C encoder in this Python, or one that writes another text)
    `encoder` itself."""
    make = getattr(json.encoder, "c_make_encoder", None)
    try:
        encode = make(None, encoder.default, json.encoder.encode_basestring_ascii, None,
                      encoder.key_separator, encoder.item_separator, False, False,
                      encoder.allow_nan)
        sample = {"a": [1, 2.5, None, True, "\u00e9\n"], "b": {}, "c": "x"}
        if "".join(encode(sample, 0)) == encoder.encode(sample):
            return lambda obj: "".join(encode(obj, 0))
    except Exception:  # (none, or its arguments changed in another Python)
        pass
    return encoder.encode


# `obj` as compact JSON text, ASCII only (non-ASCII as \u escapes).
_compact_json = _made_once(_COMPACT_ENCODER)
# The same, and ValueError for a number JSON cannot carry.
_payload_json = _made_once(_PAYLOAD_ENCODER)


def sse_event(event, data):
    """One event: `event:` and one `data:` line of compact JSON, then a blank line."""
    return ("event: %s\ndata: %s\n\n" % (event, _compact_json(data))).encode("utf-8")


SSE_PING = b": ping\n\n"


# The decimal text of 0..1000: a batch's periods (all in 1..1000) and its
# attempts (fewer but for a large --max-attempts) are looked up, not made.
_DECIMAL = [str(number) for number in range(MAX_PERIOD_MS + 1)]


def batch_events(batch):
    """All `msg` events of a batch, as the bytes of one write.

    The same compact JSON as sse_event, formatted directly: this is the hot
    path, and every field is an integer or an id of [0-9a-v]. Who guarantees
    the ids: the broker makes its own (XidGenerator, or the PyPI xid),
    `checked_message` checks those that come from a queue kept elsewhere,
    and parse_record checks those read from the db.
    (An f-string, with the numbers looked up in _DECIMAL: 25,000
    instructions for a batch of 10, where `%` formatting took 34,000.)
    """
    tail = f',"batch":{batch.number},"size":{len(batch.messages)}}}\n\n'
    decimal, known = _DECIMAL, len(_DECIMAL)
    return "".join([f'event: msg\ndata: {{"id":"{m.id}","period":{decimal[m.period]},'
                    f'"attempt":{decimal[m.attempts] if m.attempts < known else m.attempts}'
                    f'{tail}' for m in batch.messages.values()]).encode("ascii")


def job_events(batch):
    """All `msg` events of a batch of jobs (--source api): each with its
    payload and its period, where it has them (PROTOCOL.md, "The msg
    event"), the same compact JSON as sse_event writes, formatted directly
    as batch_events does (a payload's JSON made once, when it was enqueued:
    jobs settled a second went from 12,400 to 13,400 under Go's load client).
    """
    tail = ',"batch":%d,"size":%d' % (batch.number, len(batch.messages))
    events = []
    for m in batch.messages.values():
        event = 'event: msg\ndata: {"id":"%s","attempt":%d%s' % (m.id, m.attempts, tail)
        if type(m) is Job and m.payload_json is not None:
            event += ',"payload":' + m.payload_json  # (ASCII: _compact_json escapes)
        if m.period is not None:
            event += ',"period":%d' % m.period
        events.append(event + "}\n\n")
    return "".join(events).encode("ascii")


def report_answer(result):
    """The body of a report's 200: `result` as _compact_json writes it, and
    a newline. (Formatted directly, as batch_events: 1.2 µs where json's
    encoder took 3.7. `ignored` is empty but for ids the worker was not
    given.)"""
    ignored = result["ignored"]
    return ('{"batch":%d,"done":%d,"retried":%d,"dead":%d,"ignored":%s}\n' % (
        result["batch"], result["done"], result["retried"], result["dead"],
        _compact_json(ignored) if ignored else "[]")).encode("utf-8")


def _shutdown_socket(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


_PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)  # (the enum's | took 1.4 µs a batch)


class StreamChannel:
    """A stream's connection: whole writes, one at a time, and once one
    fails, none after it (a cut event must never be followed by a ping)."""

    def __init__(self, sock, chunked):
        self._sock = sock
        self._chunked = chunked  # HTTP/1.1: Transfer-Encoding: chunked, a chunk per write
        self._write_lock = threading.Lock()  # the stream's thread and reports' threads write
        self.broken = False
        self.last_write = time.monotonic()
        self._readable = None  # a poll of the socket, where there is poll() (see peer_closed)
        if hasattr(select, "poll"):
            self._readable = select.poll()
            self._readable.register(sock, select.POLLIN)  # (EOF and errors too)

    def _frame(self, data, last=False):
        """`data` as it goes on the wire: one chunk (and the last, empty one)."""
        if not self._chunked:
            return data
        return b"%x\r\n%s\r\n%s" % (len(data), data, b"0\r\n\r\n" if last else b"")

    def send(self, data, last=False):
        """Write `data` whole; `last`: the broker ends the stream after it."""
        data = self._frame(data, last)
        with self._write_lock:
            if self.broken:
                raise ConnectionAbortedError("the stream was cut")
            try:
                self._sock.sendall(data)
            except OSError:
                self.broken = True
                _shutdown_socket(self._sock)
                raise
            self.last_write = time.monotonic()
            if last:
                self.broken = True  # (ended: nothing may follow the last chunk)

    def peer_closed(self):
        """Whether the client has closed its end (EOF, or an error, is readable)."""
        # Nothing to read, the usual case, is told by a poll: 0.4 µs, where
        # the failed peek below raised BlockingIOError in 1.2 µs.
        if self._readable is not None and not self._readable.poll(0):
            return False
        try:
            # (socket.socket.recv: the bytes on the wire, also under TLS.)
            return socket.socket.recv(self._sock, 1, _PEEK_NOW) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def close(self, reason=None):
        """Cut the connection (the stream's thread then ends); with a
        `reason`, say `bye` first where the socket still takes it. (Called
        under the dispatcher's lock: the bye is sent only if no write is under
        way, and without blocking; a cut bye is an event the client drops.)"""
        if reason is not None and not self.broken and self._write_lock.acquire(blocking=False):
            try:
                self._sock.send(self._frame(sse_event("bye", {"reason": reason}), last=True),
                                socket.MSG_DONTWAIT)
            except OSError:
                pass
            finally:
                self._write_lock.release()
        self.broken = True
        _shutdown_socket(self._sock)


def deliver(dispatcher, session, batch, heartbeat):
    """Write a batch on its stream; its lease starts once the bytes are out.

    With --durable the batch's lease is saved first; while that waits, the
    stream still gets its pings (when `heartbeat` is given: the stream's
    own thread). A client that has closed gets nothing, and a failed write
    ends the stream: either way the batch goes back uncharged. True if
    the batch was written.
    """
    channel = session.channel
    try:
        while dispatcher.durable and not dispatcher.wait_saved(
                batch.saved_seq, min(1.0, heartbeat or 1.0)):
            if session.closed or dispatcher.stopping:
                return False  # (and the batch is back: ending the session or stopping did it)
            if heartbeat is not None and time.monotonic() - channel.last_write >= heartbeat:
                channel.send(SSE_PING)
        if not dispatcher.begin_write(session, batch):
            return False  # (and the batch is back: ending the session or stopping did it)
        if channel.peer_closed():
            dispatcher.batch_not_written(session, batch, "stream closed")
            return False
        channel.send(job_events(batch) if dispatcher.jobs else batch_events(batch))
    except OSError as error:
        dispatcher.batch_not_written(session, batch, "write failed: %s" % (
            error.strerror or type(error).__name__))
        return False
    dispatcher.batch_written(session, batch)
    return True


class StreamWatcher:
    """Watches every stream socket; EOF or an error ends that session at once.

    A worker that dies closes its socket: the kernel makes it readable with
    EOF. Waiting for the next heartbeat write to fail would hold its messages
    for up to a heartbeat; this thread sees the EOF as it happens.
    """

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self._selector = selectors.DefaultSelector()
        self._selector_lock = threading.Lock()  # guards register/unregister
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self._selector.register(self._wakeup_r, selectors.EVENT_READ, None)
        self._stopping = False
        self.beat = time.monotonic()
        self.thread = threading.Thread(target=self.run, name="stream-watcher", daemon=True)

    def watch(self, sock, session):
        with self._selector_lock:
            self._selector.register(sock, selectors.EVENT_READ, session)

    def unwatch(self, sock):
        with self._selector_lock:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass

    def run(self):
        while not self._stopping:
            self.beat = time.monotonic()  # (for /healthz)
            for key, _events in self._selector.select(timeout=1.0):
                if key.data is None:
                    try:
                        self._wakeup_r.recv(4096)
                    except OSError:
                        pass
                    continue
                self._check(key.fileobj, key.data)

    def _check(self, sock, session):
        try:
            # (The bytes on the wire, also under TLS: nothing is read from a
            # stream but what this thread throws away.)
            data = socket.socket.recv(sock, 4096, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            log.debug("%s: ignoring %d bytes sent on its stream", session.name, len(data))
            return
        self.unwatch(sock)
        self.dispatcher.disconnect(session, "stream closed")

    def stop(self):
        self._stopping = True
        try:
            self._wakeup_w.send(b"x")
        except OSError:
            pass


# ---------------------------------------------------------------------------
# HTTP/1.1, lean: the request parser and the answers (no endpoint here)
# ---------------------------------------------------------------------------

# Request headers: at most this many lines of at most this many bytes (as
# the standard library's own limits).
MAX_HEADERS, MAX_HEADER_LINE = 100, 65536
# A client that closed its connection, or stalled past --read-timeout.
# (A TLS error on a connection, including a timed-out read or write, ends it too.)
CLIENT_GONE = (ConnectionError, BlockingIOError) + ((ssl.SSLError,) if ssl else ())
# Secrets that travel in a query string: never written to a log.
_SECRET_IN_QUERY = re.compile(r"\b(worker|access_token)=[^&\s\"]*")
_CONTENT_LENGTH = re.compile(r"[0-9]{1,12}")
_HTTP_VERSION = re.compile(r"HTTP/([0-9]{1,3})\.([0-9]{1,3})")
# field-name ":" OWS field-value OWS CRLF (RFC 9112 section 5; a token, then a
# value of visible characters, spaces and tabs; no obs-fold).
# (Read as latin-1 text. The value is greedy and loses its trailing OWS after:
# a lazy one made the regular expression backtrack, 3 times slower.)
_FIELD_LINE = r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*)\r?\n"
_HEADER_FIELD = re.compile(_FIELD_LINE)
_HEADER_BLOCK = re.compile(r"(?:%s)*\r?\n" % _FIELD_LINE)  # header lines, then the blank line


def _listen_backlog():
    """The system's cap on a listen queue (the standard library asks for 5:
    in a burst of 300 connects, a third then waited for SYN retries)."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return max(int(f.read()), socket.SOMAXCONN)
    except (OSError, ValueError):
        return socket.SOMAXCONN


def redact(text):
    """`text` with the secrets of a query string (worker tokens, access tokens) hidden."""
    return _SECRET_IN_QUERY.sub(r"\1=<redacted>", text)


class _RequestReader(socket.SocketIO):
    """The connection's reads, with --read-timeout bounding a whole request.

    The kernel's SO_RCVTIMEO bounds each recv(); a client trickling a byte
    at a time would reset it forever. So a request's deadline starts with its
    first bytes, and each read checks it; only when the deadline is nearer
    than the kernel's timeout is that timeout shortened (a slow request's
    cost, not every request's). A read past the deadline returns None, as a
    timed-out recv() does, and says so in `timed_out`: the request is cut
    short and the connection closed (what follows on it is never read as a
    request of its own).
    """

    def __init__(self, sock, timeout):
        super().__init__(sock, "rb")
        sock._io_refs += 1  # as socket.makefile() counts the files open on a socket
        self._socket = sock
        self._timeout = timeout
        self._kernel_timeout = timeout  # SO_RCVTIMEO now
        self.deadline = None            # of the request being read
        self.timed_out = False          # a read of this request ran out of time

    def readinto(self, buffer):
        if self.deadline is None:
            count = self._recv(buffer)  # waiting for a request: the idle limit
            if count:
                self.deadline = time.monotonic() + self._timeout
            return count
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self.timed_out = True
            return None
        if remaining < self._kernel_timeout:
            self._set_kernel_timeout(remaining)
        return self._recv(buffer)

    def _recv(self, buffer):
        # (recv_into itself: SocketIO.readinto's checks cost a read 0.4 µs more.)
        try:
            return self._socket.recv_into(buffer)
        except BlockingIOError:
            self.timed_out = True
            return None  # SO_RCVTIMEO ran out

    def end_request(self):
        self.deadline = None
        self.timed_out = False
        if self._kernel_timeout != self._timeout:
            self._set_kernel_timeout(self._timeout)

    def _set_kernel_timeout(self, seconds):
        _set_socket_timeouts(self._socket, seconds, send=False)
        self._kernel_timeout = seconds


def _set_socket_timeouts(sock, seconds, send=True):
    """SO_RCVTIMEO (and SO_SNDTIMEO): timeouts kept by the kernel."""
    whole, fraction = divmod(max(seconds, 0.001), 1.0)
    timeval = struct.pack("ll", int(whole), int(fraction * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    if send:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _split_target(target):
    """A request target's path and query string (the fragment dropped)."""
    if target.startswith("/") and "#" not in target:
        # The request's own form: split at the "?" (0.3 µs; urlsplit took
        # 2.8 µs for a report's target, each new to its cache).
        path, _mark, query_text = target.partition("?")
        return path, query_text
    url = urllib.parse.urlsplit(target)  # absolute-form ("http://host/task?..."), or a fragment
    return url.path, url.query


def _parse_query(text):
    """A query string as {name: [values]}, as parse_qs(text,
    keep_blank_values=True) reads it: pairs split at "&", a name alone has
    the value "", and only a pair with "%" or "+" is unquoted (a report's
    query: parse_qs 3.0 µs, this 0.9 µs)."""
    query = {}
    for pair in text.split("&"):
        if pair:
            name, _equals, value = pair.partition("=")
            if "%" in pair or "+" in pair:
                name, value = urllib.parse.unquote_plus(name), urllib.parse.unquote_plus(value)
            query.setdefault(name, []).append(value)
    return query


def _query_int(query, name, low, high, default=None):
    """The integer `name` of a parsed query string: given once (or absent,
    when it has a `default`), in decimal digits, in low..high. ValueError
    says what is wrong, for a 400."""
    values = query.get(name, [])
    if not values and default is not None:
        return default
    if len(values) != 1:
        raise ValueError("%s must be given once" % name if values else "%s is required" % name)
    text = values[0]
    if not (text.isascii() and text.isdigit() and len(text) <= len(str(high))
            and low <= int(text) <= high):
        raise ValueError("%s must be an integer in %d..%d" % (name, low, high))
    return int(text)


_JSON_DECODER = json.JSONDecoder()  # (json.loads(text) with its checks of `text` skipped)


def _json_body(body):
    """A request body parsed as JSON; None if it is not JSON (or is null)."""
    try:
        return _JSON_DECODER.decode(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


@functools.lru_cache(maxsize=128)  # (statuses and types the code names)
def _response_head(version, status, content_type):
    """A response's status line, Content-Type (unless None) and Cache-Control."""
    phrase = http.server.BaseHTTPRequestHandler.responses.get(status, ("",))[0]
    return "%s %d %s\r\n%sCache-Control: no-store\r\n" % (
        version, status, phrase, "" if content_type is None else
        "Content-Type: %s\r\n" % content_type)


class HTTPRequestHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 as the broker speaks it, and no more: a strict request
    parser, --read-timeout over a whole request, a body read by
    Content-Length, whole answers in one write, event streams, CORS and JSON
    errors. A subclass names its ROUTES (path -> {method: handler name}) and
    writes the handlers, each called with the parsed query string; it may
    refuse a request in `authorized`. The server sets `read_timeout`,
    `max_body`, and the server's `tls_context` and `cors_origins`.
    """

    protocol_version = "HTTP/1.1"
    read_timeout = DEFAULT_READ_TIMEOUT
    max_body = MAX_REPORT_BYTES
    ROUTES = {}          # path -> {method: the name of its handler}
    STREAM_PATHS = ()    # event streams: no HEAD
    # Methods answered (404 or 405 where a path does not take them); others 501.
    METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"))

    # -- plumbing -----------------------------------------------------------

    def setup(self):
        sock = self.request
        # Each response goes out as soon as it is written (no Nagle delay).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # --read-timeout, kept by the kernel. (A Python socket timeout would
        # put a poll() before every recv and send: a GIL hand-off each, which
        # cost about a quarter of the reports a second under load.) A read
        # that times out returns what came so far; a write raises
        # BlockingIOError. _RequestReader bounds a request as a whole.
        _set_socket_timeouts(sock, self.read_timeout)
        self.tls_failed = False
        context = self.server.tls_context
        if context is not None:  # the handshake, in this connection's own thread
            self.request = sock = context.wrap_socket(sock, server_side=True,
                                                      do_handshake_on_connect=False)
            try:
                sock.do_handshake()
            except (ssl.SSLError, OSError) as error:
                log.debug("TLS handshake with %s failed: %s", self.client_address[0], error)
                self.tls_failed = True
        super().setup()
        self.rfile.close()
        self._reader = _RequestReader(sock, self.read_timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self):
        """Read one request and answer it (the base class's loop, with the
        method routed here and --read-timeout's deadline reset after it)."""
        try:
            self.raw_requestline = self.rfile.readline(MAX_HEADER_LINE + 1)
            if len(self.raw_requestline) > MAX_HEADER_LINE:
                self.command, self.request_version, self.requestline = None, "HTTP/1.0", ""
                self.send_error(414, "the request line is longer than %d bytes" % MAX_HEADER_LINE)
            elif not self.raw_requestline:
                self.close_connection = True
            elif self.parse_request():
                if self.command in self.METHODS:
                    self._route(self.command)
                else:
                    self.send_error(501, "unsupported method %s" % self.command[:32])
        except TimeoutError:  # (a read or a write timed out: the connection ends)
            self.close_connection = True
        if self._reader.timed_out:  # (whatever came of the request: it ends here)
            self.close_connection = True
        self._reader.end_request()

    def handle(self):
        if self.tls_failed:
            return
        try:
            super().handle()
        except CLIENT_GONE:
            pass  # the connection just closes

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        if log.isEnabledFor(logging.DEBUG):  # (a request's line is not formatted for nothing)
            log.debug("%s %s", self.address_string(), redact(format % args))

    # -- the request line and headers -------------------------------------------

    def parse_request(self):
        """The base class's job, done leaner and stricter (RFC 9112).

        The base class hands the headers to the email package: under load
        that was a third of the broker's CPU. Here `self.headers` is a dict
        by lower-case name (the first of a repeated header wins), and when
        the first read brought the whole header block, as it nearly always
        does, the block is checked and split by two regular expressions,
        not a Python loop over its lines (see _read_headers). Answers 400
        for a malformed request line or header line (folded lines and a
        space before the colon included), 505 for HTTP/2 and later, 431 for
        over 100 headers or a header line over 64 KiB.
        """
        self.command = None
        self.request_version = "HTTP/1.0"  # how errors are answered until it is known
        self.close_connection = True
        if not self.raw_requestline.endswith(b"\n"):
            return False  # cut short: the client closed, or went quiet past --read-timeout
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if not words:
            return False  # an empty line: nothing to answer
        version = _HTTP_VERSION.fullmatch(words[-1])
        if len(words) != 3 or version is None:
            self.send_error(400, "bad request line (want: METHOD target HTTP/1.x)")
            return False
        if int(version.group(1)) != 1:
            self.send_error(505, "HTTP/%s is not supported: use HTTP/1.1" % version.group(1))
            return False
        self.command, self.path, self.request_version = words
        # HTTP/1.1 keeps the connection open unless asked not to; 1.0 the reverse.
        self.close_connection = int(version.group(2)) == 0
        if self.path.startswith("//"):  # as the base class does: no "//host" paths
            self.path = "/" + self.path.lstrip("/")
        headers = self._read_headers()
        if headers is None:
            return False
        self.headers = headers
        connection = headers.get("connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        if headers.get("expect", "").lower() == "100-continue" and version.group(2) != "0":
            return self.handle_expect_100()
        return True

    def _read_headers(self):
        """The header lines up to the blank line, as {lower-case name: value};
        None once an error answer (or a client gone) says why not."""
        # The fast path: the block is already in the read buffer (a client
        # writes a request at once). One match checks it whole, one findall
        # splits it: a report's 3 headers cost 3.5 µs here, against 9.4 µs
        # read line by line into the email package's HTTPMessage (timeit).
        buffered = self.rfile.peek().decode("iso-8859-1")
        block = _HEADER_BLOCK.match(buffered)
        if block is not None:
            fields = _HEADER_FIELD.findall(buffered, 0, block.end())
            if len(fields) <= MAX_HEADERS:  # (the buffer holds less than a 64 KiB line)
                self.rfile.read(block.end())
                return {name.lower(): value.rstrip(" \t") for name, value in reversed(fields)}
        # Line by line: a block split over reads, or one in error.
        headers, count = {}, 0
        while True:
            line = self.rfile.readline(MAX_HEADER_LINE + 1)
            if line in (b"\r\n", b"\n"):
                return headers
            if len(line) > MAX_HEADER_LINE:
                self.send_error(431, "a header line is longer than %d bytes" % MAX_HEADER_LINE)
                return None
            if not line.endswith(b"\n"):
                return None  # cut short, as above
            if count == MAX_HEADERS:
                self.send_error(431, "more than %d headers" % MAX_HEADERS)
                return None
            field = _HEADER_FIELD.fullmatch(line.decode("iso-8859-1"))
            if field is None:
                self.send_error(400, "malformed header line")
                return None
            count += 1
            headers.setdefault(field.group(1).lower(), field.group(2).rstrip(" \t"))

    def send_json(self, status, obj, extra_headers=()):
        self.send_body(status, (_compact_json(obj) + "\n").encode("utf-8"), "application/json",
                       extra_headers)

    def send_text(self, status, text, content_type):
        self.send_body(status, text.encode("utf-8"), content_type)

    def send_body(self, status, body, content_type, extra_headers=()):
        """A whole response, status line to body, in one write (HEAD: no body)."""
        if log.isEnabledFor(logging.DEBUG):  # (the base class formats the line first)
            self.log_request(status, len(body))
        # (The status line and the headers fixed by the status and the type
        # are made once: a report's answer took 4.1 µs to make and send over
        # a socketpair, 2.9 now.)
        headers = [_response_head(self.protocol_version, status, content_type)]
        if status != 204:
            headers.append(f"Content-Length: {len(body)}\r\n")
        for name, value in itertools.chain(extra_headers, self.cors_headers()):
            headers.append(f"{name}: {value}\r\n")
        if self.close_connection:
            headers.append("Connection: close\r\n")
        elif self.request_version == "HTTP/1.0":  # kept open only when asked: say so
            headers.append("Connection: keep-alive\r\n")
        headers.append("\r\n")
        if self.command == "HEAD":
            body = b""
        # (sendall itself: the handler's wfile is a Python layer over it.)
        self.connection.sendall("".join(headers).encode("latin-1") + body)

    def start_event_stream(self):
        """The 200 of an event stream, and its StreamChannel.

        On HTTP/1.1 the stream is chunked, one chunk per write (PROTOCOL.md
        v1.1): clients that read a body in fixed-size blocks (urllib3, and
        the SSE clients built on it) get each event as it is written. On
        HTTP/1.0 it is close-delimited. Either way the connection ends with
        the stream."""
        chunked = self.request_version != "HTTP/1.0"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Accel-Buffering", "no")
        for name, value in self.cors_headers():
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        return StreamChannel(self.connection, chunked)

    def cors_headers(self):
        """The CORS headers of an answer (none without --cors-origin, or for a
        request from an origin it does not allow)."""
        allowed = self.server.cors_origins
        if not allowed:
            return []
        headers = getattr(self, "headers", None)
        origin = headers.get("origin") if headers is not None else None
        if not origin or (origin not in allowed and "*" not in allowed):
            return []
        headers = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        if self.command == "OPTIONS":  # the preflight
            headers += [("Access-Control-Allow-Methods", "GET, POST, DELETE"),
                        ("Access-Control-Allow-Headers", "Authorization, Content-Type"),
                        ("Access-Control-Max-Age", "600")]
        return headers

    def foreign_origin(self):
        """The Origin of a request from another origin that --cors-origin does
        not allow (its page could not read the answer), or None."""
        origin = self.headers.get("origin")
        if not origin or self.cors_headers():
            return None
        own = {"http://" + self.headers.get("host", ""), "https://" + self.headers.get("host", "")}
        return None if origin in own else origin

    def send_error_json(self, status, message, extra_headers=()):
        self.send_json(status, {"error": message}, extra_headers)

    def send_error(self, code, message=None, explain=None):
        """The base class's errors (bad request line, headers too long): JSON too."""
        self.close_connection = True
        try:
            phrase = http.HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self.send_json(code, {"error": message or phrase})

    def _allowed_methods(self, path, handlers):
        """The Allow header of a path: its methods, HEAD where GET is not a
        stream, and OPTIONS."""
        methods = set(handlers) | {"OPTIONS"}
        if "GET" in handlers and path not in self.STREAM_PATHS:
            methods.add("HEAD")
        return ", ".join(sorted(methods))

    def authorized(self, path, query_text):
        """Whether to answer this request; a subclass that says no has sent
        the answer that says why."""
        return True

    def _route(self, method):
        path, query_text = _split_target(self.path)
        # (OPTIONS tells only which methods a path takes: a browser's
        # preflight never carries the token.)
        if method != "OPTIONS" and not self.authorized(path, query_text):
            return
        handlers = self.ROUTES.get(path)
        if handlers is None:
            if method == "POST":
                self.close_connection = True  # its body is not read
            self.send_error_json(404, "no such endpoint: %s" % path)
            return
        if method == "OPTIONS":
            self.send_body(204, b"", None, [("Allow", self._allowed_methods(path, handlers))])
            return
        handler = handlers.get("GET" if method == "HEAD" else method)
        if handler is None or (method == "HEAD" and path in self.STREAM_PATHS):
            self.close_connection = True
            self.send_error_json(405, "method %s not allowed on %s" % (method, path),
                                 [("Allow", self._allowed_methods(path, handlers))])
            return
        query = _parse_query(query_text)
        try:
            getattr(self, handler)(query)
        except CLIENT_GONE:
            self.close_connection = True
        except Exception:
            log.exception("internal error on %s %s", method, redact(self.path))
            self.close_connection = True
            try:
                self.send_error_json(500, "internal error")
            except OSError:
                pass

    def read_body(self, limit=None):
        """The request's body (Content-Length required, at most `limit`
        bytes, by default --max-body), or None once an error answer (or a
        client gone) says why not."""
        length_header = self.headers.get("content-length")
        if length_header is None or self.headers.get("transfer-encoding"):
            self.close_connection = True
            self.send_error_json(411, "Content-Length required")
            return None
        if not _CONTENT_LENGTH.fullmatch(length_header.strip()):
            self.close_connection = True
            self.send_error_json(400, "malformed Content-Length")
            return None
        length = int(length_header)
        limit = self.max_body if limit is None else limit
        if length > limit:
            self.close_connection = True
            self.send_error_json(413, "body larger than %d bytes" % limit)
            return None
        body = self.rfile.read(length)
        if body is None or len(body) != length:
            self.close_connection = True
            return None  # the client went away mid-body
        return body


# ---------------------------------------------------------------------------
# The broker's endpoints
# ---------------------------------------------------------------------------

# Paths that need no --token, and the event streams:
PUBLIC_PATHS = ("/healthz", "/")  # the page holds no data; it asks for the token
STREAM_PATHS = ("/task", "/events")  # event streams: no HEAD


class BrokerHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = _listen_backlog()

    def __init__(self, address, broker):
        self.broker = broker
        self.tls_context = broker.tls_context
        self.cors_origins = broker.cors_origins
        handler = type("Handler", (BrokerRequestHandler,), {
            "read_timeout": broker.read_timeout, "max_body": broker.max_body})
        super().__init__(address, handler)


def _no_constant(name):
    raise ValueError("%s is not JSON" % name)


# (JSON has no NaN or Infinity: Python's parser takes them, and a worker in
# Go or a browser could not read the event.)
_STRICT_JSON = json.JSONDecoder(parse_constant=_no_constant)
JOB_FIELDS = ("payload", "period", "key", "delay_ms")
_JOB_FIELD_SET = frozenset(JOB_FIELDS)


def parse_jobs(body, new_ids, now):
    """The Jobs of a POST /enqueue body (a JSON array of jobs, or one job),
    with new ids and due times from `now` (the Dispatcher's clock);
    ValueError naming the first fault (and the index of its job)."""
    try:
        request = _STRICT_JSON.decode(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("the body is not UTF-8") from None
    except RecursionError:
        raise ValueError("the body is nested too deep") from None
    except ValueError as error:
        raise ValueError("the body is not JSON: %s" % error) from None
    items = request if isinstance(request, list) else [request]
    jobs = []
    ids = new_ids(len(items)) if items else []
    for index, (item, job_id) in enumerate(zip(items, ids)):
        if type(item) is not dict or not item.keys() <= _JOB_FIELD_SET:
            raise ValueError("job %d: %s" % (index, _job_fault(item)))
        payload, period = item.get("payload"), item.get("period")
        if "period" in item and not _is_int(period, MIN_PERIOD_MS, MAX_PERIOD_MS):
            raise ValueError("job %d: period must be an integer in %d..%d"
                             % (index, MIN_PERIOD_MS, MAX_PERIOD_MS))
        if payload is None:  # (a null payload is none)
            if period is None:
                raise ValueError("job %d: needs a payload or a period" % index)
            payload_json = None
        else:
            try:
                payload_json = _payload_json(payload)
            except RecursionError:
                raise ValueError("job %d: the payload is nested too deep" % index) from None
            except ValueError:  # (Infinity, from a number such as 1e400)
                raise ValueError("job %d: the payload has a number out of range (past a "
                                 "double's, as 1e400)" % index) from None
            if len(payload_json) > MAX_PAYLOAD_BYTES:  # (ASCII: its bytes)
                raise ValueError("job %d: the payload is %d bytes of JSON, more than %d"
                                 % (index, len(payload_json), MAX_PAYLOAD_BYTES))
        key = item.get("key")
        if key is not None:
            try:
                ok = type(key) is str and 0 < len(key.encode("utf-8")) <= MAX_KEY_BYTES
            except UnicodeEncodeError:  # (a lone surrogate: "\ud800")
                ok = False
            if not ok:
                raise ValueError("job %d: key must be text of 1..%d bytes of UTF-8"
                                 % (index, MAX_KEY_BYTES))
        job = Job(job_id, period, payload, key, payload_json=payload_json)
        if "delay_ms" in item:
            delay = item["delay_ms"]
            if not _is_int(delay, 0, MAX_DELAY_MS):
                raise ValueError("job %d: delay_ms must be an integer in 0..%d"
                                 % (index, MAX_DELAY_MS))
            if delay:
                job.due = now + delay / 1000.0
        jobs.append(job)
    return jobs


def _job_fault(item):
    """What makes `item` no job: not an object, or a field a job has not."""
    if type(item) is not dict:
        return "not a JSON object"
    unknown = [name for name in item if name not in _JOB_FIELD_SET]
    return "unknown field %r (a job has %s)" % (unknown[0][:40], ", ".join(JOB_FIELDS))


def checked_job(data):
    """A job fetched from a queue kept elsewhere (--jetstream with --source
    api): the bytes a broker published (job_record_json), checked as
    parse_jobs checks an enqueue (strict JSON, an xid, a period in range or
    a payload, a key of text); ValueError naming the fault."""
    try:
        body = _STRICT_JSON.decode(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ValueError("not strict JSON: %s" % error) from None
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    job_id, period, key = body.get("id"), body.get("period"), body.get("key")
    if not (type(job_id) is str and XID_PATTERN.fullmatch(job_id)):
        raise ValueError("its id is not an xid")
    if period is not None and not _is_int(period, MIN_PERIOD_MS, MAX_PERIOD_MS):
        raise ValueError("its period is not an integer in %d..%d" % (MIN_PERIOD_MS, MAX_PERIOD_MS))
    if period is None and body.get("payload") is None:
        raise ValueError("it has neither a payload nor a period")
    if key is not None and type(key) is not str:
        raise ValueError("its key is not text")
    payload = body.get("payload")
    try:
        payload_json = None if payload is None else _payload_json(payload)
    except ValueError:
        raise ValueError("its payload has a number out of range") from None
    return Job(job_id, period, payload, key, payload_json=payload_json)


def job_record_json(job):
    """What --jetstream with --source api publishes of a job (checked_job reads it)."""
    record = '{"id":"%s"' % job.id
    if job.period is not None:
        record += ',"period":%d' % job.period
    if job.payload_json is not None:
        record += ',"payload":' + job.payload_json
    if job.key is not None:
        record += ',"key":' + _compact_json(job.key)
    return record + "}"


def _id_list(value):
    """`value` if it is a list of strings (ids), else None."""
    # (The types of its items, as a set made in C: a generator took 10
    # bytecodes an id.)
    if isinstance(value, list) and set(map(type, value)) <= {str}:
        return value
    return None


class Failure:
    """A `failed` entry of a report: why the attempt failed."""

    __slots__ = ("error", "final", "retry_in_ms")

    def __init__(self, error, final, retry_in_ms):
        self.error = error              # its text, cut to MAX_ERROR_BYTES (or None)
        self.final = final              # dead-letter it now
        self.retry_in_ms = retry_in_ms  # the worker's wish for its next attempt (or None)


def cut_error(text):
    """An error's text cut to MAX_ERROR_BYTES of UTF-8 (its first ones)."""
    if len(text) * 4 <= MAX_ERROR_BYTES:
        return text
    return text.encode("utf-8")[:MAX_ERROR_BYTES].decode("utf-8", "ignore")


def parse_report(value):
    """A report's body, parsed (PROTOCOL.md, "POST /report"): (the ids
    done, {id: Failure} or None). ValueError naming the fault."""
    ids = _id_list(value)
    if ids is not None:  # (v1: the ids done)
        return ids, None
    if not isinstance(value, dict):
        raise ValueError("the body must be a JSON array of id strings, or an object "
                         '{"done": [ids], "failed": [{"id": ...}]}')
    done = value.get("done", [])
    if _id_list(done) is None:
        raise ValueError("done must be an array of id strings")
    entries = value.get("failed", [])
    if not isinstance(entries, list):
        raise ValueError("failed must be an array of objects")
    failures = {}
    for index, entry in enumerate(entries):
        where = "failed[%d]" % index
        if not isinstance(entry, dict) or type(entry.get("id")) is not str:
            raise ValueError("%s: must be an object with an id string" % where)
        error, final, retry_in_ms = entry.get("error"), entry.get("final", False), \
            entry.get("retry_in_ms")
        if error is not None and type(error) is not str:
            raise ValueError("%s: error must be a string" % where)
        if type(final) is not bool:
            raise ValueError("%s: final must be true or false" % where)
        if retry_in_ms is not None and not _is_int(retry_in_ms, 0, 10 ** 12):
            raise ValueError("%s: retry_in_ms must be an integer 0 or more" % where)
        if entry["id"] in failures:
            raise ValueError("%s: id %s is in failed twice" % (where, entry["id"]))
        failures[entry["id"]] = Failure(None if error is None else cut_error(error), final,
                                        retry_in_ms)
    both = failures.keys() & set(done)
    if both:
        raise ValueError("id %s is in both done and failed" % min(both))
    return done, failures


class BrokerRequestHandler(HTTPRequestHandler):
    """The broker's endpoints (PROTOCOL.md): one short method each."""

    server_version = "broker.py/" + __version__
    ROUTES = {"/task": {"GET": "handle_task"}, "/report": {"POST": "handle_report"},
              "/touch": {"POST": "handle_touch"}, "/requeue": {"POST": "handle_requeue"},
              "/stats": {"GET": "handle_stats"}, "/healthz": {"GET": "handle_healthz"},
              "/metrics": {"GET": "handle_metrics"}, "/events": {"GET": "handle_events"},
              "/dead": {"GET": "handle_dead", "DELETE": "handle_delete_dead"},
              "/": {"GET": "handle_dashboard"},
              "/enqueue": {"POST": "handle_enqueue"}}
    STREAM_PATHS = STREAM_PATHS

    def authorized(self, path, query_text):
        """With --token, check `Authorization: Bearer <token>`, in constant
        time; else 401. (Not for PUBLIC_PATHS.)

        GET /events also takes `?access_token=`: a browser's EventSource
        cannot send headers.
        """
        expected = self.server.broker.token
        if expected is None or path in PUBLIC_PATHS:
            return True
        header = self.headers.get("authorization", "")
        scheme, _space, given = header.partition(" ")
        # The bytes the client sent: a header's, read as latin-1, are its
        # characters' codes; a query's were percent-decoded as UTF-8.
        given = given.strip().encode("latin-1")
        if path == "/events" and not header:
            scheme, given = "bearer", "".join(_parse_query(query_text).get(
                "access_token", [""])[:1]).encode("utf-8", "replace")
        if scheme.lower() == "bearer" and hmac.compare_digest(given, expected.encode("utf-8")):
            return True
        log.warning("401 for %s %s from %s: %s", self.command, path, self.client_address[0],
            "wrong token" if header else "no Authorization header")
        self.close_connection = True
        self.send_error_json(401, "a valid 'Authorization: Bearer <token>' header is required",
                             [("WWW-Authenticate", 'Bearer realm="broker"')])
        return False

    # -- GET /task: the work stream ------------------------------------------

    def handle_task(self, query):
        broker = self.server.broker
        try:  # (batchSize too, as some clients spell it)
            batchsize = _query_int({"batchsize": query.get("batchsize", []) +
                                    query.get("batchSize", [])}, "batchsize",
                                   1, broker.max_batchsize)
        except ValueError as error:
            self.send_error_json(400, str(error))
            return
        foreign = self.foreign_origin()
        if foreign is not None:  # its page could not read the stream: give it no batch
            broker.refused_origin(foreign)
            self.send_error_json(403, "origin %s is not allowed (see --cors-origin)" % foreign)
            return
        dispatcher = broker.dispatcher
        session = dispatcher.connect(batchsize)
        if session is None:
            reason = "the broker is shutting down" if dispatcher.stopping or \
                dispatcher.draining else \
                "too many workers connected (--max-workers %d)" % dispatcher.max_workers
            self.send_error_json(503, reason, [("Retry-After", "2")])
            return
        self.close_connection = True
        sock = self.connection
        log.debug("%s: connected from %s, batchsize %d", session.name,
                 self.client_address[0], batchsize)
        broker.stream_opened()
        try:
            session.channel = self.start_event_stream()
            hello = {"worker": session.token, "batchsize": batchsize,
                     "lease_ms": int(dispatcher.lease_timeout * 1000),
                     "heartbeat_ms": int(broker.heartbeat * 1000)}
            session.channel.send(b"retry: %d\n\n" % SSE_RETRY_MS + sse_event("hello", hello))
            broker.watcher.watch(sock, session)
            self._stream(session)
        except OSError:
            pass
        finally:
            broker.watcher.unwatch(sock)
            dispatcher.disconnect(session, "stream closed")
            broker.stream_closed()
            log.debug("%s: stream closed (%s%s)", session.name, session.close_reason,
                     "; " + session.end_note if session.end_note else "")

    def _stream(self, session):
        """Write the batches left in this stream's outbox, pings, and bye.

        (A worker's next batch after a report is written by the report's
        thread; this one writes those given out by other events.)
        """
        broker = self.server.broker
        dispatcher = broker.dispatcher
        channel = session.channel
        while True:
            wait = max(0.0, channel.last_write + broker.heartbeat - time.monotonic())
            batch = dispatcher.wait_for_batch(session, wait)
            if batch is not None and deliver(dispatcher, session, batch, broker.heartbeat):
                continue
            if session.closed or channel.broken:
                return
            reason = dispatcher.stream_ends(session)
            if reason is not None:
                channel.send(sse_event("bye", {"reason": reason}), last=True)
                return
            if time.monotonic() - channel.last_write >= broker.heartbeat:
                channel.send(SSE_PING)

    # -- POST /report ---------------------------------------------------------

    def handle_report(self, query):
        body = self.read_body()
        if body is None:
            return
        named = self._worker_and_batch(query)
        if named is None:
            return
        last = query.get("last", ["0"])
        if last not in (["0"], ["1"]):
            self.send_error_json(400, "last must be 0 or 1")
            return
        try:
            ids, failures = parse_report(_json_body(body))
        except ValueError as error:
            self.send_error_json(400, str(error))
            return
        dispatcher = self.server.broker.dispatcher
        try:
            result, seq, next_batch = dispatcher.report(*named, ids, last=last == ["1"],
                                                        failures=failures)
        except ReportError as error:
            self.send_error_json(error.status, str(error))
            return
        # --durable: answer (and send the next batch) only once it is all on
        # disk; --jetstream: once JetStream has confirmed the acks.
        if not dispatcher.wait_reported(seq, self.read_timeout):
            self.send_error_json(503, "the report is taken but not yet saved: %s" % (
                "the disk is failing (see /healthz)" if dispatcher.durable else
                "JetStream has not confirmed it"))
            if next_batch is not None:  # (its stream's own thread writes it once it is saved)
                dispatcher.hand_to_stream(next_batch.session, next_batch)
            return
        if next_batch is not None:
            # A failed write ends that stream and gives the batch back
            # uncharged; the report itself is settled all the same.
            deliver(dispatcher, next_batch.session, next_batch, None)
        self.send_body(200, report_answer(result), "application/json")

    def _worker_and_batch(self, query):
        """The `worker` and `batch` of a report or a touch; None once a 400
        says what is wrong with them."""
        tokens = query.get("worker", [])
        if len(tokens) != 1 or not tokens[0]:
            self.send_error_json(400, "worker must be given once")
            return None
        try:
            return tokens[0], _query_int(query, "batch", 0, 10 ** 18 - 1)
        except ValueError as error:
            self.send_error_json(400, str(error))
            return None

    # -- POST /requeue ------------------------------------------------------------

    def handle_requeue(self, query):
        """Dead letters back to the retry queue of this running broker."""
        self._on_dead_letters("requeue", "requeued")

    def handle_delete_dead(self, query):
        """DELETE /dead: dead letters deleted from this running broker's db."""
        self._on_dead_letters("delete", "deleted")

    def _on_dead_letters(self, what, done):
        body = self.read_body()
        if body is None:
            return
        if self.server.broker.queue is not None:
            self.send_error_json(501, "with --jetstream the queue is the stream's: %s is "
                                      "not done by a broker (the dead letters are in the "
                                      "stream %s-dead)" % (what, self.server.broker.queue.stream))
            return
        request = _json_body(body)
        ids = None if request == {"all": True} else _id_list(request)
        if ids is None and request != {"all": True}:
            self.send_error_json(400, 'the body must be a JSON array of dead-letter ids, '
                                      'or {"all": true}')
            return
        writer = self.server.broker.state_writer
        try:
            changed, missing = getattr(writer, what)(ids, self.read_timeout)
        except RequeueError as error:
            self.send_error_json(503, str(error), [("Retry-After", "2")])
            return
        self.send_json(200, {done: len(changed), "missing": missing})

    # -- POST /enqueue ------------------------------------------------------------

    def handle_enqueue(self, query):
        """Jobs from a producer (--source api): all saved, then 200 with
        their ids; or none (PROTOCOL.md, "POST /enqueue")."""
        broker = self.server.broker
        dispatcher = broker.dispatcher
        if not dispatcher.jobs:
            self.close_connection = True  # (its body is not read)
            self.send_error_json(409, "this broker generates its messages (--source generator)")
            return
        body = self.read_body(broker.max_enqueue_body)
        if body is None:
            return
        try:
            jobs = parse_jobs(body, broker.new_ids, time.monotonic())
        except ValueError as error:
            self.send_error_json(400, str(error))
            return
        if broker.queue is not None:  # (--jetstream: published, once JetStream stored them)
            try:
                ids, duplicates = broker.queue.enqueue(jobs, self.read_timeout)
            except broker.queue.Refused as error:
                dispatcher.count_enqueue(0, 0, error.cause)
                self.send_error_json(503, str(error), [("Retry-After", "2")])
                return
            dispatcher.count_enqueue(len(jobs) - len(duplicates), len(duplicates))
            self.send_json(200, {"ids": ids, "duplicates": duplicates})
            return
        try:
            ids, duplicates, ticket = dispatcher.enqueue(jobs)
        except ReportError as error:
            self.send_error_json(error.status, str(error), [("Retry-After", "2")])
            return
        if not dispatcher.wait_reported(ticket, self.read_timeout) and \
                not dispatcher.cancel_enqueue(ticket):
            self.send_error_json(503, "the jobs could not be saved (see /healthz): none was "
                                      "enqueued", [("Retry-After", "2")])
            return
        self.send_json(200, {"ids": ids, "duplicates": duplicates})

    # -- POST /touch --------------------------------------------------------------

    def handle_touch(self, query):
        """Extend a batch's lease to a whole lease timeout from now."""
        if self.headers.get("transfer-encoding") or \
                self.headers.get("content-length", "0").strip() != "0":
            self.close_connection = True  # (its body is not read)
            self.send_error_json(400, "a touch has no body")
            return
        named = self._worker_and_batch(query)
        if named is None:
            return
        dispatcher = self.server.broker.dispatcher
        try:
            lease_ms, ticket, sent_at = dispatcher.touch(*named)
            if lease_ms is None:  # (--jetstream: extended once JetStream confirmed it)
                if not dispatcher.wait_reported(ticket, self.read_timeout):
                    self.send_error_json(503, "the touch is not confirmed by the queue: the "
                                              "lease is not extended")
                    return
                lease_ms = dispatcher.touch_confirmed(*named, sent_at)
        except ReportError as error:
            self.send_error_json(error.status, str(error))
            return
        self.send_json(200, {"batch": named[1], "lease_ms": lease_ms})

    # -- GET /stats, /metrics, /healthz, /dead, /events, / --------------------

    def handle_stats(self, query):
        self.send_json(200, self.server.broker.dispatcher.figures().stats())

    def handle_metrics(self, query):
        broker = self.server.broker
        self.send_text(200, prometheus_text(broker.dispatcher.figures(), broker.state_writer,
                                            broker.started_at),
                       "text/plain; version=0.0.4; charset=utf-8")

    def handle_dead(self, query):
        after = query.get("after", [""])
        try:
            limit = _query_int(query, "limit", 1, 10000, default=100)
        except ValueError as error:
            self.send_error_json(400, str(error))
            return
        if len(after) != 1:
            self.send_error_json(400, "after must be given at most once")
            return
        queue = self.server.broker.queue
        if queue is None:
            letters, more = read_dead_letters(self.server.broker.db, limit, after[0])
        else:  # (the cluster's list: the dead-letter stream)
            try:
                letters, more = queue.read_dead(limit, after[0])
            except StartError as error:
                self.send_error_json(503, str(error), [("Retry-After", "2")])
                return
        self.send_json(200, {"dead": letters, "more": more,
                             "next_after": letters[-1]["id"] if more else None})

    def handle_dashboard(self, query):
        self.send_text(200, DASHBOARD_HTML, "text/html; charset=utf-8")

    def handle_events(self, query):
        """The dashboard's own event stream: a `stats` event every second."""
        broker = self.server.broker
        self.close_connection = True
        channel = self.start_event_stream()
        channel.send(b"retry: %d\n\n" % SSE_RETRY_MS)
        # (The chart's last 5 minutes first: a page opened, or reloaded, shows them.)
        channel.send(sse_event("history", broker.dispatcher.history_now()))
        while not broker.dispatcher.stopping:  # (through a drain: it shows the drain)
            channel.send(sse_event("stats", broker.dispatcher.figures().dashboard()))
            if broker.stopping.wait(1.0):
                break
        channel.send(sse_event("bye", {"reason": "shutdown"}), last=True)

    def handle_healthz(self, query):
        problem = self.server.broker.health_problem()
        self.send_text(200 if problem is None else 503,
                       "ok\n" if problem is None else problem + "\n", "text/plain; charset=utf-8")


# ---------------------------------------------------------------------------
# The broker: wiring, start and stop
# ---------------------------------------------------------------------------

class StartError(Exception):
    """The broker cannot start; the message says why (exit status 2)."""


def _jetstream():
    """broker_jetstream.py, imported for --jetstream only (it needs nats-py).
    It does not import this file: what it needs of it, it is handed."""
    try:
        import broker_jetstream
    except ImportError as error:
        raise StartError(str(error) if "nats-py" in str(error) else
                         "--jetstream needs broker_jetstream.py beside broker.py (%s)"
                         % error) from None
    return broker_jetstream


def _jetstream_queue(args, on_event):
    """--jetstream: the queue in a NATS JetStream stream (a sibling of LocalQueue)."""
    return _jetstream().queue_for(
        args, on_event, new_messages=MessageMaker(args.seed), checked_message=checked_message,
        dead_letter_record=dead_letter_record, start_error=StartError,
        checked_job=checked_job, job_record_json=job_record_json)


def _tls_context(cert, key):
    """The server's TLS context (TLS 1.2 and newer); StartError if the files
    will not do."""
    if ssl is None:
        raise StartError("--tls-cert: this Python has no ssl module")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise StartError("cannot use --tls-cert %s --tls-key %s: %s" % (
            cert, key, getattr(error, "strerror", None) or error)) from None
    return context


class Broker:
    def __init__(self, args):
        self.args = args
        self.started_at = time.time()  # (process_start_time_seconds)
        self.heartbeat = args.heartbeat
        self.max_batchsize = args.max_batchsize
        self.max_body = args.max_body
        self.read_timeout = args.read_timeout
        self.token = args.token or None
        self.cors_origins = tuple(args.cors_origin or ())
        self._origins_refused = {}  # origin -> streams refused (the first is logged)
        self.max_enqueue_body = args.max_enqueue_body
        self.new_ids = new_ids_function()  # (the ids of jobs from producers)
        self.tls_context = _tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
        # The port first, then the trace, then the db: a start that fails
        # leaves no new file behind.
        try:
            self.server = BrokerHTTPServer((args.host, args.port), self)
        except OSError as error:
            raise StartError("cannot listen on %s:%d: %s" % (
                args.host, args.port, error.strerror or error)) from None
        self.trace = None
        try:
            if args.trace:
                self.trace = TraceFile(args.trace)
            self.queue = None  # --jetstream: where the messages wait
            if args.jetstream:
                self.queue = _jetstream_queue(args, self.trace)
            self.dispatcher = Dispatcher(max_attempts=args.max_attempts,
                                         lease_timeout=args.lease_timeout, total=args.total,
                                         seed=args.seed, on_event=self.trace,
                                         durable=args.durable, max_workers=args.max_workers,
                                         queue=self.queue or (JobQueue() if args.source == "api"
                                                              else None),
                                         max_backlog=args.max_backlog,
                                         dedup_window=args.dedup_window,
                                         retry_delay=args.retry_delay / 1000.0,
                                         retry_delay_max=args.retry_delay_max / 1000.0)
            # A small page cache: the broker mostly appends, and reads back little.
            self.db = bbolt_lite.open(args.db, timeout=1.0, cache_pages=64)
            try:
                self._open_state()
                if self.queue is not None:
                    self.queue.start()
            except BaseException:
                self.db.close()
                raise
        except BaseException:
            self.server.server_close()
            if self.trace is not None:
                self.trace.discard()
            raise
        self.state_writer = StateWriter(self.dispatcher, self.db)
        self.watcher = StreamWatcher(self.dispatcher)
        self._streams = 0
        self._streams_lock = threading.Lock()
        # Wakes stop(): the last stream has said bye.
        self._no_streams = threading.Condition(self._streams_lock)
        self.stop_requested = threading.Event()  # the first signal: drain, then stop
        self.stop_now = threading.Event()        # a second signal: no more drain
        self.stopping = threading.Event()        # the drain is over: streams end now
        self.workers = None  # the worker.py supervisor of --workers
        self.one_core = None  # OneCore, once started (--pin)
        self.dispatch_thread = threading.Thread(target=self.dispatcher.run, name="dispatch",
                                                daemon=True)
        self._threads = [self.dispatch_thread, self.state_writer.thread, self.watcher.thread,
                         threading.Thread(target=self.server.serve_forever, name="http",
                                          daemon=True)]
        if self.trace is not None:
            self._threads.append(self.trace.thread)

    def _open_state(self):
        """Take back what the db holds: the dead letters requeued (first in
        line) and, with --durable, the unsettled messages and counters of a
        run before. A requeued dead letter has a `pending` record until it
        is settled again; a --durable start counts those no run has counted
        yet (`"requeued": true` in the record) in one transaction with the
        `requeued` counter. (A `requeue` bucket of an older broker.py is
        moved into `pending` first, in the same transaction.)"""
        durable = self.args.durable
        old_requeued, records, counters = load_state(self.db)
        by_id = {record["id"]: record for record in records}
        with self.db.update() as tx:
            tx.create_bucket_if_not_exists(DEAD_LETTER_BUCKET)
            if old_requeued:
                pending = tx.create_bucket_if_not_exists(PENDING_BUCKET)
                for record in old_requeued:
                    by_id[record["id"]] = fresh = requeued_record(record)
                    pending.put(record["id"].encode("ascii"), _compact_json(fresh).encode())
            if tx.bucket(OLD_REQUEUE_BUCKET) is not None:
                tx.delete_bucket(OLD_REQUEUE_BUCKET)
            requeued = [record for record in by_id.values() if record.get("requeued")]
            if durable and requeued:
                pending = tx.create_bucket_if_not_exists(PENDING_BUCKET)
                for record in requeued:
                    pending.put(record["id"].encode("ascii"), _compact_json(pending_record(
                        message_from_record(record), False)).encode())
                state = tx.create_bucket_if_not_exists(STATE_BUCKET)
                counters = counters or (0, 0, 0, 0)
                counters = counters[:3] + (counters[3] + len(requeued),)
                state.put(b"requeued", b"%d" % counters[3])
        records = [record for record in by_id.values() if not record.get("requeued")]
        if not durable:
            if records:
                log.warning("%s holds %d unsettled messages of a --durable run: left as they "
                            "are (start with --durable to resume them)", self.args.db, len(records))
            if requeued and self.queue is not None:
                raise StartError("%s holds %d requeued dead letters: start without --jetstream "
                                 "to send them, or give --jetstream another --db"
                                 % (self.args.db, len(requeued)))
            self.dispatcher.requeue(requeued)
        else:
            self.dispatcher.restore(records, counters)
            if self.dispatcher.jobs:
                self.dispatcher.restore_keys(load_keys(self.db))
            self.dispatcher.requeue(requeued, counted=True)
            if records or counters:
                log.info("resuming from %s: %d unsettled messages, %d generated so far, "
                         "%d done, %d dead", self.args.db, len(records),
                         *(counters or (0, 0, 0, 0))[:3])
            if counters and self.args.total is not None and counters[0] > self.args.total:
                raise ValueError("%s has %d messages generated already, more than --total %d"
                                 % (self.args.db, counters[0], self.args.total))
        if requeued:
            log.info("%d requeued dead letters go out first", len(requeued))

    @property
    def url(self):
        host, port = self.server.server_address[:2]
        return "%s://%s:%d" % ("https" if self.tls_context else "http", host, port)

    @property
    def workers_url(self):
        """The URL the workers of --workers are given: --host as given (a
        certificate is for a name, or for an address), but a wildcard
        address (all interfaces) is reached on loopback."""
        host, port = self.args.host, self.server.server_address[1]
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1" if host != "::" else "::1"
        if ":" in host:  # (an IPv6 address, in brackets)
            host = "[%s]" % host
        return "%s://%s:%d" % ("https" if self.tls_context else "http", host, port)

    def start(self):
        # (Before the threads start: each inherits the CPU of the thread that starts it.)
        self.one_core = OneCore.start() if self.args.pin else None
        for thread in self._threads:
            thread.start()
        status_log.info("listening on %s (db %s%s, max attempts %d, lease %.1f s%s%s)",
                        self.url, self.args.db, ", durable" if self.args.durable else "",
                        self.args.max_attempts, self.args.lease_timeout,
                        ", total %d" % self.args.total if self.args.total is not None else "",
                        ", bearer token required" if self.token else "")
        status_log.info("dashboard: %s/", self.url)

    def stream_opened(self):
        with self._streams_lock:
            self._streams += 1

    def stream_closed(self):
        with self._streams_lock:
            self._streams -= 1
            if self._streams == 0:
                self._no_streams.notify_all()

    def health_problem(self):
        """Why the broker is not healthy (/healthz answers 503 with it), or None."""
        writer, dispatcher = self.state_writer, self.dispatcher
        if writer.error is not None:
            return "the db cannot be written: " + writer.error
        if self.trace is not None and self.trace.error is not None:
            return "the trace file cannot be written: " + self.trace.error
        if dispatcher.queue.problem is not None:
            return dispatcher.queue.problem
        if dispatcher.stopping:
            return None
        now = time.monotonic()
        # Each comes round its loop at least once a second (the state writer
        # between commits): a thread that has not for STUCK_SECONDS is stuck.
        for name, thread, beat in (
                ("dispatch loop", self.dispatch_thread, dispatcher.loop_beat),
                ("stream watcher", self.watcher.thread, self.watcher.beat),
                ("state writer", writer.thread, writer.beat)):
            if not thread.is_alive():
                return "the %s has stopped" % name
            if now - beat > STUCK_SECONDS:
                return "the %s is stuck (no turn for %.0f s)" % (name, now - beat)
        return None

    def run_until_stopped(self):
        """Serve until a signal, or until a --total run has settled."""
        every = self.args.progress_every
        next_progress = time.monotonic() + every
        next_balance = time.monotonic() + BALANCE_SECONDS
        while not self.stop_requested.is_set():
            if self.dispatcher.wait_until_settled(timeout=0.5):
                figures = self.dispatcher.figures()
                status_log.info("all %d messages settled: %d done, %d dead%s",
                                figures.total + figures.requeued, figures.done, figures.dead,
                                figures.dead_reasons())
                break
            if time.monotonic() >= next_progress:
                next_progress += every
                self.log_progress()
            if self.one_core is not None and time.monotonic() >= next_balance:
                next_balance += BALANCE_SECONDS
                self.one_core.balance()
            if self.workers is not None and self.workers.poll() is not None:
                log.error("the workers' supervisor exited (%s): stopping",
                          self.workers.returncode)
                break

    def log_progress(self):
        f = self.dispatcher.figures()
        share = ""
        if f.total is not None:
            share = ", %.1f%% settled" % (100.0 * (f.done + f.dead) / max(1, f.total + f.requeued))
        made = "%d generated%s" % (f.generated, "" if f.total is None else " of %d" % f.total)
        if f.jobs:
            made = "%d jobs enqueued, %d waiting" % (f.enqueued, f.backlog)
        reasons = f.dead_reasons()
        status_log.info("progress: %d done, %d dead (%.1f%%%s), %d in flight, %d retrying%s, "
                        "%d workers, %.1f done/s, %s%s", f.done, f.dead,
                        100.0 * f.dead / max(1, f.done + f.dead),
                        ": " + reasons[2:-1] if reasons else "", f.in_flight,
                        f.retrying, ", %d delayed" % f.delayed if f.delayed else "", f.workers,
                        f.done_per_s, made, share)

    def refused_origin(self, origin):
        """A stream refused for its Origin: said once per origin (a page
        retries its EventSource every few seconds)."""
        count = self._origins_refused.get(origin, 0)
        if len(self._origins_refused) < 100 or count:
            self._origins_refused[origin] = count + 1
        if not count:
            log.warning("refused a stream from a page of origin %s: not allowed by "
                        "--cors-origin (%s); said once for this origin", origin,
                        ", ".join(self.cors_origins) or "none given")

    def start_workers(self, count):
        """`--workers N`: worker.py --processes N, a child of this broker."""
        command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "worker.py"),
                   "--url", self.workers_url, "--processes", str(count),
                   "--parent-pid", str(os.getpid()),  # they stop if this broker is killed
                   # (Their batches, restarts and the seed's intended failures are
                   # INFO: the broker's progress line counts what they do. Their
                   # warnings and errors, real problems, show; --log-level DEBUG
                   # shows all.)
                   "--log-level", "DEBUG" if self.args.log_level == "DEBUG" else
                   max(self.args.log_level, "WARNING", key=logging.getLevelName)]
        env = dict(os.environ, BROKER_TOKEN=self.token) if self.token else None
        # A session of its own: Ctrl-C in the terminal reaches the broker
        # alone, which passes it on when its drain begins (see drain()).
        self.workers = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)
        if self.one_core is not None:  # (before it starts its worker processes)
            self.one_core.release(self.workers.pid)
        log.info("started worker.py --processes %d (pid %d)", count, self.workers.pid)

    def stop_workers(self):
        """The drain told the workers to stop (they finish and report first):
        wait for them; a second SIGTERM stops them at once, then SIGKILL."""
        if self.workers is None:
            return
        try:
            self.workers.wait(5.0)
            return
        except subprocess.TimeoutExpired:
            self.workers.terminate()
        try:
            self.workers.wait(10.0)
        except subprocess.TimeoutExpired:
            self.workers.kill()
            self.workers.wait()

    def drain(self):
        """Lease nothing more and let busy workers report, for up to
        --drain-timeout s, or until a second signal (`stop_now`)."""
        batches, messages = self.dispatcher.drain()
        if self.workers is not None and self.workers.poll() is None:
            self.workers.send_signal(signal.SIGTERM)  # they finish their batches first
        timeout = self.args.drain_timeout
        if timeout is None:
            timeout = self.args.lease_timeout
        if not batches or not timeout or self.stop_now.is_set():
            return
        status_log.info("draining: waiting up to %.1f s for %d busy workers to report %d "
                        "messages (a second signal stops at once)", timeout, batches, messages)
        started = time.monotonic()
        deadline = started + timeout
        while not self.stop_now.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("drain timeout: %d busy workers had not reported after %.1f s",
                            self.dispatcher.figures().busy_workers, timeout)
                return
            # (Short waits: a signal handler cannot wake this wait.)
            if self.dispatcher.wait_drained(min(remaining, 0.1)):
                status_log.info("drained in %.2f s: every busy worker reported",
                                time.monotonic() - started)
                return

    def stop(self):
        """Drain (lease nothing more and let busy workers report), then say bye
        on every stream, stop serving, save what is left, close the db.
        Returns the exit status: 1 if anything that should be on disk (dead
        letters, --durable states, trace lines) is not."""
        dispatcher, writer = self.dispatcher, self.state_writer
        self.stop_requested.set()
        self.drain()
        self.stopping.set()
        dispatcher.stop()
        leased, waiting = dispatcher.stop_counts
        self.stop_workers()
        with self._streams_lock:
            deadline = time.monotonic() + 5.0
            while self._streams and time.monotonic() < deadline:
                self._no_streams.wait(deadline - time.monotonic())
        self.server.shutdown()
        self.server.server_close()
        self.watcher.stop()
        if self.queue is not None:  # (what it fetched and gave to no worker goes back)
            self.queue.stop()
        # Nothing changes any more: the writer saves what is left, alone.
        writer.finish.set()
        dispatcher.wake_writer()
        writer.thread.join(STOP_SAVE_SECONDS)
        writer.give_up.set()
        writer.thread.join(1.0)
        status = 0
        if writer.thread.is_alive():
            log.error("the state writer is stuck in a commit (for %.0f s): stopping without it",
                      writer.stuck_for())
        figures = dispatcher.figures()
        if figures.unsaved_changes:
            log.error("%d dead letters could not be saved (lost)%s", figures.unsaved_dead_letters,
                      ", nor %d changes of message states" % figures.unsaved_changes
                      if dispatcher.durable else "")
            status = 1
        pending = None
        if not writer.thread.is_alive():
            if dispatcher.durable:
                pending = count_pending(self.db)
            self.db.close()
        if self.trace is not None:
            unwritten = self.trace.close(5.0)
            if unwritten:
                log.error("%d trace lines could not be written to %s", unwritten, self.trace.path)
                status = 1
        if dispatcher.durable:
            left = "%s stay pending in the db" % ("?" if pending is None else pending)
        elif self.queue is not None:
            left = "the stream %r keeps the rest (the leased ones come back after %.0f s)" % (
                self.queue.stream, self.queue.ack_wait)
        else:  # (requeued dead letters keep their `pending` records until settled again)
            requeued = figures.requeued_unsettled
            left = "%d unsettled messages lost (without --durable they live in memory only)%s" % (
                figures.unsettled() - requeued,
                "; %d requeued dead letters stay in the db" % requeued if requeued else "")
        status_log.info("stopped: %d generated, %d done, %d dead; when it stopped %d messages "
                        "were leased and %d waiting for a retry; %s; %d db commits",
                        figures.generated, figures.done, figures.dead, leased, waiting, left,
                        writer.commits)
        return status


class _LogQueueHandler(logging.handlers.QueueHandler):
    """Hands log records to the log writer's thread; never blocks.

    Log lines are written by a thread of their own, so that no thread (above
    all none holding the dispatcher's lock) ever waits on stderr: with stderr
    on a pipe that nobody reads, dispatch goes on. Past MAX_QUEUED waiting
    records, new ones are dropped and counted; the count is logged once the
    writer catches up.
    """

    MAX_QUEUED = 10000

    def __init__(self, records):
        super().__init__(records)
        self.dropped = 0

    def enqueue(self, record):
        if self.queue.qsize() >= self.MAX_QUEUED:
            self.dropped += 1
            return
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            note = logging.LogRecord(log.name, logging.WARNING, __file__, 0,
                                     "%d log lines dropped: the log's reader was not keeping up",
                                     (dropped,), None)
            self.queue.put_nowait(self.prepare(note))
        self.queue.put_nowait(record)


class _LogWriter(logging.handlers.QueueListener):
    def stop(self, timeout):
        """Write what is queued, waiting at most `timeout` s (stderr may be stuck)."""
        self.enqueue_sentinel()
        self._thread.join(timeout)


def start_logging(level):
    """Log lines go to stderr through a queue and a writer thread, stamped in
    UTC as RFC 3339 with milliseconds. The status lines (listening, progress,
    stopped) show at WARNING too."""
    records = queue.Queue()
    stderr = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter("%(asctime)s %(levelname)s broker: %(message)s")
    formatter.converter = time.gmtime
    formatter.default_time_format = "%Y-%m-%dT%H:%M:%S"
    formatter.default_msec_format = "%s.%03dZ"
    stderr.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [_LogQueueHandler(records)]
    root.setLevel(level)
    status_log.setLevel(min(logging.INFO, logging.getLevelName(level))
                        if level != "ERROR" else logging.ERROR)
    writer = _LogWriter(records, stderr)
    writer.start()
    return writer


def run_broker(args):
    try:
        broker = Broker(args)
    except bbolt_lite.DatabaseLockedError:
        log.error("%s is locked by another process: is another broker using it? "
                  "Give this one another --db.", args.db)
        return 2
    except StartError as error:
        log.error("%s", error)
        return 2
    except (bbolt_lite.Error, ValueError, OSError) as error:
        log.error("cannot use %s: %s", args.db, getattr(error, "strerror", None) or error)
        return 2

    def on_signal(signum, _frame):
        if broker.stop_requested.is_set():
            status_log.info("%s again: stopping now", signal.Signals(signum).name)
            broker.stop_now.set()
        else:
            broker.dispatcher.stop_leasing()
            status_log.info("%s: stopping (a second signal stops at once)",
                            signal.Signals(signum).name)
            broker.stop_requested.set()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # (SIGHUP: a closed terminal)
        signal.signal(signum, on_signal)
    broker.start()
    if args.workers:
        broker.start_workers(args.workers)
    broker.run_until_stopped()
    return broker.stop()


# ---------------------------------------------------------------------------
# main: the command line
# ---------------------------------------------------------------------------

def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _port(text):
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be in 0..65535")
    return value


def _non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog=program_name(),
        description="Generate messages and dispatch them to workers over Server-Sent Events "
                    "(GET /task?batchsize=N, POST /report). Unreported messages are retried; "
                    "after the last attempt they are saved as dead letters in a bbolt file. "
                    "Dashboard at GET /; also GET /stats, /metrics, /healthz, /dead.",
        epilog="Dead-letter tools (with the broker stopped): 'python broker.py dead --db FILE' "
               "prints them; 'python broker.py requeue --db FILE ID...|--all' sends them again "
               "on the next start.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT,
                        help="port to listen on; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--db", default=DEFAULT_DB,
                        help="bbolt file for dead letters, created if missing (default: %(default)s)")
    parser.add_argument("--max-attempts", type=_positive_int, default=DEFAULT_MAX_ATTEMPTS,
                        help="deliveries of a message before it is a dead letter "
                             "(default: %(default)s)")
    parser.add_argument("--lease-timeout", type=_positive_float, default=DEFAULT_LEASE_TIMEOUT,
                        metavar="SECONDS",
                        help="a batch not reported within this time fails, and its worker's "
                             "stream is closed (default: %(default)s)")
    parser.add_argument("--drain-timeout", type=_non_negative_float, default=None,
                        metavar="SECONDS",
                        help="on SIGTERM/SIGINT/SIGHUP, lease nothing more and wait this long "
                             "for busy workers to report before closing their streams; a "
                             "second signal stops at once; 0: no drain (default: the lease "
                             "timeout)")
    parser.add_argument("--heartbeat", type=_positive_float, default=DEFAULT_HEARTBEAT,
                        metavar="SECONDS",
                        help="write ': ping' on idle streams this often (default: %(default)s)")
    parser.add_argument("--max-batchsize", type=_positive_int, default=DEFAULT_MAX_BATCHSIZE,
                        help="largest batchsize a worker may ask for (default: %(default)s)")
    parser.add_argument("--source", choices=("generator", "api"), default="generator",
                        help="where messages come from: 'generator', the seed's loop (the "
                             "default), or 'api', jobs that producers POST to /enqueue (and "
                             "'broker.py put' sends): each saved before it is accepted "
                             "(implies --durable; with --jetstream, stored in the stream)")
    parser.add_argument("--max-backlog", type=_positive_int, default=DEFAULT_MAX_BACKLOG,
                        metavar="N",
                        help="with --source api: jobs waiting at most; an enqueue past it "
                             "gets 503 and enqueues nothing (default: %(default)s)")
    parser.add_argument("--dedup-window", type=_positive_float, default=DEFAULT_DEDUP_WINDOW,
                        metavar="SECONDS",
                        help="with --source api: how long a job's idempotency key is "
                             "remembered, across restarts (default: %(default)s)")
    parser.add_argument("--retry-delay", type=_non_negative_int, default=None, metavar="MS",
                        help="after a message's n-th failed attempt, wait min(max, MS x "
                             "2^(n-1)) times a random factor in [0.5, 1] before the next "
                             "(default: 0, at once, with --source generator; 1000 with "
                             "--source api)")
    parser.add_argument("--retry-delay-max", type=_non_negative_int,
                        default=int(DEFAULT_RETRY_DELAY_MAX * 1000), metavar="MS",
                        help="the longest wait before a retry, a worker's retry_in_ms too "
                             "(default: %(default)s)")
    parser.add_argument("--max-enqueue-body", type=_positive_int,
                        default=DEFAULT_MAX_ENQUEUE_BODY, metavar="BYTES",
                        help="with --source api: the largest POST /enqueue body; larger get "
                             "413 (default: %(default)s)")
    parser.add_argument("--total", type=_non_negative_int, default=None, metavar="N",
                        help="generate N messages, then none; exit 0 once all are done or dead "
                             "(default: generate forever)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for the message periods, for reproducible runs")
    parser.add_argument("--durable", action="store_true",
                        help="keep every unsettled message in the db (bucket 'pending'), so a "
                             "broker that is killed and started again resumes them; batches are "
                             "sent and reports answered once on disk (group commit)")
    parser.add_argument("--max-workers", type=_positive_int, default=DEFAULT_MAX_WORKERS,
                        help="concurrent streams; more get 503 (default: %(default)s)")
    parser.add_argument("--max-body", type=_positive_int, default=MAX_REPORT_BYTES,
                        metavar="BYTES",
                        help="largest report body; larger get 413 (default: %(default)s)")
    parser.add_argument("--read-timeout", type=_positive_float, default=DEFAULT_READ_TIMEOUT,
                        metavar="SECONDS",
                        help="a request must arrive whole within this time, and a stream "
                             "write may block no longer (default: %(default)s)")
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument("--token", default=None,
                        help="require 'Authorization: Bearer TOKEN' on every endpoint but "
                             "/healthz (default: $BROKER_TOKEN; unset: no authentication); "
                             "--token-file keeps it out of the process list")
    tokens.add_argument("--token-file", default=None, metavar="FILE",
                        help="read the token from FILE (its first line; default: "
                             "$BROKER_TOKEN_FILE)")
    parser.add_argument("--tls-cert", default=None, metavar="FILE",
                        help="serve HTTPS (TLS 1.2 and newer) with this certificate chain "
                             "(PEM); needs --tls-key")
    parser.add_argument("--tls-key", default=None, metavar="FILE",
                        help="the private key (PEM) of --tls-cert")
    parser.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                        help="let pages of ORIGIN (e.g. https://app.example:8443; repeat the "
                             "flag for more; * for any) be workers and read the endpoints: "
                             "answers carry Access-Control-Allow-Origin, and the preflight "
                             "allows GET, POST and the Authorization and Content-Type headers "
                             "(default: none; a stream from another origin is refused with 403)")
    parser.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                        help="also run worker.py --processes N (from this folder) against this "
                             "broker, and stop it on exit: the whole system in one command")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the broker's threads on one CPU, moved to the idlest one "
                             "when other work crowds it (default; Linux). They hand the GIL "
                             "to each other many times a report, and across cores each "
                             "hand-off waits for a wake-up: on 2 cores, pinned, the broker "
                             "settled 1.6 times the messages a second. --no-pin lets the "
                             "kernel spread them")
    parser.add_argument("--progress-every", type=_positive_float, default=DEFAULT_PROGRESS_EVERY,
                        metavar="SECONDS",
                        help="log a progress line this often (default: %(default)s)")
    parser.add_argument("--trace", default=None, metavar="FILE",
                        help="write every lease start and end to FILE as JSON lines (for audits)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="(default: %(default)s)")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    more = parser.add_argument_group(
        "more than one machine (needs nats-py and a NATS server with JetStream)")
    more.add_argument("--jetstream", metavar="URL[,URL...]",
                      help="keep the queue in NATS JetStream at these servers (nats://host:4222,"
                           "...), shared by every broker given the same --js-stream; the "
                           "protocol on the wire stays the same")
    more.add_argument("--js-stream", default="broker", metavar="NAME",
                      help="the JetStream stream of the queue; dead letters also go to "
                           "NAME-dead (default: %(default)s)")
    more.add_argument("--js-replicas", type=_positive_int, default=None, metavar="N",
                      help="copies of each stream (default: 3 with 3 or more --jetstream URLs, "
                           "else 1)")
    more.add_argument("--backlog", type=_positive_int, default=1000, metavar="N",
                      help="with --jetstream: generate while fewer than N messages wait "
                           "(default: %(default)s)")
    args = parser.parse_args(argv)
    if args.jetstream and args.durable:
        parser.error("--jetstream keeps the queue in JetStream: --durable is not needed there")
    if args.source == "api":
        if args.total is not None:
            parser.error("--total counts generated messages: not with --source api")
        # (An accepted job survives a crash: in the db, or in JetStream.)
        args.durable = not args.jetstream
    if args.retry_delay is None:
        args.retry_delay = int(DEFAULT_RETRY_DELAY_API * 1000) if args.source == "api" else 0
    try:
        args.token = _token(args.token, args.token_file)
    except ValueError as error:
        parser.error(str(error))
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    return args


def _token(token, token_file):
    """The bearer token: --token, --token-file, $BROKER_TOKEN or
    $BROKER_TOKEN_FILE, in that order, without spaces around it; None for
    none. ValueError when it is empty or only spaces (that would turn
    authentication off, silently) or unreadable."""
    if token is None and token_file is None:
        token = os.environ.get("BROKER_TOKEN")
        if token is None:
            token_file = os.environ.get("BROKER_TOKEN_FILE") or None
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.readline().strip()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError("cannot read the token file %s: %s" % (
                token_file, getattr(error, "strerror", None) or error)) from None
        if not token:
            raise ValueError("the token file %s is empty" % token_file)
    if token is not None:
        token = token.strip()  # (as a header's value is read: spaces around it dropped)
        if not token:
            raise ValueError("the token (--token or $BROKER_TOKEN) is empty: give one, or "
                             "leave both unset for no authentication")
    return token


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("dead", "requeue", "purge", "put"):
        # Killed by SIGPIPE like any Unix tool when the reader goes (| head):
        # no BrokenPipeError traceback.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        try:
            return {"dead": dead_command, "requeue": requeue_command, "purge": purge_command,
                    "put": put_command}[argv[0]](argv[1:])
        except ToolError as error:
            print("%s %s: %s" % (program_name(), argv[0], error), file=sys.stderr)
            return 2
    args = parse_args(argv)
    log_writer = start_logging(args.log_level)
    try:
        return run_broker(args)
    finally:
        log_writer.stop(timeout=5.0)


# ---------------------------------------------------------------------------
# Appendix A. The dashboard: one page, no external assets, updated by GET /events
# ---------------------------------------------------------------------------

DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>broker.py</title>
<link rel="icon" href="data:,">
<style>
  body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
  h1 { font-size: 1.3em; margin: 0 0 .2em; } h2 { font-size: 1em; margin: 1.4em 0 .4em; }
  #status { color: #666; } #status.down { color: #b00; }
  .counters { display: grid; grid-template-columns: repeat(auto-fill, minmax(9em, 1fr)); gap: .6em; }
  .counter { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .5em .7em; }
  .counter b { display: block; font-size: 1.5em; font-variant-numeric: tabular-nums; }
  .counter span { color: #666; font-size: .85em; }
  canvas { background: #fff; border: 1px solid #ddd; border-radius: 6px; width: 100%; height: 260px; }
  table { border-collapse: collapse; background: #fff; font-variant-numeric: tabular-nums; }
  td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
  .clipped { font-family: ui-monospace, monospace; font-size: .9em; white-space: pre-wrap; word-break: break-all; }
  .legend i { display: inline-block; width: .8em; height: .8em; margin: 0 .3em 0 1em; }
</style></head>
<body>
<h1>broker.py</h1>
<div id="status">connecting&hellip;</div>
<h2>Counters</h2>
<div class="counters" id="counters"></div>
<div id="dead-share"></div>
<h2>Per second, the last 5 minutes
  <span class="legend"><i style="background:#2a7"></i>done/s<i style="background:#c33"></i>dead/s</span></h2>
<canvas id="chart" width="900" height="260"></canvas>
<h2>Workers</h2>
<table><thead><tr><th>worker</th><th>batchsize</th><th>batches done</th><th>current batch age</th></tr></thead>
<tbody id="workers"></tbody></table>
<h2>Latest dead letters <span id="dead-count"></span>
  <button id="requeue-all" type="button">requeue all</button>
  <span id="requeue-result"></span></h2>
<table><thead><tr><th>id</th><th>period</th><th>attempts</th><th>reason</th><th>error</th><th>payload</th><th>failed at</th><th></th></tr></thead>
<tbody id="dead"></tbody></table>
<h2>All dead letters, oldest first (GET /dead) <button id="dead-first" type="button">first page</button>
  <button id="dead-next" type="button" disabled>next page</button> <span id="dead-page"></span></h2>
<table><thead><tr><th>id</th><th>period</th><th>attempts</th><th>reason</th><th>error</th><th>payload</th><th>failed at</th><th></th></tr></thead>
<tbody id="all-dead"></tbody></table>
<script>
"use strict";
const FIELDS = [["generated", "generated"], ["dispatched", "dispatched"], ["done", "done"],
  ["dead", "dead"], ["retrying", "retrying"], ["delayed", "delayed"], ["in_flight", "in flight"],
  ["workers", "workers"], ["busy_workers", "busy workers"], ["done_per_s", "done/s (10 s)"],
  ["uptime_s", "uptime (s)"]];
// With --source api: the jobs from producers (refused: the enqueue 503s, all causes).
const JOB_FIELDS = [["enqueued", "jobs enqueued"], ["backlog", "jobs waiting"],
  ["duplicates", "duplicates"], ["refused", "enqueues refused"]];
let history = [];  // [Unix second, done, dead], one a second, five minutes (the broker's)
let token = sessionStorage.getItem("broker-token") || "";
let source = null;

// A long text cut for its cell, whole in its tooltip (as text: never markup).
function clipped(text) {
  const span = document.createElement("span");
  span.className = "clipped";
  span.textContent = text.length > 120 ? text.slice(0, 119) + "\u2026" : text;
  span.title = text;
  return span;
}

function cell(row, content) {
  const td = document.createElement("td");
  if (content instanceof Node) td.appendChild(content); else td.textContent = content;
  row.appendChild(td);
}

// (The token's UTF-8 bytes, as curl sends it: a header value's characters go out one byte each.)
function authHeaders() {
  return token ? {"Authorization": "Bearer " + unescape(encodeURIComponent(token))} : {};
}

function askToken() {
  const given = window.prompt("This broker needs its token:");
  if (given === null) return false;
  token = given; sessionStorage.setItem("broker-token", token);
  return true;
}

// POST /requeue: these dead letters (or all) go out again first, attempts reset.
// POST /requeue or DELETE /dead: `what` is "requeue" or "delete".
async function onDead(what, ids, retried) {
  const result = document.getElementById("requeue-result");
  try {
    const answer = await fetch(what === "delete" ? "/dead" : "/requeue",
      {method: what === "delete" ? "DELETE" : "POST",
       headers: Object.assign({"Content-Type": "application/json"}, authHeaders()),
       body: JSON.stringify(ids === null ? {all: true} : ids)});
    if (answer.status === 401 && !retried && askToken()) return onDead(what, ids, true);
    const body = await answer.json();
    const done = what === "delete" ? "deleted" : "requeued";
    result.textContent = answer.ok ? body[done] + " " + done +
      (body.missing.length ? ", " + body.missing.length + " no longer dead" : "") :
      what + " failed: " + body.error;
  } catch (error) {
    result.textContent = what + " failed: " + error;
  }
}
const requeue = (ids, retried) => onDead("requeue", ids, retried);

function deadButtons(id) {
  const buttons = document.createElement("span");
  const again = document.createElement("button");
  again.type = "button"; again.textContent = "requeue"; again.className = "requeue";
  again.addEventListener("click", () => requeue([id], false));
  const gone = document.createElement("button");
  gone.type = "button"; gone.textContent = "delete"; gone.className = "delete";
  gone.addEventListener("click", () => {
    if (confirm("Delete dead letter " + id + " for good?")) onDead("delete", [id], false);
  });
  buttons.append(again, " ", gone);
  return buttons;
}
document.getElementById("requeue-all").addEventListener("click", () => {
  if (confirm("Requeue every dead letter?")) requeue(null, false);
});

// GET /dead, a page at a time: "first page", then "next page" from where it ended.
let deadAfter = null, deadPage = 0;
async function loadDead(first) {
  if (first) { deadAfter = null; deadPage = 0; }
  const url = "/dead?limit=20" + (deadAfter ? "&after=" + encodeURIComponent(deadAfter) : "");
  const answer = await fetch(url, {headers: authHeaders()});
  if (!answer.ok) { document.getElementById("dead-page").textContent = "GET /dead: " + answer.status; return; }
  const body = await answer.json();
  deadPage += 1;
  deadAfter = body.next_after;
  fill("all-dead", body.dead, deadColumns);
  document.getElementById("dead-page").textContent = "page " + deadPage +
    (body.more ? "" : " (the last)");
  document.getElementById("dead-next").disabled = !body.more;
}
document.getElementById("dead-first").addEventListener("click", () => loadDead(true));
document.getElementById("dead-next").addEventListener("click", () => loadDead(false));

const deadColumns = [d => d.id, d => d.period === null || d.period === undefined ? "" : d.period + " ms",
  d => d.attempts, d => d.reason, d => clipped(d.error || ""),
  d => clipped("payload" in d ? JSON.stringify(d.payload) : ""), d => d.failed_at,
  d => deadButtons(d.id)];

function fill(id, rows, columns) {
  const body = document.getElementById(id);
  body.replaceChildren();
  for (const item of rows) {
    const row = document.createElement("tr");
    for (const column of columns) cell(row, column(item));
    body.appendChild(row);
  }
}

function show(stats) {
  const counters = document.getElementById("counters");
  counters.replaceChildren();
  for (const [key, label] of FIELDS.concat("enqueued" in stats ? JOB_FIELDS : [])) {
    const box = document.createElement("div");
    box.className = "counter";
    box.id = "counter-" + key;
    const value = document.createElement("b");
    value.textContent = key === "uptime_s" ? Math.round(stats[key]) :
      key === "done_per_s" ? stats[key].toFixed(1) :
      key === "refused" ? Object.values(stats[key]).reduce((a, b) => a + b, 0) : stats[key];
    const name = document.createElement("span");
    name.textContent = label;
    box.append(value, name);
    counters.appendChild(box);
  }
  const status = document.getElementById("status");
  status.className = "";
  status.textContent = "enqueued" in stats ? "jobs from producers (--source api)" :
    stats.total === null ? "generating without end" :
    "settled " + (stats.done + stats.dead) + " of " + (stats.total + stats.requeued);
  fill("workers", stats.workers_detail, [w => w.worker, w => w.batchsize, w => w.batches_done,
    w => w.batch_age_s === null ? "free" : w.batch_age_s.toFixed(2) + " s"]);
  fill("dead", stats.recent_dead.slice().reverse(), deadColumns);
  document.getElementById("dead-count").textContent = "(" + stats.recent_dead.length + " of " +
    stats.dead + " this run)";
  const settled = stats.done + stats.dead;
  const reasons = Object.entries(stats.dead_by_reason).filter(([, n]) => n > 0)
    .map(([reason, n]) => n + " " + reason).join(", ");
  document.getElementById("dead-share").textContent = settled ? "dead: " +
    (100 * stats.dead / settled).toFixed(1) + "% of those settled" +
    (reasons ? " (" + reasons + ")" : "") : "";
  if (!history.length || history[history.length - 1][0] !== stats.time)
    history.push([stats.time, stats.done, stats.dead]);
  while (history.length && history[0][0] < stats.time - 300) history.shift();
  draw();
}

// Two panels, done/s above and dead/s below, each with its own scale, over a
// time axis of the last 5 minutes (the broker's clock).
function draw() {
  const canvas = document.getElementById("chart");
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  const left = 48, right = canvas.width - 8, axis = canvas.height - 18;
  const panel = (axis - 8) / 2;
  const now = history.length ? history[history.length - 1][0] : Math.floor(Date.now() / 1000);
  const x = t => right - (now - t) * (right - left) / 300;
  g.font = "11px sans-serif"; g.fillStyle = "#888"; g.strokeStyle = "#eee"; g.lineWidth = 1;
  for (let m = 0; m <= 5; m++) {  // the time axis: a tick a minute
    const tx = x(now - 60 * m);
    g.beginPath(); g.moveTo(tx, 4); g.lineTo(tx, axis); g.stroke();
    g.fillText(m ? "-" + m + " min" : "now", Math.min(tx - 14, right - 24), canvas.height - 4);
  }
  const rates = [];
  for (let i = 1; i < history.length; i++) {
    const dt = Math.max(history[i][0] - history[i - 1][0], 1);
    rates.push([history[i][0], (history[i][1] - history[i - 1][1]) / dt,
                (history[i][2] - history[i - 1][2]) / dt]);
  }
  [[1, "#2a7", 4], [2, "#c33", 8 + panel]].forEach(([k, color, top]) => {
    const most = Math.max(1, ...rates.map(r => r[k]));
    const scale = Math.pow(10, Math.floor(Math.log10(most)));
    const max = Math.ceil(most / scale) * scale;  // a round top for the scale
    g.fillStyle = "#888";
    g.fillText(max + "/s", 2, top + 10); g.fillText("0", 2, top + panel);
    g.strokeStyle = "#ddd"; g.beginPath(); g.moveTo(left, top + panel); g.lineTo(right, top + panel);
    g.stroke();
    g.strokeStyle = color; g.lineWidth = 2; g.beginPath();
    rates.forEach((r, i) => {
      const y = top + panel - r[k] / max * (panel - 4);
      i ? g.lineTo(x(r[0]), y) : g.moveTo(x(r[0]), y);
    });
    g.stroke(); g.lineWidth = 1;
  });
  window.chartSamples = rates.length;  // (for the tests: how many points it drew)
}

function connect() {
  if (source) source.close();
  source = new EventSource("/events" + (token ? "?access_token=" + encodeURIComponent(token) : ""));
  source.addEventListener("history", e => { history = JSON.parse(e.data); draw(); });
  source.addEventListener("stats", e => show(JSON.parse(e.data)));
  source.addEventListener("bye", () => { status("the broker stopped"); source.close(); });
  source.onerror = () => {
    source.close();
    fetch("/stats", {headers: authHeaders()}).then(r => {
      if (r.status === 401 && !askToken()) { status("a token is needed"); return; }
      setTimeout(connect, 1000);
    }, () => { status("the broker is not answering; retrying"); setTimeout(connect, 2000); });
  };
}

function status(text) { const s = document.getElementById("status"); s.className = "down"; s.textContent = text; }

connect();
</script>
</body></html>
"""


# ---------------------------------------------------------------------------
# Appendix B. Prometheus text: GET /metrics
# ---------------------------------------------------------------------------

_METRICS = (  # (name in the figures, type, help); counters get _total
    ("generated", "counter", "Messages generated."),
    ("dispatched", "counter", "Deliveries: messages sent in batches, retries included."),
    ("done", "counter", "Messages reported done."),
    ("retrying", "gauge", "Messages waiting for another attempt, due."),
    ("delayed", "gauge", "Messages waiting for their retry delay (or a job its delay_ms)."),
    ("in_flight", "gauge", "Messages leased to a worker now."),
    ("workers", "gauge", "Connected worker streams."),
    ("busy_workers", "gauge", "Workers holding a batch."),
)


def _histogram(name, help_text, bounds, counts, total):
    lines = ["# HELP %s %s" % (name, help_text), "# TYPE %s histogram" % name]
    cumulative = 0
    for bound, count in zip(bounds + ("+Inf",), counts):
        cumulative += count
        lines.append('%s_bucket{le="%s"} %d' % (name, bound, cumulative))
    return lines + ["%s_sum %.6f" % (name, total), "%s_count %d" % (name, cumulative)]


def _by_reason(name, kind, help_text, counts):
    return ["# HELP %s %s" % (name, help_text), "# TYPE %s %s" % (name, kind)] + [
        '%s{reason="%s"} %d' % (name, reason, count) for reason, count in counts.items()]


def prometheus_text(figures, writer, started_at):
    """The Prometheus text exposition format (version 0.0.4). Rates are
    rate()'s to compute; the start time is process_start_time_seconds."""
    lines = []
    for name, kind, help_text in _METRICS:
        full = "broker_%s%s" % (name, "_total" if kind == "counter" else "")
        lines += ["# HELP %s %s" % (full, help_text), "# TYPE %s %s" % (full, kind),
                  "%s %s" % (full, getattr(figures, name))]
    lines += _by_reason("broker_dead_letters_total", "counter",
                        "Messages dead-lettered (this run), by why their last attempt failed.",
                        figures.dead_by_reason)
    lines += _by_reason("broker_failed_attempts_total", "counter",
                        "Attempts that failed, by why.", figures.failed_by_reason)
    lines += _histogram("broker_batch_round_trip_seconds",
                        "Time from a batch's dispatch to its report.", ROUND_TRIP_BUCKETS,
                        figures.round_trips, figures.round_trip_sum)
    if figures.jobs:  # (--source api)
        for name, kind, help_text, value in (
                ("broker_enqueued_total", "counter", "Jobs accepted from producers.",
                 figures.enqueued),
                ("broker_duplicates_total", "counter",
                 "Jobs not enqueued: their key was taken (idempotency).", figures.duplicates),
                ("broker_backlog", "gauge", "Jobs waiting to be leased.", figures.backlog)):
            lines += ["# HELP %s %s" % (name, help_text), "# TYPE %s %s" % (name, kind),
                      "%s %d" % (name, value)]
        lines += _by_reason("broker_enqueue_refused_total", "counter",
                            "Enqueue requests answered 503, by cause.", figures.refused)
    lines += ["# HELP broker_db_commits_total Transactions committed to the db.",
              "# TYPE broker_db_commits_total counter",
              "broker_db_commits_total %d" % writer.commits,
              "# HELP broker_db_errors_total Transactions that failed (disk errors).",
              "# TYPE broker_db_errors_total counter",
              "broker_db_errors_total %d" % writer.errors]
    lines += _histogram("broker_db_commit_seconds", "Time a db transaction took to commit.",
                        COMMIT_BUCKETS, writer.commit_seconds, writer.commit_seconds_sum)
    lines += ["# HELP broker_build_info The broker's version.",
              "# TYPE broker_build_info gauge",
              'broker_build_info{version="%s"} 1' % __version__,
              "# HELP process_start_time_seconds Start time of the process since the Unix "
              "epoch, in seconds.",
              "# TYPE process_start_time_seconds gauge",
              "process_start_time_seconds %.3f" % started_at]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Appendix C. Dead-letter tools: GET /dead, python broker.py dead|requeue
# ---------------------------------------------------------------------------

def read_dead_letters(db, limit, after=""):
    """Up to `limit` dead letters with ids after `after`, oldest first (ids
    sort by time); and whether there are more. A record that cannot be read
    is shown as such: {"id": its key, "unreadable": why}."""
    letters = []
    with db.view() as tx:
        bucket = tx.bucket(DEAD_LETTER_BUCKET)
        if bucket is None:
            return [], False
        cursor = bucket.cursor()
        key, value = cursor.seek(after.encode("utf-8", "replace") + b"\0") if after \
            else cursor.first()
        while key is not None and len(letters) < limit:
            try:
                letters.append(parse_record(DEAD_LETTER_BUCKET, key, value))
            except RecordError as error:
                letters.append({"id": key.decode("utf-8", "replace"), "unreadable": str(error)})
            key, value = cursor.next()
        return letters, key is not None


class ToolError(Exception):
    """What a dead-letter tool says before it exits 2."""


def _tool_db(path, writable):
    """The db, opened for a tool: refused while a broker holds it, and never
    created or changed unless the tool must write (`requeue`)."""
    if not os.path.exists(path):
        raise ToolError("%s: no such file" % path)
    if os.path.isdir(path):
        raise ToolError("%s: a folder, not a bbolt file" % path)
    if os.path.getsize(path) == 0:
        raise ToolError("%s: an empty file, not a bbolt file" % path)
    try:
        return bbolt_lite.open(path, readonly=not writable, timeout=0.5)
    except bbolt_lite.DatabaseLockedError:
        raise ToolError("%s is in use by a running broker: stop it first (or, live: read "
                        "GET /dead, and 'requeue --url' the broker)" % path) from None
    except (bbolt_lite.Error, OSError) as error:
        raise ToolError("%s: cannot be read as a bbolt file: %s" % (
            path, getattr(error, "strerror", None) or error)) from None


def _one_line(text, width=200):
    """A dead letter's error or payload on one line of the table: its
    control characters escaped (a terminal is not told to do anything), cut."""
    if text is None:
        return ""
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= width else text[:width - 1] + "\u2026"


def program_name():
    """How this program was called: `broker` when installed (pip install .),
    `broker.py` otherwise; for --help, --version and the tools' errors."""
    called = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "broker" if called == "broker" else "broker.py"


def dead_command(argv):
    parser = argparse.ArgumentParser(prog=program_name() + " dead",
                                     description="Print the dead letters as a table (the db is "
                                                 "only read).")
    parser.add_argument("--db", default=DEFAULT_DB, help="(default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead")
    parser.add_argument("--jetstream", metavar="URL[,URL...]",
                        help="instead of a db: the dead-letter stream of brokers run with "
                             "--jetstream (the whole cluster's list; needs nats-py)")
    parser.add_argument("--js-stream", default="broker", metavar="NAME",
                        help="with --jetstream: the queue's stream; its dead letters are in "
                             "NAME-dead (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.jetstream:
        try:
            letters = _jetstream().read_dead_stream(args.jetstream, args.js_stream, StartError)
        except StartError as error:
            raise ToolError(str(error)) from None
    else:
        with _tool_db(args.db, writable=False) as db:
            try:
                letters, _more = read_dead_letters(db, 1 << 62)
            except bbolt_lite.Error as error:
                raise ToolError("%s: cannot be read: %s" % (args.db, error)) from None
    if args.json:
        for letter in letters:
            print(_compact_json(letter))
        return 0
    print("%-20s %6s %8s  %-14s %-24s %s" % ("ID", "PERIOD", "ATTEMPTS", "REASON", "FAILED AT",
                                              "ERROR / PAYLOAD"))
    for letter in letters:
        if "unreadable" in letter:
            print("%-20s %s" % (letter["id"], letter["unreadable"]))
            continue
        print("%-20s %6s %8s  %-14s %-24s %s" % (
            letter["id"], "-" if letter["period"] is None else letter["period"],
            letter["attempts"], letter.get("reason"), letter.get("failed_at"),
            _one_line(letter.get("error"))))
        if "payload" in letter:
            print("%-20s payload %s" % ("", _one_line(_compact_json(letter["payload"]))))
    print("%d dead letters" % len(letters))
    return 0


def requeue_command(argv):
    parser = argparse.ArgumentParser(
        prog=program_name() + " requeue",
        description="Requeue dead letters, attempts reset. With --url, those of a running "
                    "broker, which sends them out first at once (POST /requeue); otherwise "
                    "those of a stopped broker's --db, moved to its 'pending' bucket: the "
                    "broker sends them first on its next start.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--db", default=None,
                       help="the db of a stopped broker (default: %s)" % DEFAULT_DB)
    where.add_argument("--url", help="a running broker, e.g. http://127.0.0.1:8080")
    parser.add_argument("--token", default=None,
                        help="with --url: the broker's --token (default: $BROKER_TOKEN)")
    parser.add_argument("--token-file", default=None, metavar="FILE",
                        help="with --url: read the token from FILE, its first line "
                             "(default: $BROKER_TOKEN_FILE)")
    parser.add_argument("--all", action="store_true", help="every dead letter")
    parser.add_argument("ids", nargs="*", metavar="ID", help="the dead letters to requeue")
    args = parser.parse_args(argv)
    if bool(args.ids) == args.all:
        parser.error("give dead letter ids, or --all")
    if args.url is not None:
        return _requeue_live(args)
    args.db = args.db or DEFAULT_DB
    with _tool_db(args.db, writable=True) as db:
        with db.update() as tx:
            failed = tx.bucket(DEAD_LETTER_BUCKET)
            keys = [k for k, _v in failed.items()] if failed and args.all else \
                [i.encode("utf-8") for i in args.ids]
            missing = [k.decode() for k in keys if failed is None or failed.get(k) is None]
            if missing:
                raise ToolError("not dead letters in %s: %s" % (args.db, " ".join(missing)))
            for key in keys:
                try:
                    parse_record(DEAD_LETTER_BUCKET, key, failed.get(key))
                except RecordError as error:
                    raise ToolError("%s: cannot be requeued: %s" % (args.db, error)) from None
            pending = tx.create_bucket_if_not_exists(PENDING_BUCKET)
            for key in keys:
                record = parse_record(DEAD_LETTER_BUCKET, key, failed.get(key))
                pending.put(key, _compact_json(requeued_record(record)).encode())
                failed.delete(key)
    print("%d dead letters requeued: the broker sends them first on its next start"
          % len(keys))
    return 0


def purge_command(argv):
    parser = argparse.ArgumentParser(
        prog=program_name() + " purge",
        description="Delete dead letters from a stopped broker's db, for good (a running "
                    "broker's: DELETE /dead, or the dashboard). The file keeps its size: "
                    "'python bbolt_lite.py compact' writes a smaller copy.")
    parser.add_argument("--db", default=DEFAULT_DB, help="(default: %(default)s)")
    parser.add_argument("--all", action="store_true", help="every dead letter")
    parser.add_argument("ids", nargs="*", metavar="ID", help="the dead letters to delete")
    args = parser.parse_args(argv)
    if bool(args.ids) == args.all:
        parser.error("give dead letter ids, or --all")
    with _tool_db(args.db, writable=True) as db:
        with db.update() as tx:
            failed = tx.bucket(DEAD_LETTER_BUCKET)
            deleted, missing = delete_dead_letters(failed, None if args.all else args.ids)
            if missing:  # (nothing deleted: the transaction is rolled back)
                raise ToolError("not dead letters in %s: %s" % (args.db, " ".join(missing)))
    print("%d dead letters deleted" % len(deleted))
    return 0


class HTTPAnswer(Exception):
    """A broker's answer other than 200: its status, error text and Retry-After."""

    def __init__(self, status, reason, retry_after):
        super().__init__(reason)
        self.status, self.retry_after = status, retry_after


def _post_json(url, path, body, token):
    """POST `body` (JSON) to a running broker: its answer, parsed;
    HTTPAnswer for another status than 200, ToolError if it is not reached."""
    if not url.startswith(("http://", "https://")):
        raise ToolError("--url must start with http:// or https://")
    headers = {"Content-Type": "application/json"}
    if token:  # (its UTF-8 bytes, as curl sends it)
        headers["Authorization"] = "Bearer " + token.encode("utf-8").decode("latin-1")
    request = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(body).encode(),
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        try:
            reason = json.loads(error.read()).get("error", "")
        except ValueError:
            reason = error.reason
        raise HTTPAnswer(error.code, reason, error.headers.get("Retry-After")) from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise ToolError("cannot reach %s: %s" % (
            url, getattr(error, "reason", None) or error)) from None


def _requeue_live(args):
    """`requeue --url`: POST /requeue to a running broker."""
    try:
        answer = _post_json(args.url, "/requeue", {"all": True} if args.all else args.ids,
                            _tool_token(args.token, args.token_file))
    except HTTPAnswer as error:
        raise ToolError("%s answered %d: %s" % (args.url, error.status, error)) from None
    print("%d dead letters requeued: the broker sends them first" % answer["requeued"])
    if answer["missing"]:
        print("not dead letters there: %s" % " ".join(answer["missing"]), file=sys.stderr)
        return 1
    return 0


def _tool_token(token, token_file):
    try:
        return _token(token, token_file)
    except ValueError as error:
        raise ToolError(str(error)) from None


PUT_AT_ONCE = 1000  # jobs a request of `broker.py put`


def put_command(argv):
    """`broker.py put`: enqueue jobs on a running broker (--source api)."""
    parser = argparse.ArgumentParser(
        prog=program_name() + " put",
        description="Enqueue jobs on a running broker started with --source api. Each JOB is "
                    'a JSON object, {"payload": ..., "period": N, "key": "...", "delay_ms": N} '
                    "(a payload or a period at least); without JOB arguments, one JSON job a "
                    "line on standard input, sent in requests of up to %d. Prints each job's "
                    "id, one a line; a 503 (backlog full, broker stopping) is retried with "
                    "backoff. Exit status: 0 all accepted, 1 some refused (each named by its "
                    "line or argument), 2 a usage error or a broker that cannot be reached."
                    % PUT_AT_ONCE)
    parser.add_argument("--url", required=True, help="the broker, e.g. http://127.0.0.1:8080")
    parser.add_argument("--token", default=None,
                        help="the broker's --token (default: $BROKER_TOKEN)")
    parser.add_argument("--token-file", default=None, metavar="FILE",
                        help="read the token from FILE (default: $BROKER_TOKEN_FILE)")
    parser.add_argument("--key", help="the idempotency key of the job (one job only)")
    parser.add_argument("--delay-ms", type=_non_negative_int, default=None, metavar="N",
                        help="each job is leased no sooner than N ms from its accept")
    parser.add_argument("jobs", nargs="*", metavar="JOB", help="a job, as JSON")
    args = parser.parse_args(argv)
    token = _tool_token(args.token, args.token_file)
    named = [("argument %d" % (i + 1), text) for i, text in enumerate(args.jobs)] or \
        [("line %d" % (i + 1), line) for i, line in enumerate(sys.stdin) if line.strip()]
    if args.key is not None and len(named) != 1:
        parser.error("--key names one job: give one JOB")
    jobs, refused = [], 0
    for where, text in named:
        try:
            job = json.loads(text)
            if not isinstance(job, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            print("%s: not a job: %s" % (where, error), file=sys.stderr)
            refused += 1
            continue
        if args.key is not None:
            job.setdefault("key", args.key)
        if args.delay_ms is not None:
            job.setdefault("delay_ms", args.delay_ms)
        jobs.append((where, job))
    for start in range(0, len(jobs), PUT_AT_ONCE):
        refused += _put_request(args.url, token, jobs[start:start + PUT_AT_ONCE])
    return 1 if refused else 0


def _put_request(url, token, jobs):
    """Enqueue `jobs` [(where, job)], printing their ids; a job the broker
    refuses (400 naming it) is named and left out, the rest sent again.
    Returns how many were refused."""
    refused, pause = 0, 0.5
    while jobs:
        try:
            answer = _post_json(url, "/enqueue", [job for _where, job in jobs], token)
        except HTTPAnswer as error:
            if error.status == 503:
                time.sleep(pause * random.uniform(0.5, 1.0) if error.retry_after is None
                           else max(pause, float(error.retry_after)))
                pause = min(pause * 2, 30.0)
                continue
            index = re.match(r"job (\d+): ", str(error))
            if error.status != 400 or index is None or int(index.group(1)) >= len(jobs):
                raise ToolError("%s answered %d: %s" % (url, error.status, error)) from None
            where, _job = jobs.pop(int(index.group(1)))
            print("%s: refused: %s" % (where, str(error)[index.end():]), file=sys.stderr)
            refused += 1
            continue
        for job_id in answer["ids"]:
            print(job_id)
        return refused
    return refused


# ---------------------------------------------------------------------------
# Appendix D. One CPU (--pin): OneCore
# ---------------------------------------------------------------------------

class OneCore:
    """Keeps the broker's threads on one CPU: the default, --no-pin turns it off.

    The broker's Python threads take turns holding the GIL, handing it to
    each other several times for every report. Spread over cores, each
    hand-off wakes a thread on another core and waits for it: under 8 Go
    clients (as bench/gobench.py loads it, 2 cores) the broker made 27,000
    context switches and 2,400 migrations a second and spent 300 µs of CPU
    per report. On one core the next thread simply runs after the last: 6,600
    switches a second, 170 µs a report, 1.6 times the messages a second.
    What pinning gives up is the kernel's work on the broker's sockets
    running beside its Python code on another core: the kernel is 11% of
    the broker's time (perf), so that is the most a second core could add.

    Pinned, the broker can no longer be moved by the kernel off a core that
    other work keeps busy. So `balance()`, every BALANCE_SECONDS, reads the
    cores' busy shares from /proc/stat, and moves the threads to the idlest
    allowed core when other work takes more of theirs than that one is busy.
    """

    MARGIN = 0.25  # of a core: no move for less (nor back and forth)

    def __init__(self, allowed):
        self.allowed = allowed  # the CPUs the broker was given (a child gets them back)
        self.cpu = None
        self._last = None  # (monotonic time, own CPU seconds, {cpu: (busy, total) ticks})

    @classmethod
    def start(cls):
        """Pin every thread of the broker to the CPU it runs on now; None
        where there is no choice (one CPU allowed) or no affinity (not Linux)."""
        if not hasattr(os, "sched_setaffinity"):
            return None
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) < 2:
            return None
        pin = cls(allowed)
        pin.move(_current_cpu(allowed))
        log.info("the broker's threads run on CPU %d of %s (--no-pin lets them spread)",
                 pin.cpu, _cpu_list(allowed))
        pin._last = pin._sample()
        return pin

    def move(self, cpu):
        """All the broker's threads onto `cpu`; the threads it starts from
        now on inherit it from their creator."""
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), {cpu})
            except OSError:
                pass  # (a thread that has just ended)
        self.cpu = cpu

    def release(self, pid):
        """A child process (`--workers`) gets the broker's CPUs back."""
        try:
            os.sched_setaffinity(pid, self.allowed)
        except OSError:
            pass  # (it has exited already)

    def _sample(self):
        times = os.times()
        return time.monotonic(), times.user + times.system, _cpu_ticks()

    def balance(self):
        """Move to the idlest core if other work crowds this one (see above)."""
        last, self._last = self._last, self._sample()
        (then, own_then, ticks_then), (now, own_now, ticks_now) = last, self._last
        busy = {}
        for cpu in self.allowed:
            if cpu in ticks_then and cpu in ticks_now:
                total = ticks_now[cpu][1] - ticks_then[cpu][1]
                busy[cpu] = (ticks_now[cpu][0] - ticks_then[cpu][0]) / total if total > 0 else 0.0
        if self.cpu not in busy or now <= then:
            return
        crowding = busy[self.cpu] - (own_now - own_then) / (now - then)  # others' share of ours
        idlest = min((cpu for cpu in busy if cpu != self.cpu), key=busy.get, default=None)
        if idlest is not None and busy[idlest] + self.MARGIN < crowding:
            was = self.cpu
            self.move(idlest)  # (then the line: once it is out, the threads are there)
            log.info("CPU %d is %.0f%% busy with other work, CPU %d %.0f%%: moved the "
                     "broker's threads there", was, 100 * crowding, idlest, 100 * busy[idlest])


def _current_cpu(allowed):
    """The CPU this thread runs on now (field 39 of its stat), else the first allowed."""
    try:
        with open("/proc/thread-self/stat") as f:
            cpu = int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return allowed[0]
    return cpu if cpu in allowed else allowed[0]


def _cpu_ticks():
    """{cpu: (busy ticks, all ticks)} since boot, from /proc/stat ({} without it)."""
    ticks = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3:4].isdigit():
                    name, *fields = line.split()
                    user, nice, system, idle, iowait, irq, softirq, steal = (
                        int(n) for n in (fields + ["0"] * 8)[:8])
                    busy = user + nice + system + irq + softirq + steal
                    ticks[int(name[3:])] = (busy, busy + idle + iowait)
    except (OSError, ValueError):
        return {}
    return ticks


def _cpu_list(cpus):
    """[0, 1, 2, 5] -> "0-2,5"."""
    ranges = []
    for cpu in cpus:
        if ranges and ranges[-1][1] == cpu - 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join("%d" % a if a == b else "%d-%d" % (a, b) for a, b in ranges)


# ---------------------------------------------------------------------------
# Appendix E. The trace file (--trace): TraceFile
# ---------------------------------------------------------------------------

class TraceFile:
    """JSON lines of every lease start and end, in the order they happened.

    Appended to, so that runs of a restarted broker add up. `worker` is the
    stream's number in this run (0: no stream, a failure found at a
    --durable start). The dispatcher calls this under its lock, so a line is
    only queued there; a thread of its own writes the lines, a batch at a
    time. A write that fails (a full disk) is logged, shown by /healthz, and
    tried again each second; the dispatcher never waits for this file.
    """

    RETRY_SECONDS = 1.0
    # While the file cannot be written, the newest lines are kept up to this
    # many bytes (about 450 lines); older ones are dropped and counted. (On a
    # disk the db shares, a trace kept whole would take, once written, the
    # room the dead letters need.)
    MAX_BACKLOG_BYTES = 64 * 1024

    def __init__(self, path):
        self.path = path
        self._created = not os.path.exists(path)
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as error:
            raise StartError("cannot open the trace file %s: %s" % (
                path, error.strerror or error)) from None
        self._lines = queue.SimpleQueue()
        self._unwritten = b""  # lines taken from the queue, not yet in the file
        self._stopping = False
        self.error = None      # the last write's error, while it lasts
        self.dropped = 0       # lines lost for good (over MAX_BACKLOG_BYTES waited)
        self.thread = threading.Thread(target=self._run, name="trace-writer", daemon=True)

    def __call__(self, kind, message, session):
        line = '{"t":%.6f,"pid":%d,"event":"%s","id":"%s","worker":%d,"batch":%d,"attempt":%d,' \
            '"period":%s' % (time.time(), os.getpid(), kind, message.id,
                             session.number if session else 0, message.batch, message.attempts,
                             "null" if message.period is None else message.period)
        if kind in ("failed", "dead"):
            line += ',"reason":"%s"' % message.reason
        self._lines.put(line + "}\n")

    def _run(self):
        while True:
            lines = []
            try:
                lines.append(self._lines.get(timeout=0.5))
                while True:
                    lines.append(self._lines.get_nowait())
            except queue.Empty:
                pass
            if lines:
                self._unwritten += "".join(lines).encode("ascii")
                # (Lines pile up only while writes fail: cut only then.)
                excess = len(self._unwritten) - self.MAX_BACKLOG_BYTES if self.error else 0
                if excess > 0:
                    cut = self._unwritten.index(b"\n", excess - 1) + 1  # (whole lines)
                    self.dropped += self._unwritten.count(b"\n", 0, cut)
                    self._unwritten = self._unwritten[cut:]
            if self._unwritten and not self._write():
                if self._stopping:
                    return
                time.sleep(self.RETRY_SECONDS)
            elif self._stopping and self._lines.empty():
                return

    def _write(self):
        try:
            while self._unwritten:  # (a short write on a full disk leaves the rest)
                written = os.write(self._fd, self._unwritten)
                self._unwritten = self._unwritten[written:]
        except OSError as error:
            if self.error is None:
                log.error("cannot write the trace file %s (%d lines kept, retrying): %s",
                          self.path, self._unwritten.count(b"\n"), error)
            self.error = str(error)
            return False
        if self.error is not None:
            self.error = None
            log.info("the trace file %s can be written again", self.path)
        return True

    def discard(self):
        """A start that failed: close, and remove the file if this made it empty."""
        os.close(self._fd)
        if self._created and os.path.getsize(self.path) == 0:
            os.unlink(self.path)

    def close(self, timeout):
        """Write what is queued, waiting at most `timeout` s; returns how many
        lines are not in the file (0 when all are)."""
        self._stopping = True
        self.thread.join(timeout)
        unwritten = self.dropped + self._unwritten.count(b"\n") + self._lines.qsize()
        os.close(self._fd)
        return unwritten


if __name__ == "__main__":
    sys.exit(main())
