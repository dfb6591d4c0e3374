"""The small interfaces a node's driver works against (hashicorp/raft's api.go, in Python protocols).

Each has a production implementation and an in-memory one for tests and the simulation:

============== ===================================== ===========================================
interface      production                            in memory
============== ===================================== ===========================================
LogStore       zraft.node.leveldb.LevelDBLogStore    zraft.node.memory.MemoryLogStore
StateStore     zraft.node.leveldb.LevelDBStateStore  zraft.node.memory.MemoryStateStore
Storage        zraft.node.leveldb.LevelDBStorage     zraft.node.memory.MemoryStorage
StateMachine   zraft.node.statemachine.KVStateMachine (over either StateStore)
Transport      zraft.node.transport.PeerTransport    the simulation's network (tests/sim)
LogWriter      zraft.node.writer.StorageWriter       the simulation's delayed writes
============== ===================================== ===========================================

Storage has two rooms, split along hashicorp/raft's lines: ``log`` (the Raft log and the hard
state: what the core needs back after a crash) and ``state`` (the state machine's data, client
sessions and applied index, its point-in-time views for snapshots, and a staging area for a
snapshot being received). The two writes that span both rooms are the Storage's own and are
atomic: installing a received snapshot together with the Ready that takes it, and compacting
the log once the state machine's applies before it are durable.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from zraft.raft.core import HardState, SnapshotMeta
from zraft.raft.messages import Entry, Message, StreamMessage


@dataclass
class LogState:
    """The persisted log: it begins after (snapshot_index, snapshot_term)."""

    snapshot_index: int
    snapshot_term: int
    entries: list[Entry]


class LogStore(Protocol):
    """The Raft log and the hard state (hashicorp's LogStore and StableStore). Every write is durable."""

    @property
    def last_index(self) -> int: ...

    @property
    def snapshot_index(self) -> int: ...

    def load_hard_state(self) -> HardState: ...

    def load_log(self) -> LogState: ...

    def save(self, hard_state: HardState | None, entries: list[Entry]) -> None:
        """Store the hard state and entries, dropping any stored entries from ``entries[0].index`` on."""

    def save_many(self, writes: list[tuple[HardState | None, list[Entry]]]) -> None:
        """Several ``save`` calls in order, made durable together (one fsync: group commit)."""


class SnapshotView(Protocol):
    """A consistent point-in-time view of the state machine at (index, term)."""

    index: int
    term: int

    def chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        """The state as snapshot chunks (zraft.node.statemachine.encode_chunk), read lazily."""

    def close(self) -> None: ...


class StateStore(Protocol):
    """The state machine's room: data, sessions and applied index (changed together), snapshots, staging."""

    @property
    def applied_index(self) -> int: ...

    @property
    def applied_term(self) -> int: ...

    def get(self, key: bytes) -> bytes | None: ...

    def data_scan(self, start: bytes, end: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        """The keys in [start, end) (None: to the last) and their values, in key order, read lazily."""

    def table_get(self, kind: int, key: bytes) -> bytes | None:
        """A record of one of the tables beside the data (zraft.node.statemachine.TABLE_KINDS)."""

    def table_scan(self, kind: int, start: bytes = b"", end: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """A table's records with keys in [start, end), in key order, read lazily."""

    def write(self, updates: dict[bytes, bytes | None], applied_index: int,
              sessions: dict[int, Any] | None = None, applied_term: int = 0, membership: bytes | None = None,
              tables: dict[int, dict[bytes, bytes | None]] | None = None) -> None:
        """Apply updates, session changes, the new applied index, (if not None) the membership applied and
        the tables' updates atomically (need not be durable: the log holds the entries, and a lost apply
        is replayed)."""

    @property
    def membership(self) -> bytes | None:
        """The latest configuration applied (zraft.raft.confchange's encoding), None if none ever was."""

    def staged_membership(self) -> bytes | None:
        """The configuration the staged snapshot holds, if any."""

    def load_sessions(self) -> dict[int, Any]: ...

    def items(self) -> list[tuple[bytes, bytes]]:
        """Every key and value, in key order (for checks and tools)."""

    def open_snapshot(self) -> SnapshotView: ...

    def begin_staging(self) -> None:
        """A snapshot stream begins: whatever was staged before is thrown away (without stalling)."""

    def stage(self, data: bytes) -> int:
        """Add one chunk's records to the staging area; their count. ValueError on a malformed chunk."""

    def discard_staged(self) -> None:
        """The staged snapshot will not be installed."""

    @property
    def has_garbage(self) -> bool: ...

    def collect_garbage(self, max_keys: int) -> int:
        """Delete up to ``max_keys`` records of thrown-away state; how many went."""


class Storage(Protocol):
    """Both rooms of a node's storage, and the writes that span them."""

    log: LogStore
    state: StateStore

    def install_snapshot(self, meta: SnapshotMeta, hard_state: HardState | None, entries: list[Entry]) -> None:
        """In one durable, atomic write: the staged state becomes the state machine at (meta.index,
        meta.term), the log begins after it (keeping the entries after it unless ``meta.reset_log``),
        and the Ready's hard state and entries are stored."""

    def compact(self, index: int, term: int) -> None:
        """The log begins after (index, term), durably; every apply up to ``index`` is durable first."""

    def write_mark(self) -> None:
        """Make everything written durable, and record what the storage holds now (term, vote, applied
        index) where a later open checks it: storage that comes back behind its mark lost writes."""

    def close(self) -> None: ...


class StateMachine(Protocol):
    """What the driver applies committed entries to."""

    applied_index: int

    def apply(self, entries: list[Entry]) -> list[Any]:
        """Apply committed entries in order; one result per entry."""

    def get(self, key: bytes) -> bytes | None: ...

    def reload(self) -> None:
        """Take the store's state as it is now (a snapshot was installed under it)."""


class Transport(Protocol):
    """Sends Raft and snapshot-stream messages to peers; never blocks (a message it can't queue is lost)."""

    def send(self, messages: list[Message | StreamMessage]) -> None: ...


class LogWriter(Protocol):
    """Raft log writes in the background (async storage): Readys are written in order, and completion
    is reported by sequence number."""

    submitted: int  # the sequence number of the last write handed over

    def submit(self, hard_state: HardState | None, entries: list[Entry]) -> int:
        """Queue one Ready's writes; their sequence number."""

    def completed(self) -> int:
        """The sequence number of the last durable write (without blocking)."""

    def wait(self, seq: int) -> int:
        """Block until write ``seq`` is durable; the last durable sequence number."""

    def check(self) -> None:
        """Raise if a write failed (the node must stop)."""
