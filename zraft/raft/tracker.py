"""What a leader knows of each member, sans-I/O (etcd-io/raft's tracker/).

:class:`Progress` is the leader's view of one member's log, in one of three explicit states:

* ``PROBE``: the match point is not known; one AppendEntries at a time until it is found (a
  rejection moves ``next`` back, using the follower's hint to skip a whole term at once).
* ``REPLICATE``: entries stream optimistically from ``next`` on, without waiting for replies,
  up to what :class:`Inflights` allows (pipelining).
* ``SNAPSHOT``: the entries the member needs are compacted away; the driver streams it a
  snapshot and nothing else is sent until the stream ends or the member acknowledges past it.

:class:`ProgressTracker` holds every member's Progress, the leader's own included (its match is
what its own disk holds), the configuration of voters (a :class:`~zraft.raft.quorum.JointConfig`),
and the votes of the current election; every quorum question the core asks goes through it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from enum import Enum

from zraft.raft.quorum import JointConfig, MajorityConfig, VoteResult


class ProgressState(str, Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


class Inflights:
    """The AppendEntries sent to one member and not yet acknowledged, bounded by count and by bytes.

    Each is remembered by the index of its last entry and the bytes of entries it carries; an
    acknowledgement of index i frees every message up to i. ``max_bytes`` 0 means no byte bound.
    """

    __slots__ = ("max_msgs", "max_bytes", "bytes", "_sent")

    def __init__(self, max_msgs: int, max_bytes: int = 0) -> None:
        if max_msgs < 1 or max_bytes < 0:
            raise ValueError(f"bad inflight bounds: {max_msgs} messages, {max_bytes} bytes")
        self.max_msgs = max_msgs
        self.max_bytes = max_bytes
        self.bytes = 0
        self._sent: deque[tuple[int, int]] = deque()  # (last index, bytes), oldest first

    def __len__(self) -> int:
        return len(self._sent)

    def full(self) -> bool:
        return len(self._sent) >= self.max_msgs or (self.max_bytes > 0 and self.bytes >= self.max_bytes)

    def add(self, last_index: int, size: int) -> None:
        self._sent.append((last_index, size))
        self.bytes += size

    def free_le(self, index: int) -> None:
        """Everything up to ``index`` is acknowledged."""
        sent = self._sent
        while sent and sent[0][0] <= index:
            self.bytes -= sent.popleft()[1]

    def free_first_one(self) -> None:
        """Make room for one more message (the member answered a heartbeat: earlier ones may be lost)."""
        if self._sent:
            self.bytes -= self._sent.popleft()[1]

    def reset(self) -> None:
        self._sent.clear()
        self.bytes = 0


class Progress:
    """The leader's view of one member (see the module docstring for the states).

    ``match``: the highest index known to match the leader's log. ``next``: the next index to
    send. ``probe_sent``: in PROBE, a probe is out and unanswered (pause until it is, or until
    a heartbeat response shows the member alive). ``pending_snapshot``: in SNAPSHOT, the index
    of the snapshot asked for. ``recent_active``: heard from since the last check-quorum round.
    ``read_seq``: the latest ReadIndex round the member echoed.
    """

    __slots__ = ("match", "next", "state", "probe_sent", "inflights", "recent_active", "read_seq",
                 "pending_snapshot")

    def __init__(self, next_index: int, inflights: Inflights, match: int = 0) -> None:
        self.match = match
        self.next = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.inflights = inflights
        self.recent_active = False
        self.read_seq = 0
        self.pending_snapshot = 0

    def __repr__(self) -> str:
        return (f"Progress({self.state.value} match={self.match} next={self.next} inflight={len(self.inflights)}"
                f"{' probe_sent' if self.probe_sent else ''}"
                f"{f' snapshot={self.pending_snapshot}' if self.pending_snapshot else ''})")

    def paused(self) -> bool:
        """Nothing more may be sent now (no new entries; heartbeats always go)."""
        if self.state is ProgressState.REPLICATE:
            return self.inflights.full()
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        return True

    def _become(self, state: ProgressState) -> None:
        self.state = state
        self.probe_sent = False
        self.pending_snapshot = 0
        self.inflights.reset()

    def become_probe(self) -> None:
        self._become(ProgressState.PROBE)
        self.next = self.match + 1

    def become_replicate(self) -> None:
        self._become(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, index: int) -> None:
        self._become(ProgressState.SNAPSHOT)
        self.pending_snapshot = index

    def maybe_update(self, index: int) -> bool:
        """The member acknowledged everything up to ``index``; True if that raised ``match``."""
        if index <= self.match:
            return False
        self.match = index
        return True

    def sent(self, entries_last: int | None, size: int = 0) -> None:
        """An AppendEntries went out. In PROBE it is the probe; in REPLICATE its entries (up to
        ``entries_last``, ``size`` bytes; None if it carried none) are now in flight."""
        if self.state is ProgressState.PROBE:
            self.probe_sent = True
        elif entries_last is not None:
            self.next = entries_last + 1
            self.inflights.add(entries_last, size)


class ProgressTracker:
    """Every member's :class:`Progress` (the leader's own among them) and the votes of an election."""

    def __init__(self, voters: Iterable[int], max_inflight_msgs: int = 256, max_inflight_bytes: int = 0,
                 learners: Iterable[int] = ()) -> None:
        self.voters = JointConfig(MajorityConfig(voters))
        self.learners = frozenset(learners)
        self.max_inflight_msgs = max_inflight_msgs
        self.max_inflight_bytes = max_inflight_bytes
        self.progress: dict[int, Progress] = {}
        self.votes: dict[int, bool] = {}

    @property
    def ids(self) -> list[int]:
        """Every member, voters and learners, in id order."""
        return sorted(self.voters.ids | self.learners)

    def is_voter(self, node_id: int) -> bool:
        return node_id in self.voters.ids

    def set_config(self, voters: Iterable[int], learners: Iterable[int], next_index: int, keep: int) -> None:
        """A new configuration. While leading (``progress`` not empty), a new member starts probing at
        ``next_index`` and a removed one is dropped, except ``keep`` (the leader, which may be leaving)."""
        self.voters = JointConfig(MajorityConfig(voters))
        self.learners = frozenset(learners)
        if not self.progress:
            return
        ids = set(self.ids)
        for i in list(self.progress):
            if i not in ids and i != keep:
                del self.progress[i]
        for i in ids - self.progress.keys():
            pr = self.progress[i] = Progress(next_index, Inflights(self.max_inflight_msgs, self.max_inflight_bytes))
            pr.recent_active = True  # a full election timeout before check-quorum counts it

    # ------------------------------------------------------------------ replication

    def reset(self, next_index: int) -> None:
        """A new leadership: every member starts probing at ``next_index``, none acknowledged yet."""
        self.progress = {i: Progress(next_index, Inflights(self.max_inflight_msgs, self.max_inflight_bytes))
                         for i in self.ids}

    def clear(self) -> None:
        """Not leading: nothing to track."""
        self.progress = {}

    def committed(self) -> int:
        """The highest index a quorum of voters holds (the leader's own durable log counts as its match)."""
        return self.voters.committed_index({i: pr.match for i, pr in self.progress.items()})

    def quorum_active(self) -> bool:
        """Did a quorum of voters (the leader counting itself) show signs of life since the last check?"""
        return self.voters.vote_result({i: pr.recent_active for i, pr in self.progress.items()}) is VoteResult.WON

    def confirmed_read_seq(self) -> int:
        """The latest ReadIndex round a quorum has echoed (the leader's own counts as echoed)."""
        return self.voters.committed_index({i: pr.read_seq for i, pr in self.progress.items()})

    # ------------------------------------------------------------------ elections

    def reset_votes(self) -> None:
        self.votes = {}

    def record_vote(self, node_id: int, granted: bool) -> None:
        """A member's answer; only its first one in an election counts."""
        self.votes.setdefault(node_id, granted)

    def tally_votes(self) -> VoteResult:
        return self.voters.vote_result(self.votes)
