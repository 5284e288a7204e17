"""Fuzzing, bounded for CI: the worker's SSE parser, bbolt_lite's file reader,
and the broker's reading of a POST /enqueue body.

Hypothesis drives them (no extra dependency): arbitrary bytes, cut anywhere,
into the parser; random damage into a real bbolt file; bytes and JSON of any
shape as jobs. A crash it finds is kept below as a regression example
(@example).
"""

import json
import os

from hypothesis import HealthCheck, example, given, settings, strategies as st

import bbolt_lite
import broker
import worker
from conftest import StrictSSEParser

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def feed_in_pieces(parser, data, cuts):
    events = []
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in zip(points, points[1:]):
        events += parser.feed(data[start:end])
    return events


@FUZZ
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=8))
@example(data=b"\r", cuts=[])
@example(data=b"data: \xff\xfe\r\r\n\n", cuts=[7])
def test_the_worker_sse_parser_never_raises_on_any_bytes_cut_anywhere(data, cuts):
    whole = worker.SSEParser().feed(data)
    assert feed_in_pieces(worker.SSEParser(), data, cuts) == whole
    for event, payload, last_id in whole:
        assert isinstance(event, str) and isinstance(payload, str) and isinstance(last_id, str)


_line = st.one_of(
    st.sampled_from(["", ": ping", "event: msg", "event: hello", "data", "data:", "id: 7",
                     "retry: 2000", "retry: x"]),
    st.builds(lambda f, v: f + ": " + v, st.sampled_from(["data", "event", "id", "other"]),
              st.text(alphabet=st.characters(blacklist_characters="\r\n",
                                             blacklist_categories=("Cs",)), max_size=12)))


@FUZZ
@given(lines=st.lists(_line, max_size=20), ending=st.sampled_from(["\n", "\r\n", "\r"]),
       cuts=st.lists(st.integers(0, 600), max_size=6))
@example(lines=["data"], ending="\r", cuts=[])  # found: a final CR waited for more bytes
def test_the_worker_sse_parser_agrees_with_the_strict_whatwg_parser(lines, ending, cuts):
    data = (ending.join(lines) + ending + ending).encode("utf-8")
    ours = [(e, d) for e, d, _id in feed_in_pieces(worker.SSEParser(), data, cuts)]
    strict = [(item[1], item[2]) for item in StrictSSEParser().feed(data) if item[0] == "event"]
    assert ours == strict


def _sample_file(path):
    with bbolt_lite.open(path, page_size=1024) as db:
        with db.update() as tx:
            b = tx.create_bucket(b"b")
            for i in range(300):
                b.put(b"k%05d" % i, b"v" * (i % 50))
            b.put(b"big", b"B" * 3000)
            b.create_bucket(b"nested").put(b"x", b"y")
            tx.create_bucket(b"inline").put(b"a", b"b")
        with db.update() as tx:
            for i in range(0, 300, 4):
                tx.bucket(b"b").delete(b"k%05d" % i)
    with open(path, "rb") as f:
        return f.read()


_GOOD = {}


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(damage=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)),
                       min_size=1, max_size=6),
       truncate=st.one_of(st.none(), st.integers(0, 1 << 20)))
def test_bbolt_lite_reading_a_damaged_file_raises_only_its_own_errors(tmp_path, damage, truncate):
    if "raw" not in _GOOD:
        _GOOD["raw"] = _sample_file(str(tmp_path / "good.db"))
    raw = bytearray(_GOOD["raw"])
    for position, value in damage:
        raw[position % len(raw)] = value
    if truncate is not None:
        raw = raw[:truncate % (len(raw) + 1)]
    path = str(tmp_path / ("fuzz-%s.db" % os.urandom(6).hex()))
    with open(path, "wb") as f:
        f.write(raw)
    try:
        with bbolt_lite.open(path, readonly=True, timeout=1) as db:
            db.check()
            with db.view() as tx:
                stack = [tx.bucket(name) for name in tx.buckets()]
                while stack:
                    bucket = stack.pop()
                    for key, value in bucket.items():
                        if value is None:
                            nested = bucket.bucket(key)
                            if nested is not None:
                                stack.append(nested)
                    cursor = bucket.cursor()
                    cursor.last()
                    cursor.prev()
                    cursor.seek(b"k00100")
    except bbolt_lite.Error:
        pass
    finally:
        os.remove(path)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 1002) | st.floats(allow_nan=False) |
    st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) |
    st.dictionaries(st.sampled_from(["payload", "period", "key", "delay_ms", "x"]) |
                    st.text(max_size=5), children, max_size=5),
    max_leaves=20)


def _no_constant(name):
    raise ValueError("%s is not JSON" % name)


STRICT_JSON = json.JSONDecoder(parse_constant=_no_constant)  # (as Go's or a browser's parser)


def fake_ids(count):
    return ["9m4e2mr0ui3e8a215n%02d" % (i % 100) for i in range(count)]


@FUZZ
@given(body=st.binary(max_size=300) | JSON_VALUES.map(lambda v: broker._compact_json(v).encode()))
@example(body=b'[{"payload": NaN}]')
@example(body=b'[{"payload": {"x": 1e400}}]')
@example(body=b"[" * 5000 + b"]" * 5000)
def test_an_enqueue_body_is_jobs_that_keep_the_rules_or_a_value_error_naming_why(body):
    try:
        jobs = broker.parse_jobs(body, fake_ids, 100.0)
    except ValueError as error:
        assert str(error)
        return
    for job in jobs:  # what POST /enqueue would accept keeps PROTOCOL.md's rules
        assert isinstance(job, broker.Job) and (job.payload is not None or job.period)
        assert job.period is None or 1 <= job.period <= 1000
        assert job.key is None or 0 < len(job.key.encode("utf-8")) <= 256
        assert job.due == 0.0 or job.due >= 100.0
        events = broker.job_events(type("B", (), {"number": 1, "messages": {job.id: job}})())
        for line in events.decode("ascii").splitlines():  # strict JSON, for any worker
            if line.startswith("data: "):
                STRICT_JSON.decode(line[6:])
