"""A deterministic simulation of a zraft cluster: N RaftNodes in one process.

One seeded ``random.Random`` drives everything: message latency, loss, duplication and
reordering, partitions, crashes and restarts, client requests, and (through seeds drawn
from it) every node's own rng. The same seed replays the same run, event for event.

Each simulated node has a driver that follows the contract in ``zraft/raft/core.py``
to the letter: for each Ready, persist hard state and entries to the node's ``Disk``,
then hand the messages to the network, then apply the committed entries to the KV
state machine (the KV and the applied index are written to the disk together, once
per Ready), then answer the reads the state machine has caught up with.

Safety properties are checked after every call into a core and after every driver
turn; the first violation raises :class:`SimulationFailure` with the seed, the command
that reproduces the run and the last events before the failure.

Time is counted in units; a node ticks every ``TICK`` units (each node with its own
phase), and a message takes between 1 and ``2 * TICK`` units unless a fault delays it.
"""

from __future__ import annotations

import heapq
import itertools
import os
import random
from collections import deque
from dataclasses import dataclass
from typing import Any

from zraft.raft.core import HardState, RaftConfig, RaftNode, ReadState, Ready, Role
from zraft.raft.log import RaftLog
from zraft.raft.messages import (
    AppendEntriesResponse,
    Entry,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
    RequestVoteResponse,
    SnapshotAck,
    SnapshotChunk,
    decode_batch,
    encode_batch,
)
from zraft.raft.snapshot import DONE, FAILED, SnapshotReceiver, SnapshotSender

TICK = 10  # time units per tick
_KV_EVERY = 128  # the checker keeps the committed log's KV every this many entries
TRACE_LEN = int(os.environ.get("ZRAFT_SIM_TRACE", "0"))  # events kept for a failure report (0: 60, abridged)

# Event kinds in the scheduler's heap.
_MSG, _TICK, _CLIENT, _PARTITION, _CRASH, _RESTART, _TURN, _PERSIST = range(8)


class SimulationFailure(AssertionError):
    """A safety (or liveness, at the end of a run) property did not hold."""


@dataclass(frozen=True)
class FaultMix:
    """What goes wrong in a run, and how often. Periods are mean times in ticks; 0 means never."""

    name: str
    drop: float = 0.0  # probability that a message is lost
    dup: float = 0.0  # probability that a message is delivered twice (each copy with its own delay)
    long_delay: float = 0.0  # probability that a message is held back for up to 3 election timeouts
    partition_every: int = 0  # mean ticks between a heal and the next partition
    partition_for: int = 40  # mean ticks a partition lasts
    crash_every: int = 0  # mean ticks between crashes
    down_for: int = 30  # mean ticks a crashed node stays down
    lost_ready: float = 0.5  # share of crashes that lose the Ready just taken (before it is persisted)
    max_down_majority: bool = False  # may crashes take down a majority at once?
    skew: float = 0.0  # each node's tick period is TICK scaled by a factor in [1 - skew, 1 + skew]
    leader_bias: float = 0.5  # probability that a crash or an isolation picks the leader
    small_messages: bool = False  # force a few entries per AppendEntries (acks then cover old terms alone)


MIXES: tuple[FaultMix, ...] = (
    FaultMix("calm"),
    FaultMix("lossy", drop=0.12, dup=0.08, long_delay=0.03),
    FaultMix("partitions", partition_every=20, partition_for=40),
    FaultMix("crashes", crash_every=25, down_for=30),
    FaultMix("partitions+loss", drop=0.05, dup=0.05, long_delay=0.02, partition_every=20),
    FaultMix("crashes+loss", drop=0.05, dup=0.05, long_delay=0.02, crash_every=25, lost_ready=0.7),
    FaultMix("chaos", drop=0.08, dup=0.05, long_delay=0.03, partition_every=25, crash_every=30,
             max_down_majority=True, skew=0.5),
    FaultMix("skewed clocks+crashes", drop=0.03, long_delay=0.02, crash_every=30, partition_every=40,
             skew=0.7),
    # Leaders rarely live long and replicate little: Figure 8 territory (entries of earlier terms that
    # reach a majority alone, then get replaced).
    FaultMix("leader churn", drop=0.25, dup=0.05, long_delay=0.1, crash_every=12, down_for=8,
             partition_every=12, partition_for=12, lost_ready=0.3, leader_bias=0.9, small_messages=True),
)
CALM = MIXES[0]


def repro_command(seed: int, steps: int | None = None) -> str:
    env = f"ZRAFT_SIM_SEED={seed}"
    if steps is not None:
        env += f" ZRAFT_SIM_STEPS={steps}"
    return f"{env} python -m pytest tests/sim/test_sim_random.py -q -p no:cacheprovider"


# ---------------------------------------------------------------------- the nodes


class Disk:
    """What survives a crash: hard state, the log (after its snapshot), the KV with its applied index.

    The log begins after ``snap_index`` (the last compacted entry, of term ``snap_term``):
    ``entries[0]``, if any, has index ``snap_index + 1``. ``staged`` is the staging area a
    snapshot stream is received into, beside the live KV; it never survives a restart (like
    a server that clears its staging area at startup), and installing it replaces the KV,
    the applied index and the log's start in one atomic write.
    """

    __slots__ = ("hard_state", "snap_index", "snap_term", "entries", "kv", "applied", "staged")

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.snap_index = 0
        self.snap_term = 0
        self.entries: list[Entry] = []
        self.kv: dict[bytes, bytes] = {}
        self.applied = 0
        self.staged: dict[bytes, bytes] | None = None

    @property
    def last_index(self) -> int:
        return self.snap_index + len(self.entries)

    def entry(self, index: int) -> Entry | None:
        """The stored entry at ``index``; None if compacted away or past the end."""
        if index <= self.snap_index or index > self.last_index:
            return None
        return self.entries[index - self.snap_index - 1]


@dataclass(eq=False)
class Read:
    """One linearizable read, as the client issued it."""

    rid: int
    node: int
    incarnation: int
    issued_at: int
    required: dict[bytes, int]  # key -> log index of the last write to it acknowledged before issue
    required_max: int  # highest log index of any write acknowledged before issue
    state: str = "pending"  # pending -> ready -> served, or pending -> dropped; lost if its node crashes
    index: int | None = None
    value_indexes: dict[bytes, int] | None = None  # when served: key -> index of the write it saw


@dataclass(eq=False)
class Proposal:
    op: int
    key: bytes
    data: bytes
    node: int
    incarnation: int
    index: int
    term: int
    issued_at: int
    acked: bool = False


class SimNode:
    __slots__ = ("id", "config", "disk", "raft", "incarnation", "kv", "seen_commit", "last_commit",
                 "last_term", "leader_term", "leader_last", "pending", "read_wait", "crash_on_ready", "turns",
                 "inbox", "turn_due", "outgoing", "receiver", "staged_stream", "install_pending",
                 "compact_every", "compact_keep", "writes", "write_done_at")

    def __init__(self, node_id: int, config: RaftConfig) -> None:
        self.id = node_id
        self.config = config
        self.disk = Disk()
        self.raft: RaftNode | None = None
        self.incarnation = 0
        self.kv: dict[bytes, bytes] = {}
        self.seen_commit = 0  # highest commit index the checker has seen on this node
        self.last_commit = 0  # for the monotonicity check, per incarnation
        self.last_term = 0
        self.leader_term = 0  # the term of this node's current leadership, 0 if not leader
        self.leader_last: Entry | None = None  # its last entry when last seen as leader (append-only check)
        self.pending: dict[int, Proposal] = {}  # log index -> proposal made on this incarnation
        self.read_wait: list[tuple[ReadState, Read]] = []
        self.crash_on_ready = False
        self.turns = 0
        self.inbox: list[tuple[int, Any]] = []  # events waiting for the node's next turn (inbox mode)
        self.turn_due = False
        # Snapshots (all in memory, lost in a crash, except the disk's staging area, which is cleared).
        self.outgoing: dict[int, SnapshotSender] = {}  # leader: peer -> the stream to it
        self.receiver = SnapshotReceiver(node_id)
        self.staged_stream: tuple[int, int] | None = None  # (src, stream) the staged state comes from
        self.install_pending: tuple[InstallSnapshot, tuple[int, int] | None] | None = None
        self.compact_every = 0  # compact once the log holds this many applied entries (0: never)
        self.compact_keep = 0  # keep up to this many applied entries when compacting
        # Async storage writes: Readys taken but not yet durable, oldest first, each with what waits for it.
        self.writes: deque[_Write] = deque()
        self.write_done_at = 0  # when the newest of them becomes durable (writes finish in order)

    @property
    def up(self) -> bool:
        return self.raft is not None

    def start(self, rng: random.Random) -> None:
        d = self.disk
        self.incarnation += 1
        d.staged = None  # a restart clears the staging area: a half-received snapshot is gone
        log = RaftLog(list(d.entries), snapshot_index=d.snap_index, snapshot_term=d.snap_term, applied=d.applied)
        self.raft = RaftNode(self.config, d.hard_state, log, rng)
        self.kv = dict(d.kv)
        self.seen_commit = self.last_commit = d.applied
        self.last_term = d.hard_state.term
        self.leader_term = 0
        self.leader_last = None
        self.pending = {}
        self.read_wait = []
        self.crash_on_ready = False
        self.inbox = []
        self.turn_due = False
        self.outgoing = {}
        self.receiver = SnapshotReceiver(self.id)
        self.staged_stream = None
        self.install_pending = None
        self.writes = deque()


@dataclass(eq=False)
class _Write:
    """A Ready whose writes are in flight (async storage), with the effects that wait for them."""

    rd: Ready
    msgs: list[Message]  # still to send once durable (empty if they went out early)
    done_at: int


def _encode_items(items: list[tuple[bytes, bytes]]) -> bytes:
    """A batch of KV records as a snapshot chunk carries it."""
    return b"\n".join(k + b"=" + v for k, v in items)


def _decode_items(data: bytes) -> list[tuple[bytes, bytes]]:
    if not data:
        return []
    out = []
    for line in data.split(b"\n"):
        k, v = line.split(b"=", 1)
        out.append((k, v))
    return out


def _promises(m: Message) -> bool:
    """Does the message promise something the sender must have persisted (a vote, an ack)?"""
    if isinstance(m, RequestVoteResponse):
        return m.granted and not m.pre_vote
    return isinstance(m, AppendEntriesResponse | HeartbeatResponse)


def _parse_put(data: bytes) -> tuple[bytes, bytes] | None:
    if not data.startswith(b"put "):
        return None
    _, key, value = data.split(b" ", 2)
    return key, value


# ---------------------------------------------------------------------- the cluster


class Cluster:
    """N simulated nodes, a simulated network, clients, faults and the safety checker."""

    def __init__(self, n: int = 3, seed: int = 0, *, mix: FaultMix = CALM, clients: bool = True,
                 election_ticks: int = 10, heartbeat_ticks: int = 1, pre_vote: bool = True,
                 check_quorum: bool = True, max_inflight_msgs: int = 256, max_msg_bytes: int = 1 << 20,
                 wire: bool = False, batch: float = 0.3, client_gap: int = 2 * TICK, keys: int = 6,
                 read_share: float = 0.3, latency: tuple[int, int] = (1, 2 * TICK), early_send: float = 0.0,
                 turn_delay: int = 0, trace: int = 0, snapshot_threshold: int = 0, snapshot_keep: int = 0,
                 chunk_items: int = 2, snapshot_window: int = 4, snapshot_retry_ticks: int = 4,
                 snapshot_give_up_ticks: int = 100, async_writes: bool = False,
                 write_delay: tuple[int, int] = (1, TICK)) -> None:
        self.seed = seed
        self.n = n
        self.mix = mix
        self.rng = random.Random(seed)
        self.ids = tuple(range(1, n + 1))
        self.election_ticks = election_ticks
        self.configs = {
            i: RaftConfig(id=i, voters=self.ids, election_ticks=election_ticks,
                          heartbeat_ticks=heartbeat_ticks, pre_vote=pre_vote, check_quorum=check_quorum,
                          max_inflight_msgs=max_inflight_msgs, max_msg_bytes=max_msg_bytes,
                          async_storage=async_writes)
            for i in self.ids
        }
        self.nodes = {i: SimNode(i, self.configs[i]) for i in self.ids}
        self.wire = wire
        self.batch = batch
        self.latency = latency
        self.early_send = early_send  # share of leader Readys whose messages go out before the fsync
        # Inbox mode (turn_delay > 0): like the server's poll loop, a node gathers messages, ticks and
        # client requests for up to turn_delay units, steps them all, then takes one Ready.
        self.turn_delay = turn_delay
        # Async storage (the server's writer thread): a Ready's writes become durable write_delay units
        # after it is taken, in order; meanwhile the node goes on; a crash loses whatever is in flight.
        self.async_writes = async_writes
        self.write_delay = write_delay
        self.faults_on = True
        self.clients_on = self.has_clients = clients
        self.client_gap = client_gap
        self.read_share = read_share
        self.keys = [b"k%d" % i for i in range(keys)]

        self.now = 0
        self.steps = 0  # driver turns
        self.calls = 0  # calls into the cores
        self._seq = itertools.count()
        self._events: list[tuple[int, int, int, Any, Any]] = []
        self.blocked: set[tuple[int, int]] = set()  # (src, dst) links that lose everything
        self.partitioned = False
        self.trace: deque[tuple] = deque(maxlen=trace or TRACE_LEN or 60)
        self.stats = {"msgs": 0, "dropped": 0, "duplicated": 0, "crashes": 0, "lost_readies": 0,
                      "partitions": 0, "elections": 0, "proposed": 0, "acked": 0, "reads": 0,
                      "served": 0, "read_dropped": 0, "truncations": 0, "early_sends": 0,
                      # snapshots: log compactions; InstallSnapshot requests from leader cores (and those
                      # the driver ignored: a stream to that peer was running); streams started, delivered
                      # (DONE), failed (FAILED), dropped (the leader lost its term); chunks sent (with
                      # resends); complete snapshots the follower's core installed (with reset_log) or
                      # refused; crashes of a node while it had a stream in or a staged state
                      "compactions": 0, "snap_requests": 0, "snap_requests_ignored": 0, "snap_streams": 0,
                      "snap_sent": 0, "snap_failed": 0, "snap_dropped": 0, "snap_chunks": 0,
                      "snap_installed": 0, "snap_reset_log": 0, "snap_refused": 0, "install_crashes": 0,
                      # async storage: Readys written in the background; crashes that lost some in flight;
                      # drains (a snapshot Ready waits for every earlier write)
                      "async_writes": 0, "lost_writes": 0, "drains": 0}
        # Snapshots: each node compacts when its log holds about snapshot_threshold applied entries
        # (0: never); the leader streams chunk_items KV records per chunk, snapshot_window unacknowledged.
        self.snapshot_threshold = snapshot_threshold
        self.chunk_items = chunk_items
        self.snapshot_window = snapshot_window
        self.snapshot_retry_ticks = snapshot_retry_ticks
        self.snapshot_give_up_ticks = snapshot_give_up_ticks
        self._streams = itertools.count(1)
        self._kv_checkpoints: list[dict[bytes, bytes]] = [{}]  # KV of the committed log at k * _KV_EVERY

        # The checker's memory.
        self.leader_of_term: dict[int, int] = {}  # election safety, over the whole history
        self.leaders: list[tuple[int, int, list[Entry]]] = []  # (term, node, log at election)
        self.registry: dict[tuple[int, int], tuple[bytes, int]] = {}  # (index, term) -> (data, prev term)
        self.committed: list[tuple[int, bytes, int]] = []  # index - 1 -> (term, data, term it was seen in)
        self.value_index: dict[bytes, int] = {}  # written value -> log index of its put
        self.proposals: list[Proposal] = []
        self.acked_max_by_key: dict[bytes, int] = {}
        self.acked_max_index = 0
        self.reads: dict[int, Read] = {}
        self.open_reads: dict[int, Read] = {}  # issued, neither served, dropped nor lost yet
        self._next_op = itertools.count(1)

        # Each node's clock: ticks every period units (skewed clocks run fast or slow).
        self.period = {i: max(2, round(TICK * (1 + mix.skew * (2 * self.rng.random() - 1))))
                       for i in self.ids}
        if snapshot_threshold:  # (no draws otherwise: runs without snapshots replay as they always did)
            for node in self.nodes.values():
                node.compact_every = max(1, round(snapshot_threshold * (0.5 + self.rng.random())))
                node.compact_keep = min(snapshot_keep, node.compact_every - 1)
        for node in self.nodes.values():
            node.start(self._node_rng())
            self._push(self.rng.randrange(TICK), _TICK, node.id)
        if clients:
            self._push(self.rng.randrange(client_gap), _CLIENT)
        if mix.partition_every:
            self._push(self._gap(mix.partition_every), _PARTITION)
        if mix.crash_every:
            self._push(self._gap(mix.crash_every), _CRASH)

    # ------------------------------------------------------------------ plumbing

    def _node_rng(self) -> random.Random:
        return random.Random(self.rng.getrandbits(64))

    def _push(self, at: int, kind: int, a: Any = None, b: Any = None) -> None:
        heapq.heappush(self._events, (at, next(self._seq), kind, a, b))

    def _gap(self, mean_ticks: int) -> int:
        """A random time span around ``mean_ticks`` ticks, in time units."""
        return self.now + 1 + self.rng.randrange(2 * mean_ticks * TICK)

    def fail(self, what: str) -> None:
        lines = [f"SIMULATION FAILURE (seed {self.seed}, n={self.n}, mix={self.mix.name}, "
                 f"time {self.now}, step {self.steps}): {what}",
                 f"config: {self.configs[1]}",
                 f"reproduce with: {repro_command(self.seed)}",
                 f"last {len(self.trace)} events (time, node, what; ZRAFT_SIM_TRACE=N keeps N, unabridged):"]
        width = 1 << 30 if TRACE_LEN else 400
        lines += [f"  {t}"[:width] for t in self.trace]
        lines.append(f"nodes: {self.describe()}")
        lines.append(f"reproduce with: {repro_command(self.seed)}")
        raise SimulationFailure("\n".join(lines))

    def describe(self) -> str:
        out = []
        for n in self.nodes.values():
            r = n.raft
            if r is None:
                out.append(f"{n.id}:down(disk term={n.disk.hard_state.term} snap={n.disk.snap_index} "
                           f"last={n.disk.last_index})")
            else:
                streams = ",".join(f"{p}:{s.state}@{s.index}" for p, s in n.outgoing.items())
                out.append(f"{n.id}:{r.role.value} t={r.term} lead={r.leader} snap={r.log.snapshot_index} "
                           f"last={r.log.last_index}/{r.log.last_term} commit={r.commit_index} "
                           f"applied={r.applied_index}" + (f" streams={streams}" if streams else "")
                           + (" receiving" if n.receiver.active else ""))
        return "; ".join(out)

    # ------------------------------------------------------------------ running

    def run(self, ticks: int) -> None:
        """Advance simulated time by ``ticks`` ticks."""
        self.run_until(lambda: False, ticks)

    def run_until(self, done: Any, max_ticks: int, every: int = TICK) -> bool:
        """Run until ``done()`` is true (checked every ``every`` units) or ``max_ticks`` pass."""
        end = self.now + max_ticks * TICK
        next_check = self.now
        events = self._events
        while events and events[0][0] <= end:
            if events[0][0] >= next_check:
                if done():
                    return True
                next_check = events[0][0] + every
            at, _, kind, a, b = heapq.heappop(events)
            self.now = at
            if kind == _MSG:
                self._deliver(a, b)
            elif kind == _TICK:
                self._push(at + self.period[a], _TICK, a)
                self._tick(self.nodes[a])
            elif kind == _CLIENT:
                self._push(at + 1 + self.rng.randrange(2 * self.client_gap), _CLIENT)
                if self.clients_on:
                    self._client_op()
            elif kind == _PARTITION:
                self._partition_event()
            elif kind == _CRASH:
                self._crash_event()
            elif kind == _RESTART:
                node = self.nodes[a]
                if not node.up and node.incarnation == b:
                    self.restart(a)
            elif kind == _TURN:
                node = self.nodes[a]
                if node.up and node.incarnation == b:
                    self._inbox_turn(node)
            elif kind == _PERSIST:
                node = self.nodes[a]
                if node.up and node.incarnation == b:
                    self._writes_done(node)
        self.now = max(self.now, end)
        return bool(done())

    def run_steps(self, steps: int) -> None:
        """Run until ``steps`` more driver turns have happened."""
        target = self.steps + steps
        self.run_until(lambda: self.steps >= target, 1 << 40, every=1)

    # ------------------------------------------------------------------ network

    def _send(self, msgs: list[Message]) -> None:
        rng = self.rng
        mix = self.mix if self.faults_on else CALM
        lo, hi = self.latency
        if self.wire and msgs:
            msgs = decode_batch(encode_batch(msgs))
        for m in msgs:
            self.stats["msgs"] += 1
            if (m.src, m.dst) in self.blocked or (mix.drop and rng.random() < mix.drop):
                self.stats["dropped"] += 1
                continue
            copies = 2 if mix.dup and rng.random() < mix.dup else 1
            self.stats["duplicated"] += copies - 1
            for _ in range(copies):
                delay = rng.randint(lo, hi)
                if mix.long_delay and rng.random() < mix.long_delay:
                    delay += rng.randrange(3 * self.election_ticks * TICK)
                self._push(self.now + delay, _MSG, m.dst, m)

    def _deliver(self, dst: int, m: Message) -> None:
        node = self.nodes[dst]
        if node.raft is None or (m.src, dst) in self.blocked:
            return
        if self.turn_delay:
            self._enqueue(node, _MSG, m)
            return
        batch = [m]
        events = self._events
        # Sometimes hand a node several messages in one turn, as a real poll loop does.
        while (events and events[0][2] == _MSG and events[0][0] == self.now and events[0][3] == dst
               and self.rng.random() < self.batch):
            _, _, _, _, m2 = heapq.heappop(events)
            if (m2.src, dst) not in self.blocked:
                batch.append(m2)
        for m in batch:
            self.trace.append((self.now, dst, "recv", m))
            self._step(node, m)
        self._turn(node)

    def _step(self, node: SimNode, m: Any) -> None:
        """Hand one delivered message to the node: snapshot streams to the driver, the rest to the core."""
        if isinstance(m, SnapshotChunk):
            self._on_chunk(node, m)
        elif isinstance(m, SnapshotAck):
            self._on_snapshot_ack(node, m)
        else:
            node.raft.step(m)
            self._after_call(node)

    def isolate(self, node_id: int) -> None:
        self.partition([[node_id], [i for i in self.ids if i != node_id]])

    def partition(self, groups: list[list[int]]) -> None:
        """Cut every link between different groups (nodes in no group are cut from everyone)."""
        where = {i: g for g, members in enumerate(groups) for i in members}
        self.blocked = {(a, b) for a in self.ids for b in self.ids
                        if a != b and (where.get(a, -1 - a) != where.get(b, -1 - b))}
        self.partitioned = True
        self.stats["partitions"] += 1
        self.trace.append((self.now, 0, "partition", groups))

    def cut(self, src: int, dst: int) -> None:
        """Lose everything sent from src to dst (one way only)."""
        self.blocked.add((src, dst))
        self.partitioned = True
        self.trace.append((self.now, 0, "cut", (src, dst)))

    def heal(self) -> None:
        self.blocked = set()
        self.partitioned = False
        self.trace.append((self.now, 0, "heal", None))

    def _partition_event(self) -> None:
        if not self.faults_on:
            return
        mix, rng = self.mix, self.rng
        if self.partitioned:
            self.heal()
            self._push(self._gap(mix.partition_every), _PARTITION)
            return
        kind = rng.random()
        if kind < 0.6 * mix.leader_bias:
            leader = self.leader()
            self.isolate(leader.id if leader else rng.choice(self.ids))
        elif kind < 0.8:
            ids = list(self.ids)
            rng.shuffle(ids)
            k = rng.randint(1, self.n - 1)
            self.partition([ids[:k], ids[k:]])
        else:
            for _ in range(rng.randint(1, self.n)):
                a, b = rng.sample(self.ids, 2)
                self.cut(a, b)
        self._push(self._gap(mix.partition_for), _PARTITION)

    # ------------------------------------------------------------------ crashes

    def crash(self, node_id: int) -> None:
        """Crash between two Readys: everything persisted survives, nothing else does."""
        node = self.nodes[node_id]
        assert node.raft is not None, f"node {node_id} is already down"
        self.trace.append((self.now, node_id, "crash", None))
        self.stats["crashes"] += 1
        if node.receiver.active or node.disk.staged is not None:
            self.stats["install_crashes"] += 1
        for read in list(self.open_reads.values()):
            if read.node == node_id:
                read.state = "lost"
                del self.open_reads[read.rid]
        node.raft = None
        if node.writes:
            self.stats["lost_writes"] += 1
            self.trace.append((self.now, node_id, "lost writes in flight", [w.rd for w in node.writes]))
        node.writes = deque()
        node.inbox, node.turn_due = [], False
        node.read_wait = []
        node.pending = {}
        node.leader_term, node.leader_last = 0, None
        node.crash_on_ready = False

    def restart(self, node_id: int) -> None:
        node = self.nodes[node_id]
        assert node.raft is None, f"node {node_id} is up"
        node.start(self._node_rng())
        self.trace.append((self.now, node_id, "restart", node.incarnation))
        # What the crash left behind is whole: the KV is the committed log's at the applied index
        # (a half-received snapshot, or one the core took but the driver never installed, changed nothing).
        d = node.disk
        if d.kv != self._kv_at(d.applied):
            self.fail(f"node {node_id} restarts with a KV that is not the committed log's at {d.applied}")
        self._check_node(node)

    def _crash_event(self) -> None:
        if not self.faults_on:
            return
        mix, rng = self.mix, self.rng
        self._push(self._gap(mix.crash_every), _CRASH)
        up = [n for n in self.nodes.values() if n.up and not n.crash_on_ready]
        max_down = self.n - 1 if mix.max_down_majority and rng.random() < 0.3 else (self.n - 1) // 2
        if self.n - len(up) >= max_down or not up:
            return
        leaders = [n for n in up if n.raft.role is Role.LEADER]
        receiving = [n for n in up if n.receiver.active]
        if receiving and rng.random() < 0.4:
            victim = rng.choice(receiving)  # mid-install: what it staged must vanish, the old state stay
        else:
            victim = rng.choice(leaders) if leaders and rng.random() < mix.leader_bias else rng.choice(up)
        if rng.random() < mix.lost_ready:
            victim.crash_on_ready = True  # at its next Ready, before anything is persisted
        else:
            self.crash(victim.id)
            self._schedule_restart(victim)

    def _schedule_restart(self, node: SimNode) -> None:
        self._push(self._gap(self.mix.down_for), _RESTART, node.id, node.incarnation)

    # ------------------------------------------------------------------ clients

    def settled_leader(self, max_ticks: int) -> SimNode:
        """Run until there is one leader everybody follows and its no-op is committed everywhere."""
        assert self.run_until(self.quiet, max_ticks), self.describe()
        leader = self.leader()
        assert leader is not None
        return leader

    def leaders_now(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.raft is not None and n.raft.role is Role.LEADER]

    def leader(self) -> SimNode | None:
        """The node that believes it leads in the highest term, if any."""
        best = None
        for n in self.leaders_now():
            if best is None or n.raft.term > best.raft.term:
                best = n
        return best

    def _client_op(self) -> None:
        rng = self.rng
        leaders = self.leaders_now()
        if leaders and rng.random() < 0.95:
            node = rng.choice(leaders)
        else:
            up = [n for n in self.nodes.values() if n.up]
            if not up:
                return
            node = rng.choice(up)
        if rng.random() < self.read_share:
            read = self._new_read(node)
            if self.turn_delay:
                self._enqueue(node, _CLIENT, read)
            else:
                self._read_call(node, read)
                self._after_call(node)
                self._turn(node)
        else:
            keys = [rng.choice(self.keys) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
            if self.turn_delay:
                self._enqueue(node, _CLIENT, keys)
            else:
                self.propose(node.id, keys)

    def propose(self, node_id: int, keys: list[bytes]) -> list[Proposal]:
        """Propose one unique put per key, in one batch, in a turn of its own. [] if not the leader."""
        node = self.nodes[node_id]
        assert node.raft is not None
        out = self._propose_call(node, keys)
        self._after_call(node)
        self._turn(node)
        return out

    def read(self, node_id: int) -> Read:
        """Issue a linearizable read, in a turn of its own."""
        node = self.nodes[node_id]
        assert node.raft is not None
        read = self._new_read(node)
        self._read_call(node, read)
        self._after_call(node)
        self._turn(node)
        return read

    def _propose_call(self, node: SimNode, keys: list[bytes]) -> list[Proposal]:
        raft = node.raft
        node_id = node.id
        ops = [next(self._next_op) for _ in keys]
        datas = [b"put %s v%d" % (k, op) for k, op in zip(keys, ops, strict=True)]
        first = raft.propose(datas)
        self.trace.append((self.now, node_id, "propose", (first, datas)))
        out = []
        if first is not None:
            if raft.role is not Role.LEADER:
                self.fail(f"propose() returned {first} on a {raft.role.value}")
            for i, (op, k, d) in enumerate(zip(ops, keys, datas, strict=True)):
                p = Proposal(op, k, d, node_id, node.incarnation, first + i, raft.term, self.now)
                e = raft.log.entries[first + i - raft.log.snapshot_index - 1]
                if e.index != p.index or e.term != p.term or e.data != d:
                    self.fail(f"proposal {d!r} is not in the leader's log at {p.index}: {e}")
                node.pending[p.index] = p
                self.proposals.append(p)
                out.append(p)
            self.stats["proposed"] += len(keys)
        return out

    def _new_read(self, node: SimNode) -> Read:
        """A read as the client issues it: what it must see is fixed now, whenever the node gets to it."""
        rid = len(self.reads) + 1
        read = Read(rid, node.id, node.incarnation, self.now, dict(self.acked_max_by_key),
                    self.acked_max_index)
        self.reads[rid] = read
        self.open_reads[rid] = read
        self.stats["reads"] += 1
        return read

    def _read_call(self, node: SimNode, read: Read) -> None:
        self.trace.append((self.now, node.id, "read_index", read.rid))
        node.raft.read_index([read.rid])

    # ------------------------------------------------------------------ the driver

    def _enqueue(self, node: SimNode, kind: int, what: Any) -> None:
        node.inbox.append((kind, what))
        if not node.turn_due:
            node.turn_due = True
            self._push(self.now + self.rng.randint(0, self.turn_delay), _TURN, node.id, node.incarnation)

    def _inbox_turn(self, node: SimNode) -> None:
        inbox, node.inbox, node.turn_due = node.inbox, [], False
        raft = node.raft
        for kind, what in inbox:
            if kind == _MSG:
                self.trace.append((self.now, node.id, "recv", what))
                self._step(node, what)
                continue
            if kind == _TICK:
                raft.tick()
                self._after_call(node)
                self._tick_streams(node)
                continue
            if isinstance(what, Read):
                self._read_call(node, what)
            else:
                self._propose_call(node, what)
            self._after_call(node)
        self._turn(node)

    def _tick(self, node: SimNode) -> None:
        raft = node.raft
        if raft is None:
            return
        if self.turn_delay:
            self._enqueue(node, _TICK, None)
            return
        raft.tick()
        self._after_call(node)
        self._tick_streams(node)
        if raft.has_ready():
            self._turn(node)

    def _turn(self, node: SimNode) -> None:
        """One driver turn: take the Ready, install, persist, send, apply, answer reads (core.py's contract)."""
        raft = node.raft
        had = raft.has_ready()
        rd = raft.ready()
        self.steps += 1
        node.turns += 1
        if not had:
            if (rd.entries or rd.messages or rd.committed or rd.reads or rd.dropped_reads or rd.hard_state
                    or rd.snapshot or rd.snapshot_requests):
                self.fail(f"node {node.id}: has_ready() was False but ready() gave {rd}")
            return
        self._check_ready(node, rd)
        # The core's snapshot requests are for the driver: it streams its state machine instead.
        msgs = rd.messages
        wants = rd.snapshot_requests
        if any(isinstance(m, InstallSnapshot) for m in msgs):
            self.fail(f"node {node.id}: an InstallSnapshot among the messages to send: {msgs}")
        if wants and (rd.role is not Role.LEADER or any(m.term != rd.term for m in wants)):
            self.fail(f"node {node.id}: a {rd.role.value} of term {rd.term} asks for snapshots: {wants}")
        # Thesis 10.2.1, allowed by the contract: a leader's AppendEntries may go out before its fsync
        # (here: all its messages, when none of them promises anything that is not on disk yet). With
        # async storage, as the server does it: always, unless the Ready changes the hard state.
        if self.async_writes:
            early = bool(rd.role is Role.LEADER and msgs and rd.snapshot is None and rd.hard_state is None)
        else:
            early = (self.early_send and rd.role is Role.LEADER and msgs and rd.snapshot is None
                     and self.rng.random() < self.early_send and not any(map(_promises, msgs)))
        if early:
            self.stats["early_sends"] += 1
            self.trace.append((self.now, node.id, "send before persisting", msgs))
            self._check_persisted_before_send(node, rd, msgs)
            self._send(msgs)
        if node.crash_on_ready:
            self.trace.append((self.now, node.id, "crash with the Ready lost", rd))
            self.stats["lost_readies"] += 1
            self.crash(node.id)
            self._schedule_restart(node)
            return
        rest = [] if early else msgs
        decided = node.install_pending is not None
        if self.async_writes:
            self._observe_commit(node)
            if rd.snapshot is not None or decided:
                self._drain(node)  # a snapshot is installed once every earlier write is durable
            elif rd.hard_state is not None or rd.entries or node.writes:
                # Written in the background, in order; what depends on it waits (core.py's contract).
                done_at = node.write_done_at  # (nothing of its own to write: it waits for the earlier ones)
                if rd.hard_state is not None or rd.entries:
                    done_at = node.write_done_at = max(done_at, self.now + self.rng.randint(*self.write_delay))
                node.writes.append(_Write(rd, rest, done_at))
                self.stats["async_writes"] += 1
                self._push(done_at, _PERSIST, node.id, node.incarnation)
                return
        self._persist(node, rd, decided)
        self._finish(node, rd, rest, decided)

    def _writes_done(self, node: SimNode) -> None:
        """Background writes that are durable by now: persist them, then release what waited for them."""
        self._complete_writes(node, self.now)
        if node.raft is not None and node.raft.has_ready():
            self._turn(node)

    def _drain(self, node: SimNode) -> None:
        """Every write in flight becomes durable now (a snapshot Ready, taken already, waits for them)."""
        if node.writes:
            self.stats["drains"] += 1
        self._complete_writes(node, None, check=False)

    def _complete_writes(self, node: SimNode, until: int | None, check: bool = True) -> None:
        """In order: persist each write done by ``until`` (None: all of them), then finish its Ready."""
        while node.writes and node.raft is not None and (until is None or node.writes[0].done_at <= until):
            w = node.writes.popleft()
            self._persist(node, w.rd, False)
            self._finish(node, w.rd, w.msgs, False, check=check)

    def _persist(self, node: SimNode, rd: Ready, decided: bool) -> None:
        """Steps 0 and 1 of the contract: install or drop the staged snapshot; write hard state and entries."""
        d = node.disk
        # 0. install the snapshot the core took, or throw the staged one away
        if rd.snapshot is not None:
            self._install(node, rd)
        elif decided:
            self.trace.append((self.now, node.id, "snapshot refused", node.install_pending[0]))
            self.stats["snap_refused"] += 1
            d.staged, node.staged_stream = None, None
        if rd.snapshot is not None or decided:
            node.install_pending = None
        # 1. persist
        if rd.hard_state is not None:
            old = d.hard_state
            hs = rd.hard_state
            if hs.term < old.term or (hs.term == old.term and old.voted_for is not None
                                      and hs.voted_for != old.voted_for):
                self.fail(f"node {node.id}: hard state goes from {old} to {hs} (a second vote in a term?)")
            d.hard_state = hs
        if rd.entries:
            first = rd.entries[0].index
            if first > d.last_index + 1:
                self.fail(f"node {node.id}: Ready entries start at {first}, disk ends at {d.last_index}")
            if first <= d.applied:
                self.fail(f"node {node.id}: Ready entries from {first} would overwrite applied {d.applied}")
            if first <= d.last_index:
                self.stats["truncations"] += 1
            del d.entries[first - d.snap_index - 1:]
            d.entries.extend(rd.entries)
        mark = rd.persist_mark
        if self.async_writes and mark is not None:
            node.raft.persisted(*mark)
            self._after_call(node)

    def _finish(self, node: SimNode, rd: Ready, msgs: list[Message], decided: bool, check: bool = True) -> None:
        """Steps 2-4 of the contract, once the Ready is durable: send, apply, answer reads."""
        self._check_persisted_before_send(node, rd, msgs)
        self._observe_commit(node)
        # 2. send
        if msgs:
            self.trace.append((self.now, node.id, "send", msgs))
            self._send(msgs)
        if decided:
            ack = node.receiver.finish()  # the core decided: the last chunk's acknowledgement, "done"
            if ack is None:
                self.fail(f"node {node.id}: its snapshot receiver has nothing to finish")
            self._send([ack])
        # 3. apply
        if rd.committed:
            self._apply(node, rd.committed)
            if check:  # (not while draining for a snapshot, which replaces the log anyway)
                self._maybe_compact(node)
        for m in rd.snapshot_requests:
            self._start_stream(node, m)
        # 4. reads
        if rd.reads or rd.dropped_reads:
            self._take_reads(node, rd)
        if node.read_wait:
            self._serve_reads(node)
        if check and not node.writes:  # (with writes in flight, the disk is behind the core by design)
            self._check_node(node)

    # ------------------------------------------------------------------ snapshots

    def _maybe_compact(self, node: SimNode) -> None:
        """Compact the log once it holds compact_every applied entries, keeping a random few of them."""
        d = node.disk
        if not node.compact_every or d.applied - d.snap_index < node.compact_every:
            return
        target = d.applied - self.rng.randint(0, node.compact_keep)
        if target <= d.snap_index:
            return
        held = d.entry(target)
        term = node.raft.compact(target)
        self._after_call(node)
        if term is None or held is None or term != held.term:
            self.fail(f"node {node.id}: compact({target}) gives term {term}; the disk holds {held}")
        # The KV covers the applied index already (written with it); now the log may start after target.
        del d.entries[: target - d.snap_index]
        d.snap_index, d.snap_term = target, term
        self.stats["compactions"] += 1
        self.trace.append((self.now, node.id, "compacted", (target, term)))

    def _start_stream(self, node: SimNode, want: InstallSnapshot) -> None:
        """The leader's core asks for a snapshot to ``want.dst``: stream the KV as of the applied index."""
        raft = node.raft
        self.stats["snap_requests"] += 1
        if raft.role is not Role.LEADER or want.term != raft.term:
            return  # it stepped down in the same turn; its core no longer waits for an outcome
        peer = want.dst
        old = node.outgoing.get(peer)
        if old is not None:
            if old.term == raft.term:
                self.stats["snap_requests_ignored"] += 1
                return  # one stream per follower at a time
            del node.outgoing[peer]  # of an older term (can't be: those go at the next tick)
        d = node.disk
        index = d.applied
        if index < want.index or index < raft.log.snapshot_index:
            self.fail(f"node {node.id}: asked for a snapshot at {want.index} (log starts after "
                      f"{raft.log.snapshot_index}) with only {index} applied")
        items = sorted(node.kv.items())  # the state as of now: later applies don't reach the stream
        k = self.chunk_items
        chunks = (_encode_items(items[i:i + k]) for i in range(0, len(items), k))
        sender = SnapshotSender(stream=next(self._streams), term=raft.term, src=node.id, dst=peer, index=index,
                                snap_term=raft.log.term_at(index), chunks=chunks, window=self.snapshot_window,
                                retry_ticks=self.snapshot_retry_ticks, give_up_ticks=self.snapshot_give_up_ticks)
        node.outgoing[peer] = sender
        self.stats["snap_streams"] += 1
        self.trace.append((self.now, node.id, "stream", (peer, sender.stream, index, sender.snap_term)))
        self._send_chunks(sender, sender.pump())

    def _send_chunks(self, sender: SnapshotSender, chunks: list[SnapshotChunk]) -> None:
        if chunks:
            self.stats["snap_chunks"] += len(chunks)
            self._send(chunks)

    def _end_stream(self, node: SimNode, peer: int, sender: SnapshotSender) -> None:
        del node.outgoing[peer]
        ok = sender.state == DONE
        self.stats["snap_sent" if ok else "snap_failed"] += 1
        self.trace.append((self.now, node.id, "stream ends", (peer, sender.stream, sender.state)))
        node.raft.report_snapshot(peer, sender.index if ok else None)
        self._after_call(node)

    def _tick_streams(self, node: SimNode) -> None:
        raft = node.raft
        for peer, sender in list(node.outgoing.items()):
            if raft.role is not Role.LEADER or sender.term != raft.term:
                # The term it was asked for is over: the core's Progress it reported to is gone.
                del node.outgoing[peer]
                self.stats["snap_dropped"] += 1
                continue
            self._send_chunks(sender, sender.tick())
            if sender.state == FAILED:
                self._end_stream(node, peer, sender)

    def _on_snapshot_ack(self, node: SimNode, ack: SnapshotAck) -> None:
        sender = node.outgoing.get(ack.src)
        if sender is None or sender.stream != ack.stream:
            return
        raft = node.raft
        if raft.role is not Role.LEADER or sender.term != raft.term:
            return  # dropped at the next tick
        self._send_chunks(sender, sender.on_ack(ack))
        if sender.state != "sending":
            self._end_stream(node, ack.src, sender)

    def _on_chunk(self, node: SimNode, chunk: SnapshotChunk) -> None:
        """Follower: stage the chunk's records beside the live state; step the snapshot in once complete."""
        raft = node.raft
        d = node.disk
        v = node.receiver.on_chunk(chunk, raft.term)
        if v.begin:
            if node.install_pending is not None:
                self.fail(f"node {node.id}: a new stream {chunk.stream} from {chunk.src} replaces the staged "
                          f"state while the core decides on the complete snapshot of {node.staged_stream}")
            d.staged, node.staged_stream = {}, (chunk.src, chunk.stream)
        if v.data is not None:
            if d.staged is None or node.staged_stream != (chunk.src, chunk.stream):
                self.fail(f"node {node.id}: stages {chunk} into the staged state of {node.staged_stream}")
            for k, val in _decode_items(v.data):
                d.staged[k] = val
        if v.reply is not None:
            self._send([v.reply])
        if v.complete is not None:
            if node.staged_stream != (chunk.src, chunk.stream):
                self.fail(f"node {node.id}: completes {chunk}, but the staged state is of {node.staged_stream}")
            node.install_pending = (v.complete, node.staged_stream)
            self.trace.append((self.now, node.id, "snapshot complete", v.complete))
            raft.step(v.complete)
            self._after_call(node)

    def _install(self, node: SimNode, rd: Ready) -> None:
        """Step 0 of the contract: the staged state becomes the state machine, the log starts after it."""
        meta = rd.snapshot
        d = node.disk
        pending = node.install_pending
        if pending is None or (pending[0].index, pending[0].snap_term) != (meta.index, meta.term):
            self.fail(f"node {node.id}: Ready installs {meta}, but the snapshot stepped in is "
                      f"{pending and pending[0]}")
        if d.staged is None or node.staged_stream != pending[1]:
            self.fail(f"node {node.id}: installs {meta} from {node.staged_stream}, completed by {pending[1]}")
        if meta.index <= d.applied:
            self.fail(f"node {node.id}: installs a snapshot at {meta.index} with {d.applied} applied already")
        # Snapshot safety: the snapshot is the committed log's state machine at its index.
        if meta.index > len(self.committed) or self.committed[meta.index - 1][0] != meta.term:
            got = self.committed[meta.index - 1][0] if meta.index <= len(self.committed) else None
            self.fail(f"node {node.id}: installs {meta}, but the committed entry there has term {got}")
        if d.staged != self._kv_at(meta.index):
            self.fail(f"node {node.id}: the snapshot it installs at {meta.index} differs from the committed "
                      f"log's KV there: {d.staged} != {self._kv_at(meta.index)}")
        held = d.entry(meta.index)
        if not meta.reset_log and held is not None and held.term != meta.term:
            self.fail(f"node {node.id}: keeps its log after {meta}, but it stores {held} there")
        # (Without reset_log, the entry at the index may not be on disk yet: then it, and whatever the core
        # keeps after it, come in this Ready's entries.)
        if meta.reset_log:
            d.entries = []
        else:
            del d.entries[: max(0, meta.index - d.snap_index)]
        d.snap_index, d.snap_term = meta.index, meta.term
        d.kv, d.staged, node.staged_stream = d.staged, None, None
        d.applied = meta.index
        node.kv = dict(d.kv)
        node.seen_commit = max(node.seen_commit, meta.index)
        self.stats["snap_installed"] += 1
        self.stats["snap_reset_log"] += meta.reset_log
        self.trace.append((self.now, node.id, "installed", meta))

    def _kv_at(self, index: int) -> dict[bytes, bytes]:
        """The KV of the committed log up to ``index`` (the checker's own replay)."""
        committed = self.committed
        if index > len(committed):
            self.fail(f"the KV at {index} is asked for with only {len(committed)} known committed")
        cps = self._kv_checkpoints
        while len(cps) <= index // _KV_EVERY:
            kv = dict(cps[-1])
            base = (len(cps) - 1) * _KV_EVERY
            for _t, data, _ in committed[base:base + _KV_EVERY]:
                put = _parse_put(data)
                if put is not None:
                    kv[put[0]] = put[1]
            cps.append(kv)
        k = index // _KV_EVERY
        kv = dict(cps[k])
        for _t, data, _ in committed[k * _KV_EVERY:index]:
            put = _parse_put(data)
            if put is not None:
                kv[put[0]] = put[1]
        return kv

    def _apply(self, node: SimNode, entries: list[Entry]) -> None:
        d = node.disk
        kv = node.kv
        expect = d.applied + 1
        committed = self.committed
        for e in entries:
            i = e.index
            if i != expect:
                self.fail(f"node {node.id}: applies index {i}, expected {expect}")
            expect += 1
            if d.entry(i) != e:
                self.fail(f"node {node.id}: applies {e}, which is not in its persisted log")
            if i > len(committed):
                self.fail(f"node {node.id}: applies {e} beyond any commit index seen ({len(committed)})")
            t, data, _ = committed[i - 1]
            if t != e.term or data != e.data:
                self.fail(f"state machine safety: node {node.id} applies {e} at {i}, "
                          f"but ({t}, {data!r}) was committed there")
            put = _parse_put(e.data)
            if put is not None:
                kv[put[0]] = put[1]
            p = node.pending.pop(i, None)
            if p is not None and p.term == e.term and p.data == e.data:
                self._ack(p)
        d.kv = dict(kv)  # the KV and the applied index go to disk together, once per Ready
        d.applied = entries[-1].index
        self.trace.append((self.now, node.id, "applied", d.applied))

    def _ack(self, p: Proposal) -> None:
        p.acked = True
        self.stats["acked"] += 1
        if p.index > self.acked_max_by_key.get(p.key, 0):
            self.acked_max_by_key[p.key] = p.index
        if p.index > self.acked_max_index:
            self.acked_max_index = p.index

    def _take_reads(self, node: SimNode, rd: Ready) -> None:
        for rs in rd.reads:
            read = self.reads.get(rs.request_id)
            if read is None or read.node != node.id or read.incarnation != node.incarnation:
                self.fail(f"node {node.id}: ReadState for a read it was never asked: {rs}")
            if read.state != "pending":
                self.fail(f"node {node.id}: read {read.rid} comes back twice ({read.state}, then {rs})")
            if rs.index < read.required_max:
                self.fail(f"linearizability: read {read.rid} got index {rs.index}, but a write at "
                          f"{read.required_max} was acknowledged before it was issued")
            read.state, read.index = "ready", rs.index
            node.read_wait.append((rs, read))
        for rid in rd.dropped_reads:
            read = self.reads.get(rid)
            if read is None or read.node != node.id or read.incarnation != node.incarnation:
                self.fail(f"node {node.id}: drops read {rid} it was never asked")
            if read.state != "pending":
                self.fail(f"node {node.id}: read {rid} comes back twice ({read.state}, then dropped)")
            read.state = "dropped"
            del self.open_reads[rid]
            self.stats["read_dropped"] += 1

    def _serve_reads(self, node: SimNode) -> None:
        applied = node.disk.applied
        waiting = []
        kv = node.kv
        for rs, read in node.read_wait:
            if applied < rs.index:
                waiting.append((rs, read))
                continue
            seen = {}
            for key, need in read.required.items():
                value = kv.get(key)
                at = self.value_index[value] if value is not None else 0
                if at < need:
                    self.fail(f"linearizability: read {read.rid} on node {node.id} sees {key!r} = {value!r} "
                              f"(written at {at}), but the write at {need} was acknowledged before the read")
                seen[key] = at
            read.state, read.value_indexes = "served", seen
            del self.open_reads[read.rid]
            self.stats["served"] += 1
        node.read_wait = waiting

    # ------------------------------------------------------------------ the checks

    def _after_call(self, node: SimNode) -> None:
        """After every call into a core: election safety, leader completeness, terms."""
        raft = node.raft
        if raft is None:
            return
        self.calls += 1
        self._observe_commit(node)
        term = raft.term
        if term < node.last_term:
            self.fail(f"node {node.id}: term goes back from {node.last_term} to {term}")
        node.last_term = term
        if raft.role is Role.LEADER:
            if node.leader_term != term:
                self._new_leader(node)
            log = raft.log
            last = node.leader_last
            # Leader append-only (Figure 3): a leader never overwrites or deletes entries in its log.
            # (An entry it compacted away since is in its state machine: it applied it, checked then.)
            if last is not None and (log.last_index < last.index or (
                    last.index > log.snapshot_index and log.entries[last.index - log.snapshot_index - 1] is not last)):
                self.fail(f"leader append-only: leader {node.id} of term {term} lost or replaced {last}")
            node.leader_last = log.entries[-1] if log.entries else None
        else:
            node.leader_term = 0
            node.leader_last = None

    def _new_leader(self, node: SimNode) -> None:
        raft = node.raft
        term = raft.term
        owner = self.leader_of_term.setdefault(term, node.id)
        if owner != node.id:
            self.fail(f"election safety: node {node.id} and node {owner} both lead term {term}")
        node.leader_term, node.leader_last = term, None
        self.stats["elections"] += 1
        self.trace.append((self.now, node.id, "leader", term))
        log = raft.log
        snap = log.snapshot_index
        entries = list(log.entries)
        # Its snapshot (its state machine, checked as it was applied or installed) covers committed entries.
        if snap > len(self.committed) or (snap and self.committed[snap - 1][0] != log.snapshot_term):
            self.fail(f"leader {node.id} of term {term}: its log starts after ({snap}, {log.snapshot_term}), "
                      f"not a committed entry ({len(self.committed)} known)")
        # Leader completeness: everything committed in an earlier term is in this leader's log.
        committed = self.committed
        for i in range(snap + 1, len(committed) + 1):
            t, data, seen_in = committed[i - 1]
            e = entries[i - snap - 1] if i - snap <= len(entries) else None
            if seen_in < term and (e is None or e.term != t or e.data != data):
                self.fail(f"leader completeness: leader {node.id} of term {term} lacks entry {i} "
                          f"({t}, {data!r}) committed in term {seen_in}; it has {e}")
        self.leaders.append((term, node.id, snap, entries))

    def _check_ready(self, node: SimNode, rd: Ready) -> None:
        raft = node.raft
        if rd.term != raft.term or rd.role is not raft.role or rd.commit_index != raft.commit_index:
            self.fail(f"node {node.id}: Ready says {rd.role} term {rd.term} commit {rd.commit_index}, "
                      f"the node {raft.role} term {raft.term} commit {raft.commit_index}")
        if rd.entries:
            # Log matching: an (index, term) pair always names the same entry after the same prefix.
            # Together with the same check on the entry before it, that makes the logs identical up to it.
            registry = self.registry
            prev_term = raft.log.term_at(rd.entries[0].index - 1)
            prev_index = rd.entries[0].index - 1
            for e in rd.entries:
                if e.index != prev_index + 1 or e.term < prev_term:
                    self.fail(f"node {node.id}: Ready entries are not a log: {rd.entries}")
                key = (e.index, e.term)
                known = registry.get(key)
                if known is None:
                    registry[key] = (e.data, prev_term)
                elif known[0] != e.data or known[1] != prev_term:
                    self.fail(f"log matching: node {node.id} holds {e} after term {prev_term}; elsewhere "
                              f"({e.index}, {e.term}) holds {known[0]!r} after term {known[1]}")
                prev_term, prev_index = e.term, e.index
            if prev_index != raft.log.last_index:
                self.fail(f"node {node.id}: Ready entries end at {prev_index}, log at {raft.log.last_index}")

    def _check_persisted_before_send(self, node: SimNode, rd: Ready, msgs: list[Message]) -> None:
        """Every message that promises something (a vote, an ack) is backed by the disk."""
        d = node.disk
        hs = d.hard_state
        for m in msgs:
            if m.src != node.id or m.dst == node.id or m.dst not in self.nodes:
                self.fail(f"node {node.id}: bad address on {m}")
            if isinstance(m, RequestVoteResponse):
                if m.granted and not m.pre_vote and not (
                        hs.term > m.term or (hs.term == m.term and hs.voted_for == m.dst)):
                    self.fail(f"node {node.id}: grants {m} but its disk holds {hs}")
            elif isinstance(m, AppendEntriesResponse):
                if hs.term < m.term:
                    self.fail(f"node {node.id}: sends {m} in a term its disk does not hold ({hs})")
                if m.success and m.match_index > d.last_index:
                    self.fail(f"node {node.id}: acknowledges {m.match_index} with {d.last_index} on disk")
            elif isinstance(m, HeartbeatResponse) and hs.term < m.term:
                self.fail(f"node {node.id}: sends {m} in a term its disk does not hold ({hs})")

    def _observe_commit(self, node: SimNode) -> None:
        """Record what the node's commit index covers; it must agree with everything recorded so far."""
        raft = node.raft
        c = raft.commit_index
        if c <= node.seen_commit:
            return
        log = raft.log
        committed = self.committed
        # (Entries up to the log's start are in its snapshot, checked as a whole when it was installed.)
        for i in range(max(node.seen_commit, log.snapshot_index) + 1, c + 1):
            e = log.entries[i - log.snapshot_index - 1]
            if i <= len(committed):
                t, data, _ = committed[i - 1]
                if e.term != t or e.data != data:
                    self.fail(f"commit safety: node {node.id} commits {e}, but ({t}, {data!r}) was committed")
                continue
            if i != len(committed) + 1:
                self.fail(f"node {node.id}: commits {i} with only {len(committed)} known committed")
            # Committed means durable on a majority: disks that hold it (or a snapshot past it).
            held = sum(1 for n in self.nodes.values() if n.disk.snap_index >= i or n.disk.entry(i) == e)
            if held < self.n // 2 + 1:
                self.fail(f"durability: node {node.id} commits {e}, which only {held} of {self.n} disks hold")
            committed.append((e.term, e.data, raft.term))
            put = _parse_put(e.data)
            if put is not None:
                self.value_index[put[1]] = i
            # Leader completeness, the other way round: leaders already elected in a later term have it.
            for term, lid, lsnap, entries in self.leaders:
                if term > raft.term and (i <= lsnap or i - lsnap > len(entries) or entries[i - lsnap - 1].term
                                         != e.term or entries[i - lsnap - 1].data != e.data):
                    self.fail(f"leader completeness: {e} committed in term {raft.term} is not in the log "
                              f"of node {lid}, leader of term {term}")
        node.seen_commit = c

    def _check_node(self, node: SimNode) -> None:
        raft = node.raft
        log = raft.log
        d = node.disk
        commit = raft.commit_index
        if not (raft.applied_index <= commit <= log.last_index):
            self.fail(f"node {node.id}: applied {raft.applied_index}, commit {commit}, last {log.last_index}")
        if commit < node.last_commit:
            self.fail(f"node {node.id}: commit index goes back from {node.last_commit} to {commit}")
        node.last_commit = commit
        if d.applied != raft.applied_index:
            self.fail(f"node {node.id}: disk applied {d.applied}, core applied {raft.applied_index}")
        if d.hard_state != HardState(raft.term, raft.voted_for):
            self.fail(f"node {node.id}: disk holds {d.hard_state}, core: {raft.term}, {raft.voted_for}")
        if (d.snap_index, d.snap_term) != (log.snapshot_index, log.snapshot_term):
            self.fail(f"node {node.id}: disk log starts after ({d.snap_index}, {d.snap_term}), core log after "
                      f"({log.snapshot_index}, {log.snapshot_term})")
        if log.snapshot_index > raft.applied_index:
            self.fail(f"node {node.id}: compacted to {log.snapshot_index} past applied {raft.applied_index}")
        if d.last_index != log.last_index or (d.entries and d.entries[-1] != log.entries[-1]):
            self.fail(f"node {node.id}: disk log ends at {d.last_index}, core log at {log.last_index}")
        if node.turns % 64 == 0 and d.entries != log.entries:
            self.fail(f"node {node.id}: the disk log differs from the core's")

    # ------------------------------------------------------------------ the end

    def quiet(self) -> bool:
        """One leader everybody follows, every log equally long, committed and applied; no stream running."""
        leaders = self.leaders_now()
        if len(leaders) != 1 or self.partitioned or self.open_reads:
            return False
        lr = leaders[0].raft
        last = lr.log.last_index
        for n in self.nodes.values():
            r = n.raft
            if r is None or r.term != lr.term or r.leader != lr.id or r.log.last_index != last:
                return False
            if r.commit_index != last or r.applied_index != last or r.log.last_term != lr.log.last_term:
                return False
            if n.outgoing or n.writes:  # and every snapshot stream has ended (a receiver whose sender gave up stays
                return False  # "active", its staged state unused, until another stream begins)
        return True

    def finish(self, stall_ticks: int = 300, max_ticks: int = 20000) -> None:
        """The end of a run: stop faults, heal, restart every node and let the cluster settle; then
        (if the cluster has clients) serve clients on the healed network for a while and settle again.

        Liveness: the cluster must settle, without ever going ``stall_ticks`` with no node's log or
        applied index moving (a backlog through a small window takes a while); once settled, every
        write it accepts is acknowledged and every read its leader gets is served.
        """
        self.faults_on = False
        self.clients_on = False
        self.heal()
        self.period = dict.fromkeys(self.ids, TICK)  # clocks back in step
        for n in self.nodes.values():
            n.crash_on_ready = False
            if not n.up:
                self.restart(n.id)
        start = self.now
        self._settle(stall_ticks, max_ticks)
        self.stats["settle_ticks"] = (self.now - start) // TICK
        if self.has_clients:
            calm_since, leader = self.now, self.leader()
            self.clients_on = True
            self.run(3 * self.election_ticks)
            self.clients_on = False
            self._settle(stall_ticks, max_ticks)
            for p in self.proposals:
                if p.issued_at >= calm_since and not p.acked:
                    self.fail(f"write {p} accepted after the cluster healed was never acknowledged")
            for read in self.reads.values():
                if read.issued_at >= calm_since and read.node == leader.id and read.state != "served":
                    self.fail(f"read {read} sent to leader {leader.id} after the cluster healed")
        self.check_final()

    def _settle(self, stall_ticks: int, max_ticks: int) -> None:
        start = self.now
        progress: list[tuple[int, int, int]] = []
        since = self.now
        while not self.run_until(self.quiet, 10):
            state = [(n.raft.applied_index, n.raft.log.last_index, n.raft.log.last_term)
                     for n in self.nodes.values()]
            if state != progress:
                progress, since = state, self.now
            if self.now - since >= stall_ticks * TICK or self.now - start >= max_ticks * TICK:
                self.fail(f"the cluster did not settle within {(self.now - start) // TICK} ticks after "
                          f"healing: {self.describe()}")

    def check_final(self) -> None:
        leaders = self.leaders_now()
        if len(leaders) != 1:
            self.fail(f"{len(leaders)} leaders at the end")
        ref = leaders[0]
        last = ref.raft.log.last_index
        if len(self.committed) < last:
            self.fail(f"the checker saw {len(self.committed)} committed, the leader commits {last}")
        expected = self._kv_at(last)
        ref_log = ref.raft.log
        for n in self.nodes.values():
            log, d = n.raft.log, n.disk
            if log.last_index != last or d.entries != log.entries or d.snap_index != log.snapshot_index:
                self.fail(f"node {n.id}'s log ends at {log.last_index} (disk: {d.last_index}), the leader's "
                          f"at {last}")
            # Logs may start at different points (each node compacts on its own): where they overlap they
            # agree with the leader's and with what was committed, and each one starts after a committed entry.
            lo = max(log.snapshot_index, ref_log.snapshot_index)
            if log.entries[lo - log.snapshot_index:] != ref_log.entries[lo - ref_log.snapshot_index:]:
                self.fail(f"node {n.id}'s log differs from the leader's after {lo} at the end")
            if log.snapshot_index and self.committed[log.snapshot_index - 1][0] != log.snapshot_term:
                self.fail(f"node {n.id}'s log starts after ({log.snapshot_index}, {log.snapshot_term}), "
                          f"which was not committed")
            for e in log.entries:
                t, data, _ = self.committed[e.index - 1]
                if (t, data) != (e.term, e.data):
                    self.fail(f"node {n.id} ends with {e} in its log, but ({t}, {data!r}) was committed there")
            if n.kv != expected or n.disk.kv != expected:
                self.fail(f"node {n.id}'s KV {n.kv} differs from the committed log's {expected}")
        for p in self.proposals:
            if p.acked:
                t, data, _ = self.committed[p.index - 1]
                if t != p.term or data != p.data:
                    self.fail(f"acknowledged write {p} is not in the final log")
        for read in self.reads.values():
            if read.state in ("pending", "ready"):
                self.fail(f"read {read.rid} on node {read.node} was neither served nor dropped")


# ---------------------------------------------------------------------- random runs


DEFAULT_STEPS = int(os.environ.get("ZRAFT_SIM_STEPS", "6000"))


def random_cluster(seed: int) -> Cluster:
    """The cluster a seed describes: size and fault mix by seed, everything else by its rng."""
    n = 3 if seed % 2 == 0 else 5
    mix = MIXES[(seed // 2) % len(MIXES)]
    knobs = random.Random(seed ^ 0x5EED)
    election_ticks = knobs.choice((5, 10, 10, 20))
    kw = dict(
        election_ticks=election_ticks,
        heartbeat_ticks=knobs.choice((1, 1, 2, max(1, election_ticks // 4))),
        pre_vote=knobs.random() < 0.7,
        check_quorum=knobs.random() < 0.7,
        max_inflight_msgs=knobs.choice((1, 2, 4, 256)),
        max_msg_bytes=min(knobs.choice((40, 200, 1 << 20)), 40 if mix.small_messages else 1 << 20),
        wire=knobs.random() < 0.15,
        batch=knobs.choice((0.0, 0.3, 0.8)),
        client_gap=knobs.choice((TICK // 2, TICK, 3 * TICK)),
        keys=knobs.choice((2, 6)),
        early_send=knobs.choice((0.0, 0.0, 0.5, 1.0)),
        turn_delay=knobs.choice((0, 0, 3, TICK)),
    )
    # Snapshots (drawn last, so the knobs above are what they were before snapshots existed): most seeds
    # compact often enough that a follower that was down or cut off for a while comes back through
    # InstallSnapshot; a few never compact. More keys, for streams of more chunks.
    kw.update(
        snapshot_threshold=knobs.choice((0, 5, 10, 20, 40)),
        snapshot_keep=knobs.choice((0, 0, 2, 8)),
        chunk_items=knobs.choice((1, 1, 2, 3)),
        snapshot_window=knobs.choice((1, 2, 4, 8)),
        snapshot_retry_ticks=knobs.choice((2, 3, 5)),
        snapshot_give_up_ticks=knobs.choice((3, 8, 20)) * election_ticks,
    )
    if knobs.random() < 0.35:
        kw["keys"] = 12
    # Async storage writes (drawn after everything else, for the same reason): half the seeds write in
    # the background, with a write taking from a fraction of a tick to a few ticks.
    if knobs.random() < 0.5:
        kw.update(async_writes=True, write_delay=knobs.choice(((1, TICK // 2), (1, 2 * TICK), (TICK, 4 * TICK))))
    return Cluster(n, seed, mix=mix, **kw)


def run_seed(seed: int, steps: int = DEFAULT_STEPS) -> Cluster:
    cluster = random_cluster(seed)
    cluster.run_steps(steps)
    cluster.finish()
    return cluster


if __name__ == "__main__":  # python tests/sim/raftsim.py [first_seed [count]]
    import sys
    import time

    first = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    t0 = time.perf_counter()
    total_steps = 0
    for s in range(first, first + count):
        c = run_seed(s)
        total_steps += c.steps
        print(s, c.n, c.mix.name, c.steps, c.stats)
    dt = time.perf_counter() - t0
    print(f"{count} seeds, {total_steps} steps in {dt:.2f}s: {total_steps / dt:.0f} steps/s")
