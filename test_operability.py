"""Operability: /stats, /metrics, /dead, the dashboard, --workers, dead-letter tools, logs."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import broker

from conftest import (HERE, SSEClient, dashboard_page, dead_letters_made, dead_now,
                      headless_chromium, live_dead_letters, skip_or_fail, wait_until)


def settle_batch(b, client, done_share=1.0):
    batch = client.batch()
    done = [m["id"] for m in batch][:int(len(batch) * done_share)]
    return batch, b.report(client.token, batch[0]["batch"], done)


def test_stats_is_json_read_in_one_go(processes, db):
    b = processes.broker(db, "--heartbeat", "600")
    status, headers, stats = b.request("GET", "/stats")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert stats["generated"] == stats["done"] == stats["in_flight"] == 0
    assert stats["done_per_s"] == 0 and 0 < stats["uptime_s"] < 60


def test_metrics_parse_with_the_prometheus_reference_parser(processes, db):
    try:
        from prometheus_client import parser
    except ImportError:
        skip_or_fail("no prometheus_client (pip install -r requirements-test.txt)")
    b = processes.broker(db, "--heartbeat", "600", "--max-attempts", "1")
    client = b.stream(4)
    client.hello()
    for _ in range(3):
        settle_batch(b, client, done_share=0.5)
    client.batch()
    started = time.time()
    # (The dead letters reach the db in the state writer's next commit.)
    wait_until(lambda: re.search(r"^broker_db_commits_total [1-9]", b.request("GET", "/metrics")[2],
                                 re.M), what="a commit")
    status, headers, text = b.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    value = {name: f.samples[0].value for name, f in families.items()
             if f.type != "histogram" and len(f.samples) == 1}
    assert value["broker_done"] == 6 and value["broker_dispatched"] == 16
    assert value["broker_in_flight"] == 4
    assert families["broker_done"].type == "counter"
    assert families["broker_workers"].type == "gauge"
    by_reason = {s.labels["reason"]: s.value for s in families["broker_dead_letters"].samples}
    assert by_reason == {"not reported": 6, "stream closed": 0, "lease expired": 0, "failed": 0}
    assert {s.labels["reason"]: s.value for s in families["broker_failed_attempts"].samples
            }["not reported"] == 6
    assert [(s.labels, s.value) for s in families["broker_build_info"].samples] == [
        ({"version": broker.__version__}, 1)]
    assert started - 60 < value["process_start_time_seconds"] <= started
    assert "broker_uptime_seconds" not in text and "per_second" not in text  # rate()'s job
    assert value["broker_db_commits"] >= 1 and value["broker_db_errors"] == 0
    for name, count in (("broker_batch_round_trip_seconds", 3),
                        ("broker_db_commit_seconds", value["broker_db_commits"])):
        histogram = families[name]
        assert histogram.type == "histogram"
        samples = {(s.name, s.labels.get("le")): s.value for s in histogram.samples}
        assert samples[(name + "_count", None)] == count
        assert samples[(name + "_bucket", "+Inf")] == count
    for line in text.splitlines():
        if not line.startswith("#"):
            assert line.startswith(("broker_", "process_start_time_seconds "))
    head_status, head_headers, head_body = b.request("HEAD", "/metrics")
    assert head_status == 200 and head_body == "" and int(head_headers["Content-Length"]) > 0
    client.close()


def test_metrics_pass_promtool_check_metrics(processes, db):
    promtool = shutil.which("promtool")
    if promtool is None:
        skip_or_fail("no promtool (apt-get install prometheus)")
    b = processes.broker(db, "--heartbeat", "600", "--max-attempts", "1")
    client = b.stream(4)
    client.hello()
    settle_batch(b, client, done_share=0.5)
    text = b.request("GET", "/metrics")[2]
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == ""  # no lint complaint either
    client.close()


def test_dead_lists_dead_letters_oldest_first_in_pages(processes, db):
    b = processes.broker(db, "--heartbeat", "600", "--max-attempts", "1")
    client = b.stream(5)
    client.hello()
    ids = []
    for _ in range(2):
        batch, _answer = settle_batch(b, client, done_share=0)
        ids += [m["id"] for m in batch]
    wait_until(lambda: len(b.request("GET", "/dead?limit=100")[2]["dead"]) == 10)
    first = b.request("GET", "/dead?limit=4")[2]
    assert len(first["dead"]) == 4 and first["more"]
    second = b.request("GET", "/dead?limit=100&after=" + first["next_after"])[2]
    listed = [d["id"] for d in first["dead"] + second["dead"]]
    assert listed == sorted(ids) and not second["more"]
    assert set(first["dead"][0]) == {"id", "period", "attempts", "reason", "failed_at"}
    assert b.request("GET", "/dead?limit=0")[0] == 400
    assert b.request("GET", "/dead?limit=x")[0] == 400
    client.close()


def test_requeue_round_trips_dead_letters_back_to_done(processes, db):
    b = processes.broker(db, "--total", "6", "--max-attempts", "1")
    client = b.stream(6)
    client.hello()
    batch, _answer = settle_batch(b, client, done_share=0)  # all six dead
    assert b.wait() == 0

    def tool(*args):
        return subprocess.run([sys.executable, "broker.py"] + list(args), cwd=HERE,
                              capture_output=True, text=True, timeout=30)

    table = tool("dead", "--db", str(db))
    assert table.returncode == 0 and "6 dead letters" in table.stdout
    assert all(m["id"] in table.stdout for m in batch)
    one = batch[0]["id"]
    assert tool("requeue", "--db", str(db), "nonexistent").returncode != 0
    assert "1 dead letters requeued" in tool("requeue", "--db", str(db), one).stdout
    assert "5 dead letters requeued" in tool("requeue", "--db", str(db), "--all").stdout
    assert "0 dead letters" in tool("dead", "--db", str(db)).stdout

    again = processes.broker(db, "--total", "0")  # nothing new: only the requeued six
    refused = tool("requeue", "--db", str(db), "--all")
    assert refused.returncode != 0 and "in use by a running broker" in refused.stderr
    client = again.stream(10)
    client.hello()
    batch2 = client.batch()
    assert sorted(m["id"] for m in batch2) == sorted(m["id"] for m in batch)
    assert all(m["attempt"] == 1 for m in batch2)  # attempts reset
    again.report(client.token, batch2[0]["batch"], [m["id"] for m in batch2])
    assert again.wait() == 0
    assert "all 6 messages settled: 6 done, 0 dead" in again.output()
    assert "0 dead letters" in tool("dead", "--db", str(db)).stdout


def test_workers_flag_runs_the_whole_system_and_leaves_nothing_running(processes, db):
    b = processes.broker(db, "--total", "60", "--workers", "2", "--seed", "4",
                         "--progress-every", "0.5")
    b.wait_for_line(r"dashboard: http://127\.0\.0\.1:\d+/")
    assert b.wait(timeout=120) == 0
    output = b.output()
    assert "all 60 messages settled" in output
    pids = [int(p) for p in re.findall(r"started worker\.py --processes 2 \(pid (\d+)\)",
                                       output)]
    pids += [int(p) for p in re.findall(r"worker \d+ started \(pid (\d+)\)", output)]
    assert len(pids) >= 3
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def running(pid):
    """Whether `pid` runs (a zombie that nobody reaped does not)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def started_pids(output):
    """The supervisor's pid and those of the workers it started, from the output."""
    pids = [int(p) for p in re.findall(r"started worker\.py --processes \d+ \(pid (\d+)\)",
                                       output)]
    return pids + [int(p) for p in re.findall(r"worker \d+ started \(pid (\d+)\)", output)]


def test_workers_of_a_killed_broker_stop_too(processes, db):
    b = processes.broker(db, "--workers", "2", "--heartbeat", "600")
    b.wait_for_line(r"w2: connected")
    # The supervisor and its 2 workers, and any that replaced one a message ended.
    assert len(started_pids(b.output())) >= 3
    os.kill(b.popen.pid, 9)  # the broker alone, not its process group
    b.wait()
    wait_until(lambda: not any(running(pid) for pid in started_pids(b.output())), 15,
               b.output)


def test_progress_lines_say_done_dead_in_flight_workers_and_share(processes, db):
    b = processes.broker(db, "--total", "100", "--progress-every", "0.3")
    line = b.wait_for_line(r"progress: ")
    assert re.search(r"progress: \d+ done, \d+ dead \([0-9.]+%(: [^)]*)?\), \d+ in flight, "
                     r"\d+ retrying, \d+ workers, [0-9.]+ done/s, \d+ generated of 100, "
                     r"[0-9.]+% settled", line)


RFC3339_UTC_MS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def test_debug_logs_a_line_per_stream_start_and_end_and_info_keeps_to_the_run(
        processes, db):
    b = processes.broker(db, "--total", "300", "--max-attempts", "1", "--log-level", "DEBUG",
                         "--progress-every", "0.2", "--heartbeat", "600")
    w = processes.worker("--url", b.url, "--processes", "3", "--time-scale", "0",
                         "--log-level", "INFO")
    assert b.wait(60) == 0
    w.stop()
    lines = b.output().splitlines()
    for line in lines + w.output().splitlines():  # UTC, RFC 3339, milliseconds
        assert re.match(RFC3339_UTC_MS + r" (DEBUG|INFO|WARNING|ERROR) (broker|worker\[\d+\]): ",
                        line), line
    info = [line for line in lines if " DEBUG " not in line]
    assert not [line for line in info if "dead letter" in line or
                re.search(r"w\d+: (connected from|stream closed)", line)]  # (DEBUG lines)
    streams = re.findall(r" DEBUG broker: (w\d+): connected from", b.output())
    assert len(streams) > 3  # workers that ended by the rules came back
    for stream in streams:
        assert len([line for line in lines if " broker: %s: " % stream in line]) == 2, stream
    assert re.search(r"back in halves\)$", b.output(), re.M)  # told in the closing line
    assert re.search(r"all 300 messages settled: \d+ done, [1-9]\d* dead \(\d+ "
                     r"(not reported|stream closed)", b.output())


def test_warning_still_shows_the_listening_progress_and_stop_lines(processes, db):
    b = processes.broker(db, "--total", "80", "--log-level", "WARNING", "--progress-every",
                         "0.2", "--heartbeat", "600", "--max-attempts", "1")
    client = b.stream(40)
    client.hello()
    settle_batch(b, client, done_share=0.5)
    b.wait_for_line(r"INFO broker: progress: 20 done, 20 dead \(50.0%: 20 not reported\), "
                    r"40 in flight")
    settle_batch(b, client, done_share=0.5)
    assert b.wait(30) == 0
    out = b.output()
    assert re.search(r"INFO broker: listening on http://", out)
    assert re.search(r"INFO broker: stopped: 80 generated, 40 done, 40 dead", out)
    assert "connected from" not in out and "stream closed" not in out  # the chatter is off


def test_the_dashboard_page_and_its_event_stream(processes, db):
    b = processes.broker(db, "--heartbeat", "600", "--token", "tok")
    status, headers, page = b.request("GET", "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "EventSource" in page and "<canvas" in page and "http" not in page.split(
        "<script>")[0].replace("http-equiv", "")  # no external assets
    assert SSEClient(b.host, b.port, "/events").status == 401
    events = SSEClient(b.host, b.port, "/events?access_token=tok")
    assert events.status == 200
    kind, history = events.next_event()  # (first the chart's last 5 minutes: a sample a second)
    assert kind == "history" and all(len(sample) == 3 for sample in history)
    kind, stats = events.next_event()
    assert kind == "stats" and stats["workers"] == 0 and stats["recent_dead"] == []
    assert stats["dead_by_reason"]["not reported"] == 0 and abs(stats["time"] - time.time()) < 5
    events.close()


def test_the_dashboard_in_a_real_headless_browser(processes, db, tmp_path):
    b = processes.broker(db, "--workers", "2", "--heartbeat", "5")
    errors = []
    shot = os.environ.get("DASHBOARD_SCREENSHOT") or str(tmp_path / "dashboard.png")
    with headless_chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(b.url + "/")
        page.wait_for_selector("#counter-done b", timeout=15000)
        first = int(page.inner_text("#counter-generated b"))
        page.wait_for_function(
            "n => Number(document.querySelector('#counter-generated b').textContent) > n",
            arg=first, timeout=20000)
        page.wait_for_selector("#workers tr", timeout=15000)
        page.wait_for_timeout(5000)  # (open 5 s, as a user sees it: a filled chart)
        page.screenshot(path=shot, full_page=True)
    assert errors == []
    assert os.path.getsize(shot) > 1000


def test_the_dashboard_shows_the_last_minutes_at_once_the_dead_share_and_pages_dead(
        processes, db):
    b = processes.broker(db, "--workers", "3", "--heartbeat", "5", "--max-attempts", "1")
    wait_until(lambda: b.stats()["dead"] > 25 and b.stats()["uptime_s"] > 6, timeout=60)
    with dashboard_page(b.url) as (page, errors):
        # The broker's last seconds are drawn as the page opens, not from then on.
        page.wait_for_function("window.chartSamples >= 4", timeout=5000)
        page.wait_for_selector("#counter-dead b", timeout=15000)
        share = page.inner_text("#dead-share")
        count = page.inner_text("#dead-count")
        page.click("#dead-first")
        page.wait_for_function("document.getElementById('dead-page').textContent"
                               ".startsWith('page 1')", timeout=10000)
        first_page = page.eval_on_selector_all("#all-dead tr td:first-child",
                                               "tds => tds.map(td => td.textContent)")
        page.click("#dead-next")
        page.wait_for_function("document.getElementById('dead-page').textContent"
                               ".startsWith('page 2')", timeout=10000)
        second_page = page.eval_on_selector_all("#all-dead tr td:first-child",
                                                "tds => tds.map(td => td.textContent)")
    assert errors == []
    assert re.fullmatch(r"dead: \d+\.\d% of those settled \(\d+ [a-z ]+(, \d+ [a-z ]+)*\)", share)
    assert re.fullmatch(r"\(20 of \d+ this run\)", count)
    listed = [d["id"] for d in b.request("GET", "/dead?limit=40")[2]["dead"]]
    assert first_page == listed[:20] and second_page == listed[20:40]


def test_the_dashboard_counts_the_jobs_of_producers(processes, db):
    b = processes.broker(db, "--source", "api", "--heartbeat", "600", "--max-backlog", 5)
    jobs = json.dumps([{"payload": n} for n in range(5)]).encode()
    assert b.request("POST", "/enqueue", jobs)[0] == 200
    assert b.request("POST", "/enqueue", b'[{"payload": 9}]')[0] == 503  # the backlog is full
    with dashboard_page(b.url) as (page, errors):
        page.wait_for_selector("#counter-enqueued b", timeout=15000)
        shown = {key: page.inner_text("#counter-%s b" % key)
                 for key in ("enqueued", "backlog", "duplicates", "refused")}
        status = page.inner_text("#status")
    assert shown == {"enqueued": "5", "backlog": "5", "duplicates": "0", "refused": "1"}
    assert "jobs from producers" in status and errors == []


# --- the tools never hurt a file ---------------------------------------------------------

def test_post_requeue_sends_dead_letters_out_first_at_once(processes, db):
    b = processes.broker(db, "--max-attempts", "1", "--heartbeat", "600")
    ids = live_dead_letters(b, 3)
    status, _headers, answer = b.request("POST", "/requeue",
                                         json.dumps([ids[1], "nonexistent"]).encode())
    assert status == 200 and answer == {"requeued": 1, "missing": ["nonexistent"]}
    assert sorted(dead_now(b)) == sorted([ids[0], ids[2]])
    client = b.stream(5)
    client.hello()
    batch = client.batch()
    assert batch[0]["id"] == ids[1] and batch[0]["attempt"] == 1  # first, attempts reset
    assert b.request("POST", "/requeue", json.dumps({"all": True}).encode())[2] == {
        "requeued": 2, "missing": []}
    assert dead_now(b) == []
    for bad in (b"", b"{}", b'{"all": false}', b"[1]", b"nope"):
        assert b.request("POST", "/requeue", bad)[0] == 400, bad
    assert "1 dead letters requeued: they go out first" in b.output()
    assert b.stats()["dead"] == 3


def test_a_live_requeue_is_never_lost(processes, db):
    """The requeued dead letter waits in `pending`, with --durable or without:
    either way a broker killed at once sends it on its next start."""
    for durable in ((), ("--durable",)):
        db.unlink() if db.exists() else None
        b = processes.broker(db, "--max-attempts", "1", "--heartbeat", "600", *durable)
        ids = live_dead_letters(b, 2)
        assert b.request("POST", "/requeue", json.dumps(ids[:1]).encode())[0] == 200
        b.signal(signal.SIGKILL)
        b.wait()
        again = processes.broker(db, "--heartbeat", "600", *durable)
        client = again.stream(1)
        client.hello()
        assert [m["id"] for m in client.batch()] == ids[:1]
        assert dead_now(again) == ids[1:]
        again.stop()


def test_requeue_url_requeues_on_a_running_broker_with_its_token(processes, db):
    b = processes.broker(db, "--max-attempts", "1", "--heartbeat", "600", "--token", "s3cret")
    b.bearer = "s3cret"
    ids = live_dead_letters(b, 2)
    done = broker_tool("requeue", "--url", b.url, "--token", "s3cret", ids[0], "nonexistent")
    assert done.returncode == 1
    assert "1 dead letters requeued" in done.stdout and "nonexistent" in done.stderr
    refused = broker_tool("requeue", "--url", b.url, "--token", "wrong", "--all")
    assert refused.returncode == 2 and "answered 401" in refused.stderr
    assert "1 dead letters requeued" in broker_tool(
        "requeue", "--url", b.url, "--all", env_token="s3cret").stdout
    # The token from a file too (--token-file, or $BROKER_TOKEN_FILE): not in the process list.
    more = live_dead_letters(b, 2)
    token_file = db.parent / "token"
    token_file.write_text("s3cret\n")
    assert "1 dead letters requeued" in broker_tool(
        "requeue", "--url", b.url, "--token-file", token_file, more[0]).stdout
    result = subprocess.run([sys.executable, "broker.py", "requeue", "--url", b.url, more[1]],
                            cwd=HERE, capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, BROKER_TOKEN_FILE=str(token_file)))
    assert "1 dead letters requeued" in result.stdout, result.stderr
    gone = broker_tool("requeue", "--url", "http://127.0.0.1:9", "--all")
    assert gone.returncode == 2 and "cannot reach" in gone.stderr


def test_the_dashboard_requeues_one_dead_letter_and_then_all_asking_for_the_token(
        processes, db):
    b = processes.broker(db, "--max-attempts", "1", "--heartbeat", "600", "--token", "s3cret")
    b.bearer = "s3cret"
    ids = live_dead_letters(b, 3)
    prompts = []
    with headless_chromium() as browser:
        page = browser.new_page()
        page.on("dialog", lambda dialog: (prompts.append(dialog.message),
                                          dialog.accept("s3cret")))
        page.goto(b.url + "/")
        page.wait_for_selector("#dead button.requeue", timeout=15000)
        first = page.inner_text("#dead tr:first-child td:first-child")
        page.click("#dead tr:first-child button.requeue")
        page.wait_for_function("document.getElementById('requeue-result').textContent"
                               " === '1 requeued'", timeout=10000)
        assert first not in dead_now(b) and len(dead_now(b)) == 2
        page.click("#requeue-all")
        page.wait_for_function("document.getElementById('requeue-result').textContent"
                               " === '2 requeued'", timeout=10000)
    assert dead_now(b) == [] and first in ids
    # Asked once for the token (for the stream), and to confirm "requeue all".
    assert prompts == ["This broker needs its token:", "Requeue every dead letter?"]


def broker_tool(*args, env_token=None):
    env = dict(os.environ, BROKER_TOKEN=env_token) if env_token else None
    return subprocess.run([sys.executable, "broker.py"] + [str(a) for a in args], cwd=HERE,
                          capture_output=True, text=True, timeout=30, env=env)


def test_dead_only_reads_and_answers_a_bad_file_with_one_line_and_exit_2(tmp_path):
    empty = tmp_path / "empty.db"
    empty.touch()
    folder = tmp_path / "folder.db"
    folder.mkdir()
    text = tmp_path / "text.db"
    text.write_bytes(b"not a bbolt file\n" * 1000)
    for path, says in ((empty, "an empty file"), (folder, "a folder"),
                       (text, "cannot be read as a bbolt file"),
                       (tmp_path / "missing.db", "no such file")):
        for command in ("dead", "requeue"):
            extra = ["--all"] if command == "requeue" else []
            result = broker_tool(command, "--db", path, *extra)
            assert result.returncode == 2, (path, command, result.stderr)
            assert says in result.stderr and "Traceback" not in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
    assert empty.stat().st_size == 0  # never turned into a database
    assert not (tmp_path / "missing.db").exists()


def test_dead_opens_the_db_read_only(processes, db, tmp_path):
    dead_letters_made(processes, db, 2)
    import bbolt_lite
    before = db.read_bytes()
    # Another reader holds the file's shared lock: a writer could not open it.
    with bbolt_lite.open(str(db), readonly=True):
        result = broker_tool("dead", "--db", db)
    assert result.returncode == 0 and "2 dead letters" in result.stdout
    assert db.read_bytes() == before


def test_dead_into_a_closed_pipe_exits_quietly(processes, db):
    dead_letters_made(processes, db, 30)
    result = subprocess.run("%s broker.py dead --db %s | head -1" % (sys.executable, db),
                            shell=True, cwd=HERE, capture_output=True, text=True, timeout=30)
    assert result.stdout.startswith("ID") and result.stderr == ""


def test_dead_and_the_dead_endpoint_show_an_unreadable_record_and_go_on(processes, db):
    import bbolt_lite
    dead_letters_made(processes, db, 1)
    with bbolt_lite.open(str(db)) as store, store.update() as tx:
        tx.bucket(b"failed").put(b"00000000000000000000", b"{not json")
    table = broker_tool("dead", "--db", db)
    assert table.returncode == 0 and "not a JSON record" in table.stdout
    assert "2 dead letters" in table.stdout
    again = processes.broker(db, "--heartbeat", "600")
    status, _h, body = again.request("GET", "/dead")
    assert status == 200 and len(body["dead"]) == 2
    assert "not a JSON record" in body["dead"][0]["unreadable"]


@pytest.mark.parametrize("bucket,key,value,says", [
    (b"pending", b"dc5a26lqmd2s0h2690l0", b'{"id":"dc5a26lqmd2s0h2690l0"}', "period"),
    (b"pending", b"x", b"[1,2]", "not a JSON object"),
    (b"requeue", b"dc5a26lqmd2s0h2690l0", b"{}", "its id is not its key"),
    (b"state", b"dead", b"-3", "is not a count"),
])
def test_garbage_in_the_db_is_refused_at_start_naming_it_and_nothing_changes(
        db, bucket, key, value, says):
    import bbolt_lite
    with bbolt_lite.open(str(db)) as store, store.update() as tx:
        tx.create_bucket_if_not_exists(bucket).put(key, value)
    before = db.read_bytes()
    result = broker_tool("--port", "0", "--db", db, "--durable")
    assert result.returncode == 2, result.stderr
    assert "bucket %r" % bucket.decode() in result.stderr and says in result.stderr
    assert "Traceback" not in result.stderr
    assert db.read_bytes() == before


def test_a_start_that_fails_leaves_no_new_file_and_says_why(tmp_path):
    db = tmp_path / "new.db"
    result = broker_tool("--port", "70000", "--db", db)
    assert result.returncode == 2 and "must be in 0..65535" in result.stderr
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        result = broker_tool("--port", busy.getsockname()[1], "--db", db)
    finally:
        busy.close()
    assert result.returncode == 2 and "cannot listen on" in result.stderr
    result = broker_tool("--port", "0", "--db", db, "--trace", tmp_path / "no" / "trace.jsonl")
    assert result.returncode == 2
    assert "cannot open the trace file" in result.stderr and "No such file" in result.stderr
    assert os.listdir(str(tmp_path)) == []


# -- --pin: the broker's threads on one CPU --------------------------------------

several_cpus = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="pinning needs Linux and two CPUs to choose from")


def cpus_of_threads(pid):
    """The set of CPUs each thread of `pid` may run on, as a set of strings."""
    lists = set()
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/status" % (pid, tid)) as f:
                lists.add(re.search(r"Cpus_allowed_list:\s*(\S+)", f.read()).group(1))
        except FileNotFoundError:
            pass  # (a thread that has just ended)
    return lists


@several_cpus
def test_the_broker_keeps_its_threads_on_one_cpu_and_gives_its_workers_all(processes, db):
    b = processes.broker(db, "--workers", "2", "--heartbeat", "600")
    b.wait_for_line(r"w2: connected")
    output = b.output()
    cpu = re.search(r"the broker's threads run on CPU (\d+) of ", output).group(1)
    assert cpus_of_threads(b.popen.pid) == {cpu}
    pids = started_pids(output)
    assert len(pids) >= 3
    for pid in pids:
        try:
            assert os.sched_getaffinity(pid) == os.sched_getaffinity(0)
        except ProcessLookupError:
            pass  # (a worker a message ended)


@several_cpus
def test_no_pin_leaves_the_threads_on_every_cpu(processes, db):
    b = processes.broker(db, "--no-pin", "--heartbeat", "600")
    b.wait_for_line(r"dashboard: ")
    everywhere = cpus_of_threads(os.getpid())
    assert cpus_of_threads(b.popen.pid) == everywhere and len(everywhere) == 1
    assert "threads run on CPU" not in b.output()


@several_cpus
def test_a_pinned_broker_moves_off_a_cpu_that_other_work_keeps_busy(processes, db):
    b = processes.broker(db, "--heartbeat", "600")
    cpu = int(re.search(r"the broker's threads run on CPU (\d+) of ",
                        b.wait_for_line(r"threads run on CPU")).group(1))
    hog = subprocess.Popen([sys.executable, "-c", "import os\nos.sched_setaffinity(0, {%d})\n"
                            "while True: pass" % cpu])
    try:
        line = b.wait_for_line(r"moved the broker's threads there", timeout=30)
        moved_to = re.search(r"CPU (\d+) \d+%: moved", line).group(1)
        assert int(moved_to) != cpu
        assert cpus_of_threads(b.popen.pid) == {moved_to}
    finally:
        hog.kill()
        hog.wait()


# --- requeued dead letters are never lost ----------------------------------------------


def read_buckets(db):
    import bbolt_lite
    with bbolt_lite.open(str(db), readonly=True, timeout=5) as store, store.view() as tx:
        def bucket(name):
            b = tx.bucket(name)
            return {k.decode(): json.loads(v) for k, v in b.items()} if b else {}
        state = tx.bucket(b"state")
        counters = {k.decode(): int(v) for k, v in state.items()} if state else {}
        return bucket(b"failed"), bucket(b"requeue"), bucket(b"pending"), counters


def stream_batch(b, batchsize):
    """A new stream on broker `b`, and its first batch."""
    client = b.stream(batchsize)
    client.hello()
    return client, client.batch()


def dead_letters_requeued(processes, db, count, *flags):
    """A run whose `count` messages all die, then `broker.py requeue --all`."""
    ids = dead_letters_made(processes, db, count, *flags)
    result = subprocess.run([sys.executable, "broker.py", "requeue", "--db", str(db), "--all"],
                            cwd=HERE, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return ids


def test_without_durable_requeued_dead_letters_stay_in_the_db_until_settled_again(
        processes, db):
    ids = dead_letters_requeued(processes, db, 20)
    b = processes.broker(db, "--total", "0", "--heartbeat", "600")
    b.wait_for_line(r"20 requeued dead letters go out first")
    b.signal(signal.SIGTERM)  # a clean stop before any worker came
    assert b.wait() == 0
    failed, requeue, pending, _counters = read_buckets(db)
    assert sorted(pending) == ids and failed == {} and requeue == {}
    assert all(record["requeued"] is True and record["attempts"] == 0
               for record in pending.values())
    # Settled again: 5 done, the rest dead again; each leaves `pending` as it settles.
    b = processes.broker(db, "--total", "0", "--max-attempts", "1", "--heartbeat", "600")
    client, batch = stream_batch(b, 20)
    done = [m["id"] for m in batch[:5]]
    assert b.report(client.token, batch[0]["batch"], done)[0] == 200
    assert b.wait() == 0
    assert "all 20 messages settled: 5 done, 15 dead" in b.output()
    failed, requeue, pending, _counters = read_buckets(db)
    assert (requeue, pending) == ({}, {}) and sorted(failed) == sorted(set(ids) - set(done))
    client.close()


def test_a_db_with_the_requeue_bucket_of_an_older_broker_sends_and_settles_its_dead_letters(
        processes, db):
    # An older broker.py kept requeued dead letters, as in `failed`, in a
    # `requeue` bucket: they move into `pending` at the start, go out first,
    # and leave the db as they settle.
    import bbolt_lite
    ids = ["9m4e2mr0ui3e8a215n4%s" % c for c in "0gw"]
    with bbolt_lite.open(str(db)) as store, store.update() as tx:
        requeue = tx.create_bucket(b"requeue")
        for message_id in ids:
            requeue.put(message_id.encode(), json.dumps({
                "id": message_id, "period": 7, "attempts": 3, "reason": "not reported",
                "failed_at": "2026-01-01T00:00:00.000Z"}).encode())
    for flags in ((), ("--durable",)):
        b = processes.broker(db, "--total", "0", "--max-attempts", "1", "--heartbeat", "600",
                             *flags)
        client, batch = stream_batch(b, 3)
        assert sorted(m["id"] for m in batch) == ids and batch[0]["attempt"] == 1
        if not flags:  # the first broker is killed: they wait in `pending`
            b.signal(signal.SIGKILL)
            b.wait()
            failed, requeue, pending, _counters = read_buckets(db)
            assert (failed, requeue) == ({}, {}) and sorted(pending) == ids
            client.close()
            continue
        assert b.report(client.token, batch[0]["batch"], ids[:1])[0] == 200
        assert b.wait() == 0
        assert "all 3 messages settled: 1 done, 2 dead" in b.output()
        client.close()
    failed, requeue, pending, counters = read_buckets(db)
    assert (requeue, pending) == ({}, {}) and sorted(failed) == ids[1:]
    assert counters["requeued"] == 3


def test_a_durable_run_killed_after_a_requeue_settles_its_total_when_restarted(processes, db):
    ids = dead_letters_requeued(processes, db, 6, "--durable")
    b = processes.broker(db, "--durable", "--total", "6", "--heartbeat", "600")
    client, batch = stream_batch(b, 6)
    assert sorted(m["id"] for m in batch) == ids
    assert b.report(client.token, batch[0]["batch"], ids[:3])[0] == 200
    b.signal(signal.SIGKILL)
    b.wait()
    client.close()
    _failed, requeue, pending, counters = read_buckets(db)
    assert requeue == {} and sorted(pending) == ids[3:] and counters["requeued"] == 6
    again = processes.broker(db, "--durable", "--total", "6", "--heartbeat", "600")
    client, rest = stream_batch(again, 6)
    assert sorted(m["id"] for m in rest) == ids[3:]
    assert again.report(client.token, rest[0]["batch"], ids[3:])[0] == 200
    assert again.wait() == 0
    assert "all 12 messages settled: 6 done, 6 dead" in again.output()
    client.close()


def test_a_clean_durable_run_after_a_requeue_settles(processes, db):
    ids = dead_letters_requeued(processes, db, 4, "--durable")
    b = processes.broker(db, "--durable", "--total", "4", "--heartbeat", "600")
    client, batch = stream_batch(b, 4)
    assert b.report(client.token, batch[0]["batch"], ids)[0] == 200
    assert b.wait(timeout=20) == 0
    failed, requeue, pending, _counters = read_buckets(db)
    assert (failed, requeue, pending) == ({}, {}, {})
    client.close()


def test_a_minute_of_workers_4_is_a_quiet_terminal(tmp_path):
    """`python broker.py --workers 4` at the default INFO: the start lines, a
    progress line every 10 s, and real problems only; the seed's intended
    failures (period > 800 raises, > 900 ends its worker), the workers'
    restarts and the per-stream lines are not in it."""
    from conftest import Process
    b = Process(["broker.py", "--workers", "4", "--port", "0", "--db", str(tmp_path / "b.db")])
    try:
        time.sleep(60)
        lines = list(b.lines)
    finally:
        b.stop()
    assert len(lines) < 30, "\n".join(lines)
    assert sum(" progress: " in line for line in lines) >= 5
    assert not [line for line in lines if " ERROR " in line or "raised" in line
                or "connected from" in line], "\n".join(lines)
    assert re.search(r"progress: \d+ done, \d+ dead \(\d+\.\d%", "\n".join(lines))
