"""The replicated key-value state machine and its command encoding.

A command is the msgpack encoding of a short list, made once when the client's
request arrives and then stored, replicated and applied as those same bytes:

    [PUT, key, value, session]   [DELETE, key, session]   [CAS, key, expect or None, value, session]
    [TXN, compares, success ops, failure ops, session]

A transaction's compare is ``[key, target, cmp, operand]`` (zraft.node.mvcc's TARGETS and CMPS by
position); its ops are ``[PUT, key, value]``, ``[DELETE, key]``, ``[GET, key]`` and
``[RANGE, start, end or None, limit (0: none), keys_only]``. Every write is given a revision
(zraft.node.mvcc): the results carry it, each key's metadata and the watch history record it.

``session`` is None or [client_id, seq]: exactly-once client sessions (Raft thesis 6.3).
The state machine remembers each client's last sequence number and result, so a
write the client retried after losing the reply is answered from that memory instead
of being applied twice. Sessions live beside the data, change in the same atomic
batch, and are bounded: past ``max_sessions`` the least recently used ones are
forgotten (deterministically: by log index, so every replica forgets the same ones),
and a later request in a forgotten session is refused with ``session_expired``.

:class:`KVStateMachine` applies a batch of committed entries atomically together with
the new applied index, through a state store (zraft.node.interfaces.StateStore: LevelDB in a
node, dicts in tests and the simulation). Another state machine can replace it by offering
what zraft.node.interfaces.StateMachine asks for.

Snapshot chunks (a snapshot stream, a backup) carry the state as records: a msgpack flat list
``[kind, key, value, kind, key, value, ...]`` with kind :data:`REC_DATA` (a key and its value)
or :data:`REC_SESSION` (an 8-byte big-endian client id and its :func:`encode_session` record)
or :data:`REC_CONFIG` (an empty key and the membership, zraft.raft.confchange, as of the snapshot);
both stores cut and read chunks with :func:`chunked` and :func:`decode_chunk`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from zraft.client.protocol import BAD_REQUEST, LEASE_NOT_FOUND, SESSION_EXPIRED
from zraft.node import mvcc
from zraft.node.mvcc import (  # (the command codes live in mvcc, for the wire protocol; used by their names here)
    CAS,
    DELETE,
    GET,
    LEASE_GRANT,
    LEASE_KEEPALIVE,
    LEASE_REVOKE,
    LEGACY_META,
    MAX_TXN_OPS,
    PUT,
    PUT_LEASE,
    RANGE,
    REC_EVENT,
    REC_KEYMETA,
    REC_LEASE,
    REC_LEASE_KEY,
    REC_META,
    TXN,
    KeyMeta,
    StoreMeta,
)
from zraft.raft.confchange import Membership
from zraft.raft.messages import Entry, EntryType

if TYPE_CHECKING:
    from zraft.node.interfaces import StateStore


Session = tuple[int, int] | None  # (client_id, seq)


def encode_put(key: bytes, value: bytes, session: Session = None) -> bytes:
    return msgpack.packb((PUT, key, value, session), use_bin_type=True)


def encode_delete(key: bytes, session: Session = None) -> bytes:
    return msgpack.packb((DELETE, key, session), use_bin_type=True)


def encode_cas(key: bytes, expect: bytes | None, value: bytes, session: Session = None) -> bytes:
    return msgpack.packb((CAS, key, expect, value, session), use_bin_type=True)


def encode_txn(compares: list, success: list, failure: list, session: Session = None) -> bytes:
    return msgpack.packb((TXN, compares, success, failure, session), use_bin_type=True)


def encode_put_lease(key: bytes, value: bytes, lease: int, session: Session = None) -> bytes:
    return msgpack.packb((PUT_LEASE, key, value, lease, session), use_bin_type=True)


def encode_lease_op(op: int, lease: int, ttl: int | None = None, session: Session = None) -> bytes:
    """LEASE_GRANT (with its ttl), LEASE_KEEPALIVE or LEASE_REVOKE of ``lease``."""
    cmd = (op, lease, ttl, session) if op == LEASE_GRANT else (op, lease, session)
    return msgpack.packb(cmd, use_bin_type=True)


DEFAULT_MAX_SESSIONS = 10_000
DEFAULT_HISTORY_REVISIONS = 100_000
DEFAULT_HISTORY_BYTES = 64 << 20
_MAX_ID = (1 << 63) - 1


def check_command(data: bytes, max_key_bytes: int, max_value_bytes: int) -> str | None:
    """Why a command (a normal entry's data) is not one this state machine would have made from a valid
    request, or None if it is one. Entries from the network are checked with it, as requests are."""
    try:
        cmd = msgpack.unpackb(data, raw=False)
    except Exception:  # msgpack raises several unrelated exception types
        return "not a msgpack value"
    shape = _SHAPES.get(cmd[0]) if type(cmd) is list and cmd and type(cmd[0]) is int else None
    if shape is None or len(cmd) != len(shape):
        return f"not a command: {repr(cmd)[:60]}"
    return _check_fields(cmd, shape, max_key_bytes, max_value_bytes)


def _check_fields(cmd: list, shape: str, max_key_bytes: int, max_value_bytes: int) -> str | None:
    for value, kind in zip(cmd[1:], shape[1:], strict=True):
        if kind == "C":
            why = _check_compares(value, max_key_bytes, max_value_bytes)
        elif kind == "B":
            why = _check_ops(value, max_key_bytes, max_value_bytes)
        else:
            why = _check_scalar(value, kind, max_key_bytes, max_value_bytes)
        if why:
            return why
    return None


def _check_scalar(value: Any, kind: str, max_key_bytes: int, max_value_bytes: int) -> str | None:
    if kind == "k" and not (type(value) is bytes and len(value) <= max_key_bytes):
        return "a key that is not bin within the key limit"
    if kind == "K" and not (value is None or (type(value) is bytes and len(value) <= max_key_bytes)):
        return "a range end that is not bin (or nil) within the key limit"
    if kind == "v" and not (type(value) is bytes and len(value) <= max_value_bytes):
        return "a value that is not bin within the value limit"
    if kind == "e" and not (value is None or (type(value) is bytes and len(value) <= max_value_bytes)):
        return "an expected value that is not bin (or nil) within the value limit"
    if kind == "s" and not (value is None or (type(value) is list and len(value) == 2 and all(
            type(x) is int and 0 < x <= _MAX_ID for x in value))):
        return "a session that is not nil or [client_id, seq]"
    if kind == "n" and not (type(value) is int and 0 <= value <= _MAX_ID):
        return "a limit that is not a non-negative integer"
    if kind == "b" and type(value) is not bool:
        return "a flag that is not a bool"
    if kind == "L" and not (type(value) is int and 0 < value <= _MAX_ID):
        return "a lease id that is not a positive integer"
    if kind == "t" and not (type(value) is int and 0 < value <= mvcc.MAX_TTL):
        return "a TTL that is not a positive number of seconds"
    return None


def _check_compares(compares: Any, max_key_bytes: int, max_value_bytes: int) -> str | None:
    if type(compares) is not list or len(compares) > MAX_TXN_OPS:
        return f"a transaction's compares are a list of at most {MAX_TXN_OPS}"
    for c in compares:
        if not (type(c) is list and len(c) == 4 and type(c[0]) is bytes and len(c[0]) <= max_key_bytes
                and type(c[1]) is int and 0 <= c[1] < len(mvcc.TARGETS) and type(c[2]) is int
                and 0 <= c[2] < len(mvcc.CMPS)):
            return "a compare that is not [key, target, cmp, operand]"
        target, operand = c[1], c[3]
        if target == mvcc.TARGET_VALUE and not (type(operand) is bytes and len(operand) <= max_value_bytes):
            return "a value compare whose operand is not bin within the value limit"
        if target == mvcc.TARGET_EXISTS and not (type(operand) is bool and c[2] < 2):
            return "an exists compare takes == or != and a bool"
        if target not in (mvcc.TARGET_VALUE, mvcc.TARGET_EXISTS) and not (type(operand) is int
                                                                         and 0 <= operand <= _MAX_ID):
            return "a version or revision compare whose operand is not a non-negative integer"
    return None


def _check_ops(ops: Any, max_key_bytes: int, max_value_bytes: int) -> str | None:
    if type(ops) is not list or len(ops) > MAX_TXN_OPS:
        return f"a transaction's branch is a list of at most {MAX_TXN_OPS} requests"
    written: set[bytes] = set()
    for op in ops:
        shape = _TXN_SHAPES.get(op[0]) if type(op) is list and op and type(op[0]) is int else None
        if shape is None or len(op) != len(shape):
            return f"not a transaction request: {repr(op)[:60]}"
        why = _check_fields(op, shape, max_key_bytes, max_value_bytes)
        if why:
            return why
        if op[0] in (PUT, DELETE, PUT_LEASE):
            if op[1] in written:
                return "a key written twice in one transaction branch"
            written.add(op[1])
    return None


# Command layouts: op, then k(ey), v(alue), e(xpected value or nil), s(ession or nil), C(ompares),
# B(ranch: a list of requests), K (a range end: key or nil), n (a limit), b (a flag).
_SHAPES = {PUT: "okvs", DELETE: "oks", CAS: "okevs", TXN: "oCBBs", PUT_LEASE: "okvLs", LEASE_GRANT: "oLts",
           LEASE_KEEPALIVE: "oLs", LEASE_REVOKE: "oLs"}
_TXN_SHAPES = {PUT: "okv", DELETE: "ok", GET: "ok", RANGE: "okKnb", PUT_LEASE: "okvL"}


@dataclass(slots=True)
class SessionRecord:
    seq: int  # the client's last applied sequence number
    result: Any  # its result, returned again for a duplicate
    last_index: int  # log index of the client's last write: the LRU order


class KVStateMachine:
    """put / delete / cas / txn over a state store, with revisions, key metadata and a watch history.

    ``apply`` returns one result per entry: None for a no-op, else the fields of the client's ok
    reply (``{"revision"}`` for put, ``{"deleted", "revision"}``, ``{"swapped", "value", "revision"}``,
    ``{"succeeded", "responses", "revision"}``). After it, ``events`` holds the changes that batch
    made, oldest first (what a watcher waits for). The history keeps the events of the last
    ``history_revisions`` revisions, within ``history_bytes`` (the newest revision always).
    """

    def __init__(self, backend: StateStore, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 history_revisions: int = DEFAULT_HISTORY_REVISIONS,
                 history_bytes: int = DEFAULT_HISTORY_BYTES) -> None:
        self.backend = backend
        self.max_sessions = max_sessions
        self.history_revisions = max(1, history_revisions)
        self.history_bytes = history_bytes
        self.events: list[dict[str, Any]] = []
        self.lease_changes: list[tuple[str, int, int]] = []  # the last apply's grants, keepalives, revokes
        self.reload()

    def reload(self) -> None:
        """Take the backend's state as it is now (after a snapshot replaced it, say)."""
        backend = self.backend
        self.applied_index = backend.applied_index
        self.applied_term = backend.applied_term
        self.sessions = backend.load_sessions()
        self.meta = StoreMeta.decode(backend.table_get(REC_META, b""))
        self._metas = _MetaCache(backend)
        # The history's revisions, oldest first: (revision, bytes, event keys). Rebuilt from the table.
        self._history: deque[tuple[int, int, list[bytes]]] = deque()
        self._history_size = 0
        for k, v in backend.table_scan(REC_EVENT):
            self._remember(mvcc.event_revision(k), k, len(k) + len(v))
        self.events = []
        self.lease_changes = []

    @property
    def revision(self) -> int:
        return self.meta.revision

    @property
    def compacted(self) -> int:
        """The last revision whose events the history no longer holds (0: it holds them all)."""
        return self.meta.compacted

    def get(self, key: bytes) -> bytes | None:
        return self.backend.get(key)

    def leases(self) -> dict[int, int]:
        """Every lease and its TTL (a new leader gives each its full TTL again)."""
        return {mvcc.lease_id(k): mvcc.decode_lease(v) for k, v in self.backend.table_scan(REC_LEASE)}

    def lease_keys(self, lease: int) -> list[bytes]:
        return _Batch(self.backend, self.meta.revision, self._metas).lease_keys(lease)

    def get_meta(self, key: bytes) -> KeyMeta | None:
        """A key's metadata, None if the key does not exist."""
        return self._metas.get(key)

    def range(self, start: bytes, end: bytes | None, limit: int = 0, keys_only: bool = False,
              max_bytes: int = 1 << 62) -> tuple[list[list], bool]:
        """``[key, value or None, mod_revision]`` of the keys in [start, end) in key order, and whether
        more follow: at most ``limit`` (0: no limit), cut short past ``max_bytes`` (at least one key)."""
        return _range(_StoreView(self.backend), start, end, limit, keys_only, max_bytes)

    def watch_events(self, start_revision: int, start: bytes, end: bytes | None, max_events: int = 1000,
                     max_scan: int = 20_000) -> tuple[list[dict[str, Any]], int]:
        """The history's events with revision >= ``start_revision`` on keys in [start, end), in order, and
        the revision up to which they are complete (a watcher asks again from the one after it).
        :class:`Compacted` if the history no longer reaches back to ``start_revision``."""
        if self.meta.compacted and start_revision <= self.meta.compacted:
            raise Compacted(self.meta.compacted)
        out: list[dict[str, Any]] = []
        last = None
        for scanned, (k, raw) in enumerate(self.backend.table_scan(REC_EVENT, mvcc.event_key(start_revision, 0))):
            rev = mvcc.event_revision(k)
            if rev != last and (len(out) >= max_events or scanned >= max_scan):
                return out, rev - 1  # (every revision before ``rev`` was looked at whole)
            last = rev
            ev = mvcc.decode_event(k, raw)
            if mvcc.in_range(ev["key"], start, end):
                out.append(ev)
        return out, self.meta.revision

    def apply(self, entries: list[Entry]) -> list[Any]:
        if not entries:
            return []
        if entries[0].index != self.applied_index + 1:
            raise AssertionError(f"apply of {entries[0].index} after {self.applied_index}: a gap or a replay")
        batch = _Batch(self.backend, self.meta.revision, self._metas)
        session_updates: dict[int, SessionRecord | None] = {}
        results: list[Any] = []
        membership: bytes | None = None
        for e in entries:
            if not e.data or e.type != EntryType.NORMAL:
                if e.type == EntryType.CONFIG:
                    membership = e.data  # kept beside the data: snapshots carry the configuration
                results.append(None)  # a no-op, or a configuration change (the core's, not ours)
                continue
            cmd = msgpack.unpackb(e.data, raw=False)
            session = cmd[-1]
            answered = self._duplicate(session) if session is not None else None
            if answered is not None:
                results.append(answered)
                continue
            result = batch.command(cmd, e.index)
            results.append(result)
            if session is not None:
                client_id, seq = session
                self.sessions[client_id] = session_updates[client_id] = SessionRecord(seq, result, e.index)
                # After each entry, not once per batch: what is forgotten must not depend on how
                # the entries were batched, or replicas (and a replay after restart) diverge.
                if len(self.sessions) > self.max_sessions:
                    self._evict_sessions(session_updates)
        self.applied_index, self.applied_term = entries[-1].index, entries[-1].term
        tables = self._record_events(batch)
        self.backend.write(batch.updates, self.applied_index, session_updates, self.applied_term, membership,
                           tables)
        self._metas.update(batch.metas)  # (after the write: the cache never runs ahead of the store)
        return results

    def _record_events(self, batch: _Batch) -> dict[int, dict[bytes, bytes | None]] | None:
        """The batch's events into the history (trimmed to its bounds), and the tables' updates."""
        self.events = batch.events
        self.lease_changes = batch.lease_changes
        tables = {kind: rows for kind, rows in batch.rows.items() if rows}
        if batch.metas:
            tables[REC_KEYMETA] = {k: None if m is None else m.encode() for k, m in batch.metas.items()}
        if not batch.events:
            return tables or None
        history: dict[bytes, bytes | None] = {}
        for ev, (k, v) in zip(batch.events, batch.event_records, strict=True):
            history[k] = v
            self._remember(ev["revision"], k, len(k) + len(v))
        compacted = self.meta.compacted
        while len(self._history) > 1 and (len(self._history) > self.history_revisions
                                          or self._history_size > self.history_bytes):
            rev, size, keys = self._history.popleft()
            self._history_size -= size
            for k in keys:
                history[k] = None
            compacted = rev
        self.meta = StoreMeta(batch.revision, compacted)
        return {**tables, REC_EVENT: history, REC_META: {b"": self.meta.encode()}}

    def _remember(self, revision: int, key: bytes, size: int) -> None:
        if self._history and self._history[-1][0] == revision:
            _, total, keys = self._history[-1]
            keys.append(key)
            self._history[-1] = (revision, total + size, keys)
        else:
            self._history.append((revision, size, [key]))
        self._history_size += size

    def _duplicate(self, session: list[int]) -> Any:
        """The answer to a write its session has seen already (or can no longer tell); None for a new one."""
        client_id, seq = session
        rec = self.sessions.get(client_id)
        if rec is not None and seq <= rec.seq:
            return rec.result if seq == rec.seq else _session_error(
                f"sequence number {seq} of client {client_id} is older than its last, {rec.seq}")
        if rec is None and seq > 1:
            return _session_error(f"client {client_id}'s session expired; start a new one")
        return None

    def _evict_sessions(self, session_updates: dict[int, SessionRecord | None]) -> None:
        """Forget the least recently used sessions, down to 90% of the bound (amortized)."""
        keep = self.max_sessions * 9 // 10
        by_age = sorted(self.sessions.items(), key=lambda kv: kv[1].last_index)
        for client_id, _ in by_age[: len(self.sessions) - keep]:
            del self.sessions[client_id]
            session_updates[client_id] = None


class _MetaCache:
    """Key metadata as the store holds it (None: no such key), for the keys read or written lately: a put
    reads its key's metadata, and most puts go to keys written before. Exact, not a guess: every apply
    updates it after its write, and a snapshot install (reload) starts a new one. Bounded: it starts
    over once it holds ``MAX`` keys."""

    MAX = 200_000

    def __init__(self, backend: StateStore) -> None:
        self.backend = backend
        self.metas: dict[bytes, KeyMeta | None] = {}

    def get(self, key: bytes) -> KeyMeta | None:
        try:
            return self.metas[key]
        except KeyError:
            meta = self.metas[key] = _stored_meta(self.backend, key)
            self._bound()
            return meta

    def update(self, metas: dict[bytes, KeyMeta | None]) -> None:
        self.metas.update(metas)
        self._bound()

    def _bound(self) -> None:
        if len(self.metas) > self.MAX:
            self.metas.clear()


def _stored_meta(backend: StateStore, key: bytes) -> KeyMeta | None:
    """A stored key's metadata (a key has it exactly while it exists, unless written before revisions)."""
    raw = backend.table_get(REC_KEYMETA, key)
    if raw is not None:
        return KeyMeta.decode(raw)
    return LEGACY_META if backend.get(key) is not None else None


class Compacted(Exception):
    """A watch from a revision the history no longer holds; ``revision`` is the last one it lost."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"the history no longer holds revision {revision} and those before it")
        self.revision = revision


class _StoreView:
    """Reads of the store as it is (no batch in progress)."""

    def __init__(self, backend: StateStore) -> None:
        self.backend = backend

    def scan(self, start: bytes, end: bytes | None) -> Iterator[tuple[bytes, bytes, int]]:
        """(key, value, mod_revision) in [start, end), in key order: the data and the metadata tables
        walked side by side (a key without metadata is older than revisions)."""
        metas = self.backend.table_scan(REC_KEYMETA, start, end)
        mk, mv = next(metas, (None, b""))
        for k, v in self.backend.data_scan(start, end):
            while mk is not None and mk < k:
                mk, mv = next(metas, (None, b""))
            yield k, v, (KeyMeta.decode(mv).mod_revision if mk == k else mvcc.FIRST_REVISION)


class _Batch(_StoreView):
    """One apply batch: its writes (seen by the later commands in it), new key metadata and events."""

    def __init__(self, backend: StateStore, revision: int, stored: _MetaCache) -> None:
        super().__init__(backend)
        self.revision = revision  # the store's revision after the commands so far
        self.stored = stored
        self.updates: dict[bytes, bytes | None] = {}
        self.metas: dict[bytes, KeyMeta | None] = {}  # the key metadata this batch writes (None: deleted)
        self.events: list[dict[str, Any]] = []
        self.event_records: list[tuple[bytes, bytes]] = []
        self._first_of_revision = 0  # the position in ``events`` of the newest revision's first event
        self.rows: dict[int, dict[bytes, bytes | None]] = {REC_LEASE: {}, REC_LEASE_KEY: {}}  # leases' tables
        self.lease_changes: list[tuple[str, int, int]] = []  # ("grant" | "keepalive" | "revoke", lease, ttl)

    def value(self, key: bytes) -> bytes | None:
        return self.updates[key] if key in self.updates else self.backend.get(key)

    def meta(self, key: bytes) -> KeyMeta | None:
        if key in self.metas:  # written in this batch (None: deleted)
            return self.metas[key]
        return self.stored.get(key)

    def scan(self, start: bytes, end: bytes | None) -> Iterator[tuple[bytes, bytes, int]]:
        """The store's scan with this batch's writes laid over it."""
        mine = sorted(k for k in self.updates if mvcc.in_range(k, start, end))
        i = 0
        for k, v, rev in super().scan(start, end):
            while i < len(mine) and mine[i] < k:
                yield from self._own(mine[i])
                i += 1
            if i < len(mine) and mine[i] == k:
                i += 1
                yield from self._own(k)
            else:
                yield k, v, rev
        for k in mine[i:]:
            yield from self._own(k)

    def _own(self, key: bytes) -> Iterator[tuple[bytes, bytes, int]]:
        value = self.updates[key]
        if value is not None:
            meta = self.meta(key)
            yield key, value, meta.mod_revision if meta else 0

    # --- leases

    def lease_ttl(self, lease: int) -> int | None:
        k = mvcc.lease_key(lease)
        rows = self.rows[REC_LEASE]
        raw = rows[k] if k in rows else self.backend.table_get(REC_LEASE, k)
        return None if raw is None else mvcc.decode_lease(raw)

    def lease_keys(self, lease: int) -> list[bytes]:
        """The keys attached to ``lease`` (the store's index with this batch's changes laid over it)."""
        prefix = mvcc.lease_key(lease)
        rows = self.rows[REC_LEASE_KEY]
        keys = {k for k, _ in self.backend.table_scan(REC_LEASE_KEY, prefix, mvcc.lease_key(lease + 1))
                if rows.get(k, b"") is not None}
        keys |= {k for k, v in rows.items() if k.startswith(prefix) and v is not None}
        return sorted(k[8:] for k in keys)

    def _attach(self, key: bytes, old: int, new: int) -> None:
        if old != new:
            if old:
                self.rows[REC_LEASE_KEY][mvcc.lease_key(old) + key] = None
            if new:
                self.rows[REC_LEASE_KEY][mvcc.lease_key(new) + key] = b""

    # --- writes, all at revision ``rev`` (the next one)

    def put(self, key: bytes, value: bytes, rev: int, lease: int = 0) -> None:
        """As etcd: a put without a lease detaches the key from the lease it had."""
        old = self.meta(key)
        meta = KeyMeta(rev, rev, 1, lease) if old is None else KeyMeta(old.create_revision, rev, old.version + 1,
                                                                       lease)
        self._attach(key, old.lease if old else 0, lease)
        self.updates[key] = value
        self.metas[key] = meta
        self._event(rev, mvcc.EVENT_PUT, key, value)

    def delete(self, key: bytes, rev: int) -> bool:
        old = self.meta(key)
        if old is None:
            return False
        self._attach(key, old.lease, 0)
        self.updates[key] = None
        self.metas[key] = None
        self._event(rev, mvcc.EVENT_DELETE, key, None)
        return True

    def _event(self, rev: int, kind: int, key: bytes, value: bytes | None) -> None:
        seq = len(self.events) - self._first_of_revision if self.events and self.events[-1]["revision"] == rev else 0
        if not seq:
            self._first_of_revision = len(self.events)
        self.event_records.append((mvcc.event_key(rev, seq), mvcc.encode_event(kind, key, value)))
        self.events.append({"type": mvcc.EVENT_TYPES[kind], "key": key, "value": value, "revision": rev})

    # --- commands

    def command(self, cmd: list, index: int) -> dict[str, Any]:
        op, rev = cmd[0], self.revision + 1
        wrote = len(self.events)
        if op in (PUT, DELETE, CAS, PUT_LEASE):
            result = self._key_command(cmd, rev)
        elif op == TXN:
            result = self._txn(cmd, rev)
        elif op in (LEASE_GRANT, LEASE_KEEPALIVE, LEASE_REVOKE):
            result = self._lease_op(cmd, rev)
        else:
            raise ValueError(f"unknown command {op!r} at index {index}")
        if len(self.events) > wrote:
            self.revision = rev
        if "error" not in result:
            result["revision"] = self.revision
        return result

    def _key_command(self, cmd: list, rev: int) -> dict[str, Any]:
        op = cmd[0]
        if op == PUT:
            self.put(cmd[1], cmd[2], rev)
            return {}
        if op == DELETE:
            return {"deleted": self.delete(cmd[1], rev)}
        if op == PUT_LEASE:
            refused = self._no_lease(cmd[3])
            if refused:
                return refused
            self.put(cmd[1], cmd[2], rev, cmd[3])
            return {}
        now = self.value(cmd[1])  # cas
        swapped = now == cmd[2]
        if swapped:
            self.put(cmd[1], cmd[3], rev)
            now = cmd[3]
        return {"swapped": swapped, "value": now}

    def _no_lease(self, lease: int) -> dict[str, Any] | None:
        """The error result for a lease that does not exist (None if it does)."""
        return _lease_not_found(lease) if self.lease_ttl(lease) is None else None

    def _lease_op(self, cmd: list, rev: int) -> dict[str, Any]:
        op, lease = cmd[0], cmd[1]
        k = mvcc.lease_key(lease)
        if op == LEASE_GRANT:
            if self.lease_ttl(lease) is not None:
                return {"error": BAD_REQUEST, "message": f"lease {lease} exists already"}
            self.rows[REC_LEASE][k] = mvcc.encode_lease(cmd[2])
            self.lease_changes.append(("grant", lease, cmd[2]))
            return {"lease": lease, "ttl": cmd[2]}
        ttl = self.lease_ttl(lease)
        if ttl is None:
            return _lease_not_found(lease)
        if op == LEASE_KEEPALIVE:
            self.lease_changes.append(("keepalive", lease, ttl))
            return {"ttl": ttl}
        for key in self.lease_keys(lease):  # revoke: the lease and its keys go, at one revision
            self.delete(key, rev)
        self.rows[REC_LEASE][k] = None
        self.lease_changes.append(("revoke", lease, ttl))
        return {}

    def _txn(self, cmd: list, rev: int) -> dict[str, Any]:
        succeeded = all(mvcc.compare_holds(target, cmp, operand, self.value(key), self.meta(key))
                        for key, target, cmp, operand in cmd[1])
        branch = cmd[2] if succeeded else cmd[3]
        for op in branch:  # as etcd: a put to a lease that does not exist fails the whole transaction
            refused = self._no_lease(op[3]) if op[0] == PUT_LEASE else None
            if refused:
                return refused
        responses = []
        for op in branch:
            kind = op[0]
            if kind in (PUT, PUT_LEASE):
                self.put(op[1], op[2], rev, op[3] if kind == PUT_LEASE else 0)
                responses.append({"ok": True})
            elif kind == DELETE:
                responses.append({"ok": True, "deleted": self.delete(op[1], rev)})
            elif kind == GET:
                responses.append({"ok": True, "value": self.value(op[1])})
            else:  # RANGE
                kvs, more = _range(self, op[1], op[2], op[3], op[4], TXN_RANGE_BYTES)
                responses.append({"ok": True, "kvs": kvs, "more": more})
        return {"succeeded": succeeded, "responses": responses}


TXN_RANGE_BYTES = 1 << 20  # a range inside a transaction answers at most about this much (then "more")


def _range(view: _StoreView, start: bytes, end: bytes | None, limit: int, keys_only: bool,
           max_bytes: int) -> tuple[list[list], bool]:
    out: list[list] = []
    size = 0
    for k, v, rev in view.scan(start, end):
        if (limit and len(out) >= limit) or (out and size >= max_bytes):
            return out, True
        out.append([k, None if keys_only else v, rev])
        size += len(k) + (0 if keys_only else len(v)) + 12
    return out, False


def _lease_not_found(lease: int) -> dict[str, Any]:
    return {"error": LEASE_NOT_FOUND, "message": f"lease {lease} does not exist (expired or revoked?)"}


def _session_error(message: str) -> dict[str, str]:
    return {"error": SESSION_EXPIRED, "message": message}


class AppliedMark:
    """The applied index, and the term of that entry, that a state store keeps with its data."""

    _applied: int
    _applied_term: int

    @property
    def applied_index(self) -> int:
        return self._applied

    @property
    def applied_term(self) -> int:
        return self._applied_term


# ---------------------------------------------------------------------- records and chunks

REC_DATA, REC_SESSION, REC_CONFIG = 0, 1, 2  # record kinds in a snapshot chunk (3-7: zraft.node.mvcc's)
TABLE_KINDS = (REC_META, REC_EVENT, REC_KEYMETA, REC_LEASE, REC_LEASE_KEY)  # the coordination API's tables
RECORD_KINDS = (REC_DATA, REC_SESSION, REC_CONFIG, *TABLE_KINDS)
DEFAULT_CHUNK_BYTES = 256 << 10


def encode_session(rec: SessionRecord) -> bytes:
    return msgpack.packb([rec.seq, rec.result, rec.last_index], use_bin_type=True)


def decode_session(raw: bytes) -> SessionRecord:
    return SessionRecord(*msgpack.unpackb(raw, raw=False))


def chunked(records: Iterable[tuple[int, bytes, bytes]], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """Records ``(kind, key, value)`` as snapshot chunks of about ``chunk_bytes`` or less, lazily."""
    flat: list = []
    size = 0
    for kind, k, v in records:
        flat += (kind, k, v)
        size += len(k) + len(v) + 8
        if size >= chunk_bytes:
            yield msgpack.packb(flat, use_bin_type=True)
            flat, size = [], 0
    if flat:
        yield msgpack.packb(flat, use_bin_type=True)


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
        if kind not in RECORD_KINDS or type(k) is not bytes or type(v) is not bytes:
            raise ValueError(f"bad snapshot record {flat[i:i + 3]!r}")
        if kind in TABLE_KINDS:
            _check_table_record(kind, k, v)
        elif kind == REC_CONFIG:
            if k:
                raise ValueError("a configuration record's key is empty")
            Membership.decode(v)
        elif kind == REC_SESSION:
            if len(k) != 8:
                raise ValueError("a session record's key is an 8-byte client id")
            _check_session(v)
        out.append((kind, k, v))
    return out


def _check_session(raw: bytes) -> None:
    try:
        seq, _result, last_index = msgpack.unpackb(raw, raw=False)
    except Exception as exc:  # msgpack's several exception types, or not three fields
        raise ValueError(f"bad session record {raw[:40]!r}: {exc}") from exc
    if type(seq) is not int or type(last_index) is not int:
        raise ValueError(f"bad session record {raw[:40]!r}")


def _check_table_record(kind: int, key: bytes, value: bytes) -> None:
    if kind == REC_META:
        if key:
            raise ValueError("the store metadata record's key is empty")
        StoreMeta.decode(value)
    elif kind == REC_KEYMETA:
        KeyMeta.decode(value)
    elif kind == REC_LEASE:
        if len(key) != 8:
            raise ValueError("a lease record's key is an 8-byte lease id")
        mvcc.decode_lease(value)
    elif kind == REC_LEASE_KEY:
        if len(key) < 8 or value:
            raise ValueError("a lease's key record is a lease id and a key, with no value")
    else:
        mvcc.check_event(key, value)
