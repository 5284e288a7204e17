"""The whole system: a real broker, real supervised workers, the bbolt file, Go's check."""

import json

import bbolt_lite
from conftest import audit_trace, run_boltcheck


def test_every_message_ends_done_or_dead_exactly_once_and_is_never_held_twice(
        processes, tmp_path, boltcheck):
    db, trace = tmp_path / "broker.db", tmp_path / "trace.jsonl"
    b = processes.broker(db, "--total", "2000", "--trace", trace, "--log-level", "INFO")
    processes.worker("--url", b.url, "--processes", "6", "--time-scale", "0.01",
                     "--log-level", "WARNING")
    assert b.wait(timeout=240) == 0, b.output()[-3000:]

    # The trace is written under the dispatcher's lock, in the order things happened.
    done, dead, unsettled, problems = audit_trace(trace)
    assert problems == [] and unsettled == set()
    assert len(done) + len(dead) == 2000 and not done & dead
    assert "all 2000 messages settled: %d done, %d dead" % (len(done), len(dead)) in b.output()

    with bbolt_lite.open(str(db), readonly=True) as store:
        assert store.check() == []
        with store.view() as tx:
            letters = {k.decode(): json.loads(v) for k, v in tx.bucket(b"failed").items()}
    assert set(letters) == dead
    for message_id, letter in letters.items():
        assert letter["attempts"] == 3
        assert letter["reason"] in ("not reported", "stream closed", "lease expired")
    result = run_boltcheck(boltcheck, "check", str(db))
    assert result.stdout.strip() == "OK", result.stdout + result.stderr
