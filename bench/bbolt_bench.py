#!/usr/bin/env python3
"""bbolt_lite against Go's bbolt, the same work in the same run.

    python bench/bbolt_bench.py [--single 1000] [--bulk 100000] [--rounds 5] [--dir DIR]

Times, for each side: `--single` durable transactions of one put each (two
fdatasyncs per commit on both sides); `--bulk` puts of 100-byte values in one
transaction, once with keys in a scattered order (bbolt grows one in-memory
leaf until commit, so Go is quadratic there) and once in key order; and
reading the scattered bucket back in order from a freshly opened file (Go
reads its memory map in place; bbolt_lite reads its map in place too, but
copies each key and value into a bytes object). Prints each time and the
ratio bbolt_lite / Go. A commit's time is mostly its two fdatasyncs, whose
time on this kind of machine moves by a third from one run to the next; so
the single puts are timed again `--rounds` times, the two sides
alternating, and the medians compared, with each side's CPU per commit
(user and system). Needs Go and Debian's golang-github-coreos-bbolt-dev
(see README.md). A benchmark, not a test: the figures vary with the machine
and its load.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "interop"))

import bbolt_lite  # noqa: E402
from gobuild import build as build_go  # noqa: E402


def key(i):
    return b"key-%08d" % i


def value(i, size=100):
    """The Go helper's value(i, size), made before the clock starts."""
    return bytes((i * 31 + j * 7) % 251 for j in range(size))


def python_side(path, n_single, n_bulk):
    if os.path.exists(path):
        os.remove(path)
    singles = [value(i) for i in range(n_single)]
    bulk_keys = [key(i * 7919 % n_bulk) for i in range(n_bulk)]
    bulk_values = [value(i) for i in range(n_bulk)]
    with bbolt_lite.open(path) as db:
        with db.update() as tx:
            tx.create_bucket(b"bench")
        start, cpu = time.perf_counter(), os.times()
        for i in range(n_single):
            with db.update() as tx:
                tx.bucket(b"bench").put(key(i), singles[i])
        single = time.perf_counter() - start
        cpu_end = os.times()
        single_cpu = cpu_end.user - cpu.user + cpu_end.system - cpu.system
        start = time.perf_counter()
        with db.update() as tx:
            bucket = tx.create_bucket(b"bulk")
            for k, v in zip(bulk_keys, bulk_values):
                bucket.put(k, v)
        bulk = time.perf_counter() - start
        start = time.perf_counter()
        with db.update() as tx:
            bucket = tx.create_bucket(b"sequential")
            for i, v in enumerate(bulk_values):
                bucket.put(key(i), v)
        sequential = time.perf_counter() - start
        assert db.check() == []
    with bbolt_lite.open(path, readonly=True) as db:
        start = time.perf_counter()
        total = 0
        with db.view() as tx:
            for k, v in tx.bucket(b"bulk").items():
                total += len(k) + len(v)
        read_all = time.perf_counter() - start
    return {"single_put_tx_s": single, "bulk_put_s": bulk, "sequential_put_s": sequential,
            "read_all_s": read_all, "single_cpu_s": single_cpu,
            "bytes_read": total}


def go_side(helper, path, n_single, n_bulk):
    """The Go helper's figures; with `single_cpu_s`, its CPU over the whole
    run (a start of a few ms included): meant for runs of single puts alone."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([helper, "bench", path, str(n_single), str(n_bulk)],
                            capture_output=True, text=True, check=True, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    go = json.loads(result.stdout)
    go["single_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return go


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--single", type=int, default=1000)
    parser.add_argument("--bulk", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=5,
                        help="further rounds of single puts alone, alternating (default 5)")
    parser.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        helper = build_go("boltcheck", work)
        go_db, py_db = os.path.join(work, "go.db"), os.path.join(work, "py.db")
        go = go_side(helper, go_db, args.single, args.bulk)
        py = python_side(py_db, args.single, args.bulk)
        assert go["bytes_read"] == py["bytes_read"]
        check = subprocess.run([helper, "check", py_db], capture_output=True, text=True)
        rounds = [(go_side(helper, go_db, args.single, 0), python_side(py_db, args.single, 0))
                  for _ in range(args.rounds)]
    print("bbolt_lite vs Go bbolt, %d single-put transactions, %d bulk puts" % (
        args.single, args.bulk))
    print("%-28s %10s %10s %8s %8s" % ("", "Go (s)", "Python (s)", "ratio", "target"))
    for name, label, target in (("single_put_tx_s", "single-put transactions", 1.5),
                                ("bulk_put_s", "bulk put, scattered keys", 10),
                                ("sequential_put_s", "bulk put, keys in order", 10),
                                ("read_all_s", "read all, fresh open", 15)):
        ratio = py[name] / go[name]
        print("%-28s %10.3f %10.3f %7.1fx %7.1fx" % (label, go[name], py[name], ratio, target))
    print("Go's tx.Check() on the bbolt_lite file: %s" % check.stdout.strip())
    if rounds:
        def median(side, name):
            return statistics.median(r[side][name] for r in rounds)
        go_s, py_s = median(0, "single_put_tx_s"), median(1, "single_put_tx_s")
        print("single-put transactions, %d more rounds alternating, medians: Go %.3f s, "
              "Python %.3f s, ratio %.2fx (target 1.5x)" % (len(rounds), go_s, py_s, py_s / go_s))
        print("  CPU a commit, user + system: Go %.0f µs, Python %.0f µs" % (
            median(0, "single_cpu_s") / args.single * 1e6,
            median(1, "single_cpu_s") / args.single * 1e6))


if __name__ == "__main__":
    main()
