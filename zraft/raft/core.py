"""The Raft consensus core: a pure, deterministic state machine.

Events go in through :meth:`RaftNode.step` (a message from a peer), :meth:`RaftNode.tick`
(one unit of logical time), :meth:`RaftNode.propose` (client commands),
:meth:`RaftNode.read_index` (linearizable reads), and from the driver's own bookkeeping
:meth:`RaftNode.compact` (its state machine now covers the log up to an index) and
:meth:`RaftNode.report_snapshot` (how a snapshot stream to a follower ended). Effects come out of
:meth:`RaftNode.ready` as one :class:`Ready` batch. Nothing in here touches a socket,
a clock, a thread or a disk; all randomness comes from the ``rng`` it is given, so a
seeded simulation replays exactly.

The driver's side of the bargain, for every Ready it takes:

0. if ``snapshot`` is set, switch the state machine to the snapshot the driver stepped
   in (its InstallSnapshot) and make the stored log begin after it (dropping every stored
   entry when ``snapshot.reset_log``, else those up to its index), atomically and
   durably, before anything else of this Ready; if it is not set, throw that staged
   snapshot away;
1. persist ``hard_state`` and ``entries`` durably (entries replace any stored entries
   from ``entries[0].index`` on), before sending any message of the Ready that depends
   on them (votes, append acknowledgements) and before applying;
2. send ``messages`` (a leader's AppendEntries may go out before its own fsync, as in
   the Raft thesis 10.2.1: the leader counts itself only for what it handed out here);
3. apply ``committed`` in order, then answer ``reads`` once applied >= their index;
4. finish all of that before the next call into the core.

With ``RaftConfig.async_storage`` (etcd's AsyncStorageWrites) step 4 is relaxed: the driver
may go on calling into the core while a Ready's writes are in flight, so that the loop keeps
reading requests and acknowledgements during an fsync. In exchange it writes Readys in the
order it took them, holds back everything of a Ready that steps 1-3 put after the write
(the dependent messages, the applies, the reads) until that Ready's writes and every
earlier Ready's are durable, and then reports it with :meth:`RaftNode.persisted` (the last
entry, or the snapshot, the Ready asked to persist). The core counts the leader's own copy of
an entry towards a commit only from that report, so nothing commits on a disk that may still
lose it. A Ready with a ``snapshot`` is handled once every earlier write is durable.

Structure follows etcd-io/raft: :meth:`step` does the term checks once, then hands the
message to the current role's handler. What the leader knows of each member, and every quorum
question (commit index, election result, check-quorum, ReadIndex rounds), goes through the
:class:`~zraft.raft.tracker.ProgressTracker` and its voter configuration (zraft/raft/quorum.py).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from zraft.raft import confchange
from zraft.raft.confchange import ConfChangeError, Membership
from zraft.raft.log import RaftLog
from zraft.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    EntryType,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
    RequestVote,
    RequestVoteResponse,
    TimeoutNow,
)
from zraft.raft.quorum import VoteResult
from zraft.raft.tracker import Progress, ProgressState, ProgressTracker

_FROM_LEADER = (AppendEntries, Heartbeat, InstallSnapshot)  # messages only a leader sends


class Role(str, Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True)
class RaftConfig:
    id: int
    # The voters of a new cluster's first configuration (Config.txt), used until the log or the stored
    # state says otherwise; empty for a node that joins an existing cluster (it learns it from the leader).
    voters: tuple[int, ...]
    election_ticks: int = 10  # election timeout is random in [election_ticks, 2 * election_ticks)
    heartbeat_ticks: int = 1
    pre_vote: bool = True  # thesis 9.6: poll before campaigning, so a rejoining node can't inflate terms
    check_quorum: bool = True  # a leader that can't hear a quorum for an election timeout steps down
    max_inflight_msgs: int = 256  # pipelining window per follower, in AppendEntries messages
    max_inflight_bytes: int = 0  # ... and in bytes of entries (0: no byte bound)
    max_msg_bytes: int = 1 << 20  # soft cap on entry payload per AppendEntries
    # The driver persists Readys in the background and reports durability with persisted()
    # (etcd's AsyncStorageWrites); see the module docstring. Off: a Ready is durable by the
    # next call into the core.
    async_storage: bool = False
    # A learner that is to become a voter is promoted once its log is within this many entries of the
    # commit index (hashicorp's "stable" promotion: a new node never costs a quorum while catching up).
    promote_lag: int = 250

    def __post_init__(self) -> None:
        if self.voters and self.id not in self.voters:
            raise ValueError(f"node {self.id} is not among the voters {self.voters}")
        if len(set(self.voters)) != len(self.voters):
            raise ValueError(f"duplicate voter ids in {self.voters}")
        if self.election_ticks <= self.heartbeat_ticks:
            raise ValueError("election_ticks must be greater than heartbeat_ticks")
        if self.max_inflight_msgs < 1 or self.max_inflight_bytes < 0:
            raise ValueError("max_inflight_msgs must be positive and max_inflight_bytes not negative")


@dataclass(slots=True, frozen=True)
class HardState:
    """What must survive a crash besides the log: the current term and the vote cast in it."""

    term: int = 0
    voted_for: int | None = None


@dataclass(slots=True, frozen=True)
class ReadState:
    """A read that is safe to serve once the state machine has applied ``index``."""

    request_id: Any
    index: int


@dataclass(slots=True, frozen=True)
class SnapshotMeta:
    """A snapshot the core took in: the state machine as of (index, term) replaces the log up to there.

    ``reset_log``: every stored entry goes (the log held no entry (index, term), or the stored
    entries after ``index`` may not be the core's); whatever the core keeps after ``index`` then
    comes in the same Ready's ``entries``. Otherwise the stored entries after ``index`` stay.
    """

    index: int
    term: int
    reset_log: bool


@dataclass(slots=True)
class Ready:
    """Everything the driver must do after a batch of events (see the module docstring)."""

    role: Role
    term: int
    leader: int | None
    commit_index: int
    hard_state: HardState | None = None
    entries: list[Entry] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    committed: list[Entry] = field(default_factory=list)
    reads: list[ReadState] = field(default_factory=list)
    dropped_reads: list[Any] = field(default_factory=list)  # can't be served here: not (or no longer) leader
    snapshot: SnapshotMeta | None = None  # step 0 of the contract
    # Followers that need entries compacted away: stream each a snapshot (zraft.raft.snapshot).
    # Requests, not messages: nothing here is sent as it is.
    snapshot_requests: list[InstallSnapshot] = field(default_factory=list)
    # The latest configuration, when it changed since the last Ready (the driver reconnects its peers).
    membership: Membership | None = None

    @property
    def persist_mark(self) -> tuple[int, int] | None:
        """(index, term) to report to ``persisted()`` once this Ready is durable, or None if no log change."""
        if self.entries:
            last = self.entries[-1]
            return last.index, last.term
        if self.snapshot is not None:
            return self.snapshot.index, self.snapshot.term
        return None


class RaftNode:
    def __init__(self, config: RaftConfig, hard_state: HardState | None = None, log: RaftLog | None = None,
                 rng: random.Random | None = None, membership: Membership | None = None) -> None:
        """``membership``: the configuration the stored state machine holds (as of its applied index), if
        any; else the cluster's first one, from ``config.voters``. A configuration entry in the log wins."""
        self.config = config
        self.id = config.id
        self.tracker = ProgressTracker((), config.max_inflight_msgs, config.max_inflight_bytes)
        self.peers: tuple[int, ...] = ()  # everyone we send to: every member but this node
        # The configuration as of the log's start, and the latest one (thesis 4.1: used at once, committed
        # or not) with the index of the entry that made it (0: the start's).
        self._base = membership if membership is not None else Membership.of_voters(config.voters)
        self.membership = self._base
        self.config_index = 0
        self._membership_changed = False
        # Not to vote or campaign yet: a node that came up with an empty data dir, until its driver has
        # made sure the cluster never saw this id take part (docs/PROTOCOL.md, "Membership").
        self.probation = False
        self.lead_transferee: int | None = None  # the voter this leader hands over to, while it does
        self._transfer_elapsed = 0
        self._granted: set[int] = set()  # who voted for this leader (they have taken part)
        self.lost_disks: set[int] = set()  # voters whose log came back empty after they acknowledged entries
        self.rng = rng or random.Random(config.id)
        hs = hard_state or HardState()
        self.term = hs.term
        self.voted_for = hs.voted_for
        self._persisted_hs = hs
        self.log = log or RaftLog()
        self.role = Role.FOLLOWER
        self.leader: int | None = None
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.election_timeout = self._random_timeout()
        # Highest index of this node's log known to be durable (the leader counts itself with it).
        self.stable_index = self.log.last_index
        self.read_seq = 0
        self._reads_pending: deque[tuple[int, int, list[Any]]] = deque()  # (read_seq, commit index, ids)
        self._reads_before_commit: list[Any] = []  # arrived before this term's first commit
        self._msgs: list[Message] = []
        self._reads_ready: list[ReadState] = []
        self._reads_dropped: list[Any] = []
        self._snapshot: SnapshotMeta | None = None
        self._snapshot_requests: list[InstallSnapshot] = []
        # AppendEntries refused because they would replace committed entries (forged, or a damaged log).
        self.contradictions = 0
        # Bytes of commands this leader proposed in its term that are not committed yet (etcd's
        # uncommittedSize): what the driver bounds, so a flood of proposals waits or is refused
        # instead of growing the log faster than a quorum takes it.
        self.uncommitted_bytes = 0
        self._transfer_campaign = False  # this candidacy was asked for by the leader (TimeoutNow)
        self._set_membership(self._base, 0)
        self._recompute_membership()
        self._membership_changed = False  # (the driver starts from the same configuration)
        self._soft = (self.role, self.term, self.leader)  # as the last Ready told them

    # ------------------------------------------------------------------ public API

    @property
    def progress(self) -> Mapping[int, Progress]:
        """The leader's view of every member, itself included (empty when not leading)."""
        return self.tracker.progress

    @property
    def commit_index(self) -> int:
        return self.log.committed

    @property
    def applied_index(self) -> int:
        return self.log.applied

    def tick(self) -> None:
        """Advance logical time by one tick."""
        self.election_elapsed += 1
        if self.role is Role.LEADER:
            self._tick_leader()
        elif self.election_elapsed >= self.election_timeout:
            self.election_elapsed = 0
            self.campaign()

    @property
    def promotable(self) -> bool:
        """May this node campaign (and take a leader's TimeoutNow)? Only a voter of its latest configuration."""
        return self.id in self.membership.voters and not self.probation

    @property
    def transferring(self) -> bool:
        """A leadership transfer is under way: this leader takes no writes until it ends."""
        return self.lead_transferee is not None

    @property
    def membership_committed(self) -> bool:
        """Is the latest configuration committed (no change in flight)?"""
        return self.config_index <= self.log.committed

    def campaign(self) -> None:
        """Start an election now (with a pre-vote round first when enabled); only a voter does."""
        if self.role is Role.LEADER or not self.promotable:
            return
        if self.config.pre_vote:
            self._become_pre_candidate()
        else:
            self._become_candidate()

    def propose(self, commands: list[bytes]) -> int | None:
        """Append commands to the leader's log, all in one batch.

        Returns the index of the first one (they occupy consecutive indexes in the
        current term), or None when this node is not the leader.
        """
        if self.role is not Role.LEADER or self.lead_transferee is not None:
            return None
        first = self.log.last_index + 1
        self.log.append([Entry(self.term, first + i, c) for i, c in enumerate(commands)])
        self.uncommitted_bytes += sum(len(c) for c in commands)
        self._broadcast_append()
        return first

    def propose_membership(self, new: Membership) -> int:
        """Append a configuration entry (a single-server change, zraft.raft.confchange); its index.

        Raises ConfChangeError: ``not_leader``; ``in_progress`` while another change is not committed,
        a leadership transfer runs, or no entry of this leader's term has committed yet (until then an
        uncommitted change of an earlier leader may still be in the log: the raft-dev fix of 2015);
        ``bad_request`` for a change of more than one voter, or one that leaves no voter.
        """
        if self.role is not Role.LEADER:
            raise ConfChangeError("not_leader", f"node {self.id} is not the leader")
        if self.lead_transferee is not None:
            raise ConfChangeError("in_progress", f"leadership is being handed to node {self.lead_transferee}")
        if not self.membership_committed:
            raise ConfChangeError("in_progress", f"the membership change at index {self.config_index} is not "
                                                 "committed yet")
        if self.log.term_at(self.log.committed) != self.term:
            raise ConfChangeError("in_progress", f"node {self.id} was just elected and has not committed an "
                                                 "entry of its term yet")
        if not new.voters:
            raise ConfChangeError("bad_request", "a configuration needs at least one voter")
        if not self.membership.voter_change_ok(new):
            raise ConfChangeError("bad_request", "one voter at a time: "
                                  f"{sorted(self.membership.voters)} -> {sorted(new.voters)}")
        index = self.log.last_index + 1
        self.log.append([Entry(self.term, index, new.encode(), EntryType.CONFIG)])
        self._set_membership(new, index)
        self._broadcast_append()
        return index

    def transfer_leadership(self, target: int | None = None) -> int:
        """Hand leadership to ``target`` (None: the most up-to-date other voter), thesis 3.10; its id.

        The leader takes no writes until the target leads; it brings the target's log up to date and
        sends it TimeoutNow. A transfer that has not finished within an election timeout is given up.
        """
        if self.role is not Role.LEADER:
            raise ConfChangeError("not_leader", f"node {self.id} is not the leader")
        voters = self.membership.voters
        if target is None:
            others = [(pr.match, -i) for i, pr in self.tracker.progress.items() if i in voters and i != self.id]
            if not others:
                raise ConfChangeError("bad_request", "there is no other voter to hand leadership to")
            target = -max(others)[1]
        if target == self.id:
            return target
        if target not in voters:
            raise ConfChangeError("bad_request", f"node {target} is not a voter")
        if self.lead_transferee is not None and self.lead_transferee != target:
            raise ConfChangeError("in_progress", f"leadership is being handed to node {self.lead_transferee}")
        self.lead_transferee, self._transfer_elapsed = target, 0
        pr = self.tracker.progress[target]
        if pr.match == self.log.last_index:
            self._send_timeout_now(target)
        else:
            self._send_append(target)
        return target

    def read_index(self, request_ids: list[Any]) -> None:
        """Ask for linearizable reads (ReadIndex, thesis 6.4); one heartbeat round serves them all.

        Each id comes back in a later Ready, either in ``reads`` with the index the
        state machine must reach before the read is served, or in ``dropped_reads``.
        """
        if not request_ids:
            return
        if self.role is not Role.LEADER:
            self._reads_dropped.extend(request_ids)
        elif self.log.term_at(self.log.committed) != self.term:
            # Until an entry of its own term commits, a new leader does not know the commit index.
            self._reads_before_commit.extend(request_ids)
        else:
            self._start_read_round(list(request_ids))

    def compact(self, index: int) -> int | None:
        """The driver's state machine durably covers the log up to ``index``: drop those entries.

        Returns the term of the entry at ``index`` (the driver stores it as the log's start),
        or None when there is nothing to drop. ``index`` must not pass the applied index.
        """
        log = self.log
        if index <= log.snapshot_index:
            return None
        if index > log.applied:
            raise ValueError(f"compact to {index} past the applied index {log.applied}")
        term = log.term_at(index)
        assert term is not None
        self._base = self._membership_at(index)
        log.compact(index, term)
        return term

    def report_snapshot(self, peer: int, index: int | None) -> None:
        """The driver's snapshot stream to ``peer`` ended: delivered up to ``index``, or failed (None)."""
        pr = self.tracker.progress.get(peer) if self.role is Role.LEADER else None
        if pr is None or pr.state is not ProgressState.SNAPSHOT:
            return
        pr.become_probe()
        if index is None:
            pr.probe_sent = True  # wait for a sign of life (a heartbeat response) before asking again
            return
        pr.next = max(pr.next, index + 1)
        self._send_append(peer)

    def persisted(self, index: int, term: int) -> None:
        """(``async_storage``) The driver's writes up to the entry (index, term) are durable.

        The entry is the last one (or the snapshot) of a Ready whose writes, and every earlier
        Ready's, are now on disk. A mark the log has moved past (the entry was replaced since
        it was handed out) is ignored: its replacement reports its own.
        """
        log = self.log
        if index <= self.stable_index or index < log.snapshot_index or log.term_at(index) != term:
            return  # (compacted away: a snapshot the core took since replaced it, and reports itself)
        self._stable_to(index)

    def step(self, m: Message) -> None:
        """Handle one message from a peer: the term checks once (etcd's Step), then the role's handler."""
        if m.term > self.term:
            if isinstance(m, RequestVote) and self._in_lease() and not m.transfer:
                return  # a leader we heard from recently is alive: don't let this node disrupt it
            self._newer_term(m)
        elif m.term < self.term:
            self._older_term(m)
            return
        if self.probation:
            return  # it takes no part until let in (no vote, no acknowledgement the leader could count as "seen")
        if isinstance(m, RequestVote):
            self._handle_vote_request(m)
        elif self.role is Role.LEADER:
            self._step_leader(m)
        elif self.role is Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    def _newer_term(self, m: Message) -> None:
        """A message of a newer term than ours: follow it (pre-votes excepted)."""
        if isinstance(m, RequestVote):
            if not m.pre_vote:
                # Adopt the term but keep the election timer running: only granting the vote restarts
                # it (Figure 2). Otherwise a node with a stale log that keeps campaigning holds off,
                # forever, the up-to-date nodes that could win.
                elapsed = self.election_elapsed
                self._become_follower(m.term, None)
                self.election_elapsed = elapsed
        elif not (isinstance(m, RequestVoteResponse) and m.pre_vote and m.granted):
            # (A granted pre-vote carries the term we would campaign in, not a newer one.)
            self._become_follower(m.term, m.src if isinstance(m, _FROM_LEADER) else None)

    def _older_term(self, m: Message) -> None:
        """A message of an older term is dropped; some are answered so the sender learns the term."""
        if isinstance(m, _FROM_LEADER) and (self.config.check_quorum or self.config.pre_vote
                                            or m.src not in self.membership):
            # A stale leader (or one cut off while we moved on): tell it our term so it steps
            # down. Without this, pre-vote could leave a node with a higher term stuck forever;
            # so could a configuration of ours older than the leader's (our campaigns never reach it).
            self._send(AppendEntriesResponse(self.term, self.id, m.src, success=False))
        elif isinstance(m, RequestVote) and m.pre_vote:
            self._send(RequestVoteResponse(self.term, self.id, m.src, granted=False, pre_vote=True))

    def has_ready(self) -> bool:
        log = self.log
        return bool(
            self._msgs or self._reads_ready or self._reads_dropped or self._snapshot is not None
            or self._snapshot_requests
            or log.unstable_from <= log.last_index or log.committed > log.applied
            or self._persisted_hs.term != self.term or self._persisted_hs.voted_for != self.voted_for
            or self._membership_changed or self._soft != (self.role, self.term, self.leader)
        )

    def ready(self) -> Ready:
        """Take the effects of everything since the last call (see the module docstring)."""
        entries = self.log.take_unstable()
        if self.config.async_storage:
            # Entries handed out again (a truncation) or dropped by a snapshot are not durable as they
            # stand now; persisted() raises the mark once the driver has written what replaces them.
            if entries:
                self.stable_index = min(self.stable_index, entries[0].index - 1)
            if self._snapshot is not None and self._snapshot.reset_log:
                self.stable_index = min(self.stable_index, self._snapshot.index)
        elif entries or self._snapshot is not None:
            self._stable_to(self.log.last_index)  # durable before our next call, by contract
        hs = HardState(self.term, self.voted_for)
        rd = Ready(role=self.role, term=self.term, leader=self.leader, commit_index=self.log.committed,
                   hard_state=hs if hs != self._persisted_hs else None, entries=entries,
                   messages=self._msgs, committed=self.log.take_committed(),
                   reads=self._reads_ready, dropped_reads=self._reads_dropped, snapshot=self._snapshot,
                   snapshot_requests=self._snapshot_requests,
                   membership=self.membership if self._membership_changed else None)
        self._membership_changed = False
        self._soft = (self.role, self.term, self.leader)
        self._persisted_hs = hs
        self._msgs, self._reads_ready, self._reads_dropped = [], [], []
        self._snapshot, self._snapshot_requests = None, []
        return rd

    # ------------------------------------------------------------------ roles

    def _random_timeout(self) -> int:
        return self.rng.randrange(self.config.election_ticks, 2 * self.config.election_ticks)

    def _reset_timers(self) -> None:
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.election_timeout = self._random_timeout()

    def _stable_to(self, index: int) -> None:
        """This node's log is durable up to ``index``: a leader counts itself that far."""
        self.stable_index = index
        if self.role is Role.LEADER:
            self.tracker.progress[self.id].match = index
            self._maybe_commit()

    def _in_lease(self) -> bool:
        """Heard from a live leader within the minimum election timeout (thesis 4.2.3, 9.6)."""
        return (self.config.check_quorum and self.leader is not None
                and self.election_elapsed < self.config.election_ticks)

    def _become_follower(self, term: int, leader: int | None) -> None:
        if term != self.term:
            self.term, self.voted_for = term, None
            # Acks queued this turn go out only after this Ready is persisted, and the new term's
            # leader may overwrite the entries they acknowledge before that: never send them.
            self._msgs = [m for m in self._msgs if not (isinstance(m, AppendEntriesResponse) and m.success)]
        if self.role is Role.LEADER:
            self._snapshot_requests = []  # no longer ours to serve: the Progress they were for is gone
            self._drop_reads()
        self.lead_transferee = None
        self._transfer_campaign = False
        self.role = Role.FOLLOWER
        self.leader = leader
        self.uncommitted_bytes = 0
        self.tracker.clear()
        self._reset_timers()

    def _become_pre_candidate(self) -> None:
        self.role = Role.PRE_CANDIDATE
        self.leader = None
        self._start_election()
        if not self._poll_won():
            self._request_votes(self.term + 1, pre_vote=True)

    def _become_candidate(self, transfer: bool = False) -> None:
        self.term += 1
        self.voted_for = self.id
        self.role = Role.CANDIDATE
        self.leader = None
        self._transfer_campaign = transfer
        self._start_election()
        if not self._poll_won():
            self._request_votes(self.term, pre_vote=False)

    def _start_election(self) -> None:
        self._reset_timers()
        self.tracker.reset_votes()
        self.tracker.record_vote(self.id, True)

    def _become_leader(self) -> None:
        self._granted = {i for i, v in self.tracker.votes.items() if v}
        self._transfer_campaign = False
        self.role = Role.LEADER
        self.leader = self.id
        self._reset_timers()
        self.tracker.reset(self.log.last_index + 1)
        for pr in self.tracker.progress.values():
            pr.recent_active = True  # give everyone a full election timeout before check-quorum
        me = self.tracker.progress[self.id]
        me.match = self.stable_index  # the leader is tracked like any member: its disk is its match
        me.become_replicate()
        # A no-op entry of the new term: committing it commits everything before it (5.4.2)
        # and tells the leader the commit index, which ReadIndex needs.
        self.propose([b""])

    def _request_votes(self, term: int, pre_vote: bool) -> None:
        for p in self.peers:
            self._send(RequestVote(term, self.id, p, self.log.last_index, self.log.last_term, pre_vote,
                                   transfer=self._transfer_campaign and not pre_vote))

    def _poll_won(self) -> bool:
        """Count the votes so far; win or lose the election if a quorum decided. True if decided."""
        result = self.tracker.tally_votes()
        if result is VoteResult.WON:
            if self.role is Role.PRE_CANDIDATE:
                self._become_candidate()
            else:
                self._become_leader()
            return True
        if result is VoteResult.LOST:
            self._become_follower(self.term, None)
            return True
        return False

    def _handle_vote_request(self, m: RequestVote) -> None:
        can_vote = (
            self.voted_for == m.src
            or (self.voted_for is None and (self.leader is None or m.transfer))
            or (m.pre_vote and m.term > self.term)
        )
        # Only for a voter of our latest configuration (a removed node can't win anyone's vote, so it
        # can't disrupt), or for a candidate whose log is ahead of ours: our configuration may be older than
        # its own (we may lack the entry that made it a voter; a node that joined knows none yet, and its vote
        # may be needed, thesis 4.1). A removed node's log is behind its committed removal, which a majority of
        # the new configuration holds, so it wins no majority that way either. Never while on probation (this
        # node may have voted in this term already).
        ahead = (m.last_log_term, m.last_log_index) > (self.log.last_term, self.log.last_index)
        may_grant = (m.src in self.membership.voters or ahead) and not self.probation
        if can_vote and may_grant and self.log.is_up_to_date(m.last_log_index, m.last_log_term):
            # A granted pre-vote answers in the term asked about; see step().
            self._send(RequestVoteResponse(m.term, self.id, m.src, granted=True, pre_vote=m.pre_vote))
            if not m.pre_vote:
                self.voted_for = m.src
                self.election_elapsed = 0
        else:
            self._send(RequestVoteResponse(self.term, self.id, m.src, granted=False, pre_vote=m.pre_vote))

    # ------------------------------------------------------------------ follower and candidates

    def _step_follower(self, m: Message) -> None:
        if isinstance(m, AppendEntries):
            self.leader, self.election_elapsed = m.src, 0
            self._handle_append(m)
        elif isinstance(m, Heartbeat):
            self.leader, self.election_elapsed = m.src, 0
            self.log.commit_to(min(m.commit, self.log.last_index))
            self._send(HeartbeatResponse(self.term, self.id, m.src, m.read_seq))
            if m.commit > self.log.last_index:
                # The commit a heartbeat carries is at most what this node acknowledged, so its log
                # was lost (an emptied disk under its old id). Say so at once, as a rejection with a
                # shorter log, rather than at the leader's next append (an idle cluster has none).
                self._send(AppendEntriesResponse(self.term, self.id, m.src, success=False, reject_index=m.commit,
                                                 conflict_term=0, conflict_index=self.log.last_index + 1))
        elif isinstance(m, InstallSnapshot):
            self.leader, self.election_elapsed = m.src, 0
            self._handle_snapshot(m)
        elif isinstance(m, TimeoutNow) and m.src == self.leader and self.promotable:
            self._become_candidate(transfer=True)  # the leader hands over: no pre-vote, no waiting

    def _step_candidate(self, m: Message) -> None:
        if isinstance(m, _FROM_LEADER):
            # Someone won this term: follow it.
            self._become_follower(self.term, m.src)
            self._step_follower(m)
        elif isinstance(m, RequestVoteResponse) and m.pre_vote == (self.role is Role.PRE_CANDIDATE):
            self.tracker.record_vote(m.src, m.granted)
            self._poll_won()

    def _handle_append(self, m: AppendEntries) -> None:
        log = self.log
        if log.matches(m.prev_index, m.prev_term):
            if self._contradicts_committed(m):
                # No leader of this term can send that (Leader Completeness): a forged message, or
                # this node's log was damaged. Refuse it rather than lose what is committed.
                self.contradictions += 1
                return
            last_new = log.merge(m.prev_index, m.entries)
            if self.config_index > m.prev_index or any(e.type == EntryType.CONFIG for e in m.entries):
                self._recompute_membership()  # a configuration entry came, or may have been replaced
            log.commit_to(min(m.commit, last_new))
            self._send(AppendEntriesResponse(self.term, self.id, m.src, success=True, match_index=last_new))
            return
        # Reject, with a hint that lets the leader skip the whole conflicting term.
        if m.prev_index > log.last_index:
            conflict_term, conflict_index = 0, log.last_index + 1
        else:
            conflict_term = log.term_at(m.prev_index) or 0
            conflict_index = log.first_index_of_term(m.prev_index)
        self._send(AppendEntriesResponse(self.term, self.id, m.src, success=False, reject_index=m.prev_index,
                                         conflict_term=conflict_term, conflict_index=conflict_index))

    def _contradicts_committed(self, m: AppendEntries) -> bool:
        """Would the message replace an entry this node knows is committed?"""
        log = self.log
        for e in m.entries:
            if e.index > log.committed:
                return False
            if e.index > log.snapshot_index and log.term_at(e.index) != e.term:
                return True
        return False

    def _handle_snapshot(self, m: InstallSnapshot) -> None:
        log = self.log
        if m.index <= log.committed:
            # Nothing new in it (a late or duplicate stream): our committed entries match the leader's.
            self._send(AppendEntriesResponse(self.term, self.id, m.src, success=True, match_index=log.committed))
            return
        reset = not (log.snapshot_index < m.index <= log.last_index and log.term_at(m.index) == m.snap_term)
        # The driver may keep its stored entries after the index only if they are ours. They need not be
        # when an entry up to the index is not persisted yet (an append in this batch may have truncated
        # the stored log and replaced them), nor after a snapshot earlier in this batch reset the log.
        # Resetting is always safe: whatever we keep after the index is unstable, so it comes in the Ready.
        if log.unstable_from <= m.index or (self._snapshot is not None and self._snapshot.reset_log):
            reset = True
        log.restore(m.index, m.snap_term)
        if m.config:
            self._base = Membership.decode(m.config)
        self._recompute_membership()
        self._snapshot = SnapshotMeta(m.index, m.snap_term, reset)
        self._send(AppendEntriesResponse(self.term, self.id, m.src, success=True, match_index=m.index))

    # ------------------------------------------------------------------ leader

    def _tick_leader(self) -> None:
        if self.lead_transferee is not None:
            self._transfer_elapsed += 1
            if self._transfer_elapsed >= self.config.election_ticks:
                self.lead_transferee = None  # it did not happen within an election timeout: lead on
                if self._removed():  # ... unless this leader was removed: then it only steps down
                    self._become_follower(self.term, None)
                    return
        if self.election_elapsed >= self.config.election_ticks:
            self.election_elapsed = 0
            if self.config.check_quorum:
                if not self.tracker.quorum_active():
                    self._become_follower(self.term, None)
                    return
                for i, pr in self.tracker.progress.items():
                    pr.recent_active = i == self.id  # the leader is always active to itself
        self.heartbeat_elapsed += 1
        if self.heartbeat_elapsed >= self.config.heartbeat_ticks:
            self.heartbeat_elapsed = 0
            self._broadcast_heartbeat()
        self._membership_duties()

    def _step_leader(self, m: Message) -> None:
        if isinstance(m, AppendEntriesResponse):
            self._handle_append_response(m)
        elif isinstance(m, HeartbeatResponse):
            pr = self.tracker.progress.get(m.src)
            if pr is None or m.src == self.id:
                return
            pr.recent_active = True
            # Messages may have been lost: allow another probe, or free one slot of a full window.
            pr.probe_sent = False
            if pr.state is ProgressState.REPLICATE and pr.inflights.full():
                pr.inflights.free_first_one()
            if m.read_seq > pr.read_seq:
                pr.read_seq = m.read_seq
                self._release_reads()
            if pr.match < self.log.last_index:
                self._send_append(m.src)
        elif isinstance(m, _FROM_LEADER):
            raise AssertionError(f"two leaders in term {self.term}: {self.id} and {m.src}")

    def _handle_append_response(self, m: AppendEntriesResponse) -> None:
        pr = self.tracker.progress.get(m.src)
        if pr is None or m.src == self.id:
            return
        pr.recent_active = True
        if not m.success:
            if m.reject_index:  # (0 always matches: this is no rejection but the notice of a newer term, _older_term)
                self._handle_append_reject(pr, m)
            return
        if pr.maybe_update(m.match_index):
            if pr.state is ProgressState.REPLICATE:
                pr.inflights.free_le(m.match_index)
            else:
                pr.become_replicate()
            self._maybe_commit()
            if self.role is not Role.LEADER:
                return  # it committed its own removal and stepped down
        elif pr.state is ProgressState.PROBE:
            pr.probe_sent = False
        if m.src == self.lead_transferee and pr.match == self.log.last_index and self._send_timeout_now(m.src):
            return
        pr.next = max(pr.next, pr.match + 1)
        while self._send_append(m.src, allow_empty=False):
            pass

    def _handle_append_reject(self, pr: Progress, m: AppendEntriesResponse) -> None:
        """A follower's log did not match at ``m.reject_index``: back up (etcd's MaybeDecrTo, plus lost disks).

        In REPLICATE the follower holds everything up to its match, so a rejection means that
        messages after it were lost (back up with the follower's hint, never below the match), or
        is the late answer to an older message. One that says the follower's log ends before its
        match (conflict term 0) is either such a late answer or a lost disk: probe from the match
        to tell. Only in PROBE, and only answering the probe now outstanding (sent after the match
        was acknowledged), does a log shorter than the match mean the disk was lost or replaced (a
        new, empty node under an old id): then the match goes down to what it has, or we would
        wait for it forever. (A late answer to an older probe at the very same index could still
        lower it; that costs resends, never safety: commit indexes never go back.)
        """
        if pr.state is ProgressState.SNAPSHOT:
            return  # answers an append from before the snapshot; the stream's outcome decides
        shorter = m.conflict_term == 0 and m.conflict_index <= pr.match
        if pr.state is ProgressState.REPLICATE:
            if shorter:
                pr.become_probe()  # from the match: a late answer, or a lost disk? The probe tells.
                self._send_append(m.src)
                return
            if m.reject_index <= pr.match:
                return  # stale: answers a message sent before we learned better
        elif m.reject_index != pr.next - 1:
            return  # answers an earlier probe
        elif shorter:
            if m.conflict_index == 1 and pr.match > 0 and m.src in self.membership.voters:
                self.lost_disks.add(m.src)  # its log is empty now: a wiped data dir under a voter's id
            pr.match = m.conflict_index - 1  # it lost its log
        elif m.reject_index <= pr.match:
            return
        if m.conflict_term:
            last_of_term = self.log.last_index_of_term(m.conflict_term)
            nxt = last_of_term + 1 if last_of_term is not None else m.conflict_index
        else:
            nxt = m.conflict_index
        pr.become_probe()
        pr.next = max(pr.match + 1, min(nxt, m.reject_index))
        self._send_append(m.src)

    def _send_append(self, peer: int, allow_empty: bool = True) -> bool:
        """Send the next AppendEntries to ``peer`` if its window allows. True if something was sent."""
        pr = self.tracker.progress[peer]
        if pr.paused():
            return False
        log = self.log
        if pr.next <= log.snapshot_index:
            # The entries it needs are compacted away: only a snapshot can bring it up to date.
            pr.become_snapshot(log.snapshot_index)
            self._snapshot_requests.append(
                InstallSnapshot(self.term, self.id, peer, log.snapshot_index, log.snapshot_term))
            return True
        last = log.last_index
        entries: list[Entry] = []
        size = 0
        if pr.next <= last:
            hi = pr.next
            while hi <= last and (size < self.config.max_msg_bytes or hi == pr.next):
                size += len(log.entries[hi - log.snapshot_index - 1].data) + 16
                hi += 1
            entries = log.slice(pr.next, hi)
        if not entries and not allow_empty:
            return False
        prev = pr.next - 1
        self._send(AppendEntries(self.term, self.id, peer, prev, log.term_at(prev), entries, log.committed))
        pr.sent(entries[-1].index if entries else None, size)
        return True

    def _broadcast_append(self) -> None:
        for p in self.peers:
            self._send_append(p, allow_empty=False)
        if not self.peers:
            self._maybe_commit()

    def _broadcast_heartbeat(self) -> None:
        progress = self.tracker.progress
        for p in self.peers:
            self._send(Heartbeat(self.term, self.id, p, min(progress[p].match, self.log.committed), self.read_seq))

    def _maybe_commit(self) -> None:
        """Commit the highest index a quorum holds, if it is of the current term (5.4.2)."""
        n = self.tracker.committed()
        if n > self.log.committed and self.log.term_at(n) == self.term:
            raft_log = self.log
            done = sum(len(e.data) for e in raft_log.slice(raft_log.committed + 1, n + 1) if e.term == self.term)
            self.uncommitted_bytes = max(0, self.uncommitted_bytes - done)
            raft_log.commit_to(n)
            if self._reads_before_commit:
                waiting, self._reads_before_commit = self._reads_before_commit, []
                self._start_read_round(waiting)
            if self._removed():
                self._hand_over_and_step_down()

    # ------------------------------------------------------------------ membership

    def _membership_at(self, index: int) -> Membership:
        """The configuration in force at ``index`` (which must not be before the log's start)."""
        log = self.log
        for e in reversed(log.slice(log.first_index, min(index, log.last_index) + 1)):
            if e.type == EntryType.CONFIG:
                return Membership.decode(e.data)
        return self._base

    def _recompute_membership(self) -> None:
        """Take the latest configuration entry of the log (or the log start's configuration)."""
        log = self.log
        for e in reversed(log.entries):
            if e.type == EntryType.CONFIG:
                latest = Membership.decode(e.data)
                if (e.index, latest) != (self.config_index, self.membership):
                    self._set_membership(latest, e.index)
                return
        if self.config_index != 0 or self.membership != self._base:
            self._set_membership(self._base, 0)

    def _set_membership(self, new: Membership, index: int) -> None:
        self.membership, self.config_index = new, index
        self._membership_changed = True
        self.tracker.set_config(new.voters, new.learners, self.log.last_index + 1, keep=self.id)
        self.peers = tuple(i for i in sorted(new.ids) if i != self.id)
        if self.lead_transferee is not None and self.lead_transferee not in new.voters:
            self.lead_transferee = None
        if self.role is Role.LEADER:
            self._maybe_commit()  # the quorum may be smaller now

    def _membership_duties(self) -> None:
        """What a leader changes in the membership by itself, one change at a time (on a tick):
        write down a configuration bootstrapped from Config.txt, mark members that took part as
        seen, promote a learner that caught up, demote a voter that lost its disk."""
        if (self.role is not Role.LEADER or not self.membership_committed or self.lead_transferee is not None
                or self.log.term_at(self.log.committed) != self.term or self.id not in self.membership.voters):
            return
        cur = self.membership
        progress = self.tracker.progress
        took_part = {i for i, pr in progress.items() if pr.match > 0} | self._granted | {self.id}
        new = None
        if not cur.explicit:
            new = confchange.mark_seen(Membership(cur.members), took_part)
        elif any((m := cur.get(i)) is not None and not m.seen for i in took_part):
            new = confchange.mark_seen(cur, took_part)
        elif self.lost_disks & cur.voters and len(cur.voters) > 1:
            node = min(self.lost_disks & cur.voters)
            new = confchange.demote_member(cur, node)
        else:
            for m in cur.members:
                pr = progress.get(m.id)
                if (m.promote and not m.voter and pr is not None and pr.state is ProgressState.REPLICATE
                        and pr.recent_active and pr.match + self.config.promote_lag >= self.log.committed):
                    new = confchange.promote_member(cur, m.id)
                    break
        self.lost_disks &= cur.voters
        if new is not None and new != cur:
            self.propose_membership(new)

    def _hand_over_and_step_down(self) -> None:
        """This leader's removal is committed: hand leadership to the most up-to-date voter, as a
        leadership transfer does (no writes meanwhile; a voter that lacks entries written after the removal
        is brought up to date first), so the handover costs no election timeout. It steps down when it
        sends TimeoutNow (_send_timeout_now), or when the transfer is given up after an election timeout."""
        if self.lead_transferee is not None:
            return  # handing over already
        try:
            self.transfer_leadership()
        except ConfChangeError:  # no voter to hand to
            self._become_follower(self.term, None)

    def _send_timeout_now(self, target: int) -> bool:
        """The transferee holds the whole log: tell it to campaign. True if this leader stepped down
        with it (a removed leader's handover)."""
        self._send(TimeoutNow(self.term, self.id, target))
        if self._removed():
            self._become_follower(self.term, None)
            return True
        return False

    def _removed(self) -> bool:
        """Whether this leader's own removal is committed (it only hands over now)."""
        return self.id not in self.membership.voters and self.membership_committed

    # ------------------------------------------------------------------ reads

    def _start_read_round(self, request_ids: list[Any]) -> None:
        self.read_seq += 1
        self.tracker.progress[self.id].read_seq = self.read_seq  # the leader confirms its own round
        self._reads_pending.append((self.read_seq, self.log.committed, request_ids))
        self._broadcast_heartbeat()
        self._release_reads()

    def _release_reads(self) -> None:
        """Serve every pending read whose heartbeat round a quorum has answered."""
        confirmed = self.tracker.confirmed_read_seq()
        while self._reads_pending and self._reads_pending[0][0] <= confirmed:
            _, index, ids = self._reads_pending.popleft()
            self._reads_ready.extend(ReadState(i, index) for i in ids)

    def _drop_reads(self) -> None:
        for _, _, ids in self._reads_pending:
            self._reads_dropped.extend(ids)
        self._reads_pending.clear()
        self._reads_dropped.extend(self._reads_before_commit)
        self._reads_before_commit = []

    def _send(self, m: Message) -> None:
        self._msgs.append(m)
