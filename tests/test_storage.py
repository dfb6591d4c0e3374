"""LevelDBStorage against MemoryStorage (its model), and the LevelDB key layout.

Both have two rooms (zraft.node.interfaces): ``log`` (the Raft log and hard state) and
``state`` (the state machine's data, sessions, applied index, snapshots and staging), plus the
writes that span them (``install_snapshot``, ``compact``). The stateful test drives both
stores through random sequences of what a node does to them (append, suffix replacement,
hard-state changes, applied batches, compaction, restarts) and checks after every step that
the LevelDB store reads back exactly what the model holds.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import zlib

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from zraft.node.interfaces import LogState
from zraft.node.leveldb import LevelDBStorage
from zraft.node.memory import MemoryStorage
from zraft.node.statemachine import SessionRecord
from zraft.raft.core import HardState
from zraft.raft.messages import Entry

U64 = struct.Struct(">Q")


def unseal(key: bytes, value: bytes) -> bytes:
    """A stored value's payload, its CRC-32 (over key and payload) checked: format 4's seal."""
    assert int.from_bytes(value[:4], "big") == zlib.crc32(value[4:], zlib.crc32(key)), key
    return value[4:]
# The many-example tests put their databases on tmpfs when there is one: sync=True writes
# cost nothing there, so the run time does not depend on the disk (or on who else fsyncs).
FAST_TMP = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

# A small key space, with keys that look like the storage's own prefixes (m/ l/ d/ s/) and keys.
KEYS = (
    b"", b"a", b"ab", b"m/", b"m/applied", b"m/hardstate", b"l/", b"l/\x00",
    b"d/", b"d/a", b"s/", b"s/\x00", b"\x00", b"\xff",
)
META_KEYS = {b"m/format", b"m/hardstate", b"m/logstart", b"m/applied"}
DATA0, SESSION0 = b"d" + bytes(4), b"s" + bytes(4)  # generation 0 of the state machine

keys = st.sampled_from(KEYS)
values = st.binary(max_size=6)  # includes b""
updates_st = st.dictionaries(keys, st.none() | values, max_size=6)
hard_states = st.builds(
    HardState,
    st.integers(0, 10) | st.integers(0, 2**40),
    st.none() | st.integers(1, 7),
)
session_results = st.one_of(
    st.just({}),
    st.builds(lambda d: {"deleted": d}, st.booleans()),
    st.builds(lambda s, v: {"swapped": s, "value": v}, st.booleans(), st.none() | values),
)
session_records = st.builds(SessionRecord, st.integers(1, 2**40), session_results, st.integers(1, 2**40))
sessions_st = st.none() | st.dictionaries(
    st.sampled_from([1, 2, 3, 255, 256, 2**63 - 1]), st.none() | session_records, max_size=4
)
term_steps = st.integers(0, 2) | st.just(2**32)  # non-negative: terms never decrease along the log
payloads = st.just(b"") | st.binary(max_size=10)


def draw_entries(data: st.DataObject, start: int, prev_term: int, min_size: int) -> list[Entry]:
    """Entries start, start+1, ... with terms that never go below prev_term nor decrease."""
    n = data.draw(st.integers(min_size, 5), label="n_entries")
    entries = []
    term = prev_term
    for i in range(n):
        term = max(term + data.draw(term_steps, label="term_step"), 1)
        entries.append(Entry(term, start + i, data.draw(payloads, label="data")))
    return entries


def assert_same(db: LevelDBStorage, model: MemoryStorage) -> None:
    assert db.log.load_hard_state() == model.log.load_hard_state()
    log = db.log.load_log()
    expected = model.log.load_log()
    assert (log.snapshot_index, log.snapshot_term) == (expected.snapshot_index, expected.snapshot_term)
    assert log.entries == expected.entries
    start = log.snapshot_index + 1
    assert [e.index for e in log.entries] == list(range(start, start + len(log.entries)))
    assert all(type(e.data) is bytes for e in log.entries)
    assert db.log.last_index == model.log.last_index == expected.snapshot_index + len(expected.entries)
    assert db.log.snapshot_index == model.log.snapshot_index
    assert db.state.applied_index == model.state.applied_index
    for k in KEYS:
        assert db.state.get(k) == model.state.get(k), k
    assert db.state.items() == model.state.items()
    assert db.state.load_sessions() == model.state.load_sessions()


def raw_keys(db: LevelDBStorage) -> list[bytes]:
    with db.db.iterator(include_value=False) as it:
        return list(it)


class StorageComparison(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="zraft-test-storage-", dir=FAST_TMP)
        self.db = LevelDBStorage(self.dir)
        self.model = MemoryStorage()

    def term_at(self, index: int) -> int:
        log = self.model.log
        return log.snap_term if index == log.snap_index else log.entries[index - log.snap_index - 1].term

    @rule(hard_state=st.none() | hard_states, data=st.data())
    def append(self, hard_state: HardState | None, data: st.DataObject) -> None:
        last = self.model.log.last_index
        entries = draw_entries(data, last + 1, self.term_at(last), min_size=0)
        self.db.log.save(hard_state, entries)
        self.model.log.save(hard_state, entries)

    @rule(hard_state=st.none() | hard_states, data=st.data())
    def replace_suffix(self, hard_state: HardState | None, data: st.DataObject) -> None:
        start = data.draw(st.integers(self.model.log.snapshot_index + 1, self.model.log.last_index + 1), label="start")
        entries = draw_entries(data, start, self.term_at(start - 1), min_size=1)
        self.db.log.save(hard_state, entries)
        self.model.log.save(hard_state, entries)

    @rule(hard_state=st.none() | hard_states)
    def hard_state_only(self, hard_state: HardState | None) -> None:
        self.db.log.save(hard_state, [])
        self.model.log.save(hard_state, [])

    @rule(updates=updates_st, step=st.integers(1, 3) | st.just(2**32), sessions=sessions_st)
    def write(self, updates: dict[bytes, bytes | None], step: int, sessions) -> None:
        applied = self.model.state.applied_index + step
        if sessions is None:
            self.db.state.write(dict(updates), applied)
            self.model.state.write(dict(updates), applied)
        else:
            self.db.state.write(dict(updates), applied, dict(sessions))
            self.model.state.write(dict(updates), applied, dict(sessions))

    @rule(data=st.data())
    def compact(self, data: st.DataObject) -> None:
        """Drop the log up to an applied index (the state machine covers it)."""
        top = min(self.model.state.applied_index, self.model.log.last_index)
        if top <= self.model.log.snapshot_index:
            return
        index = data.draw(st.integers(self.model.log.snapshot_index + 1, top), label="compact_to")
        term = self.term_at(index)
        self.db.compact(index, term)
        self.model.compact(index, term)

    @rule()
    def reopen(self) -> None:
        self.db.close()
        self.db = LevelDBStorage(self.dir)

    @invariant()
    def same_as_model(self) -> None:
        assert_same(self.db, self.model)

    @invariant()
    def raw_layout(self) -> None:
        log_keys, data_keys, session_keys = [], [], []
        for k in raw_keys(self.db):
            if k.startswith(b"l/"):
                log_keys.append(k)
            elif k.startswith(DATA0):
                data_keys.append(k[len(DATA0):])
            elif k.startswith(SESSION0):
                session_keys.append(k)
            else:
                assert k in META_KEYS, k
        assert log_keys == [b"l/" + U64.pack(e.index) for e in self.model.log.entries]
        assert data_keys == [k for k, _ in self.model.state.items()]
        assert session_keys == [SESSION0 + U64.pack(c) for c in sorted(self.model.state.sessions)]

    def teardown(self) -> None:
        try:
            self.db.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


StorageComparison.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStorageComparison = StorageComparison.TestCase


# --- plain unit tests ---------------------------------------------------------------------


@pytest.fixture(params=["leveldb", "memory"])
def store(request, tmp_path):
    s = LevelDBStorage(tmp_path / "db") if request.param == "leveldb" else MemoryStorage()
    yield s
    s.close()


def test_empty_store_defaults(store) -> None:
    assert store.log.load_hard_state() == HardState(0, None)
    assert store.log.load_log() == LogState(0, 0, [])
    assert store.log.last_index == 0
    assert store.state.applied_index == 0
    for k in KEYS:
        assert store.state.get(k) is None
    assert store.state.items() == []
    assert store.state.load_sessions() == {}


def test_empty_save_changes_nothing(store) -> None:
    store.log.save(None, [])
    assert store.log.load_hard_state() == HardState()
    assert store.log.load_log().entries == []
    assert store.log.last_index == 0


def test_empty_leveldb_store_writes_only_its_format(tmp_path) -> None:
    s = LevelDBStorage(tmp_path / "db")
    s.log.save(None, [])
    assert raw_keys(s) == [b"m/format"]
    s.close()
    s = LevelDBStorage(tmp_path / "db")
    assert (s.log.last_index, s.state.applied_index, s.log.load_hard_state()) == (0, 0, HardState())
    s.close()


def test_save_truncates_longer_suffix(store) -> None:
    store.log.save(HardState(1, 1), [Entry(1, i, b"old%d" % i) for i in range(1, 8)])
    store.log.save(HardState(2, None), [Entry(2, 4, b"new4"), Entry(2, 5, b"new5")])
    assert store.log.last_index == 5
    assert store.log.load_hard_state() == HardState(2, None)
    assert store.log.load_log().entries == [
        Entry(1, 1, b"old1"),
        Entry(1, 2, b"old2"),
        Entry(1, 3, b"old3"),
        Entry(2, 4, b"new4"),
        Entry(2, 5, b"new5"),
    ]
    # Replacing from the very first index drops everything.
    store.log.save(None, [Entry(3, 1, b"")])
    assert store.log.last_index == 1
    assert store.log.load_log().entries == [Entry(3, 1, b"")]
    assert store.log.load_hard_state() == HardState(2, None)


def test_reopened_store_keeps_everything(tmp_path) -> None:
    path = tmp_path / "db"
    s = LevelDBStorage(path)
    entries = [Entry(1, 1, b""), Entry(1, 2, b"\x00cmd"), Entry(3, 3, b"x" * 1000)]
    s.log.save(HardState(3, 2), entries)
    s.state.write({b"k1": b"v1", b"k2": b"", b"gone": b"soon"}, 2)
    s.state.write({b"gone": None, b"k3": b"\xff"}, 3, {9: SessionRecord(4, {"swapped": False, "value": b"v1"}, 3)})
    s.close()

    s = LevelDBStorage(path)
    assert s.log.load_hard_state() == HardState(3, 2)
    assert s.log.load_log() == LogState(0, 0, entries)
    assert s.log.last_index == 3
    assert s.state.applied_index == 3
    assert s.state.get(b"k1") == b"v1"
    assert s.state.get(b"k2") == b""
    assert s.state.get(b"gone") is None
    assert s.state.items() == [(b"k1", b"v1"), (b"k2", b""), (b"k3", b"\xff")]
    assert s.state.load_sessions() == {9: SessionRecord(4, {"swapped": False, "value": b"v1"}, 3)}

    # It keeps working after the reopen: a truncation and a vote with no candidate.
    s.log.save(HardState(4, None), [Entry(4, 2, b"y")])
    s.close()
    s = LevelDBStorage(path)
    assert s.log.load_hard_state() == HardState(4, None)
    assert s.log.load_log().entries == [Entry(1, 1, b""), Entry(4, 2, b"y")]
    assert s.log.last_index == 2
    assert s.state.applied_index == 3
    s.close()


ALL_BYTES = bytes(range(256))
BINARY_ITEMS = (
    [(bytes([b]), bytes([255 - b]) * (b % 4)) for b in range(256)]  # every single-byte key; b"" values too
    + [
        (b"", ALL_BYTES),
        (ALL_BYTES, b""),
        (b"m/hardstate", b"\x93\x01\x02"),  # looks like a msgpack hard state
        (b"m/applied", U64.pack(99)),
        (b"m/logstart", b"\x92\x05\x05"),
        (b"m/", b"m"),
        (b"l/", b"l"),
        (b"l/" + U64.pack(1), U64.pack(7) + b"fake entry"),
        (b"l/" + U64.pack(2**40), U64.pack(7)),
        (b"d/", b"d"),
        (b"d/d/", b"dd"),
        (b"s/", b"s"),
        (b"s/" + U64.pack(1), b"\x93\x01\x80\x01"),  # looks like a stored session
        (b"\x00\x00", b"\x00"),
        (b"\xff\xff\xff", b"\xff"),
    ]
)


def check_binary_items(s) -> None:
    for k, v in BINARY_ITEMS:
        assert s.state.get(k) == v, k
    assert s.state.get(b"m/nothing") is None
    assert s.state.get(b"\x00\x00\x00") is None
    assert s.state.items() == sorted(BINARY_ITEMS)
    # Data keys that look like internal keys leave the raft state alone.
    assert s.log.load_hard_state() == HardState(5, 3)
    assert s.log.load_log() == LogState(0, 0, [Entry(5, 1, ALL_BYTES), Entry(5, 2, b"")])
    assert s.log.last_index == 2
    assert s.state.applied_index == 2
    assert s.state.load_sessions() == {}


def test_binary_keys_and_values(store) -> None:
    store.log.save(HardState(5, 3), [Entry(5, 1, ALL_BYTES), Entry(5, 2, b"")])
    store.state.write(dict(BINARY_ITEMS), 2)
    check_binary_items(store)


def test_binary_keys_and_values_survive_reopen(tmp_path) -> None:
    s = LevelDBStorage(tmp_path / "db")
    s.log.save(HardState(5, 3), [Entry(5, 1, ALL_BYTES), Entry(5, 2, b"")])
    s.state.write(dict(BINARY_ITEMS), 2)
    s.close()
    s = LevelDBStorage(tmp_path / "db")
    try:
        check_binary_items(s)
        s.state.write({k: None for k, _ in BINARY_ITEMS}, 3)
        assert s.state.items() == []
        assert raw_keys(s) == [b"l/" + U64.pack(1), b"l/" + U64.pack(2), b"m/applied", b"m/format",
                               b"m/hardstate"]
    finally:
        s.close()


BOUNDARIES = [1, 2, 255, 256, 257, 2**16 - 1, 2**16, 2**16 + 1, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 3]


def test_log_keys_sort_numerically_beyond_byte_boundaries(tmp_path) -> None:
    """Log keys are 8-byte big-endian: their byte order is the index order, so load_log and
    the last index found on open (a reverse scan) are right across 2**8, 2**16 and 2**32."""
    path = tmp_path / "db"
    s = LevelDBStorage(path)
    # One save (it only deletes the range it replaces, so sparse indexes are fine here).
    entries = [Entry(i % 1000 + 1, i, b"e%d" % i) for i in BOUNDARIES]
    s.log.save(None, entries)
    assert s.log.last_index == 2**40 + 3
    for i in BOUNDARIES:
        key = b"l/" + i.to_bytes(8, "big")
        assert unseal(key, s.db.get(key)) == U64.pack(i % 1000 + 1) + b"\x00" + b"e%d" % i  # type 0
    assert s.log.load_log().entries == entries
    s.close()

    s = LevelDBStorage(path)
    assert s.log.last_index == 2**40 + 3
    assert [e.index for e in s.log.load_log().entries] == BOUNDARIES
    s.close()


@pytest.mark.parametrize("base", [2**8, 2**16, 2**32])
def test_truncation_across_a_byte_boundary(tmp_path, base) -> None:
    path = tmp_path / "db"
    s = LevelDBStorage(path)
    # A contiguous run base-3 .. base+3 (the storage does not care where the log starts).
    first = [Entry(7, i, b"a%d" % i) for i in range(base - 3, base + 4)]
    s.log.save(HardState(7, 1), first)
    assert s.log.last_index == base + 3
    # Replace from base-1: base-1 .. base+3 go, base-1 .. base come in.
    second = [Entry(8, base - 1, b"b1"), Entry(8, base, b"b2")]
    s.log.save(HardState(8, 2), second)
    assert s.log.last_index == base
    expected = first[:2] + second
    assert s.log.load_log().entries == expected
    s.close()

    s = LevelDBStorage(path)
    assert s.log.last_index == base
    assert s.log.load_log().entries == expected
    assert s.log.load_hard_state() == HardState(8, 2)
    # Append across the boundary again after the reopen.
    s.log.save(None, [Entry(8, base + 1, b"c")])
    assert [e.index for e in s.log.load_log().entries] == list(range(base - 3, base + 2))
    s.close()


def test_applied_index_and_term_are_big_endian_u64(tmp_path) -> None:
    s = LevelDBStorage(tmp_path / "db")
    s.state.write({}, 2**32 + 5, applied_term=7)
    assert unseal(b"m/applied", s.db.get(b"m/applied")) == (2**32 + 5).to_bytes(8, "big") + (7).to_bytes(8, "big")
    s.close()
    s = LevelDBStorage(tmp_path / "db")
    assert (s.state.applied_index, s.state.applied_term) == (2**32 + 5, 7)
    assert s.state.items() == []
    s.close()


# --- compaction, staged snapshots, generations -----------------------------------------------

from zraft.node.leveldb import StorageError, restore_into  # noqa: E402
from zraft.node.statemachine import REC_DATA, REC_SESSION, decode_chunk  # noqa: E402
from zraft.raft.core import SnapshotMeta  # noqa: E402


def chunk(*records: tuple[int, bytes, bytes]) -> bytes:
    import msgpack

    return msgpack.packb([x for r in records for x in r], use_bin_type=True)


def filled(tmp_path, n_entries: int = 10, applied: int = 6) -> LevelDBStorage:
    s = LevelDBStorage(tmp_path / "db")
    s.log.save(HardState(2, 1), [Entry(1 if i <= 4 else 2, i, b"e%d" % i) for i in range(1, n_entries + 1)])
    s.state.write({b"a": b"1", b"b": b"2"}, applied, {7: SessionRecord(3, {}, applied)}, applied_term=2)
    return s


def test_compact_drops_the_prefix_keeps_the_tail_and_survives_reopen(tmp_path) -> None:
    s = filled(tmp_path)
    s.compact(5, 2)
    assert s.log.load_log() == LogState(5, 2, [Entry(2, i, b"e%d" % i) for i in range(6, 11)])
    assert [k for k in raw_keys(s) if k.startswith(b"l/")] == [b"l/" + U64.pack(i) for i in range(6, 11)]
    s.close()
    s = LevelDBStorage(tmp_path / "db")
    assert (s.log.snapshot_index, s.log.last_index) == (5, 10)
    assert s.log.load_log().entries[0] == Entry(2, 6, b"e6")
    s.compact(3, 1)  # behind the current start: nothing happens
    assert s.log.snapshot_index == 5
    with pytest.raises(ValueError, match="past the applied index"):
        s.compact(7, 2)
    s.close()


def test_snapshot_view_is_a_point_in_time_copy(tmp_path) -> None:
    s = filled(tmp_path)
    view = s.state.open_snapshot()
    s.state.write({b"a": None, b"c": b"3"}, 7, applied_term=2)  # after the view was taken
    records = [r for c in view.chunks(chunk_bytes=1) for r in decode_chunk(c)]
    view.close()
    assert (view.index, view.term) == (6, 2)
    assert records == [(REC_DATA, b"a", b"1"), (REC_DATA, b"b", b"2"),
                       (REC_SESSION, U64.pack(7), records[2][2])]
    assert s.state.items() == [(b"b", b"2"), (b"c", b"3")]
    s.close()


@pytest.mark.parametrize("reset_log", [True, False])
def test_install_staged_replaces_the_state_and_moves_the_log_start(tmp_path, reset_log: bool) -> None:
    s = filled(tmp_path)
    s.state.begin_staging()
    s.state.stage(chunk((REC_DATA, b"x", b"from-leader"), (REC_DATA, b"y", b"")))
    s.state.stage(chunk((REC_SESSION, U64.pack(9), b"\x93\x05\x80\x08")))
    # Until the install, the live state is untouched.
    assert s.state.items() == [(b"a", b"1"), (b"b", b"2")]
    s.install_snapshot(SnapshotMeta(8, 2, reset_log), None, [])
    assert s.state.items() == [(b"x", b"from-leader"), (b"y", b"")]
    assert (s.state.applied_index, s.state.applied_term) == (8, 2)
    assert s.state.load_sessions() == {9: SessionRecord(5, {}, 8)}
    expect_tail = [] if reset_log else [Entry(2, 9, b"e9"), Entry(2, 10, b"e10")]
    assert s.log.load_log() == LogState(8, 2, expect_tail)
    assert s.log.last_index == (8 if reset_log else 10)
    # The old generation is garbage, collected a bounded batch at a time.
    assert s.state.has_garbage
    while s.state.has_garbage:
        assert s.state.collect_garbage(max_keys=1) <= 1
    assert not [k for k in raw_keys(s) if k[:1] in (b"d", b"s") and k[1:5] == bytes(4)]
    s.close()
    s = LevelDBStorage(tmp_path / "db")
    assert s.state.items() == [(b"x", b"from-leader"), (b"y", b"")]
    assert s.log.load_log() == LogState(8, 2, expect_tail) and not s.state.has_garbage
    s.close()


def test_a_crash_while_staging_leaves_the_old_state_whole(tmp_path) -> None:
    s = filled(tmp_path)
    s.state.begin_staging()
    s.state.stage(chunk(*[(REC_DATA, b"k%d" % i, b"v") for i in range(50)]))
    s.close()  # the process dies before the install
    s = LevelDBStorage(tmp_path / "db")
    assert s.state.items() == [(b"a", b"1"), (b"b", b"2")]
    assert s.state.applied_index == 6 and s.log.load_log().snapshot_index == 0
    assert s.state.has_garbage  # the half-staged generation
    s.state.collect_garbage(max_keys=10_000)
    assert [k for k in raw_keys(s) if k.startswith(b"d")] == [b"d" + bytes(4) + b"a", b"d" + bytes(4) + b"b"]
    # A new stream starts over cleanly.
    s.state.begin_staging()
    s.state.stage(chunk((REC_DATA, b"only", b"this")))
    s.install_snapshot(SnapshotMeta(9, 2, True), None, [])
    assert s.state.items() == [(b"only", b"this")]
    s.close()


def test_discarded_staging_is_collected_and_the_live_state_stays(tmp_path) -> None:
    s = filled(tmp_path)
    s.state.begin_staging()
    s.state.stage(chunk((REC_DATA, b"nope", b"x")))
    s.state.discard_staged()
    s.state.collect_garbage()
    assert s.state.items() == [(b"a", b"1"), (b"b", b"2")]
    assert not [k for k in raw_keys(s) if k.startswith(b"d" + U32(1))]
    s.close()


def U32(n: int) -> bytes:
    return n.to_bytes(4, "big")


@pytest.mark.parametrize("bad", [b"\xc1", chunk((REC_DATA, b"k")), chunk((5, b"k", b"v")),
                                 chunk((REC_SESSION, b"short", b"v")), b"\x93\x00\xa1k\xa1v"])
def test_malformed_chunks_are_refused(bad: bytes) -> None:
    with pytest.raises(ValueError):
        decode_chunk(bad)


def test_restore_into_a_fresh_dir_and_never_over_an_existing_one(tmp_path) -> None:
    n = restore_into(tmp_path / "db", 40, 3, iter([chunk((REC_DATA, b"k", b"v"), (REC_SESSION, U64.pack(1),
                                                                                    b"\x93\x01\x80\x28"))]))
    assert n == 2
    s = LevelDBStorage(tmp_path / "db")
    assert (s.state.applied_index, s.state.applied_term, s.log.snapshot_index) == (40, 3, 40)
    assert s.log.load_hard_state() == HardState(3, None)
    assert s.state.items() == [(b"k", b"v")] and s.state.load_sessions() == {1: SessionRecord(1, {}, 40)}
    s.close()
    with pytest.raises(StorageError, match="not empty"):
        restore_into(tmp_path / "db", 1, 1, iter([]))


def test_a_database_of_another_layout_is_refused(tmp_path) -> None:
    import plyvel

    db = plyvel.DB(str(tmp_path / "old"), create_if_missing=True)
    db.put(b"d/key", b"value")  # what zraft 0.1 wrote, with no m/format
    db.close()
    with pytest.raises(StorageError, match="older zraft"):
        LevelDBStorage(tmp_path / "old")
    db = plyvel.DB(str(tmp_path / "new"), create_if_missing=True)
    db.put(b"m/format", b"99")
    db.close()
    with pytest.raises(StorageError, match="format"):
        LevelDBStorage(tmp_path / "new")


def test_entry_types_are_stored_and_read_back(tmp_path) -> None:
    from zraft.raft.messages import EntryType

    s = LevelDBStorage(tmp_path / "db")
    entries = [Entry(1, 1, b"cmd"), Entry(1, 2, b"members", EntryType.CONFIG), Entry(2, 3, b"")]
    s.log.save(HardState(2, None), entries)
    s.close()
    s = LevelDBStorage(tmp_path / "db")
    assert s.log.load_log().entries == entries
    assert [e.type for e in s.log.load_log().entries] == [EntryType.NORMAL, EntryType.CONFIG, EntryType.NORMAL]
    s.close()


def test_a_format_2_database_is_upgraded_in_place(tmp_path) -> None:
    """Format 2 stored log records without their type byte; opening it upgrades them, atomically."""
    import plyvel

    db = plyvel.DB(str(tmp_path / "db"), create_if_missing=True)
    db.put(b"m/format", b"2")
    db.put(b"m/hardstate", __import__("msgpack").packb([3, 2]))
    for i, (term, data) in enumerate([(1, b"a"), (3, b""), (3, b"\x01\x02")], start=1):
        db.put(b"l/" + U64.pack(i), U64.pack(term) + data)
    db.put(b"d" + bytes(4) + b"k", b"v")
    db.close()
    s = LevelDBStorage(tmp_path / "db")
    assert s.log.load_log().entries == [Entry(1, 1, b"a"), Entry(3, 2, b""), Entry(3, 3, b"\x01\x02")]
    assert s.log.load_hard_state() == HardState(3, 2) and s.state.get(b"k") == b"v"
    assert s.db.get(b"m/format") == b"4"
    s.check()
    s.close()
    s = LevelDBStorage(tmp_path / "db")  # a second open reads format 4 as it is
    assert s.log.load_log().entries[2] == Entry(3, 3, b"\x01\x02")
    s.close()


def test_a_new_stream_stages_beside_an_abandoned_one_without_deleting_it_first(tmp_path) -> None:
    """Staging never stalls the loop: a stream that begins while an earlier one's staged keys are
    still there stages into a fresh generation; the old keys go to the bounded collector."""
    s = filled(tmp_path)
    s.state.begin_staging()
    s.state.stage(chunk(*[(REC_DATA, b"old%05d" % i, b"v") for i in range(3000)]))
    s.state.begin_staging()  # the first stream was abandoned: a new one begins
    old = [k for k in raw_keys(s) if k.startswith(b"d" + U32(1))]
    assert len(old) == 3000, "begin_staging deleted the old stream's keys itself"
    s.state.stage(chunk((REC_DATA, b"new", b"n")))
    rounds = 0
    while s.state.has_garbage:
        assert s.state.collect_garbage(max_keys=1000) <= 1000
        rounds += 1
    assert rounds >= 3 and not [k for k in raw_keys(s) if k.startswith(b"d" + U32(1))]
    s.install_snapshot(SnapshotMeta(8, 2, True), None, [])
    assert s.state.items() == [(b"new", b"n")]
    s.close()
    s = LevelDBStorage(tmp_path / "db")  # and a restart finds the newest generation live
    assert s.state.items() == [(b"new", b"n")]
    s.close()


def test_install_snapshot_writes_the_readys_hard_state_and_entries_in_the_same_batch(tmp_path) -> None:
    """One synced batch: the staged state, the log's new start, the Ready's hard state and entries.
    A crash can never leave the snapshot installed under a term older than its own."""
    s = filled(tmp_path)
    s.state.begin_staging()
    s.state.stage(chunk((REC_DATA, b"x", b"1")))
    batches: list[list[bytes]] = []
    db = s.db
    real = db.write_batch

    class Recording:
        def __init__(self, **kw: object) -> None:
            self.kw, self.wb, self.keys = kw, real(**kw), []

        def put(self, k: bytes, v: bytes) -> None:
            self.keys.append(k)
            self.wb.put(k, v)

        def delete(self, k: bytes) -> None:
            self.keys.append(k)
            self.wb.delete(k)

        def __enter__(self) -> Recording:
            return self

        def __exit__(self, *exc: object) -> None:
            self.wb.__exit__(*exc)
            if self.kw.get("sync"):
                batches.append(self.keys)

    class RecordingDB:  # (a plyvel DB's methods can't be patched: wrap it)
        write_batch = Recording

        def __getattr__(self, name: str) -> object:
            return getattr(db, name)

    s.db = RecordingDB()  # type: ignore[assignment]
    s.install_snapshot(SnapshotMeta(12, 5, True), HardState(6, None), [Entry(6, 13, b"next")])
    s.db = db
    assert len(batches) == 1
    assert {b"m/gen", b"m/applied", b"m/logstart", b"m/hardstate", b"l/" + U64.pack(13)} <= set(batches[0])
    s.close()
    s = LevelDBStorage(tmp_path / "db")
    assert s.log.load_hard_state() == HardState(6, None)
    assert s.log.load_log() == LogState(12, 5, [Entry(6, 13, b"next")])
    assert (s.state.applied_index, s.state.items()) == (12, [(b"x", b"1")])
    s.close()
