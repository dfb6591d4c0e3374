"""Peer messages off the wire (zraft/raft/messages.py, from_wire): typed, range-checked, or refused.

Whatever the bytes, decoding either gives well-formed messages or raises ValueError, never
anything else; every message a node makes goes through unchanged.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zraft.raft.messages import (
    MAX_WIRE_INT,
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    EntryType,
    Heartbeat,
    HeartbeatResponse,
    RequestVote,
    RequestVoteResponse,
    SnapshotAck,
    SnapshotChunk,
    TimeoutNow,
    decode_batch,
    encode_batch,
    from_wire,
    to_wire,
)

GOOD = [
    RequestVote(5, 1, 2, 10, 4, True),
    RequestVote(5, 1, 2, 10, 4, False, True),
    TimeoutNow(5, 1, 2),
    RequestVoteResponse(5, 2, 1, True, False),
    AppendEntries(5, 1, 3, 7, 4, [Entry(4, 8, b"x"), Entry(5, 9, b"", EntryType.CONFIG)], 6),
    AppendEntriesResponse(5, 3, 1, False, 0, 7, 4, 5),
    Heartbeat(5, 1, 2, 6, 11),
    HeartbeatResponse(5, 2, 1, 11),
    SnapshotChunk(5, 1, 2, 1 << 61, 3, b"data", True, 40, 4),
    SnapshotAck(5, 2, 1, 1 << 61, 3, True, True),
]


def test_every_message_a_node_makes_decodes_to_itself() -> None:
    assert decode_batch(encode_batch(GOOD)) == GOOD
    big = AppendEntries(MAX_WIRE_INT, 1, 2, MAX_WIRE_INT - 1, MAX_WIRE_INT, [Entry(MAX_WIRE_INT, MAX_WIRE_INT)], 0)
    assert from_wire(to_wire(big)) == big


def wire(m) -> list:
    return to_wire(m)


@pytest.mark.parametrize("obj, why", [
    ([], "non-empty"),
    ("hello", "non-empty list"),
    ([7, 5, 1, 2, 10, 5], "unknown raft message type 7"),  # InstallSnapshot never travels
    ([99, 1, 2, 3], "unknown"),
    ([True, 1, 2], "unknown"),
    ([5, 2**64 - 1, 1, 2, 0, 0], "0..2\\*\\*63-1"),  # the term that crash-looped every node
    ([5, 2**63, 1, 2, 0, 0], "0..2\\*\\*63-1"),
    ([5, -1, 1, 2, 0, 0], "0..2\\*\\*63-1"),
    ([5, "3", 1, 2, 0, 0], "integer"),  # a term as a string
    ([5, 3, [1], 2, 0, 0], "integer"),  # src as a list
    ([5, 3, 1, 2, 0.5, 0], "integer"),
    ([5, 3, True, 2, 0, 0], "integer"),  # a bool is not an id
    ([5, 3, 1, 1, 0, 0], "differ"),
    ([5, 3, 0, 1, 0, 0], "positive"),
    ([5, 3, 1, 2, 0], "fields"),
    ([5, 3, 1, 2, 0, 0, 0], "fields"),
    ([1, 3, 1, 2, 0, 0, 1, False], "true or false"),
    ([1, 3, 1, 2, 0, 0, False, 0], "true or false"),  # the transfer flag
    ([1, 3, 1, 2, 10, 9, False, False], "last log term"),
    ([10, 3, 1, 2, 0], "fields"),  # TimeoutNow: term, src, dst
    ([10, 3, 2, 2], "differ"),
    ([3, 5, 1, 2, 0, 0, [5, 0], 0], "triples"),
    ([3, 5, 1, 2, 0, 0, [6, 0, b"x"], 0], "after term 0, sent in term 5"),  # an entry newer than its message
    ([3, 5, 1, 2, 0, 0, [4, 0, b"x", 3, 0, b"y"], 0], "after term 4"),  # terms going back
    ([3, 5, 1, 2, 3, 4, [3, 0, b"x"], 0], "after term 4"),  # before the previous entry's term
    ([3, 5, 1, 2, 0, 0, [5, 7, b"x"], 0], "type 7"),
    ([3, 5, 1, 2, 0, 0, [5, 0, "text"], 0], "data of str"),
    ([3, 5, 1, 2, 0, 6, [], 0], "after \\(0, 6\\)"),
    ([8, 5, 1, 2, 9, 0, b"", True, 10, 6], "a snapshot of term 6 sent in term 5"),  # the forged chunk's snap term
    ([8, 5, 1, 2, 9, 0, "data", True, 10, 5], "bin"),
])
def test_malformed_messages_are_refused_with_a_reason(obj: object, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        from_wire(obj)


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats(allow_nan=False) | st.binary(max_size=8)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=8) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=500, deadline=None)
@given(st.lists(json_like, max_size=6))
def test_any_msgpack_value_decodes_or_is_refused(objs: list) -> None:
    try:
        frame = msgpack.packb(objs, use_bin_type=True)
    except (OverflowError, ValueError):
        return
    try:
        msgs = decode_batch(frame)
    except ValueError:
        return
    assert decode_batch(encode_batch(msgs)) == msgs


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(GOOD), st.data())
def test_a_good_message_with_one_field_changed_decodes_or_is_refused(m, data) -> None:
    obj = to_wire(m)
    i = data.draw(st.integers(1, len(obj) - 1))
    obj[i] = data.draw(json_like)
    try:
        got = from_wire(obj)
    except ValueError:
        return
    assert from_wire(to_wire(got)) == got


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_decode_or_are_refused(raw: bytes) -> None:
    try:
        decode_batch(raw)
    except ValueError:
        pass
