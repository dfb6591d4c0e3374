"""The driver (zraft/node/driver.py) on in-memory storage: the Ready contract's edges, message by message.

The simulation (tests/sim) runs this same driver under faults for thousands of steps a seed;
these tests pin down single behaviours with hand-made messages.
"""

from __future__ import annotations

import random

import msgpack
from hypothesis import example, given, settings
from hypothesis import strategies as st

from zraft.node.driver import Driver, DriverConfig, DriverEvents, new_raft_node
from zraft.node.memory import MemoryStateStore, MemoryStorage
from zraft.node.statemachine import KVStateMachine, encode_put
from zraft.raft import confchange
from zraft.raft.core import HardState, RaftConfig, Role, SnapshotMeta
from zraft.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    Heartbeat,
    InstallSnapshot,
    SnapshotAck,
    SnapshotChunk,
)


class Wire:
    """A transport that keeps what is sent."""

    def __init__(self) -> None:
        self.sent: list = []

    def send(self, messages: list) -> None:
        self.sent.extend(messages)

    def take(self, cls: type | None = None) -> list:
        out = [m for m in self.sent if cls is None or isinstance(m, cls)]
        self.sent = [m for m in self.sent if m not in out]
        return out


class Recorder(DriverEvents):
    def __init__(self) -> None:
        self.applied_entries: list[Entry] = []
        self.reads: list = []
        self.driver: Driver | None = None

    def applied(self, entries, results) -> None:
        self.applied_entries.extend(entries)

    def read_ready(self, request_id, index) -> None:
        assert self.driver is not None
        self.reads.append((request_id, index, self.driver.sm.applied_index))


class RecordingStorage(MemoryStorage):
    """MemoryStorage that notes every durable write the driver makes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple] = []
        self._installing = False
        save = self.log.save

        def logged_save(hard_state, entries):
            if not self._installing:  # (the install's own part of its one write)
                self.writes.append(("save", hard_state, [e.index for e in entries]))
            save(hard_state, entries)

        self.log.save = logged_save  # type: ignore[method-assign]

    def install_snapshot(self, meta, hard_state, entries) -> None:
        self.writes.append(("install", meta, hard_state, [e.index for e in entries]))
        self._installing = True
        try:
            super().install_snapshot(meta, hard_state, entries)
        finally:
            self._installing = False


def follower(storage: MemoryStorage | None = None, node_id: int = 2) -> tuple[Driver, Wire, Recorder]:
    storage = storage or MemoryStorage()
    raft = new_raft_node(RaftConfig(node_id, (1, 2, 3), pre_vote=False), storage, random.Random(0))
    wire, events = Wire(), Recorder()
    d = Driver(raft, storage, KVStateMachine(storage.state), wire, events, DriverConfig(snapshot_threshold=0),
               rng=random.Random(1))
    return d, wire, events


def puts(first: int, n: int, term: int = 1) -> list[Entry]:
    return [Entry(term, first + i, encode_put(b"k%d" % (first + i), b"v")) for i in range(n)]


def test_entries_are_written_before_they_are_acknowledged_and_applied_once_committed() -> None:
    d, wire, events = follower()
    d.receive([AppendEntries(1, 1, 2, 0, 0, puts(1, 3), commit=2)])
    d.process()
    assert d.storage.log.entry(3) is not None  # durable before the ack went out
    (ack,) = wire.take(AppendEntriesResponse)
    assert ack.success and ack.match_index == 3
    assert [e.index for e in events.applied_entries] == [1, 2]
    assert d.sm.applied_index == 2 and d.storage.state.get(b"k2") == b"v"


def test_an_install_snapshot_from_the_wire_never_reaches_the_core() -> None:
    d, wire, events = follower()
    d.receive([AppendEntries(1, 1, 2, 0, 0, puts(1, 3), commit=3)])
    d.process()
    d.receive([InstallSnapshot(1, 1, 2, index=50, snap_term=1)])
    d.process()
    assert d.raft.log.snapshot_index == 0 and d.raft.commit_index == 3
    assert d.stats["rejected_install_snapshot_from_wire"] == 1
    d.receive([AppendEntries(1, 1, 2, 3, 1, puts(4, 2), commit=5)])  # and replication goes on
    d.process()
    assert d.sm.applied_index == 5


def _stream(index: int, term: int, src: int = 1, dst: int = 2, leader_term: int = 3) -> list[SnapshotChunk]:
    """A leader's whole snapshot stream of a small state (as its driver would cut it)."""
    state = MemoryStateStore([(b"a", b"1"), (b"b", b"2")], applied_index=index, applied_term=term)
    chunks = list(state.open_snapshot().chunks(1))
    return [SnapshotChunk(leader_term, src, dst, 77, i, c, i == len(chunks) - 1,
                          index if i == len(chunks) - 1 else 0, term if i == len(chunks) - 1 else 0)
            for i, c in enumerate(chunks)]


def test_a_snapshot_is_installed_in_the_same_write_as_the_readys_new_term() -> None:
    """The Ready that takes a snapshot may also carry a new term (here: a leader of a later term
    speaks up in the same batch as the stream's last chunk). Both reach the disk in one write, so
    no crash leaves the snapshot under an older term."""
    storage = RecordingStorage()
    d, wire, _ = follower(storage)
    d.receive([AppendEntries(3, 1, 2, 0, 0, puts(1, 2), commit=2)])  # leader 1, term 3
    d.process()
    storage.writes.clear()
    *chunks, last = _stream(index=20, term=3)
    for chunk in chunks:
        d.receive([chunk])
        d.process()
    d.receive([last, Heartbeat(4, 3, 2, 0, 0)])  # node 3 leads term 4 now
    d.process()
    installs = [w for w in storage.writes if w[0] == "install"]
    assert installs == [("install", SnapshotMeta(20, 3, True), HardState(4, None), [])], storage.writes
    assert not [w for w in storage.writes if w[0] == "save" and w[1] is not None], storage.writes
    assert storage.log.load_hard_state() == HardState(4, None)
    assert (storage.state.applied_index, storage.state.items()) == (20, [(b"a", b"1"), (b"b", b"2")])
    done = [a for a in wire.take(SnapshotAck) if a.done]
    assert len(done) == 1
    assert d.raft.log.snapshot_index == 20 and d.sm.applied_index == 20


def test_snapshot_chunks_are_taken_only_from_the_leader_of_the_current_term() -> None:
    """A forged chunk (of a later term, or from a node that is not the leader) never begins a stream."""
    d, wire, _ = follower()
    d.receive([AppendEntries(3, 1, 2, 0, 0, puts(1, 2), commit=2)])  # leader 1, term 3
    d.process()
    for forged in (_stream(index=50, term=4, leader_term=4), _stream(index=50, term=3, src=3)):
        for chunk in forged:
            d.receive([chunk])
            d.process()
    assert not d.receiver.active and d.storage.state.staged is None
    assert d.stats["rejected_chunk_not_from_leader"] >= 2 and d.sm.applied_index == 2
    assert d.storage.state.items() == [(b"k1", b"v"), (b"k2", b"v")]


def test_entries_from_the_wire_are_checked_as_client_requests_are() -> None:
    d, wire, _ = follower()
    d.check_command = lambda data: None if data.startswith(b"\x94") else "not a put"
    d.receive([AppendEntries(1, 1, 2, 0, 0, [Entry(1, 1, b"junk")], commit=1)])
    d.process()
    assert d.raft.log.last_index == 0 and d.stats["rejected_bad_entry"] == 1 and not wire.take()
    d.receive([AppendEntries(1, 1, 2, 0, 0, puts(1, 1), commit=1)])
    d.process()
    assert d.sm.applied_index == 1


def test_a_snapshot_the_core_refuses_is_thrown_away_and_the_stream_still_ends() -> None:
    d, wire, _ = follower()
    d.receive([AppendEntries(3, 1, 2, 0, 0, puts(1, 30, term=3), commit=30)])
    d.process()
    for chunk in _stream(index=20, term=3):  # behind what it has committed already
        d.receive([chunk])
        d.process()
    assert d.stats["snap_refused"] == 1 and d.stats["snap_installed"] == 0
    assert d.storage.state.staged is None
    assert d.sm.applied_index == 30 and d.storage.state.get(b"k30") == b"v"
    assert [a for a in wire.take(SnapshotAck) if a.done]


def test_a_stream_that_goes_silent_is_dropped_after_its_idle_ticks() -> None:
    d, wire, _ = follower()
    d.receive([AppendEntries(3, 1, 2, 0, 0, [], commit=0)])  # leader 1, term 3
    d.process()
    d.config.receive_idle_ticks = 5
    first = _stream(index=20, term=3)[0]
    d.receive([first])
    d.process()
    assert d.receiver.active and d.storage.state.staged is not None
    for _ in range(6):
        d.tick()
    assert not d.receiver.active and d.storage.state.staged is None


def test_reads_are_served_once_the_state_machine_reaches_their_index() -> None:
    """A leader's confirmed ReadIndex is served only once applied reaches it."""
    storage = MemoryStorage()
    raft = new_raft_node(RaftConfig(1, (1,), election_ticks=2), storage, random.Random(0))
    events = Recorder()
    d = Driver(raft, storage, KVStateMachine(storage.state), Wire(), events, DriverConfig(snapshot_threshold=0))
    events.driver = d
    while raft.role.value != "leader":
        d.tick()
        d.process()
    d.propose([encode_put(b"x", b"1")])
    d.process()
    d.read_index(["r1"])
    d.process()
    (rid, index, applied_then), = events.reads
    assert rid == "r1" and index == 2 and applied_then >= 2  # the put (index 2) committed before the read
    assert d.sm.get(b"x") == b"1"


def _wire_messages(term: int) -> st.SearchStrategy:
    """Peer messages of every type as they would come off the wire, near ``term``, between nodes 1..3."""
    t = st.integers(0, term + 3)
    i = st.integers(0, 6) | st.integers(0, 40)
    src = st.sampled_from([1, 1, 3])  # to node 2 (the follower under test), mostly from its leader
    dst = st.just(2)
    b = st.booleans()
    data = st.sampled_from([b"", encode_put(b"k", b"x"), encode_put(b"k9", b"y")])
    entries = st.lists(st.tuples(t, st.sampled_from([0, 1]), data), max_size=4).map(
        lambda es: [x for e in sorted(es, key=lambda e: e[0]) for x in e])
    return st.one_of(
        st.tuples(st.just(1), t, src, dst, i, t, b), st.tuples(st.just(2), t, src, dst, b, b),
        st.tuples(st.just(3), t, src, dst, i, t, entries, i), st.tuples(st.just(3), t, src, dst, i, t, entries, i),
        st.tuples(st.just(4), t, src, dst, b, i, i, t, i),
        st.tuples(st.just(5), t, src, dst, i, i), st.tuples(st.just(6), t, src, dst, i),
        st.tuples(st.just(8), t, src, dst, st.integers(1, 3), i, st.sampled_from([b"", b"\x90"]), b, i, t),
        st.tuples(st.just(9), t, src, dst, st.integers(1, 3), i, b, b),
    ).map(list)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_wire_messages(3), min_size=1, max_size=4), max_size=12))
@example([[[3, 4, 1, 2, 0, 0, [4, 0, b""], 3]]])  # replaces committed entry 1: the review's crash-loop
def test_any_peer_messages_never_raise_and_never_replace_a_committed_entry(frames: list) -> None:
    """Whatever well-formed messages arrive (forged or not), the driver and the core take them or
    drop them: no exception, and the entries this node has committed stay as they are."""
    from zraft.raft.messages import decode_batch

    d, wire, _ = follower()
    d.receive([AppendEntries(3, 1, 2, 0, 0, puts(1, 4, term=3), commit=3)])
    d.process()
    committed = list(d.raft.log.entries[:3])
    for frame in frames:
        try:
            msgs = decode_batch(msgpack.packb(frame))
        except ValueError:
            continue
        d.receive(msgs)
        d.tick()
        d.process()
        log = d.raft.log
        for e in committed:
            if e.index > log.snapshot_index:
                assert log.term_at(e.index) == e.term, (e, log.entries)
        assert d.raft.commit_index >= 3 and d.sm.applied_index <= d.raft.commit_index


def test_a_snapshot_stream_to_a_member_being_removed_ends_with_its_removal() -> None:
    """The core drops a removed member's Progress when the change is appended; the stream to it ends then too,
    not at its give-up (found by the simulation's membership runs: a leader kept streaming to a node that
    was gone)."""
    storage = MemoryStorage()
    raft = new_raft_node(RaftConfig(1, (1,), election_ticks=2), storage, random.Random(0))
    wire = Wire()
    d = Driver(raft, storage, KVStateMachine(storage.state), wire, Recorder(), DriverConfig(snapshot_threshold=0),
               rng=random.Random(1))
    while raft.role is not Role.LEADER:
        d.tick()
        d.process()
    d.propose([encode_put(b"k", b"v")])
    d.process()
    assert d.compact_now() == raft.log.last_index
    raft.propose_membership(confchange.add_member(raft.membership, 2, "127.0.0.1", 7002, 7102, 7202, learner=True))
    d.process()
    prev = raft.progress[2].next - 1  # (its probe: the new member's log is empty)
    d.receive([AppendEntriesResponse(raft.term, 2, 1, success=False, reject_index=prev, conflict_index=1)])
    d.process()
    assert 2 in d.outgoing and wire.take(SnapshotChunk)
    raft.propose_membership(confchange.remove_member(raft.membership, 2))
    d.process()
    assert 2 not in d.outgoing and d.stats["snap_dropped"] == 1
