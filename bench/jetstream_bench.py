#!/usr/bin/env python3
"""Messages/s of broker.py --jetstream: 1 and 2 brokers over a 3-node NATS
cluster on this machine, beside one broker with its queue in memory.

    python bench/jetstream_bench.py [--clients 8] [--batchsize 10] [--seconds 10]
                                    [--fail 0.0] [--repeat 1]

Starts three `nats-server` processes (JetStream, clustered on loopback; each
stream R3), then for each setup the brokers (`--backlog 1000`, no --total)
and `--clients` load processes of bench/client.py (zero work, every id
reported unless --fail drops a share), spread over the brokers. Counted from
each broker's /stats (done + dead) over the same window: from one second
after the last client connected, for --seconds. Needs nats-server (Debian:
nats-server) and nats-py. A benchmark, not a test: on 2 shared cores, the
three NATS nodes, the brokers and the clients all compete.
"""

import argparse
import json
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import client  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nats_configs(folder, nodes):
    """Config files of `nodes` nats-server nodes with JetStream on loopback,
    clustered when more than one (client ports: any free one, logged at
    start); the tests use them too."""
    os.makedirs(folder, exist_ok=True)
    routes = [free_port() for _ in range(nodes)] if nodes > 1 else []
    configs = []
    for i in range(nodes):
        lines = ["server_name: n%d" % i, "host: 127.0.0.1", "port: -1",
                 "jetstream { store_dir: %s }" % json.dumps(os.path.join(folder, "n%d" % i))]
        if routes:
            lines += ["cluster {", "  name: c", "  listen: 127.0.0.1:%d" % routes[i],
                      "  routes: [%s]" % ", ".join("nats://127.0.0.1:%d" % p for j, p in
                                                   enumerate(routes) if j != i), "}"]
        config = os.path.join(folder, "n%d.conf" % i)
        with open(config, "w") as f:
            f.write("\n".join(lines) + "\n")
        configs.append(config)
    return configs


def start_cluster(folder, nodes=3):
    """`nodes` nats-server processes clustered on loopback: (processes, URLs)."""
    processes, urls = [], []
    for config in nats_configs(folder, nodes):
        processes.append(subprocess.Popen(["nats-server", "-c", config], text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for process in processes:
        for line in process.stdout:
            found = re.search(r"Listening for client connections on [\d.]+:(\d+)", line)
            if found:
                urls.append("nats://127.0.0.1:%s" % found.group(1))
                break
        threading.Thread(target=process.stdout.read, daemon=True).start()  # (drained)
    return processes, urls


def start_broker(work, *flags):
    log = open(os.path.join(work, "broker-%d.log" % time.monotonic_ns()), "w+")
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "broker.py"), "--port", "0",
                                "--db", os.path.join(work, "%d.db" % time.monotonic_ns()),
                                "--log-level", "INFO", "--progress-every", "3600"] +
                               [str(f) for f in flags], stderr=log, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        log.seek(0)
        found = re.search(r"listening on (http://\S+)", log.read())
        if found:
            return process, found.group(1)
        if process.poll() is not None:
            log.seek(0)
            raise SystemExit("broker.py did not start:\n" + log.read())
        time.sleep(0.05)
    raise SystemExit("broker.py did not start within 60 s")


def settled(url):
    with urllib.request.urlopen(url + "/stats", timeout=10) as answer:
        stats = json.load(answer)
    return stats["done"] + stats["dead"]


def client_main(url, batchsize, fail, seconds, seed):
    client.Client(url, batchsize, fail_share=fail, seed=seed).run(threading.Event(), seconds)


def measure(urls, args):
    """Messages settled per second by the brokers at `urls` under the load."""
    context = multiprocessing.get_context("spawn")
    load = [context.Process(target=client_main, args=(
        urls[i % len(urls)], args.batchsize, args.fail, args.seconds + 3.0, i))
        for i in range(args.clients)]
    for process in load:
        process.start()
    time.sleep(1.5)  # (the clients connect, and the broker's first fetches)
    before, started = sum(settled(u) for u in urls), time.monotonic()
    time.sleep(args.seconds)
    after, ended = sum(settled(u) for u in urls), time.monotonic()
    for process in load:
        process.join(30)
    return (after - before) / (ended - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="load processes")
    parser.add_argument("--batchsize", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fail", type=float, default=0.0,
                        help="share of ids each client leaves unreported")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    if shutil.which("nats-server") is None:
        raise SystemExit("needs nats-server (Debian: apt install nats-server)")
    work = tempfile.mkdtemp(prefix="jetstream-bench-")
    nodes, nats_urls = start_cluster(work)
    figures = {"memory, 1 broker": [], "jetstream, 1 broker": [], "jetstream, 2 brokers": []}
    try:
        for run in range(args.repeat):
            for setup in figures:
                brokers = 2 if "2 brokers" in setup else 1
                flags = [] if setup.startswith("memory") else [
                    "--jetstream", ",".join(nats_urls), "--js-stream", "bench%d%d" % (run, brokers)]
                started = [start_broker(work, *flags) for _ in range(brokers)]
                try:
                    rate = measure([url for _p, url in started], args)
                finally:
                    for process, _url in started:
                        process.terminate()
                        process.wait(30)
                figures[setup].append(rate)
                print("%-22s %9.0f messages/s" % (setup, rate), flush=True)
    finally:
        for node in nodes:
            node.terminate()
            node.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    print("\nmedian of %d run(s), %d clients, batchsize %d%s:" % (
        args.repeat, args.clients, args.batchsize,
        ", %.0f%% unreported" % (100 * args.fail) if args.fail else ""))
    for setup, rates in figures.items():
        rates = sorted(rates)
        print("  %-22s %9.0f messages/s" % (setup, rates[len(rates) // 2]))


if __name__ == "__main__":
    main()
