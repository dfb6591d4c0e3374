"""A node's storage in one LevelDB database (plyvel): two rooms, one write-ahead log.

:class:`LevelDBStorage` opens the database and holds its two rooms (zraft.node.interfaces):
:class:`LevelDBLogStore` (the Raft log and hard state) and :class:`LevelDBStateStore` (the
state machine's data, sessions, applied index, snapshots and staging). One database keeps one
write-ahead log, so a write that spans both rooms (installing a snapshot, compacting the log)
is one atomic WriteBatch, and a synced write makes every earlier write durable too.

Key layout (one keyspace; prefixes keep the parts apart and in order):

    m/format          the layout version, b"3" (b"2", whose log records had no type byte, is upgraded at open)
    m/hardstate       msgpack [term, voted_for]
    m/logstart        msgpack [snapshot_index, snapshot_term]: the log begins after these
    m/gen             4-byte big-endian generation of the live state machine (absent: 0)
    m/applied         8-byte big-endian applied index + 8-byte term of that entry
    l/<index>         8-byte big-endian index -> 8-byte big-endian term + 1-byte entry type + data
    d<gen><key>       the key-value data of state machine generation <gen> (4 bytes)
    s<gen><client>    8-byte client id -> msgpack [seq, result, last index]: a client session

The writes:

* log ``save`` / ``save_many``: new entries (replacing any stored suffix they conflict with)
  and the hard state, with ``sync=True``: one fsync however many entries (group commit).
* state ``write``: a batch of applied updates together with the new applied index, without
  fsync: the entries are already durable in the log, and a lost apply is replayed. The single
  write-ahead log keeps writes in order, so a crash leaves a prefix, never half a batch.
* ``compact``: drop the log up to an applied index, synced (which makes every earlier apply
  durable too: same write-ahead log, in order).
* A snapshot from the leader is staged beside the live state, into a generation of its own
  (``stage``), and ``install_snapshot`` makes it live in one synced batch that also moves the
  log's start and stores the Ready's hard state and entries: a crash before it leaves the old
  state whole, after it the new one, never a term below the snapshot's. Generations that are
  neither live nor staged are garbage, deleted a bounded batch at a time (``collect_garbage``)
  so that nothing here stalls the node's loop: a new stream stages into a fresh generation
  instead of clearing the old one first.

A point-in-time view for sending a snapshot (to a follower, or to a backup file) is a LevelDB
snapshot (``open_snapshot``): the node goes on writing while it is read.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Generator, Iterator

import msgpack
import plyvel

from zraft.node.interfaces import LogState
from zraft.node.statemachine import (
    REC_DATA,
    REC_SESSION,
    AppliedMark,
    SessionRecord,
    chunked,
    decode_chunk,
    decode_session,
    encode_session,
)
from zraft.raft.core import HardState, SnapshotMeta
from zraft.raft.messages import Entry

FORMAT = b"3"
_UPGRADABLE = b"2"  # the same layout, but log records without their type byte
_FORMAT = b"m/format"
_HARD_STATE = b"m/hardstate"
_LOG_START = b"m/logstart"
_GEN = b"m/gen"
_APPLIED = b"m/applied"
_LOG = b"l/"
_DATA = b"d"
_SESSION = b"s"
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U64X2 = struct.Struct(">QQ")
_MAX_GEN = 0xFFFFFFFF
_TYPE_BYTES = [bytes([t]) for t in range(256)]
WRITE_BUFFER_BYTES = 64 << 20


class StorageError(RuntimeError):
    """The data directory cannot be used as it is (the message says why)."""


def _log_key(index: int) -> bytes:
    return _LOG + _U64.pack(index)


def _log_value(e: Entry) -> bytes:
    return _U64.pack(e.term) + _TYPE_BYTES[e.type] + e.data


def _log_entry(key: bytes, value: bytes) -> Entry:
    return Entry(_U64.unpack_from(value)[0], _U64.unpack(key[len(_LOG):])[0], value[9:], value[8])


def _gen_prefix(kind: bytes, gen: int) -> bytes:
    return kind + _U32.pack(gen)


# ---------------------------------------------------------------------- the log room


class LevelDBLogStore:
    """The Raft log and the hard state. Writes may come from the storage writer thread
    (zraft.node.writer) while the loop compacts or installs: ``lock`` keeps them apart."""

    def __init__(self, db: plyvel.DB) -> None:
        self.db = db
        self.lock = threading.Lock()
        start = db.get(_LOG_START)
        self._snapshot_index, self._snapshot_term = msgpack.unpackb(start) if start else (0, 0)
        self._last_index = self._snapshot_index
        with db.iterator(prefix=_LOG, reverse=True, include_value=False) as it:
            for key in it:
                self._last_index = _U64.unpack(key[len(_LOG):])[0]
                break

    @property
    def last_index(self) -> int:
        return self._last_index

    @property
    def snapshot_index(self) -> int:
        return self._snapshot_index

    def load_hard_state(self) -> HardState:
        raw = self.db.get(_HARD_STATE)
        if not raw:
            return HardState()
        term, voted_for = msgpack.unpackb(raw)
        return HardState(term, voted_for)

    def load_log(self) -> LogState:
        with self.db.iterator(prefix=_LOG) as it:
            entries = [_log_entry(key, value) for key, value in it]
        return LogState(self._snapshot_index, self._snapshot_term, entries)

    def save(self, hard_state: HardState | None, entries: list[Entry]) -> None:
        self.save_many([(hard_state, entries)])

    def save_many(self, writes: list[tuple[HardState | None, list[Entry]]]) -> None:
        if not any(hs is not None or entries for hs, entries in writes):
            return
        with self.lock, self.db.write_batch(sync=True) as wb:
            last = self._last_index
            for hard_state, entries in writes:
                last = self._save_into(wb, hard_state, entries, last)
        self._last_index = last

    # --- pieces of the writes that span both rooms (the caller holds ``lock`` and owns the batch)

    @staticmethod
    def _save_into(wb: plyvel.WriteBatch, hard_state: HardState | None, entries: list[Entry], last: int) -> int:
        """Put one Ready's writes into ``wb`` over a log that ends at ``last``; the new last index."""
        if hard_state is not None:
            wb.put(_HARD_STATE, msgpack.packb([hard_state.term, hard_state.voted_for]))
        if entries:
            for index in range(entries[0].index, last + 1):
                wb.delete(_log_key(index))
            for e in entries:
                wb.put(_log_key(e.index), _log_value(e))
            last = entries[-1].index
        return last

    def _restart_into(self, wb: plyvel.WriteBatch, index: int, term: int, keep_after: bool) -> int:
        """Put into ``wb`` that the log begins after (index, term); the last index once it is written."""
        last = self._last_index if not keep_after else min(index, self._last_index)
        for i in range(self._snapshot_index + 1, last + 1):
            wb.delete(_log_key(i))
        wb.put(_LOG_START, msgpack.packb([index, term]))
        return max(self._last_index, index) if keep_after else index

    def _restarted(self, index: int, term: int, last: int) -> None:
        self._snapshot_index, self._snapshot_term, self._last_index = index, term, last


# ---------------------------------------------------------------------- the state machine room


class LevelDBSnapshotView:
    """A consistent point-in-time view of the state machine (a LevelDB snapshot)."""

    def __init__(self, db: plyvel.DB) -> None:
        self._snap = db.snapshot()
        raw = self._snap.get(_APPLIED)
        self.index, self.term = _U64X2.unpack(raw) if raw else (0, 0)
        gen = self._snap.get(_GEN)
        self.gen = _U32.unpack(gen)[0] if gen else 0
        self._readers: list[Generator[bytes, None, None]] = []

    def chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        """The state as snapshot chunks of about ``chunk_bytes`` or less, read as they are taken."""
        reader = self._read(chunk_bytes)
        self._readers.append(reader)
        return reader

    def _records(self) -> Generator[tuple[int, bytes, bytes], None, None]:
        for kind, prefix in ((REC_DATA, _gen_prefix(_DATA, self.gen)), (REC_SESSION, _gen_prefix(_SESSION, self.gen))):
            cut = len(prefix)
            with self._snap.iterator(prefix=prefix) as it:
                for k, v in it:
                    yield kind, k[cut:], v

    def _read(self, chunk_bytes: int) -> Generator[bytes, None, None]:
        records = self._records()
        try:
            yield from chunked(records, chunk_bytes)
        finally:
            records.close()  # its LevelDB iterator, before the snapshot under it goes

    def close(self) -> None:
        """Release the view; unfinished readers of it are closed first (their LevelDB iterators)."""
        for reader in self._readers:
            reader.close()
        self._readers.clear()
        self._snap.close()


class LevelDBStateStore(AppliedMark):
    """The state machine's data and sessions (of the live generation), its applied index, staging and GC."""

    def __init__(self, db: plyvel.DB) -> None:
        self.db = db
        raw = db.get(_APPLIED)
        self._applied, self._applied_term = _U64X2.unpack(raw) if raw else (0, 0)
        gen = db.get(_GEN)
        self.gen = _U32.unpack(gen)[0] if gen else 0
        self._data = _gen_prefix(_DATA, self.gen)
        self._gc_resume: dict[bytes, bytes] = {}  # generation prefix -> the first key not yet deleted
        found = self._generations()
        # Whatever is in other generations is an unfinished install or an unfinished clean-up.
        self._garbage = [g for g in found if g != self.gen]
        self.staged_gen: int | None = None  # the generation a snapshot stream is staged into
        self._next_gen = max([self.gen, *found]) + 1

    def get(self, key: bytes) -> bytes | None:
        return self.db.get(self._data + key)

    def write(self, updates: dict[bytes, bytes | None], applied_index: int,
              sessions: dict[int, SessionRecord | None] | None = None, applied_term: int = 0) -> None:
        data = self._data
        with self.db.write_batch() as wb:
            for k, v in updates.items():
                if v is None:
                    wb.delete(data + k)
                else:
                    wb.put(data + k, v)
            sp = _gen_prefix(_SESSION, self.gen)
            for client_id, rec in (sessions or {}).items():
                key = sp + _U64.pack(client_id)
                if rec is None:
                    wb.delete(key)
                else:
                    wb.put(key, encode_session(rec))
            wb.put(_APPLIED, _U64X2.pack(applied_index, applied_term))
        self._applied, self._applied_term = applied_index, applied_term

    def load_sessions(self) -> dict[int, SessionRecord]:
        prefix = _gen_prefix(_SESSION, self.gen)
        cut = len(prefix)
        with self.db.iterator(prefix=prefix) as it:
            return {_U64.unpack(k[cut:])[0]: decode_session(v) for k, v in it}

    def items(self) -> list[tuple[bytes, bytes]]:
        cut = len(self._data)
        with self.db.iterator(prefix=self._data) as it:
            return [(k[cut:], v) for k, v in it]

    def open_snapshot(self) -> LevelDBSnapshotView:
        """A point-in-time view of the state machine at the applied index; close it when done."""
        return LevelDBSnapshotView(self.db)

    # --- staging a received snapshot

    def begin_staging(self) -> None:
        """Stage into a fresh generation; an earlier stream's staged keys become garbage (no delete now)."""
        self.discard_staged()
        if self._next_gen > _MAX_GEN:
            raise OverflowError("state machine generations exhausted")
        self.staged_gen = self._next_gen
        self._next_gen += 1

    def stage(self, data: bytes) -> int:
        """Add one chunk's records to the staged generation (no fsync: the install syncs). Their count."""
        if self.staged_gen is None:
            raise ValueError("no snapshot stream is being staged")
        return _write_chunk(self.db, data, self.staged_gen)

    def discard_staged(self) -> None:
        if self.staged_gen is not None:
            self._garbage.append(self.staged_gen)
            self.staged_gen = None

    def _install_into(self, wb: plyvel.WriteBatch, meta: SnapshotMeta) -> None:
        if self.staged_gen is None:
            raise ValueError("nothing is staged")
        wb.put(_GEN, _U32.pack(self.staged_gen))
        wb.put(_APPLIED, _U64X2.pack(meta.index, meta.term))

    def _installed(self, meta: SnapshotMeta) -> None:
        assert self.staged_gen is not None
        self._garbage.append(self.gen)
        self.gen, self.staged_gen = self.staged_gen, None
        self._data = _gen_prefix(_DATA, self.gen)
        self._applied, self._applied_term = meta.index, meta.term

    # --- garbage collection

    @property
    def has_garbage(self) -> bool:
        return bool(self._garbage)

    def collect_garbage(self, max_keys: int = 5000) -> int:
        """Delete up to ``max_keys`` keys of dead generations; returns how many went."""
        done = 0
        while self._garbage and done < max_keys:
            gen = self._garbage[0]
            n = self._delete_generation(gen, max_keys - done)
            done += n
            if done < max_keys:
                self._garbage.pop(0)  # that generation is empty now
        return done

    def _delete_generation(self, gen: int, max_keys: int) -> int:
        """Delete up to ``max_keys`` keys of a generation, resuming where the last call stopped.

        Resuming matters: deleted keys stay behind as tombstones until LevelDB compacts them,
        and an iterator from the prefix's start would wade through them every time.
        """
        n = 0
        with self.db.write_batch() as wb:
            for kind in (_DATA, _SESSION):
                prefix = _gen_prefix(kind, gen)
                start = self._gc_resume.get(prefix, prefix)
                stop = _gen_prefix(kind, gen + 1) if gen < _MAX_GEN else bytes([kind[0] + 1])
                with self.db.iterator(start=start, stop=stop, include_value=False) as it:
                    for k in it:
                        if n >= max_keys:
                            self._gc_resume[prefix] = k
                            return n
                        wb.delete(k)
                        n += 1
                self._gc_resume.pop(prefix, None)
        return n

    def _generations(self) -> list[int]:
        """Every generation that has keys (a seek per generation, not a scan)."""
        gens: set[int] = set()
        for kind in (_DATA, _SESSION):
            seek = kind
            while True:
                with self.db.iterator(start=seek, include_value=False) as it:
                    k = next(it, None)
                if k is None or not k.startswith(kind) or len(k) < len(kind) + 4:
                    break
                g = _U32.unpack_from(k, len(kind))[0]
                gens.add(g)
                if g == _MAX_GEN:
                    break
                seek = _gen_prefix(kind, g + 1)
        return sorted(gens)


def _write_chunk(db: plyvel.DB, data: bytes, gen: int) -> int:
    """Write one snapshot chunk's records into state machine generation ``gen``, unsynced; their count."""
    records = decode_chunk(data)
    dp, sp = _gen_prefix(_DATA, gen), _gen_prefix(_SESSION, gen)
    with db.write_batch() as wb:
        for kind, k, v in records:
            wb.put((dp if kind == REC_DATA else sp) + k, v)
    return len(records)


# ---------------------------------------------------------------------- the database


class LevelDBStorage:
    """One node's database: its format checked (or upgraded), its two rooms, the writes that span them."""

    def __init__(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = str(path)
        self.db = plyvel.DB(self.path, create_if_missing=True, write_buffer_size=WRITE_BUFFER_BYTES)
        try:
            self._check_format()
        except BaseException:
            self.db.close()
            raise
        self.log = LevelDBLogStore(self.db)
        self.state = LevelDBStateStore(self.db)

    def _check_format(self) -> None:
        fmt = self.db.get(_FORMAT)
        if fmt is None:
            if next(self.db.iterator(include_value=False), None) is not None:
                raise StorageError(f"{self.path} holds data of an older zraft (no m/format); "
                                   "move it away, or restore a snapshot into a fresh data dir")
            self.db.put(_FORMAT, FORMAT, sync=True)
        elif fmt == _UPGRADABLE:
            self._upgrade_from_2()
        elif fmt != FORMAT:
            raise StorageError(f"{self.path} has storage format {fmt!r}; this zraft reads {FORMAT!r}")

    def _upgrade_from_2(self) -> None:
        """Format 2 to 3: every log record gets its entry type (all were normal), in one synced batch."""
        with self.db.write_batch(sync=True) as wb:
            with self.db.iterator(prefix=_LOG) as it:
                for key, value in it:
                    wb.put(key, value[:8] + _TYPE_BYTES[0] + value[8:])
            wb.put(_FORMAT, FORMAT)

    def close(self) -> None:
        self.db.close()

    def install_snapshot(self, meta: SnapshotMeta, hard_state: HardState | None, entries: list[Entry]) -> None:
        log, state = self.log, self.state
        with log.lock:
            with self.db.write_batch(sync=True) as wb:
                state._install_into(wb, meta)
                last = log._restart_into(wb, meta.index, meta.term, keep_after=not meta.reset_log)
                # The entries of this Ready come after the snapshot: a log ending at ``last`` takes them.
                last = log._save_into(wb, hard_state, entries, last)
            log._restarted(meta.index, meta.term, last)
            state._installed(meta)

    def compact(self, index: int, term: int) -> None:
        log = self.log
        if index <= log.snapshot_index:
            return
        if index > self.state.applied_index:
            raise ValueError(f"compact to {index} past the applied index {self.state.applied_index}")
        with log.lock:
            with self.db.write_batch(sync=True) as wb:
                last = log._restart_into(wb, index, term, keep_after=True)
            log._restarted(index, term, last)


def restore_into(path: str | os.PathLike, index: int, term: int, chunks: Iterator[bytes]) -> int:
    """Create a fresh node database at ``path`` holding a snapshot's state at (index, term).

    The log begins after the snapshot, the hard state is (term, no vote). Returns the
    number of records written. Refuses a path that already holds a database.
    """
    if os.path.exists(path) and os.listdir(path):
        raise StorageError(f"{path} is not empty; restore only into a fresh data dir")
    db = plyvel.DB(str(path), create_if_missing=True, error_if_exists=True)
    try:
        n = sum(_write_chunk(db, data, 0) for data in chunks)
        with db.write_batch(sync=True) as wb:
            wb.put(_FORMAT, FORMAT)
            wb.put(_HARD_STATE, msgpack.packb([term, None]))
            wb.put(_LOG_START, msgpack.packb([index, term]))
            wb.put(_APPLIED, _U64X2.pack(index, term))
        return n
    finally:
        db.close()
