"""Quorum arithmetic, sans-I/O (etcd-io/raft's quorum/): majority and joint configurations.

A configuration answers the two questions Raft asks of its voters: which index a quorum of them
has reached (from what each one has acknowledged: the commit index, or the ReadIndex round a
quorum echoed), and whether an election is won, lost or still open. A joint configuration
(thesis 4.3, etcd's ConfChangeV2) needs both answered for two majorities at once; outside a
membership change its outgoing half is empty and it is a plain majority.

An empty majority imposes nothing: its committed index is :data:`NO_LIMIT` and every vote
counts as won, so that the outgoing half of a joint configuration that is not joint drops out
of both answers (as in etcd).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from enum import Enum

NO_LIMIT = (1 << 63) - 1  # the committed index of an empty configuration: it holds nothing back


class VoteResult(Enum):
    PENDING = "pending"  # neither won nor lost yet: the missing votes decide
    LOST = "lost"
    WON = "won"


class MajorityConfig:
    """A set of voters; any strict majority of them is a quorum."""

    __slots__ = ("ids",)
    __hash__ = None  # type: ignore[assignment]  # compared by value, never a dict key

    def __init__(self, ids: Iterable[int] = ()) -> None:
        self.ids = frozenset(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.ids))

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MajorityConfig) and other.ids == self.ids

    def __repr__(self) -> str:
        return f"MajorityConfig({sorted(self.ids)})"

    def committed_index(self, acked: Mapping[int, int]) -> int:
        """The highest index that a majority has acknowledged; a voter missing from ``acked`` counts as 0."""
        n = len(self.ids)
        if n == 0:
            return NO_LIMIT
        values = sorted((acked.get(i, 0) for i in self.ids), reverse=True)
        return values[n // 2]  # the (n // 2 + 1)-th largest: that many voters have at least this much

    def vote_result(self, votes: Mapping[int, bool]) -> VoteResult:
        """WON once a majority granted, LOST once a majority can no longer grant, else PENDING."""
        n = len(self.ids)
        if n == 0:
            return VoteResult.WON
        granted = missing = 0
        for i in self.ids:
            v = votes.get(i)
            if v is None:
                missing += 1
            elif v:
                granted += 1
        quorum = n // 2 + 1
        if granted >= quorum:
            return VoteResult.WON
        if granted + missing >= quorum:
            return VoteResult.PENDING
        return VoteResult.LOST


class JointConfig:
    """Two majorities that must both agree: ``incoming`` (the configuration being entered) and
    ``outgoing`` (the one being left; empty when no change is under way)."""

    __slots__ = ("incoming", "outgoing")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, incoming: MajorityConfig, outgoing: MajorityConfig | None = None) -> None:
        self.incoming = incoming
        self.outgoing = outgoing if outgoing is not None else MajorityConfig()

    @property
    def joint(self) -> bool:
        return len(self.outgoing) > 0

    @property
    def ids(self) -> frozenset[int]:
        """Every voter of either half."""
        return self.incoming.ids | self.outgoing.ids

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, JointConfig) and other.incoming == self.incoming
                and other.outgoing == self.outgoing)

    def __repr__(self) -> str:
        if not self.joint:
            return f"JointConfig({sorted(self.incoming.ids)})"
        return f"JointConfig({sorted(self.incoming.ids)} && {sorted(self.outgoing.ids)})"

    def committed_index(self, acked: Mapping[int, int]) -> int:
        """The highest index both halves have committed."""
        return min(self.incoming.committed_index(acked), self.outgoing.committed_index(acked))

    def vote_result(self, votes: Mapping[int, bool]) -> VoteResult:
        """WON when both halves won; LOST as soon as either lost; else PENDING."""
        a = self.incoming.vote_result(votes)
        b = self.outgoing.vote_result(votes)
        if a is b:
            return a
        if VoteResult.LOST in (a, b):
            return VoteResult.LOST
        return VoteResult.PENDING
