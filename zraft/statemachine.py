"""The replicated key-value state machine and its command encoding.

A command is the msgpack encoding of a short list, made once when the client's
request arrives and then stored, replicated and applied as those same bytes:

    [PUT, key, value]   [DELETE, key]   [CAS, key, expect or None, value]

:class:`KVStateMachine` applies a batch of committed entries atomically together with
the new applied index, through a :class:`KVBackend` (LevelDB in a node, a dict in
tests). Another state machine can replace it by offering ``apply`` and ``get``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import msgpack

from zraft.raft.messages import Entry

PUT, DELETE, CAS = 1, 2, 3


def encode_put(key: bytes, value: bytes) -> bytes:
    return msgpack.packb((PUT, key, value), use_bin_type=True)


def encode_delete(key: bytes) -> bytes:
    return msgpack.packb((DELETE, key), use_bin_type=True)


def encode_cas(key: bytes, expect: bytes | None, value: bytes) -> bytes:
    return msgpack.packb((CAS, key, expect, value), use_bin_type=True)


class KVBackend(Protocol):
    """Where the state lives. ``write`` must apply all updates and the applied index atomically."""

    def get(self, key: bytes) -> bytes | None: ...

    def write(self, updates: dict[bytes, bytes | None], applied_index: int) -> None: ...

    @property
    def applied_index(self) -> int: ...


class StateMachine(Protocol):
    applied_index: int

    def apply(self, entries: list[Entry]) -> list[Any]: ...

    def get(self, key: bytes) -> bytes | None: ...


class KVStateMachine:
    """put / delete / cas over a :class:`KVBackend`.

    ``apply`` returns one result per entry: None for a no-op, else the fields of the
    client's ok reply (``{}`` for put, ``{"deleted": bool}``, ``{"swapped": bool, "value": ...}``).
    """

    def __init__(self, backend: KVBackend) -> None:
        self.backend = backend
        self.applied_index = backend.applied_index

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

        results: list[Any] = []
        for e in entries:
            if not e.data:
                results.append(None)
                continue
            cmd = msgpack.unpackb(e.data, raw=False)
            op, key = cmd[0], cmd[1]
            if op == PUT:
                updates[key] = cmd[2]
                results.append({})
            elif op == DELETE:
                existed = current(key) is not None
                updates[key] = None
                results.append({"deleted": existed})
            elif op == CAS:
                now = current(key)
                swapped = now == cmd[2]
                if swapped:
                    updates[key] = now = cmd[3]
                results.append({"swapped": swapped, "value": now})
            else:
                raise ValueError(f"unknown command {op!r} at index {e.index}")
        self.applied_index = entries[-1].index
        self.backend.write(updates, self.applied_index)
        return results


class MemoryKV:
    """A dict backend, for tests and simulations."""

    def __init__(self, items: Iterable[tuple[bytes, bytes]] = (), applied_index: int = 0) -> None:
        self.data = dict(items)
        self._applied = applied_index

    @property
    def applied_index(self) -> int:
        return self._applied

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def write(self, updates: dict[bytes, bytes | None], applied_index: int) -> None:
        for k, v in updates.items():
            if v is None:
                self.data.pop(k, None)
            else:
                self.data[k] = v
        self._applied = applied_index
