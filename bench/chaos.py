#!/usr/bin/env python3
"""Chaos: run broker and workers under a mix of faults, then reconcile.

    python bench/chaos.py [--seconds 60] [--total 5000] [--seed 1]

Starts `broker.py --durable --total N --trace FILE` and a mix of workers:
real `worker.py` processes (which die on their own at period > 900) and
protocol clients of our own that cut streams mid-batch, drop reports and
report after the lease. For `--seconds` it injects faults at random:
SIGKILL and SIGSTOP/SIGCONT of workers, SIGKILL and SIGTERM of the broker
(restarted on the same db). Then it lets the run finish and checks:

* every message ends exactly once: done + dead = generated = N, nothing
  left pending, no id both acknowledged done and dead;
* a message acknowledged done is never leased again afterwards;
* no message is leased to two workers at once (the broker's trace, per run);
* the bbolt file passes bbolt_lite's check.

It prints what it injected and the reconciliation (lost = 0, duplicated = 0),
and exits 1 if any check fails. The test suite runs it briefly
(test_chaos.py); run it longer by hand.
"""

import argparse
import calendar
import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bbolt_lite  # noqa: E402
from client import Client, Faults  # noqa: E402

_LISTENING = re.compile(r"listening on http://([0-9.]+):(\d+)")
_REPORTED = re.compile(r"^(\S+) DEBUG worker\[\d+\]: batch \d+: reported done: (.*)$")


class _Child:
    """A child process whose output is kept (and scanned) line by line."""

    def __init__(self, args, log_path):
        self.log_path = log_path
        self.log = open(log_path, "a")
        self.popen = subprocess.Popen([sys.executable] + args, cwd=ROOT, stdout=self.log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.stopped = False

    def alive(self):
        return self.popen.poll() is None

    def signal(self, signum):
        if self.alive():
            self.popen.send_signal(signum)

    def end(self):
        if self.alive():
            if self.stopped:
                self.popen.send_signal(signal.SIGCONT)
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log.close()


def _start_broker(work, port, total, index):
    log_path = os.path.join(work, "broker-%d.log" % index)
    child = _Child(["broker.py", "--port", str(port), "--db", os.path.join(work, "chaos.db"),
                    "--durable", "--total", str(total), "--lease-timeout", "1",
                    "--heartbeat", "0.5", "--trace", os.path.join(work, "trace.jsonl")],
                   log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(log_path) as f:
            found = _LISTENING.findall(f.read())
        if found and len(found) >= 1:
            return child, int(found[-1][1])
        if not child.alive():
            raise RuntimeError("the broker did not start:\n" + open(log_path).read()[-2000:])
        time.sleep(0.05)
    raise RuntimeError("the broker did not start in 30 s")


def run(seconds, total, seed, work, real_workers=3, clients=2, quiet=False):
    """Run the chaos; return the report (a dict). Cleans up every process."""
    rng = random.Random(seed)
    injected = collections.Counter()
    say = (lambda *a: None) if quiet else print
    broker, port = _start_broker(work, 0, total, 0)
    url = "http://127.0.0.1:%d" % port
    brokers = [broker]
    workers = []

    def start_worker(slot):
        return _Child(["worker.py", "--url", url, "--time-scale", "0.01", "--log-level", "DEBUG",
                       "--batchsize", str(rng.randint(2, 10))],
                      os.path.join(work, "worker-%d.log" % slot))

    workers = [start_worker(i) for i in range(real_workers)]
    all_workers = list(workers)
    stop = threading.Event()
    faults = Faults(cut=0.1, drop=0.05, delay=0.05, delay_seconds=1.5)
    our_clients = [Client(url, batchsize=rng.randint(2, 10), fail_share=0.1, seed=seed + i,
                          faults=faults) for i in range(clients)]
    threads = [threading.Thread(target=c.run, args=(stop,), daemon=True) for c in our_clients]
    for t in threads:
        t.start()
    paused = {}  # worker index -> when to SIGCONT
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and brokers[-1].alive():
            time.sleep(rng.uniform(0.1, 0.4))
            now = time.monotonic()
            for i, until in list(paused.items()):
                if now >= until:
                    workers[i].signal(signal.SIGCONT)
                    workers[i].stopped = False
                    del paused[i]
            for i, w in enumerate(workers):
                if not w.alive() and i not in paused:
                    w.end()
                    workers[i] = start_worker(len(all_workers))
                    all_workers.append(workers[i])
            action = rng.random()
            i = rng.randrange(len(workers))
            if action < 0.35 and workers[i].alive() and i not in paused:
                workers[i].signal(signal.SIGKILL)
                injected["worker SIGKILL"] += 1
            elif action < 0.6 and workers[i].alive() and i not in paused:
                workers[i].signal(signal.SIGSTOP)  # past the lease: the broker closes its stream
                workers[i].stopped = True
                paused[i] = now + rng.uniform(1.2, 2.0)
                injected["worker SIGSTOP/SIGCONT"] += 1
            elif action < 0.68:
                how = signal.SIGKILL if rng.random() < 0.6 else signal.SIGTERM
                brokers[-1].signal(how)
                brokers[-1].popen.wait(30)
                injected["broker %s + restart" % how.name] += 1
                broker, _port = _start_broker(work, port, total, len(brokers))
                brokers.append(broker)
        for i in list(paused):
            workers[i].signal(signal.SIGCONT)
            workers[i].stopped = False
        say("chaos over after %.0f s; letting the run finish" % seconds)
        code = brokers[-1].popen.wait(300)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for w in workers:
            w.end()
        for b in brokers:
            b.end()
    for c in our_clients:
        for kind, count in c.injected.items():
            injected["client %s" % {"cut": "cuts stream mid-batch", "drop": "never reports",
                                    "delay": "reports after the lease"}[kind]] += count
    return _reconcile(work, total, code, our_clients, all_workers, injected)


def _reconcile(work, total, broker_exit, clients, workers, injected):
    problems = []
    with bbolt_lite.open(os.path.join(work, "chaos.db"), readonly=True) as db:
        problems += ["bbolt check: " + p for p in db.check()]
        with db.view() as tx:
            dead = {k.decode() for k, _v in tx.bucket(b"failed").items()}
            pending_bucket = tx.bucket(b"pending")
            pending = [k.decode() for k, _v in pending_bucket.items()] if pending_bucket else []
            state = {k.decode(): int(v) for k, v in tx.bucket(b"state").items()}
    # Acknowledged done: by our clients (exactly), by worker.py (from its log, after the 200).
    acked = collections.defaultdict(list)  # id -> wall-clock times of acknowledgements
    for c in clients:
        for message_id in c.acked:
            acked[message_id].append(None)
    for w in workers:
        with open(w.log_path) as f:
            for line in f:
                match = _REPORTED.match(line.rstrip("\n"))
                if match:
                    stamp = match.group(1)  # UTC, RFC 3339 with milliseconds
                    when = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) \
                        + int(stamp[20:23]) / 1000
                    for message_id in match.group(2).split():
                        acked[message_id].append(when + 0.001)  # (rounded down to the ms)
    duplicated = sorted(i for i, times in acked.items() if len(times) > 1)
    both = sorted(set(acked) & dead)
    # The trace: per broker run (pid), a lease starts only once the last one ended.
    leases_after_ack = []
    held_twice = []
    holder = {}
    last_lease = collections.defaultdict(float)
    current_pid = None
    with open(os.path.join(work, "trace.jsonl")) as f:
        for line in f:
            event = json.loads(line)
            if event["pid"] != current_pid:
                current_pid, holder = event["pid"], {}  # a new run: the old streams are gone
            message_id = event["id"]
            if event["event"] == "lease":
                if holder.get(message_id) is not None:
                    held_twice.append(message_id)
                holder[message_id] = event["worker"]
                last_lease[message_id] = max(last_lease[message_id], event["t"])
            else:
                holder[message_id] = None
    for message_id, times in acked.items():
        for when in times:
            if when is not None and last_lease.get(message_id, 0) > when + 1:
                leases_after_ack.append(message_id)
    generated = state.get("generated", 0)
    settled = state.get("done", 0) + len(dead)
    lost = generated - settled + len(pending)
    if broker_exit != 0:
        problems.append("the last broker exited %s, not 0" % broker_exit)
    if generated != total or settled != total or pending:
        problems.append("generated %d, settled %d, pending %d: expected %d, %d, 0"
                        % (generated, settled, len(pending), total, total))
    for label, ids in (("acknowledged done twice", duplicated), ("both done and dead", both),
                       ("leased again after being acknowledged", leases_after_ack),
                       ("leased to two workers at once", held_twice)):
        if ids:
            problems.append("%d messages %s: %s" % (len(ids), label, " ".join(ids[:5])))
    return {"injected": dict(injected), "generated": generated, "done": state.get("done", 0),
            "dead": len(dead), "pending": len(pending), "lost": lost,
            "duplicated": len(duplicated) + len(both), "acknowledged_seen": len(acked),
            "broker_runs": len(set(json.loads(line)["pid"] for line in open(
                os.path.join(work, "trace.jsonl")))), "problems": problems}


def main():
    parser = argparse.ArgumentParser(description="Run the broker under faults; reconcile.")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to inject faults")
    parser.add_argument("--total", type=int, default=5000, help="messages in the run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=3, help="real worker.py processes")
    parser.add_argument("--clients", type=int, default=2, help="misbehaving protocol clients")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, db)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="chaos-")
    report = run(args.seconds, args.total, args.seed, work, args.workers, args.clients)
    print("injected:")
    for kind, count in sorted(report["injected"].items()):
        print("  %-36s %d" % (kind, count))
    print("broker runs %d; generated %d, done %d, dead %d, pending %d; lost %d, duplicated %d"
          % (report["broker_runs"], report["generated"], report["done"], report["dead"],
             report["pending"], report["lost"], report["duplicated"]))
    for problem in report["problems"]:
        print("PROBLEM: " + problem)
    print("OK" if not report["problems"] else "FAILED", "(work folder: %s)" % work
          if args.keep or report["problems"] else "")
    if not args.keep and not report["problems"]:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
