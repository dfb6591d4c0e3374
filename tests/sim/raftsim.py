"""A deterministic simulation of a zraft cluster: N nodes in one process, on the production driver.

One seeded ``random.Random`` drives everything: message latency, loss, duplication and
reordering, partitions, crashes and restarts, client requests, and (through seeds drawn
from it) every node's own rng. The same seed replays the same run, event for event.

Each simulated node (tests/sim/simnode.py) runs the driver a node process runs
(zraft/node/driver.py: the Ready contract, snapshot streams, async writes, compaction)
over in-memory storage rooms that play its disk, with the production KV state machine.
This module keeps only what is the simulation's own: the scheduler, the network and its
faults, crashes and restarts, clients, and the checkers.

Safety properties are checked after every call into a core, on every durable write, every
message sent, every apply and every served read; the first violation raises
:class:`SimulationFailure` with the seed, the command that reproduces the run and the last
events before the failure.

Time is counted in units; a node ticks every ``TICK`` units (each node with its own
phase), and a message takes between 1 and ``2 * TICK`` units unless a fault delays it.

With ``membership`` on, a nemesis changes the cluster through the leader's core (zraft/raft/core.py's
``propose_membership`` and ``transfer_leadership``): it adds fresh nodes (a new id, an empty disk,
joining with no voters, as ``zraft node --join`` starts), removes voters (sometimes the leader itself)
and learners, promotes learners, hands leadership over, keeping 3 to 5 voters. A node whose removal
is committed keeps running for a while, then is stopped for good; so is a fresh node whose addition
was lost. The network delivers to any live node, member or not, as the server's transport does.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import os
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
from simnode import SimCrash, SimNode

from zraft.node.driver import DriverConfig
from zraft.node.statemachine import PUT, encode_put
from zraft.raft import confchange
from zraft.raft.confchange import ConfChangeError, Membership
from zraft.raft.core import HardState, RaftConfig, RaftNode, Ready, Role, SnapshotMeta
from zraft.raft.messages import (
    AppendEntriesResponse,
    Entry,
    EntryType,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
    RequestVoteResponse,
    SnapshotChunk,
    StreamMessage,
    decode_batch,
    encode_batch,
)

TICK = 10  # time units per tick
_KV_EVERY = 128  # the checker keeps the committed log's KV every this many entries
TRACE_LEN = int(os.environ.get("ZRAFT_SIM_TRACE", "0"))  # events kept for a failure report (0: 60, abridged)

# Event kinds in the scheduler's heap.
_MSG, _TICK, _CLIENT, _PARTITION, _CRASH, _RESTART, _TURN, _PERSIST, _MEMBER, _RETIRE = range(10)
MAX_VOTERS, MIN_VOTERS = 5, 3  # what the membership nemesis keeps the cluster within


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


# ---------------------------------------------------------------------- clients' operations


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



def _parse_put(data: bytes) -> tuple[bytes, bytes] | None:
    """(key, value) of a put command (zraft.node.statemachine's encoding); None for anything else."""
    if not data:
        return None
    cmd = msgpack.unpackb(data)
    return (cmd[1], cmd[2]) if cmd[0] == PUT and len(cmd) == 4 else None  # (not a configuration: [1, members])


def _record_bytes(key_len: int = 3, value_len: int = 6) -> int:
    """What one key counts for when the driver cuts snapshot chunks (zraft.node.statemachine.chunked): its
    value's record and its metadata's (zraft.node.mvcc.KeyMeta, 32 bytes)."""
    return (key_len + value_len + 8) + (key_len + 32 + 8)


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
                 write_delay: tuple[int, int] = (1, TICK), membership: bool = False, member_every: int = 20,
                 promote_lag: int = 250, linger: int = 6) -> None:
        self.seed = seed
        self.n = n  # the nodes it starts with (the membership nemesis adds and removes others)
        self.mix = mix
        self.rng = random.Random(seed)
        self.ids = tuple(range(1, n + 1))  # every node not stopped for good, in the order they came
        self.election_ticks = election_ticks
        self._raft_kw = dict(election_ticks=election_ticks, heartbeat_ticks=heartbeat_ticks, pre_vote=pre_vote,
                             check_quorum=check_quorum, max_inflight_msgs=max_inflight_msgs,
                             max_msg_bytes=max_msg_bytes, async_storage=async_writes, promote_lag=promote_lag)
        self.configs = {i: RaftConfig(id=i, voters=self.ids, **self._raft_kw) for i in self.ids}
        self.nodes = {i: SimNode(i, self.configs[i], self) for i in self.ids}
        # Membership changes (see the module docstring): a nemesis action every member_every ticks on
        # average; a removed node keeps running up to linger election timeouts (0: it stops at once).
        self.membership = membership
        self.member_every = member_every
        self.linger = linger
        self.next_id = n + 1
        self.committed_config = Membership.of_voters(self.ids)  # the latest configuration known committed
        self.removed_ids: set[int] = set()  # nodes a committed configuration removed
        self.on_leader: Callable[[SimNode], None] | None = None  # a scenario's hook, called at each election
        self.wire = wire
        self.batch = batch
        self.latency = latency
        # Share of leader Readys whose messages go out before the leader's own write (thesis 10.2.1; the
        # driver's early_send, drawn per turn). With async storage always, as the server does it.
        self.early_send = 1.0 if async_writes else early_send
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
        self.steps = 0  # Readys taken (driver turns)
        self.calls = 0  # calls into the cores
        self._seq = itertools.count()
        self._events: list[tuple[int, int, int, Any, Any]] = []
        self.blocked: set[tuple[int, int]] = set()  # (src, dst) links that lose everything
        self.partitioned = False
        self.trace: deque[tuple] = deque(maxlen=trace or TRACE_LEN or 60)
        self.stats = {"msgs": 0, "dropped": 0, "duplicated": 0, "crashes": 0, "lost_readies": 0,
                      "partitions": 0, "elections": 0, "proposed": 0, "acked": 0, "reads": 0,
                      "served": 0, "read_dropped": 0, "truncations": 0,
                      # snapshots (the drivers count most of these into this same dict): log compactions;
                      # InstallSnapshot requests from leader cores (and those the driver ignored: a stream
                      # to that peer was running); streams started, delivered (DONE), failed (FAILED),
                      # dropped (the leader lost its term); chunks sent (with resends); complete snapshots
                      # the follower's core installed (with reset_log) or refused; crashes of a node while
                      # it had a stream in or a staged state
                      "compactions": 0, "snap_requests": 0, "snap_requests_ignored": 0, "snap_streams": 0,
                      "snap_sent": 0, "snap_failed": 0, "snap_dropped": 0, "snap_chunks": 0,
                      "snap_installed": 0, "snap_reset_log": 0, "snap_refused": 0, "install_crashes": 0,
                      # async storage: Readys written in the background; crashes that lost some in flight;
                      # drains (a snapshot Ready waits for every earlier write)
                      "async_writes": 0, "lost_writes": 0, "drains": 0,
                      # membership: the nemesis's changes the leader's core accepted (adds, removals, of the
                      # leader itself among them, explicit promotions, leadership transfers) and those it
                      # refused; configurations seen committed and what they changed (learners added,
                      # promoted, members removed); removed leaders that stepped down; nodes stopped for good
                      "nem_add": 0, "nem_remove": 0, "nem_remove_leader": 0, "nem_promote": 0,
                      "nem_transfer": 0, "conf_refused": 0, "conf_committed": 0, "members_added": 0,
                      "members_promoted": 0, "members_removed": 0, "removed_leader_stepped_down": 0,
                      "retired": 0}
        # Snapshots: each node compacts when its log holds about snapshot_threshold applied entries
        # (0: never), keeping a random few; the leader streams about chunk_items keys' records per chunk,
        # snapshot_window unacknowledged.
        self.snapshot_threshold = snapshot_threshold
        self.driver_config = DriverConfig(
            snapshot_threshold=0, snapshot_keep=0, snapshot_chunk_bytes=_record_bytes() * chunk_items,
            snapshot_window=snapshot_window, snapshot_retry_ticks=snapshot_retry_ticks,
            snapshot_give_up_ticks=snapshot_give_up_ticks, receive_idle_ticks=30 * election_ticks,
            early_send=self.early_send >= 1.0)
        self._kv_checkpoints: list[dict[bytes, bytes]] = [{}]  # KV of the committed log at k * _KV_EVERY

        # The checker's memory.
        self.leader_of_term: dict[int, int] = {}  # election safety, over the whole history
        self.durable_last: dict[tuple[int, int], int] = {}  # (node, term) -> the longest log on its disk in it
        self.leaders: list[tuple[int, int, int, list[Entry]]] = []  # (term, node, snapshot index, log at election)
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
        self._snapshot_keep = snapshot_keep
        if snapshot_threshold:  # (no draws otherwise: runs without snapshots replay as they always did)
            for node in self.nodes.values():
                node.compact_every = max(1, round(snapshot_threshold * (0.5 + self.rng.random())))
                node.compact_keep = min(snapshot_keep, node.compact_every - 1)
        for node in self.nodes.values():
            self._start(node)
            self._push(self.rng.randrange(TICK), _TICK, node.id)
        if clients:
            self._push(self.rng.randrange(client_gap), _CLIENT)
        if mix.partition_every:
            self._push(self._gap(mix.partition_every), _PARTITION)
        if mix.crash_every:
            self._push(self._gap(mix.crash_every), _CRASH)
        if membership:
            self._push(self._gap(member_every), _MEMBER)

    def _start(self, node: SimNode) -> None:
        config = DriverConfig(**{**self.driver_config.__dict__, "snapshot_threshold": node.compact_every,
                                 "snapshot_keep": node.compact_keep})
        node.start(self._node_rng(), config, self.async_writes)

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
            if n.retired:
                out.append(f"{n.id}:stopped for good")
            elif r is None:
                out.append(f"{n.id}:down(disk term={n.disk.hard_state.term} snap={n.disk.snap_index} "
                           f"last={n.disk.last_index})")
            else:
                streams = ",".join(f"{p}:{s.state}@{s.index}" for p, s in n.outgoing.items())
                out.append(f"{n.id}:{r.role.value} t={r.term} lead={r.leader} snap={r.log.snapshot_index} "
                           f"last={r.log.last_index}/{r.log.last_term} commit={r.commit_index} "
                           f"applied={r.applied_index}" + (f" streams={streams}" if streams else "")
                           + (" receiving" if n.receiver.active else "")
                           + (f" voters={sorted(r.membership.voters)} learners={sorted(r.membership.learners)}"
                              f"@{r.config_index}" if self.membership else ""))
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
        handlers = self._handlers
        while events and events[0][0] <= end:
            if events[0][0] >= next_check:
                if done():
                    return True
                next_check = events[0][0] + every
            at, _, kind, a, b = heapq.heappop(events)
            self.now = at
            handlers[kind](a, b)
        self.now = max(self.now, end)
        return bool(done())

    @functools.cached_property
    def _handlers(self) -> dict[int, Callable[[Any, Any], None]]:
        """The scheduler's event kinds and what each does."""
        return {_MSG: self._deliver, _TICK: self._on_tick, _CLIENT: self._on_client,
                _PARTITION: lambda _a, _b: self._partition_event(), _CRASH: lambda _a, _b: self._crash_event(),
                _RESTART: self._on_restart, _TURN: self._on_turn, _PERSIST: self._on_persist,
                _MEMBER: lambda _a, _b: self._member_event(), _RETIRE: lambda a, _b: self.retire(a, "removed")}

    def _on_tick(self, node_id: int, _: Any) -> None:
        if self.nodes[node_id].retired:
            return
        self._push(self.now + self.period[node_id], _TICK, node_id)
        self._tick(self.nodes[node_id])

    def _on_client(self, _a: Any, _b: Any) -> None:
        self._push(self.now + 1 + self.rng.randrange(2 * self.client_gap), _CLIENT)
        if self.clients_on:
            self._client_op()

    def _on_restart(self, node_id: int, incarnation: int) -> None:
        node = self.nodes[node_id]
        if not node.up and node.incarnation == incarnation and not node.retired:
            self.restart(node_id)

    def _on_turn(self, node_id: int, incarnation: int) -> None:
        node = self.nodes[node_id]
        if node.up and node.incarnation == incarnation:
            self._inbox_turn(node)

    def _on_persist(self, node_id: int, incarnation: int) -> None:
        node = self.nodes[node_id]
        if node.up and node.incarnation == incarnation:
            self._writes_done(node)

    def run_steps(self, steps: int) -> None:
        """Run until ``steps`` more driver turns have happened."""
        target = self.steps + steps
        self.run_until(lambda: self.steps >= target, 1 << 40, every=1)

    # ------------------------------------------------------------------ network

    def network(self, msgs: list[Message | StreamMessage]) -> None:
        """Hand messages to the network: each is lost, delayed, duplicated as the fault mix says."""
        rng = self.rng
        mix = self.mix if self.faults_on else CALM
        lo, hi = self.latency
        if self.wire and msgs:
            msgs = decode_batch(encode_batch(msgs))
        for m in msgs:
            self.stats["msgs"] += 1
            if isinstance(m, SnapshotChunk):
                self.stats["snap_chunks"] += 1
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

    def schedule_persist(self, node: SimNode, at: int) -> None:
        """(async storage) Some of the node's writes become durable at ``at``."""
        self._push(at, _PERSIST, node.id, node.incarnation)

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

        def receive() -> None:
            for m in batch:
                self.trace.append((self.now, dst, "recv", m))
                node.driver.receive([m])

        self._drive(node, receive)

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
            k = rng.randint(1, len(ids) - 1)
            self.partition([ids[:k], ids[k:]])
        else:
            for _ in range(rng.randint(1, len(self.ids))):
                a, b = rng.sample(self.ids, 2)
                self.cut(a, b)
        self._push(self._gap(mix.partition_for), _PARTITION)

    # ------------------------------------------------------------------ crashes

    def crash(self, node_id: int) -> None:
        """Crash between two Readys: everything durable survives, nothing else does."""
        node = self.nodes[node_id]
        assert node.raft is not None, f"node {node_id} is already down"
        self.trace.append((self.now, node_id, "crash", None))
        self.stats["crashes"] += 1
        self._take_down(node)

    def _take_down(self, node: SimNode) -> None:
        node_id = node.id
        if node.receiver.active or node.disk.staged is not None:
            self.stats["install_crashes"] += 1
        for read in list(self.open_reads.values()):
            if read.node == node_id:
                read.state = "lost"
                del self.open_reads[read.rid]
        if node.writer is not None and node.writer.jobs:
            self.stats["lost_writes"] += 1
            self.trace.append((self.now, node_id, "lost writes in flight", list(node.writer.jobs)))
        node.stop()

    def restart(self, node_id: int) -> None:
        node = self.nodes[node_id]
        assert node.raft is None, f"node {node_id} is up"
        assert not node.retired, f"node {node_id} was stopped for good"
        self._start(node)
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
        up = [n for n in self.nodes.values() if n.up and not n.crash_on_write]
        voters = self.committed_config.voters
        down = sum(1 for i in voters if not (self.nodes[i].up and not self.nodes[i].crash_on_write))
        max_down = len(voters) - 1 if mix.max_down_majority and rng.random() < 0.3 else (len(voters) - 1) // 2
        if down >= max_down or not up:
            return
        leaders = [n for n in up if n.raft.role is Role.LEADER]
        receiving = [n for n in up if n.receiver.active]
        if receiving and rng.random() < 0.4:
            victim = rng.choice(receiving)  # mid-install: what it staged must vanish, the old state stay
        else:
            victim = rng.choice(leaders) if leaders and rng.random() < mix.leader_bias else rng.choice(up)
        if rng.random() < mix.lost_ready:
            victim.crash_on_write = True  # at its next durable write, before any of it lands
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
                self._drive(node, lambda: self._read_call(node, read))
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
        out: list[Proposal] = []
        self._drive(node, lambda: out.extend(self._propose_call(node, keys)))
        return out

    def read(self, node_id: int) -> Read:
        """Issue a linearizable read, in a turn of its own."""
        node = self.nodes[node_id]
        assert node.raft is not None
        read = self._new_read(node)
        self._drive(node, lambda: self._read_call(node, read))
        return read

    def _propose_call(self, node: SimNode, keys: list[bytes]) -> list[Proposal]:
        raft = node.raft
        node_id = node.id
        ops = [next(self._next_op) for _ in keys]
        datas = [encode_put(k, b"v%d" % op) for k, op in zip(keys, ops, strict=True)]
        first = node.driver.propose(datas)
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
        node.driver.read_index([read.rid])

    # ------------------------------------------------------------------ membership changes

    def add_node(self, via: int | None = None, learner: bool = False) -> SimNode | None:
        """A fresh node (a new id, an empty disk, joining: no voters of its own) that the leader ``via``
        (default: the current one) adds as a learner, to be promoted by its core once caught up (not
        with ``learner``: then only promote_node makes it a voter). The node, or None if refused."""
        leader = self.nodes[via] if via is not None else self.leader()
        nid = self.next_id
        node = SimNode(nid, RaftConfig(id=nid, voters=(), **self._raft_kw), self, join=True)
        self.nodes[nid] = node  # (first: the leader's messages to it are checked as they are sent)
        ip = f"10.{nid >> 16 & 255}.{nid >> 8 & 255}.{nid & 255}"

        def change(r: RaftNode) -> tuple[int, int]:
            new = confchange.add_member(r.membership, nid, ip, 7000, 7100, 7200, learner)
            return r.propose_membership(new), r.term

        added = self._member_call(leader, f"add node {nid}" + (" as a learner" if learner else ""), change)
        if added is None:
            del self.nodes[nid]
            return None
        self.next_id += 1
        self.stats["nem_add"] += 1
        self.configs[nid] = node.config
        node.add_entry = added
        skew = self.mix.skew if self.faults_on else 0.0
        self.period[nid] = max(2, round(TICK * (1 + skew * (2 * self.rng.random() - 1))))
        if self.snapshot_threshold:
            node.compact_every = max(1, round(self.snapshot_threshold * (0.5 + self.rng.random())))
            node.compact_keep = min(self._snapshot_keep, node.compact_every - 1)
        self._start(node)
        self._push(self.now + self.rng.randrange(TICK), _TICK, nid)
        self.ids = (*self.ids, nid)
        return node

    def remove_node(self, node_id: int, via: int | None = None) -> int | None:
        """The leader ``via`` (default: the current one) proposes removing a member; the entry's index."""
        leader = self.nodes[via] if via is not None else self.leader()
        index = self._member_call(leader, f"remove node {node_id}",
                                  lambda r: r.propose_membership(confchange.remove_member(r.membership, node_id)))
        if index is not None:
            self.stats["nem_remove"] += 1
            self.stats["nem_remove_leader"] += node_id == leader.id
        return index

    def promote_node(self, node_id: int, via: int | None = None) -> int | None:
        leader = self.nodes[via] if via is not None else self.leader()
        index = self._member_call(leader, f"promote node {node_id}",
                                  lambda r: r.propose_membership(confchange.promote_member(r.membership, node_id)))
        self.stats["nem_promote"] += index is not None
        return index

    def transfer_leader(self, target: int | None = None, via: int | None = None) -> int | None:
        """The leader hands over to ``target`` (None: the most up-to-date other voter); the target."""
        leader = self.nodes[via] if via is not None else self.leader()
        chosen = self._member_call(leader, f"transfer leadership to {target}", lambda r: r.transfer_leadership(target))
        self.stats["nem_transfer"] += chosen is not None
        return chosen

    def _member_call(self, node: SimNode | None, what: str, call: Callable[[RaftNode], Any]) -> Any:
        """One membership call into a node's core, in a turn of its own; its result, None if refused."""
        if node is None or node.raft is None:
            return None
        out: list[Any] = []

        def events_in() -> None:
            try:
                out.append(call(node.raft))
            except ConfChangeError as exc:
                self.stats["conf_refused"] += 1
                self.trace.append((self.now, node.id, f"{what}: refused", f"{exc.code}: {exc}"))
            else:
                self.trace.append((self.now, node.id, what, out[0]))

        self._drive(node, events_in)
        return out[0] if out else None

    def _member_event(self) -> None:
        """The membership nemesis: one random change through the leader, sometimes a second one at once
        (which the core must refuse: one change at a time, until the first is committed)."""
        self._push(self._gap(self.member_every), _MEMBER)
        if not self.faults_on:
            return
        self._retire_orphans()
        leader = self.leader()
        if leader is None:
            return
        self._random_change(leader)
        if self.rng.random() < 0.25 and leader.up and leader.raft.role is Role.LEADER:
            self._random_change(leader)

    def _random_change(self, leader: SimNode) -> None:
        rng = self.rng
        cur = leader.raft.membership
        voters = sorted(cur.voters)
        coming = [m.id for m in cur.members if not m.voter and m.promote]  # learners the core will promote
        kept = [m.id for m in cur.members if not m.voter and not m.promote]
        room = len(voters) + len(coming) < MAX_VOTERS
        others = [v for v in voters if v != leader.id]
        options = ["add", "add"] if room else []
        if room and kept:
            options.append("promote")
        if len(voters) > MIN_VOTERS:
            options += ["remove", "remove"]
        if coming or kept:
            options.append("remove learner")
        if others:
            options.append("transfer")
        what = rng.choice(options)
        if what == "add":
            self.add_node(leader.id, learner=rng.random() < 0.2)
        elif what == "promote":
            self.promote_node(rng.choice(kept), leader.id)
        elif what == "remove":
            itself = leader.id in cur.voters and rng.random() < 0.35
            self.remove_node(leader.id if itself else rng.choice(others), leader.id)
        elif what == "remove learner":
            self.remove_node(rng.choice(coming + kept), leader.id)
        else:
            self.transfer_leader(rng.choice([None, *others]), leader.id)

    def _config_committed(self, new: Membership) -> None:
        """A configuration entry is seen committed: a member it removed is stopped for good after a while."""
        old, self.committed_config = self.committed_config, new
        st = self.stats
        st["conf_committed"] += 1
        st["members_added"] += len(new.ids - old.ids)
        st["members_promoted"] += len(new.voters & old.learners)
        gone = sorted(old.ids - new.ids)
        st["members_removed"] += len(gone)
        for i in gone:
            self.removed_ids.add(i)
            linger = self.linger * self.election_ticks * TICK if self.faults_on else 0
            self._push(self.now + 1 + (self.rng.randrange(linger) if linger else 0), _RETIRE, i)

    def _retire_orphans(self) -> None:
        """Stop for good a fresh node whose addition was lost (another entry was committed at its index)."""
        committed = self.committed
        for node in list(self.nodes.values()):
            if node.add_entry is not None and node.add_entry[0] <= len(committed):
                index, term = node.add_entry
                node.add_entry = None
                if committed[index - 1][0] != term and not node.retired:
                    self.retire(node.id, "its addition was lost")

    def retire(self, node_id: int, why: str) -> None:
        """Stop a node for good (it is no longer a member): down, never restarted."""
        node = self.nodes[node_id]
        if node.retired:
            return
        if node.up:
            self._take_down(node)
        node.retired = True
        self.ids = tuple(i for i in self.ids if i != node_id)
        self.stats["retired"] += 1
        self.trace.append((self.now, node_id, "stopped for good", why))

    # ------------------------------------------------------------------ driving the nodes

    def _drive(self, node: SimNode, events_in: Callable[[], None]) -> None:
        """One turn of a node: hand it events, then let its driver process them (and check the node).

        A node told to crash at its next write raises SimCrash from its disk or writer, mid-turn: it
        goes down then and there. Any other exception from inside the driver or the core is a failure.
        """
        turns = node.turns
        try:
            events_in()
            if 0.0 < self.early_send < 1.0:
                node.driver.config.early_send = self.rng.random() < self.early_send
            node.driver.process()
        except SimCrash:
            self.trace.append((self.now, node.id, "crash at a write, its Ready lost", None))
            self.stats["lost_readies"] += 1
            self.crash(node.id)
            self._schedule_restart(node)
            return
        except AssertionError as exc:
            if isinstance(exc, SimulationFailure):
                raise
            self.fail(f"node {node.id}: {type(exc).__name__} in the driver or the core: {exc}")
        self.after_call(node)  # the turn's last Ready is on disk (or, async, is what persisted() said)
        if node.turns != turns and not node.in_flight():  # (with writes in flight the disk is behind, by design)
            self._check_node(node)

    def _enqueue(self, node: SimNode, kind: int, what: Any) -> None:
        node.inbox.append((kind, what))
        if not node.turn_due:
            node.turn_due = True
            self._push(self.now + self.rng.randint(0, self.turn_delay), _TURN, node.id, node.incarnation)

    def _inbox_turn(self, node: SimNode) -> None:
        inbox, node.inbox, node.turn_due = node.inbox, [], False
        driver = node.driver

        def events_in() -> None:
            for kind, what in inbox:
                if kind == _MSG:
                    self.trace.append((self.now, node.id, "recv", what))
                    driver.receive([what])
                elif kind == _TICK:
                    driver.tick()
                elif isinstance(what, Read):
                    self._read_call(node, what)
                else:
                    self._propose_call(node, what)

        self._drive(node, events_in)

    def _tick(self, node: SimNode) -> None:
        if node.raft is None:
            return
        if self.turn_delay:
            self._enqueue(node, _TICK, None)
            return
        self._drive(node, node.driver.tick)

    def _writes_done(self, node: SimNode) -> None:
        """Background writes that are durable by now: on disk, then what waited for them goes on."""
        def events_in() -> None:
            node.writer.flush(self.now)
            node.driver.writes_done()

        self._drive(node, events_in)

    # ------------------------------------------------------------------ the checks the nodes call

    def check_save(self, node: SimNode, hs: HardState | None, entries: list[Entry]) -> None:
        """A durable write of hard state and entries (inline, or a background write landing)."""
        d = node.disk
        if hs is not None:
            old = d.hard_state
            if hs.term < old.term or (hs.term == old.term and old.voted_for is not None
                                      and hs.voted_for != old.voted_for):
                self.fail(f"node {node.id}: hard state goes from {old} to {hs} (a second vote in a term?)")
        if entries:
            first = entries[0].index
            if first > d.last_index + 1:
                self.fail(f"node {node.id}: Ready entries start at {first}, disk ends at {d.last_index}")
            if first <= d.applied:
                self.fail(f"node {node.id}: Ready entries from {first} would overwrite applied {d.applied}")
            if first <= d.last_index:
                self.stats["truncations"] += 1

    def note_durable(self, node: SimNode) -> None:
        """After a write: the longest log the node's disk has held in its current term. An acknowledgement
        of that term is true if the disk held its entries once: a later term's leader may have cut the
        log since, before the acknowledgement (released with a later write) went out, as a network may
        deliver it late anyway."""
        d = node.disk
        key = (node.id, d.hard_state.term)
        self.durable_last[key] = max(self.durable_last.get(key, 0), d.last_index)

    def check_compact(self, node: SimNode, index: int, term: int) -> None:
        held = node.disk.entry(index)
        if held is None or held.term != term or index > node.disk.applied:
            self.fail(f"node {node.id}: compacts to ({index}, {term}); the disk holds {held}, applied "
                      f"{node.disk.applied}")
        self.trace.append((self.now, node.id, "compacted", (index, term)))

    def check_begin_staging(self, node: SimNode) -> None:
        r = node.receiver
        if node.install_pending is not None:
            self.fail(f"node {node.id}: a new stream {r.stream} from {r.src} replaces the staged state while "
                      f"the core decides on the complete snapshot of {node.staged_stream}")
        node.staged_stream = (r.src, r.stream)

    def check_stage(self, node: SimNode) -> None:
        r = node.receiver
        if node.disk.state.staged is None or node.staged_stream != (r.src, r.stream):
            self.fail(f"node {node.id}: stages a chunk of {(r.src, r.stream)} into the staged state of "
                      f"{node.staged_stream}")

    def check_install(self, node: SimNode, meta: SnapshotMeta) -> None:
        """Step 0 of the contract: the staged state becomes the state machine, the log starts after it."""
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
        node.seen_commit = max(node.seen_commit, meta.index)
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

    def check_applied(self, node: SimNode, entries: list[Entry]) -> None:
        """The driver applied committed entries (the state machine wrote them with the applied index)."""
        d = node.disk
        committed = self.committed
        expect = entries[0].index
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
            p = node.pending.pop(i, None)
            if p is not None and p.term == e.term and p.data == e.data:
                self._ack(p)
        if d.applied != entries[-1].index:
            self.fail(f"node {node.id}: applied {entries[-1].index}, its disk says {d.applied}")
        self.trace.append((self.now, node.id, "applied", d.applied))
        if node.compact_every:  # how many applied entries the next compaction keeps: random, at most compact_keep
            node.driver.config.snapshot_keep = self.rng.randint(0, node.compact_keep)

    def _ack(self, p: Proposal) -> None:
        p.acked = True
        self.stats["acked"] += 1
        if p.index > self.acked_max_by_key.get(p.key, 0):
            self.acked_max_by_key[p.key] = p.index
        if p.index > self.acked_max_index:
            self.acked_max_index = p.index

    def _check_ready_reads(self, node: SimNode, rd: Ready) -> None:
        for rs in rd.reads:
            read = self._own_read(node, rs.request_id, rs)
            if rs.index < read.required_max:
                self.fail(f"linearizability: read {read.rid} got index {rs.index}, but a write at "
                          f"{read.required_max} was acknowledged before it was issued")
            read.state, read.index = "ready", rs.index

    def _own_read(self, node: SimNode, rid: int, what: Any, state: str = "pending") -> Read:
        read = self.reads.get(rid)
        if read is None or read.node != node.id or read.incarnation != node.incarnation:
            self.fail(f"node {node.id}: {what} for a read it was never asked")
        if read.state != state:
            self.fail(f"node {node.id}: read {read.rid} comes back twice ({read.state}, then {what})")
        return read

    def check_read_dropped(self, node: SimNode, rid: int) -> None:
        read = self._own_read(node, rid, "dropped")
        read.state = "dropped"
        del self.open_reads[rid]
        self.stats["read_dropped"] += 1

    def check_read_served(self, node: SimNode, rid: int, index: int) -> None:
        """The driver serves a read now: every write acknowledged before it was issued must be visible."""
        read = self._own_read(node, rid, f"served at {index}", state="ready")
        if index != read.index or node.disk.applied < index:
            self.fail(f"node {node.id}: serves read {rid} at {index} (ReadIndex {read.index}) with "
                      f"{node.disk.applied} applied")
        seen = {}
        kv = node.kv
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

    def after_call(self, node: SimNode, observe: bool = True) -> None:
        """After every call into a core: election safety, leader completeness, terms, membership."""
        raft = node.raft
        if raft is None:
            return
        self.calls += 1
        term = raft.term
        leading = raft.role is Role.LEADER
        if leading:
            if node.leader_term != term:
                self._new_leader(node)
            self._read_leader_configs(node)  # (first: a commit in this call counts under the latest one)
        if observe:
            self.observe_commit(node)
        if term < node.last_term:
            self.fail(f"node {node.id}: term goes back from {node.last_term} to {term}")
        node.last_term = term
        if leading:
            self._check_leader_configs(node)
            log = raft.log
            last = node.leader_last
            # Leader append-only (Figure 3): a leader never overwrites or deletes entries in its log.
            # (An entry it compacted away since is in its state machine: it applied it, checked then.)
            if last is not None and (log.last_index < last.index or (
                    last.index > log.snapshot_index and log.entries[last.index - log.snapshot_index - 1] is not last)):
                self.fail(f"leader append-only: leader {node.id} of term {term} lost or replaced {last}")
            node.leader_last = log.entries[-1] if log.entries else None
        elif node.leader_term:
            if node.lead_config is not None and node.id not in node.lead_config.voters:
                self.stats["removed_leader_stepped_down"] += 1
            node._reset_leader_view()

    # --- membership: what the checker reads of a leader's configurations

    def _own_config(self, node: SimNode) -> tuple[Membership, int]:
        """A node's latest configuration and its index, read from its log and disk (not from its core):
        the last configuration entry in its log, else the state room's (as of its snapshot), else the
        bootstrap one."""
        for e in reversed(node.raft.log.entries):
            if e.type == EntryType.CONFIG:
                return Membership.decode(e.data), e.index
        stored = node.disk.state.membership
        if stored is not None:
            return Membership.decode(stored), 0
        return (Membership() if node.join else Membership.of_voters(node.config.voters)), 0

    def _read_leader_configs(self, node: SimNode) -> None:
        """Follow the configuration entries a leader appends (its log only grows while it leads)."""
        log = node.raft.log
        last = log.last_index
        if last > node.lead_scanned:
            for e in log.slice(max(node.lead_scanned, log.snapshot_index) + 1, last + 1):
                if e.type == EntryType.CONFIG:
                    node.lead_config, node.lead_config_index = Membership.decode(e.data), e.index
                    node.lead_pending.append(e.index)
            node.lead_scanned = last

    def _check_leader_configs(self, node: SimNode) -> None:
        """One change at a time: at most one configuration entry in a leader's log is not committed; the
        core uses its log's latest; a leader whose own removal committed steps down (within a bound)."""
        raft = node.raft
        pending = node.lead_pending
        if pending and pending[0] <= len(self.committed):
            pending[:] = [i for i in pending if i > len(self.committed)]
        if len(pending) > 1:
            self.fail(f"one change at a time: leader {node.id} of term {raft.term} holds configuration entries "
                      f"at {pending}, none of them committed ({len(self.committed)} entries are)")
        cfg = node.lead_config
        if raft.membership is not node.lead_core_config:
            # (Index 0: the log holds no configuration entry; the core's is then one compacted away, if any.)
            at = node.lead_config_index
            moved = raft.config_index != at if at else raft.config_index > raft.log.snapshot_index
            if raft.membership != cfg or moved:
                self.fail(f"leader {node.id}: its core's configuration ({raft.membership}, at {raft.config_index}) "
                          f"is not the latest in its log ({cfg}, at {node.lead_config_index})")
            node.lead_core_config = raft.membership
        if node.id not in cfg.voters and node.lead_config_index <= raft.commit_index:
            # Its own removal is committed: it must stop leading (the core steps down at once, in the call
            # that commits it, handing over with TimeoutNow).
            if node.removed_since is None:
                node.removed_since = self.now
            elif self.now - node.removed_since > 2 * self.election_ticks * TICK:
                self.fail(f"removed leader: node {node.id} still leads term {raft.term} "
                          f"{(self.now - node.removed_since) // TICK} ticks after its removal committed "
                          f"(index {node.lead_config_index})")

    def _new_leader(self, node: SimNode) -> None:
        raft = node.raft
        term = raft.term
        owner = self.leader_of_term.setdefault(term, node.id)
        if owner != node.id:
            self.fail(f"election safety: node {node.id} and node {owner} both lead term {term}")
        node.leader_term, node.leader_last = term, None
        self.stats["elections"] += 1
        self.trace.append((self.now, node.id, "leader", term))
        # The configuration it won under: it must be a voter of it (and never one a committed change removed).
        cfg, cfg_index = self._own_config(node)
        node.lead_config, node.lead_config_index = cfg, cfg_index
        node.lead_scanned = raft.log.last_index
        node.lead_core_config = None
        known = max(len(self.committed), raft.log.snapshot_index)
        node.lead_pending = [e.index for e in raft.log.entries[known - raft.log.snapshot_index:]
                             if e.type == EntryType.CONFIG]
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
        # Only a voter of its latest configuration campaigns, so only one wins: a learner, a node not yet
        # added, or one whose removal is committed (every later leader's log holds that removal) never does.
        cfg = node.lead_config
        if node.id not in cfg.voters:
            self.fail(f"a non-voter leads: node {node.id} wins term {term}, but its latest configuration (at "
                      f"{node.lead_config_index}) has voters {sorted(cfg.voters)}")
        if node.id in self.removed_ids:
            self.fail(f"a removed node leads: node {node.id} wins term {term} after its removal was committed")
        if self.on_leader is not None:
            self.on_leader(node)

    def check_ready(self, node: SimNode, rd: Ready, had: bool) -> None:
        raft = node.raft
        self.steps += 1
        node.turns += 1
        if not had and (rd.entries or rd.messages or rd.committed or rd.reads or rd.dropped_reads
                        or rd.hard_state or rd.snapshot or rd.snapshot_requests):
            self.fail(f"node {node.id}: has_ready() was False but ready() gave {rd}")
        if rd.term != raft.term or rd.role is not raft.role or rd.commit_index != raft.commit_index:
            self.fail(f"node {node.id}: Ready says {rd.role} term {rd.term} commit {rd.commit_index}, "
                      f"the node {raft.role} term {raft.term} commit {raft.commit_index}")
        if any(isinstance(m, InstallSnapshot) for m in rd.messages):
            self.fail(f"node {node.id}: an InstallSnapshot among the messages to send: {rd.messages}")
        wants = rd.snapshot_requests
        if wants and (rd.role is not Role.LEADER or any(m.term != rd.term for m in wants)):
            self.fail(f"node {node.id}: a {rd.role.value} of term {rd.term} asks for snapshots: {wants}")
        if rd.entries:
            self._check_log_matching(node, rd.entries)
        if rd.reads:
            self._check_ready_reads(node, rd)

    def _check_log_matching(self, node: SimNode, entries: list[Entry]) -> None:
        """An (index, term) pair always names the same entry after the same term. Together with the
        same check on the entry before it, that makes the logs identical up to it."""
        raft = node.raft
        registry = self.registry
        prev_term = raft.log.term_at(entries[0].index - 1)
        prev_index = entries[0].index - 1
        for e in entries:
            if e.index != prev_index + 1 or e.term < prev_term:
                self.fail(f"node {node.id}: Ready entries are not a log: {entries}")
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

    def check_send(self, node: SimNode, msgs: list[Message | StreamMessage]) -> None:
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
                if m.success and m.match_index > max(d.last_index, self.durable_last.get((node.id, m.term), 0)):
                    self.fail(f"node {node.id}: acknowledges {m.match_index} with {d.last_index} on disk")
            elif isinstance(m, HeartbeatResponse) and hs.term < m.term:
                self.fail(f"node {node.id}: sends {m} in a term its disk does not hold ({hs})")
        self.trace.append((self.now, node.id, "send", msgs))

    def observe_commit(self, node: SimNode) -> None:
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
            self._check_durable(node, e)
            committed.append((e.term, e.data, raft.term))
            if e.type == EntryType.CONFIG:
                self._config_committed(Membership.decode(e.data))
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

    def _check_durable(self, node: SimNode, e: Entry) -> None:
        """Committed means durable on a majority of the voters it was committed under (the configuration in
        force on the leader that commits it, the first to see it committed: its latest, as the checker read
        its log): their disks hold it (or a snapshot past it)."""
        cfg = node.lead_config if node.leader_term == node.raft.term and node.lead_config is not None else None
        voters = sorted((cfg or node.raft.membership).voters)
        nodes, i = self.nodes, e.index
        held = sum(1 for v in voters if (d := nodes[v].disk).snap_index >= i or d.entry(i) == e)
        if 2 * held <= len(voters):
            self.fail(f"durability: node {node.id} commits {e}, which only {held} of the voters {voters} of "
                      f"its configuration hold on disk")

    def _check_node(self, node: SimNode) -> None:
        raft = node.raft
        if raft is None:
            return
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
        """One leader every member of its (committed) configuration follows, every member's log equally
        long, committed and applied; no stream running, no leadership transfer. (Non-members don't count.)"""
        leaders = self.leaders_now()
        if len(leaders) != 1 or self.partitioned or self.open_reads:
            return False
        lr = leaders[0].raft
        if not lr.membership_committed or lr.transferring:
            return False
        members = lr.membership.ids
        last = lr.log.last_index
        for n in self.nodes.values():
            if n.id not in members:
                continue
            r = n.raft
            if r is None or r.term != lr.term or r.leader != lr.id or r.log.last_index != last:
                return False
            if r.commit_index != last or r.applied_index != last or r.log.last_term != lr.log.last_term:
                return False
            if n.outgoing or n.in_flight():  # and every stream has ended (a receiver whose sender gave up stays
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
        self.period = dict.fromkeys(self.nodes, TICK)  # clocks back in step
        for i in sorted(self.removed_ids):
            self.retire(i, "removed")  # (no longer lingering; a removal committed from now on: at once)
        for n in self.nodes.values():
            n.crash_on_write = False
            if not n.up and not n.retired:
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
        # Whoever is not a member of the settled cluster's configuration (all of it committed: no change can
        # bring it in any more) is stopped for good: a fresh node whose addition was lost.
        members = self.leader().raft.membership.ids
        for i in [i for i in self.ids if i not in members]:
            self.retire(i, "not a member at the end")
        self.check_final()

    def _settle(self, stall_ticks: int, max_ticks: int) -> None:
        start = self.now
        progress: list[tuple[int, int, int]] = []
        since = self.now
        while not self.run_until(self.quiet, 10):
            state = [(n.id, n.raft.applied_index, n.raft.log.last_index, n.raft.log.last_term)
                     for n in self.nodes.values() if n.raft is not None]
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
        for n in self.nodes.values():
            if not n.retired:
                self._check_final_node(n, ref, expected)
        self._check_final_membership(ref)
        for p in self.proposals:
            if p.acked:
                t, data, _ = self.committed[p.index - 1]
                if t != p.term or data != p.data:
                    self.fail(f"acknowledged write {p} is not in the final log")
        for read in self.reads.values():
            if read.state in ("pending", "ready"):
                self.fail(f"read {read.rid} on node {read.node} was neither served nor dropped")

    def _check_final_membership(self, ref: SimNode) -> None:
        """Every member agrees on the membership: its core, its state room (as of its applied index: all of
        the log) and the checker's latest committed configuration; the nodes still running are the members."""
        final = ref.raft.membership
        for n in self.nodes.values():
            if n.retired:
                continue
            stored = n.disk.state.membership
            if n.raft.membership != final or (Membership.decode(stored) if stored is not None else
                                              Membership.of_voters(self.configs[1].voters)) != final:
                self.fail(f"node {n.id} ends with the membership {n.raft.membership} (stored: "
                          f"{stored and Membership.decode(stored)}), the leader {ref.id} with {final}")
        if final != self.committed_config:
            self.fail(f"the cluster ends with the membership {final}, the last one committed is "
                      f"{self.committed_config}")
        if set(self.ids) != final.ids:
            self.fail(f"nodes {sorted(self.ids)} run at the end, the members are {sorted(final.ids)}")

    def _check_final_node(self, n: SimNode, ref: SimNode, expected: dict[bytes, bytes]) -> None:
        log, d, ref_log = n.raft.log, n.disk, ref.raft.log
        last = ref_log.last_index
        if log.last_index != last or d.entries != log.entries or d.snap_index != log.snapshot_index:
            self.fail(f"node {n.id}'s log ends at {log.last_index} (disk: {d.last_index}), the leader's at {last}")
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
        if n.kv != expected:
            self.fail(f"node {n.id}'s KV {n.kv} differs from the committed log's {expected}")


# ---------------------------------------------------------------------- random runs


DEFAULT_STEPS = int(os.environ.get("ZRAFT_SIM_STEPS", "6000"))
MEMBERSHIP_SHARE = 0.35  # of the random seeds run the membership nemesis


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
    # Membership changes (drawn last, for the same reason): in about a third of the seeds a nemesis adds,
    # removes and promotes nodes and hands leadership over; learners are promoted at once or close behind.
    if knobs.random() < MEMBERSHIP_SHARE:
        kw.update(membership=True, member_every=knobs.choice((8, 15, 30)), promote_lag=knobs.choice((0, 3, 250)),
                  linger=knobs.choice((0, 3, 10)))
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
