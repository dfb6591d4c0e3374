"""Durable state of a node in one LevelDB database (plyvel).

Key layout (one keyspace, prefixes keep the parts apart and in order):

    m/format          the layout version, b"3" (b"2", whose log records had no type byte, is upgraded at open)
    m/hardstate       msgpack [term, voted_for]
    m/logstart        msgpack [snapshot_index, snapshot_term]: the log begins after these
    m/gen             4-byte big-endian generation of the live state machine (absent: 0)
    m/applied         8-byte big-endian applied index + 8-byte term of that entry
    l/<index>         8-byte big-endian index -> 8-byte big-endian term + 1-byte entry type + data
    d<gen><key>       the key-value data of state machine generation <gen> (4 bytes)
    s<gen><client>    8-byte client id -> msgpack [seq, result, last index]: a client session

Every write is one atomic WriteBatch:

* :meth:`LevelDBStorage.save`: new log entries (replacing any stored suffix they
  conflict with) and the hard state, with ``sync=True``: one fsync however many
  entries (group commit). Nothing that depends on them is sent before it returns.
* :meth:`LevelDBStorage.write`: a batch of applied updates together with the new
  applied index, without fsync: the entries are already durable in the log, and a
  lost apply is simply replayed. LevelDB's single write-ahead log keeps writes in
  order, so a crash leaves a prefix and never a half-applied batch.
* :meth:`LevelDBStorage.compact`: drop the log up to an applied index, with sync (which
  also makes every earlier apply durable: same write-ahead log, in order).
* Snapshots from the leader are written beside the live state, into generation
  ``live + 1`` (:meth:`stage`), and become live in one synced batch that also moves the
  log's start (:meth:`install_staged`): a crash before it leaves the old state whole,
  after it the new one. Generations that are neither live nor staged are garbage,
  deleted a bounded batch at a time (:meth:`collect_garbage`) so the node never stalls.

A point-in-time view for sending a snapshot (to a follower, or to a backup file) is a
LevelDB snapshot (:meth:`open_snapshot`): the node goes on writing while it is read.

:class:`MemoryStorage` has the same interface for the log and state machine parts, for tests.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass

import msgpack
import plyvel

from zraft.node.statemachine import MemoryKV, SessionRecord
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

# Record kinds in a snapshot chunk: [kind, key, value, kind, key, value, ...]
REC_DATA, REC_SESSION = 0, 1
DEFAULT_CHUNK_BYTES = 256 << 10


class StorageError(RuntimeError):
    """The data directory cannot be used as it is (the message says why)."""


def _log_key(index: int) -> bytes:
    return _LOG + _U64.pack(index)


def _log_value(e: Entry) -> bytes:
    return _U64.pack(e.term) + _TYPE_BYTES[e.type] + e.data


_TYPE_BYTES = [bytes([t]) for t in range(256)]


def _log_entry(key: bytes, value: bytes) -> Entry:
    return Entry(_U64.unpack_from(value)[0], _U64.unpack(key[len(_LOG):])[0], value[9:], value[8])


def _gen_prefix(kind: bytes, gen: int) -> bytes:
    return kind + _U32.pack(gen)


@dataclass
class LogState:
    """The persisted log: it begins after (snapshot_index, snapshot_term)."""

    snapshot_index: int
    snapshot_term: int
    entries: list[Entry]


class SnapshotView:
    """A consistent point-in-time view of the state machine (a LevelDB snapshot)."""

    def __init__(self, db: plyvel.DB) -> None:
        self._snap = db.snapshot()
        raw = self._snap.get(_APPLIED)
        self.index, self.term = _U64X2.unpack(raw) if raw else (0, 0)
        gen = self._snap.get(_GEN)
        self.gen = _U32.unpack(gen)[0] if gen else 0
        self._readers: list[Generator[bytes, None, None]] = []

    def chunks(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
        """The state as msgpack-encoded chunks of records, each about ``chunk_bytes`` or less.

        Lazy: the view is read as the chunks are taken, so memory stays at one chunk.
        """
        reader = self._read(chunk_bytes)
        self._readers.append(reader)
        return reader

    def _read(self, chunk_bytes: int) -> Generator[bytes, None, None]:
        flat: list = []
        size = 0
        for kind, prefix in ((REC_DATA, _gen_prefix(_DATA, self.gen)), (REC_SESSION, _gen_prefix(_SESSION, self.gen))):
            cut = len(prefix)
            with self._snap.iterator(prefix=prefix) as it:
                for k, v in it:
                    flat += (kind, k[cut:], v)
                    size += len(k) + len(v) + 8
                    if size >= chunk_bytes:
                        yield msgpack.packb(flat, use_bin_type=True)
                        flat, size = [], 0
        if flat:
            yield msgpack.packb(flat, use_bin_type=True)

    def close(self) -> None:
        """Release the view; unfinished readers of it are closed first (their LevelDB iterators)."""
        for reader in self._readers:
            reader.close()
        self._readers.clear()
        self._snap.close()


def decode_chunk(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """The records of a snapshot chunk. Raises ValueError on anything malformed."""
    try:
        flat = msgpack.unpackb(data, raw=False) if data else []
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ValueError(f"undecodable snapshot chunk: {exc}") from exc
    if not isinstance(flat, list) or len(flat) % 3:
        raise ValueError("a snapshot chunk is a flat list of [kind, key, value] records")
    out = []
    for i in range(0, len(flat), 3):
        kind, k, v = flat[i:i + 3]
        if kind not in (REC_DATA, REC_SESSION) or type(k) is not bytes or type(v) is not bytes:
            raise ValueError(f"bad snapshot record {flat[i:i + 3]!r}")
        if kind == REC_SESSION and len(k) != 8:
            raise ValueError("a session record's key is an 8-byte client id")
        out.append((kind, k, v))
    return out


class LevelDBStorage:
    def __init__(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = str(path)
        self.db = plyvel.DB(self.path, create_if_missing=True)
        fmt = self.db.get(_FORMAT)
        if fmt is None:
            if next(self.db.iterator(include_value=False), None) is not None:
                self.db.close()
                raise StorageError(f"{self.path} holds data of an older zraft (no m/format); "
                                   "move it away, or restore a snapshot into a fresh data dir")
            self.db.put(_FORMAT, FORMAT, sync=True)
        elif fmt == _UPGRADABLE:
            self._upgrade_from_2()
        elif fmt != FORMAT:
            self.db.close()
            raise StorageError(f"{self.path} has storage format {fmt!r}; this zraft reads {FORMAT!r}")
        raw = self.db.get(_APPLIED)
        self._applied, self._applied_term = _U64X2.unpack(raw) if raw else (0, 0)
        gen = self.db.get(_GEN)
        self.gen = _U32.unpack(gen)[0] if gen else 0
        start = self.db.get(_LOG_START)
        self._snapshot_index, self._snapshot_term = msgpack.unpackb(start) if start else (0, 0)
        self._last_index = self._snapshot_index
        with self.db.iterator(prefix=_LOG, reverse=True, include_value=False) as it:
            for key in it:
                self._last_index = _U64.unpack(key[len(_LOG):])[0]
                break
        self._data = _gen_prefix(_DATA, self.gen)
        # Log writes may come from the storage writer thread (zraft.node.writer) while the loop compacts.
        self._log_lock = threading.Lock()
        self._gc_resume: dict[bytes, bytes] = {}  # generation prefix -> the first key not yet deleted
        # Whatever is in other generations is an unfinished install or an unfinished clean-up.
        self._garbage = [g for g in self._generations() if g != self.gen]

    def close(self) -> None:
        self.db.close()

    def _upgrade_from_2(self) -> None:
        """Format 2 to 3: every log record gets its entry type (all were normal), in one synced batch."""
        with self.db.write_batch(sync=True) as wb:
            with self.db.iterator(prefix=_LOG) as it:
                for key, value in it:
                    wb.put(key, value[:8] + _TYPE_BYTES[0] + value[8:])
            wb.put(_FORMAT, FORMAT)

    # --- raft state -------------------------------------------------------------------

    def load_hard_state(self) -> HardState:
        raw = self.db.get(_HARD_STATE)
        if not raw:
            return HardState()
        term, voted_for = msgpack.unpackb(raw)
        return HardState(term, voted_for)

    def load_log(self) -> LogState:
        entries = []
        with self.db.iterator(prefix=_LOG) as it:
            for key, value in it:
                entries.append(_log_entry(key, value))
        return LogState(self._snapshot_index, self._snapshot_term, entries)

    @property
    def last_index(self) -> int:
        return self._last_index

    @property
    def snapshot_index(self) -> int:
        return self._snapshot_index

    def save(self, hard_state: HardState | None, entries: list[Entry]) -> None:
        """Durably store the hard state and entries, dropping any stored entries they replace."""
        self.save_many([(hard_state, entries)])

    def save_many(self, writes: list[tuple[HardState | None, list[Entry]]]) -> None:
        """Several Readys' ``save`` in order, in one synced batch (one fsync for all of them).

        Safe to call from the storage writer thread while the loop applies, compacts and reads.
        """
        if not any(hs is not None or entries for hs, entries in writes):
            return
        with self._log_lock:
            last = self._last_index
            with self.db.write_batch(sync=True) as wb:
                for hard_state, entries in writes:
                    if hard_state is not None:
                        wb.put(_HARD_STATE, msgpack.packb([hard_state.term, hard_state.voted_for]))
                    if entries:
                        for index in range(entries[0].index, last + 1):
                            wb.delete(_log_key(index))
                        for e in entries:
                            wb.put(_log_key(e.index), _log_value(e))
                        last = entries[-1].index
            self._last_index = last

    def compact(self, index: int, term: int) -> None:
        """The log now begins after (index, term); ``index`` must be applied. Synced."""
        if index <= self._snapshot_index:
            return
        if index > self._applied:
            raise ValueError(f"compact to {index} past the applied index {self._applied}")
        with self._log_lock, self.db.write_batch(sync=True) as wb:
            for i in range(self._snapshot_index + 1, min(index, self._last_index) + 1):
                wb.delete(_log_key(i))
            wb.put(_LOG_START, msgpack.packb([index, term]))
            self._snapshot_index, self._snapshot_term = index, term
            self._last_index = max(self._last_index, index)

    # --- state machine backend -----------------------------------------------------------

    @property
    def applied_index(self) -> int:
        return self._applied

    @property
    def applied_term(self) -> int:
        return self._applied_term

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
                    wb.put(key, msgpack.packb([rec.seq, rec.result, rec.last_index], use_bin_type=True))
            wb.put(_APPLIED, _U64X2.pack(applied_index, applied_term))
        self._applied, self._applied_term = applied_index, applied_term

    def load_sessions(self) -> dict[int, SessionRecord]:
        prefix = _gen_prefix(_SESSION, self.gen)
        cut = len(prefix)
        with self.db.iterator(prefix=prefix) as it:
            return {_U64.unpack(k[cut:])[0]: SessionRecord(*msgpack.unpackb(v, raw=False)) for k, v in it}

    def items(self) -> list[tuple[bytes, bytes]]:
        """Every key and value of the state machine, in key order (for checks and tools)."""
        cut = len(self._data)
        with self.db.iterator(prefix=self._data) as it:
            return [(k[cut:], v) for k, v in it]

    # --- snapshots ---------------------------------------------------------------------

    def open_snapshot(self) -> SnapshotView:
        """A point-in-time view of the state machine at the applied index; close it when done."""
        return SnapshotView(self.db)

    @property
    def staged_gen(self) -> int:
        return self.gen + 1

    def begin_staging(self) -> None:
        """Start receiving a snapshot: whatever an earlier stream staged is thrown away."""
        self._delete_generation(self.staged_gen)
        self._garbage = [g for g in self._garbage if g != self.staged_gen]

    def stage(self, data: bytes) -> int:
        """Add one chunk's records to the staged generation (no fsync: the install syncs). Returns their count."""
        return _write_chunk(self.db, data, self.staged_gen)

    def install_staged(self, meta: SnapshotMeta) -> None:
        """Make the staged generation live at (index, term) and move the log's start, in one synced batch."""
        new = self.staged_gen
        with self._log_lock, self.db.write_batch(sync=True) as wb:
            wb.put(_GEN, _U32.pack(new))
            wb.put(_APPLIED, _U64X2.pack(meta.index, meta.term))
            wb.put(_LOG_START, msgpack.packb([meta.index, meta.term]))
            last = self._last_index if meta.reset_log else min(meta.index, self._last_index)
            for i in range(self._snapshot_index + 1, last + 1):
                wb.delete(_log_key(i))
        old = self.gen
        self.gen = new
        self._data = _gen_prefix(_DATA, new)
        self._applied, self._applied_term = meta.index, meta.term
        self._snapshot_index, self._snapshot_term = meta.index, meta.term
        self._last_index = meta.index if meta.reset_log else max(self._last_index, meta.index)
        self._garbage.append(old)

    def discard_staged(self) -> None:
        """The staged snapshot will not be installed: its generation is garbage."""
        if self.staged_gen not in self._garbage:
            self._garbage.append(self.staged_gen)

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

    def _delete_generation(self, gen: int, max_keys: int | None = None) -> int:
        """Delete up to ``max_keys`` keys of a generation (all, if None), resuming where the last call stopped.

        Resuming matters: deleted keys stay behind as tombstones until LevelDB compacts them,
        and an iterator from the prefix's start would wade through them every time.
        """
        n = 0
        with self.db.write_batch() as wb:
            for kind in (_DATA, _SESSION):
                prefix = _gen_prefix(kind, gen)
                start = self._gc_resume.get(prefix, prefix)
                stop = _gen_prefix(kind, gen + 1) if gen < 0xFFFFFFFF else bytes([kind[0] + 1])
                with self.db.iterator(start=start, stop=stop, include_value=False) as it:
                    for k in it:
                        if max_keys is not None and n >= max_keys:
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
                if g == 0xFFFFFFFF:
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


class MemoryStorage(MemoryKV):
    """:class:`LevelDBStorage`'s interface over plain Python objects (the state machine part is MemoryKV)."""

    def __init__(self) -> None:
        super().__init__()
        self.hard_state = HardState()
        self.log: list[Entry] = []
        self._snapshot = (0, 0)

    def close(self) -> None:
        pass

    def load_hard_state(self) -> HardState:
        return self.hard_state

    def load_log(self) -> LogState:
        return LogState(*self._snapshot, list(self.log))

    @property
    def last_index(self) -> int:
        return self._snapshot[0] + len(self.log)

    @property
    def snapshot_index(self) -> int:
        return self._snapshot[0]

    def save(self, hard_state: HardState | None, entries: list[Entry]) -> None:
        if hard_state is not None:
            self.hard_state = hard_state
        if entries:
            del self.log[entries[0].index - self._snapshot[0] - 1:]
            self.log.extend(entries)

    def compact(self, index: int, term: int) -> None:
        if index <= self._snapshot[0]:
            return
        if index > self.applied_index:
            raise ValueError(f"compact to {index} past the applied index {self.applied_index}")
        del self.log[:index - self._snapshot[0]]
        self._snapshot = (index, term)

    def items(self) -> list[tuple[bytes, bytes]]:
        return sorted(self.data.items())
