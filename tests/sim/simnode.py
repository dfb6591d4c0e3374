"""One simulated node: the production driver (zraft/node/driver.py) on simulated disk, network and writes.

A :class:`SimNode` is what a node process is, minus the process: a :class:`~zraft.node.driver.Driver`
around the core, over in-memory storage rooms that play the disk (they survive a crash; nothing
else does), a transport that hands messages to the simulated network, and, with async storage, a
log writer whose writes become durable when the scheduler says so. Every piece reports to the
checker (the :class:`raftsim.Cluster`), through the hooks named in :class:`Checker`:

* :class:`CheckedRaftNode`: after every call into the core (election safety, terms, commits...),
  and on every Ready (log matching, reads handed out);
* :class:`SimDisk`: on every durable write (hard state never goes back, no second vote in a term,
  entries continue the log); on installing a snapshot (it is the committed log's state there);
  on staging (chunks go to the stream that began it, and never replace one the core is deciding on);
* :class:`SimNet`: on every message sent (a vote or acknowledgement is backed by the disk);
* :class:`SimEvents`: on every apply (state machine safety, acknowledgements) and served read
  (linearizability).

A node that joins (``join``: a fresh id with an empty disk, added by the membership nemesis) starts
as ``zraft node --join`` does: no voters of its own (``RaftConfig.voters`` empty) and an empty
membership written to its state room, so that it takes part only once a leader adds it.

A node told to crash at its next write (``crash_on_write``) raises :class:`SimCrash` from the disk
or the writer, before anything of that write lands: the Ready being written is lost, as in a
crash during its fsync. The cluster catches it and takes the node down.
"""

from __future__ import annotations

import random
from collections import deque
from typing import TYPE_CHECKING, Any

from zraft.node.driver import Driver, DriverConfig, DriverEvents
from zraft.node.memory import MemoryLogStore, MemoryStateStore, MemoryStorage
from zraft.node.statemachine import KVStateMachine, check_command
from zraft.raft.confchange import Membership
from zraft.raft.core import HardState, RaftConfig, RaftNode, Ready, SnapshotMeta
from zraft.raft.log import RaftLog
from zraft.raft.messages import Entry, InstallSnapshot, Message, StreamMessage

SIM_HISTORY_REVISIONS = 2  # the watch history each simulated state machine keeps: its snapshots carry it

if TYPE_CHECKING:
    from raftsim import Cluster as Checker


def _check_command(data: bytes) -> str | None:
    return check_command(data, max_key_bytes=4096, max_value_bytes=1 << 20)  # the production defaults


class SimCrash(Exception):
    """The node crashes now, at a durable write, before any of it lands."""


# ---------------------------------------------------------------------- the disk


class CheckedLog(MemoryLogStore):
    def __init__(self, node: SimNode) -> None:
        super().__init__()
        self.node = node

    def save(self, hard_state: HardState | None, entries: list[Entry]) -> None:
        node = self.node
        if node.crash_on_write:
            raise SimCrash
        node.checker.check_save(node, hard_state, entries)
        super().save(hard_state, entries)
        node.checker.note_durable(node)


class CheckedState(MemoryStateStore):
    def __init__(self, node: SimNode) -> None:
        super().__init__()
        self.node = node

    def begin_staging(self) -> None:
        self.node.checker.check_begin_staging(self.node)
        super().begin_staging()

    def stage(self, data: bytes) -> int:
        self.node.checker.check_stage(self.node)
        return super().stage(data)

    def discard_staged(self) -> None:
        super().discard_staged()
        self.node.install_pending = None
        self.node.staged_stream = None


class SimDisk(MemoryStorage):
    """What survives a crash: the log room and the state room (the staging area is cleared at restart,
    as a server's is). Reads for the checkers: ``hard_state``, ``snap_index``, ``entries``, ``kv``..."""

    def __init__(self, node: SimNode) -> None:
        self.node = node
        self.log = CheckedLog(node)
        self.state = CheckedState(node)

    def install_snapshot(self, meta: SnapshotMeta, hard_state: HardState | None, entries: list[Entry]) -> None:
        node = self.node
        if node.crash_on_write:
            raise SimCrash
        node.checker.check_install(node, meta)
        super().install_snapshot(meta, hard_state, entries)
        node.checker.note_durable(node)
        node.install_pending = node.staged_stream = None

    def compact(self, index: int, term: int) -> None:
        if self.node.crash_on_write:
            raise SimCrash
        self.node.checker.check_compact(self.node, index, term)
        super().compact(index, term)

    # --- what the checkers read

    @property
    def hard_state(self) -> HardState:
        return self.log.hard_state

    @property
    def snap_index(self) -> int:
        return self.log.snap_index

    @property
    def snap_term(self) -> int:
        return self.log.snap_term

    @property
    def entries(self) -> list[Entry]:
        return self.log.entries

    @property
    def last_index(self) -> int:
        return self.log.last_index

    def entry(self, index: int) -> Entry | None:
        return self.log.entry(index)

    @property
    def kv(self) -> dict[bytes, bytes]:
        return self.state.data

    @property
    def applied(self) -> int:
        return self.state.applied_index

    @property
    def staged(self) -> dict[bytes, bytes] | None:
        return self.state.staged[0] if self.state.staged is not None else None


# ---------------------------------------------------------------------- writes, network, events


class SimWriter:
    """Async storage: each Ready's writes become durable some time after they are submitted, in order
    (like zraft.node.writer's thread); a crash loses the ones still in flight."""

    def __init__(self, node: SimNode) -> None:
        self.node = node
        self.submitted = 0
        self.durable = 0
        self.jobs: deque[tuple[int, HardState | None, list[Entry], int]] = deque()  # (seq, hs, entries, done at)
        self.done_at = 0  # when the newest job becomes durable (they finish in order)

    def submit(self, hard_state: HardState | None, entries: list[Entry]) -> int:
        node = self.node
        if node.crash_on_write:
            raise SimCrash
        self.submitted += 1
        c = node.checker
        self.done_at = max(self.done_at, c.now + c.rng.randint(*c.write_delay))
        self.jobs.append((self.submitted, hard_state, entries, self.done_at))
        c.stats["async_writes"] += 1
        c.schedule_persist(node, self.done_at)
        return self.submitted

    def completed(self) -> int:
        return self.durable

    def wait(self, seq: int) -> int:
        """A snapshot is about to be installed: everything in flight lands now."""
        self.flush(None)
        return self.durable

    def check(self) -> None:
        pass

    def flush(self, now: int | None) -> None:
        """Write the jobs durable by ``now`` (None: all of them) to the disk, in order."""
        log = self.node.disk.log
        while self.jobs and (now is None or self.jobs[0][3] <= now):
            seq, hs, entries, _ = self.jobs.popleft()
            self.node.checker.check_save(self.node, hs, entries)
            MemoryLogStore.save(log, hs, entries)  # (not CheckedLog.save: the crash point was the submit)
            self.node.checker.note_durable(self.node)
            self.durable = seq


class SimNet:
    """The node's transport: checks what it sends, then hands it to the simulated network."""

    def __init__(self, node: SimNode) -> None:
        self.node = node

    def send(self, messages: list[Message | StreamMessage]) -> None:
        if messages:
            self.node.checker.check_send(self.node, messages)
            self.node.checker.network(messages)


class SimEvents(DriverEvents):
    def __init__(self, node: SimNode) -> None:
        self.node = node

    def applied(self, entries: list[Entry], results: list[Any]) -> None:
        self.node.checker.check_applied(self.node, entries)

    def read_ready(self, request_id: Any, index: int) -> None:
        self.node.checker.check_read_served(self.node, request_id, index)

    def read_dropped(self, request_id: Any) -> None:
        self.node.checker.check_read_dropped(self.node, request_id)


class CheckedRaftNode(RaftNode):
    """The core, with the checker called after every call into it (and on every Ready)."""

    sim: SimNode

    def step(self, m: Message) -> None:
        if isinstance(m, InstallSnapshot):
            self.sim.install_pending = (m, self.sim.staged_stream)
        super().step(m)
        self.sim.checker.after_call(self.sim)

    def tick(self) -> None:
        super().tick()
        self.sim.checker.after_call(self.sim)

    def propose(self, commands: list[bytes]) -> int | None:
        first = super().propose(commands)
        self.sim.checker.after_call(self.sim)
        return first

    def read_index(self, request_ids: list[Any]) -> None:
        super().read_index(request_ids)
        self.sim.checker.after_call(self.sim)

    def compact(self, index: int) -> int | None:
        term = super().compact(index)
        self.sim.checker.after_call(self.sim)
        return term

    def report_snapshot(self, peer: int, index: int | None) -> None:
        super().report_snapshot(peer, index)
        self.sim.checker.after_call(self.sim)

    def persisted(self, index: int, term: int) -> None:
        super().persisted(index, term)
        self.sim.checker.after_call(self.sim)

    def propose_membership(self, new: Membership) -> int:
        index = super().propose_membership(new)
        self.sim.checker.after_call(self.sim)
        return index

    def transfer_leadership(self, target: int | None = None) -> int:
        chosen = super().transfer_leadership(target)
        self.sim.checker.after_call(self.sim)
        return chosen

    def ready(self) -> Ready:
        # Whatever the last Ready committed is on disk by now (the driver wrote it before asking again).
        self.sim.checker.observe_commit(self.sim)
        had = super().has_ready()
        rd = super().ready()
        # (No commit check after it: a leader's own new entries count as durable from now on, but they
        # reach its disk only once the driver has written this Ready. The cluster checks after the turn.)
        self.sim.checker.check_ready(self.sim, rd, had)
        self.sim.checker.after_call(self.sim, observe=False)
        return rd


# ---------------------------------------------------------------------- the node


class SimNode:
    """A node of the simulated cluster: its disk, and (while it is up) its core and driver."""

    def __init__(self, node_id: int, config: RaftConfig, checker: Checker, join: bool = False) -> None:
        self.id = node_id
        self.config = config
        self.checker = checker
        self.disk = SimDisk(self)
        self.join = join
        if join:  # (as the server does for --join: not a member yet, durably; a restart must not forget it)
            self.disk.state.write({}, 0, None, 0, Membership().encode())
        self.retired = False  # stopped for good (removed from the cluster, or its addition was lost)
        self.add_entry: tuple[int, int] | None = None  # (index, term) of the entry that adds it, until decided
        self.raft: CheckedRaftNode | None = None
        self.driver: Driver | None = None
        self.writer: SimWriter | None = None
        self.incarnation = 0
        self.seen_commit = 0  # highest commit index the checker has seen on this node
        self.last_commit = 0  # for the monotonicity check, per incarnation
        self.last_term = 0
        self.leader_term = 0  # the term of this node's current leadership, 0 if not leader
        self.leader_last: Entry | None = None  # its last entry when last seen as leader (append-only check)
        self.pending: dict[int, Any] = {}  # log index -> proposal made on this incarnation
        self.crash_on_write = False
        self.turns = 0
        self.inbox: list[tuple[int, Any]] = []  # events waiting for the node's next turn (inbox mode)
        self.turn_due = False
        self.staged_stream: tuple[int, int] | None = None  # (src, stream) the staged state comes from
        self.install_pending: tuple[InstallSnapshot, tuple[int, int] | None] | None = None
        self.compact_every = 0  # compact once the log holds this many applied entries (0: never)
        self.compact_keep = 0  # keep up to this many applied entries when compacting
        self._reset_leader_view()

    def _reset_leader_view(self) -> None:
        """What the checker follows of this node's current leadership (see raftsim's membership checks)."""
        self.leader_term = 0
        self.leader_last = None
        self.lead_config: Membership | None = None  # the latest configuration in its log, as the checker reads it
        self.lead_config_index = 0
        self.lead_scanned = 0  # its log is read for configuration entries up to here
        self.lead_pending: list[int] = []  # indexes of configuration entries in its log not known committed
        self.lead_core_config: Membership | None = None  # the core's own, once found equal to lead_config
        self.removed_since: int | None = None  # when it was first seen leading after its own removal committed

    @property
    def up(self) -> bool:
        return self.raft is not None

    # --- views for the checks and scenarios

    @property
    def kv(self) -> dict[bytes, bytes]:
        return self.disk.kv

    @property
    def receiver(self) -> Any:
        return self.driver.receiver if self.driver is not None else None

    @property
    def outgoing(self) -> dict[int, Any]:
        """Peer -> the SnapshotSender of the stream to it."""
        return {p: out.sender for p, out in self.driver.outgoing.items()} if self.driver is not None else {}

    def in_flight(self) -> bool:
        """Async writes not yet durable, or Readys waiting for them."""
        return bool(self.driver is not None and (self.driver.waiting or (self.writer and self.writer.jobs)))

    # --- life

    def start(self, rng: random.Random, driver_config: DriverConfig, async_writes: bool) -> None:
        d = self.disk
        self.incarnation += 1
        d.state.staged = None  # a restart clears the staging area: a half-received snapshot is gone
        persisted = d.log.load_log()
        log = RaftLog(persisted.entries, persisted.snapshot_index, persisted.snapshot_term,
                      applied=d.state.applied_index)
        # The membership as zraft.node.driver.new_raft_node finds it: the state room's, else the bootstrap.
        stored = d.state.membership
        membership = Membership.decode(stored) if stored is not None else (Membership() if self.join else None)
        raft = CheckedRaftNode(self.config, d.log.load_hard_state(), log, rng, membership)
        raft.sim = self
        self.raft = raft
        self.seen_commit = self.last_commit = d.applied
        self.last_term = d.hard_state.term
        self._reset_leader_view()
        self.pending = {}
        self.crash_on_write = False
        self.inbox = []
        self.turn_due = False
        self.staged_stream = None
        self.install_pending = None
        self.writer = SimWriter(self) if async_writes else None
        # A short watch history: the simulation is about Raft, and snapshots carry the history.
        sm = KVStateMachine(d.state, history_revisions=SIM_HISTORY_REVISIONS)
        self.driver = Driver(raft, d, sm, SimNet(self), SimEvents(self),
                             config=driver_config, writer=self.writer, rng=random.Random(rng.getrandbits(64)),
                             clock=lambda: float(self.checker.now), stats=self.checker.stats,
                             check_command=_check_command)

    def stop(self) -> None:
        """The process is gone: everything but the disk (async writes in flight too)."""
        self.raft = self.driver = self.writer = None
        self.inbox, self.turn_due = [], False
        self.pending = {}
        self._reset_leader_view()
        self.crash_on_write = False
