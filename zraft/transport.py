"""Peer transport over ZeroMQ: a ROUTER for inbound Raft traffic, one DEALER per peer outbound.

All messages for one peer produced in one turn of the loop travel as one frame. Sends
never block: a message that can't be queued (peer down, queue full) is dropped, which
Raft tolerates by design; ``IMMEDIATE`` keeps messages from piling up for a peer that is
not connected and arriving stale once it is back.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import zmq

from zraft.config import NodeAddress
from zraft.raft.messages import Message, decode_batch, encode_batch

log = logging.getLogger(__name__)


class PeerTransport:
    def __init__(self, ctx: zmq.Context, me: NodeAddress, peers: list[NodeAddress], max_frame_bytes: int) -> None:
        self.me = me
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.RCVHWM, 100_000)
        self.router.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        self.router.bind(me.peer_endpoint)
        self.dealers: dict[int, zmq.Socket] = {}
        for p in peers:
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.IDENTITY, str(me.id).encode())
            d.setsockopt(zmq.LINGER, 0)
            d.setsockopt(zmq.IMMEDIATE, 1)
            d.setsockopt(zmq.SNDHWM, 10_000)
            d.setsockopt(zmq.RECONNECT_IVL, 50)
            d.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
            d.connect(p.peer_endpoint)
            self.dealers[p.id] = d
        self.dropped = 0

    def send(self, messages: list[Message]) -> None:
        by_peer: dict[int, list[Message]] = defaultdict(list)
        for m in messages:
            by_peer[m.dst].append(m)
        for dst, msgs in by_peer.items():
            sock = self.dealers.get(dst)
            if sock is None:
                continue
            try:
                sock.send(encode_batch(msgs), zmq.NOBLOCK)
            except zmq.Again:
                self.dropped += len(msgs)

    def receive(self, limit: int = 1000) -> list[Message]:
        """Every message waiting now (from at most ``limit`` frames), without blocking."""
        out: list[Message] = []
        for _ in range(limit):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msgs = decode_batch(frames[-1])
            except ValueError as exc:
                log.warning("dropping a malformed peer frame from %r: %s", frames[0], exc)
                continue
            out.extend(m for m in msgs if m.dst == self.me.id and m.src in self.dealers)
        return out

    def close(self) -> None:
        self.router.close()
        for d in self.dealers.values():
            d.close()
