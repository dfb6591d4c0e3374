"""The peer transport (zraft/node/transport.py) with real ZeroMQ sockets on loopback."""

from __future__ import annotations

import socket
import time

import msgpack
import pytest
import zmq

from zraft.cluster.config import NodeAddress
from zraft.node.transport import PeerTransport
from zraft.raft.messages import AppendEntries, Entry, Heartbeat, decode_batch, encode_batch, encode_frames

MIB = 1 << 20


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def pair():
    ctx = zmq.Context()
    a = NodeAddress(1, "127.0.0.1", _free_port(), 0, 0)
    b = NodeAddress(2, "127.0.0.1", _free_port(), 0, 0)
    limit = 4 * MIB + MIB  # what a node with the default 1 MiB messages accepts
    ta, tb = PeerTransport(ctx, a, [b], limit), PeerTransport(ctx, b, [a], limit)
    yield ta, tb
    ta.close()
    tb.close()
    ctx.term()


def _receive(t: PeerTransport, want: int, timeout: float = 10.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        if t.router.poll(100):
            got.extend(t.receive())
    return got


def _connected(ta: PeerTransport, tb: PeerTransport) -> None:
    """Wait until a heartbeat gets through (the DEALER connects in the background)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ta.send([Heartbeat(1, 1, 2)])
        if _receive(tb, 1, 0.2):
            return
    raise AssertionError("the transports never connected")


def test_many_large_appends_in_one_turn_are_cut_into_frames_the_receiver_takes(pair) -> None:
    """After a probe succeeds, a leader may send a whole window of ~1 MiB AppendEntries in one turn.
    As one frame (~20 MiB) it is over the receiver's limit, and ZeroMQ drops the connection, again
    and again; cut into frames under the limit, every message arrives."""
    ta, tb = pair
    _connected(ta, tb)
    msgs = [AppendEntries(1, 1, 2, i, 1, [Entry(1, i + 1, bytes([i]) * MIB)], 0) for i in range(20)]
    ta.send(msgs)
    got = _receive(tb, 20)
    assert [m.prev_index for m in got] == list(range(20))
    assert all(m.entries[0].data == bytes([m.prev_index]) * MIB for m in got)


def test_frames_decode_to_the_messages_in_order_whatever_the_budget() -> None:
    msgs = [Heartbeat(3, 1, 2, i, i) for i in range(50)] + [
        AppendEntries(3, 1, 2, 5, 2, [Entry(3, 6, b"x" * 300), Entry(3, 7, b"")], 4)]
    whole = len(encode_batch(msgs))
    for budget in (1, 100, whole // 2, 1 << 30):
        frames = encode_frames(msgs, budget)
        assert [m for f in frames for m in decode_batch(f)] == msgs
        if budget == 1 << 30:
            assert frames == [encode_batch(msgs)]  # the usual case: one frame, one encode
        else:
            assert len(frames) > 1 and all(len(f) <= max(budget, 400) for f in frames)
        assert all(isinstance(msgpack.unpackb(f), list) for f in frames)


def _raw_dealer(identity: bytes, to: PeerTransport) -> zmq.Socket:
    d = zmq.Context.instance().socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.setsockopt(zmq.IDENTITY, identity)
    d.connect(to.me.peer_endpoint)
    return d


def _eventually(t: PeerTransport, reason: str, count: int = 1, timeout: float = 5.0) -> None:
    """Receive until ``count`` frames have been rejected for ``reason`` (nothing may get through)."""
    deadline = time.monotonic() + timeout
    while t.rejected[reason] < count:
        assert time.monotonic() < deadline, f"no frame was rejected as {reason}: {dict(t.rejected)}"
        if t.router.poll(50):
            assert t.receive() == []


def test_frames_are_taken_only_from_a_peer_about_itself_to_this_node(pair) -> None:
    """The messages of a frame must come from the node whose identity the frame arrived under, and be
    addressed here; a stranger, a forged sender, a wrong address or garbage drops the whole frame."""
    ta, tb = pair
    good = encode_batch([Heartbeat(1, 1, 2)])
    stranger = _raw_dealer(b"intruder", tb)
    stranger.send(good)  # from an identity that is no peer's
    _eventually(tb, "stranger")
    as_three = _raw_dealer(b"3", tb)  # node 3 is no peer of tb's either
    as_three.send(good)
    _eventually(tb, "stranger", 2)
    # From the real peer's connection: a message claiming another sender, one for another node, garbage.
    ta.dealers[2].send(encode_batch([Heartbeat(1, 1, 2), Heartbeat(1, 3, 2)]))
    _eventually(tb, "forged")
    ta.dealers[2].send(encode_batch([Heartbeat(1, 1, 3)]))
    _eventually(tb, "misaddressed")
    ta.dealers[2].send(b"\xc1 not msgpack")
    _eventually(tb, "malformed")
    ta.dealers[2].send(msgpack.packb([[5, 2**64 - 1, 1, 2, 0, 0]]))  # a term past 2**63-1
    _eventually(tb, "malformed", 2)
    ta.send([Heartbeat(1, 1, 2)])  # and the peer is heard as before
    assert _receive(tb, 1) == [Heartbeat(1, 1, 2)]
    stranger.close()
    as_three.close()
