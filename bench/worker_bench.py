#!/usr/bin/env python3
"""End to end with the real worker: broker.py and worker.py --processes K.

    python bench/worker_bench.py [--total 20000] [--processes 4] [--time-scale 0]

Runs `broker.py --total N` against `worker.py --processes K --time-scale S`
(its failure rules included: period > 800 raises, > 900 ends the process and
the supervisor restarts it) until every message is done or dead, and prints
messages/s end to end, the done and dead counts, and how many worker
processes were started. A benchmark, not a test.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from broker_bench import start_broker  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total", type=int, default=20000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--time-scale", type=float, default=0.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        broker, url, log_path = start_broker(work, "--total", args.total)
        start = time.perf_counter()
        worker_log_path = os.path.join(work, "workers.log")
        with open(worker_log_path, "w") as worker_log_file:
            workers = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "worker.py"), "--url",
                 url, "--processes", str(args.processes),
                 "--time-scale", str(args.time_scale), "--log-level", "INFO"],
                stdout=subprocess.DEVNULL, stderr=worker_log_file)
            code = broker.wait(3600)
            elapsed = time.perf_counter() - start
            workers.terminate()
            workers.wait(60)
        worker_log = open(worker_log_path).read()
        text = open(log_path).read()
    settled = re.search(r"all (\d+) messages settled: (\d+) done, (\d+) dead", text)
    started = len(re.findall(r"worker \d+ started", worker_log))
    exits3 = len(re.findall(r"exit 3 \(", worker_log))
    print("worker.py --processes %d --time-scale %g against broker.py --total %d"
          % (args.processes, args.time_scale, args.total))
    print("  broker exit %d after %.1f s: %.0f messages/s end to end" % (
        code, elapsed, args.total / elapsed))
    if settled:
        print("  %s done, %s dead" % (settled.group(2), settled.group(3)))
    print("  worker processes started: %d (%d ended by a period > 900)" % (started, exits3))


if __name__ == "__main__":
    main()
