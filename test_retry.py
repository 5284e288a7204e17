"""After a failure (PROTOCOL.md, "Retry delay"): a failed attempt waits before
the next, doubling; the wait is saved with --durable; the figures count the
messages that wait apart; and a dependency that is down for a while no
longer turns every job that needs it into a dead letter."""

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import bbolt_lite
import conftest
from conftest import HERE, headless_chromium, wait_until


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


# --- dead letters deleted -----------------------------------------------------------------

def dead_now(b):
    return sorted(conftest.dead_now(b))


def make_dead(b, count):
    """`count` dead letters of a --max-attempts 1 broker: their ids, sorted."""
    return sorted(conftest.live_dead_letters(b, count))


def test_delete_dead_deletes_those_named_or_all_and_get_dead_no_longer_lists_them(
        processes, db):
    b = processes.broker(db, "--max-attempts", 1, "--heartbeat", 600, "--token", "t")
    b.bearer = "t"
    ids = make_dead(b, 4)
    status, _h, answer = b.request("DELETE", "/dead", json.dumps(ids[:2] + ["nope"]).encode())
    assert status == 200 and answer == {"deleted": 2, "missing": ["nope"]}
    assert dead_now(b) == ids[2:]
    for bad in (b'{"all": false}', b'[1]', b'nope'):
        assert b.request("DELETE", "/dead", bad)[0] == 400
    b.bearer = None
    assert b.request("DELETE", "/dead", b'{"all": true}')[0] == 401
    b.bearer = "t"
    status, _h, answer = b.request("DELETE", "/dead", b'{"all": true}')
    assert status == 200 and answer == {"deleted": 2, "missing": []}
    assert dead_now(b) == []
    b.stop()
    with bbolt_lite.open(str(db), readonly=True) as store, store.view() as tx:
        assert list(tx.bucket(b"failed").items()) == []


def test_purge_deletes_dead_letters_of_a_stopped_broker_s_db(processes, db):
    b = processes.broker(db, "--max-attempts", 1, "--heartbeat", 600)
    ids = make_dead(b, 3)
    b.stop()

    def purge(*args):
        return subprocess.run([sys.executable, "broker.py", "purge", "--db", str(db)] +
                              list(args), cwd=HERE, capture_output=True, text=True, timeout=30)
    refused = purge(ids[0], "nope")
    assert refused.returncode == 2 and "not dead letters" in refused.stderr and "nope" in \
        refused.stderr
    assert purge(ids[0]).stdout == "1 dead letters deleted\n"
    assert purge().returncode == 2  # (ids, or --all)
    assert purge("--all").stdout == "2 dead letters deleted\n"
    with bbolt_lite.open(str(db), readonly=True) as store, store.view() as tx:
        assert list(tx.bucket(b"failed").items()) == []


def test_the_dashboard_deletes_a_dead_letter_once_confirmed(processes, db):
    b = processes.broker(db, "--max-attempts", 1, "--heartbeat", 600)
    ids = make_dead(b, 2)
    asked = []
    with headless_chromium() as browser:
        page = browser.new_page()
        answers = iter([False, True])  # (first declined: nothing deleted)
        page.on("dialog", lambda dialog: (asked.append(dialog.message),
                                          dialog.accept() if next(answers) else dialog.dismiss()))
        page.goto(b.url + "/")
        page.wait_for_selector("#dead button.delete", timeout=15000)
        first = page.inner_text("#dead tr:first-child td:first-child")
        page.click("#dead tr:first-child button.delete")
        time.sleep(0.5)
        assert dead_now(b) == ids
        page.click("#dead tr:first-child button.delete")
        page.wait_for_function("document.getElementById('requeue-result').textContent"
                               " === '1 deleted'", timeout=10000)
        page.wait_for_function("id => ![...document.querySelectorAll('#dead tr td:first-child')]"
                               ".some(td => td.textContent === id)", arg=first, timeout=10000)
    assert dead_now(b) == [i for i in ids if i != first]
    assert asked == ["Delete dead letter %s for good?" % first] * 2
