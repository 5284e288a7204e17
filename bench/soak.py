#!/usr/bin/env python3
"""Soak: a million messages through the broker; memory and threads must stay flat.

    python bench/soak.py [--total 1000000] [--clients 4] [--every 100000]

Runs `broker.py --total N` with protocol clients of our own (bench/client.py,
20% of messages left unreported, so retries and dead letters are part of the
mix) and prints the broker's RSS and thread count every `--every` settled
messages, then the ratio of the last RSS to the RSS at the first mark (done
messages are forgotten: it should stay within 10%), and the thread count
after the clients left. A benchmark, not a test.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from broker_bench import _get_json, proc_status, start_broker  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total", type=int, default=1000000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--every", type=int, default=100000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        # --total twice the soak: the broker is still there to count threads at the end.
        broker, url, _log = start_broker(work, "--total", 2 * args.total, "--heartbeat", "5")
        threads_idle = proc_status(broker.pid, "Threads")
        # Clients in processes of their own, so the GIL they share is not the broker's.
        load = [subprocess.Popen([sys.executable, os.path.join(HERE, "broker_bench.py"),
                                  "--client", url, "--batchsize", "10", "--fail", "0.2",
                                  "--seconds", "100000", "--seed", str(i)],
                                 stdout=subprocess.DEVNULL) for i in range(args.clients)]
        marks = []
        start = time.perf_counter()
        print("%10s %8s %10s %8s" % ("settled", "seconds", "RSS (MB)", "threads"))
        next_mark = args.every
        while broker.poll() is None and next_mark <= args.total:
            try:
                stats = _get_json(url + "/stats")
            except OSError:
                break
            settled = stats["done"] + stats["dead"]
            if settled >= next_mark:
                rss = proc_status(broker.pid, "VmRSS") / 1024
                threads = proc_status(broker.pid, "Threads")
                marks.append((settled, rss, threads))
                print("%10d %8.0f %10.1f %8d" % (settled, time.perf_counter() - start, rss,
                                                 threads), flush=True)
                next_mark += args.every
            time.sleep(0.2)
        for process in load:
            process.terminate()
        for process in load:
            process.wait(30)
        time.sleep(1.0)
        threads_after = proc_status(broker.pid, "Threads") if broker.poll() is None else None
        broker.terminate()
        broker.wait(60)
    if len(marks) >= 2:
        print("RSS at the last mark / at the first: %.3f (flat within 10%%: %s)" % (
            marks[-1][1] / marks[0][1], "yes" if marks[-1][1] <= 1.1 * marks[0][1] else "NO"))
    print("threads: %d idle before, %s after the clients left" % (
        threads_idle, threads_after if threads_after is not None else "(broker exited)"))


if __name__ == "__main__":
    main()
