#!/usr/bin/env python3
"""Jobs from producers: broker.py --source api against a Go broker of the same
path, and against broker.py --durable with its own generator, in one run.

    python bench/jobs_bench.py --gobroker BIN --goload BIN [--reps 2] [--seconds 8]
                               [--before DIR]

`--gobroker` and `--goload` are Go programs that speak protocol v1.2's
producer path: a broker with `--source api` (jobs saved in bbolt before the
answer, a report answered after its commit, group commits) and a load client
whose `-p P -pb N` adds P producers posting /enqueue requests of N jobs (this
repository's bench/gobroker and bench/goload do not have that path). Each
broker is started fresh on a free 127.0.0.1 port, its db in a temporary
folder, `--reps` times in turn, and loaded by

    goload -p 4 -pb 100 -c 8 -b 10 -s SECONDS     (--source api: 4 producers, 8 consumers)
    goload -c 8 -b 10 -s SECONDS                  (broker.py --durable: 8 consumers)

`--before DIR` adds DIR's broker.py `--source api` to each repetition (a
checkout of an earlier commit: the change's before and after in one run).
Prints medians (min-max) of jobs settled a second, jobs accepted a second,
the enqueue answer's p50 and p99, the 503s (a full --max-backlog), and the
ratio of broker.py's settled jobs to the Go broker's. A benchmark, not a
test: compare the figures of one run only.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "interop"))

from gobench import start, stop  # noqa: E402  (a broker started and stopped as users do)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gobroker", required=True, help="a Go broker with --source api")
    parser.add_argument("--goload", required=True, help="a Go load client with -p and -pb")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--before", metavar="DIR",
                        help="also run DIR/broker.py --source api (an earlier checkout)")
    args = parser.parse_args()
    python = [sys.executable, os.path.join(ROOT, "broker.py")]
    setups = [
        ("broker.py --source api", python + ["--source", "api"], ["-p", "4", "-pb", "100"]),
    ]
    if args.before:
        setups.append(("before: --source api", [sys.executable, os.path.join(
            args.before, "broker.py"), "--source", "api"], ["-p", "4", "-pb", "100"]))
    setups += [
        ("gobroker --source api", [args.gobroker, "--source", "api"], ["-p", "4", "-pb", "100"]),
        ("broker.py --durable", python + ["--durable"], []),
    ]
    rows = {name: [] for name, _c, _l in setups}
    with tempfile.TemporaryDirectory() as work:
        for rep in range(args.reps):
            for name, command, load in setups:
                db = os.path.join(work, "%d-%s.db" % (rep, name.replace(" ", "_")))
                process, url = start(command + ["--port", "0", "--db", db, "--lease-timeout",
                                                "30"], os.path.join(work, "broker.log"))
                try:
                    done = subprocess.run([args.goload, "-url", url, "-c", "8", "-b", "10",
                                           "-s", str(args.seconds), "-f", "0"] + load,
                                          capture_output=True, text=True,
                                          timeout=args.seconds + 120)
                finally:
                    stop(process)
                row = json.loads(done.stdout)
                rows[name].append(row)
                print(name, json.dumps(row), flush=True)

    def cell(name, key, form):
        values = [r.get(key) for r in rows[name] if r.get(key) is not None]
        if not values or min(values) < 0:
            return "-"
        return (form + " (" + form + "-" + form + ")") % (
            statistics.median(values), min(values), max(values))

    print("\n%-24s %-26s %-26s %-20s %-20s %s" % ("broker", "settled/s", "enqueued/s",
                                                  "enqueue p50 ms", "enqueue p99 ms", "503s"))
    for name in rows:
        print("%-24s %-26s %-26s %-20s %-20s %s" % (
            name, cell(name, "settled_per_s", "%.0f"), cell(name, "enqueued_per_s", "%.0f"),
            cell(name, "enq_p50_ms", "%.2f"), cell(name, "enq_p99_ms", "%.2f"),
            cell(name, "enq_refused", "%.0f")))
    py, go = (statistics.median(r["settled_per_s"] for r in rows[name])
              for name in ("broker.py --source api", "gobroker --source api"))
    print("settled jobs/s, broker.py / gobroker: %.3f" % (py / go))
    if args.before:
        before = statistics.median(r["settled_per_s"] for r in rows["before: --source api"])
        print("settled jobs/s, before / gobroker: %.3f; broker.py / before: %.3f"
              % (before / go, py / before))


if __name__ == "__main__":
    main()
