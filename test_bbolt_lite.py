"""bbolt_lite: the format, transactions, the B+tree, and interop with Go's bbolt."""

import errno
import json
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import bbolt_lite
from conftest import HERE, run_boltcheck


def key(i):
    return b"key-%08d" % i


def go_value(i, size):
    """The values the Go helper writes (interop/boltcheck value())."""
    return bytes((i * 31 + j * 7) % 251 for j in range(size))


def dump_records(db):
    """Every bucket and key, in the format of `boltcheck dump`."""
    records = []

    def walk(bucket, path):
        for k, v in bucket.items():
            if v is None:
                child = bucket.bucket(k)
                records.append({"path": path, "key": k.hex(), "value": None,
                                 "seq": child.sequence()})
                walk(child, path + [k.hex()])
            else:
                records.append({"path": path, "key": k.hex(), "value": v.hex()})

    with db.view() as tx:
        for name in tx.buckets():
            records.append({"path": [], "key": name.hex(), "value": None,
                            "seq": tx.bucket(name).sequence()})
            walk(tx.bucket(name), [name.hex()])
    return records


def go_dump(boltcheck, path):
    result = run_boltcheck(boltcheck, "dump", path)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def go_check(boltcheck, path):
    result = run_boltcheck(boltcheck, "check", path)
    assert result.returncode == 0 and result.stdout.strip() == "OK", result.stdout + result.stderr


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "test.db")


# --- the format -------------------------------------------------------------

def test_new_file_is_two_metas_freelist_and_empty_root_leaf(db_path):
    bbolt_lite.open(db_path).close()
    page_size = os.sysconf("SC_PAGE_SIZE")
    raw = open(db_path, "rb").read()
    assert len(raw) == 4 * page_size
    for pgid in (0, 1):
        header = bbolt_lite.PAGE_HEADER.unpack_from(raw, pgid * page_size)
        assert header == (pgid, bbolt_lite.META_PAGE, 0, 0)
        fields = bbolt_lite.META.unpack_from(raw, pgid * page_size + 16)
        magic, version, psize, _flags, root, _seq, freelist, hwm, txid, checksum = fields
        assert (magic, version, psize, root, freelist, hwm, txid) == (
            0xED0CDAED, 2, page_size, 3, 2, 4, pgid)
        assert checksum == bbolt_lite._fnv1a64(raw[pgid * page_size + 16:pgid * page_size + 72])
    assert bbolt_lite.PAGE_HEADER.unpack_from(raw, 2 * page_size)[:3] == (2, 0x10, 0)
    assert bbolt_lite.PAGE_HEADER.unpack_from(raw, 3 * page_size)[:3] == (3, 0x02, 0)


def test_commit_writes_meta_page_of_txid_mod_2(db_path):
    with bbolt_lite.open(db_path) as db:
        for expected_txid in (2, 3, 4):
            with db.update() as tx:
                tx.create_bucket_if_not_exists(b"b").put(b"k", b"%d" % expected_txid)
            assert db.info()["txid"] == expected_txid
            raw = open(db_path, "rb").read(2 * db.page_size)
            meta = bbolt_lite.META.unpack_from(raw, (expected_txid % 2) * db.page_size + 16)
            assert meta[8] == expected_txid


def test_every_page_written_is_zero_after_its_content(db_path):
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            bucket = tx.create_bucket(b"b")
            bucket.put(b"big", b"x" * (3 * db.page_size))  # a leaf over several pages
            for i in range(300):
                bucket.put(b"key-%04d" % i, os.urandom(40 + i % 60))
        with db.update() as tx:
            for i in range(0, 300, 3):
                tx.bucket(b"b").delete(b"key-%04d" % i)  # freed pages: a freelist of ids
        page_size, meta = db.page_size, db._meta
    raw = open(db_path, "rb").read()
    used = {0: 16 + bbolt_lite.META_SIZE, 1: 16 + bbolt_lite.META_SIZE}
    with bbolt_lite.open(db_path, readonly=True) as db, db.view() as tx:
        freelist = db._read_span(meta.freelist, meta.pgid)
        used[meta.freelist] = len(bbolt_lite._Freelist(bbolt_lite._parse_freelist(
            freelist, meta.freelist, meta.pgid)).to_bytes(meta.freelist, 0, 0))
        pending = [meta.root, tx.bucket(b"b")._root]  # (the root bucket's pages, then b's)
        while pending:
            node = db._read_node(pending.pop(), meta.pgid)
            used[node.pgid] = node.size()
            if not node.is_leaf:
                pending.extend(node.pgids)
    assert len(used) > 5
    for pgid, size in used.items():
        overflow = bbolt_lite.PAGE_HEADER.unpack_from(raw, pgid * page_size)[3]
        end = (pgid + overflow + 1) * page_size
        assert raw[pgid * page_size + size:end] == bytes(end - pgid * page_size - size), pgid


def test_freelist_of_0xffff_ids_or_more_keeps_its_count_in_the_first_id():
    ids = list(range(2, 70002))
    freelist = bbolt_lite._Freelist(ids)
    pages = freelist.page_size_needed() // 4096 + 1
    raw = freelist.to_bytes(9, pages - 1, pages * 4096)
    assert bbolt_lite.PAGE_HEADER.unpack_from(raw, 0) == (9, 0x10, 0xFFFF, pages - 1)
    assert bbolt_lite.PGID.unpack_from(raw, 16)[0] == 70000
    assert bbolt_lite._parse_freelist(raw, 9, 80000) == ids
    small = bbolt_lite._Freelist(range(2, 0xFFFF + 1))  # 0xFFFE ids: the plain form
    raw = small.to_bytes(3, 128, 129 * 4096)
    assert bbolt_lite.PAGE_HEADER.unpack_from(raw, 0)[2] == 0xFFFE


def test_element_pos_counts_from_the_element_itself(db_path):
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            b = tx.create_bucket(b"b")
            for i in range(300):  # too big to stay inline
                b.put(key(i), b"v" * 20)
        with db.view() as tx:
            root_leaf = tx.bucket(b"b")._root
        raw = open(db_path, "rb").read()
        start = root_leaf * db.page_size
        pgid, flags, count, _overflow = bbolt_lite.PAGE_HEADER.unpack_from(raw, start)
        pages = [start]
        if flags == bbolt_lite.BRANCH_PAGE:
            child = bbolt_lite.BRANCH_ELEMENT.unpack_from(raw, start + 16)[2]
            pages = [child * db.page_size]
        elem = pages[0] + 16
        _flags, pos, ksize, vsize = bbolt_lite.LEAF_ELEMENT.unpack_from(raw, elem)
        assert raw[elem + pos:elem + pos + ksize] == key(0)
        assert raw[elem + pos + ksize:elem + pos + ksize + vsize] == b"v" * 20


# --- the API ----------------------------------------------------------------

def test_put_get_delete_in_byte_order(db_path):
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            b = tx.create_bucket(b"widgets")
            for k in (b"b", b"a", b"\xff", b"ab", b"\x00"):
                b.put(k, k * 2)
            b.delete(b"ab")
            b.delete(b"missing")
        with db.view() as tx:
            b = tx.bucket(b"widgets")
            assert list(b.items()) == [(b"\x00", b"\x00\x00"), (b"a", b"aa"),
                                       (b"b", b"bb"), (b"\xff", b"\xff\xff")]
            assert b.get(b"ab") is None
            assert tx.bucket(b"nope") is None


def test_rollback_on_exception_leaves_nothing(db_path):
    with bbolt_lite.open(db_path) as db:
        with pytest.raises(RuntimeError):
            with db.update() as tx:
                tx.create_bucket(b"b").put(b"k", b"v")
                raise RuntimeError("boom")
        with db.view() as tx:
            assert list(tx.buckets()) == []
        assert db.check() == []


def test_nested_buckets_sequences_and_cursor(db_path):
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            top = tx.create_bucket(b"top")
            child = top.create_bucket(b"child")
            assert [child.next_sequence() for _ in range(3)] == [1, 2, 3]
            child.put(b"x", b"1")
            top.put(b"a", b"2")
            top.put(b"z", b"3")
        with db.view() as tx:
            top = tx.bucket(b"top")
            assert list(top.items()) == [(b"a", b"2"), (b"child", None), (b"z", b"3")]
            assert list(top.buckets()) == [b"child"]
            assert top.bucket(b"child").sequence() == 3
            assert top.get(b"child") is None
            cursor = top.cursor()
            assert cursor.seek(b"b") == (b"child", None)
            assert cursor.next() == (b"z", b"3")
            assert cursor.next() == (None, None)
            assert cursor.last() == (b"z", b"3")
            assert cursor.prev() == (b"child", None)
            assert cursor.first() == (b"a", b"2")
            assert cursor.seek(b"zz") == (None, None)


def test_errors_are_named(db_path):
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            b = tx.create_bucket(b"b")
            b.create_bucket(b"sub")
            b.put(b"val", b"1")
            with pytest.raises(bbolt_lite.BucketExistsError):
                tx.create_bucket(b"b")
            with pytest.raises(bbolt_lite.IncompatibleValueError):
                b.put(b"sub", b"x")
            with pytest.raises(bbolt_lite.IncompatibleValueError):
                b.delete(b"sub")
            with pytest.raises(bbolt_lite.IncompatibleValueError):
                b.create_bucket(b"val")
            with pytest.raises(bbolt_lite.KeyRequiredError):
                b.put(b"", b"x")
            with pytest.raises(bbolt_lite.KeyTooLargeError):
                b.put(b"k" * 32769, b"x")
            with pytest.raises(bbolt_lite.BucketNotFoundError):
                tx.delete_bucket(b"none")
            with pytest.raises(bbolt_lite.BucketNameRequiredError):
                tx.create_bucket(b"")
        with db.view() as tx:
            with pytest.raises(bbolt_lite.TxNotWritableError):
                tx.bucket(b"b").put(b"k", b"v")
        tx = db.begin(True)
        tx.commit()
        with pytest.raises(bbolt_lite.TxClosedError):
            tx.create_bucket(b"c")
    with pytest.raises(bbolt_lite.DatabaseNotOpenError):
        db.begin()
    assert issubclass(bbolt_lite.ChecksumError, bbolt_lite.Error)


def test_readonly_open_refuses_writes_and_missing_files(db_path, tmp_path):
    bbolt_lite.open(db_path).close()
    with bbolt_lite.open(db_path, readonly=True) as db:
        with pytest.raises(bbolt_lite.DatabaseReadOnlyError):
            db.update()
    with pytest.raises(bbolt_lite.Error, match="cannot open"):
        bbolt_lite.open(str(tmp_path / "missing.db"), readonly=True)


def test_large_values_use_overflow_pages(db_path):
    big = os.urandom(1024 * 1024)
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            b = tx.create_bucket(b"b")
            b.put(b"big", big)
            b.put(b"mid", b"m" * 10000)
        with db.view() as tx:
            assert tx.bucket(b"b").get(b"big") == big
            assert tx.bucket(b"b").stats()["leaf_overflow_n"] >= 256
        assert db.check() == []


def test_deleting_a_bucket_frees_all_its_pages(db_path):
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            b = tx.create_bucket(b"b")
            for i in range(5000):
                b.put(key(i), b"x" * 100)
            b.create_bucket(b"sub").put(b"big", b"y" * 50000)
        high_water = db.info()["high_water_mark"]
        with db.update() as tx:
            tx.delete_bucket(b"b")
        assert db.check() == []
        # The next round reuses the freed pages instead of growing the file.
        for _round in range(3):
            with db.update() as tx:
                b = tx.create_bucket(b"b")
                for i in range(5000):
                    b.put(key(i), b"x" * 100)
            with db.update() as tx:
                tx.delete_bucket(b"b")
        assert db.info()["high_water_mark"] <= high_water + 10
        assert db.check() == []


def test_put_delete_churn_does_not_grow_the_file(db_path):
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            tx.create_bucket(b"b")
        sizes = []
        for round_ in range(30):
            with db.update() as tx:
                b = tx.bucket(b"b")
                for i in range(200):
                    b.put(key(round_ * 200 + i), b"v" * 64)
            with db.update() as tx:
                b = tx.bucket(b"b")
                for i in range(200):
                    b.delete(key(round_ * 200 + i))
            sizes.append(db.info()["high_water_mark"])
        assert sizes[-1] == sizes[10], sizes
        assert db.check() == []


def test_reader_keeps_its_snapshot_while_writer_reuses_pages(db_path):
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            b = tx.create_bucket(b"b")
            for i in range(2000):
                b.put(key(i), b"old")
        reader = db.view()
        for round_ in range(5):
            with db.update() as tx:
                b = tx.bucket(b"b")
                for i in range(2000):
                    b.put(key(i), b"new%d" % round_)
        assert all(v == b"old" for _k, v in reader.bucket(b"b").items())
        reader.rollback()
        with db.view() as tx:
            assert tx.bucket(b"b").get(key(5)) == b"new4"
        assert db.check() == []


def test_one_writer_at_a_time_across_threads(db_path):
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            tx.create_bucket(b"counter").put(b"n", b"0")

        def bump():
            for _ in range(20):
                with db.update() as tx:
                    b = tx.bucket(b"counter")
                    b.put(b"n", b"%d" % (int(b.get(b"n")) + 1))

        threads = [threading.Thread(target=bump) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        with db.view() as tx:
            assert tx.bucket(b"counter").get(b"n") == b"80"


def test_second_writer_process_gets_a_clear_lock_error(db_path):
    with bbolt_lite.open(db_path):
        code = "import bbolt_lite,sys\ntry:\n  bbolt_lite.open(sys.argv[1], timeout=0.2)\n" \
               "except bbolt_lite.DatabaseLockedError as e:\n  print(e); sys.exit(7)\n"
        result = subprocess.run([sys.executable, "-c", code, db_path], cwd=HERE,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 7, result.stderr
        assert "locked by another process" in result.stdout


def test_readers_share_the_lock(db_path):
    bbolt_lite.open(db_path).close()
    with bbolt_lite.open(db_path, readonly=True):
        with bbolt_lite.open(db_path, readonly=True, timeout=0.2) as second:
            assert second.check() == []
        with pytest.raises(bbolt_lite.DatabaseLockedError):
            bbolt_lite.open(db_path, timeout=0.2)


def test_check_finds_unreachable_and_double_referenced_pages(db_path):
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            b = tx.create_bucket(b"b")
            for i in range(1000):
                b.put(key(i), b"x" * 50)
        freelist_pgid = db._meta.freelist
        page_size = db.page_size
    # Empty the freelist on disk: every free page becomes unreachable and unfreed.
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            tx.bucket(b"b").put(key(1), b"y")  # frees some pages
        freelist_pgid = db._meta.freelist
    with open(db_path, "r+b") as f:
        f.seek(freelist_pgid * page_size + 10)
        f.write(struct.pack("<H", 0))
    with bbolt_lite.open(db_path, readonly=True) as db:
        problems = db.check()
    assert any("unreachable unfreed" in p for p in problems), problems


def test_command_line_check_dump_get(db_path):
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            b = tx.create_bucket(b"failed")
            b.put(b"id1", b'{"id": "id1"}')
            b.put(b"id2", b'not {json}')
            b.create_bucket(b"sub").put(b"k", b"\xff\x00")

    def cli(*args):
        return subprocess.run([sys.executable, os.path.join(HERE, "bbolt_lite.py")] + list(args),
                              capture_output=True, text=True, timeout=30)

    assert cli("check", db_path).stdout == "OK\n"
    lines = [json.loads(line) for line in cli("dump", db_path).stdout.splitlines()]
    assert lines == [{"bucket": ["failed"], "key": "id1", "value": {"id": "id1"}},  # (jq: .value.id)
                     {"bucket": ["failed"], "key": "id2", "value": "not {json}"},
                     {"bucket": ["failed", "sub"], "key": "k", "value_hex": "ff00"}]
    assert cli("get", db_path, "failed", "id1").stdout == '{"id": "id1"}'
    assert cli("buckets", db_path).stdout == "failed\n"
    assert cli("keys", db_path, "failed").stdout == "id1\nid2\nsub\n"
    assert cli("get", db_path, "failed", "nope").returncode == 1
    assert "Page size: " in cli("info", db_path).stdout
    assert "leaf" in cli("pages", db_path).stdout
    # Counted as Go's Bucket.Stats() counts: nested buckets' names are keys too.
    assert "key_n=4 depth=2" in cli("stats", db_path).stdout
    assert "bucket_n=2 inline_bucket_n=1" in cli("stats", db_path).stdout
    assert cli("frobnicate", db_path).returncode == 2
    missing = cli("check", db_path + ".missing")
    assert missing.returncode == 2 and "no such file" in missing.stderr


# --- the property test: a dict model across many transactions ----------------

_keys = st.binary(min_size=1, max_size=12)
_operations = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from([b"a", b"b", b"c"]), _keys,
              st.binary(max_size=600)),
    st.tuples(st.just("delete"), st.sampled_from([b"a", b"b", b"c"]), _keys, st.none()),
    st.tuples(st.just("create"), st.sampled_from([b"a", b"b", b"c"]), st.none(), st.none()),
    st.tuples(st.just("drop"), st.sampled_from([b"a", b"b", b"c"]), st.none(), st.none()),
    st.tuples(st.just("bulk"), st.sampled_from([b"a", b"b", b"c"]), st.integers(0, 400),
              st.integers(0, 300)),
), max_size=25)


class _Abort(Exception):
    """Raised in a transaction that the property test aborts."""


def _apply(tx, operations, model):
    for op, name, k, v in operations:
        bucket = tx.bucket(name)
        if op == "create":
            if bucket is None:
                tx.create_bucket(name)
                model[name] = {}
        elif op == "drop":
            if bucket is not None:
                tx.delete_bucket(name)
                del model[name]
        elif bucket is None:
            continue
        elif op == "put":
            bucket.put(k, v)
            model[name][k] = v
        elif op == "delete":
            bucket.delete(k)
            model[name].pop(k, None)
        elif op == "bulk":  # many keys: splits, then merges
            for i in range(k):
                bucket.put(b"bulk%05d" % ((i * 7919 + v) % 1000), b"%d" % i)
                model[name][b"bulk%05d" % ((i * 7919 + v) % 1000)] = b"%d" % i
            for i in range(0, 1000, 3 if v % 2 else 1):
                if v % 4 == 3:
                    bucket.delete(b"bulk%05d" % i)
                    model[name].pop(b"bulk%05d" % i, None)


def _assert_matches(db, model):
    assert db.check() == []
    with db.view() as tx:
        assert sorted(tx.buckets()) == sorted(model)
        for name, content in model.items():
            assert list(tx.bucket(name).items()) == sorted(content.items())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(transactions=st.lists(st.tuples(_operations, st.sampled_from(["commit", "abort",
                                                                     "reopen"])),
                             min_size=1, max_size=6),
       page_size=st.sampled_from([1024, 4096]))
@example(transactions=[  # the shape that corrupted files: a bucket dropped in an aborted tx
    ([("create", b"a", None, None), ("bulk", b"a", 300, 0)], "commit"),
    ([("drop", b"a", None, None)], "abort"),
    ([("create", b"b", None, None), ("bulk", b"b", 300, 1)], "commit")], page_size=1024)
def test_matches_a_dict_model_across_transactions_aborts_and_reopens(tmp_path, transactions,
                                                                     page_size):
    """Any mix of operations, committed, or aborted (an exception in the
    transaction) after any of them, with the file kept open or reopened."""
    path = str(tmp_path / ("model-%s.db" % os.urandom(8).hex()))  # hypothesis seeds `random`
    model = {}
    db = bbolt_lite.open(path, page_size=page_size)
    try:
        for operations, ending in transactions:
            if ending == "reopen":
                db.close()
                db = bbolt_lite.open(path)
            trial = {name: dict(content) for name, content in model.items()}
            try:
                with db.update() as tx:
                    _apply(tx, operations, trial)
                    if ending == "abort":
                        raise _Abort()
            except _Abort:
                trial = model
            model = trial
            _assert_matches(db, model)
    finally:
        db.close()
    with bbolt_lite.open(path) as db:
        _assert_matches(db, model)


# --- crash safety -----------------------------------------------------------

_CRASH_CHILD = textwrap.dedent("""
    import sys, bbolt_lite
    db = bbolt_lite.open(sys.argv[1])
    with db.view() as tx:
        b = tx.bucket(b"log")
        n = 0 if b is None else len(b.keys())
    while True:
        with db.update() as tx:
            b = tx.create_bucket_if_not_exists(b"log")
            b.put(b"%08d" % n, b"x" * (n % 3000))
            if n % 7 == 0 and n:
                b.delete(b"%08d" % (n - 7))
                b.put(b"%08d" % (n - 7), b"again")
        print(n, flush=True)
        n += 1
""")


def test_sigkill_at_random_moments_leaves_the_last_committed_state(db_path):
    rng = random.Random(1234)
    committed = 0  # transactions known committed (their print arrived)
    for _kill in range(50):
        child = subprocess.Popen([sys.executable, "-c", _CRASH_CHILD, db_path], cwd=HERE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            first = child.stdout.readline()  # it runs: now kill it at a random moment
            assert first, "child did not start"
            time.sleep(rng.uniform(0, 0.05))
            child.send_signal(signal.SIGKILL)
            printed = [first] + child.stdout.read().splitlines()
        finally:
            child.kill()
            child.wait(10)
        last_printed = int(printed[-1])
        with bbolt_lite.open(db_path) as db:
            assert db.check() == []
            with db.view() as tx:
                keys = tx.bucket(b"log").keys()
        # Everything printed is there; at most the one unprinted commit more.
        assert len(keys) in (last_printed + 1, last_printed + 2)
        assert keys == [b"%08d" % i for i in range(len(keys))]
        assert len(keys) >= committed
        committed = len(keys)


def test_sigkill_leaves_a_file_go_accepts(db_path, boltcheck):
    child = subprocess.Popen([sys.executable, "-c", _CRASH_CHILD, db_path], cwd=HERE,
                             stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(30):
            child.stdout.readline()
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(10)
    go_check(boltcheck, db_path)


# --- damaged files ----------------------------------------------------------

def _read_everything(path):
    with bbolt_lite.open(path, readonly=True, timeout=1) as db:
        with db.view() as tx:
            for name in tx.buckets():
                stack = [tx.bucket(name)]
                while stack:
                    bucket = stack.pop()
                    for k, v in bucket.items():
                        if v is None:
                            stack.append(bucket.bucket(k))
        db.check()


_DAMAGE_CHILD = textwrap.dedent("""
    import sys, bbolt_lite
    from test_bbolt_lite import _read_everything
    for path in sys.argv[1:]:
        try:
            _read_everything(path)
        except bbolt_lite.Error:
            pass
""")


def test_damaged_files_raise_the_module_error_never_another_or_hang(tmp_path):
    path = str(tmp_path / "good.db")
    with bbolt_lite.open(path, page_size=1024) as db:
        with db.update() as tx:
            b = tx.create_bucket(b"b")
            for i in range(800):
                b.put(key(i), b"v" * (i % 40))
            b.put(b"big", b"B" * 5000)
            b.create_bucket(b"sub").put(b"k", b"v")
            tx.create_bucket(b"inline").put(b"a", b"b")
        with db.update() as tx:
            for i in range(0, 800, 3):
                tx.bucket(b"b").delete(key(i))
    good = open(path, "rb").read()
    rng = random.Random(99)
    damaged = []
    for n in range(300):
        raw = bytearray(good)
        kind = n % 3
        if kind == 0:
            for _ in range(rng.randint(1, 3)):
                pos = rng.randrange(len(raw))
                raw[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            page = rng.randrange(len(raw) // 1024)
            raw[page * 1024:(page + 1) * 1024] = bytes(1024)
        else:
            raw = raw[:rng.randrange(len(raw))]
        name = str(tmp_path / ("bad%03d.db" % n))
        with open(name, "wb") as f:
            f.write(raw)
        damaged.append(name)
    # A child process, so that a hang is caught by the timeout.
    result = subprocess.run([sys.executable, "-c", _DAMAGE_CHILD] + damaged, cwd=HERE,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_bad_meta_page_falls_back_to_the_other(db_path):
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            tx.create_bucket(b"b").put(b"k", b"v1")
        with db.update() as tx:
            tx.bucket(b"b").put(b"k", b"v2")  # txid 3: meta page 1
        page_size = db.page_size
    with open(db_path, "r+b") as f:
        f.seek(page_size + 40)
        f.write(b"\xde\xad")
    with bbolt_lite.open(db_path, readonly=True) as db:
        assert db.info()["txid"] == 2
        with db.view() as tx:
            assert tx.bucket(b"b").get(b"k") == b"v1"
        assert db.check() == []


def test_both_metas_bad_raise_checksum_error(db_path):
    bbolt_lite.open(db_path).close()
    page_size = os.sysconf("SC_PAGE_SIZE")
    with open(db_path, "r+b") as f:
        for pgid in (0, 1):
            f.seek(pgid * page_size + 40)
            f.write(b"\xde\xad")
    with pytest.raises(bbolt_lite.ChecksumError, match="meta page 0"):
        bbolt_lite.open(db_path, readonly=True)


def test_not_a_bbolt_file_raises_invalid(tmp_path):
    path = tmp_path / "text.db"
    path.write_bytes(b"hello world" * 1000)
    with pytest.raises(bbolt_lite.InvalidError, match="magic"):
        bbolt_lite.open(str(path), readonly=True)


def test_cyclic_tree_is_reported_not_followed_forever(db_path):
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            b = tx.create_bucket(b"b")
            for i in range(2000):
                b.put(key(i), b"x" * 30)
        with db.view() as tx:
            root = tx.bucket(b"b")._root
        page_size = db.page_size
    # Point the root branch's first child back at the root itself.
    with open(db_path, "r+b") as f:
        f.seek(root * page_size + 16 + 8)
        f.write(struct.pack("<Q", root))
    with bbolt_lite.open(db_path, readonly=True) as db:
        assert any("multiple references" in p or "cycle" in p for p in db.check())
        with pytest.raises(bbolt_lite.CorruptionError):
            with db.view() as tx:
                list(tx.bucket(b"b").items())


# --- interop with Go's bbolt ------------------------------------------------

def _python_shapes(path, shape):
    """Write with bbolt_lite; return the records Go must read back."""
    with bbolt_lite.open(path, page_size=1024 if shape == "bigfreelist" else None) as db:
        if shape == "small":
            with db.update() as tx:
                b = tx.create_bucket(b"small")
                for i in range(10):
                    b.put(key(i), b"value %d" % i)
        elif shape == "many":
            with db.update() as tx:
                b = tx.create_bucket(b"many")
                for i in range(100000):
                    b.put(key(i * 7919 % 100000), b"v%d" % i)
        elif shape == "big":
            with db.update() as tx:
                b = tx.create_bucket(b"big")
                for i in range(20):
                    b.put(key(i), bytes([i]) * 10240)
                b.put(b"huge", os.urandom(1024 * 1024))
        elif shape == "churn":
            with db.update() as tx:
                b = tx.create_bucket(b"churn")
                for i in range(20000):
                    b.put(key(i), b"x" * 30)
            for round_ in range(5):
                with db.update() as tx:
                    b = tx.bucket(b"churn")
                    for i in range(round_, 20000, 10):
                        b.delete(key(i))
        elif shape == "bigfreelist":  # over 0xFFFF free pages
            with db.update() as tx:
                b = tx.create_bucket(b"doomed")
                for i in range(7000):
                    b.put(key(i), b"d" * 10240)
            with db.update() as tx:
                tx.delete_bucket(b"doomed")
            with db.update() as tx:
                tx.create_bucket(b"kept").put(b"k", b"v")
            assert db._freelist.count() > 0xFFFF
        elif shape == "nested":
            with db.update() as tx:
                top = tx.create_bucket(b"top")
                for i in range(5):
                    mid = top.create_bucket(key(i))
                    mid.set_sequence(100 + i)
                    for j in range(300 * i):
                        mid.put(key(j), b"n" * 40)
                    mid.create_bucket(b"deep").put(b"x", b"y")
                for i in range(30):
                    tx.create_bucket(b"inline-%d" % i).put(b"a", b"b")
            with db.update() as tx:  # shrink one nested bucket back to inline
                mid = tx.bucket(b"top").bucket(key(4))
                for j in range(1200):
                    mid.delete(key(j))
        return dump_records(db)


@pytest.mark.parametrize("shape", ["small", "many", "big", "churn", "nested", "bigfreelist"])
def test_go_bbolt_checks_and_reads_files_written_here(tmp_path, boltcheck, shape):
    path = str(tmp_path / (shape + ".db"))
    expected = _python_shapes(path, shape)
    go_check(boltcheck, path)
    assert go_dump(boltcheck, path) == expected


@pytest.mark.parametrize("shape", ["small", "many", "big", "churn", "nested", "inline",
                                   "nofreelistsync", "pagesize1k", "pagesize16k",
                                   "bigfreelist"])
def test_files_written_by_go_read_exactly_and_stay_writable(tmp_path, boltcheck, shape):
    path = str(tmp_path / (shape + ".db"))
    result = run_boltcheck(boltcheck, "write", path, shape)
    assert result.returncode == 0, result.stderr
    with bbolt_lite.open(path, readonly=True) as db:
        assert db.check() == []
        assert dump_records(db) == go_dump(boltcheck, path)
    if shape == "small":
        with bbolt_lite.open(path, readonly=True) as db, db.view() as tx:
            assert tx.bucket(b"small").get(key(3)) == go_value(3, 50)
    # Change it here; Go must still accept it and read the change.
    with bbolt_lite.open(path) as db:
        with db.update() as tx:
            for name in list(tx.buckets()):
                b = tx.bucket(name)
                doomed = [k for k, v in b.items() if v is not None][::2]
                for k in doomed:
                    b.delete(k)
                b.put(b"added-by-python", b"yes")
        expected = dump_records(db)
    go_check(boltcheck, path)
    assert go_dump(boltcheck, path) == expected


# --- aborted transactions -----------------------------------------------------

def _fill_bucket(tx, name, count=300):
    bucket = tx.create_bucket(name)
    for i in range(count):
        bucket.put(b"key%05d" % i, bytes([i % 251]) * 40)


@pytest.mark.parametrize("abort", ["exception", "rollback", "failed commit"])
def test_pages_freed_by_an_aborted_transaction_are_not_reused(db_path, abort, monkeypatch):
    with bbolt_lite.open(db_path, page_size=1024) as db:
        with db.update() as tx:
            _fill_bucket(tx, b"first")
        if abort == "exception":
            with pytest.raises(RuntimeError):
                with db.update() as tx:
                    tx.delete_bucket(b"first")
                    raise RuntimeError("the caller gives up")
        elif abort == "rollback":
            tx = db.begin(writable=True)
            tx.delete_bucket(b"first")
            tx.rollback()
        else:
            def full_disk(*args):
                raise OSError(28, "No space left on device")
            with monkeypatch.context() as patch:
                patch.setattr(db, "_write_pages", full_disk)
                with pytest.raises(OSError):
                    with db.update() as tx:
                        tx.delete_bucket(b"first")
        with db.update() as tx:
            _fill_bucket(tx, b"second")
        assert db.check() == []
    with bbolt_lite.open(db_path) as db, db.view() as tx:
        assert len(tx.bucket(b"first").keys()) == 300
        assert len(tx.bucket(b"second").keys()) == 300


def test_a_page_freed_twice_is_refused():
    freelist = bbolt_lite._Freelist([5, 6])
    freelist.free(10, 8, 0)
    for pgid in (5, 8):
        with pytest.raises(bbolt_lite.CorruptionError, match="page %d already freed" % pgid):
            freelist.free(10, pgid, 0)


# --- a truncated file -----------------------------------------------------------

def test_a_truncated_file_is_refused_never_opened_at_an_older_transaction(db_path):
    with bbolt_lite.open(db_path) as db:
        for start in range(0, 3000, 500):
            with db.update() as tx:
                bucket = tx.create_bucket_if_not_exists(b"keys")
                for i in range(start, start + 500):
                    bucket.put(b"%08d" % i, b"v" * 20)
    size = os.path.getsize(db_path)
    os.truncate(db_path, size // 2)
    for readonly in (True, False):
        with pytest.raises(bbolt_lite.CorruptionError, match="is truncated"):
            bbolt_lite.open(db_path, readonly=readonly)
    assert os.path.getsize(db_path) == size // 2  # and nothing was written to it


def test_the_broker_refuses_a_truncated_db_naming_it(tmp_path):
    path = str(tmp_path / "broker.db")
    with bbolt_lite.open(path) as db, db.update() as tx:
        bucket = tx.create_bucket(b"failed")
        for i in range(2000):
            bucket.put(b"%020d" % i, b"{}" * 20)
    os.truncate(path, os.path.getsize(path) // 2)
    result = subprocess.run([sys.executable, "broker.py", "--port", "0", "--db", path],
                            cwd=HERE, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "cannot use %s" % path in result.stderr and "truncated" in result.stderr


# --- a full disk --------------------------------------------------------------

_FULL_DISK_CHILD = textwrap.dedent("""
    import resource, sys, bbolt_lite
    path, limit = sys.argv[1], int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        with bbolt_lite.open(path, page_size=4096) as db, db.update() as tx:
            bucket = tx.create_bucket_if_not_exists(b"big")
            for i in range(200):
                bucket.put(b"%08d" % i, b"x" * 500)
    except OSError as error:
        print("refused:", error)
        sys.exit(0)
    print("committed")
""")


def _full_disk(path, limit):
    return subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, path, str(limit)],
                          cwd=HERE, capture_output=True, text=True, timeout=60)


def test_a_commit_that_does_not_fit_on_the_disk_raises_and_the_file_stays_sound(db_path):
    with bbolt_lite.open(db_path, page_size=4096) as db, db.update() as tx:
        tx.create_bucket(b"big").put(b"before", b"1")
    # How large the file grows with the commit (on a copy, with room)...
    rehearsal = db_path + ".copy"
    with open(db_path, "rb") as source, open(rehearsal, "wb") as copy:
        copy.write(source.read())
    assert _full_disk(rehearsal, 1 << 40).stdout.startswith("committed")
    grown = os.path.getsize(rehearsal)
    # ...and room for all but the last 100 bytes: the last page's write is short.
    result = _full_disk(db_path, grown - 100)
    assert result.stdout.startswith("refused:"), result.stdout + result.stderr
    with bbolt_lite.open(db_path) as db:
        assert db.check() == []
        with db.view() as tx:
            assert tx.bucket(b"big").items() and list(tx.bucket(b"big").items()) == [
                (b"before", b"1")]


def test_a_new_file_on_a_full_disk_is_not_left_half_made(tmp_path):
    path = str(tmp_path / "new.db")
    result = _full_disk(path, 8192)  # two of its four first pages fit
    assert result.stdout.startswith("refused:"), result.stdout + result.stderr
    assert os.listdir(str(tmp_path)) == []
    with bbolt_lite.open(path) as db:  # the disk has room again: all is well
        assert db.check() == []


def test_a_page_size_go_cannot_open_is_refused(tmp_path):
    with pytest.raises(bbolt_lite.InvalidError, match="page size 512"):
        bbolt_lite.open(str(tmp_path / "small.db"), page_size=512)
    assert os.listdir(str(tmp_path)) == []


# --- sequences as Go's uint64 ---------------------------------------------------

def test_next_sequence_wraps_to_0_past_2_64(db_path):
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            bucket = tx.create_bucket(b"seq")
            bucket.set_sequence(2 ** 64 - 1)
            assert bucket.next_sequence() == 0
            assert bucket.next_sequence() == 1
        with db.view() as tx:
            assert tx.bucket(b"seq").sequence() == 1
        assert db.check() == []


@pytest.mark.parametrize("wrong", [2 ** 64, -1, 1.5, "3", True])
def test_set_sequence_refuses_what_is_not_a_uint64_and_keeps_the_old_one(db_path, wrong):
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            bucket = tx.create_bucket(b"seq")
            bucket.set_sequence(7)
            with pytest.raises(bbolt_lite.SequenceError):
                bucket.set_sequence(wrong)
        with db.view() as tx:
            assert tx.bucket(b"seq").sequence() == 7  # the commit was not lost


# --- against Go: the same random operations, compared step by step ----------------

_GO_ERROR_NAMES = {
    bbolt_lite.BucketExistsError: "bucket exists", bbolt_lite.BucketNotFoundError:
    "bucket not found", bbolt_lite.BucketNameRequiredError: "bucket name required",
    bbolt_lite.TxClosedError: "tx closed", bbolt_lite.TxNotWritableError: "tx not writable",
    bbolt_lite.IncompatibleValueError: "incompatible value",
    bbolt_lite.KeyRequiredError: "key required", bbolt_lite.KeyTooLargeError: "key too large",
    bbolt_lite.ValueTooLargeError: "value too large",
}


def _hex(value):
    return None if value is None else bytes(value).hex()


def apply_ops_here(path, operations):
    """What interop/boltcheck's `ops` does, done by bbolt_lite: one result each."""
    results = []
    with bbolt_lite.open(path) as db:
        tx = None
        cursors = {}
        for op in operations:
            result = {"k": None, "v": None, "err": None}
            name = bytes.fromhex(op.get("bucket", ""))
            try:
                kind = op["op"]
                if kind == "begin":
                    tx = db.begin(writable=op.get("n") == 1)
                    cursors = {}
                elif kind == "commit":
                    tx.commit()
                elif kind == "rollback":
                    tx.rollback()
                elif kind == "create":
                    tx.create_bucket(name)
                elif kind == "drop":
                    tx.delete_bucket(name)
                    cursors.pop(op["bucket"], None)
                else:
                    bucket = tx.bucket(name)
                    if bucket is None:
                        raise bbolt_lite.BucketNotFoundError("no bucket")
                    if kind.startswith("cursor_") and op["bucket"] not in cursors:
                        cursors[op["bucket"]] = bucket.cursor()
                    cursor = cursors.get(op["bucket"])
                    key = bytes.fromhex(op.get("key", ""))
                    if kind == "put":
                        value = op.get("value")
                        bucket.put(key, None if value is None else bytes.fromhex(value))
                    elif kind == "delete":
                        bucket.delete(key)
                    elif kind == "get":
                        result["v"] = _hex(bucket.get(key))
                    elif kind == "next_sequence":
                        result["n"] = bucket.next_sequence()
                    elif kind == "set_sequence":
                        bucket.set_sequence(op["n"])
                    elif kind == "stats":
                        result["stats"] = bucket.stats()
                    elif kind == "cursor_seek":
                        result["k"], result["v"] = map(_hex, cursor.seek(key))
                    elif kind == "cursor_delete":
                        cursor.delete()
                    else:
                        move = {"cursor_first": cursor.first, "cursor_last": cursor.last,
                                "cursor_next": cursor.next, "cursor_prev": cursor.prev}[kind]
                        result["k"], result["v"] = map(_hex, move())
            except tuple(_GO_ERROR_NAMES) as error:
                result["err"] = _GO_ERROR_NAMES[type(error)]
            results.append(result)
        if tx is not None and not tx._closed:
            tx.rollback()
    return results


def apply_ops_in_go(boltcheck, path, operations):
    done = subprocess.run([boltcheck, "ops", path], capture_output=True, text=True, timeout=60,
                          input="".join(json.dumps(op) + "\n" for op in operations))
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def random_transaction(rng):
    """A transaction of random operations on two buckets, ended at random."""
    writable = rng.random() < 0.85
    ops = [{"op": "begin", "n": 1 if writable else 0}]
    keys = [bytes([k]).hex() for k in b"abcdefghij"] + ["%04x" % rng.randrange(1 << 16)
                                                          for _ in range(30)]
    for _ in range(rng.randrange(1, 40)):
        bucket = rng.choice(["61", "62"])
        kind = rng.choice(["put"] * 6 + ["delete", "get", "create", "drop", "next_sequence",
                                         "cursor_first", "cursor_last", "cursor_seek"]
                          + ["cursor_next", "cursor_prev"] * 3)
        op = {"op": kind, "bucket": bucket, "key": rng.choice(keys)}
        if kind == "put":
            size = rng.choice([0, 1, 8, 100, 400, 900])
            op["value"] = None if rng.random() < 0.05 else os.urandom(size).hex()
        ops.append(op)
    ending = rng.random()
    ops.append({"op": "commit" if writable and ending < 0.7 else "rollback"})
    # What the committed file holds, counted as Go's Bucket.Stats() counts it.
    ops += [{"op": "begin", "n": 0}, {"op": "stats", "bucket": "61"},
            {"op": "stats", "bucket": "62"}, {"op": "rollback"}]
    if ending > 0.9:
        ops.append({"op": rng.choice(["rollback", "commit"])})  # on a closed transaction
        ops.append({"op": "get", "bucket": "61", "key": "61"})
    return ops


def dump_in_go(boltcheck, path):
    done = run_boltcheck(boltcheck, "dump", path)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("seed", range(8))
def test_random_operations_agree_with_go_step_by_step_and_alternating_writers(
        tmp_path, boltcheck, seed):
    """The same random operations (rollbacks, closed transactions, cursors at
    both ends included) on three files: one written by Go, one by bbolt_lite,
    and one by each in turn. Every operation's result must be Go's, and
    after each transaction the three files hold the same and pass both
    checkers."""
    rng = random.Random(seed)
    go_file, here_file, both_file = (str(tmp_path / name) for name in ("go.db", "here.db",
                                                                       "both.db"))
    for turn in range(8):
        operations = random_transaction(rng)
        from_go = apply_ops_in_go(boltcheck, go_file, operations)
        from_here = apply_ops_here(here_file, operations)
        for op, go_result, here_result in zip(operations, from_go, from_here):
            assert here_result == go_result, (turn, op)
        alternate = apply_ops_in_go if turn % 2 else (lambda _binary, *a: apply_ops_here(*a))
        assert alternate(boltcheck, both_file, operations) == from_go, turn
        expected = dump_in_go(boltcheck, go_file)
        for path in (here_file, both_file):
            assert dump_in_go(boltcheck, path) == expected, (turn, path)
            assert run_boltcheck(boltcheck, "check", path).stdout.strip() == "OK"
            with bbolt_lite.open(path, readonly=True) as db:
                assert db.check() == []


def test_deleting_with_a_cursor_while_moving_forward_agrees_with_go(tmp_path, boltcheck):
    """Go's own test (TestCursor_Delete): delete every key below a bound
    with First, Next and Delete; the cursor visits each key once."""
    put = [{"op": "begin", "n": 1}, {"op": "create", "bucket": "77"}]
    put += [{"op": "put", "bucket": "77", "key": "%016x" % i, "value": "00" * 100}
            for i in range(1000)]
    put.append({"op": "commit"})
    sweep = [{"op": "begin", "n": 1}, {"op": "cursor_first", "bucket": "77"}]
    for _ in range(500):
        sweep += [{"op": "cursor_delete", "bucket": "77"}, {"op": "cursor_next", "bucket": "77"}]
    sweep += [{"op": "commit"}, {"op": "begin", "n": 0}, {"op": "cursor_first", "bucket": "77"},
              {"op": "rollback"}]
    go_file, here_file = str(tmp_path / "go.db"), str(tmp_path / "here.db")
    for operations in (put, sweep):
        from_go = apply_ops_in_go(boltcheck, go_file, operations)
        assert apply_ops_here(here_file, operations) == from_go
    assert from_go[-2]["k"] == "%016x" % 500  # the first key left
    assert dump_in_go(boltcheck, here_file) == dump_in_go(boltcheck, go_file)


@pytest.mark.parametrize("shape,names", [("nested", ["top"]), ("inline", ["empty", "key-00000003"]),
                                         ("many", None)])
def test_stats_of_nested_and_inline_buckets_are_go_s(tmp_path, boltcheck, shape, names):
    path = str(tmp_path / "go.db")
    assert run_boltcheck(boltcheck, "write", path, shape).returncode == 0
    with bbolt_lite.open(path, readonly=True) as db, db.view() as tx:
        names = names or [name.decode() for name in tx.buckets()]
    operations = [{"op": "begin", "n": 0}] + [
        {"op": "stats", "bucket": name.encode().hex()} for name in names] + [{"op": "rollback"}]
    from_go = apply_ops_in_go(boltcheck, path, operations)
    assert all(result["stats"] for result in from_go[1:-1])
    assert apply_ops_here(path, operations) == from_go


def test_an_empty_commit_advances_the_txid_as_go_s_does(db_path):
    with bbolt_lite.open(db_path) as db:
        before = db.info()["txid"]
        with db.update():
            pass
        assert db.info()["txid"] == before + 1


def test_a_read_only_open_of_a_nofreelistsync_file_does_not_rebuild_its_freelist(
        tmp_path, boltcheck, monkeypatch):
    path = str(tmp_path / "go.db")
    assert run_boltcheck(boltcheck, "write", path, "nofreelistsync").returncode == 0

    def rebuild(self):
        raise AssertionError("the freelist was rebuilt")

    monkeypatch.setattr(bbolt_lite.DB, "_load_freelist", rebuild)
    with bbolt_lite.open(path, readonly=True) as db, db.view() as tx:
        assert tx.buckets()
    with pytest.raises(AssertionError, match="rebuilt"):  # a writer needs it, as in Go
        bbolt_lite.open(path)


# -- reading in place from the file's map ----------------------------------------

def test_a_read_all_from_the_map_yields_what_the_nodes_hold(db_path):
    with bbolt_lite.open(db_path, page_size=1024) as db:
        with db.update() as tx:
            b = tx.create_bucket(b"b")
            for i in range(3000):
                b.put(key(i * 7 % 3000), b"v" * (i % 300))
            b.put(b"big", b"B" * 5000)  # an overflow page
            b.create_bucket(b"sub").put(b"k", b"v")
    with bbolt_lite.open(db_path, readonly=True) as db:
        with db.view() as tx:
            bucket = tx.bucket(b"b")
            from_map = list(bucket.items())
            from_nodes = list(bucket._node_items())
    assert from_map == from_nodes and len(from_map) == 3002
    assert dict(from_map)[b"sub"] is None and dict(from_map)[b"big"] == b"B" * 5000
    assert all(type(k) is bytes and type(v) in (bytes, type(None)) for k, v in from_map)


def test_a_leaf_that_runs_past_its_page_is_refused_by_the_read_all(db_path):
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            b = tx.create_bucket(b"b")
            for i in range(300):
                b.put(key(i), b"v" * 10)
        with db.view() as tx:
            leaf = tx.bucket(b"b")._root
            while not tx._page(leaf).is_leaf:
                leaf = tx._page(leaf).pgids[0]
        page_size = db.page_size
    with open(db_path, "r+b") as f:
        f.seek(leaf * page_size + 16 + 12)  # element 0's value size
        f.write(struct.pack("<I", 70000))
    with bbolt_lite.open(db_path, readonly=True) as db:
        with db.view() as tx:
            with pytest.raises(bbolt_lite.CorruptionError,
                               match="page %d: element 0 runs past the page end" % leaf):
                list(tx.bucket(b"b").items())


def test_close_lets_another_process_lock_the_file_though_an_iterator_holds_the_map(
        db_path):
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            for i in range(200):
                tx.create_bucket_if_not_exists(b"b").put(key(i), b"v" * 50)
    db = bbolt_lite.open(db_path)
    tx = db.view()
    pairs = tx.bucket(b"b").items()  # (holds the map)
    next(pairs)
    tx.rollback()
    db.close()
    code = "import bbolt_lite,sys\nbbolt_lite.open(sys.argv[1], timeout=0.5).close()\n"
    result = subprocess.run([sys.executable, "-c", code, db_path], cwd=HERE,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    with pytest.raises(bbolt_lite.TxClosedError):  # (the rest of its leaf, then no more)
        list(pairs)


def uniform_bucket(db_path, count=2000):
    """A bucket of keys of one size and values of one size: the leaves that
    the read-all takes in one piece (bbolt_lite._UniformLeaf)."""
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            b = tx.create_bucket(b"b")
            for i in range(count):
                b.put(key(i * 7 % count), b"%07d" % i)
        with db.view() as tx:
            leaves, pending = [], [tx.bucket(b"b")._root]
            while pending:
                page = tx._page(pending.pop(0))
                if page.is_leaf:
                    leaves.append(page.pgid)
                else:
                    pending += page.pgids
        return leaves, db.page_size


def test_a_read_all_of_uniform_leaves_yields_what_the_nodes_hold_without_a_step_per_pair(
        db_path, monkeypatch):
    leaves, _ = uniform_bucket(db_path)
    assert len(leaves) > 10
    with bbolt_lite.open(db_path, readonly=True) as db, db.view() as tx:
        from_nodes = list(tx.bucket(b"b")._node_items())

        def per_element(*args):
            raise AssertionError("a uniform leaf was read element by element")

        monkeypatch.setattr(bbolt_lite, "_leaf_columns", per_element)
        from_map = list(tx.bucket(b"b").items())
    assert from_map == from_nodes and len(from_map) == 2000
    assert from_map[0] == (key(0), b"0000000")
    assert all(type(k) is bytes and type(v) is bytes for k, v in from_map)


def test_a_uniform_leaf_with_one_element_damaged_is_read_element_by_element(db_path):
    leaves, page_size = uniform_bucket(db_path)
    leaf = leaves[len(leaves) // 2]
    with open(db_path, "r+b") as f:  # element 3's value size; element 0 still looks uniform
        f.seek(leaf * page_size + 16 + 3 * 16 + 12)
        f.write(struct.pack("<I", page_size))
    with bbolt_lite.open(db_path, readonly=True) as db, db.view() as tx:
        with pytest.raises(bbolt_lite.CorruptionError,
                           match="page %d: element 3 runs past the page end" % leaf):
            list(tx.bucket(b"b").items())


def test_a_uniform_bucket_with_a_nested_bucket_gives_it_no_value(db_path):
    uniform_bucket(db_path)
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            tx.bucket(b"b").create_bucket(key(5) + b"/").put(b"k", b"v")
    with bbolt_lite.open(db_path, readonly=True) as db, db.view() as tx:
        pairs = dict(tx.bucket(b"b").items())
    assert len(pairs) == 2001 and pairs[key(5) + b"/"] is None and pairs[key(5)] == b"%07d" % 1715  # (1715 * 7 % 2000 == 5)


# -- short writes -------------------------------------------------------------

def test_short_writes_are_continued_and_a_write_of_nothing_is_a_full_disk(
        db_path, monkeypatch):
    real_pwrite = os.pwrite
    calls = []

    def short(fd, data, offset):  # at most 1,000 bytes at a time
        calls.append(len(data))
        return real_pwrite(fd, bytes(data[:1000]), offset)

    with bbolt_lite.open(db_path) as db:
        monkeypatch.setattr(bbolt_lite.os, "pwrite", short)
        with db.update() as tx:
            tx.create_bucket(b"b").put(b"k", b"v" * 3000)
        size = db.page_size  # (each page continued where its last write stopped)
        assert calls[:5] == [size, size - 1000, size - 2000, size - 3000, size - 4000]
        monkeypatch.setattr(bbolt_lite.os, "pwrite", lambda fd, data, offset: 0)
        with pytest.raises(OSError) as raised:
            with db.update() as tx:
                tx.bucket(b"b").put(b"k2", b"v")
        assert raised.value.errno == errno.ENOSPC and "not written at offset" in str(raised.value)
        monkeypatch.setattr(bbolt_lite.os, "pwrite", real_pwrite)
    with bbolt_lite.open(db_path, readonly=True) as db, db.view() as tx:
        assert dict(tx.bucket(b"b").items()) == {b"k": b"v" * 3000}
        assert tx.check() == []


def test_values_shortened_in_place_leave_their_leaves_merged(db_path):
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            b = tx.create_bucket(b"b")
            for i in range(200):
                b.put(key(i), b"v" * 500)
        with db.update() as tx:
            before = tx.bucket(b"b").stats()["leaf_page_n"]
            for i in range(200):
                tx.bucket(b"b").put(key(i), b"v")
        with db.view() as tx:
            after = tx.bucket(b"b").stats()["leaf_page_n"]
        assert before >= 25 and after <= 8, (before, after)  # (200 keys of 29 bytes: 6 KB)
        assert db.check() == []


_u64 = st.one_of(st.integers(0, 300), st.integers(0, 2 ** 64 - 1), st.just(2 ** 64 - 1))


@settings(max_examples=300, deadline=None)
@given(ids=st.tuples(_u64, _u64, _u64, _u64, _u64),
       page_size=st.sampled_from([1024, 4096, 65536]), flags=st.integers(0, 2 ** 32 - 1))
def test_a_meta_page_carries_the_fnv1a_checksum_of_its_bytes(ids, page_size, flags):
    page = bbolt_lite._Meta(page_size, flags, *ids).to_page()
    body = page[16:16 + 56]
    assert len(page) == page_size
    assert struct.unpack_from("<Q", page, 16 + 56)[0] == bbolt_lite._fnv1a64(body)
    assert body == struct.pack("<IIIIQQQQQ", 0xED0CDAED, 2, page_size, flags, *ids)
    assert bbolt_lite._fnv1a64(b"a") == 0xAF63DC4C8601EC8C  # (FNV-1a's published vector)


def test_a_failed_commit_gives_back_the_free_pages_it_took(db_path, monkeypatch):
    with bbolt_lite.open(db_path) as db:
        with db.update() as tx:
            b = tx.create_bucket(b"b")
            for i in range(300):
                b.put(key(i), b"v" * 100)
        with db.update() as tx:  # (pages freed: the next commits take them)
            for i in range(0, 300, 2):
                tx.bucket(b"b").delete(key(i))
        with db.update() as tx:
            tx.bucket(b"b").put(b"x", b"1")
        real_pwrite = os.pwrite
        monkeypatch.setattr(bbolt_lite.os, "pwrite", lambda fd, data, offset: 0)
        with pytest.raises(OSError):
            with db.update() as tx:  # (as it begins: older pending pages are free now)
                freelist = db._freelist
                free_before = (list(freelist.ids), {txid: list(ids) for txid, ids in
                                                    freelist.pending.items()}, set(freelist.cache))
                assert free_before[0], "the failing commit must take pages from the freelist"
                for i in range(1, 300, 2):
                    tx.bucket(b"b").put(key(i), b"w" * 100)
        monkeypatch.setattr(bbolt_lite.os, "pwrite", real_pwrite)
        assert (db._freelist.ids, db._freelist.pending, db._freelist.cache) == free_before
        for round in range(3):  # the pages are used again, and none twice
            with db.update() as tx:
                for i in range(1, 300, 2):
                    tx.bucket(b"b").put(key(i), b"%d" % round * 100)
        assert db.check() == []
    with bbolt_lite.open(db_path, readonly=True) as db, db.view() as tx:
        assert len(list(tx.bucket(b"b").items())) == 151


@settings(max_examples=200, deadline=None)
@given(count=st.integers(1, 600), key_size=st.integers(1, 40), value_size=st.integers(0, 300))
def test_a_leaf_of_one_shape_is_written_as_the_plain_loop_writes_it(count, key_size, value_size):
    # The fast path (a ready element array, _UniformLeaf) against node.write's loop.
    keys = [b"k" * key_size] * count
    values = [b"v" * value_size] * count
    node = bbolt_lite._Node(0, 0, True, keys, values, [0] * count)
    plain = b"".join(bbolt_lite.LEAF_ELEMENT.pack(
        0, bbolt_lite.ELEMENT_SIZE * (count - i) + i * (key_size + value_size),
        key_size, value_size) for i in range(count))
    fast = bbolt_lite._uniform_leaf_elements(count, [key_size] * count, [value_size] * count,
                                             node.flags)
    assert fast == plain
    page = node.to_bytes(5, 0, 0)
    assert page[bbolt_lite.PAGE_HEADER_SIZE:bbolt_lite.PAGE_HEADER_SIZE + len(plain)] == plain
    assert bbolt_lite._parse_node(page, "page 5", 5).values == values


# --- compact ------------------------------------------------------------------------------

def test_compact_copies_everything_and_go_s_bbolt_opens_the_copy(tmp_path, boltcheck):
    src, dst = str(tmp_path / "src.db"), str(tmp_path / "dst.db")
    rng = random.Random(4)
    with bbolt_lite.open(src) as db, db.update() as tx:
        top = tx.create_bucket(b"top")
        top.set_sequence(2 ** 64 - 1)
        for i in range(3000):
            top.put(key(i), bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300))))
        nested = top.create_bucket(b"nested")
        nested.set_sequence(7)
        nested.put(b"big", b"x" * 20000)  # (an overflow page)
        nested.create_bucket(b"empty")
        tx.create_bucket(b"\xff\x00binary")
    with bbolt_lite.open(src) as db, db.update() as tx:  # (free pages in the source)
        for i in range(0, 3000, 2):
            tx.bucket(b"top").delete(key(i))
    result = subprocess.run([sys.executable, "bbolt_lite.py", "compact", src, dst], cwd=HERE,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "bytes (gain=" in result.stdout, result.stderr
    with bbolt_lite.open(src, readonly=True) as a, bbolt_lite.open(dst, readonly=True) as b:
        assert dump_records(a) == dump_records(b)
        assert b.check() == []
    assert go_dump(boltcheck, dst) == go_dump(boltcheck, src)
    go_check(boltcheck, dst)
    again = subprocess.run([sys.executable, "bbolt_lite.py", "compact", src, dst], cwd=HERE,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr  # (never over a file)


def test_compact_gives_back_the_space_of_purged_dead_letters(tmp_path, boltcheck):
    import broker
    src, dst = str(tmp_path / "broker.db"), str(tmp_path / "small.db")
    new_ids = broker.new_ids_function()
    with bbolt_lite.open(src) as db:
        for _ in range(5):  # (as a broker writes them: a commit at a time)
            with db.update() as tx:
                failed = tx.create_bucket_if_not_exists(b"failed")
                failed.fill_percent = 0.9
                for i, message_id in enumerate(new_ids(20000)):
                    message = broker.Message(message_id, 1 + i % 1000)
                    message.attempts, message.reason = 3, "not reported"
                    record = broker.dead_letter_record(message, "2026-12-07T00:00:00.000Z")
                    failed.put(message.id.encode(), json.dumps(record).encode())
        with db.view() as tx:
            ids = [k.decode() for k, _v in tx.bucket(b"failed").items()]
        with db.update() as tx:  # (what `broker.py purge` does, for 90% of them)
            deleted, missing = broker.delete_dead_letters(
                tx.bucket(b"failed"), [i for n, i in enumerate(ids) if n % 10])
    assert len(deleted) == 90000 and missing == []
    before, after = bbolt_lite.compact(src, dst)
    print("100,000 dead letters, 90%% purged: %d -> %d bytes" % (before, after))
    assert after < before / 5
    with bbolt_lite.open(dst, readonly=True) as small, small.view() as tx:
        assert [k.decode() for k, _v in tx.bucket(b"failed").items()] == ids[::10]
    go_check(boltcheck, dst)
