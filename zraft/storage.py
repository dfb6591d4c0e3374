"""Durable state of a node in one LevelDB database (plyvel).

Key layout (one keyspace, prefixes keep the parts apart and in order):

    m/hardstate       msgpack [term, voted_for]
    m/logstart        msgpack [snapshot_index, snapshot_term]: the log begins after these
    m/applied         8-byte big-endian applied index of the state machine
    l/<index>         8-byte big-endian index -> 8-byte big-endian term + command bytes
    d/<key>           the key-value state machine's data
    s/<client id>     8-byte big-endian client id -> msgpack [seq, result, last index]: a client session

Two kinds of writes, each one atomic WriteBatch:

* :meth:`LevelDBStorage.save`: new log entries (replacing any stored suffix they
  conflict with) and the hard state, with ``sync=True``: one fsync however many
  entries (group commit). Nothing that depends on them is sent before it returns.
* :meth:`LevelDBStorage.write`: a batch of applied updates together with the new
  applied index, without fsync: the entries are already durable in the log, and a
  lost apply is simply replayed. LevelDB's single write-ahead log keeps writes in
  order, so a crash leaves a prefix and never a half-applied batch.

:class:`MemoryStorage` has the same interface, for tests.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import msgpack
import plyvel

from zraft.raft.core import HardState
from zraft.raft.messages import Entry
from zraft.statemachine import MemoryKV, SessionRecord

_HARD_STATE = b"m/hardstate"
_LOG_START = b"m/logstart"
_APPLIED = b"m/applied"
_LOG = b"l/"
_DATA = b"d/"
_SESSION = b"s/"
_U64 = struct.Struct(">Q")


def _log_key(index: int) -> bytes:
    return _LOG + _U64.pack(index)


@dataclass
class LogState:
    """The persisted log: it begins after (snapshot_index, snapshot_term)."""

    snapshot_index: int
    snapshot_term: int
    entries: list[Entry]


class LevelDBStorage:
    def __init__(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = str(path)
        self.db = plyvel.DB(self.path, create_if_missing=True)
        raw = self.db.get(_APPLIED)
        self._applied = _U64.unpack(raw)[0] if raw else 0
        start = self.db.get(_LOG_START)
        self._snapshot_index, self._snapshot_term = msgpack.unpackb(start) if start else (0, 0)
        self._last_index = self._snapshot_index
        with self.db.iterator(prefix=_LOG, reverse=True, include_value=False) as it:
            for key in it:
                self._last_index = _U64.unpack(key[len(_LOG):])[0]
                break

    def close(self) -> None:
        self.db.close()

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
                entries.append(Entry(_U64.unpack_from(value)[0], _U64.unpack(key[len(_LOG):])[0], value[8:]))
        return LogState(self._snapshot_index, self._snapshot_term, entries)

    @property
    def last_index(self) -> int:
        return self._last_index

    def save(self, hard_state: HardState | None, entries: list[Entry]) -> None:
        """Durably store the hard state and entries, dropping any stored entries they replace."""
        if hard_state is None and not entries:
            return
        with self.db.write_batch(sync=True) as wb:
            if hard_state is not None:
                wb.put(_HARD_STATE, msgpack.packb([hard_state.term, hard_state.voted_for]))
            if entries:
                for index in range(entries[0].index, self._last_index + 1):
                    wb.delete(_log_key(index))
                pack = _U64.pack
                for e in entries:
                    wb.put(_LOG + pack(e.index), pack(e.term) + e.data)
        if entries:
            self._last_index = entries[-1].index

    # --- state machine backend -----------------------------------------------------------

    @property
    def applied_index(self) -> int:
        return self._applied

    def get(self, key: bytes) -> bytes | None:
        return self.db.get(_DATA + key)

    def write(self, updates: dict[bytes, bytes | None], applied_index: int,
              sessions: dict[int, SessionRecord | None] | None = None) -> None:
        with self.db.write_batch() as wb:
            for k, v in updates.items():
                if v is None:
                    wb.delete(_DATA + k)
                else:
                    wb.put(_DATA + k, v)
            for client_id, rec in (sessions or {}).items():
                key = _SESSION + _U64.pack(client_id)
                if rec is None:
                    wb.delete(key)
                else:
                    wb.put(key, msgpack.packb([rec.seq, rec.result, rec.last_index], use_bin_type=True))
            wb.put(_APPLIED, _U64.pack(applied_index))
        self._applied = applied_index

    def load_sessions(self) -> dict[int, SessionRecord]:
        with self.db.iterator(prefix=_SESSION) as it:
            return {_U64.unpack(k[len(_SESSION):])[0]: SessionRecord(*msgpack.unpackb(v, raw=False))
                    for k, v in it}

    def items(self) -> list[tuple[bytes, bytes]]:
        """Every key and value of the state machine, in key order (for checks and tools)."""
        with self.db.iterator(prefix=_DATA) as it:
            return [(k[len(_DATA):], v) for k, v in it]


class MemoryStorage(MemoryKV):
    """:class:`LevelDBStorage`'s interface over plain Python objects (the state machine part is MemoryKV)."""

    def __init__(self) -> None:
        super().__init__()
        self.hard_state = HardState()
        self.log: list[Entry] = []

    def close(self) -> None:
        pass

    def load_hard_state(self) -> HardState:
        return self.hard_state

    def load_log(self) -> LogState:
        return LogState(0, 0, list(self.log))

    @property
    def last_index(self) -> int:
        return len(self.log)

    def save(self, hard_state: HardState | None, entries: list[Entry]) -> None:
        if hard_state is not None:
            self.hard_state = hard_state
        if entries:
            del self.log[entries[0].index - 1:]
            self.log.extend(entries)

    def items(self) -> list[tuple[bytes, bytes]]:
        return sorted(self.data.items())
