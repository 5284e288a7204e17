#!/usr/bin/env python3
"""Poison isolation: how many messages that would succeed end dead anyway.

    python bench/poison.py [--total 3000] [--runs 1] [--compare REV]

A message with period > 900 ends its worker process: every message in the
same batch fails that attempt with it. Retried together, the same
batch-mates go down with it on all three attempts. Since PROTOCOL.md v1.1
the broker retries a batch whose worker died as two halves, each a batch of
its own (bisection), so a poison message takes fewer batch-mates each time.

Runs `broker.py --total N --seed S` against the real `worker.py --processes 4
--time-scale 0.01` until every message is settled, then counts, from the dead
letters in the db and the periods the seed draws, the share of messages with
period <= 800 (which succeed whenever they run) that ended dead. With
`--compare REV`, the broker of that git revision runs the same seeds in the
same run, for a before and after. A benchmark, not a test.
"""

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import bbolt_lite  # noqa: E402
import broker as broker_module  # noqa: E402
from broker_bench import start_broker  # noqa: E402


def run(root, total, seed, processes, time_scale):
    """One settled run: (share of the period <= 800 messages that died, all dead, seconds)."""
    with tempfile.TemporaryDirectory() as work:
        broker, url, log_path = start_broker(work, "--total", total, "--seed", seed, root=root)
        started = time.monotonic()
        workers = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "worker.py"), "--url", url, "--processes",
             str(processes), "--time-scale", str(time_scale), "--seed", str(seed),
             "--log-level", "WARNING"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            code = broker.wait(1800)
        finally:
            workers.terminate()
            workers.wait(60)
        elapsed = time.monotonic() - started
        if code != 0:
            raise RuntimeError("broker exit %d:\n%s" % (code, open(log_path).read()[-2000:]))
        with bbolt_lite.open(os.path.join(work, "bench.db"), readonly=True) as db:
            dead = broker_module.read_dead_letters(db, 1 << 62)[0]
    rng = random.Random(seed)  # the periods the broker drew, in the same order
    healthy = sum(1 for _ in range(total) if broker_module.draw_period(rng) <= 800)
    healthy_dead = sum(1 for letter in dead if letter["period"] <= 800)
    return healthy_dead / healthy, len(dead) / total, elapsed


def checkout(rev, work):
    """broker.py and bbolt_lite.py as they were at `rev`, in a folder of their own."""
    folder = os.path.join(work, rev)
    os.makedirs(folder)
    for name in ("broker.py", "bbolt_lite.py"):
        source = subprocess.run(["git", "-C", ROOT, "show", "%s:%s" % (rev, name)],
                                check=True, capture_output=True).stdout
        with open(os.path.join(folder, name), "wb") as f:
            f.write(source)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=1, help="seeds 1..RUNS")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--time-scale", type=float, default=0.01)
    parser.add_argument("--compare", metavar="REV",
                        help="also run the broker of this git revision (before and after)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        brokers = [("this broker", ROOT)]
        if args.compare:
            brokers.insert(0, ("broker at %s" % args.compare, checkout(args.compare, work)))
        print("--total %d, worker.py --processes %d --time-scale %g, seeds 1..%d" % (
            args.total, args.processes, args.time_scale, args.runs))
        for name, root in brokers:
            results = [run(root, args.total, seed, args.processes, args.time_scale)
                       for seed in range(1, args.runs + 1)]
            healthy = [r[0] for r in results]
            print("  %-22s period <= 800 that ended dead: %5.1f%% (runs: %s); all dead "
                  "letters: %5.1f%% of messages; %.0f s a run" % (
                      name, 100 * statistics.mean(healthy),
                      ", ".join("%.1f%%" % (100 * h) for h in healthy),
                      100 * statistics.mean(r[1] for r in results),
                      statistics.mean(r[2] for r in results)))


if __name__ == "__main__":
    main()
