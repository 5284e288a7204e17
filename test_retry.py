"""After a failure (PROTOCOL.md, "Retry delay"): a failed attempt waits before
the next, doubling; the wait is saved with --durable; the figures count the
messages that wait apart; and a dependency that is down for a while no
longer turns every job that needs it into a dead letter."""

import json
import os
import re
import textwrap
import time

import bbolt_lite
from conftest import wait_until


def pending(db):
    with bbolt_lite.open(str(db), readonly=True, timeout=5) as store, store.view() as tx:
        bucket = tx.bucket(b"pending")
        return {k.decode(): json.loads(v) for k, v in bucket.items()} if bucket else {}


def test_a_retry_delay_is_counted_apart_and_kept_across_a_restart(processes, db):
    flags = ("--durable", "--total", 1, "--retry-delay", 4000, "--heartbeat", 600)
    b = processes.broker(db, *flags)
    client = b.stream(1)
    client.hello()
    [message] = client.batch()
    failed_at = time.time()
    assert b.report(client.token, message["batch"], [])[0] == 200  # (not done: it fails)
    stats = b.stats()
    assert (stats["delayed"], stats["retrying"], stats["in_flight"]) == (1, 0, 0)
    status, _h, text = b.request("GET", "/metrics")
    assert re.search(r"^broker_delayed 1$", text, re.M)
    client.close()
    b.stop()
    record = pending(db)[message["id"]]
    assert failed_at + 2.0 - 0.5 <= record["not_before"] <= failed_at + 4.0 + 0.5
    # Restarted, the broker keeps it waiting until then, no sooner, and gives it then.
    b = processes.broker(db, *flags)
    assert b.stats()["delayed"] == 1
    client = b.stream(1)
    client.hello()
    [again] = client.batch(timeout=10)
    arrived = time.time()
    assert again["id"] == message["id"] and again["attempt"] == 2
    assert arrived >= record["not_before"] - 0.05
    assert b.report(client.token, again["batch"], [again["id"]])[0] == 200
    assert b.wait() == 0
    client.close()


def test_a_job_s_delay_ms_is_kept_across_a_restart(processes, db):
    b = processes.broker(db, "--source", "api", "--heartbeat", 600)
    enqueued_at = time.time()
    status, _h, answer = b.request("POST", "/enqueue", b'[{"payload": 1, "delay_ms": 3000}]')
    assert status == 200
    assert b.stats()["delayed"] == 1
    b.stop()
    [record] = pending(db).values()
    assert enqueued_at + 3.0 - 0.5 <= record["not_before"] <= time.time() + 3.0
    b = processes.broker(db, "--source", "api", "--heartbeat", 600)
    client = b.stream(1)
    client.hello()
    [job] = client.batch(timeout=10)
    assert job["id"] == answer["ids"][0] and time.time() >= record["not_before"] - 0.05
    client.close()


# A handler whose dependency is down for the first 2 s of the run (from the
# time in the file beside it), then up.
FLAKY_HANDLER = textwrap.dedent("""\
    import os, time

    START = float(open(os.path.join(os.path.dirname(__file__), "start")).read())

    def work(payload, message):
        if time.time() - START < 2.0:
            raise ConnectionError("the database is down")
    """)


def run_chaos(processes, tmp_path, retry_delay):
    """50 jobs through a dependency down for 2 s; (done, dead)."""
    folder = tmp_path / ("delay-%d" % retry_delay)
    folder.mkdir()
    (folder / "flaky.py").write_text(FLAKY_HANDLER)
    b = processes.broker(folder / "broker.db", "--source", "api", "--max-attempts", 5,
                         "--retry-delay", retry_delay, "--heartbeat", 600)
    (folder / "start").write_text(repr(time.time()))
    jobs = [{"payload": n} for n in range(50)]
    assert b.request("POST", "/enqueue", json.dumps(jobs).encode())[0] == 200
    processes.worker("--url", b.url, "--batchsize", 5, "--handler",
                     "%s:work" % (folder / "flaky.py"))
    wait_until(lambda: (lambda s: s["done"] + s["dead"] == 50)(b.stats()), timeout=60,
               what=lambda: str(b.stats()))
    stats = b.stats()
    print("--retry-delay %d: %d done, %d dead" % (retry_delay, stats["done"], stats["dead"]))
    return stats["done"], stats["dead"]


def test_with_a_retry_delay_a_dependency_down_for_a_while_kills_no_job(processes, tmp_path):
    # Five attempts: 0.25..0.5 + 0.5..1 + 1..2 + 2..4 s of waits, at least
    # 3.75 s: past the 2 s outage. With no delay the five go within milliseconds.
    assert run_chaos(processes, tmp_path, 500) == (50, 0)
    done, dead = run_chaos(processes, tmp_path, 0)
    assert dead > 25 and done + dead == 50
    assert os.path.exists(tmp_path / "delay-0" / "broker.db")
