"""The cluster's membership and how it changes, sans-I/O (etcd-io/raft's confchange/).

A :class:`Membership` is every member with its addresses and its part: a **voter** counts toward
quorums and may campaign; a **learner** receives the log and snapshots and nothing else (a learner
with ``promote`` set becomes a voter once the leader sees it caught up). ``seen``: the member has
taken part (it granted a leader its vote or acknowledged entries); a node that comes back with an
empty data dir under a seen id must not vote again (docs/PROTOCOL.md, "Membership").

Changes are **single-server** (thesis 4.1): each configuration differs from the one before by at
most one voter, so any majority of the old and any majority of the new overlap, and the change is
one log entry (:data:`~zraft.raft.messages.EntryType.CONFIG`) whose data is :meth:`Membership.encode`.
A node uses the latest configuration in its log, committed or not; the leader has at most one
uncommitted configuration and proposes one only after an entry of its own term committed (the
raft-dev fix of 2015). Why not joint consensus: see docs/ARCHITECTURE.md.

The functions below make the next configuration from the current one, or raise
:class:`ConfChangeError` saying why not: they are what a client's request is checked with, and
what the core checks again (:meth:`Membership.voter_change_ok`) before it proposes anything.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

import msgpack

MAX_ID = (1 << 63) - 1
_VERSION = 1
_VOTER, _PROMOTE, _SEEN = 1, 2, 4


class ConfChangeError(ValueError):
    """A membership change that is refused; ``code`` is the wire protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Member:
    id: int
    ip: str = ""
    port: int = 0
    client_port: int = 0
    http_port: int = 0
    voter: bool = True
    promote: bool = False  # a learner to make a voter once it has caught up
    seen: bool = False  # it has taken part: granted a leader its vote, or acknowledged entries

    @property
    def flags(self) -> int:
        return _VOTER * self.voter | _PROMOTE * self.promote | _SEEN * self.seen

    def describe(self) -> str:
        return f"node {self.id} ({'voter' if self.voter else 'learner'} at {self.ip}:{self.port})"


@dataclass(frozen=True, slots=True)
class Membership:
    """Every member, in id order. ``explicit`` False: bootstrapped from Config.txt, not (yet) in the log."""

    members: tuple[Member, ...] = ()
    explicit: bool = True

    def __post_init__(self) -> None:
        ids = [m.id for m in self.members]
        if ids != sorted(set(ids)):
            object.__setattr__(self, "members", tuple(sorted({m.id: m for m in self.members}.values(),
                                                             key=lambda m: m.id)))

    @classmethod
    def of_voters(cls, voters: tuple[int, ...] | list[int], explicit: bool = False) -> Membership:
        return cls(tuple(Member(i) for i in voters), explicit)

    # --- questions

    @property
    def ids(self) -> frozenset[int]:
        return frozenset(m.id for m in self.members)

    @property
    def voters(self) -> frozenset[int]:
        return frozenset(m.id for m in self.members if m.voter)

    @property
    def learners(self) -> frozenset[int]:
        return frozenset(m.id for m in self.members if not m.voter)

    def get(self, node_id: int) -> Member | None:
        for m in self.members:
            if m.id == node_id:
                return m
        return None

    def __contains__(self, node_id: object) -> bool:
        return any(m.id == node_id for m in self.members)

    def voter_change_ok(self, new: Membership) -> bool:
        """Does ``new`` differ from this one by at most one voter (a safe single-server change)?"""
        return len(self.voters ^ new.voters) <= 1

    # --- the log entry

    def encode(self) -> bytes:
        return msgpack.packb([_VERSION, [[m.id, m.ip, m.port, m.client_port, m.http_port, m.flags]
                                         for m in self.members]], use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> Membership:
        """The membership a CONFIG entry (or a stored record) holds. ValueError on anything malformed."""
        try:
            obj = msgpack.unpackb(data, raw=False)
        except Exception as exc:  # msgpack raises several unrelated exception types
            raise ValueError(f"undecodable membership: {exc}") from exc
        if type(obj) is not list or len(obj) != 2 or obj[0] != _VERSION or type(obj[1]) is not list:
            raise ValueError(f"not a membership of version {_VERSION}: {repr(obj)[:60]}")
        members = []
        for row in obj[1]:
            if not (type(row) is list and len(row) == 6 and type(row[1]) is str and len(row[1]) <= 255
                    and all(type(v) is int for v in (row[0], *row[2:]))):
                raise ValueError(f"a malformed member {repr(row)[:60]}")
            node_id, ip, port, client_port, http_port, flags = row
            if not (1 <= node_id <= MAX_ID and all(0 <= p <= 65535 for p in (port, client_port, http_port))
                    and 0 <= flags < 8):
                raise ValueError(f"a member out of range {repr(row)[:60]}")
            members.append(Member(node_id, ip, port, client_port, http_port, bool(flags & _VOTER),
                                  bool(flags & _PROMOTE), bool(flags & _SEEN)))
        if len({m.id for m in members}) != len(members):
            raise ValueError("a membership that lists an id twice")
        return cls(tuple(members))

    def with_member(self, member: Member) -> Membership:
        return Membership(tuple(m for m in self.members if m.id != member.id) + (member,))


# ---------------------------------------------------------------------- the changes a client asks for


def add_member(current: Membership, node_id: int, ip: str, port: int, client_port: int, http_port: int,
               learner: bool) -> Membership:
    """A new member, always as a learner first: without ``learner`` it is promoted once caught up."""
    if not 1 <= node_id <= MAX_ID:
        raise ConfChangeError("bad_request", f"a node id is an integer in 1..2**63-1, not {node_id}")
    if node_id in current:
        raise ConfChangeError("bad_request", f"node {node_id} is already a member")
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise ConfChangeError("bad_request", f"ip must be an IPv4 or IPv6 address, not {ip!r:.60}") from None
    ports = {"port": port, "client_port": client_port, "http_port": http_port}
    for name, p in ports.items():
        if not 1 <= p <= 65535:
            raise ConfChangeError("bad_request", f"{name} must be in 1..65535, not {p}")
    if len(set(ports.values())) != 3:
        raise ConfChangeError("bad_request", f"node {node_id}'s ports must differ: {ports}")
    for m in current.members:
        taken = {m.port, m.client_port, m.http_port} & set(ports.values())
        if m.ip == ip and taken:
            raise ConfChangeError("bad_request", f"{ip}:{min(taken)} is in use by node {m.id}")
    return current.with_member(Member(node_id, ip, port, client_port, http_port, voter=False, promote=not learner))


def remove_member(current: Membership, node_id: int) -> Membership:
    m = current.get(node_id)
    if m is None:
        raise ConfChangeError("bad_request", f"node {node_id} is not a member")
    if m.voter and current.voters == {node_id}:
        raise ConfChangeError("bad_request", f"node {node_id} is the last voter: removing it would leave none")
    return Membership(tuple(x for x in current.members if x.id != node_id))


def promote_member(current: Membership, node_id: int) -> Membership:
    m = current.get(node_id)
    if m is None:
        raise ConfChangeError("bad_request", f"node {node_id} is not a member")
    if m.voter:
        raise ConfChangeError("bad_request", f"node {node_id} is a voter already")
    return current.with_member(replace(m, voter=True, promote=False))


def demote_member(current: Membership, node_id: int) -> Membership:
    """A voter becomes a learner that is not promoted by itself (a voter that lost its disk)."""
    m = current.get(node_id)
    if m is None or not m.voter:
        raise ConfChangeError("bad_request", f"node {node_id} is not a voter")
    if current.voters == {node_id}:
        raise ConfChangeError("bad_request", f"node {node_id} is the last voter")
    return current.with_member(replace(m, voter=False, promote=False))


def mark_seen(current: Membership, ids: frozenset[int] | set[int]) -> Membership:
    out = current
    for i in sorted(ids):
        m = out.get(i)
        if m is not None and not m.seen:
            out = out.with_member(replace(m, seen=True))
    return out
