"""Raft messages: plain dataclasses, and their msgpack encoding for the wire.

Every message carries the sender's ``term`` and the ``src``/``dst`` node ids. An
entry's command travels as the same ``bytes`` it is stored as: the driver encodes a
client command once and nothing re-encodes it on the way to disk or to a peer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import ClassVar

import msgpack


class EntryType(IntEnum):
    NORMAL = 0  # a state machine command (``b""``: a new leader's no-op)
    CONFIG = 1  # a change of the cluster's membership: the core's business, never the state machine's


@dataclass(slots=True)
class Entry:
    """One log entry. ``data`` is an encoded state machine command (NORMAL) or configuration (CONFIG)."""

    term: int
    index: int
    data: bytes = b""
    type: int = 0  # an EntryType; a plain int on the hot path


@dataclass(slots=True)
class RequestVote:
    """Ask for a vote. With ``pre_vote`` it is only a poll: nobody's term or vote changes,
    and ``term`` is the term the candidate would campaign in (thesis 9.6)."""

    TYPE: ClassVar[int] = 1
    term: int
    src: int
    dst: int
    last_log_index: int
    last_log_term: int
    pre_vote: bool = False
    # Leadership transfer (thesis 3.10): the leader asked this candidate to campaign, so voters grant
    # it despite their leader lease (etcd's campaignTransfer).
    transfer: bool = False


@dataclass(slots=True)
class RequestVoteResponse:
    TYPE: ClassVar[int] = 2
    term: int
    src: int
    dst: int
    granted: bool
    pre_vote: bool = False


@dataclass(slots=True)
class AppendEntries:
    """Replicate ``entries`` after (prev_index, prev_term); ``commit`` is the leader's commit index."""

    TYPE: ClassVar[int] = 3
    term: int
    src: int
    dst: int
    prev_index: int
    prev_term: int
    entries: list[Entry] = field(default_factory=list)
    commit: int = 0


@dataclass(slots=True)
class AppendEntriesResponse:
    """Answer to AppendEntries.

    On success ``match_index`` is the last index known to match the leader's log. On
    reject, ``reject_index`` is the prev_index that did not match and the hint lets the
    leader skip a whole term at once: ``conflict_term`` is the follower's term at
    ``reject_index`` (0 if its log is shorter) and ``conflict_index`` the first index the
    follower holds of that term (or its last index + 1 when its log is shorter).
    """

    TYPE: ClassVar[int] = 4
    term: int
    src: int
    dst: int
    success: bool
    match_index: int = 0
    reject_index: int = 0
    conflict_term: int = 0
    conflict_index: int = 0


@dataclass(slots=True)
class Heartbeat:
    """Leader liveness and commit propagation, without log matching.

    ``commit`` is min(leader commit, what the leader knows the follower matches), so a
    follower can always adopt it. ``read_seq`` is echoed back: a quorum of echoes
    confirms leadership for every ReadIndex request up to that sequence number.
    """

    TYPE: ClassVar[int] = 5
    term: int
    src: int
    dst: int
    commit: int = 0
    read_seq: int = 0


@dataclass(slots=True)
class HeartbeatResponse:
    TYPE: ClassVar[int] = 6
    term: int
    src: int
    dst: int
    read_seq: int = 0


@dataclass(slots=True)
class InstallSnapshot:
    """The state machine as of (``index``, ``snap_term``) replaces the follower's log up to there.

    The leader's core asks for one (in ``Ready.snapshot_requests``) when a follower needs
    entries it has compacted away; the leader's driver then streams its state machine to the
    follower in chunks (:mod:`zraft.raft.snapshot`); the request itself never travels. The follower's
    driver steps it into its core once every chunk is in, with the index and term the
    stream ended with (at least those the leader's core asked for).
    """

    TYPE: ClassVar[int] = 7
    term: int
    src: int
    dst: int
    index: int
    snap_term: int
    config: bytes = b""  # the membership as of the snapshot (zraft.raft.confchange), b"" for none


@dataclass(slots=True)
class TimeoutNow:
    """The leader hands over leadership (thesis 3.10): the receiver campaigns at once, without pre-vote."""

    TYPE: ClassVar[int] = 10
    term: int
    src: int
    dst: int


@dataclass(slots=True)
class SnapshotChunk:
    """One piece of a snapshot stream (driver to driver; the cores never see these).

    ``data`` is a batch of state machine records. The ``last`` chunk carries the index and
    term the snapshot was taken at.
    """

    TYPE: ClassVar[int] = 8
    term: int
    src: int
    dst: int
    stream: int
    seq: int
    data: bytes = b""
    last: bool = False
    index: int = 0
    snap_term: int = 0


@dataclass(slots=True)
class SnapshotAck:
    """Cumulative acknowledgement of a snapshot stream: every chunk up to ``seq`` is in.

    ``done``: the follower's core has decided on the complete snapshot. ``ok`` false: the
    follower does not know this stream (it restarted, say) and refuses chunk ``seq``; the
    sender gives up at once if that chunk was sent (or resent) after part of the stream had
    been acknowledged (see :meth:`zraft.raft.snapshot.SnapshotSender.on_ack`).
    """

    TYPE: ClassVar[int] = 9
    term: int
    src: int
    dst: int
    stream: int
    seq: int
    ok: bool = True
    done: bool = False


Message = (
    RequestVote | RequestVoteResponse | AppendEntries | AppendEntriesResponse | Heartbeat | HeartbeatResponse
    | InstallSnapshot | TimeoutNow
)
StreamMessage = SnapshotChunk | SnapshotAck

_TYPES: dict[int, type] = {
    cls.TYPE: cls
    for cls in (
        RequestVote, RequestVoteResponse, AppendEntries, AppendEntriesResponse, Heartbeat, HeartbeatResponse,
        InstallSnapshot, SnapshotChunk, SnapshotAck, TimeoutNow,
    )
}
_FIELDS: dict[type, tuple[str, ...]] = {cls: tuple(f.name for f in fields(cls)) for cls in _TYPES.values()}
_ENTRIES_POS = _FIELDS[AppendEntries].index("entries")

# What may come off the wire, and what each field must be. InstallSnapshot never travels: a
# follower's driver makes it, once a whole snapshot stream is in (see the class).
MAX_WIRE_INT = (1 << 63) - 1  # terms, indexes, ids, sequence numbers: never negative, never this large
_KIND = {"int": "u", "bool": "b", "bytes": "y", "list[Entry]": "e"}
_WIRE: dict[int, tuple[type, tuple[tuple[str, str], ...]]] = {
    t: (cls, tuple((f.name, "a" if (cls, f.name) == (SnapshotAck, "seq") else _KIND[f.type]) for f in fields(cls)))
    for t, cls in _TYPES.items() if cls is not InstallSnapshot
}  # ("a": an acknowledged chunk number, -1 for none yet)
ENTRY_TYPES = frozenset(int(t) for t in EntryType)


def to_wire(msg: Message | StreamMessage) -> list:
    """The message as a msgpack-ready list: [type, field values in declaration order].

    AppendEntries carries its entries as a flat list [term, type, data, term, type, data, ...];
    their indexes follow from prev_index, so they never travel.
    """
    values = [getattr(msg, name) for name in _FIELDS[type(msg)]]
    if isinstance(msg, AppendEntries):
        flat: list = []
        for e in msg.entries:
            flat += (e.term, e.type, e.data)
        values[_ENTRIES_POS] = flat
    return [msg.TYPE, *values]


def from_wire(obj: object) -> Message | StreamMessage:
    """Inverse of :func:`to_wire`, for what comes off the network: a message of a known type whose
    every field has its type and range (ints in 0..2**63-1, sender and receiver ids positive and
    different) and that is consistent in itself (an entry's term is at most the message's, and
    terms never decrease along the entries). Raises ValueError, saying why, on anything else."""
    if type(obj) is not list or not obj:
        raise ValueError("a raft message is a non-empty list")
    spec = _WIRE.get(obj[0]) if type(obj[0]) is int else None
    if spec is None:
        raise ValueError(f"unknown raft message type {obj[0]!r}")
    cls, names = spec
    if len(obj) != len(names) + 1:
        raise ValueError(f"{cls.__name__} has {len(names)} fields, not {len(obj) - 1}")
    for value, (name, kind) in zip(obj[1:], names, strict=True):
        _check_field(cls, name, kind, value)
    msg = cls(*obj[1:])
    if not (msg.src >= 1 and msg.dst >= 1 and msg.src != msg.dst):
        raise ValueError(f"{cls.__name__} from {msg.src} to {msg.dst}: ids are positive and differ")
    if isinstance(msg, AppendEntries):
        msg.entries = _entries_from_wire(msg)
    elif isinstance(msg, SnapshotChunk) and msg.snap_term > msg.term:
        raise ValueError(f"a snapshot of term {msg.snap_term} sent in term {msg.term}")
    elif isinstance(msg, RequestVote) and msg.last_log_term > msg.term:
        raise ValueError(f"a candidate of term {msg.term} with a last log term {msg.last_log_term}")
    return msg


def _check_field(cls: type, name: str, kind: str, value: object) -> None:
    if kind == "u" or kind == "a":
        if type(value) is not int or not (-1 if kind == "a" else 0) <= value <= MAX_WIRE_INT:
            raise ValueError(f"{cls.__name__}.{name} must be an integer in 0..2**63-1, not {value!r:.40}")
    elif kind == "b":
        if type(value) is not bool:
            raise ValueError(f"{cls.__name__}.{name} must be true or false, not {value!r:.40}")
    elif kind == "y":
        if type(value) is not bytes:
            raise ValueError(f"{cls.__name__}.{name} must be bin, not {type(value).__name__}")
    elif type(value) is not list or len(value) % 3:
        raise ValueError(f"{cls.__name__}.{name} must be a flat list of [term, type, data] triples")


def _entries_from_wire(m: AppendEntries) -> list[Entry]:
    flat: list = m.entries
    if m.prev_term > m.term or m.prev_index + len(flat) // 3 > MAX_WIRE_INT:
        raise ValueError(f"AppendEntries of term {m.term} after ({m.prev_index}, {m.prev_term})")
    out = []
    index, last_term = m.prev_index, m.prev_term
    for i in range(0, len(flat), 3):
        term, kind, data = flat[i], flat[i + 1], flat[i + 2]
        if type(term) is not int or not last_term <= term <= m.term:
            raise ValueError(f"an entry of term {term!r:.40} after term {last_term}, sent in term {m.term}")
        if type(kind) is not int or kind not in ENTRY_TYPES or type(data) is not bytes:
            raise ValueError(f"an entry of type {kind!r:.40} with data of {type(data).__name__}")
        index += 1
        last_term = term
        out.append(Entry(term, index, data, kind))
    return out


def encode_batch(msgs: list[Message | StreamMessage]) -> bytes:
    """Encode several messages (for one peer) as one frame."""
    return msgpack.packb([to_wire(m) for m in msgs], use_bin_type=True)


_ARRAY = msgpack.Packer()


def _approx_size(m: Message | StreamMessage) -> int:
    """About how many bytes the message takes on the wire (never much less)."""
    if isinstance(m, AppendEntries):
        return 64 + sum(len(e.data) + 16 for e in m.entries)
    if isinstance(m, SnapshotChunk):
        return 64 + len(m.data)
    return 64


def encode_frames(msgs: list[Message | StreamMessage], budget: int) -> list[bytes]:
    """Several messages (for one peer) as frames of :func:`decode_batch`'s format, each about
    ``budget`` bytes or less (a single larger message gets a frame of its own): the receiver
    drops, with the whole connection, any frame over its limit."""
    if sum(_approx_size(m) for m in msgs) <= budget:
        return [encode_batch(msgs)]
    frames: list[bytes] = []
    parts: list[bytes] = []
    size = 0
    for m in msgs:
        b = msgpack.packb(to_wire(m), use_bin_type=True)
        if parts and size + len(b) > budget:
            frames.append(_ARRAY.pack_array_header(len(parts)) + b"".join(parts))
            parts, size = [], 0
        parts.append(b)
        size += len(b)
    if parts:
        frames.append(_ARRAY.pack_array_header(len(parts)) + b"".join(parts))
    return frames


def decode_batch(frame: bytes) -> list[Message | StreamMessage]:
    """Decode a frame made by :func:`encode_batch`. Raises ValueError on garbage."""
    try:
        objs = msgpack.unpackb(frame, raw=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ValueError(f"undecodable raft frame: {exc}") from exc
    if not isinstance(objs, list):
        raise ValueError("raft frame is not a list")
    return [from_wire(o) for o in objs]
