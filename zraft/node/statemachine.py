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
the new applied index, through a :class:`KVBackend` (LevelDB in a node, a dict in
tests). Another state machine can replace it by offering ``apply`` and ``get``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from zraft.raft.messages import Entry, EntryType

PUT, DELETE, CAS = 1, 2, 3


Session = tuple[int, int] | None  # (client_id, seq)


def encode_put(key: bytes, value: bytes, session: Session = None) -> bytes:
    return msgpack.packb((PUT, key, value, session), use_bin_type=True)


def encode_delete(key: bytes, session: Session = None) -> bytes:
    return msgpack.packb((DELETE, key, session), use_bin_type=True)


def encode_cas(key: bytes, expect: bytes | None, value: bytes, session: Session = None) -> bytes:
    return msgpack.packb((CAS, key, expect, value, session), use_bin_type=True)


SESSION_EXPIRED = "session_expired"
DEFAULT_MAX_SESSIONS = 10_000


@dataclass(slots=True)
class SessionRecord:
    seq: int  # the client's last applied sequence number
    result: Any  # its result, returned again for a duplicate
    last_index: int  # log index of the client's last write: the LRU order


class KVBackend(Protocol):
    """Where the state lives. ``write`` must apply all updates and the applied index atomically."""

    def get(self, key: bytes) -> bytes | None: ...

    def write(self, updates: dict[bytes, bytes | None], applied_index: int,
              sessions: dict[int, SessionRecord | None] | None = None, applied_term: int = 0) -> None: ...

    def load_sessions(self) -> dict[int, SessionRecord]: ...

    @property
    def applied_index(self) -> int: ...

    @property
    def applied_term(self) -> int: ...


class StateMachine(Protocol):
    applied_index: int

    def apply(self, entries: list[Entry]) -> list[Any]: ...

    def get(self, key: bytes) -> bytes | None: ...


class KVStateMachine:
    """put / delete / cas over a :class:`KVBackend`.

    ``apply`` returns one result per entry: None for a no-op, else the fields of the
    client's ok reply (``{}`` for put, ``{"deleted": bool}``, ``{"swapped": bool, "value": ...}``).
    """

    def __init__(self, backend: KVBackend, max_sessions: int = DEFAULT_MAX_SESSIONS) -> None:
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
        for e in entries:
            if not e.data or e.type != EntryType.NORMAL:
                results.append(None)  # a no-op, or a configuration change (the core's, not ours)
                continue
            cmd = msgpack.unpackb(e.data, raw=False)
            session = cmd[-1]
            if session is not None:
                client_id, seq = session
                rec = self.sessions.get(client_id)
                if rec is not None and seq <= rec.seq:
                    results.append(rec.result if seq == rec.seq else _session_error(
                        f"sequence number {seq} of client {client_id} is older than its last, {rec.seq}"))
                    continue
                if rec is None and seq > 1:
                    results.append(_session_error(f"client {client_id}'s session expired; start a new one"))
                    continue
            result = _apply_one(cmd, current, updates, e.index)
            results.append(result)
            if session is not None:
                self.sessions[client_id] = session_updates[client_id] = SessionRecord(seq, result, e.index)
                # After each entry, not once per batch: what is forgotten must not depend on how
                # the entries were batched, or replicas (and a replay after restart) diverge.
                if len(self.sessions) > self.max_sessions:
                    self._evict_sessions(session_updates)
        self.applied_index, self.applied_term = entries[-1].index, entries[-1].term
        self.backend.write(updates, self.applied_index, session_updates, self.applied_term)
        return results

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


class MemoryKV:
    """A dict backend, for tests and simulations."""

    def __init__(self, items: Iterable[tuple[bytes, bytes]] = (), applied_index: int = 0,
                 applied_term: int = 0) -> None:
        self.data = dict(items)
        self._applied = applied_index
        self._applied_term = applied_term
        self.sessions: dict[int, SessionRecord] = {}

    def load_sessions(self) -> dict[int, SessionRecord]:
        return dict(self.sessions)

    @property
    def applied_index(self) -> int:
        return self._applied

    @property
    def applied_term(self) -> int:
        return self._applied_term

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def write(self, updates: dict[bytes, bytes | None], applied_index: int,
              sessions: dict[int, SessionRecord | None] | None = None, applied_term: int = 0) -> None:
        for k, v in updates.items():
            if v is None:
                self.data.pop(k, None)
            else:
                self.data[k] = v
        for client_id, rec in (sessions or {}).items():
            if rec is None:
                self.sessions.pop(client_id, None)
            else:
                self.sessions[client_id] = rec
        self._applied, self._applied_term = applied_index, applied_term
