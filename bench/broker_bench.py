#!/usr/bin/env python3
"""Throughput and latency of broker.py, against the standard library's ceiling.

    python bench/broker_bench.py [--total 100000] [--clients 8] [--batchsize 10]
                                 [--fail 0.0] [--seconds 10] [--rate 0 | --half-load]
                                 [--repeat 1]

Starts `broker.py --total N` and K load processes, each a protocol client of
our own (bench/client.py: zero work, every id reported unless --fail drops
a share), so the figures are the broker's, not worker.py's. Prints:

* messages settled per second and batches per second;
* report-to-next-batch latency p50 / p99: from sending a report to the
  arrival of the next batch's first byte on the stream socket (on Linux, the
  kernel's receive timestamp, SO_TIMESTAMPNS), and to the client reading it
  (which adds the load process's own wake-up: on 2 shared cores with 8 load
  processes, that is most of the tail);
* broker CPU seconds per 10,000 messages, and its peak RSS;
* in the same run, the ceiling of the parts the broker is built from: a bare
  `ThreadingHTTPServer` answering the same POSTs on keep-alive connections
  from the same number of client processes, measured just before and just
  after the broker; and the broker's reports/s as a share of their mean.

Both runs are measured the same way: counted by the server, over the same
kind of window, from half a second after the last load process connected to
half a second before the first one stops (Python start-up is not counted).

`--rate R` paces each client to R batches/s; `--half-load` runs again at half
the batches/s of the first run(s), for the latency at half the maximum load.
`--repeat N` alternates N broker runs with N + 1 ceiling runs: on a shared
machine one pair can be 20% off either way.
A benchmark, not a test: the figures vary with the machine and its load.
"""

import argparse
import http.client
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def percentile(values, share):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def proc_cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_status(pid, field):
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"%s:\s+(\d+)" % field, f.read()).group(1))


# --- load processes ----------------------------------------------------------

def client_main(url, batchsize, fail, seconds, rate, seed):
    """One load process: run a client, print its figures as JSON."""
    from client import Client
    client = Client(url, batchsize, fail_share=fail, seed=seed)
    if rate:
        original = client._finish

        def paced(token, batch, _interval=1.0 / rate, _next=[time.perf_counter()]):
            _next[0] += _interval
            delay = _next[0] - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            return original(token, batch)

        client._finish = paced
    stop = threading.Event()
    print("started", flush=True)
    client.run(stop, seconds=seconds)
    print(json.dumps({"batches": client.batches, "acked": len(client.acked),
                      "received": len(client.received), "latencies": client.latencies,
                      "arrivals": client.arrivals,
                      "errors": client.errors}))


def post_loop_main(url, seconds):
    """One load process for the ceiling: POST a report-sized body, keep-alive,
    with the same lean client the broker run's reports use."""
    from client import KeepAlive
    host, port = url[len("http://"):].split(":")
    conn = KeepAlive(host, int(port))
    body = json.dumps(["9m4e2mr0ui3e8a215n4g"] * 10).encode()
    count = 0
    print("started", flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        conn.post("/report?worker=x&batch=1", body)
        count += 1
    print(json.dumps({"requests": count}))


def start_load(args_list):
    return [subprocess.Popen([sys.executable, os.path.abspath(__file__)] + args,
                             stdout=subprocess.PIPE, text=True) for args in args_list]


def steady_window(load, seconds, sample):
    """`sample()` at both ends of the window in which all load processes run.

    Waits for each process's "started" line; returns (first sample, second
    sample, window seconds)."""
    started = []
    for process in load:
        line = process.stdout.readline()
        if line.strip() != "started":
            raise RuntimeError("a load process failed to start: %r" % line)
        started.append(time.monotonic())
    begin, end = max(started) + 0.5, min(started) + seconds - 0.5
    if end - begin < 1.0:
        raise RuntimeError("the load processes took too long to start: use more --seconds")
    time.sleep(begin - time.monotonic())
    first, begin = sample(), time.monotonic()
    time.sleep(max(0.0, end - time.monotonic()))
    second, end = sample(), time.monotonic()
    return first, second, end - begin


def collect(processes, timeout):
    results = []
    for process in processes:
        out, _err = process.communicate(timeout=timeout)
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


# --- the ceiling: a bare standard-library server ----------------------------------

class _BareHandler(http.server.BaseHTTPRequestHandler):
    """The same POST, answered as plainly as the standard library allows.

    TCP_NODELAY as in the broker: without it, the header and body writes
    wait on delayed ACKs and the "ceiling" falls to ~200 requests/s.
    """

    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args):
        pass

    requests = 0  # POSTs answered (incremented under the GIL: close enough)

    def do_GET(self):
        answer = json.dumps({"requests": _BareHandler.requests}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def do_POST(self):
        _BareHandler.requests += 1
        body = self.rfile.read(int(self.headers["Content-Length"]))
        answer = json.dumps({"batch": 1, "done": len(json.loads(body)), "retried": 0,
                             "dead": 0, "ignored": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


def bare_ceiling(clients, seconds):
    """Requests/s of a bare ThreadingHTTPServer, in a process of its own."""
    code = ("import sys; sys.path.insert(0, %r); import broker_bench, http.server\n"
            "s = http.server.ThreadingHTTPServer(('127.0.0.1', 0), broker_bench._BareHandler)\n"
            "s.daemon_threads = True\n"
            "print(s.server_address[1], flush=True); s.serve_forever()\n" % HERE)
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        url = "http://127.0.0.1:%d" % port
        load = start_load([["--post-loop", url, "--seconds", str(seconds)]
                           for _ in range(clients)])
        first, second, window = steady_window(load, seconds,
                                              lambda: _get_json(url + "/count")["requests"])
        collect(load, seconds + 60)
    finally:
        server.kill()
        server.wait()
    return (second - first) / window


# --- the broker run ------------------------------------------------------------------

def start_broker(work, *flags, root=ROOT):
    """broker.py (of `root`) on a free port, logging to work/broker.log:
    (process, url, log path)."""
    log_path = os.path.join(work, "broker.log")
    with open(log_path, "w") as log:
        broker = subprocess.Popen([sys.executable, os.path.join(root, "broker.py"), "--port", "0",
                                   "--db", os.path.join(work, "bench.db"), "--log-level", "INFO"]
                                  + [str(f) for f in flags], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with open(log_path) as f:
            found = re.search(r"listening on (http://[0-9.]+:\d+)", f.read())
        if found:
            return broker, found.group(1), log_path
        if broker.poll() is not None:
            break
        time.sleep(0.05)
    broker.kill()
    raise RuntimeError("the broker did not start:\n" + open(log_path).read()[-2000:])


def broker_run(args, work):
    broker, url, log_path = start_broker(work, "--total", args.total, "--heartbeat", "5",
                                         *(["--durable"] if args.durable else []))
    threads_before = proc_status(broker.pid, "Threads")
    load = start_load([["--client", url, "--batchsize", str(args.batchsize), "--fail",
                        str(args.fail), "--seconds", str(args.seconds), "--rate", str(args.rate),
                        "--seed", str(i)] for i in range(args.clients)])

    def sample():
        figures = _get_metrics(url)
        return (figures["broker_done_total"], figures["broker_dead_total"],
                figures["broker_batch_round_trip_seconds_count"], proc_cpu_seconds(broker.pid))

    first, second, window = steady_window(load, args.seconds, sample)
    (done, dead, reports, cpu) = [b - a for a, b in zip(first, second)]
    results = collect(load, args.seconds + 60)
    rss_peak_kb = proc_status(broker.pid, "VmHWM")
    stats = _get_json(url + "/stats")
    time.sleep(0.5)
    threads_after = proc_status(broker.pid, "Threads")
    broker.terminate()
    broker.wait(30)
    commits = re.search(r"(\d+) db commits", open(log_path).read())
    latencies = [x for r in results for x in r["latencies"]]
    arrivals = [x for r in results for x in r["arrivals"]]
    return {"window": window, "done": done, "dead": dead, "reports": reports, "cpu": cpu,
            "rss_peak_mb": rss_peak_kb / 1024, "latencies": latencies, "arrivals": arrivals,
            "threads": (threads_before, threads_after), "stats": stats,
            "errors": sum(r["errors"] for r in results),
            "commits": int(commits.group(1)) if commits else None}


def _get(url):
    """The body of a GET, as bytes."""
    host, port = url[len("http://"):].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/" + url.split("/", 3)[3])
    return conn.getresponse().read()


def _get_json(url):
    return json.loads(_get(url))


def _get_metrics(url):
    """The samples of /metrics without labels, as {name: value}."""
    lines = _get(url + "/metrics").decode().splitlines()
    return {name: float(value) for name, value in
            (line.split() for line in lines if line and line[0] != "#" and "{" not in line)}


def print_run(title, args, run):
    """Print one broker run's figures; its reports/s."""
    settled = run["done"] + run["dead"]
    rate = settled / run["window"]
    reports = run["reports"] / run["window"]
    print("broker %s%d clients%s, batchsize %d, %.0f%% unreported%s, measured over %.1f s" % (
        title, args.clients, " at %.0f batches/s each" % args.rate if args.rate else "",
        args.batchsize, 100 * args.fail, ", --durable" if args.durable else "", run["window"]))
    print("  settled          %9.0f messages/s  (%d done, %d dead in the window)" % (
        rate, run["done"], run["dead"]))
    print("  batches          %9.0f /s (= reports/s)" % reports)
    if run["arrivals"]:
        print("  latency          p50 %.2f ms, p99 %.2f ms  (report sent -> next batch arrives)"
              % (1000 * percentile(run["arrivals"], 0.5), 1000 * percentile(run["arrivals"], 0.99)))
    print("  latency, read    p50 %.2f ms, p99 %.2f ms  (report sent -> next batch read: "
          "adds the client's own wake-up)" % (
              1000 * percentile(run["latencies"], 0.5), 1000 * percentile(run["latencies"], 0.99)))
    print("  broker CPU       %9.2f s per 10,000 messages (%.2f cores)" % (
        run["cpu"] / max(1, settled) * 10000, run["cpu"] / run["window"]))
    print("  broker peak RSS  %9.1f MB" % run["rss_peak_mb"])
    print("  broker threads   %d before, %d after the clients left" % run["threads"])
    print("  client errors    %d" % run["errors"])
    print("  db commits       %s for %d dead letters (group commit)" % (
        run["commits"], run["stats"]["dead"]))
    return reports


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total", type=int, default=1000000,
                        help="--total for the broker (large: the run is bounded by --seconds)")
    parser.add_argument("--clients", type=int, default=8, help="load processes")
    parser.add_argument("--batchsize", type=int, default=10)
    parser.add_argument("--fail", type=float, default=0.0,
                        help="share of messages the clients leave unreported")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="batches/s per client (0: as fast as possible)")
    parser.add_argument("--durable", action="store_true", help="run the broker with --durable")
    parser.add_argument("--repeat", type=int, default=1,
                        help="broker runs, each between two ceiling runs (the median share "
                             "is printed)")
    parser.add_argument("--half-load", action="store_true",
                        help="then run again with each client paced to half the batches/s "
                             "just measured, for the latency at half the maximum load")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the bare-server run")
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--post-loop", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client_main(args.client, args.batchsize, args.fail, args.seconds, args.rate,
                           args.seed)
    if args.post_loop:
        return post_loop_main(args.post_loop, args.seconds)
    # The ceiling is measured just before and just after each broker run, so
    # that a change in the machine's load during the run shows.
    ceiling_before = None if args.no_ceiling else bare_ceiling(args.clients, args.seconds)
    maxima, shares = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as work:
            maxima.append(print_run("", args, broker_run(args, work)))
        if ceiling_before is not None:
            ceiling_after = bare_ceiling(args.clients, args.seconds)
            ceiling = (ceiling_before + ceiling_after) / 2
            shares.append(maxima[-1] / ceiling)
            print("ceiling: bare ThreadingHTTPServer, %d keep-alive clients: %.0f requests/s "
                  "(%.0f before the broker run, %.0f after)"
                  % (args.clients, ceiling, ceiling_before, ceiling_after))
            print("  broker reports/s as a share of it: %.0f%%" % (100 * shares[-1]))
            ceiling_before = ceiling_after
    if len(shares) > 1:
        print("over %d runs: broker reports/s as a share of the ceiling: median %.0f%%, "
              "%.0f%% to %.0f%%" % (len(shares), 100 * percentile(shares, 0.5),
                                    100 * min(shares), 100 * max(shares)))
    reports = percentile(maxima, 0.5)
    if args.half_load:  # half the batches/s just measured, spread over the clients
        args.rate = reports / args.clients / 2
        with tempfile.TemporaryDirectory() as work:
            print_run("at half the maximum load: ", args, broker_run(args, work))


if __name__ == "__main__":
    main()
