"""The replicated key-value state machine and its command encoding.

A command is the msgpack encoding of a short list, made once when the client's
request arrives and then stored, replicated and applied as those same bytes:

    [PUT, key, value, session]   [DELETE, key, session]   [CAS, key, expect or None, value, session]

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

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from zraft.client.protocol import SESSION_EXPIRED
from zraft.raft.confchange import Membership
from zraft.raft.messages import Entry, EntryType

if TYPE_CHECKING:
    from zraft.node.interfaces import StateStore

PUT, DELETE, CAS = 1, 2, 3


Session = tuple[int, int] | None  # (client_id, seq)


def encode_put(key: bytes, value: bytes, session: Session = None) -> bytes:
    return msgpack.packb((PUT, key, value, session), use_bin_type=True)


def encode_delete(key: bytes, session: Session = None) -> bytes:
    return msgpack.packb((DELETE, key, session), use_bin_type=True)


def encode_cas(key: bytes, expect: bytes | None, value: bytes, session: Session = None) -> bytes:
    return msgpack.packb((CAS, key, expect, value, session), use_bin_type=True)


DEFAULT_MAX_SESSIONS = 10_000
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
    for value, kind in zip(cmd[1:], shape[1:], strict=True):
        if kind == "k" and not (type(value) is bytes and len(value) <= max_key_bytes):
            return "a key that is not bin within the key limit"
        if kind == "v" and not (type(value) is bytes and len(value) <= max_value_bytes):
            return "a value that is not bin within the value limit"
        if kind == "e" and not (value is None or (type(value) is bytes and len(value) <= max_value_bytes)):
            return "an expected value that is not bin (or nil) within the value limit"
        if kind == "s" and not (value is None or (type(value) is list and len(value) == 2 and all(
                type(x) is int and 0 < x <= _MAX_ID for x in value))):
            return "a session that is not nil or [client_id, seq]"
    return None


# Command layouts: op, then k(ey), v(alue), e(xpected value or nil), s(ession or nil).
_SHAPES = {PUT: "okvs", DELETE: "oks", CAS: "okevs"}


@dataclass(slots=True)
class SessionRecord:
    seq: int  # the client's last applied sequence number
    result: Any  # its result, returned again for a duplicate
    last_index: int  # log index of the client's last write: the LRU order


class KVStateMachine:
    """put / delete / cas over a :class:`KVBackend`.

    ``apply`` returns one result per entry: None for a no-op, else the fields of the
    client's ok reply (``{}`` for put, ``{"deleted": bool}``, ``{"swapped": bool, "value": ...}``).
    """

    def __init__(self, backend: StateStore, max_sessions: int = DEFAULT_MAX_SESSIONS) -> None:
        self.backend = backend
        self.max_sessions = max_sessions
        self.reload()

    def reload(self) -> None:
        """Take the backend's state as it is now (after a snapshot replaced it, say)."""
        self.applied_index = self.backend.applied_index
        self.applied_term = self.backend.applied_term
        self.sessions = self.backend.load_sessions()

    def get(self, key: bytes) -> bytes | None:
        return self.backend.get(key)

    def apply(self, entries: list[Entry]) -> list[Any]:
        if not entries:
            return []
        if entries[0].index != self.applied_index + 1:
            raise AssertionError(f"apply of {entries[0].index} after {self.applied_index}: a gap or a replay")
        updates: dict[bytes, bytes | None] = {}  # this batch's writes, seen by later commands in it

        def current(key: bytes) -> bytes | None:
            return updates[key] if key in updates else self.backend.get(key)

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
            result = _apply_one(cmd, current, updates, e.index)
            results.append(result)
            if session is not None:
                client_id, seq = session
                self.sessions[client_id] = session_updates[client_id] = SessionRecord(seq, result, e.index)
                # After each entry, not once per batch: what is forgotten must not depend on how
                # the entries were batched, or replicas (and a replay after restart) diverge.
                if len(self.sessions) > self.max_sessions:
                    self._evict_sessions(session_updates)
        self.applied_index, self.applied_term = entries[-1].index, entries[-1].term
        self.backend.write(updates, self.applied_index, session_updates, self.applied_term, membership)
        return results

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


def _session_error(message: str) -> dict[str, str]:
    return {"error": SESSION_EXPIRED, "message": message}


def _apply_one(cmd: list, current, updates: dict[bytes, bytes | None], index: int) -> dict[str, Any]:
    op, key = cmd[0], cmd[1]
    if op == PUT:
        updates[key] = cmd[2]
        return {}
    if op == DELETE:
        existed = current(key) is not None
        updates[key] = None
        return {"deleted": existed}
    if op == CAS:
        now = current(key)
        swapped = now == cmd[2]
        if swapped:
            updates[key] = now = cmd[3]
        return {"swapped": swapped, "value": now}
    raise ValueError(f"unknown command {op!r} at index {index}")


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

REC_DATA, REC_SESSION, REC_CONFIG = 0, 1, 2  # record kinds in a snapshot chunk
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
        if kind not in (REC_DATA, REC_SESSION, REC_CONFIG) or type(k) is not bytes or type(v) is not bytes:
            raise ValueError(f"bad snapshot record {flat[i:i + 3]!r}")
        if kind == REC_CONFIG:
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
