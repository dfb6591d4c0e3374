"""A node's storage in one LevelDB database (plyvel): two rooms, one write-ahead log.

:class:`LevelDBStorage` opens the database and holds its two rooms (zraft.node.interfaces):
:class:`LevelDBLogStore` (the Raft log and hard state) and :class:`LevelDBStateStore` (the
state machine's data, sessions, applied index, snapshots and staging). One database keeps one
write-ahead log, so a write that spans both rooms (installing a snapshot, compacting the log)
is one atomic WriteBatch, and a synced write makes every earlier write durable too.

Key layout (one keyspace; prefixes keep the parts apart and in order):

    m/format          the layout version, b"4" (2 and 3, without checksums, are upgraded at open)
    m/hardstate       msgpack [term, voted_for]
    m/logstart        msgpack [snapshot_index, snapshot_term]: the log begins after these
    m/gen             4-byte big-endian generation of the live state machine (absent: 0)
    m/applied         8-byte big-endian applied index + 8-byte term of that entry
    l/<index>         8-byte big-endian index -> 8-byte big-endian term + 1-byte entry type + data
    d<gen><key>       the key-value data of state machine generation <gen> (4 bytes)
    s<gen><client>    8-byte client id -> msgpack [seq, result, last index]: a client session
    c<gen>            the latest membership applied (zraft.raft.confchange), absent if none ever was
    k<gen><key>       a key's metadata (zraft.node.mvcc.KeyMeta: revisions, version, lease)
    r<gen>            the store's revision and how far its watch history was trimmed (mvcc.StoreMeta)
    w<gen><rev><seq>  the watch history: one event per change (mvcc.encode_event)
    e<gen><lease>     a lease and its TTL (mvcc.encode_lease)
    x<gen><lease><key>  the keys of a lease (no value)

Every value but m/format is sealed: a 4-byte big-endian CRC-32 over the key and the payload,
then the payload (what is described above). A record is checked when it is read, and one that
fails is never used: the read raises :class:`DamageError`, which names the record and says what
to do (like etcd's WAL records and their CRCs). The key is inside the checksum, so a value that
LevelDB returns for the wrong key fails too. Below the records, LevelDB is opened with
``paranoid_checks`` and reads verify its block checksums. What a checksum cannot see, a file
that lost its tail (LevelDB takes a cut-off .log as an unfinished write), the durable mark
sees: a small file beside the database (``ZRAFT-MARK``, written at a clean stop and every few
seconds) records the term, vote and applied index the database held; a database found behind
its mark is refused at open.

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

import json
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Generator, Iterator

import msgpack
import plyvel

from zraft.node.interfaces import LogState
from zraft.node.mvcc import REC_EVENT, REC_KEYMETA, REC_LEASE, REC_LEASE_KEY, REC_META, prefix_end
from zraft.node.statemachine import (
    REC_CONFIG,
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

FORMAT = b"4"
_UPGRADABLE = (b"2", b"3")  # 2: log records without their type byte; 3: no checksums
_FORMAT = b"m/format"
_HARD_STATE = b"m/hardstate"
_LOG_START = b"m/logstart"
_GEN = b"m/gen"
_APPLIED = b"m/applied"
_LOG = b"l/"
_DATA = b"d"
_SESSION = b"s"
_CONFIG = b"c"
_TABLES = {REC_META: b"r", REC_EVENT: b"w", REC_KEYMETA: b"k", REC_LEASE: b"e", REC_LEASE_KEY: b"x"}
# The prefixes a state machine generation has keys under, by their snapshot record kind.
_PREFIXES = {REC_DATA: _DATA, REC_SESSION: _SESSION, REC_CONFIG: _CONFIG, **_TABLES}
_KINDS = tuple(sorted(_PREFIXES.values()))
_NAMES = {_DATA: "key", _SESSION: "session", _CONFIG: "membership", b"r": "store metadata",
          b"w": "watch event", b"k": "metadata of key", b"e": "lease", b"x": "lease's key"}
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U64X2 = struct.Struct(">QQ")
_MAX_GEN = 0xFFFFFFFF
_TYPE_BYTES = [bytes([t]) for t in range(256)]
WRITE_BUFFER_BYTES = 64 << 20
logger = logging.getLogger(__name__)
MARK_FILE = "ZRAFT-MARK"  # the durable mark, in the database's directory
DAMAGED_FILE = "ZRAFT-DAMAGED"  # written when damage is found while running: the next open refuses
_CRC = struct.Struct(">I")
_WHAT_TO_DO = ("restore this node from a backup (docs/OPERATIONS.md, \"A damaged node\"), or move the data "
               "dir away and add the node back as a new member")


class StorageError(RuntimeError):
    """The data directory cannot be used as it is (the message says why)."""


class DamageError(StorageError):
    """A record or a file of the database fails its checks: nothing from it is used."""


def _seal(key: bytes, payload: bytes) -> bytes:
    """A stored value: the CRC-32 of key and payload, then the payload."""
    return _CRC.pack(zlib.crc32(payload, zlib.crc32(key))) + payload


def _unseal(key: bytes, value: bytes) -> bytes:
    """The payload of a stored value whose checksum holds; DamageError otherwise."""
    if len(value) < 4 or _CRC.unpack_from(value)[0] != zlib.crc32(memoryview(value)[4:], zlib.crc32(key)):
        raise DamageError(f"the record {_describe(key)} fails its checksum")
    return value[4:]


def _describe(key: bytes) -> str:
    if key.startswith(_LOG) and len(key) == len(_LOG) + 8:
        return f"of log entry {_U64.unpack_from(key, len(_LOG))[0]}"
    if key[:1] in _KINDS and len(key) >= 5:
        what = _NAMES[key[:1]]
        return f"of {what} {key[5:65]!r} (generation {_U32.unpack_from(key, 1)[0]})"
    return repr(key[:64])


def _log_key(index: int) -> bytes:
    return _LOG + _U64.pack(index)


def _log_value(key: bytes, e: Entry) -> bytes:
    return _seal(key, _U64.pack(e.term) + _TYPE_BYTES[e.type] + e.data)


def _log_entry(key: bytes, value: bytes) -> Entry:
    payload = _unseal(key, value)
    if len(payload) < 9:
        raise DamageError(f"the record {_describe(key)} is too short")
    return Entry(_U64.unpack_from(payload)[0], _U64.unpack(key[len(_LOG):])[0], payload[9:], payload[8])


def _get(db: plyvel.DB, key: bytes) -> bytes | None:
    """A sealed value's payload (None if absent), LevelDB's block checksums verified too."""
    try:
        raw = db.get(key, verify_checksums=True)
    except plyvel.CorruptionError as exc:
        raise DamageError(damage_text(exc)) from None
    return None if raw is None else _unseal(key, raw)


def _scan(db: plyvel.DB | plyvel.Snapshot, prefix: bytes, sealed: bool = True) -> Iterator[tuple[bytes, bytes]]:
    """(key, payload) of every sealed record under ``prefix``, each checked (``sealed=False``: the
    stored values as they are, LevelDB's checksums verified: the caller unseals)."""
    try:
        with db.iterator(prefix=prefix, verify_checksums=True) as it:
            for k, v in it:
                yield k, (_unseal(k, v) if sealed else v)
    except plyvel.CorruptionError as exc:
        raise DamageError(damage_text(exc)) from None


def _scan_range(db: plyvel.DB | plyvel.Snapshot, prefix: bytes, start: bytes, end: bytes | None
                ) -> Iterator[tuple[bytes, bytes]]:
    """(key without ``prefix``, payload) of the sealed records under ``prefix`` with keys in [start, end)."""
    cut = len(prefix)
    stop = prefix + end if end is not None else prefix_end(prefix)  # (a generation prefix has one)
    try:
        with db.iterator(start=prefix + start, stop=stop, verify_checksums=True) as it:
            for k, v in it:
                yield k[cut:], _unseal(k, v)
    except plyvel.CorruptionError as exc:
        raise DamageError(damage_text(exc)) from None


def _write_rows(wb: plyvel.WriteBatch, prefix: bytes, rows: dict[bytes, bytes | None]) -> None:
    """Sealed puts (and deletes, for None) of the records under ``prefix``."""
    for k, v in rows.items():
        key = prefix + k
        if v is None:
            wb.delete(key)
        else:
            wb.put(key, _seal(key, v))


def damage_text(exc: DamageError | plyvel.CorruptionError) -> str:
    """What is damaged: a DamageError's words, or LevelDB's report of a corruption it found."""
    return str(exc) if isinstance(exc, DamageError) else f"LevelDB: {storage_error_text(exc)}"


def storage_error_text(exc: BaseException) -> str:
    """plyvel's error text (it carries LevelDB's message as bytes), or an OSError's."""
    arg = exc.args[0] if exc.args else exc
    return arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)


def _gen_prefix(kind: bytes, gen: int) -> bytes:
    return kind + _U32.pack(gen)


# ---------------------------------------------------------------------- the log room


class LevelDBLogStore:
    """The Raft log and the hard state. Writes may come from the storage writer thread
    (zraft.node.writer) while the loop compacts or installs: ``lock`` keeps them apart."""

    def __init__(self, db: plyvel.DB) -> None:
        self.db = db
        self.lock = threading.Lock()
        start = _get(db, _LOG_START)
        self._snapshot_index, self._snapshot_term = msgpack.unpackb(start) if start else (0, 0)
        self._last_index = self._snapshot_index
        with db.iterator(prefix=_LOG, reverse=True, include_value=False, verify_checksums=True) as it:
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
        raw = _get(self.db, _HARD_STATE)
        if not raw:
            return HardState()
        term, voted_for = msgpack.unpackb(raw)
        return HardState(term, voted_for)

    def load_log(self) -> LogState:
        """The whole log, every record's checksum checked (DamageError if one fails)."""
        entries = [_log_entry(key, payload) for key, payload in _scan(self.db, _LOG, sealed=False)]
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
            wb.put(_HARD_STATE, _seal(_HARD_STATE, msgpack.packb([hard_state.term, hard_state.voted_for])))
        if entries:
            for index in range(entries[0].index, last + 1):
                wb.delete(_log_key(index))
            for e in entries:
                key = _log_key(e.index)
                wb.put(key, _log_value(key, e))
            last = entries[-1].index
        return last

    def _restart_into(self, wb: plyvel.WriteBatch, index: int, term: int, keep_after: bool) -> int:
        """Put into ``wb`` that the log begins after (index, term); the last index once it is written."""
        last = self._last_index if not keep_after else min(index, self._last_index)
        for i in range(self._snapshot_index + 1, last + 1):
            wb.delete(_log_key(i))
        wb.put(_LOG_START, _seal(_LOG_START, msgpack.packb([index, term])))
        return max(self._last_index, index) if keep_after else index

    def _restarted(self, index: int, term: int, last: int) -> None:
        self._snapshot_index, self._snapshot_term, self._last_index = index, term, last


# ---------------------------------------------------------------------- the state machine room


class LevelDBSnapshotView:
    """A consistent point-in-time view of the state machine (a LevelDB snapshot)."""

    def __init__(self, db: plyvel.DB) -> None:
        self._snap = db.snapshot()
        raw = _get(self._snap, _APPLIED)
        self.index, self.term = _U64X2.unpack(raw) if raw else (0, 0)
        gen = _get(self._snap, _GEN)
        self.gen = _U32.unpack(gen)[0] if gen else 0
        self._readers: list[Generator[bytes, None, None]] = []

    def chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        """The state as snapshot chunks of about ``chunk_bytes`` or less, read as they are taken."""
        reader = self._read(chunk_bytes)
        self._readers.append(reader)
        return reader

    def _records(self) -> Generator[tuple[int, bytes, bytes], None, None]:
        for kind, letter in _PREFIXES.items():
            prefix = _gen_prefix(letter, self.gen)
            cut = len(prefix)
            for k, v in _scan(self._snap, prefix):
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
        raw = _get(db, _APPLIED)
        self._applied, self._applied_term = _U64X2.unpack(raw) if raw else (0, 0)
        gen = _get(db, _GEN)
        self.gen = _U32.unpack(gen)[0] if gen else 0
        self._data = _gen_prefix(_DATA, self.gen)
        self._tables = {kind: _gen_prefix(letter, self.gen) for kind, letter in _TABLES.items()}
        self._gc_resume: dict[bytes, bytes] = {}  # generation prefix -> the first key not yet deleted
        found = self._generations()
        # Whatever is in other generations is an unfinished install or an unfinished clean-up.
        self._garbage = [g for g in found if g != self.gen]
        self.staged_gen: int | None = None  # the generation a snapshot stream is staged into
        self._next_gen = max([self.gen, *found]) + 1
        self._membership = _get(db, _gen_prefix(_CONFIG, self.gen))

    def get(self, key: bytes) -> bytes | None:
        return _get(self.db, self._data + key)

    def data_scan(self, start: bytes, end: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        return _scan_range(self.db, self._data, start, end)

    def table_get(self, kind: int, key: bytes) -> bytes | None:
        return _get(self.db, self._tables[kind] + key)

    def table_scan(self, kind: int, start: bytes = b"", end: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        return _scan_range(self.db, self._tables[kind], start, end)

    def write(self, updates: dict[bytes, bytes | None], applied_index: int,
              sessions: dict[int, SessionRecord | None] | None = None, applied_term: int = 0,
              membership: bytes | None = None, tables: dict[int, dict[bytes, bytes | None]] | None = None) -> None:
        with self.db.write_batch() as wb:
            for kind, rows in (tables or {}).items():
                _write_rows(wb, self._tables[kind], rows)
            if membership is not None:
                key = _gen_prefix(_CONFIG, self.gen)
                wb.put(key, _seal(key, membership))
                self._membership = membership
            _write_rows(wb, self._data, updates)
            sp = _gen_prefix(_SESSION, self.gen)
            for client_id, rec in (sessions or {}).items():
                key = sp + _U64.pack(client_id)
                if rec is None:
                    wb.delete(key)
                else:
                    wb.put(key, _seal(key, encode_session(rec)))
            wb.put(_APPLIED, _seal(_APPLIED, _U64X2.pack(applied_index, applied_term)))
        self._applied, self._applied_term = applied_index, applied_term

    @property
    def membership(self) -> bytes | None:
        return self._membership

    def staged_membership(self) -> bytes | None:
        return None if self.staged_gen is None else _get(self.db, _gen_prefix(_CONFIG, self.staged_gen))

    def load_sessions(self) -> dict[int, SessionRecord]:
        prefix = _gen_prefix(_SESSION, self.gen)
        cut = len(prefix)
        return {_U64.unpack(k[cut:])[0]: decode_session(v) for k, v in _scan(self.db, prefix)}

    def items(self) -> list[tuple[bytes, bytes]]:
        cut = len(self._data)
        return [(k[cut:], v) for k, v in _scan(self.db, self._data)]

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
        wb.put(_GEN, _seal(_GEN, _U32.pack(self.staged_gen)))
        wb.put(_APPLIED, _seal(_APPLIED, _U64X2.pack(meta.index, meta.term)))

    def _installed(self, meta: SnapshotMeta) -> None:
        assert self.staged_gen is not None
        self._garbage.append(self.gen)
        self.gen, self.staged_gen = self.staged_gen, None
        self._data = _gen_prefix(_DATA, self.gen)
        self._tables = {kind: _gen_prefix(letter, self.gen) for kind, letter in _TABLES.items()}
        self._membership = _get(self.db, _gen_prefix(_CONFIG, self.gen))
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
            for kind in _KINDS:
                prefix = _gen_prefix(kind, gen)
                start = self._gc_resume.get(prefix, prefix)
                stop = _gen_prefix(kind, gen + 1) if gen < _MAX_GEN else bytes([kind[0] + 1])
                with self.db.iterator(start=start, stop=stop, include_value=False, verify_checksums=True) as it:
                    for k in it:
                        if n >= max_keys:
                            self._gc_resume[prefix] = k
                            return n
                        wb.delete(k)
                        n += 1
                self._gc_resume.pop(prefix, None)
        return n

    def _generations(self) -> list[int]:
        return _generations(self.db)


def _generations(db: plyvel.DB) -> list[int]:
    """Every state machine generation that has keys (a seek per generation, not a scan)."""
    gens: set[int] = set()
    for kind in _KINDS:
        seek = kind
        while True:
            with db.iterator(start=seek, include_value=False, verify_checksums=True) as it:
                k = next(it, None)
            if k is None or not k.startswith(kind) or len(k) < len(kind) + 4:
                break
            g = _U32.unpack_from(k, len(kind))[0]
            gens.add(g)
            if g == _MAX_GEN:
                break
            seek = _gen_prefix(kind, g + 1)
    return sorted(gens)


def _write_durably(path: str, data: bytes) -> None:
    """Replace the file at ``path`` with ``data``, atomically and durably (write, fsync, rename, fsync dir)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_chunk(db: plyvel.DB, data: bytes, gen: int) -> int:
    """Write one snapshot chunk's records into state machine generation ``gen``, unsynced; their count."""
    records = decode_chunk(data)
    prefixes = {kind: _gen_prefix(letter, gen) for kind, letter in _PREFIXES.items()}
    with db.write_batch() as wb:
        for kind, k, v in records:
            key = prefixes[kind] + k
            wb.put(key, _seal(key, v))
    return len(records)


# ---------------------------------------------------------------------- the database


class LevelDBStorage:
    """One node's database: its format checked (or upgraded), its two rooms, the writes that span them.

    Opening it checks LevelDB's own recovery (paranoid) and whether damage was found while the
    node ran; :meth:`check`, when a node starts, what can be checked without reading every value:
    every record of the log and the metadata, the log's continuity, the hard state and the applied
    index against the log, and the durable mark. Anything wrong is a :class:`DamageError` whose
    message names the data dir, the problem and what to do. Every other record is checked as it
    is read.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = str(path)
        self._refuse_if_marked_damaged()
        self._refuse_if_current_missing()
        try:
            self.db = plyvel.DB(self.path, create_if_missing=True, paranoid_checks=True,
                                write_buffer_size=WRITE_BUFFER_BYTES)
        except plyvel.CorruptionError as exc:
            raise DamageError(self.damage_message(f"LevelDB cannot open it: {storage_error_text(exc)}")) from None
        except plyvel.IOError as exc:
            text = storage_error_text(exc)
            if "lock" in text.lower():
                raise StorageError(f"{self.path} is in use by another process ({text})") from None
            raise StorageError(f"{self.path} cannot be opened: {text}") from None
        try:
            self._check_format()
            self.log = LevelDBLogStore(self.db)
            self.state = LevelDBStateStore(self.db)
        except (DamageError, plyvel.CorruptionError) as exc:  # (a seek at open: the log's end, the generations)
            self.db.close()
            raise DamageError(self.damage_message(damage_text(exc))) from None
        except BaseException:
            self.db.close()
            raise

    # --- damage

    def damage_message(self, what: str) -> str:
        return f"the data dir {self.path} is damaged: {what}; {_WHAT_TO_DO}"

    def mark_damaged(self, message: str) -> None:
        """Remember damage found while running, so that the next open refuses too (best effort)."""
        try:
            _write_durably(os.path.join(self.path, DAMAGED_FILE), message.encode() + b"\n")
        except OSError:
            pass

    def _refuse_if_current_missing(self) -> None:
        """LevelDB files without CURRENT: LevelDB (create_if_missing) would make a new database there
        and delete the old tables as obsolete. Refuse before it can, leaving the files as they are."""
        if os.path.exists(os.path.join(self.path, "CURRENT")):
            return
        names = os.listdir(self.path)
        if any(n.endswith((".ldb", ".sst", ".log")) and n[:-4].isdigit() or n.startswith("MANIFEST-") for n in names):
            raise DamageError(self.damage_message(
                "its CURRENT file is missing (LevelDB's pointer to the MANIFEST), though LevelDB files are there; "
                "they are left untouched"))

    def _refuse_if_marked_damaged(self) -> None:
        marked = os.path.join(self.path, DAMAGED_FILE)
        if os.path.exists(marked):
            with open(marked, errors="replace") as f:
                why = f.read().strip() or "(no reason recorded)"
            raise DamageError(f"{why} (found while running; {marked} remembers it)")

    def check(self) -> None:
        """What a node checks before it starts (see the class docstring); DamageError if anything fails."""
        try:
            self._check_consistency()
        except DamageError as exc:
            raise DamageError(self.damage_message(str(exc))) from None

    def _check_consistency(self) -> None:
        log, state = self.log, self.state
        entries = log.load_log().entries  # every record's checksum
        prev_index, prev_term = log._snapshot_index, log._snapshot_term
        for e in entries:
            if e.index != prev_index + 1:
                raise DamageError(f"the log jumps from entry {prev_index} to entry {e.index}")
            if e.term < prev_term:
                raise DamageError(f"the term goes down from {prev_term} to {e.term} at log entry {e.index}")
            prev_index, prev_term = e.index, e.term
        hs = log.load_hard_state()
        if type(hs.term) is not int or hs.term < 0 or not (hs.voted_for is None or type(hs.voted_for) is int):
            raise DamageError(f"the hard state {hs!r} is not a term and a vote")
        last_term = entries[-1].term if entries else log._snapshot_term
        if hs.term < last_term:
            raise DamageError(f"the hard state's term {hs.term} is below the log's last term {last_term}")
        if state.applied_index < log.snapshot_index:
            raise DamageError(f"the applied index {state.applied_index} is before the log's start "
                              f"{log.snapshot_index}: entries between them are gone")
        if state.applied_index > log.last_index:
            raise DamageError(f"the applied index {state.applied_index} is past the log's last entry "
                              f"{log.last_index}: the log lost its tail")
        self._check_mark(hs)

    # --- the durable mark

    def write_mark(self) -> None:
        """Record, beside the database, the term, vote and applied index it holds durably now."""
        applied = self.state.applied_index  # read first: the synced write below makes it durable
        self.db.put(_FORMAT, FORMAT, sync=True)  # every earlier write is durable after this one
        hs = self.log.load_hard_state()
        mark = {"term": hs.term, "vote": hs.voted_for, "applied": applied, "at": time.time()}
        _write_durably(os.path.join(self.path, MARK_FILE), json.dumps(mark).encode())

    def _check_mark(self, hs: HardState) -> None:
        path = os.path.join(self.path, MARK_FILE)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return
        try:
            mark = json.loads(raw)
            term, vote, applied = int(mark["term"]), mark["vote"], int(mark["applied"])
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(mark["at"])))
        except (ValueError, TypeError, KeyError) as exc:
            raise DamageError(f"{MARK_FILE} is unreadable ({exc})") from None
        lost = None
        if hs.term < term:
            lost = f"its term is {hs.term}, but it was {term}"
        elif hs.term == term and vote is not None and hs.voted_for != vote:
            lost = f"its vote in term {term} is {hs.voted_for}, but it was {vote}"
        elif self.state.applied_index < applied:
            lost = f"its applied index is {self.state.applied_index}, but it was {applied}"
        if lost:
            raise DamageError(f"the database lost writes it held: {lost} at {when} ({MARK_FILE}); "
                              "a LevelDB file was cut short or replaced")

    # --- the format

    def _check_format(self) -> None:
        fmt = self.db.get(_FORMAT, verify_checksums=True)
        if fmt is None:
            if next(self.db.iterator(include_value=False, verify_checksums=True), None) is not None:
                raise StorageError(f"{self.path} holds data of an older zraft (no m/format); "
                                   "move it away, or restore a snapshot into a fresh data dir")
            self.db.put(_FORMAT, FORMAT, sync=True)
        elif fmt in _UPGRADABLE:
            self._upgrade(fmt)
        elif fmt != FORMAT:
            raise StorageError(f"{self.path} has storage format {fmt!r}; this zraft reads {FORMAT!r}")

    def _upgrade(self, fmt: bytes) -> None:
        """Format 2 or 3 to 4: every record sealed with its checksum (and, from 2, every log record
        given its entry type: all were normal).

        The state machine is copied, sealed, into a new generation, in unsynced batches; then one
        synced batch seals the log and the metadata, makes the new generation live and sets the
        format. A crash before that batch leaves the old format whole (the half-copied generation is
        garbage, collected later), after it the new one; the old generation is garbage then.
        """
        db = self.db
        old_gen_raw = db.get(_GEN, verify_checksums=True)
        old_gen = _U32.unpack(old_gen_raw)[0] if old_gen_raw else 0
        new_gen = max([old_gen, *_generations(db)]) + 1
        if new_gen > _MAX_GEN:
            raise StorageError(f"{self.path}: state machine generations exhausted, cannot upgrade")
        copied = 0
        for kind in (_DATA, _SESSION):
            src, dst = _gen_prefix(kind, old_gen), _gen_prefix(kind, new_gen)
            wb, size = db.write_batch(), 0
            with db.iterator(prefix=src, verify_checksums=True) as it:
                for k, v in it:
                    key = dst + k[len(src):]
                    wb.put(key, _seal(key, v))
                    size += len(key) + len(v)
                    copied += 1
                    if size >= 4 << 20:
                        wb.write()
                        wb, size = db.write_batch(), 0
            wb.write()
        with db.write_batch(sync=True) as wb:
            with db.iterator(prefix=_LOG, verify_checksums=True) as it:
                for key, value in it:
                    payload = value[:8] + _TYPE_BYTES[0] + value[8:] if fmt == b"2" else value
                    wb.put(key, _seal(key, payload))
            for meta in (_HARD_STATE, _LOG_START, _APPLIED):
                raw = db.get(meta, verify_checksums=True)
                if raw is not None:
                    wb.put(meta, _seal(meta, raw))
            wb.put(_GEN, _seal(_GEN, _U32.pack(new_gen)))
            wb.put(_FORMAT, FORMAT)
        logger.info("%s: storage format %s upgraded to %s (%d state records sealed)", self.path,
                 fmt.decode(), FORMAT.decode(), copied)

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
        # (A backup's membership stays behind: a restored cluster is a new one, bootstrapped from Config.txt.)
        n = sum(_write_chunk(db, _without_config(data), 0) for data in chunks)
        with db.write_batch(sync=True) as wb:
            wb.put(_FORMAT, FORMAT)
            wb.put(_HARD_STATE, _seal(_HARD_STATE, msgpack.packb([term, None])))
            wb.put(_LOG_START, _seal(_LOG_START, msgpack.packb([index, term])))
            wb.put(_APPLIED, _seal(_APPLIED, _U64X2.pack(index, term)))
        return n
    finally:
        db.close()


def _without_config(data: bytes) -> bytes:
    records = decode_chunk(data)
    if all(kind != REC_CONFIG for kind, _, _ in records):
        return data
    return b"".join(chunked([r for r in records if r[0] != REC_CONFIG], 1 << 62))
