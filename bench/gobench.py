#!/usr/bin/env python3
"""broker.py against the same protocol written in Go, under the same Go load.

    python bench/gobench.py [--reps 3] [--seconds 8] [--clients 8] [--batchsize 10]
                            [--fails 0 0.2] [--no-durable]

Builds `gobroker` (bench/gobroker: what a Go developer would write, net/http,
one mutex, a goroutine per stream, rs/xid, bbolt dead letters in group
commits) and `goload` (bench/goload: a load client light enough that the
broker is the bottleneck) offline, as the interop helpers are built. Then,
`--reps` times, for each share F of unreported ids, starts each broker fresh
on a free 127.0.0.1 port with its db in a temporary folder and loads it with
`goload -c C -b B -s SECONDS -f F`:

    python broker.py --port 0 --db TMP --lease-timeout 30            (as users start it)
    python broker.py --port 0 --db TMP --lease-timeout 30 --durable  (unless --no-durable)
    gobroker         --port 0 --db TMP --lease-timeout 30

the order turned round every repetition. Prints medians (min-max) of
messages settled a second, reports a second, latency from a report to the
next batch, and the broker's CPU; the ratio broker.py / gobroker; and for
--durable, db commits a second and the reports each carried (from
/metrics). Needs Go and Debian's bbolt and rs/xid sources (see README.md).
A benchmark, not a test: compare figures of one run only.
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "interop"))

from gobuild import build as build_go  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def commits(url):
    with urllib.request.urlopen(url + "/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return int(re.search(r"^broker_db_commits_total (\d+)", text, re.M).group(1))


def start(command, log_path):
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with open(log_path) as f:
            found = re.search(r"listening on (http://[0-9.]+:\d+)", f.read())
        if found:
            return process, found.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    with open(log_path) as f:
        raise RuntimeError("%s did not start: %s" % (command[:2], f.read()[-600:]))


def stop(process):
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def one_run(name, command, goload, args, fail, work):
    process, url = start(command, os.path.join(work, name + ".log"))
    try:
        durable = "--durable" in command
        commits_before = commits(url) if durable else 0
        cpu_before = cpu_seconds(process.pid)
        result = subprocess.run([goload, "-url", url, "-c", str(args.clients), "-b",
                                 str(args.batchsize), "-s", str(args.seconds), "-f", str(fail)],
                                capture_output=True, text=True, check=True,
                                timeout=args.seconds + 60)
        row = json.loads(result.stdout)
        row["broker_cores"] = (cpu_seconds(process.pid) - cpu_before) / row["elapsed_s"]
        if durable:
            made = commits(url) - commits_before
            row["commits_per_s"] = made / row["elapsed_s"]
            row["reports_per_commit"] = row["reports_per_s"] * row["elapsed_s"] / max(made, 1)
    finally:
        stop(process)
    row.update(broker=name, f=fail)
    return row


COLUMNS = [("settled_per_s", "settled/s", "%.0f"), ("reports_per_s", "reports/s", "%.0f"),
           ("p50_ms", "p50 ms", "%.2f"), ("p99_ms", "p99 ms", "%.2f"),
           ("broker_cores", "broker cores", "%.2f")]
DURABLE_COLUMNS = [("commits_per_s", "commits/s", "%.0f"),
                   ("reports_per_commit", "reports/commit", "%.1f")]


def cell(rows, key, fmt):
    values = [r[key] for r in rows]
    return "%s (%s-%s)" % (fmt % statistics.median(values), fmt % min(values), fmt % max(values))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batchsize", type=int, default=10)
    parser.add_argument("--fails", type=float, nargs="+", default=[0, 0.2])
    parser.add_argument("--no-durable", dest="durable", action="store_false",
                        help="leave out the broker.py --durable runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        gobroker, goload = build_go("gobroker", work), build_go("goload", work)
        go_version = subprocess.run(["go", "version"], capture_output=True, text=True).stdout
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip() or "?"
        print("# Python %s | %s | %d CPUs | C=%d B=%d, %gs x %d | broker.py at %s" % (
            sys.version.split()[0], " ".join(go_version.split()[2:3]), os.cpu_count(),
            args.clients, args.batchsize, args.seconds, args.reps, commit), flush=True)
        common = ["--port", "0", "--lease-timeout", "30"]
        brokers = [("python", [sys.executable, os.path.join(ROOT, "broker.py")] + common),
                   ("go", [gobroker] + common)]
        if args.durable:
            brokers.insert(1, ("durable", brokers[0][1] + ["--durable"]))
        rows = []
        for rep in range(args.reps):
            order = brokers if rep % 2 == 0 else brokers[::-1]
            for fail in args.fails:
                for name, command in order:
                    db = os.path.join(work, "%s-%d-%g.db" % (name, rep, fail))
                    row = one_run(name, command + ["--db", db], goload, args, fail, work)
                    rows.append(row)
                    print(json.dumps(row, sort_keys=True), flush=True)
    print()
    print("%-8s %-4s %3s  %s" % ("broker", "F", "n", "  ".join("%-24s" % c[1] for c in COLUMNS)))
    for fail in args.fails:
        medians = {}
        for name, _command in brokers:
            mine = [r for r in rows if r["broker"] == name and r["f"] == fail]
            medians[name] = {key: statistics.median(r[key] for r in mine) for key, _t, _f in COLUMNS}
            print("%-8s %-4g %3d  %s" % (name, fail, len(mine), "  ".join(
                "%-24s" % cell(mine, key, fmt) for key, _title, fmt in COLUMNS)))
            if name == "durable":
                print("%-8s %-4s %3s  %s" % ("", "", "", "  ".join(
                    "%s: %s" % (title, cell(mine, key, fmt)) for key, title, fmt in DURABLE_COLUMNS)))
        for name in ("python", "durable"):
            if name in medians:
                print("%-8s %-4g %3s  %s" % ("%s/go" % ("py" if name == "python" else "dur"),
                                             fail, "", "  ".join(
                    "%-24s" % ("%.3f" % (medians[name][key] / medians["go"][key]))
                    for key, _t, _f in COLUMNS[:2])))
    print("medians (min-max) over repetitions; py/go: the ratio of the medians")


if __name__ == "__main__":
    main()
