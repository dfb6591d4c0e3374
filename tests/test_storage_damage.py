"""Damage in a node's database is found, named, and never used (storage format 4).

Every record is sealed with a CRC-32 over its key and payload; LevelDB's own block checksums are
verified on reads; a node's start checks the log's continuity, the hard state and the applied
index against the log, and the durable mark. These tests damage a database directly (raw LevelDB
writes, bytes flipped in its files) and check that what comes back is a DamageError naming the
problem, never a wrong value.
"""

from __future__ import annotations

import glob
import json
import os
import struct

import msgpack
import plyvel
import pytest

from zraft.node.leveldb import DAMAGED_FILE, MARK_FILE, DamageError, LevelDBStorage, StorageError
from zraft.node.statemachine import SessionRecord
from zraft.raft.core import HardState
from zraft.raft.messages import Entry

U64 = struct.Struct(">Q")
DATA0 = b"d" + bytes(4)


def filled(path, n: int = 20) -> LevelDBStorage:
    s = LevelDBStorage(path)
    s.log.save(HardState(3, 1), [Entry(1 + i // 10, i + 1, b"cmd%d" % i) for i in range(n)])
    s.state.write({b"k%d" % i: b"v%d" % i for i in range(n)}, n, {7: SessionRecord(1, {}, n)}, applied_term=2)
    return s


def raw_flip(s: LevelDBStorage, key: bytes, at: int = -1) -> None:
    """Flip one bit of the stored value of ``key`` (a raw write: the seal is not recomputed)."""
    v = bytearray(s.db.get(key))
    v[at] ^= 0x01
    s.db.put(key, bytes(v))


def test_a_value_that_fails_its_checksum_is_never_served(tmp_path) -> None:
    s = filled(tmp_path / "db")
    raw_flip(s, DATA0 + b"k5")
    assert s.state.get(b"k4") == b"v4"
    with pytest.raises(DamageError, match=r"key b'k5'.*checksum"):
        s.state.get(b"k5")
    with pytest.raises(DamageError):
        s.state.items()
    view = s.state.open_snapshot()
    with pytest.raises(DamageError):  # nor sent to a follower, nor written into a backup
        list(view.chunks(1 << 20))
    view.close()
    s.close()


def test_a_value_found_under_another_key_fails_its_checksum(tmp_path) -> None:
    """The key is inside the checksum: a record that LevelDB returns for the wrong key is caught."""
    s = filled(tmp_path / "db")
    s.db.put(DATA0 + b"k1", s.db.get(DATA0 + b"k2"))
    with pytest.raises(DamageError, match="k1"):
        s.state.get(b"k1")
    s.close()


def test_a_damaged_log_record_or_session_or_metadata_is_refused(tmp_path) -> None:
    s = filled(tmp_path / "db")
    raw_flip(s, b"l/" + U64.pack(7), at=6)  # inside the term
    with pytest.raises(DamageError, match="log entry 7"):
        s.log.load_log()
    raw_flip(s, b"s" + bytes(4) + U64.pack(7))
    with pytest.raises(DamageError, match="session"):
        s.state.load_sessions()
    raw_flip(s, b"m/hardstate")
    with pytest.raises(DamageError, match="m/hardstate"):
        s.log.load_hard_state()
    raw_flip(s, b"m/applied")
    s.close()
    with pytest.raises(DamageError, match=r"is damaged: .*m/applied.*backup"):
        LevelDBStorage(tmp_path / "db")  # the applied index is read at open


def test_a_record_too_short_to_hold_its_checksum_is_refused(tmp_path) -> None:
    s = filled(tmp_path / "db")
    s.db.put(DATA0 + b"k3", b"\x00")
    with pytest.raises(DamageError):
        s.state.get(b"k3")
    s.close()


def test_flipped_bytes_in_a_table_file_are_caught_by_leveldb_checksums(tmp_path) -> None:
    path = tmp_path / "db"
    s = filled(path, n=400)
    s.db.compact_range()  # everything into .ldb tables
    s.close()
    tables = glob.glob(str(path / "*.ldb"))
    assert tables
    for table in tables:  # flip a byte in the first data block (the data keys, "d...", sort first)
        with open(table, "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 0xFF]))
    try:
        s = LevelDBStorage(path)
    except DamageError as exc:  # the damage hit something LevelDB reads at open
        assert "is damaged" in str(exc)
        return
    wrong, caught = [], 0
    for i in range(400):
        try:
            v = s.state.get(b"k%d" % i)
        except DamageError:
            caught += 1
            continue
        if v != b"v%d" % i:
            wrong.append((i, v))
    s.close()
    assert not wrong, f"damaged values served: {wrong[:5]}"
    assert caught, "no read saw the damage"


def test_a_flipped_table_block_is_leveldbs_finding_wherever_it_lands(tmp_path) -> None:
    """Bytes flipped anywhere in a table's log blocks are reported by LevelDB's block checksum, never
    first by a record's seal: no read at open may put an unverified block into LevelDB's cache, where
    a later verified read would take it as it is (a CI run saw exactly that: the reverse seek for the
    log's end cached the damaged block, and the start-up check met the damage only in a record's seal).
    The blocks must be compressed for that (LevelDB caches a decompressed copy; an uncompressed block
    is read from the mapped file every time): values of a random part repeated, so that snappy keeps
    the random part as a literal, where a flip decompresses without complaint."""
    import random
    import shutil

    rng = random.Random(5)
    src = tmp_path / "src"
    s = LevelDBStorage(src)
    s.log.save(HardState(3, 1), [Entry(1, i + 1, rng.randbytes(24) * 4) for i in range(300)])
    s.state.write({b"k": b"v"}, 300, {}, applied_term=1)
    s.db.compact_range()
    s.close()
    (table,) = glob.glob(str(src / "*.ldb"))
    size = os.path.getsize(table)
    found = []
    for offset in range(0, size - 8, 101):
        case = tmp_path / f"case{offset}"
        shutil.copytree(src, case)
        with open(case / os.path.basename(table), "r+b") as f:
            f.seek(offset)
            b = f.read(8)
            f.seek(offset)
            f.write(bytes(x ^ 0xFF for x in b))
        with pytest.raises(DamageError) as caught:
            s = LevelDBStorage(case)
            try:
                s.check()
            finally:
                s.close()
        found.append((offset, str(caught.value)))
    assert len(found) > 100
    assert all("LevelDB: Corruption" in text for _, text in found), [f for f in found if "LevelDB" not in f[1]]


def test_format_3_is_upgraded_to_sealed_records_in_a_new_generation(tmp_path) -> None:
    path = str(tmp_path / "db")
    db = plyvel.DB(path, create_if_missing=True)
    db.put(b"m/format", b"3")
    db.put(b"m/hardstate", msgpack.packb([4, 2]))
    db.put(b"m/applied", U64.pack(2) + U64.pack(4))
    for i in (1, 2):
        db.put(b"l/" + U64.pack(i), U64.pack(4) + b"\x00" + b"c%d" % i)
    db.put(DATA0 + b"k", b"v")
    db.put(b"s" + bytes(4) + U64.pack(9), msgpack.packb([1, {}, 2]))
    # A generation 1 half-written by an earlier upgrade that crashed: garbage, never live.
    db.put(b"d" + struct.pack(">I", 1) + b"half", b"xx")
    db.close()
    s = LevelDBStorage(path)
    s.check()
    assert s.db.get(b"m/format") == b"4" and s.state.gen == 2
    assert s.state.get(b"k") == b"v" and s.state.get(b"half") is None
    assert s.state.load_sessions() == {9: SessionRecord(1, {}, 2)}
    assert s.log.load_hard_state() == HardState(4, 2)
    assert [e.data for e in s.log.load_log().entries] == [b"c1", b"c2"]
    assert s.state.applied_index == 2 and s.state.applied_term == 4
    while s.state.has_garbage:
        s.state.collect_garbage()
    with s.db.iterator(prefix=b"d", include_value=False) as it:
        assert list(it) == [b"d" + struct.pack(">I", 2) + b"k"]
    s.close()


@pytest.mark.parametrize("damage, message", [
    ("gap", "jumps from entry 4 to entry 6"),
    ("term_down", "term goes down"),
    ("applied_past_log", "lost its tail"),
    ("hard_state_behind_log", "below the log's last term"),
])
def test_start_checks_the_log_against_itself_and_the_applied_index(tmp_path, damage, message) -> None:
    s = filled(tmp_path / "db", n=10)
    s.check()
    if damage == "gap":
        s.db.delete(b"l/" + U64.pack(5))
    elif damage == "term_down":
        s.log.save(None, [Entry(0, 11, b"x")])  # (the storage takes it; the check at start does not)
    elif damage == "applied_past_log":
        s.state.write({}, 12)
    else:
        s.log.save(HardState(0, None), [])
    with pytest.raises(DamageError, match=message):
        s.check()
    s.close()


def test_the_durable_mark_catches_a_database_that_went_back(tmp_path) -> None:
    """A LevelDB .log cut short is recovered silently by LevelDB (it looks like an unfinished
    write): the mark, which recorded what the database held, sees the term, vote or applied
    index go back."""
    path = tmp_path / "db"
    s = filled(path, n=10)
    s.write_mark()
    mark = json.loads((path / MARK_FILE).read_text())
    assert (mark["term"], mark["vote"], mark["applied"]) == (3, 1, 10)
    s.check()
    s.state.write({}, 9)  # as if the newest writes were lost
    with pytest.raises(DamageError, match="applied index is 9, but it was 10"):
        s.check()
    s.state.write({}, 10)
    s.log.save(HardState(3, 2), [])
    with pytest.raises(DamageError, match="vote in term 3 is 2, but it was 1"):
        s.check()
    s.log.save(HardState(4, None), [])  # a later term: fine, the mark is a lower bound
    s.check()
    s.close()
    (path / MARK_FILE).write_text("{not json")
    s = LevelDBStorage(path)
    with pytest.raises(DamageError, match="unreadable"):
        s.check()
    s.close()


def test_damage_found_while_running_is_remembered(tmp_path) -> None:
    path = tmp_path / "db"
    s = filled(path)
    s.mark_damaged(s.damage_message("the record of key b'k5' fails its checksum"))
    s.close()
    with pytest.raises(DamageError, match="k5.*found while running") as info:
        LevelDBStorage(path)
    assert DAMAGED_FILE in str(info.value)


def test_garbage_in_leveldb_files_is_a_clear_refusal(tmp_path) -> None:
    path = tmp_path / "db"
    filled(path).close()
    (manifest,) = glob.glob(str(path / "MANIFEST-*"))
    with open(manifest, "wb") as f:
        f.write(os.urandom(200))
    with pytest.raises(StorageError, match=r"data dir .* is damaged: LevelDB cannot open it"):
        LevelDBStorage(path)


def test_a_missing_current_file_is_refused_and_the_tables_are_kept(tmp_path) -> None:
    """Without CURRENT, LevelDB would make a new database and delete the old tables as obsolete."""
    path = tmp_path / "db"
    s = filled(path, 200)
    s.db.compact_range()  # the records into .ldb tables
    s.close()
    before = sorted(os.listdir(path))
    assert any(n.endswith(".ldb") for n in before), before
    os.unlink(path / "CURRENT")
    with pytest.raises(DamageError, match=r"is damaged: its CURRENT file is missing"):
        LevelDBStorage(path)
    assert sorted(os.listdir(path)) == sorted(set(before) - {"CURRENT"})


def test_an_empty_dir_without_current_is_a_new_database(tmp_path) -> None:
    path = tmp_path / "db"
    path.mkdir()
    (path / "notes.txt").write_text("an operator's file, not LevelDB's")
    LevelDBStorage(path).close()
    assert (path / "CURRENT").exists()
