"""In-memory storage rooms (zraft.node.interfaces), for tests and the simulation.

They behave as the LevelDB rooms do, down to the snapshot chunks they cut and read, so a
driver running on them runs the production code paths. "Durable" here means "survives the
loss of every Python object but this one": the simulation keeps a node's MemoryStorage as
its disk across crashes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from zraft.node.interfaces import LogState
from zraft.node.mvcc import in_range
from zraft.node.statemachine import (
    REC_CONFIG,
    REC_DATA,
    REC_SESSION,
    TABLE_KINDS,
    AppliedMark,
    SessionRecord,
    chunked,
    decode_chunk,
    decode_session,
    encode_session,
)
from zraft.raft.core import HardState, SnapshotMeta
from zraft.raft.messages import Entry

_U64 = struct.Struct(">Q")


class MemoryLogStore:
    """The Raft log (after its snapshot point) and the hard state."""

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.snap_index = 0
        self.snap_term = 0
        self.entries: list[Entry] = []

    @property
    def last_index(self) -> int:
        return self.snap_index + len(self.entries)

    @property
    def snapshot_index(self) -> int:
        return self.snap_index

    def entry(self, index: int) -> Entry | None:
        """The stored entry at ``index``; None if compacted away or past the end."""
        if index <= self.snap_index or index > self.last_index:
            return None
        return self.entries[index - self.snap_index - 1]

    def load_hard_state(self) -> HardState:
        return self.hard_state

    def load_log(self) -> LogState:
        return LogState(self.snap_index, self.snap_term, list(self.entries))

    def save(self, hard_state: HardState | None, entries: list[Entry]) -> None:
        if hard_state is not None:
            self.hard_state = hard_state
        if entries:
            first = entries[0].index
            if first > self.last_index + 1 or first <= self.snap_index:
                raise ValueError(f"entries from {first} do not continue a log of {self.snap_index + 1}.."
                                 f"{self.last_index}")
            del self.entries[first - self.snap_index - 1:]
            self.entries.extend(entries)

    def save_many(self, writes: list[tuple[HardState | None, list[Entry]]]) -> None:
        for hard_state, entries in writes:
            self.save(hard_state, entries)

    def restart_after(self, index: int, term: int, keep_after: bool) -> None:
        """The log begins after (index, term); the entries after it stay if ``keep_after``."""
        if keep_after:
            del self.entries[:max(0, index - self.snap_index)]
        else:
            self.entries = []
        self.snap_index, self.snap_term = index, term


class MemorySnapshotView:
    """A copy of the state at the moment it was taken (what a LevelDB snapshot gives)."""

    def __init__(self, index: int, term: int, data: dict[bytes, bytes], sessions: dict[int, SessionRecord],
                 membership: bytes | None = None, tables: dict[int, dict[bytes, bytes]] | None = None) -> None:
        self.index, self.term = index, term
        self._records = [(REC_DATA, k, v) for k, v in sorted(data.items())]
        self._records += [(REC_SESSION, _U64.pack(c), encode_session(r)) for c, r in sorted(sessions.items())]
        if membership is not None:
            self._records.append((REC_CONFIG, b"", membership))
        for kind, rows in sorted((tables or {}).items()):
            self._records += [(kind, k, v) for k, v in sorted(rows.items())]

    def chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        return chunked(iter(self._records), chunk_bytes)

    def close(self) -> None:
        self._records = []


class MemoryStateStore(AppliedMark):
    """The state machine's data, sessions and applied index, and a staging area for a received snapshot."""

    def __init__(self, items: Iterable[tuple[bytes, bytes]] = (), applied_index: int = 0,
                 applied_term: int = 0) -> None:
        self.data = dict(items)
        self._applied = applied_index
        self._applied_term = applied_term
        self.sessions: dict[int, SessionRecord] = {}
        self.membership: bytes | None = None
        self.tables: dict[int, dict[bytes, bytes]] = {kind: {} for kind in TABLE_KINDS}
        self.staged: tuple[dict[bytes, bytes], dict[int, SessionRecord]] | None = None
        self._staged_membership: bytes | None = None
        self._staged_tables: dict[int, dict[bytes, bytes]] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def data_scan(self, start: bytes, end: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        return _scan(self.data, start, end)

    def table_get(self, kind: int, key: bytes) -> bytes | None:
        return self.tables[kind].get(key)

    def table_scan(self, kind: int, start: bytes = b"", end: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        return _scan(self.tables[kind], start, end)

    def write(self, updates: dict[bytes, bytes | None], applied_index: int,
              sessions: dict[int, SessionRecord | None] | None = None, applied_term: int = 0,
              membership: bytes | None = None, tables: dict[int, dict[bytes, bytes | None]] | None = None) -> None:
        if membership is not None:
            self.membership = membership
        for kind, rows in (tables or {}).items():
            table = self.tables[kind]
            for k, v in rows.items():
                if v is None:
                    table.pop(k, None)
                else:
                    table[k] = v
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

    def load_sessions(self) -> dict[int, SessionRecord]:
        return dict(self.sessions)

    def items(self) -> list[tuple[bytes, bytes]]:
        return sorted(self.data.items())

    def open_snapshot(self) -> MemorySnapshotView:
        return MemorySnapshotView(self._applied, self._applied_term, self.data, self.sessions, self.membership,
                                  self.tables)

    def staged_membership(self) -> bytes | None:
        return self._staged_membership

    def begin_staging(self) -> None:
        self.staged = ({}, {})
        self._staged_membership = None
        self._staged_tables = {kind: {} for kind in TABLE_KINDS}

    def stage(self, data: bytes) -> int:
        records = decode_chunk(data)
        if self.staged is None:
            raise ValueError("no snapshot stream is being staged")
        staged_data, staged_sessions = self.staged
        for kind, k, v in records:
            if kind == REC_DATA:
                staged_data[k] = v
            elif kind == REC_CONFIG:
                self._staged_membership = v
            elif kind in TABLE_KINDS:
                self._staged_tables[kind][k] = v
            else:
                staged_sessions[_U64.unpack(k)[0]] = decode_session(v)
        return len(records)

    def discard_staged(self) -> None:
        self.staged = None

    def install_staged(self, index: int, term: int) -> None:
        """The staged state becomes the state machine at (index, term)."""
        if self.staged is None:
            raise ValueError("nothing is staged")
        self.data, self.sessions = self.staged
        self.membership = self._staged_membership
        self.tables = self._staged_tables
        self.staged = None
        self._applied, self._applied_term = index, term

    @property
    def has_garbage(self) -> bool:
        return False

    def collect_garbage(self, max_keys: int) -> int:
        return 0


def _scan(rows: dict[bytes, bytes], start: bytes, end: bytes | None) -> Iterator[tuple[bytes, bytes]]:
    """A dict's items with keys in [start, end), in key order (a sort per scan: fine for tests)."""
    return iter([(k, rows[k]) for k in sorted(k for k in rows if in_range(k, start, end))])


class MemoryStorage:
    """Both rooms in memory; the writes that span them are trivially atomic."""

    def __init__(self) -> None:
        self.log = MemoryLogStore()
        self.state = MemoryStateStore()

    def install_snapshot(self, meta: SnapshotMeta, hard_state: HardState | None, entries: list[Entry]) -> None:
        self.state.install_staged(meta.index, meta.term)
        self.log.restart_after(meta.index, meta.term, keep_after=not meta.reset_log)
        self.log.save(hard_state, entries)

    def compact(self, index: int, term: int) -> None:
        if index <= self.log.snap_index:
            return
        if index > self.state.applied_index:
            raise ValueError(f"compact to {index} past the applied index {self.state.applied_index}")
        self.log.restart_after(index, term, keep_after=True)

    def write_mark(self) -> None:
        pass  # nothing here outlives the process, so nothing can come back behind a mark

    def close(self) -> None:
        pass
