#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""bbolt_lite: the bbolt on-disk format in one file of pure Python.

bbolt (go.etcd.io/bbolt) is an embedded key/value store: one file holding a
copy-on-write B+tree of buckets and keys. This module reads and writes that
file format (version 2, as written by bbolt 1.3.x), so a file made here opens
in Go's bbolt and passes its ``tx.Check()``, and a file made by Go reads here.
It needs nothing but the Python standard library (3.9 or newer) on a POSIX
system (it locks the file with ``flock``, as bbolt does).

Use as a library::

    import bbolt_lite
    with bbolt_lite.open("my.db") as db:        # creates the file if missing
        with db.update() as tx:                  # one writer at a time
            b = tx.create_bucket_if_not_exists(b"widgets")
            b.put(b"foo", b"bar")
        with db.view() as tx:                    # any number of readers
            print(tx.bucket(b"widgets").get(b"foo"))
        assert db.check() == []                  # like Go's tx.Check()

Transactions: ``update()`` commits when its block ends normally and rolls
back on an exception; ``view()`` is a read-only snapshot. A commit writes the
changed pages to free space, then the freelist, syncs, then writes the meta
page with the new transaction id and syncs again, so a crash at any moment
leaves the file at its last committed transaction.

Use as a command, after Go's ``bbolt`` tool::

    python bbolt_lite.py check   FILE               # prints OK, exit 0, when sound
    python bbolt_lite.py info    FILE               # page size, txid, high-water mark
    python bbolt_lite.py stats   FILE               # page, key and bucket counts
    python bbolt_lite.py buckets FILE               # top-level bucket names
    python bbolt_lite.py keys    FILE BUCKET...     # keys of a (nested) bucket
    python bbolt_lite.py get     FILE BUCKET... KEY # one value, raw bytes to stdout
    python bbolt_lite.py dump    FILE [BUCKET...]   # one JSON line per key
    python bbolt_lite.py pages   FILE               # every page, its type and use
    python bbolt_lite.py compact FILE NEW           # a packed copy, free pages left out

Errors are subclasses of ``bbolt_lite.Error``; a damaged file raises
``ChecksumError``, ``InvalidError``, ``VersionMismatchError`` or
``CorruptionError``, naming the page and what was wrong. A file cut short (a
sound meta whose pages are missing) is refused with ``CorruptionError``,
never opened at an older transaction. A write that the disk takes only in
part raises ``OSError`` (ENOSPC) and the commit does not happen; a new file
is made whole under a temporary name, then linked into place.

As Go's API, where a port from Go would notice (tested against Go with the
same random operations): cursors move as cursor.go does (``next()`` past the
end stays on the last key, ``seek()`` past the end then ``prev()`` gives the
last key), ``Cursor.delete()``, a closed transaction raises
``TxClosedError`` (a second ``rollback()`` included), ``put(k, None)`` stores
an empty value as Go's nil does, a sequence is a uint64 (``next_sequence()``
wraps to 0; ``set_sequence()`` outside 0..2**64-1 raises ``SequenceError``),
a commit with no change still advances the transaction id, an aborted
transaction gives back the pages it freed (and a failed commit the pages it
took), pages left small are merged at commit only in a bucket that lost a
key (or, here also, had a value shortened), and ``Bucket.stats()`` counts as
Go's ``Stats()`` (its fields, in snake_case). Differences kept on purpose:
values and keys are ``bytes`` copies out of the file's memory map, not
slices of it (so they stay valid after the transaction); the page size of
a new file must be a power of two from 1024 (Go's own minimum in practice:
it cannot open smaller pages); a read-only open never rebuilds a
``NoFreelistSync`` file's freelist (as Go), so ``info()`` counts no free
pages there.
"""

__version__ = "1.1.0"

import array
import bisect
import collections
import errno
import fcntl
import itertools
import json
import mmap
import operator
import os
import struct
import sys
import threading
import time

__all__ = [
    "open", "DB", "Tx", "Bucket", "Cursor",
    "Error", "InvalidError", "VersionMismatchError", "ChecksumError",
    "CorruptionError", "DatabaseLockedError", "DatabaseNotOpenError",
    "DatabaseReadOnlyError", "TxClosedError", "TxNotWritableError",
    "BucketExistsError", "BucketNotFoundError", "BucketNameRequiredError",
    "IncompatibleValueError", "KeyRequiredError", "KeyTooLargeError",
    "ValueTooLargeError", "SequenceError",
]

MAGIC = 0xED0CDAED
VERSION = 2
MAX_KEY_SIZE = 32768
MAX_VALUE_SIZE = (1 << 31) - 2
DEFAULT_FILL_PERCENT = 0.5
MIN_FILL_PERCENT = 0.1
MAX_FILL_PERCENT = 1.0
# A split makes pages of this many keys at least (node.go's splitIndex).
MIN_KEYS_PER_PAGE = 2
# A tree deeper than this cannot be made of pages that hold two keys or more:
# meeting one means a cycle or a damaged branch page.
MAX_TREE_DEPTH = 64


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

class Error(Exception):
    """Base class of every error this module raises."""


class InvalidError(Error):
    """The file is not a bbolt file (bad magic), or a meta page is unusable."""


class VersionMismatchError(Error):
    """The file is a bbolt file of another format version."""


class ChecksumError(Error):
    """A meta page's checksum does not match its contents."""


class CorruptionError(Error):
    """A page is damaged: wrong type, out of bounds, cyclic or inconsistent."""


class DatabaseLockedError(Error):
    """Another process holds the file's lock (bbolt's ErrTimeout)."""


class DatabaseNotOpenError(Error):
    """The database is closed."""


class DatabaseReadOnlyError(Error):
    """A write transaction was asked of a database opened read-only."""


class TxClosedError(Error):
    """The transaction has been committed or rolled back."""


class TxNotWritableError(Error):
    """A change was asked of a read-only transaction."""


class BucketExistsError(Error):
    """create_bucket of a name that already exists."""


class BucketNotFoundError(Error):
    """delete_bucket of a name that does not exist."""


class BucketNameRequiredError(Error):
    """A bucket name must not be empty."""


class IncompatibleValueError(Error):
    """A key was used as a bucket where it holds a value, or the other way."""


class SequenceError(Error, ValueError):
    """A bucket sequence outside Go's uint64 range."""


class KeyRequiredError(Error):
    """A key must not be empty."""


class KeyTooLargeError(Error):
    """A key is longer than MAX_KEY_SIZE."""


class ValueTooLargeError(Error):
    """A value is longer than MAX_VALUE_SIZE."""


def _assert(condition, message, *args):
    """Raise CorruptionError when an invariant of the file does not hold."""
    if not condition:
        raise CorruptionError(message % args if args else message)


# ---------------------------------------------------------------------------
# Page: the on-disk layout (bbolt page.go, db.go's meta)
# ---------------------------------------------------------------------------
#
# The file is an array of pages of page_size bytes; page N starts at byte
# N * page_size. Pages 0 and 1 are the two meta pages; the rest are branch,
# leaf, freelist pages, or free. A page longer than one page_size spans
# `overflow` following pages. All integers are little-endian.
#
#   page header, 16 bytes, at the start of every page:
#     +0 id u64 | +8 flags u16 | +10 count u16 | +12 overflow u32
#
#   meta page: header, then 64 bytes:
#     +16 magic u32 | +20 version u32 | +24 page_size u32 | +28 flags u32
#     +32 root bucket (root u64, sequence u64) | +48 freelist u64
#     +56 pgid (high-water mark) u64 | +64 txid u64 | +72 checksum u64
#   checksum = FNV-1a 64 over the 56 bytes from magic to txid.
#
#   branch page: header, `count` elements of 16 bytes, then the keys:
#     element: pos u32 | ksize u32 | pgid u64
#   leaf page: header, `count` elements of 16 bytes, then keys and values:
#     element: flags u32 | pos u32 | ksize u32 | vsize u32
#   `pos` counts from the start of the element itself to its key; a leaf's
#   value follows its key. Leaf flag 0x01 marks a nested bucket, whose value
#   is a bucket header, followed, for an inline bucket (root 0), by a whole
#   leaf page (header with id 0, elements, data) inside the value.
#
#   bucket header, 16 bytes: root u64 | sequence u64
#
#   freelist page: header, then `count` page ids of u64, sorted. When there
#   are 0xFFFF ids or more, count is 0xFFFF and the first u64 holds the real
#   count. A meta whose freelist is 0xFFFFFFFFFFFFFFFF has none on disk
#   (Go's NoFreelistSync): the free pages are those not reachable.

PAGE_HEADER = struct.Struct("<QHHI")
PAGE_HEADER_SIZE = PAGE_HEADER.size  # 16
META = struct.Struct("<IIIIQQQQQQ")
META_SIZE = META.size  # 64
META_CHECKSUMMED_SIZE = META_SIZE - 8  # 56
BRANCH_ELEMENT = struct.Struct("<IIQ")
LEAF_ELEMENT = struct.Struct("<IIII")
LEAF_PAGE_START = struct.Struct("<QHHIIIII")  # a page header and a leaf's first element
ELEMENT_SIZE = 16
assert BRANCH_ELEMENT.size == LEAF_ELEMENT.size == ELEMENT_SIZE
BUCKET_HEADER = struct.Struct("<QQ")
BUCKET_HEADER_SIZE = BUCKET_HEADER.size  # 16
PGID = struct.Struct("<Q")
PGID_SIZE = PGID.size  # 8

BRANCH_PAGE = 0x01
LEAF_PAGE = 0x02
META_PAGE = 0x04
FREELIST_PAGE = 0x10
BUCKET_LEAF_FLAG = 0x01

NO_FREELIST = 0xFFFFFFFFFFFFFFFF
FREELIST_COUNT_OVERFLOW = 0xFFFF
MIN_PAGE_SIZE = 512
MIN_NEW_PAGE_SIZE = 1024  # Go's bbolt cannot open a file of smaller pages: none is made
MAX_PAGE_SIZE = 1 << 20
# Pages 0, 1 (metas), 2 (freelist), 3 (root leaf) in a new file.
NEW_FILE_PAGES = 4
_LITTLE_ENDIAN = sys.byteorder == "little"  # (the file's order: some shortcuts need it)

_FNV64_OFFSET = 0xCBF29CE484222325
_FNV64_PRIME = 0x100000001B3
_U64 = 0xFFFFFFFFFFFFFFFF


_PageHeader = collections.namedtuple("_PageHeader", "id flags count overflow")


def _page_header(buf, offset=0):
    """The header of the page at `offset` in `buf`, with named fields."""
    return _PageHeader._make(PAGE_HEADER.unpack_from(buf, offset))


def _fnv1a64(data):
    """FNV-1a, 64 bits, of `data` (bbolt's meta checksum)."""
    h = _FNV64_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV64_PRIME) & _U64
    return h


def _page_type_name(flags):
    for flag, name in ((BRANCH_PAGE, "branch"), (LEAF_PAGE, "leaf"),
                       (META_PAGE, "meta"), (FREELIST_PAGE, "freelist")):
        if flags & flag:
            return name
    return "unknown<%02x>" % flags


class _Meta:
    """A meta page's fields; `txid` is the transaction that wrote it."""

    __slots__ = ("page_size", "flags", "root", "sequence", "freelist",
                 "pgid", "txid")

    def __init__(self, page_size, flags, root, sequence, freelist, pgid, txid):
        self.page_size = page_size
        self.flags = flags
        self.root = root
        self.sequence = sequence
        self.freelist = freelist
        self.pgid = pgid
        self.txid = txid

    def copy(self):
        return _Meta(self.page_size, self.flags, self.root, self.sequence,
                     self.freelist, self.pgid, self.txid)

    def to_page(self):
        """The whole meta page: it is page txid % 2, as in bbolt."""
        fields = (MAGIC, VERSION, self.page_size, self.flags, self.root, self.sequence,
                  self.freelist, self.pgid, self.txid)
        checksum = _fnv1a64(META.pack(*fields, 0)[:META_CHECKSUMMED_SIZE])
        return b"".join((PAGE_HEADER.pack(self.txid % 2, META_PAGE, 0, 0),
                         META.pack(*fields, checksum),
                         _zeros(self.page_size - PAGE_HEADER_SIZE - META_SIZE)))

    @classmethod
    def from_bytes(cls, buf, page_id):
        """Parse and validate a meta page; raise the error bbolt would."""
        if len(buf) < PAGE_HEADER_SIZE + META_SIZE:
            raise InvalidError("meta page %d: file too short" % page_id)
        (magic, version, page_size, flags, root, sequence, freelist, pgid,
         txid, checksum) = META.unpack_from(buf, PAGE_HEADER_SIZE)
        if magic != MAGIC:
            raise InvalidError("meta page %d: invalid magic %#x, expected %#x"
                               % (page_id, magic, MAGIC))
        if version != VERSION:
            raise VersionMismatchError("meta page %d: format version %d, "
                                       "expected %d" % (page_id, version, VERSION))
        body = buf[PAGE_HEADER_SIZE:PAGE_HEADER_SIZE + META_CHECKSUMMED_SIZE]
        if checksum != _fnv1a64(body):
            raise ChecksumError("meta page %d: checksum %#x does not match "
                                "its contents (%#x)" % (page_id, checksum, _fnv1a64(body)))
        if page_size & (page_size - 1) or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE:
            raise InvalidError("meta page %d: page size %d is not a power of "
                               "two in %d..%d" % (page_id, page_size, MIN_PAGE_SIZE, MAX_PAGE_SIZE))
        if pgid < NEW_FILE_PAGES - 1 or root >= pgid or root < 2:
            raise InvalidError("meta page %d: root page %d outside 2..%d (high-water mark)"
                               % (page_id, root, pgid))
        if freelist != NO_FREELIST and not 2 <= freelist < pgid:
            raise InvalidError("meta page %d: freelist page %d outside 2..%d"
                               % (page_id, freelist, pgid))
        return cls(page_size, flags, root, sequence, freelist, pgid, txid)


# ---------------------------------------------------------------------------
# Node: a branch or leaf page in memory (bbolt node.go)
# ---------------------------------------------------------------------------

class _Node:
    """A branch or leaf page, parsed, or a node being changed in memory.

    Leaf: keys[i] holds values[i] with flags[i] (BUCKET_LEAF_FLAG for a
    nested bucket). Branch: keys[i] is the first key of page pgids[i]; in a
    write transaction children[i] is that child once copied into memory
    (`child_at`), as in node.go, and None until then. Pages read from the
    file are shared by readers and never changed; a write transaction
    changes copies (`copy`), which remember the page they came from (`pgid`,
    `overflow`) so that commit can free it.
    """

    __slots__ = ("pgid", "overflow", "is_leaf", "keys", "values", "flags",
                 "pgids", "children")

    def __init__(self, pgid, overflow, is_leaf, keys, values=None, flags=None,
                 pgids=None, children=None):
        self.pgid = pgid
        self.overflow = overflow
        self.is_leaf = is_leaf
        self.keys = keys
        self.values = values
        self.flags = flags
        self.pgids = pgids
        self.children = children

    @classmethod
    def empty_leaf(cls):
        return cls(0, 0, True, [], [], [])

    def copy(self):
        if self.is_leaf:
            return _Node(self.pgid, self.overflow, True, list(self.keys),
                         list(self.values), list(self.flags))
        return _Node(self.pgid, self.overflow, False, list(self.keys),
                     pgids=list(self.pgids), children=[None] * len(self.keys))

    def size(self):
        """Bytes this node takes as a page (header, elements, data)."""
        # (The length of a join: 4,400 instructions for 32 keys of 12
        # bytes, where summing their len()s took 9,600.)
        size = PAGE_HEADER_SIZE + ELEMENT_SIZE * len(self.keys) + len(b"".join(self.keys))
        if self.is_leaf:
            size += len(b"".join(self.values))
        return size

    def min_keys(self):
        """A node with fewer keys is merged into a sibling (node.go's minKeys)."""
        return 1 if self.is_leaf else 2

    def child_index(self, key):
        """Index of the branch entry whose subtree would hold `key`."""
        i = bisect.bisect_right(self.keys, key) - 1
        return i if i > 0 else 0

    def to_bytes(self, pgid, overflow, pad_to=0):
        """This node as a page (node.go's write), padded with zeros to
        `pad_to` bytes: the header, the element array, then each key (and
        its value) in order. An element's pos points from the element to
        its data: past the elements after it and the data before its own.
        """
        keys = self.keys
        count = len(keys)
        key_sizes = list(map(len, keys))
        if self.is_leaf:
            value_sizes = list(map(len, self.values))
            elements = _uniform_leaf_elements(count, key_sizes, value_sizes, self.flags)
            if elements is None:  # (node.write's loop over the elements, in C)
                elements = b"".join(map(
                    LEAF_ELEMENT.pack, self.flags,
                    _element_offsets(map(operator.add, key_sizes, value_sizes), count),
                    key_sizes, value_sizes))
            data = [None] * (2 * count)  # keys and values interleaved
            data[0::2], data[1::2] = keys, self.values
            data_size = sum(key_sizes) + sum(value_sizes)
            flag = LEAF_PAGE
        else:
            elements = b"".join(map(BRANCH_ELEMENT.pack, _element_offsets(key_sizes, count),
                                    key_sizes, self.pgids))
            data, data_size = keys, sum(key_sizes)
            flag = BRANCH_PAGE
        size = PAGE_HEADER_SIZE + len(elements) + data_size
        # (One join of every part: the page's bytes are copied once.)
        return b"".join((PAGE_HEADER.pack(pgid, flag, count, overflow), elements, *data,
                         _zeros(pad_to - size)))

    def written_to(self, pgid):
        """This node, spilled to the one page `pgid`, as the page cache keeps
        it: read-only from now on. (Not copied: once spilled, a node is not
        touched again by its transaction, which ends at the commit.)"""
        self.pgid, self.overflow = pgid, 0
        if not self.is_leaf:
            self.children = None
        return self

    def child_at(self, tx, i):
        """Child `i` of a branch, copied into memory for writing (node.go's childAt)."""
        child = self.children[i]
        if child is None:
            child = self.children[i] = tx._page(self.pgids[i]).copy()
        return child

    # -- commit: rebalance, split, spill (node.go) --------------------------

    def rebalance(self, tx, depth=0):
        """Below this node, deepest first: merge each child in memory that
        deletes left under a quarter page or under min_keys() into a sibling,
        and drop the empty ones."""
        if self.is_leaf:
            return
        _assert(depth < MAX_TREE_DEPTH, "tree deeper than %d (a cycle?)", MAX_TREE_DEPTH)
        children = self.children
        for child in filter(None, children):
            child.rebalance(tx, depth + 1)
        threshold = tx._db.page_size // 4
        # Only the children in memory can have shrunk: their indexes, found
        # in C, highest first, so that a merge moves none still to be seen.
        # (Not a Python step for every child of the branch.)
        pending = list(itertools.compress(range(len(children)), children))
        while pending:
            i = pending.pop()
            child = children[i]
            if len(child.keys) >= child.min_keys() and child.size() >= threshold:
                continue
            if not child.keys:
                self._remove_child(tx, i)
                continue
            if len(self.keys) == 1:
                break
            left = i - 1 if i > 0 else i
            self.child_at(tx, left)
            self.child_at(tx, left + 1)
            self._merge_children(tx, left)
            if not pending or pending[-1] != left:
                pending.append(left)  # (the merged child, seen again)

    def _remove_child(self, tx, i):
        child = self.children[i]
        if child.pgid:
            tx._free(child.pgid, child.overflow)
        del self.keys[i], self.pgids[i], self.children[i]

    def _merge_children(self, tx, left):
        """Move all of child left+1 into child left, and drop the right entry."""
        a, b = self.children[left], self.children[left + 1]
        a.keys.extend(b.keys)
        if a.is_leaf:
            a.values.extend(b.values)
            a.flags.extend(b.flags)
        else:
            a.pgids.extend(b.pgids)
            a.children.extend(b.children)
        self._remove_child(tx, left + 1)

    def spill(self, tx, fill_percent):
        """Write this node (its children in memory first) as one page, or as
        more after a split.

        Returns (first key, page id) for each page written: the entries its
        parent must hold in its place.
        """
        if not self.is_leaf:
            # Only the children in memory are written, in key order, and
            # each one's entries put in its place, highest first. (Their
            # indexes found in C: a loop over every child was a fifth of a
            # one-put commit.)
            children, keys, pgids = self.children, self.keys, self.pgids
            spilled = [(i, children[i].spill(tx, fill_percent))
                       for i in itertools.compress(range(len(children)), children)]
            for i, entries in reversed(spilled):
                keys[i:i + 1] = [key for key, _ in entries]
                pgids[i:i + 1] = [pgid for _, pgid in entries]
            self.children = [None] * len(keys)
        if self.pgid:
            tx._free(self.pgid, self.overflow)
            self.pgid = 0
        page_size = tx._db.page_size
        entries = []
        for piece, size in self.split(page_size, fill_percent, self.size()):
            pages = (size + page_size - 1) // page_size
            pgid = tx._allocate(pages)
            tx._write(pgid, piece.to_bytes(pgid, pages - 1, pages * page_size),
                      piece.written_to(pgid) if pages == 1 else None)
            entries.append((piece.keys[0] if piece.keys else b"", pgid))
        return entries

    def split(self, page_size, fill_percent, size):
        """Cut a node of `size` bytes, if bigger than a page, into pieces
        filled to `fill_percent`, each of MIN_KEYS_PER_PAGE keys at least:
        (piece, its size) for each."""
        count = len(self.keys)
        if count <= 2 * MIN_KEYS_PER_PAGE or size <= page_size:
            return [(self, size)]  # (most nodes: no size key by key)
        fill = min(max(fill_percent, MIN_FILL_PERCENT), MAX_FILL_PERCENT)
        threshold = int(page_size * fill)
        pieces = []
        start = 0
        sizes = [ELEMENT_SIZE + len(k) for k in self.keys]
        if self.is_leaf:
            sizes = [s + len(v) for s, v in zip(sizes, self.values)]
        remaining = PAGE_HEADER_SIZE + sum(sizes)
        while count - start > 2 * MIN_KEYS_PER_PAGE and remaining > page_size:
            size = PAGE_HEADER_SIZE
            end = start
            while end < count - MIN_KEYS_PER_PAGE:
                if end - start >= MIN_KEYS_PER_PAGE and size + sizes[end] > threshold:
                    break
                size += sizes[end]
                end += 1
            pieces.append((self._slice(start, end), size))
            remaining -= size - PAGE_HEADER_SIZE
            start = end
        pieces.append((self._slice(start, count) if start else self, remaining))
        return pieces

    def _slice(self, start, end):
        if self.is_leaf:
            return _Node(0, 0, True, self.keys[start:end], self.values[start:end],
                         self.flags[start:end])
        return _Node(0, 0, False, self.keys[start:end], pgids=self.pgids[start:end],
                     children=[None] * (end - start))


def _page_name(where):
    return "page %d" % where if isinstance(where, int) else where


def _parse_node(buf, where, expect_pgid=None):
    """Parse a branch or leaf page out of `buf`, checking every bound (node.go's read).

    `where` names the page in error messages; `expect_pgid` is the id the
    page header must carry (None for an inline bucket's page).
    """
    _assert(len(buf) >= PAGE_HEADER_SIZE, "%s: %d bytes, shorter than a page header",
            where, len(buf))
    pgid, flags, count, overflow = PAGE_HEADER.unpack_from(buf, 0)
    if expect_pgid is not None:
        _assert(pgid == expect_pgid, "%s: header says page %d (damaged or not a tree page)",
                where, pgid)
    is_leaf = flags == LEAF_PAGE
    if not is_leaf and flags != BRANCH_PAGE:
        raise CorruptionError("%s: invalid type %s, expected branch or leaf"
                              % (where, _page_type_name(flags)))
    end = len(buf)
    if is_leaf:
        leaf_flags, starts, mids, stops = _leaf_columns(buf, 0, end, count, where)
        leaf_flags = list(leaf_flags)  # (a node's flags change as it is written to)
        keys = [buf[a:b] for a, b in zip(starts, mids)]
        values = [buf[a:b] for a, b in zip(mids, stops)]
        return _Node(pgid if expect_pgid is not None else 0, overflow, True,
                     keys, values, leaf_flags)
    _assert(count > 0, "%s: branch page with no elements", where)
    _assert(PAGE_HEADER_SIZE + ELEMENT_SIZE * count <= end,
            "%s: %d elements do not fit in %d bytes", where, count, end)
    element_starts = range(PAGE_HEADER_SIZE, PAGE_HEADER_SIZE + ELEMENT_SIZE * count, ELEMENT_SIZE)
    elements = buf[PAGE_HEADER_SIZE:PAGE_HEADER_SIZE + ELEMENT_SIZE * count]
    pos, key_sizes, pgids = zip(*BRANCH_ELEMENT.iter_unpack(elements))
    starts = list(map(operator.add, element_starts, pos))
    stops = list(map(operator.add, starts, key_sizes))
    _assert(max(stops) <= end, "%s: an element runs past the page end", where)
    keys = [buf[a:b] for a, b in zip(starts, stops)]
    return _Node(pgid, overflow, False, keys, pgids=list(pgids))


# ---------------------------------------------------------------------------
# Pages of one shape: the fast paths of writing and reading pages
# ---------------------------------------------------------------------------
#
# Most pages of a bucket look alike: keys of one size and values of one size.
# Their element arrays are made once (_UniformLeaf), their padding is a view
# of one zero buffer, their columns are read in C. Each fast path here has a
# plain form beside its use (Node.to_bytes, Bucket._leaf_pairs), and a test
# holds the two equal.

def _element_offsets(data_sizes, count):
    """Each element's pos, from the element to its data: past the elements
    after it and the data before its own."""
    return map(operator.add, range(ELEMENT_SIZE * count, 0, -ELEMENT_SIZE),
               itertools.accumulate(itertools.chain((0,), data_sizes)))


_ZEROS = memoryview(bytes(1 << 16))


def _zeros(count):
    """`count` zero bytes (none if `count` < 1) for a page's padding: a view
    of one buffer, not a new one. (Each page of a commit is joined from its
    parts, the padding copied once: making it new zeroed it first, a
    twentieth of a one-put commit's instructions.)"""
    if count <= len(_ZEROS):
        return _ZEROS[:count] if count > 0 else b""
    return bytes(count)


def _leaf_columns(buf, offset, end, count, where):
    """The elements of the leaf page at `offset` in `buf` (its data ending
    at `end`), as columns: flags, and where each key starts, its value
    starts and its value stops. Checked: every element within the page,
    and no flag but BUCKET_LEAF_FLAG. `where` names the page in an error:
    a page id, or words.

    (One pass in C per column: iter_unpack over the element array, then
    map(add). A Python loop over the elements was a third of a read-all.)
    """
    base = offset + PAGE_HEADER_SIZE
    if base + ELEMENT_SIZE * count > end:
        _assert(False, "%s: %d elements do not fit in %d bytes",
                _page_name(where), count, end - offset)
    if not count:
        return [], [], [], []
    leaf_flags, pos, key_sizes, value_sizes = zip(
        *LEAF_ELEMENT.iter_unpack(buf[base:base + ELEMENT_SIZE * count]))
    starts = list(map(operator.add, range(base, base + ELEMENT_SIZE * count, ELEMENT_SIZE), pos))
    mids = list(map(operator.add, starts, key_sizes))
    stops = list(map(operator.add, mids, value_sizes))
    if max(stops) > end:
        i = next(i for i, stop in enumerate(stops) if stop > end)
        _assert(False, "%s: element %d runs past the page end (%d > %d)",
                _page_name(where), i, stops[i] - offset, end - offset)
    if max(leaf_flags) > BUCKET_LEAF_FLAG:
        i = next(i for i, flag in enumerate(leaf_flags) if flag & ~BUCKET_LEAF_FLAG)
        _assert(False, "%s: element %d has unknown flags %#x", _page_name(where), i,
                leaf_flags[i])
    return leaf_flags, starts, mids, stops


class _Shape:
    """A layout that many pages share, made once (see the two kinds below).
    At most 1,024 of each kind are kept, of at most 512 elements (8 KB)
    each, so that odd files cannot fill the memory with them; a bucket of
    fixed-size keys and values has a few dozen."""

    CACHED, CACHED_COUNT = 1024, 512
    shapes = {}  # (count, sizes...): the shape; each kind has its own

    @classmethod
    def of(cls, count, *sizes):
        shapes = cls.shapes
        shape = shapes.get((count,) + sizes)
        if shape is None:
            shape = cls(count, *sizes)
            if count <= cls.CACHED_COUNT:
                if len(shapes) >= cls.CACHED:
                    shapes.clear()
                shapes[(count,) + sizes] = shape
        return shape


class _UniformLeaf(_Shape):
    """What a leaf of `count` elements with flags 0, keys of `key_size`
    bytes and values of `value_size` bytes looks like as bbolt (and this
    module) writes it: its element array, byte for byte (each pos points
    just past the data before it), and a Struct that splits its data into
    (key, value) pairs. A leaf whose element array equals `elements` is
    read by one `pairs.iter_unpack` over its data: the pairs are made in C,
    with no Python step per pair, and the one comparison checks every
    element's bounds and flags (100,000 keys of 12 bytes and values of 100
    from a fresh open: 90 ms by slicing the map pair by pair, 23 ms so).
    """

    shapes = {}

    def __init__(self, count, key_size, value_size):
        repeat = itertools.repeat
        self.elements = b"".join(map(
            LEAF_ELEMENT.pack, repeat(0, count),
            _element_offsets(repeat(key_size + value_size, count), count),
            repeat(key_size, count), repeat(value_size, count)))
        self.pairs = struct.Struct("<%ds%ds" % (key_size, value_size))


def _uniform_leaf_elements(count, key_sizes, value_sizes, flags):
    """The element array of a leaf whose keys are of one size, its values of
    one size and its flags 0, made once for all such leaves (_UniformLeaf);
    None for any other leaf. (11 µs for 25 elements packed one by one, 5 µs
    so: a leaf of the broker's ids, or of bbolt_bench's keys, is of one
    shape.)"""
    if count and key_sizes.count(key_sizes[0]) == count and \
            value_sizes.count(value_sizes[0]) == count and not any(flags):
        return _UniformLeaf.of(count, key_sizes[0], value_sizes[0]).elements
    return None


# ---------------------------------------------------------------------------
# Freelist (bbolt freelist.go, array form)
# ---------------------------------------------------------------------------

class _Freelist:
    """Free page ids, and pages freed by transactions that readers may see.

    `ids` are free now (sorted). `pending[txid]` are pages that write
    transaction `txid` stopped using: snapshots older than txid still use
    them, so they are released only once no reader older than txid is open.
    """

    def __init__(self, ids=()):
        self.ids = sorted(ids)
        self.pending = {}
        self.cache = set(self.ids)  # every id free or pending (freelist.go's cache)

    def count(self):
        return len(self.ids) + sum(map(len, self.pending.values()))

    def all_ids(self):
        """Free and pending ids together, sorted: what the freelist page holds."""
        everything = list(self.ids)
        for ids in self.pending.values():
            everything.extend(ids)
        everything.sort()
        return everything

    def allocate(self, n):
        """Take `n` contiguous free pages; return the first id, or 0 if none."""
        ids = self.ids
        if n == 1:
            if not ids:
                return 0
            first = ids.pop(0)
            self.cache.discard(first)
            return first
        run_start = 0
        for i, pgid in enumerate(ids):
            if i == 0 or pgid != ids[i - 1] + 1:
                run_start = i
            if i - run_start + 1 == n:
                first = ids[run_start]
                del ids[run_start:i + 1]
                self.cache.difference_update(range(first, first + n))
                return first
        return 0

    def give_back(self, runs):
        """Free again the (first pgid, count) runs that a failed commit took.
        (Where a copy of the freelist before each commit, to restore on a
        failure, cost every commit 4 µs for 1,000 free pages and 51 µs for
        10,000, timeit: only a failed commit pays here.)"""
        if runs:
            for first, count in runs:
                self.ids.extend(range(first, first + count))
                self.cache.update(range(first, first + count))
            self.ids.sort()

    def free(self, txid, pgid, overflow):
        """Pages that transaction `txid` stops using: pending until released."""
        # (The usual page, alone: no loop, no _assert call; 170 ns where the
        # general path below takes 510, timeit.)
        if not overflow and pgid > 1 and pgid not in self.cache:
            self.cache.add(pgid)
            self.pending.setdefault(txid, []).append(pgid)
            return
        _assert(pgid > 1, "cannot free meta page %d", pgid)
        span = range(pgid, pgid + overflow + 1)
        for page in span:
            _assert(page not in self.cache, "page %d already freed", page)
        self.cache.update(span)
        self.pending.setdefault(txid, []).extend(span)

    def rollback(self, txid):
        """Transaction `txid` did not commit: the pages it freed are in use again.

        (Pages are allocated only while committing, and a failed commit puts
        back the freelist it began with; so every page pending for `txid`
        still belongs to the last committed tree.)
        """
        ids = self.pending.pop(txid, None)
        if ids:
            self.cache.difference_update(ids)

    def release(self, oldest_reader_txid):
        """Release pages freed by transactions no open reader predates."""
        released = [txid for txid in self.pending if txid <= oldest_reader_txid]
        if released:
            for txid in released:
                self.ids.extend(self.pending.pop(txid))
            self.ids.sort()

    def page_size_needed(self):
        count = self.count()
        if count >= FREELIST_COUNT_OVERFLOW:
            count += 1
        return PAGE_HEADER_SIZE + PGID_SIZE * count

    def to_bytes(self, pgid, overflow, pad_to):
        ids = self.all_ids()
        if len(ids) < FREELIST_COUNT_OVERFLOW:
            header = PAGE_HEADER.pack(pgid, FREELIST_PAGE, len(ids), overflow)
        else:
            header = PAGE_HEADER.pack(pgid, FREELIST_PAGE, FREELIST_COUNT_OVERFLOW,
                                      overflow) + PGID.pack(len(ids))
        ids = array.array("Q", ids)  # (one C loop: 0.5 µs for 12 ids, where struct.pack took 1.5)
        if not _LITTLE_ENDIAN:
            ids.byteswap()
        return b"".join((header, ids, _zeros(pad_to - len(header) - PGID_SIZE * len(ids))))


def _parse_freelist(buf, pgid, high_water):
    """The page ids a freelist page lists, checked against the file's bounds."""
    where = "freelist page %d" % pgid
    _assert(len(buf) >= PAGE_HEADER_SIZE, "%s: beyond the end of the file", where)
    header_id, flags, count, _overflow = PAGE_HEADER.unpack_from(buf, 0)
    _assert(header_id == pgid, "%s: header says page %d", where, header_id)
    _assert(flags == FREELIST_PAGE, "%s: invalid type %s, expected freelist",
            where, _page_type_name(flags))
    offset = PAGE_HEADER_SIZE
    if count == FREELIST_COUNT_OVERFLOW:
        _assert(len(buf) >= offset + PGID_SIZE, "%s: count missing", where)
        count = PGID.unpack_from(buf, offset)[0]
        offset += PGID_SIZE
    _assert(offset + PGID_SIZE * count <= len(buf),
            "%s: %d ids do not fit in %d bytes", where, count, len(buf))
    ids = sorted(struct.unpack_from("<%dQ" % count, buf, offset))
    for free_id in ids:
        _assert(2 <= free_id < high_water, "%s: free page %d outside 2..%d",
                where, free_id, high_water)
    return ids


# ---------------------------------------------------------------------------
# Bucket (bbolt bucket.go)
# ---------------------------------------------------------------------------

STATS_FIELDS = ("branch_page_n", "branch_overflow_n", "leaf_page_n", "leaf_overflow_n",
                "key_n", "depth", "branch_alloc", "branch_inuse", "leaf_alloc", "leaf_inuse",
                "bucket_n", "inline_bucket_n", "inline_bucket_inuse")


def _add_stats(total, other):
    """Go's BucketStats.Add: sums, but the deeper depth."""
    for field in STATS_FIELDS:
        if field == "depth":
            total[field] = max(total[field], other[field])
        else:
            total[field] += other[field]


class Bucket:
    """A collection of keys, values and nested buckets, in byte order."""

    def __init__(self, tx, root, sequence, inline_page=None):
        self.tx = tx
        self._root = root                 # root page id; 0 for an inline bucket
        self._sequence = sequence
        self._inline_page = inline_page   # the parsed page of an inline bucket
        self._root_node = None            # the root, once changed in memory
        self._sequence_changed = False
        self._shrunk = False              # a key deleted or a value shortened in this tx
        self._buckets = {}                # name -> nested Bucket opened in this tx
        #: How full split pages are made (bbolt's FillPercent): raise it for
        #: keys that only ever grow, such as time-ordered ids.
        self.fill_percent = DEFAULT_FILL_PERCENT

    # -- reading ----------------------------------------------------------

    def _root_ref(self):
        self.tx._check_open()
        if self._root_node is not None:
            return self._root_node
        if self._root == 0:
            return self._inline_page
        return self.tx._page(self._root)

    def _child(self, node, i):
        """Child `i` of a branch, for reading: the copy in memory, if any."""
        if node.children is not None and node.children[i] is not None:
            return node.children[i]
        return self.tx._page(node.pgids[i])

    @staticmethod
    def _descend(node, key, child):
        """From `node` down to the leaf that would hold `key`; `child(node, i)`
        gives a branch's i-th child (read, or copied for writing)."""
        depth = 0
        while not node.is_leaf:
            depth += 1
            _assert(depth < MAX_TREE_DEPTH, "page %d: tree deeper than %d (a cycle?)",
                    node.pgid, MAX_TREE_DEPTH)
            node = child(node, node.child_index(key))
        return node

    def _find(self, key):
        """The leaf that would hold `key`, and the key's index in it."""
        node = self._descend(self._root_ref(), key, self._child)
        return node, bisect.bisect_left(node.keys, key)

    def get(self, key):
        """The value of `key`, or None if missing or a nested bucket."""
        leaf, i = self._find(key)
        if i < len(leaf.keys) and leaf.keys[i] == key and not leaf.flags[i] & BUCKET_LEAF_FLAG:
            return leaf.values[i]
        return None

    def cursor(self):
        return Cursor(self)

    def items(self):
        """(key, value) pairs in byte order; value is None for a nested bucket."""
        if self._root_node is None and self._root != 0:  # as on disk: read it in place
            self.tx._check_open()
            # (A leaf's pairs at a time: no Python frame per pair.)
            return itertools.chain.from_iterable(self._leaf_pairs())
        return self._node_items()

    def _leaf_pairs(self):
        """For each leaf of this bucket as on disk, in key order, an iterator of its
        (key, value) pairs, read in place from the map: no node is built and
        no Python code runs per pair. A leaf of keys of one size and values
        of one size is split by one Struct (_UniformLeaf); any other leaf by
        C loops (map, zip) over the columns of its elements. (100,000 keys
        from a fresh open: 170 ms through nodes, 90 ms by columns, 23 ms with
        uniform leaves.) The bounds read are checked as _parse_node checks
        them; the transaction must still be open as each page is read."""
        db, high_water, check_open = self.tx._db, self.tx._meta.pgid, self.tx._check_open
        page_size = db.page_size
        mapped = db._mapped(high_water * page_size)
        get = mapped.__getitem__
        pending = [(self._root, 0)]  # pages to read, the next one last; and their depth
        while pending:
            check_open()
            pgid, depth = pending.pop()
            offset = pgid * page_size
            if not 2 <= pgid < high_water:
                _assert(False, "page %d: out of bounds 2..%d", pgid, high_water)
            # (The header, and the first element of a leaf, in one unpack.)
            header_pgid, flags, count, overflow, _, _, key_size, value_size = \
                LEAF_PAGE_START.unpack_from(mapped, offset)
            if header_pgid != pgid or pgid + overflow >= high_water:
                _assert(header_pgid == pgid, "page %d: header says page %d (damaged or not a "
                        "tree page)", pgid, header_pgid)
                _assert(False, "page %d: %d overflow pages run past high-water mark %d",
                        pgid, overflow, high_water)
            end = offset + (1 + overflow) * page_size
            if flags == LEAF_PAGE:
                # The usual leaf, of keys of one size and values of one size,
                # and no nested bucket: in C (_UniformLeaf).
                elements = offset + PAGE_HEADER_SIZE
                data = elements + ELEMENT_SIZE * count
                stop = data + (key_size + value_size) * count
                if count and key_size and stop <= end:
                    shape = _UniformLeaf.of(count, key_size, value_size)
                    if mapped[elements:data] == shape.elements:
                        yield shape.pairs.iter_unpack(mapped[data:stop])
                        continue
                leaf_flags, starts, mids, stops = _leaf_columns(mapped, offset, end, count, pgid)
                keys = map(get, map(slice, starts, mids))
                values = map(get, map(slice, mids, stops))
                if any(leaf_flags):  # nested buckets: no value
                    values = [None if flag & BUCKET_LEAF_FLAG else value
                              for flag, value in zip(leaf_flags, values)]
                yield zip(keys, values)
            elif flags == BRANCH_PAGE:
                where = "page %d" % pgid
                _assert(count > 0, "%s: branch page with no elements", where)
                _assert(offset + PAGE_HEADER_SIZE + ELEMENT_SIZE * count <= end,
                        "%s: %d elements do not fit in %d bytes", where, count, end - offset)
                _assert(depth < MAX_TREE_DEPTH, "%s: tree deeper than %d (a cycle?)",
                        where, MAX_TREE_DEPTH)
                elements = mapped[offset + PAGE_HEADER_SIZE:
                                  offset + PAGE_HEADER_SIZE + ELEMENT_SIZE * count]
                children = [child for _pos, _size, child in BRANCH_ELEMENT.iter_unpack(elements)]
                pending += [(child, depth + 1) for child in reversed(children)]
            else:
                raise CorruptionError("page %d: invalid type %s, expected branch or leaf"
                                      % (pgid, _page_type_name(flags)))

    def _node_items(self):
        for leaf in self._leaves(self._root_ref(), 0):
            if any(leaf.flags):
                for key, value, flags in zip(leaf.keys, leaf.values, leaf.flags):
                    yield key, (None if flags & BUCKET_LEAF_FLAG else value)
            else:
                yield from zip(leaf.keys, leaf.values)

    def _leaves(self, node, depth):
        if node.is_leaf:
            yield node
            return
        _assert(depth < MAX_TREE_DEPTH, "page %d: tree deeper than %d (a cycle?)",
                node.pgid, MAX_TREE_DEPTH)
        for i in range(len(node.keys)):
            yield from self._leaves(self._child(node, i), depth + 1)

    def __iter__(self):
        for key, _value in self.items():
            yield key

    def keys(self):
        return list(self)

    def buckets(self):
        """Names of the nested buckets, in byte order."""
        cursor = Cursor(self)
        key, flags = cursor._first_raw()
        while key is not None:
            if flags & BUCKET_LEAF_FLAG:
                yield key
            key, flags = cursor._next_raw()

    def bucket(self, name):
        """The nested bucket `name`, or None if there is none."""
        self.tx._check_open()
        child = self._buckets.get(name)
        if child is not None:
            return child
        leaf, i = self._find(name)
        if i >= len(leaf.keys) or leaf.keys[i] != name or not leaf.flags[i] & BUCKET_LEAF_FLAG:
            return None
        child = self._open_child(leaf.values[i], name)
        if self.tx.writable:
            self._buckets[name] = child
        return child

    def _open_child(self, value, name):
        _assert(len(value) >= BUCKET_HEADER_SIZE, "bucket %r: header of %d bytes",
                name, len(value))
        root, sequence = BUCKET_HEADER.unpack_from(value, 0)
        inline_page = None
        if root == 0:
            inline_page = _parse_node(value[BUCKET_HEADER_SIZE:], "bucket %r (inline)" % name)
            _assert(inline_page.is_leaf, "bucket %r: inline bucket is not a leaf", name)
        else:
            _assert(root < self.tx._meta.pgid, "bucket %r: root page %d beyond high-water "
                    "mark %d", name, root, self.tx._meta.pgid)
        return Bucket(self.tx, root, sequence, inline_page)

    def sequence(self):
        return self._sequence

    def stats(self):
        """Go's Bucket.Stats(), field for field, with Go's names in snake_case
        (KeyN: key_n, ...): this bucket's committed pages and, added in, its
        nested buckets'. As in Go, key_n counts nested buckets' names too,
        bucket_n counts this bucket, and depth adds the deepest nested one's."""
        page_size = self.tx._db.page_size
        own = dict.fromkeys(STATS_FIELDS, 0)
        nested = dict.fromkeys(STATS_FIELDS, 0)
        own["bucket_n"] = 1
        inline = self._root == 0
        if inline:
            own["inline_bucket_n"] = 1
        stack = [(self._root_ref(), 0)]
        while stack:
            node, depth = stack.pop()
            _assert(depth < MAX_TREE_DEPTH, "tree deeper than %d (a cycle?)", MAX_TREE_DEPTH)
            own["depth"] = max(own["depth"], depth + 1)
            count = len(node.keys)
            if node.is_leaf:
                own["key_n"] += count
                used = PAGE_HEADER_SIZE
                if count:
                    used += ELEMENT_SIZE * count + sum(map(len, node.keys)) + \
                        sum(map(len, node.values))
                if inline:
                    own["inline_bucket_inuse"] += used
                    continue
                own["leaf_page_n"] += 1
                own["leaf_inuse"] += used
                own["leaf_overflow_n"] += node.overflow
                for i, key in enumerate(node.keys):
                    if node.flags[i] & BUCKET_LEAF_FLAG:
                        _add_stats(nested, self.bucket(key).stats())
            else:
                own["branch_page_n"] += 1
                own["branch_inuse"] += PAGE_HEADER_SIZE + ELEMENT_SIZE * count + \
                    sum(map(len, node.keys))
                own["branch_overflow_n"] += node.overflow
                stack.extend((self._child(node, i), depth + 1) for i in range(count))
        own["branch_alloc"] = (own["branch_page_n"] + own["branch_overflow_n"]) * page_size
        own["leaf_alloc"] = (own["leaf_page_n"] + own["leaf_overflow_n"]) * page_size
        own["depth"] += nested["depth"]
        _add_stats(own, nested)
        return own

    # -- writing ----------------------------------------------------------

    def _writable_root(self):
        self.tx._check_writable()
        if self._root_node is None:
            ref = self._root_ref()
            self._root_node = ref.copy()
            if self._root == 0:
                self._root_node.pgid = 0  # an inline page frees no page
        return self._root_node

    def _writable_leaf(self, key):
        """The leaf for `key`, with the path to it copied into memory."""
        return self._descend(self._writable_root(), key,
                             lambda node, i: node.child_at(self.tx, i))

    def _put_raw(self, key, value, flags):
        leaf = self._writable_leaf(key)
        i = bisect.bisect_left(leaf.keys, key)
        if i < len(leaf.keys) and leaf.keys[i] == key:
            if len(value) < len(leaf.values[i]):
                self._shrunk = True
            leaf.values[i] = value
            leaf.flags[i] = flags
        else:
            leaf.keys.insert(i, key)
            leaf.values.insert(i, value)
            leaf.flags.insert(i, flags)

    def _delete_raw(self, key):
        leaf = self._writable_leaf(key)
        i = bisect.bisect_left(leaf.keys, key)
        if i < len(leaf.keys) and leaf.keys[i] == key:
            del leaf.keys[i], leaf.values[i], leaf.flags[i]
            self._shrunk = True

    def _lookup_flags(self, key):
        """The leaf flags of `key`, or None if it is missing."""
        leaf, i = self._find(key)
        if i < len(leaf.keys) and leaf.keys[i] == key:
            return leaf.flags[i]
        return None

    def put(self, key, value):
        """Set `key` to `value` (bytes-like; None is Go's nil, an empty
        value), replacing any old value."""
        self.tx._check_writable()
        key = bytes(key)
        value = b"" if value is None else bytes(value)
        if not key:
            raise KeyRequiredError("key required")
        if len(key) > MAX_KEY_SIZE:
            raise KeyTooLargeError("key of %d bytes, at most %d" % (len(key), MAX_KEY_SIZE))
        if len(value) > MAX_VALUE_SIZE:
            raise ValueTooLargeError("value of %d bytes, at most %d"
                                     % (len(value), MAX_VALUE_SIZE))
        if self._lookup_flags(key) == BUCKET_LEAF_FLAG:
            raise IncompatibleValueError("%r is a bucket, not a value" % key)
        self._put_raw(key, value, 0)

    def delete(self, key):
        """Remove `key`; a missing key is not an error."""
        self.tx._check_writable()
        key = bytes(key)
        flags = self._lookup_flags(key)
        if flags is None:
            return
        if flags & BUCKET_LEAF_FLAG:
            raise IncompatibleValueError("%r is a bucket: use delete_bucket" % key)
        self._delete_raw(key)

    def create_bucket(self, name):
        self.tx._check_writable()
        name = bytes(name)
        if not name:
            raise BucketNameRequiredError("bucket name required")
        if len(name) > MAX_KEY_SIZE:
            raise KeyTooLargeError("bucket name of %d bytes, at most %d"
                                   % (len(name), MAX_KEY_SIZE))
        flags = self._lookup_flags(name)
        if flags is not None:
            if flags & BUCKET_LEAF_FLAG:
                raise BucketExistsError("bucket %r already exists" % name)
            raise IncompatibleValueError("%r holds a value, not a bucket" % name)
        # As in Go, its root is a page until a write changes it (a cursor on
        # it until then sees that page, not later writes).
        child = Bucket(self.tx, 0, 0, _Node.empty_leaf())
        self._put_raw(name, BUCKET_HEADER.pack(0, 0) + _Node.empty_leaf().to_bytes(0, 0),
                      BUCKET_LEAF_FLAG)
        self._buckets[name] = child
        return child

    def create_bucket_if_not_exists(self, name):
        self.tx._check_writable()
        name = bytes(name)
        child = self.bucket(name) if name else None
        if child is not None:
            return child
        return self.create_bucket(name)

    def delete_bucket(self, name):
        self.tx._check_writable()
        name = bytes(name)
        child = self.bucket(name)
        if child is None:
            if self._lookup_flags(name) is not None:
                raise IncompatibleValueError("%r holds a value, not a bucket" % name)
            raise BucketNotFoundError("bucket %r not found" % name)
        child._free_all()
        self._buckets.pop(name, None)
        self._delete_raw(name)

    def next_sequence(self):
        """Increment and return this bucket's sequence (saved at commit); past
        2**64 - 1 it wraps to 0, as Go's uint64 does."""
        self._writable_root()
        self._sequence = (self._sequence + 1) & _U64
        self._sequence_changed = True
        return self._sequence

    def set_sequence(self, value):
        """Set this bucket's sequence: an integer in 0..2**64 - 1 (Go's uint64)."""
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64:
            raise SequenceError("sequence %r: want an integer in 0..2**64-1" % (value,))
        self._writable_root()
        self._sequence = value
        self._sequence_changed = True

    # -- commit: nested buckets first, then this one's nodes (bucket.go) ----

    def _changed(self):
        return self._root_node is not None or any(
            child._changed() for child in self._buckets.values())

    def _free_all(self):
        """Free every page of this bucket and of the buckets nested in it."""
        stack = [self._root_ref()]  # an inline page has pgid 0: nothing to free
        seen = set()
        while stack:
            node = stack.pop()
            if node.pgid:
                _assert(node.pgid not in seen, "page %d: referenced twice", node.pgid)
                seen.add(node.pgid)
                self.tx._free(node.pgid, node.overflow)
            if node.is_leaf:
                for i, key in enumerate(node.keys):
                    if node.flags[i] & BUCKET_LEAF_FLAG:
                        self.bucket(key)._free_all()
            else:
                for i in range(len(node.keys)):
                    stack.append(self._child(node, i))

    def _inlineable(self):
        node = self._root_node
        if node is None or not node.is_leaf or any(node.flags):
            return False
        return node.size() <= self.tx._db.page_size // 4

    def _inline_value(self):
        return BUCKET_HEADER.pack(0, self._sequence) + self._root_node.to_bytes(0, 0)

    def _spill_buckets(self):
        """Write changed nested buckets and put their new headers here."""
        for name in sorted(self._buckets):
            child = self._buckets[name]
            if not child._changed():
                continue
            child._spill_buckets()
            child._rebalance()
            if child._inlineable():
                if child._root_node.pgid:
                    self.tx._free(child._root_node.pgid, child._root_node.overflow)
                value = child._inline_value()
                child._root = 0
                child._inline_page = _parse_node(value[BUCKET_HEADER_SIZE:], "inline")
            else:
                child._spill()
                value = BUCKET_HEADER.pack(child._root, child._sequence)
            child._root_node = None
            self._put_raw(name, value, BUCKET_LEAF_FLAG)

    def _rebalance(self):
        """Merge nodes left small by deletes; shrink a root of one child.
        (Only when something shrank, as bbolt rebalances only nodes that
        lost a key: a commit of puts alone no longer weighs each node it
        changed, a twentieth of a one-put commit.)"""
        root = self._root_node
        if root is None or not self._shrunk:
            return
        root.rebalance(self.tx)
        while not root.is_leaf and len(root.keys) <= 1:
            if root.pgid:
                self.tx._free(root.pgid, root.overflow)
            root = root.child_at(self.tx, 0) if root.keys else _Node.empty_leaf()
        self._root_node = root

    def _spill(self):
        """Write this bucket's changed nodes to new pages; set its root."""
        entries = self._root_node.spill(self.tx, self.fill_percent)
        while len(entries) > 1:  # the root split: a new root above the pieces
            keys = [key for key, _ in entries]
            parent = _Node(0, 0, False, keys, pgids=[pgid for _, pgid in entries],
                           children=[None] * len(keys))
            entries = parent.spill(self.tx, self.fill_percent)
        self._root = entries[0][1]
        self._root_node = None
        self._inline_page = None


# ---------------------------------------------------------------------------
# Cursor (bbolt cursor.go)
# ---------------------------------------------------------------------------


class Cursor:
    """Moves over a bucket's keys in byte order, as Go's bbolt Cursor does.

    Each move returns (key, value), value None for a nested bucket, or
    (None, None) past either end. The moves follow cursor.go step for step,
    so that code ported from Go behaves the same: `next()` past the last key
    returns (None, None) and leaves the cursor on that last key (a `prev()`
    then returns the key before it); `seek()` past the last key leaves the
    cursor beyond it (a `prev()` then returns the last key: Go's
    `Seek(x); Prev()` idiom); `prev()` before the first key leaves the
    cursor nowhere (a `next()` then returns (None, None) too).

    `delete()` removes the key the cursor is on. As in Go, whether a later
    move sees the deletion depends on whether that leaf had been changed
    earlier in the transaction (Go: materialised as a node): deleting while
    moving forward from `first()` over an unchanged bucket visits every key.
    """

    def __init__(self, bucket):
        self.bucket = bucket
        self._stack = []  # [node, index] from the root down to a leaf (Go's elemRef)

    # -- cursor.go's moves, on the stack -------------------------------------

    def _go_first(self):
        """Down from the top of the stack along first children to a leaf."""
        stack = self._stack
        while not stack[-1][0].is_leaf:
            _assert(len(stack) < MAX_TREE_DEPTH, "tree deeper than %d (a cycle?)",
                    MAX_TREE_DEPTH)
            node, index = stack[-1]
            stack.append([self.bucket._child(node, index), 0])

    def _go_last(self):
        """Down from the top of the stack along last children to a leaf."""
        stack = self._stack
        while not stack[-1][0].is_leaf:
            _assert(len(stack) < MAX_TREE_DEPTH, "tree deeper than %d (a cycle?)",
                    MAX_TREE_DEPTH)
            node, index = stack[-1]
            child = self.bucket._child(node, index)
            stack.append([child, len(child.keys) - 1])

    def _go_next(self):
        """One key on, skipping empty leaves; False at the end (the stack is
        then left as it was: on the last key, or past it after a seek)."""
        stack = self._stack
        while True:
            level = len(stack) - 1
            while level >= 0:
                node, index = stack[level]
                if index < len(node.keys) - 1:
                    stack[level][1] = index + 1
                    break
                level -= 1
            if level < 0:
                return False
            del stack[level + 1:]
            self._go_first()
            if stack[-1][0].keys:
                return True

    def _raw(self):
        """(key, flags) where the cursor is, or (None, 0)."""
        if not self._stack:
            return None, 0
        node, index = self._stack[-1]
        if not 0 <= index < len(node.keys):
            return None, 0
        return node.keys[index], node.flags[index]

    def _pair(self):
        if not self._stack:
            return None, None
        node, index = self._stack[-1]
        if not 0 <= index < len(node.keys):
            return None, None
        if node.flags[index] & BUCKET_LEAF_FLAG:
            return node.keys[index], None
        return node.keys[index], node.values[index]

    def _check_open(self):
        self.bucket.tx._check_open()

    # -- the API ---------------------------------------------------------------

    def first(self):
        self._check_open()
        root = self.bucket._root_ref()
        self._stack = [[root, 0]]
        self._go_first()
        if not self._stack[-1][0].keys:
            self._go_next()
        return self._pair()

    def last(self):
        self._check_open()
        root = self.bucket._root_ref()
        self._stack = [[root, len(root.keys) - 1]]
        self._go_last()
        return self._pair()

    def next(self):
        self._check_open()
        if not self._go_next():
            return None, None
        return self._pair()

    def prev(self):
        self._check_open()
        stack = self._stack
        level = len(stack) - 1
        while level >= 0:
            if stack[level][1] > 0:
                stack[level][1] -= 1
                break
            del stack[level:]
            level -= 1
        if not stack:
            return None, None
        self._go_last()
        return self._pair()

    def seek(self, key):
        """Move to `key`, or to the first key after it."""
        self._check_open()
        key = bytes(key)
        self._stack = []
        node = self.bucket._root_ref()
        while not node.is_leaf:
            index = node.child_index(key)
            self._stack.append([node, index])
            _assert(len(self._stack) < MAX_TREE_DEPTH, "tree deeper than %d (a cycle?)",
                    MAX_TREE_DEPTH)
            node = self.bucket._child(node, index)
        index = bisect.bisect_left(node.keys, key)
        self._stack.append([node, index])
        if index >= len(node.keys):
            self._go_next()  # the next leaf's first key, if there is one
        return self._pair()

    def delete(self):
        """Delete the key the cursor is on (Go's Cursor.Delete)."""
        self._check_open()
        key, flags = self._raw()
        if flags & BUCKET_LEAF_FLAG:
            raise IncompatibleValueError("the cursor is on a bucket: use delete_bucket")
        if key is None:
            return
        self.bucket.delete(key)

    # -- for Bucket.keys() and friends ------------------------------------------

    def _first_raw(self):
        self.first()
        return self._raw()

    def _next_raw(self):
        if not self._go_next():
            return None, 0
        return self._raw()


# ---------------------------------------------------------------------------
# Transaction (bbolt tx.go)
# ---------------------------------------------------------------------------

class Tx:
    """A read-only snapshot, or the one write transaction.

    Use as a context manager (``with db.update() as tx``): commit when the
    block ends normally, roll back on an exception. A read-only transaction
    only closes.
    """

    def __init__(self, db, writable):
        self._db = db
        self.writable = writable
        self._closed = False
        self._dirty = {}          # pgid -> page bytes written at commit
        self._written_nodes = {}  # pgid -> the node of a dirty page, cached once committed
        self._taken = []          # (first pgid, count) of each run taken from the freelist
        with db._meta_lock:
            self._meta = db._meta.copy()
            if writable:
                self._meta.txid += 1
                db._freelist.release(min(db._readers) if db._readers else _U64)
            else:
                db._readers[self._meta.txid] = db._readers.get(self._meta.txid, 0) + 1
        self.root = Bucket(self, self._meta.root, self._meta.sequence)

    @property
    def id(self):
        return self._meta.txid

    @property
    def db(self):
        return self._db

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._closed:
            return False
        if exc_type is None and self.writable:
            self.commit()
        else:
            self.rollback()
        return False

    def _check_open(self):
        if self._closed:
            raise TxClosedError("transaction closed")

    def _check_writable(self):
        self._check_open()
        if not self.writable:
            raise TxNotWritableError("transaction not writable")

    def _page(self, pgid):
        self._check_open()
        return self._db._read_node(pgid, self._meta.pgid)

    # -- bucket shortcuts on the root bucket --------------------------------

    def bucket(self, name):
        return self.root.bucket(bytes(name))

    def create_bucket(self, name):
        return self.root.create_bucket(name)

    def create_bucket_if_not_exists(self, name):
        return self.root.create_bucket_if_not_exists(name)

    def delete_bucket(self, name):
        return self.root.delete_bucket(name)

    def buckets(self):
        """Top-level bucket names, in byte order."""
        self._check_open()
        return self.root.buckets()

    def cursor(self):
        return self.root.cursor()

    # -- page allocation, used while committing ------------------------------

    def _allocate(self, count):
        pgid = self._db._freelist.allocate(count)
        if pgid:
            # (Given back if the commit fails. Copying the whole freelist
            # before each commit instead cost time in proportion to it.)
            self._taken.append((pgid, count))
        else:
            pgid = self._meta.pgid
            self._meta.pgid += count
        return pgid

    def _free(self, pgid, overflow):
        self._db._freelist.free(self._meta.txid, pgid, overflow)

    def _write(self, pgid, page, node=None):
        """Queue `page` for the commit; `node` is its parsed form, for the cache."""
        self._dirty[pgid] = page
        if node is not None:
            self._written_nodes[pgid] = node

    # -- ending ------------------------------------------------------------

    def commit(self):
        """Write the changes: pages, freelist, sync, meta, sync."""
        self._check_writable()
        db = self._db
        # (Even with nothing changed, as Go does: the txid moves on.)
        try:
            root = self.root
            root._spill_buckets()
            if root._root_node is not None:
                root._rebalance()
                root._spill()
            self._meta.root = root._root
            self._meta.sequence = root._sequence
            if self._meta.freelist != NO_FREELIST:
                # (Its size is remembered: reading its header back was the one
                # system call of a commit that Go's does not make.)
                self._free(self._meta.freelist, db._freelist_overflow)
            page_size = db.page_size
            pages = db._freelist.page_size_needed() // page_size + 1
            freelist_pgid = self._allocate(pages)
            self._write(freelist_pgid, db._freelist.to_bytes(
                freelist_pgid, pages - 1, pages * page_size))
            self._meta.freelist = freelist_pgid
            db._write_pages(self._dirty)
            db._sync()
            db._write_meta(self._meta)
            db._sync()
        except BaseException:
            db._freelist.give_back(self._taken)
            db._freelist.rollback(self._meta.txid)
            self._close()
            raise
        with db._meta_lock:
            db._meta = self._meta
        db._freelist_overflow = pages - 1
        db._cache_nodes(self._written_nodes)
        self._close()

    def rollback(self):
        """Drop the changes (for a read-only transaction: just close it).
        TxClosedError if the transaction has ended already, as in Go."""
        self._check_open()
        if self.writable:
            self._db._freelist.rollback(self._meta.txid)
        self._close()

    def _close(self):
        if self._closed:
            return
        self._closed = True
        self._dirty = {}
        self._written_nodes = {}
        db = self._db
        if self.writable:
            db._write_lock.release()
        else:
            with db._meta_lock:
                left = db._readers[self._meta.txid] - 1
                if left:
                    db._readers[self._meta.txid] = left
                else:
                    del db._readers[self._meta.txid]

    # -- checking (bbolt tx.Check, plus key order and inline buckets) -------

    def check(self):
        """A list of problems with this snapshot; empty when it is sound."""
        self._check_open()
        db = self._db
        problems = []
        high_water = self._meta.pgid
        freed = set()
        if self._meta.freelist != NO_FREELIST:
            try:
                buf = db._read_span(self._meta.freelist, high_water)
                ids = _parse_freelist(buf, self._meta.freelist, high_water)
            except Error as error:
                problems.append(str(error))
                ids = []
            for pgid in ids:
                if pgid in freed:
                    problems.append("page %d: already freed" % pgid)
                freed.add(pgid)
        reachable = {0: "meta", 1: "meta"}
        if self._meta.freelist != NO_FREELIST:
            try:
                overflow = db._read_page_header(self._meta.freelist).overflow
            except Error as error:
                problems.append(str(error))
                overflow = 0
            for pgid in range(self._meta.freelist, self._meta.freelist + overflow + 1):
                reachable[pgid] = "freelist"
        self._check_bucket(self.root, b"(root)", reachable, freed, problems, 0)
        if self._meta.freelist != NO_FREELIST:
            for pgid in range(high_water):
                if pgid not in reachable and pgid not in freed:
                    problems.append("page %d: unreachable unfreed" % pgid)
        return problems

    def _check_bucket(self, bucket, name, reachable, freed, problems, depth):
        if depth > MAX_TREE_DEPTH:
            problems.append("bucket %r: buckets nested deeper than %d" % (name, MAX_TREE_DEPTH))
            return
        try:
            if bucket._root == 0:
                self._check_keys(bucket._inline_page, name, None, None, problems)
                nodes = [bucket._inline_page]
            else:
                nodes = self._check_tree(bucket._root, name, reachable, freed, problems)
        except Error as error:
            problems.append("bucket %r: %s" % (name, error))
            return
        for node in nodes:
            for i, key in enumerate(node.keys):
                if not node.flags[i] & BUCKET_LEAF_FLAG:
                    continue
                try:
                    child = bucket._open_child(node.values[i], key)
                except Error as error:
                    problems.append("bucket %r in %r: %s" % (key, name, error))
                    continue
                self._check_bucket(child, key, reachable, freed, problems, depth + 1)

    def _check_tree(self, root, name, reachable, freed, problems):
        """Walk one bucket's pages; return its leaves for the nested buckets."""
        high_water = self._meta.pgid
        leaves = []
        stack = [(root, None, None, 0)]  # page, lowest key, key bound above, depth
        while stack:
            pgid, low, high, depth = stack.pop()
            if depth > MAX_TREE_DEPTH:
                problems.append("page %d: tree deeper than %d (a cycle?)" % (pgid, MAX_TREE_DEPTH))
                continue
            if pgid >= high_water:
                problems.append("page %d: out of bounds: %d" % (pgid, high_water))
                continue
            if pgid in reachable:
                problems.append("page %d: multiple references" % pgid)
                continue
            try:
                node = self._db._read_node(pgid, high_water)
            except Error as error:
                problems.append(str(error))
                reachable[pgid] = name
                continue
            for i in range(node.overflow + 1):
                if pgid + i in reachable and i:
                    problems.append("page %d: multiple references" % (pgid + i))
                reachable[pgid + i] = name
            if pgid in freed:
                problems.append("page %d: reachable freed" % pgid)
            self._check_keys(node, "page %d" % pgid, low, high, problems)
            if node.is_leaf:
                leaves.append(node)
                continue
            for i in range(len(node.keys) - 1, -1, -1):
                upper = node.keys[i + 1] if i + 1 < len(node.keys) else high
                stack.append((node.pgids[i], node.keys[i] if i else low, upper, depth + 1))
        return leaves

    @staticmethod
    def _check_keys(node, where, low, high, problems):
        keys = node.keys
        for i in range(1, len(keys)):
            if keys[i - 1] >= keys[i]:
                problems.append("%s: keys out of order at element %d" % (where, i))
                break
        if keys and low is not None and keys[0] < low:
            problems.append("%s: first key sorts before its parent's key" % where)
        if keys and high is not None and keys[-1] >= high:
            problems.append("%s: last key sorts after the next parent key" % where)
        if node.is_leaf:
            for i, flag in enumerate(node.flags):
                if flag & BUCKET_LEAF_FLAG and len(node.values[i]) < BUCKET_HEADER_SIZE:
                    problems.append("%s: bucket header of element %d too short" % (where, i))


# ---------------------------------------------------------------------------
# Database (bbolt db.go)
# ---------------------------------------------------------------------------

# Parsed pages kept in memory by default, oldest dropped first: reading a
# page is a slice of the map and a parse, which cost far more in Python than
# Go's reading the map in place.
DEFAULT_CACHE_PAGES = 8192


class DB:
    """An open bbolt file. Create with `bbolt_lite.open`."""

    def __init__(self, path, readonly=False, timeout=None, page_size=None, mode=0o600,
                 cache_pages=DEFAULT_CACHE_PAGES):
        self.path = os.fspath(path)
        self.readonly = readonly
        self.cache_pages = cache_pages
        # _write_lock: held by the one write transaction from begin to end.
        self._write_lock = threading.Lock()
        # _meta_lock guards _meta (the last committed meta), _readers (txid ->
        # count of open read transactions), and the freelist's release; hold
        # it for a moment only, never while doing I/O.
        self._meta_lock = threading.Lock()
        self._readers = {}
        # _cache_lock guards changes to _page_cache (readers in many threads).
        self._cache_lock = threading.Lock()
        self._page_cache = collections.OrderedDict()  # pgid -> _Node, single pages only
        self._map = None  # the file, read-only in memory (see _mapped)
        self._freelist_overflow = 0  # the overflow pages of the freelist on disk
        self._fd = -1
        if not readonly:
            _create_if_missing(self.path, page_size or _os_page_size(), mode)
        flags = os.O_RDONLY if readonly else os.O_RDWR
        try:
            self._fd = os.open(self.path, flags | getattr(os, "O_CLOEXEC", 0), mode)
        except OSError as error:
            raise Error("cannot open %s: %s" % (self.path, error.strerror)) from error
        try:
            self._lock_file(timeout)
            self._meta, self.page_size = self._load_meta()
            # Read-only, a NoFreelistSync file's freelist is not rebuilt (as in
            # Go): no page is ever allocated.
            self._freelist = _Freelist() if readonly and self._meta.freelist == NO_FREELIST \
                else self._load_freelist()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False

    def __repr__(self):
        return "<bbolt_lite.DB %r%s>" % (self.path, " closed" if self._fd < 0 else "")

    # -- opening ------------------------------------------------------------

    def _lock_file(self, timeout):
        operation = fcntl.LOCK_SH if self.readonly else fcntl.LOCK_EX
        if timeout is None:
            fcntl.flock(self._fd, operation)
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._fd, operation | fcntl.LOCK_NB)
                return
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                raise DatabaseLockedError(
                    "%s is locked by another process (waited %.1f s)" % (self.path, timeout))
            time.sleep(0.05)

    def _load_meta(self):
        """The valid meta with the highest txid, and the page size.

        Like bbolt, a damaged meta page (bad magic, version or checksum) is
        passed over for the other one. A sound meta whose pages lie beyond the
        end of the file means the file was truncated: refused, never passed over.
        """
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, PAGE_HEADER_SIZE + META_SIZE, 0)
        candidates = []
        errors = []
        try:
            meta0 = _Meta.from_bytes(head, 0)
            candidates.append(meta0)
            page_sizes = [meta0.page_size]
        except Error as error:
            errors.append(error)
            page_sizes = [_os_page_size()] + [1 << n for n in range(9, 21)]
        for page_size in dict.fromkeys(page_sizes):
            buf = os.pread(self._fd, PAGE_HEADER_SIZE + META_SIZE, page_size)
            if len(buf) < PAGE_HEADER_SIZE or PAGE_HEADER.unpack_from(buf, 0)[0] != 1:
                continue
            try:
                meta1 = _Meta.from_bytes(buf, 1)
            except Error as error:
                errors.append(error)
                continue
            if meta1.page_size == page_size:
                candidates.append(meta1)
                break
        if not candidates:
            if not errors:
                raise InvalidError("%s: no meta page found" % self.path)
            raise errors[0]
        best = max(candidates, key=lambda meta: meta.txid)
        if best.pgid * best.page_size > size:
            # A sound meta whose pages are missing: the file was cut short.
            # Going back to the other meta would silently undo committed
            # transactions, and the next commit would make that for good.
            raise CorruptionError(
                "%s is truncated: its last transaction (%d) needs %d pages of %d bytes "
                "(%d bytes), the file has %d" % (self.path, best.txid, best.pgid,
                                                 best.page_size, best.pgid * best.page_size, size))
        return best, best.page_size

    def _load_freelist(self):
        meta = self._meta
        if meta.freelist == NO_FREELIST:
            # Go's NoFreelistSync: free pages are those no bucket reaches.
            with self.view() as tx:
                reachable = {0: "meta", 1: "meta"}
                problems = []
                tx._check_bucket(tx.root, b"(root)", reachable, set(), problems, 0)
            if problems:
                raise CorruptionError("cannot rebuild the freelist: " + problems[0])
            return _Freelist(pgid for pgid in range(2, meta.pgid) if pgid not in reachable)
        buf = self._read_span(meta.freelist, meta.pgid)
        self._freelist_overflow = _page_header(buf).overflow
        return _Freelist(_parse_freelist(buf, meta.freelist, meta.pgid))

    # -- pages --------------------------------------------------------------

    def _read_page_header(self, pgid):
        self._check_open()
        buf = os.pread(self._fd, PAGE_HEADER_SIZE, pgid * self.page_size)
        _assert(len(buf) == PAGE_HEADER_SIZE, "page %d: beyond the end of the file", pgid)
        return _page_header(buf)

    def _mapped(self, size):
        """The file, mapped read-only into memory, at least `size` bytes of
        it (mapped anew, whole, once it has grown past the last map).

        Reading a page is then a slice, where a pread was a system call and
        a GIL hand-off; a read-all streams from the map (_leaf_pairs: 100,000
        keys from a fresh open in 124 ms, 170 by pread). A reader keeps the
        map it got while a newer one replaces it.
        """
        mapped = self._map
        if mapped is None or len(mapped) < size:
            with self._cache_lock:
                self._check_open()
                mapped = self._map
                if mapped is None or len(mapped) < size:
                    mapped = self._map = self._map_file()
                    _assert(len(mapped) >= size, "the file ends at %d bytes, before its "
                            "pages do (%d)", len(mapped), size)
        return mapped

    def _map_file(self):
        # From a descriptor of its own, closed at once: the map keeps a
        # duplicate, which must not share the one that holds the flock (the
        # lock would then outlive close()).
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            mine, ours = os.fstat(fd), os.fstat(self._fd)
            if (mine.st_dev, mine.st_ino) != (ours.st_dev, ours.st_ino):
                raise Error("%s was replaced by another file while open" % self.path)
            return mmap.mmap(fd, ours.st_size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    def _read_span(self, pgid, high_water):
        """Page `pgid` with its overflow pages, as bytes."""
        page_size = self.page_size
        start = pgid * page_size
        mapped = self._mapped(min(start + page_size, high_water * page_size))
        _assert(start + page_size <= len(mapped), "page %d: beyond the end of the file", pgid)
        overflow = _page_header(mapped, start).overflow
        if overflow:
            _assert(pgid + overflow < high_water,
                    "page %d: %d overflow pages run past high-water mark %d",
                    pgid, overflow, high_water)
            mapped = self._mapped((pgid + 1 + overflow) * page_size)
        return mapped[start:start + (1 + overflow) * page_size]

    def _read_node(self, pgid, high_water):
        node = self._page_cache.get(pgid)
        if node is not None:
            return node
        _assert(2 <= pgid < high_water, "page %d: out of bounds 2..%d", pgid, high_water)
        node = _parse_node(self._read_span(pgid, high_water), "page %d" % pgid, pgid)
        if not node.overflow:
            self._cache_nodes({pgid: node})
        return node

    def _cache_nodes(self, nodes):
        cache = self._page_cache
        with self._cache_lock:
            cache.update(nodes)
            while len(cache) > self.cache_pages:
                cache.popitem(last=False)

    def _write_pages(self, pages):
        cache = self._page_cache
        page_size = self.page_size
        order = sorted(pages)
        with self._cache_lock:  # (what the cache holds of these pages is stale)
            for pgid in order:
                cache.pop(pgid, None)
                span = len(pages[pgid]) // page_size
                if span > 1:  # (and of the pages it runs over)
                    for covered in range(pgid + 1, pgid + span):
                        cache.pop(covered, None)
        for pgid in order:
            _pwrite_all(self._fd, pages[pgid], pgid * page_size)

    def _write_meta(self, meta):
        _pwrite_all(self._fd, meta.to_page(), (meta.txid % 2) * self.page_size)

    def _sync(self):
        _fdatasync(self._fd)

    def _check_open(self):
        if self._fd < 0:
            raise DatabaseNotOpenError("database %s is closed" % self.path)

    # -- transactions -------------------------------------------------------

    def begin(self, writable=False):
        """Start a transaction; end it with commit() or rollback()."""
        self._check_open()
        if not writable:
            return Tx(self, False)
        if self.readonly:
            raise DatabaseReadOnlyError("%s is open read-only" % self.path)
        self._write_lock.acquire()
        try:
            self._check_open()
            return Tx(self, True)
        except BaseException:
            self._write_lock.release()
            raise

    def update(self):
        """The write transaction, as a context manager (commit or rollback)."""
        return self.begin(True)

    def view(self):
        """A read-only snapshot, as a context manager."""
        return self.begin(False)

    def check(self):
        """Problems with the file's current state; empty when it is sound."""
        with self.view() as tx:
            return tx.check()

    def info(self):
        meta = self._meta
        return {"path": self.path, "page_size": self.page_size, "txid": meta.txid,
                "high_water_mark": meta.pgid, "root": meta.root,
                "freelist": None if meta.freelist == NO_FREELIST else meta.freelist,
                "free_pages": self._freelist.count(), "file_size": os.fstat(self._fd).st_size}

    def close(self):
        """Close the file, waiting for the write transaction to end."""
        if self._fd < 0:
            return
        with self._write_lock:
            fd, self._fd = self._fd, -1
            self._page_cache = collections.OrderedDict()
            self._map = None  # (unmapped once no reader holds it)
            os.close(fd)


def open(path, readonly=False, timeout=None, page_size=None, mode=0o600,  # noqa: A001
         cache_pages=DEFAULT_CACHE_PAGES):
    """Open (or create, unless `readonly`) the bbolt file at `path`.

    The file is locked as bbolt locks it: exclusively for a writer, shared
    for readers. `timeout` is how many seconds to wait for that lock (None:
    wait as long as it takes); then DatabaseLockedError. `page_size` is for a
    new file (default: the OS page size); `cache_pages` bounds the parsed
    pages kept in memory.
    """
    return DB(path, readonly=readonly, timeout=timeout, page_size=page_size, mode=mode,
              cache_pages=cache_pages)


def _os_page_size():
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4096


_fdatasync = getattr(os, "fdatasync", os.fsync)


def _pwrite_all(fd, data, offset):
    """Write all of `data` at `offset`: a short write (a full disk) is
    continued, and one that writes nothing raises ENOSPC, never passes."""
    written = os.pwrite(fd, data, offset)
    if written == len(data):
        return  # (the usual case: no memoryview made)
    view = memoryview(data)
    while written > 0:
        view = view[written:]
        offset += written
        if not view:
            return
        written = os.pwrite(fd, view, offset)
    raise OSError(errno.ENOSPC, "no space left: %d bytes not written at offset %d"
                  % (len(view), offset))


def _create_if_missing(path, page_size, mode):
    """A new file, whole or not at all: its first pages (two metas, a
    freelist, an empty root leaf) are written and synced under a temporary
    name, then linked into place. A full disk leaves no half-made file that
    would be refused ever after."""
    try:
        if os.stat(path).st_size > 0:
            return
        empty = True   # an empty file there (as `touch` makes): replaced
    except FileNotFoundError:
        empty = False
    except OSError as error:
        raise Error("cannot open %s: %s" % (path, error.strerror)) from error
    if not MIN_NEW_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise InvalidError("page size %d: want a power of two in %d..%d"
                           % (page_size, MIN_NEW_PAGE_SIZE, MAX_PAGE_SIZE))
    pages = [_Meta(page_size, 0, 3, 0, 2, NEW_FILE_PAGES, txid).to_page() for txid in (0, 1)]
    pages.append(_Freelist().to_bytes(2, 0, page_size))
    pages.append(_Node.empty_leaf().to_bytes(3, 0, page_size))
    folder = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(folder, ".%s.%d.new" % (os.path.basename(path), os.getpid()))
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0),
                     mode)
    except OSError as error:
        raise Error("cannot create %s: %s" % (path, error.strerror)) from error
    try:
        try:
            _pwrite_all(fd, b"".join(pages), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        if empty:
            os.rename(temporary, path)
        else:
            try:
                os.link(temporary, path)  # (never over a file another process just made)
            except FileExistsError:
                pass
        _sync_folder(folder)
    finally:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass


def _sync_folder(folder):
    """Make a new name in `folder` durable (where the system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# compact: a fresh copy, without the free pages (after Go's `bbolt compact`)
# ---------------------------------------------------------------------------

COMPACT_TX_BYTES = 64 << 20  # keys and values copied per transaction, at most


def compact(src, dst, tx_max_size=COMPACT_TX_BYTES):
    """Copy every bucket, nested bucket, key, value and sequence of the file
    `src` into a new file `dst` (which must not exist, or be empty), its
    pages packed full: a file whose records were deleted gets its space back.
    Commits every `tx_max_size` bytes of keys and values, as Go's does.
    Returns (the size of src, the size of dst), in bytes."""
    if os.path.exists(dst) and os.path.getsize(dst) > 0:
        raise Error("%s exists: compact writes a new file" % dst)
    with open(src, readonly=True, timeout=5) as source, source.view() as rtx:
        with open(dst, page_size=source.page_size) as target:
            state = {"tx": target.begin(writable=True), "size": 0}

            def bucket_at(path):  # (in the transaction under way)
                bucket = state["tx"].bucket(path[0])
                for name in path[1:]:
                    bucket = bucket.bucket(name)
                bucket.fill_percent = 1.0  # (keys come in order: pack pages full)
                return bucket

            def copy(bucket, path):
                for key, value in bucket.items():
                    if state["size"] + len(key) + len(value or b"") > tx_max_size \
                            and state["size"]:
                        state["tx"].commit()
                        state["tx"], state["size"] = target.begin(writable=True), 0
                    state["size"] += len(key) + len(value or b"")
                    if value is None:  # a nested bucket
                        child = bucket.bucket(key)
                        bucket_at(path).create_bucket(key).set_sequence(child.sequence())
                        copy(child, path + [key])
                    else:
                        bucket_at(path).put(key, value)

            try:
                for name in list(rtx.buckets()):
                    top = rtx.bucket(name)
                    state["tx"].create_bucket(name).set_sequence(top.sequence())
                    copy(top, [name])
                state["tx"].commit()
            except BaseException:
                try:
                    state["tx"].rollback()
                except TxClosedError:
                    pass
                raise
    return os.path.getsize(src), os.path.getsize(dst)


# ---------------------------------------------------------------------------
# Command line (after Go's bbolt tool)
# ---------------------------------------------------------------------------

_USAGE = """usage: python bbolt_lite.py COMMAND FILE [BUCKET...] [KEY]
       python bbolt_lite.py --version

commands:
  check   FILE                 check the file's structure; print OK and exit 0 when sound
  info    FILE                 page size, transaction id, high-water mark, freelist
  stats   FILE                 page, key and bucket counts per top-level bucket
  buckets FILE                 top-level bucket names
  keys    FILE BUCKET...       keys of a bucket (name nested buckets in turn)
  get     FILE BUCKET... KEY   the value of KEY, as raw bytes
  dump    FILE [BUCKET...]     every key below, one JSON line each: its value as JSON
                               when it is a JSON object or array, else as text (value_hex
                               when it is not text); `get` gives the bytes
  pages   FILE                 every page: id, type, items, overflow
  compact FILE NEW             write a compacted copy of FILE to NEW (a new file): every
                               bucket, key, value and sequence, the free pages left out

Names and keys are taken as UTF-8 text. The file is opened read-only, with a
shared lock: a running writer makes these commands wait up to 5 seconds.
Exit status: 0 done, 1 check found problems or a name is missing, 2 error."""


def _text(raw):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


def _json_field(record, name, raw):
    text = _text(raw)
    if text is None:
        record[name + "_hex"] = raw.hex()
    else:
        record[name] = text


def _open_path(tx, names):
    bucket = tx.root
    for name in names:
        bucket = bucket.bucket(name.encode())
        if bucket is None:
            raise LookupError("bucket not found: %s" % "/".join(names))
    return bucket


def _json_value(raw):
    """A value that is a JSON object or array, parsed (None if it is not):
    `dump` writes it as JSON, so that jq reads it in one pass."""
    if raw[:1] not in (b"{", b"[") and raw.lstrip()[:1] not in (b"{", b"["):
        return None
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, (dict, list)) else None


def _dump(bucket, path, out):
    for key, value in bucket.items():
        if value is None:
            _dump(bucket.bucket(key), path + [_text(key) or key.hex()], out)
            continue
        record = {"bucket": path}
        _json_field(record, "key", key)
        parsed = _json_value(value)
        if parsed is not None:
            record["value"] = parsed
        else:
            _json_field(record, "value", value)
        out.write(json.dumps(record, ensure_ascii=False) + "\n")


def _pages(db, tx, out):
    kinds = {0: ("meta", 0, 0), 1: ("meta", 0, 0)}
    meta = tx._meta
    if meta.freelist != NO_FREELIST:
        ids = _parse_freelist(db._read_span(meta.freelist, meta.pgid), meta.freelist, meta.pgid)
        kinds[meta.freelist] = ("freelist", len(ids), db._read_page_header(meta.freelist).overflow)
        for pgid in ids:
            kinds.setdefault(pgid, ("free", 0, 0))
    stack = [tx.root]
    while stack:
        bucket = stack.pop()
        if bucket._root == 0:
            continue
        nodes = [bucket._root]
        while nodes:
            node = db._read_node(nodes.pop(), meta.pgid)
            kinds[node.pgid] = ("leaf" if node.is_leaf else "branch", len(node.keys),
                                node.overflow)
            if not node.is_leaf:
                nodes.extend(node.pgids)
                continue
            for i, key in enumerate(node.keys):
                if node.flags[i] & BUCKET_LEAF_FLAG:
                    stack.append(bucket._open_child(node.values[i], key))
    out.write("ID       TYPE       ITEMS  OVRFLW\n")
    out.write("======== ========== ====== ======\n")
    pgid = 0
    while pgid < meta.pgid:
        kind, items, overflow = kinds.get(pgid, ("unknown", 0, 0))
        out.write("%-8d %-10s %-6d %-6d\n" % (pgid, kind, items, overflow))
        pgid += overflow + 1


def _compact_command(rest):
    if len(rest) != 2:
        sys.stderr.write("bbolt_lite: wrong arguments for compact\n\n%s\n" % _USAGE)
        return 2
    src, dst = rest
    if not os.path.exists(src):
        sys.stderr.write("bbolt_lite: %s: no such file\n" % src)
        return 2
    try:
        before, after = compact(src, dst)
    except Error as error:
        sys.stderr.write("bbolt_lite: compact %s: %s\n" % (src, error))
        return 2
    except OSError as error:
        sys.stderr.write("bbolt_lite: compact %s: %s\n" % (src, error.strerror or error))
        return 2
    sys.stdout.write("%d -> %d bytes (gain=%.2fx)\n" % (before, after, before / max(after, 1)))
    return 0


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_USAGE)
        return 0 if args else 2
    if args == ["--version"]:
        print("bbolt_lite.py " + __version__)
        return 0
    command, rest = args[0], args[1:]
    if command == "compact":
        return _compact_command(rest)
    needs = {"check": 0, "info": 0, "stats": 0, "buckets": 0, "keys": 1, "get": 2,
             "dump": 0, "pages": 0}
    if command not in needs:
        sys.stderr.write("bbolt_lite: unknown command %r\n\n%s\n" % (command, _USAGE))
        return 2
    if not rest or len(rest) - 1 < needs[command] or (
            command in ("check", "info", "stats", "buckets", "pages") and len(rest) > 1):
        sys.stderr.write("bbolt_lite: wrong arguments for %s\n\n%s\n" % (command, _USAGE))
        return 2
    path, names = rest[0], rest[1:]
    if not os.path.exists(path):
        sys.stderr.write("bbolt_lite: %s: no such file\n" % path)
        return 2
    out = sys.stdout
    try:
        with open(path, readonly=True, timeout=5) as db, db.view() as tx:
            if command == "check":
                problems = tx.check()
                for problem in problems:
                    out.write(problem + "\n")
                if problems:
                    out.write("%d problems found\n" % len(problems))
                    return 1
                out.write("OK\n")
            elif command == "info":
                for key, value in db.info().items():
                    out.write("%s: %s\n" % (key.replace("_", " ").capitalize(), value))
            elif command == "stats":
                for name in tx.buckets():
                    stats = tx.bucket(name).stats()
                    out.write("%s: %s\n" % (_text(name) or name.hex(), " ".join(
                        "%s=%d" % item for item in stats.items())))
            elif command == "buckets":
                for name in tx.buckets():
                    out.write((_text(name) or name.hex()) + "\n")
            elif command == "keys":
                for key, _value in _open_path(tx, names).items():
                    out.write((_text(key) or key.hex()) + "\n")
            elif command == "get":
                value = _open_path(tx, names[:-1]).get(names[-1].encode())
                if value is None:
                    sys.stderr.write("bbolt_lite: key not found: %s\n" % names[-1])
                    return 1
                out.flush()
                sys.stdout.buffer.write(value)
                sys.stdout.buffer.flush()
            elif command == "dump":
                _dump(_open_path(tx, names), list(names), out)
            elif command == "pages":
                _pages(db, tx, out)
    except LookupError as error:
        sys.stderr.write("bbolt_lite: %s\n" % error.args[0])
        return 1
    except Error as error:
        sys.stderr.write("bbolt_lite: %s: %s\n" % (path, error))
        return 2
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
