#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""worker.py: takes batches from broker.py over Server-Sent Events, runs them.

The worker picks a batchsize (2..10 unless given), streams
``GET /task?batchsize=N`` from the broker, and runs each message it receives
in a thread of its own:

* ``period > 900``: the whole worker process ends, exit status 3;
* ``period > 800``: the task raises (logged; the worker lives on);
* otherwise the task sleeps ``period`` ms (times ``--time-scale``) and succeeds.

With ``--exec CMD`` each message runs a command instead, its payload as JSON
on standard input (exit 0: done; 100: failed for good; any other: failed,
the end of its standard error the error), and with ``--handler
PATH.py:FUNCTION`` a Python function, ``FUNCTION(payload, message)``;
``--task-timeout`` ends a task that runs too long.

A message that arrives while ``batchsize`` tasks already run is refused
(logged, not reported). When every task of a batch has ended, the worker
reports the ids that succeeded with ``POST /report``; a batch still running
after half a lease is touched (``POST /touch``) so it keeps its lease. If the
stream is lost, the worker abandons its batch (its tasks stop and are not
reported) and reconnects with capped exponential backoff and jitter. On SIGTERM or SIGINT
the worker takes no new batch, lets the tasks in hand end, reports them and
exits 0; a second signal abandons them and exits at once. The wire protocol
is PROTOCOL.md.

Run::

    python worker.py                         # one worker, http://127.0.0.1:8080
    python worker.py --processes 4           # four, each restarted when it exits
    python worker.py --time-scale 0.01       # 100 times faster work
    python worker.py --exec 'python3 job.py' # your own work, a process per message

Flags (``python worker.py --help``): --url, --batchsize, --time-scale,
--seed, --token, --token-file, --cafile (for an https:// --url), --exec,
--handler, --task-timeout, --processes,
--parent-pid, --log-level, --version. Standard library
only, Python 3.9 or newer; this file works on its own.
"""

__version__ = "1.1.0"

import argparse
import codecs
import http.client
import importlib
import importlib.util
import json
import logging
import os
import random
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

try:
    import ssl
except ImportError:  # a Python built without OpenSSL: http:// only
    ssl = None

log = logging.getLogger("worker")

DEFAULT_URL = "http://127.0.0.1:8080"
MIN_BATCHSIZE, MAX_BATCHSIZE = 2, 10
EXIT_PERIOD_MS = 900    # a period above this ends the process
RAISE_PERIOD_MS = 800   # a period above this makes the task raise
EXIT_STATUS_PERIOD = 3
EXIT_STATUS_USAGE = 2
EXIT_STATUS_BUG = 1
CONNECT_TIMEOUT = 10.0
REPORT_TIMEOUT = 10.0
FENCE_WAIT = 2.0  # seconds a fenced batch's tasks have to stop before the stream ends
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
# Before the broker's hello says otherwise, how long a silent stream may last.
DEFAULT_HEARTBEAT_MS = 15000
HEARTBEATS_BEFORE_DEAD = 3
# --processes: a worker that ends sooner than this, other than by exit 3, is
# failing; its restarts back off from the first delay to the last, doubling.
QUICK_EXIT_SECONDS = 5.0
RESTART_BACKOFF_MIN, RESTART_BACKOFF_MAX = 0.5, 30.0


# What a lost connection raises: a chunked stream cut before its last chunk
# raises http.client.IncompleteRead, which is neither an OSError nor a URLError.
NETWORK_ERRORS = (urllib.error.URLError, OSError, ValueError, http.client.HTTPException)


class FatalError(Exception):
    """A problem that retrying cannot fix (the broker refuses our request)."""


class TaskFailed(Exception):
    """What a task raises for a period above RAISE_PERIOD_MS."""


class JobFailed(Exception):
    """A task that failed with a reason to report (PROTOCOL.md, "POST
    /report"): its error text, and `final` if the job can never succeed."""

    def __init__(self, error, final=False):
        super().__init__(error)
        self.error = error
        self.final = final


class TaskInterrupted(BaseException):
    """Raised in a --handler's thread when its task must end (its timeout,
    or its batch abandoned). A BaseException: `except Exception` in a
    handler does not swallow it."""


# ---------------------------------------------------------------------------
# Server-Sent Events parsing (WHATWG HTML, "server-sent events")
# ---------------------------------------------------------------------------

_END_OF_LINE = re.compile(r"\r\n|\r|\n")


class SSEParser:
    """Incremental event-stream parser: feed bytes, get (event, data, id) tuples.

    Lines end with CRLF, LF or CR; a blank line dispatches the event; lines
    starting with ':' are comments; `retry` sets `self.retry_ms`.
    """

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._skip_lf = False  # the last chunk ended in CR: an LF now is its other half
        self._first = True
        self._event_type = ""
        self._data = []
        self.last_event_id = ""
        self.retry_ms = None
        self.comments = 0

    def feed(self, chunk):
        text = self._decoder.decode(chunk)
        if self._first and text:
            self._first = False
            if text.startswith("\ufeff"):
                text = text[1:]
        if self._skip_lf and text:
            self._skip_lf = False
            if text.startswith("\n"):
                text = text[1:]
        buffer = self._buffer + text
        events = []
        pos = 0
        while True:
            end = _END_OF_LINE.search(buffer, pos)
            if end is None:
                break
            event = self._line(buffer[pos:end.start()])
            pos = end.end()
            if event is not None:
                events.append(event)
        if buffer.endswith("\r") and pos == len(buffer):
            self._skip_lf = True  # a CR ends the line now; an LF next would be CRLF's half
        self._buffer = buffer[pos:]
        return events

    def _line(self, line):
        if line == "":
            if not self._data:
                self._event_type = ""
                return None
            event = (self._event_type or "message", "\n".join(self._data), self.last_event_id)
            self._event_type = ""
            self._data = []
            return event
        if line.startswith(":"):
            self.comments += 1
            return None
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "event":
            self._event_type = value
        elif field == "data":
            self._data.append(value)
        elif field == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif field == "retry":
            if value.isdigit() and value.isascii():
                self.retry_ms = int(value)
        return None


# ---------------------------------------------------------------------------
# What a task does: sleep (the seed's), a command (--exec), a function (--handler)
# ---------------------------------------------------------------------------
#
# Each runner's run(message, cancel, timeout) is called in the task's thread
# with the msg event's fields; it returns True (done) or False (stopped
# because `cancel` was set: its batch is abandoned, nothing is reported), or
# raises JobFailed (reported as failed, with its error).

NO_HANDLER = "no handler for a payload (use --exec or --handler)"
ERROR_BYTES = 1024        # an error's text at most, in UTF-8 (as the broker keeps it)
EXIT_STATUS_FINAL = 100   # an --exec command's: the job can never succeed
INTERRUPT_GRACE = 2.0     # seconds a --handler task has to stop once told to
EXIT_STATUS_STUCK = 4     # the worker's, when a --handler task would not stop


def cut_error(text, last=False):
    """`text` cut to ERROR_BYTES of UTF-8 (its first, or its `last`, bytes)."""
    data = text.encode("utf-8", "replace")
    if len(data) <= ERROR_BYTES:
        return text
    data = data[-ERROR_BYTES:] if last else data[:ERROR_BYTES]
    return data.decode("utf-8", "ignore")


class Sleeper:
    """The seed's task: sleep `period` ms times --time-scale (> 800 raises,
    > 900 ends the worker process); a message with a payload and no period
    fails, for want of a handler."""

    def __init__(self, time_scale):
        self.time_scale = time_scale

    def run(self, message, cancel, timeout):
        period, message_id = message.get("period"), message["id"]
        if period is None:
            raise JobFailed(NO_HANDLER)
        if period > EXIT_PERIOD_MS:  # (the seed's rule: intended, so INFO)
            log.info("message %s: period %d ms > %d: ending the worker process (exit %d)",
                     message_id, period, EXIT_PERIOD_MS, EXIT_STATUS_PERIOD)
            logging.shutdown()
            os._exit(EXIT_STATUS_PERIOD)
        if period > RAISE_PERIOD_MS:
            raise TaskFailed("message %s: period %d ms > %d" % (message_id, period,
                                                                RAISE_PERIOD_MS))
        seconds = period / 1000.0 * self.time_scale
        if timeout is not None and timeout < seconds:
            if cancel.wait(timeout):
                return False
            raise JobFailed("timed out")
        # Sleep, unless the stream is lost first: then stop, unreported.
        return not cancel.wait(seconds)


# The reaper (a process of its own, one per --exec worker) reads "+PGID" and
# "-PGID" lines: the process groups of the tasks running. When its standard
# input ends, the worker is gone (even by SIGKILL): it kills the groups left.
REAPER = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
groups = set()
for line in sys.stdin:
    (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
for group in groups:
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
"""


class CommandRunner:
    """--exec CMD: each message runs CMD in a process group of its own, with
    the payload as JSON on standard input and BROKER_MSG_* in its
    environment. Exit 0 is done, EXIT_STATUS_FINAL failed for good, any
    other failed with the last ERROR_BYTES of standard error as the error.
    Its output lines are the worker's, prefixed with the message id. When
    the command ends, what it left running in its group is killed; at its
    timeout or when its batch is abandoned, the whole group is."""

    def __init__(self, command):
        self.argv = shlex.split(command)
        if not self.argv:
            raise ValueError("--exec: an empty command")
        self._output_lock = threading.Lock()
        self._reaper_lock = threading.Lock()
        self._reaper = None

    def start(self):
        """The reaper: started in the worker process that runs the tasks."""
        # (A session of its own: a signal to the worker's process group,
        # `kill -9 -PGID` say, does not take it with the worker.)
        self._reaper = subprocess.Popen([sys.executable, "-c", REAPER], stdin=subprocess.PIPE,
                                        start_new_session=True)

    def _tell_reaper(self, line):
        with self._reaper_lock:
            try:
                self._reaper.stdin.write(line.encode("ascii"))
                self._reaper.stdin.flush()
            except (OSError, ValueError):  # (gone: the tasks are still killed by us)
                pass

    def run(self, message, cancel, timeout):
        message_id = message["id"]
        env = dict(os.environ, BROKER_MSG_ID=message_id,
                   BROKER_MSG_ATTEMPT=str(message.get("attempt", 1)))
        env.pop("BROKER_MSG_PERIOD", None)
        if message.get("period") is not None:
            env["BROKER_MSG_PERIOD"] = str(message["period"])
        payload = (json.dumps(message["payload"]) + "\n").encode("utf-8") \
            if "payload" in message else b""
        try:
            process = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, env=env, start_new_session=True)
        except OSError as error:
            raise JobFailed("cannot run %s: %s" % (self.argv[0], error.strerror or error))
        self._tell_reaper("+%d\n" % process.pid)
        try:
            return self._wait(process, message_id, payload, cancel, timeout)
        finally:
            self._tell_reaper("-%d\n" % process.pid)

    def _wait(self, process, message_id, payload, cancel, timeout):
        prefix = message_id.encode("ascii", "replace") + b": "
        tail = bytearray()  # the last ERROR_BYTES of its standard error
        threads = [threading.Thread(target=self._feed, args=(process.stdin, payload)),
                   threading.Thread(target=self._copy, args=(
                       process.stdout, prefix, sys.stdout, None)),
                   threading.Thread(target=self._copy, args=(
                       process.stderr, prefix, sys.stderr, tail))]
        for thread in threads:
            thread.daemon = True
            thread.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        why = None
        while why is None:
            try:
                process.wait(0.05)
                break
            except subprocess.TimeoutExpired:
                pass
            if cancel.is_set():
                why = "abandoned"
            elif deadline is not None and time.monotonic() >= deadline:
                why = "timed out"
        try:
            os.killpg(process.pid, signal.SIGKILL)  # all of it, or what it left running
        except OSError:
            pass  # (none left)
        process.wait()
        for thread in threads:
            thread.join()
        if why == "abandoned":
            return False
        if why is not None:
            raise JobFailed(why)
        code = process.returncode
        if code == 0:
            return True
        error = tail.decode("utf-8", "replace").strip()
        if not error:
            error = "exit status %d" % code if code > 0 else _describe_exit(code)
        raise JobFailed(cut_error(error, last=True), final=code == EXIT_STATUS_FINAL)

    @staticmethod
    def _feed(pipe, payload):
        try:
            pipe.write(payload)
        except OSError:
            pass  # (it did not read it all: its business)
        finally:
            try:
                pipe.close()
            except OSError:
                pass

    def _copy(self, pipe, prefix, to, tail):
        """Each line of `pipe` to `to`, prefixed; the last bytes kept in `tail`."""
        out = getattr(to, "buffer", None)
        for line in pipe:
            if tail is not None:
                tail += line
                del tail[:-ERROR_BYTES]
            if out is not None:
                with self._output_lock:
                    try:
                        out.write(prefix + line if line.endswith(b"\n") else
                                  prefix + line + b"\n")
                        out.flush()
                    except (OSError, ValueError):
                        out = None  # (its output is closed: keep reading, or it blocks)
        pipe.close()


def load_handler(spec):
    """--handler PATH.py:FUNCTION or MODULE:FUNCTION: the function. ValueError
    saying what is wrong (the worker's one line at start)."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ValueError("--handler %s: expected PATH.py:FUNCTION or MODULE:FUNCTION" % spec)
    try:
        if target.endswith(".py"):
            path = os.path.abspath(target)
            if not os.path.isfile(path):
                raise ValueError("no such file")
            module_name = os.path.splitext(os.path.basename(path))[0]
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.path.insert(0, os.path.dirname(path))  # (its neighbours import as they would)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # (as `python -m` finds modules)
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
        function = getattr(module, name, None)
        if not callable(function):
            raise ValueError("%s has no function %s" % (target, name))
    except ValueError as error:
        raise ValueError("--handler %s: %s" % (spec, error)) from None
    except BaseException as error:  # (its code ran: whatever it raised, even SystemExit)
        raise ValueError("--handler %s: cannot import it: %s: %s" % (
            spec, type(error).__name__, error)) from None
    return function


def _interrupt(thread_id, raising=True):
    """Raise TaskInterrupted in thread `thread_id` (at its next bytecode:
    not inside a call into C, a sleep say, until that returns); not
    `raising`: take back one not yet raised. False where it cannot be done
    (no ctypes, or not CPython)."""
    try:
        import ctypes
        return ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread_id),
            ctypes.py_object(TaskInterrupted) if raising else None) == 1
    except (ImportError, AttributeError):
        return False


class HandlerRunner:
    """--handler: FUNCTION(payload, message) in the task's thread. A return
    is done; an exception failed (`Type: text`), final if it has a true
    `final` attribute. At its timeout, or when its batch is abandoned, it is
    told to stop (TaskInterrupted is raised in its thread); a handler that
    has not stopped INTERRUPT_GRACE seconds later ends the worker process
    (exit status 4), as a thread cannot be killed: the message must not run
    here while it runs elsewhere."""

    def __init__(self, function):
        self.function = function

    def run(self, message, cancel, timeout):
        thread_id = threading.get_ident()
        guard = threading.Lock()
        state = {"running": True, "why": None}
        finished = threading.Event()
        watcher = threading.Thread(target=self._watch, name="watch-%s" % message["id"], args=(
            message["id"], thread_id, guard, state, finished, cancel, timeout), daemon=True)
        watcher.start()
        try:
            try:
                self.function(message.get("payload"), dict(message))
            finally:
                with guard:
                    state["running"] = False
                    if state["why"] is not None:  # (told, maybe not yet raised: no more)
                        _interrupt(thread_id, raising=False)
                finished.set()
        except TaskInterrupted:
            pass
        except Exception as error:
            finished.set()
            if state["why"] is None:
                raise JobFailed(cut_error("%s: %s" % (type(error).__name__, error)),
                                final=bool(getattr(error, "final", False))) from None
        if state["why"] == "abandoned":
            return False
        if state["why"] is not None:
            raise JobFailed(state["why"])
        return True

    @staticmethod
    def _watch(message_id, thread_id, guard, state, finished, cancel, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        while not finished.wait(0.05):
            why = "abandoned" if cancel.is_set() else "timed out" \
                if deadline is not None and time.monotonic() >= deadline else None
            if why is None:
                continue
            with guard:
                if not state["running"]:
                    return
                state["why"] = why
                _interrupt(thread_id)
            if not finished.wait(INTERRUPT_GRACE):
                log.error("message %s: its handler did not stop %.0f s after it %s: ending "
                          "the worker process (exit %d), so that it does not run on while "
                          "another worker runs the message", message_id, INTERRUPT_GRACE,
                          "was abandoned" if why == "abandoned" else "timed out",
                          EXIT_STATUS_STUCK)
                logging.shutdown()
                os._exit(EXIT_STATUS_STUCK)
            return


# ---------------------------------------------------------------------------
# One worker process
# ---------------------------------------------------------------------------

class BatchInHand:
    """A batch being worked on: how many of its tasks ended, which succeeded."""

    def __init__(self, number, size):
        self.number = number
        self.size = size
        self.lock = threading.Lock()
        self.ended = 0
        self.succeeded = []
        self.failed = []   # {"id", "error"[, "final"]} of the tasks that failed with an error
        self.raised = 0
        self.refused = 0
        self.started = self.touched = time.monotonic()  # touched: its lease last extended


class Stream:
    """One connection to the broker: its token, and `lost` once it is gone."""

    def __init__(self, base_url):
        self.base_url = base_url
        self.token = None
        self.heartbeat_ms = DEFAULT_HEARTBEAT_MS
        self.lease_ms = None       # from hello: batches are touched every half of it
        # `lock` guards `batches`: the stream thread adds and abandons
        # batches while task threads take out those that are complete.
        self.lock = threading.Lock()
        self.batches = {}          # batch number -> BatchInHand
        self.lost = threading.Event()
        self.sock = None           # the stream's socket, to end it when draining
        self.fenced = False        # ended here: a lease was not renewed in time


class Worker:
    def __init__(self, url, batchsize, time_scale=1.0, rng=None, token=None, cafile=None,
                 runner=None, task_timeout=None):
        # One broker, or several serving one queue (broker.py --jetstream):
        # a stream that is lost or refused moves on to the next.
        self.urls = [u.strip().rstrip("/") for u in url.split(",") if u.strip()]
        self._at = 0
        # https://: the system's CA certificates, or those of --cafile.
        self._tls = None
        if any(u.startswith("https://") for u in self.urls):
            if ssl is None:
                raise FatalError("this Python has no ssl module: it cannot reach https:// URLs")
            self._tls = ssl.create_default_context(cafile=cafile)
        # (Its UTF-8 bytes, as curl sends it: http.client writes a header's
        # characters as latin-1, one byte each.)
        self.auth = {"Authorization": "Bearer " + token.encode("utf-8").decode("latin-1")} \
            if token else {}
        self.batchsize = batchsize
        self.time_scale = time_scale
        # What each task does (Sleeper, CommandRunner or HandlerRunner), and
        # for how long at most (seconds, or None).
        self.runner = runner if runner is not None else Sleeper(time_scale)
        self.task_timeout = task_timeout
        self.rng = rng or random.Random()
        # _lock guards _running: the tasks running now, across batches.
        self._lock = threading.Lock()
        self._running = 0
        self.exit_status = 0
        # Set by the first signal: take no new batch, finish and report the
        # ones in hand, then end the stream and stop.
        self.draining = threading.Event()
        self._stream = None  # the stream being served

    # -- connecting -----------------------------------------------------------

    @property
    def url(self):
        """The broker served now."""
        return self.urls[self._at]

    def _fail_over(self):
        """The broker did not serve: the next one of --url (if more are given)."""
        if len(self.urls) > 1:
            self._at = (self._at + 1) % len(self.urls)
            log.info("trying the next broker: %s", self.url)

    def _open(self, request, timeout):
        return urllib.request.urlopen(request, timeout=timeout, context=self._tls)

    def run_forever(self, stop):
        """Serve streams until `stop` is set; reconnect with backoff."""
        backoff = BACKOFF_MIN
        while not stop.is_set() and not self.draining.is_set():
            try:
                if self.serve_stream():
                    backoff = BACKOFF_MIN  # it worked for a while: start over
            except urllib.error.HTTPError as error:
                # (503: it is stopping, or full; it says so, and it passes.)
                (log.info if error.code == 503 else log.warning)(
                    "broker answered %d: %s", error.code, _error_text(error))
                self._fail_over()
            except NETWORK_ERRORS as error:
                hopeless = _hopeless_tls_error(error)
                if hopeless:
                    raise FatalError("%s: %s (retrying cannot fix it)" % (self.url, hopeless)) \
                        from error
                if not self.draining.is_set():  # (a drain ends its own stream)
                    log.warning("stream lost: %s", getattr(error, "reason", None) or error)
                    self._fail_over()
            delay = backoff / 2 + self.rng.uniform(0, backoff / 2)
            if self.draining.is_set():
                return
            log.info("reconnecting in %.2f s", delay)
            stop.wait(delay)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def serve_stream(self):
        """One stream, to its end. True if the broker said hello."""
        stream = Stream(self.url)
        request = urllib.request.Request(
            "%s/task?batchsize=%d" % (self.url, self.batchsize),
            headers=dict(self.auth, **{"Accept": "text/event-stream", "Cache-Control": "no-store"}))
        try:
            response = self._open(request, CONNECT_TIMEOUT)
        except urllib.error.HTTPError as error:
            if 400 <= error.code < 500 and error.code != 429:
                raise FatalError("broker refused the stream: %d %s"
                                 % (error.code, _error_text(error))) from error
            raise
        hello = False
        stream.sock = _socket_of(response)
        self._stream = stream
        try:
            content_type = response.headers.get("Content-Type", "")
            if not content_type.startswith("text/event-stream"):
                raise ValueError("not an event stream: Content-Type %r" % content_type)
            _set_read_timeout(response, HEARTBEATS_BEFORE_DEAD * stream.heartbeat_ms / 1000)
            parser = SSEParser()
            while True:
                chunk = response.read1(65536)
                if not chunk:
                    if stream.fenced:  # (this broker does not answer: the next one)
                        self._fail_over()
                    elif not self.draining.is_set():
                        log.warning("stream closed by the broker")
                    return hello
                for event, data, _event_id in parser.feed(chunk):
                    if event == "hello":
                        hello = self._on_hello(stream, response, data)
                    elif event == "msg":
                        self._on_message(stream, data)
                    elif event == "bye":
                        log.info("broker said bye: %s", data)
                        return hello
                    else:
                        log.debug("ignoring event %r", event)
        finally:
            self._abandon(stream)
            response.close()

    def drain(self):
        """The first signal: take no new batch. With none in hand, end the
        stream now; otherwise its last report (`last=1`) ends it."""
        self.draining.set()
        stream = self._stream
        if stream is None:
            return
        with stream.lock:
            idle = not stream.batches
        if idle:
            log.info("draining: no batch in hand, closing the stream")
            _end_stream(stream)
        else:
            log.info("draining: finishing and reporting the batch in hand (a second signal "
                     "abandons it)")

    def _abandon(self, stream):
        """The stream is lost: its tasks stop, and nothing in hand is reported."""
        stream.lost.set()
        with stream.lock:
            abandoned = [b for b in stream.batches.values() if b.ended < b.size]
        for batch in abandoned:
            log.warning("abandoning batch %d (%d of %d tasks ended)",
                        batch.number, batch.ended, batch.size)

    def _on_hello(self, stream, response, data):
        hello = json.loads(data)
        stream.token = hello["worker"]
        stream.heartbeat_ms = int(hello.get("heartbeat_ms", DEFAULT_HEARTBEAT_MS))
        _set_read_timeout(response, HEARTBEATS_BEFORE_DEAD * stream.heartbeat_ms / 1000)
        if stream.lease_ms is None and isinstance(hello.get("lease_ms"), int) \
                and hello["lease_ms"] > 0:
            stream.lease_ms = hello["lease_ms"]
            threading.Thread(target=self._touch_batches, args=(stream,), name="toucher",
                             daemon=True).start()
        log.info("connected to %s, batchsize %d", self.url, self.batchsize)
        return True

    # -- messages and tasks -----------------------------------------------------

    def _on_message(self, stream, data):
        try:
            message = json.loads(data)
            message_id, period = message["id"], message.get("period")
            number, size = message["batch"], message["size"]
            if period is None and "payload" not in message:
                raise KeyError("period")
            if not (isinstance(message_id, str) and isinstance(period, (int, type(None)))
                    and isinstance(number, int) and isinstance(size, int) and size >= 1):
                raise ValueError("wrong field types")
        except (ValueError, KeyError, TypeError) as error:
            log.error("malformed msg event %r: %s", data[:200], error)
            return
        if stream.token is None:
            log.error("msg before hello: ignoring message %s", message_id)
            return
        with stream.lock:
            batch = stream.batches.get(number)
            if batch is None:
                batch = stream.batches[number] = BatchInHand(number, size)
        if period is None and type(self.runner) is Sleeper:  # (no need of a thread)
            self._task_ended(stream, batch, message_id, False, JobFailed(NO_HANDLER))
            return
        with self._lock:
            running = self._running
            refuse = running >= self.batchsize
            if not refuse:
                self._running += 1
        if refuse:
            log.error("over capacity (all %d task slots busy): refusing message %s of batch %d",
                      running, message_id, number)
            with batch.lock:
                batch.refused += 1
            self._task_ended(stream, batch, message_id, False)
            return
        log.debug("batch %d: starting message %s (%s)", number, message_id,
                  "payload" if period is None else "period %d ms" % period)
        thread = threading.Thread(target=self._run_task, args=(stream, batch, message),
                                  name="task-%s" % message_id, daemon=True)
        thread.start()

    def _run_task(self, stream, batch, message):
        succeeded, failure = False, None
        try:
            succeeded = self.runner.run(message, stream.lost, self.task_timeout)
        except JobFailed as error:
            failure = error
        except Exception:
            with batch.lock:
                batch.raised += 1
            raise  # the thread dies; threading.excepthook logs it
        finally:
            with self._lock:
                self._running -= 1
            self._task_ended(stream, batch, message["id"], succeeded, failure)

    def _task_ended(self, stream, batch, message_id, succeeded, failure=None):
        """`failure`: the JobFailed it raised, reported with its error."""
        if failure is not None:
            log.warning("message %s failed%s: %s", message_id,
                        " (final)" if failure.final else "", failure.error)
        else:
            log.debug("batch %d: message %s ended, %s", batch.number, message_id,
                      "done" if succeeded else "not done")
        with batch.lock:
            batch.ended += 1
            if succeeded:
                batch.succeeded.append(message_id)
            elif failure is not None:
                entry = {"id": message_id, "error": failure.error}
                if failure.final:
                    entry["final"] = True
                batch.failed.append(entry)
            complete = batch.ended == batch.size
        if complete and not stream.lost.is_set():
            with stream.lock:
                stream.batches.pop(batch.number, None)
                last = self.draining.is_set() and not stream.batches
            self._report(stream, batch, last)
            if last:  # (the broker ends the stream after a last report; an old one may not)
                _end_stream(stream)

    # -- touching: a slow batch keeps its lease ---------------------------------

    def _touch_batches(self, stream):
        """While the stream lives, touch each batch in hand that has run half
        a lease since its lease began or was last extended (PROTOCOL.md,
        "Worker rules").

        And fence: a batch whose lease was not renewed (no touch answered
        200) within a whole lease of its start or of its last renewal may be
        another worker's by now, if its broker stalled and could not close
        this stream: its tasks stop, unreported, and the worker reconnects
        (to the next broker of --url, if more are given)."""
        lease = stream.lease_ms / 1000.0
        half = lease / 2
        while not stream.lost.wait(half / 4):
            now = time.monotonic()
            with stream.lock:
                in_hand = list(stream.batches.values())
            for batch in in_hand:
                if now - batch.touched >= lease:
                    log.warning("batch %d: its lease was not renewed within %.1f s (the broker "
                                "does not answer): abandoning it and reconnecting",
                                batch.number, lease)
                    stream.fenced = True
                    stream.lost.set()  # (its tasks stop now)
                    # Only once they have stopped does the broker hear of it
                    # (the stream's end), and give the messages to another.
                    deadline = time.monotonic() + FENCE_WAIT
                    while time.monotonic() < deadline and any(
                            b.ended < b.size for b in in_hand):
                        time.sleep(0.002)
                    _end_stream(stream)
                    return
            for batch in in_hand:
                if now - batch.touched >= half:
                    self._touch(stream, batch, batch.touched + lease - now)

    def _touch(self, stream, batch, within):
        """Touch `batch`; give up after `within` seconds (its lease is gone then)."""
        url = "%s/touch?%s" % (stream.base_url, urllib.parse.urlencode(
            {"worker": stream.token, "batch": batch.number}))
        sent = time.monotonic()
        request = urllib.request.Request(url, data=b"", method="POST", headers=self.auth)
        try:
            with self._open(request, max(0.05, min(within, REPORT_TIMEOUT))) as response:
                response.read()
            batch.touched = sent
            log.debug("batch %d: lease extended", batch.number)
        except urllib.error.HTTPError as error:
            if error.code in (404, 409):  # settled, or the stream is ending
                batch.touched = float("inf")
            else:
                log.warning("batch %d: touch failed: %d %s", batch.number, error.code,
                            _error_text(error))
        except NETWORK_ERRORS as error:
            log.warning("batch %d: touch failed (%s)", batch.number,
                        getattr(error, "reason", None) or error)

    # -- reporting --------------------------------------------------------------

    def _report(self, stream, batch, last=False):
        """POST the succeeded ids; retried while the stream lives. `last`:
        this worker takes no next batch (it is draining)."""
        query = {"worker": stream.token, "batch": batch.number}
        if last:
            query["last"] = 1
        url = "%s/report?%s" % (stream.base_url, urllib.parse.urlencode(query))
        # (The v1 array of the ids done, unless a task failed with an error.)
        body = json.dumps({"done": batch.succeeded, "failed": batch.failed} if batch.failed
                          else batch.succeeded).encode("utf-8")
        delay = 0.05
        while not stream.lost.is_set():
            request = urllib.request.Request(url, data=body, method="POST", headers=dict(
                self.auth, **{"Content-Type": "application/json"}))
            try:
                with self._open(request, REPORT_TIMEOUT) as response:
                    result = json.loads(response.read())
                log.info("batch %d: %d messages, %d done, %s%d raised, %d refused, %.3f s "
                         "(broker: %s done, %s retried, %s dead)", batch.number, batch.size,
                         len(batch.succeeded),
                         "%d failed, " % len(batch.failed) if batch.failed else "",
                         batch.raised, batch.refused,
                         time.monotonic() - batch.started, result.get("done"),
                         result.get("retried"), result.get("dead"))
                log.debug("batch %d: reported done: %s", batch.number, " ".join(
                    i for i in batch.succeeded if i not in set(result.get("ignored", ()))))
                return
            except urllib.error.HTTPError as error:
                if error.code in (404, 409):
                    log.info("batch %d: settled already (%d), dropping the report",
                             batch.number, error.code)
                    return
                if 400 <= error.code < 500:
                    log.error("batch %d: report refused: %d %s", batch.number, error.code,
                              _error_text(error))
                    return
                log.warning("batch %d: report failed: %d, retrying", batch.number, error.code)
            except NETWORK_ERRORS as error:
                log.warning("batch %d: report failed (%s), retrying", batch.number,
                            getattr(error, "reason", None) or error)
            stream.lost.wait(delay)
            delay = min(delay * 2, 2.0)


# TLS failures that a retry meets again: the certificate is not trusted or is
# for another name, or the other side does not speak TLS (or not a version
# both know).
_HOPELESS_TLS = ("WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION",
                 "NO_PROTOCOLS_AVAILABLE", "UNKNOWN_PROTOCOL", "TLSV1_ALERT_UNKNOWN_CA",
                 "SSLV3_ALERT_BAD_CERTIFICATE", "HTTP_REQUEST")


def _hopeless_tls_error(error):
    """What is wrong, if `error` (or the error it wraps) is a TLS error that
    retrying cannot fix; None otherwise."""
    reason = getattr(error, "reason", None)
    for cause in (error, reason):
        if ssl is None or not isinstance(cause, ssl.SSLError):
            continue
        if isinstance(cause, ssl.SSLCertVerificationError):
            return "TLS: the certificate is not trusted: %s (--cafile FILE trusts a CA)" % (
                cause.verify_message or cause.reason)
        if cause.reason in _HOPELESS_TLS:
            return "TLS: %s (is it an https:// server, and the URL's scheme right?)" % (
                cause.reason.replace("_", " ").lower())
    return None


def _socket_of(response):
    """The socket under a urllib response (urllib hides it), or None."""
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _set_read_timeout(response, seconds):
    """Make a silent stream fail after `seconds`."""
    sock = _socket_of(response)
    if sock is not None:
        sock.settimeout(seconds)


def _end_stream(stream):
    """End a stream from another thread: its reader sees the end at once."""
    if stream.sock is not None:
        try:
            stream.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # (closed already)


def _error_text(error):
    try:
        return json.loads(error.read()).get("error", "")
    except Exception:  # any body at all: this is only for the log
        return error.reason


def _log_task_exception(args):
    """threading.excepthook: a raising task is one log line, with its message id."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread else "thread"
    # (TaskFailed is the seed's rule, period > 800: intended, so INFO.)
    (log.info if args.exc_type is TaskFailed else log.error)(
        "%s raised %s: %s", name, args.exc_type.__name__, args.exc_value)


# ---------------------------------------------------------------------------
# Supervisor: --processes N
# ---------------------------------------------------------------------------

def _describe_exit(code):
    if code == EXIT_STATUS_PERIOD:
        return "exit %d (a message with period > %d ms)" % (code, EXIT_PERIOD_MS)
    if code == EXIT_STATUS_STUCK:
        return "exit %d (a --handler task that would not stop)" % code
    if code < 0:
        try:
            return "killed by %s" % signal.Signals(-code).name
        except ValueError:
            return "killed by signal %d" % -code
    return "exit %d" % code


def supervise(args):
    """Run args.processes workers; restart each one that exits.

    Each worker is a fork of this process, not a new interpreter: a restart
    then costs milliseconds rather than a Python start-up (about 0.3 CPU-s
    on a busy machine), and by the rules about half of all batches end their
    worker. So that forking is safe, this process keeps to one thread: it
    waits on a pipe that SIGCHLD, SIGINT and SIGTERM write to
    (signal.set_wakeup_fd), and reaps its children without blocking.
    """
    stopping = []
    wakeup_r, wakeup_w = os.pipe()
    os.set_blocking(wakeup_r, False)
    os.set_blocking(wakeup_w, False)
    signal.set_wakeup_fd(wakeup_w)
    signal.signal(signal.SIGINT, lambda _signum, _frame: stopping.append(True))
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stopping.append(True))
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)  # (just the wake-up)
    children = {}  # pid -> (slot, started)
    generations = [0] * args.processes

    def start(slot):
        seed = None if args.seed is None else args.seed + slot + 1000 * generations[slot]
        supervisor = os.getpid()  # its workers stop if it is killed
        sys.stdout.flush()  # (or the child would write this process's buffered output again)
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            os.close(wakeup_r)
            os.close(wakeup_w)
            _run_forked_worker(args, seed, supervisor)  # never returns
        children[pid] = (slot, time.monotonic())
        log.info("worker %d started (pid %d)", slot, pid)

    for slot in range(args.processes):
        start(slot)
    quick_exits = [0] * args.processes  # per slot: workers in a row that ended quickly
    restarts = {}                       # slot -> when to start its worker again
    status = 0
    while not stopping and status == 0:
        wait = 1.0
        if restarts:
            wait = max(0.0, min(wait, min(restarts.values()) - time.monotonic()))
        select.select([wakeup_r], [], [], wait)
        try:
            while os.read(wakeup_r, 512):
                pass
        except BlockingIOError:
            pass
        if args.parent_pid is not None and os.getppid() != args.parent_pid:
            log.warning("parent process %d is gone: stopping", args.parent_pid)
            break
        while children and not stopping:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            if pid not in children:
                continue
            slot, started = children.pop(pid)
            code = os.waitstatus_to_exitcode(wait_status)
            lived = time.monotonic() - started
            log.info("worker %d (pid %d) ended after %.1f s: %s", slot, pid, lived,
                     _describe_exit(code))
            if code == EXIT_STATUS_USAGE:
                log.error("worker %d cannot work (see its log): stopping all", slot)
                status = EXIT_STATUS_USAGE
                break
            # Ending by the rules (a period > 900) is normal and restarts at
            # once; any other quick end backs off, doubling, as systemd's
            # restart limits do: a worker that cannot run must not spin.
            if code == EXIT_STATUS_PERIOD or lived >= QUICK_EXIT_SECONDS:
                quick_exits[slot] = 0
                restarts[slot] = time.monotonic()
            else:
                quick_exits[slot] += 1
                delay = min(RESTART_BACKOFF_MAX,
                            RESTART_BACKOFF_MIN * 2 ** (quick_exits[slot] - 1))
                log.warning("worker %d ended %d times in a row within %.0f s: restarting it "
                            "in %.1f s", slot, quick_exits[slot], QUICK_EXIT_SECONDS, delay)
                restarts[slot] = time.monotonic() + delay
        now = time.monotonic()
        for slot, when in list(restarts.items()):
            if when <= now and not stopping and status == 0:
                del restarts[slot]
                generations[slot] += 1
                start(slot)
    if stopping and status == 0:
        _drain_children(children, stopping, wakeup_r)
    else:
        log.info("stopping %d workers", len(children))
        _stop_children(children)
    signal.set_wakeup_fd(-1)
    os.close(wakeup_r)
    os.close(wakeup_w)
    return status


def _run_forked_worker(args, seed, supervisor):
    """In a child of the supervisor: be one worker, then exit (never returns)."""
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        # Ctrl-C reaches the whole process group: the supervisor passes it on
        # as SIGTERM, which alone stops a worker (one signal: it drains).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        code = run_worker(argparse.Namespace(**dict(vars(args), processes=None, seed=seed,
                                                    parent_pid=supervisor)),
                          signals=(signal.SIGTERM,))
    except BaseException:  # a bug, or Ctrl-C at start: say so, and exit all the same
        log.exception("worker failed")
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _drain_children(children, signals, wakeup_r):
    """Pass the first signal on to every worker, and wait for them to report
    their batches and exit; pass on a second one too (they stop at once)."""
    log.info("stopping %d workers once their batches are reported (a second signal stops "
             "them at once)", len(children))
    passed_on = 0
    while children:
        if passed_on < min(len(signals), 2):
            passed_on += 1
            for pid in children:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        select.select([wakeup_r], [], [], 1.0)
        try:
            while os.read(wakeup_r, 512):
                pass
        except BlockingIOError:
            pass
        while children:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return  # (none left)
            if pid == 0:
                break
            if children.pop(pid, None) is not None:
                log.info("worker (pid %d) stopped: %s", pid,
                         _describe_exit(os.waitstatus_to_exitcode(wait_status)))


def _stop_children(children):
    """SIGTERM each child; SIGKILL those still there after 5 s; reap them all."""
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5.0
    while children:
        try:
            pid, _wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # (none left)
        if pid:
            children.pop(pid, None)
        elif time.monotonic() < deadline:
            time.sleep(0.05)
        else:
            for pid in children:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = float("inf")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="worker" if os.path.basename(sys.argv[0] if sys.argv else "") == "worker"
        else "worker.py",  # (`worker` when installed by pip install .)
        description="Take batches of messages from broker.py over Server-Sent Events, run each "
                    "in a thread, and report how each ended. By default a task sleeps `period` "
                    "ms (> 800 raises, > 900 ends the process with status 3); --exec or "
                    "--handler run your own work on each message's payload.")
    parser.add_argument("--url", default=DEFAULT_URL,
                        help="the broker's base URL, or several, comma-separated, of brokers "
                             "that serve one queue (broker.py --jetstream): a lost or refused "
                             "stream moves on to the next (default: %(default)s)")
    parser.add_argument("--batchsize", type=int, default=None,
                        help="tasks at once and messages per batch (default: random %d..%d)"
                             % (MIN_BATCHSIZE, MAX_BATCHSIZE))
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="multiply every sleep by this; 0.01 makes 500 ms take 5 ms "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for the batchsize and backoff jitter, for reproducible runs")
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument("--token", default=None,
                        help="send 'Authorization: Bearer TOKEN' (default: $BROKER_TOKEN)")
    tokens.add_argument("--token-file", default=None, metavar="FILE",
                        help="read the token from FILE, its first line, so that it is not in "
                             "the process list (default: $BROKER_TOKEN_FILE)")
    parser.add_argument("--cafile", default=None, metavar="FILE",
                        help="for an https:// --url: trust the CA certificates in FILE (PEM) "
                             "instead of the system's")
    work = parser.add_mutually_exclusive_group()
    work.add_argument("--exec", default=None, metavar="CMD", dest="command",
                      help="run CMD (split as the shell would, run without one) for each "
                           "message, its payload as JSON on standard input and BROKER_MSG_ID, "
                           "BROKER_MSG_ATTEMPT, BROKER_MSG_PERIOD in its environment: exit "
                           "status 0 is done, 100 failed for good, any other failed (its "
                           "standard error's end is the error)")
    work.add_argument("--handler", default=None, metavar="PATH.py:FUNCTION",
                      help="call FUNCTION(payload, message) for each message, from a file or "
                           "an importable MODULE:FUNCTION: a return is done, an exception "
                           "failed (final if it has a true `final` attribute)")
    parser.add_argument("--task-timeout", type=float, default=None, metavar="SECONDS",
                        help="end a task still running after SECONDS (an --exec command's "
                             "whole process group) and report it failed, 'timed out' "
                             "(default: none; the lease is kept by touching)")
    parser.add_argument("--processes", type=int, default=None, metavar="N",
                        help="run N worker processes, restarting each one that exits; "
                             "Ctrl-C stops them all")
    parser.add_argument("--parent-pid", type=int, default=None, metavar="PID",
                        help="stop (all workers) once process PID is no longer this one's "
                             "parent; broker.py --workers passes its own pid, so that its "
                             "workers never outlive it, even when it is killed")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="(default: %(default)s)")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    args = parser.parse_args(argv)
    if args.token is None and args.token_file is None:
        args.token = os.environ.get("BROKER_TOKEN")
        if args.token is None:
            args.token_file = os.environ.get("BROKER_TOKEN_FILE") or None
    if args.token_file is not None:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                args.token = f.readline().strip()
        except (OSError, UnicodeDecodeError) as error:
            parser.error("cannot read the token file %s: %s" % (
                args.token_file, getattr(error, "strerror", None) or error))
        if not args.token:
            parser.error("the token file %s is empty" % args.token_file)
    if args.cafile is not None and not os.path.isfile(args.cafile):
        parser.error("--cafile %s: no such file" % args.cafile)
    if args.batchsize is not None and args.batchsize < 1:
        parser.error("--batchsize must be 1 or more")
    if args.time_scale < 0:
        parser.error("--time-scale must be 0 or more")
    if args.task_timeout is not None and not args.task_timeout > 0:
        parser.error("--task-timeout must be more than 0")
    if args.command is not None:
        try:
            if not shlex.split(args.command):
                parser.error("--exec: an empty command")
        except ValueError as error:
            parser.error("--exec %s: %s" % (args.command, error))
    if args.processes is not None and args.processes < 1:
        parser.error("--processes must be 1 or more")
    urls = [u.strip() for u in args.url.split(",")]
    if not all(u.startswith(("http://", "https://")) for u in urls):
        parser.error("--url: each URL must start with http:// or https://")
    return args


def run_worker(args, signals=(signal.SIGINT, signal.SIGTERM)):
    """One worker, until a signal, a fatal error, or a period > 900; its exit status."""
    rng = random.Random(args.seed)
    batchsize = args.batchsize if args.batchsize is not None else \
        rng.randint(MIN_BATCHSIZE, MAX_BATCHSIZE)
    threading.excepthook = _log_task_exception
    stop = threading.Event()

    try:
        runner = None
        if args.command is not None:
            runner = CommandRunner(args.command)
            runner.start()
        elif getattr(args, "handler_function", None) is not None:
            runner = HandlerRunner(args.handler_function)
        worker = Worker(args.url, batchsize, args.time_scale, rng, token=args.token,
                        cafile=args.cafile, runner=runner, task_timeout=args.task_timeout)
    except (FatalError, OSError, ValueError) as error:  # (ssl.SSLError is an OSError)
        log.error("cannot start: %s", error)
        return EXIT_STATUS_USAGE

    def on_signal(signum, _frame):
        if worker.draining.is_set():
            log.info("%s again: abandoning the batch in hand, stopping now",
                     signal.Signals(signum).name)
            stop.set()
        else:
            log.info("%s: stopping once the batch in hand is reported",
                     signal.Signals(signum).name)
            worker.drain()

    for signum in signals:
        signal.signal(signum, on_signal)
    runner = threading.Thread(target=_run_worker, args=(worker, stop), name="stream",
                              daemon=True)
    runner.start()
    while runner.is_alive() and not stop.is_set():
        runner.join(0.5)
        if args.parent_pid is not None and os.getppid() != args.parent_pid:
            log.warning("parent process %d is gone: stopping", args.parent_pid)
            break
    return worker.exit_status


def _run_worker(worker, stop):
    try:
        worker.run_forever(stop)
    except FatalError as error:
        log.error("%s", error)
        worker.exit_status = EXIT_STATUS_USAGE
    except Exception:  # a bug: say where, and exit non-zero (not 0, as if stopped)
        log.exception("the stream thread failed")
        worker.exit_status = EXIT_STATUS_BUG
    finally:
        stop.set()


def main(argv=None):
    args = parse_args(argv)
    # Stamped in UTC, RFC 3339 with milliseconds, as the broker's lines.
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter("%(asctime)s %(levelname)s worker[%(process)d]: %(message)s")
    formatter.converter = time.gmtime
    formatter.default_time_format = "%Y-%m-%dT%H:%M:%S"
    formatter.default_msec_format = "%s.%03dZ"
    handler.setFormatter(formatter)
    logging.basicConfig(level=args.log_level, handlers=[handler])
    if args.handler is not None:  # (once, before any fork: one line if it cannot be)
        try:
            args.handler_function = load_handler(args.handler)
        except ValueError as error:
            log.error("cannot start: %s", error)
            return EXIT_STATUS_USAGE
    if args.processes is not None:
        return supervise(args)
    return run_worker(args)


if __name__ == "__main__":
    sys.exit(main())
