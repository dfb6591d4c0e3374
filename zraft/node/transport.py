"""Peer transport over ZeroMQ: a ROUTER for inbound Raft traffic, one DEALER per peer outbound.

The messages for one peer produced in one turn of the loop travel together, in frames of
at most half the receiver's frame limit (``max_frame_bytes``, ZeroMQ's MAXMSGSIZE: a frame
over it costs the whole connection). Sends never block: a message that can't be queued
(peer down, queue full) is dropped, which Raft tolerates by design; ``IMMEDIATE`` keeps
messages from piling up for a peer that is not connected and arriving stale once it is back.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import zmq

from zraft.cluster.config import NodeAddress
from zraft.cluster.keys import PEER_DOMAIN, KeyRing, KeysError
from zraft.raft.messages import Message, decode_batch, encode_frames

log = logging.getLogger(__name__)

REJECT_LOG_EVERY_S = 5.0  # at most one warning this often about dropped peer frames (they are all counted)


@dataclass
class Faults:
    """Injected network faults (``zraft fault ...``): off unless a node allows them.

    ``isolated`` peers are cut off both ways; ``drop_rate`` drops that fraction of peer
    frames in each direction; ``delay_s`` holds every outbound frame that long.
    """

    isolated: set[int] = field(default_factory=set)
    drop_rate: float = 0.0
    delay_s: float = 0.0
    rng: random.Random = field(default_factory=random.Random)

    def active(self) -> bool:
        return bool(self.isolated) or self.drop_rate > 0 or self.delay_s > 0

    def cuts(self, peer: int) -> bool:
        return peer in self.isolated or (self.drop_rate > 0 and self.rng.random() < self.drop_rate)

    def apply(self, req: dict, everyone: set[int]) -> None:
        """A validated fault injection request (zraft.client.protocol): change the network faults it names."""
        action = req["action"]
        if action == "isolate":
            self.isolated |= everyone if req["peers"] is None else set(req["peers"]) & everyone
        elif action == "heal":
            self.isolated -= everyone if req["peers"] is None else set(req["peers"])
        elif action == "drop":
            self.drop_rate = req["rate"]
        elif action == "delay":
            self.delay_s = req["delay_ms"] / 1000
        elif action == "clear":
            self.isolated.clear()
            self.drop_rate = self.delay_s = 0.0

    def describe(self) -> dict:
        return {"isolated": sorted(self.isolated), "drop_rate": self.drop_rate, "delay_ms": self.delay_s * 1000}


class PeerTransport:
    def __init__(self, ctx: zmq.Context, me: NodeAddress, peers: list[NodeAddress], max_frame_bytes: int,
                 keys: KeyRing | None = None) -> None:
        self.me = me
        self.keys = keys
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.RCVHWM, 100_000)
        self.router.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        self.frame_budget = max_frame_bytes // 2
        if keys is not None:  # CURVE: only the nodes' keys get in (zraft.cluster.keys), each known by its user id
            keys.serve(self.router, PEER_DOMAIN)
        self.router.bind(me.peer_endpoint)
        self.ctx = ctx
        self.dealers: dict[int, zmq.Socket] = {}
        self.addresses: dict[int, NodeAddress] = {}
        self._peer_ids: dict[bytes, int] = {}  # DEALER identity -> node id
        self._wanted: list[NodeAddress] = []
        self._no_key: set[int] = set()  # peers not connected to: no public key for them yet
        self._warned_no_key: set[int] = set()
        self.set_peers(peers)
        self.dropped = 0
        self.faults = Faults()
        self.rejected: Counter[str] = Counter()  # peer frames dropped unread, by reason
        self._last_reject_log = -math.inf
        self._delayed: list[tuple[float, int, int, bytes]] = []  # heap of (due, seq, peer, frame)
        self._delay_seq = 0

    def set_peers(self, peers: list[NodeAddress]) -> None:
        """Talk to exactly these nodes from now on (the membership changed): connect to new ones and to
        moved ones, close the sockets of the rest; messages from a node not among them are dropped."""
        want = {p.id: p for p in peers if p.id != self.me.id}
        self._wanted = list(peers)
        self._no_key = set()
        for node_id in list(self.dealers):
            if want.get(node_id) != self.addresses.get(node_id):
                self.dealers.pop(node_id).close()
                del self.addresses[node_id]
        for node_id, p in want.items():
            if node_id in self.dealers:
                continue
            server_key = None
            if self.keys is not None:
                try:
                    server_key = self.keys.node_key(node_id)
                except KeysError:
                    if node_id not in self._warned_no_key:
                        self._warned_no_key.add(node_id)
                        log.warning("node %d: no public key for node %d in %s: it cannot be reached until its "
                                    "key is there (zraft keys add %s --id %d)", self.me.id, node_id,
                                    self.keys.directory, self.keys.directory, node_id)
                    self._no_key.add(node_id)
                    continue
            d = self.ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.IDENTITY, str(self.me.id).encode())
            d.setsockopt(zmq.LINGER, 0)
            d.setsockopt(zmq.IMMEDIATE, 1)
            d.setsockopt(zmq.SNDHWM, 10_000)
            d.setsockopt(zmq.RECONNECT_IVL, 50)
            d.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
            if server_key is not None:
                self.keys.connect_to(d, server_key)
            d.connect(p.peer_endpoint)
            self.dealers[node_id] = d
            self.addresses[node_id] = p
        self._peer_ids = {str(i).encode(): i for i in self.dealers}

    def retry_missing_keys(self) -> None:
        """Connect to the peers skipped for want of their public key, if it has come since."""
        if self._no_key:
            self.set_peers(self._wanted)

    def send(self, messages: list[Message]) -> None:
        by_peer: dict[int, list[Message]] = defaultdict(list)
        for m in messages:
            by_peer[m.dst].append(m)
        faults = self.faults.active()
        for dst, msgs in by_peer.items():
            if dst not in self.dealers:
                continue
            if faults:
                if self.faults.cuts(dst):
                    self.dropped += len(msgs)
                    continue
                if self.faults.delay_s > 0:
                    due = time.monotonic() + self.faults.delay_s
                    for frame in encode_frames(msgs, self.frame_budget):
                        self._delay_seq += 1
                        heapq.heappush(self._delayed, (due, self._delay_seq, dst, frame))
                    continue
            for frame in encode_frames(msgs, self.frame_budget):
                self._send_frame(dst, frame)

    def _send_frame(self, dst: int, frame: bytes) -> None:
        try:
            self.dealers[dst].send(frame, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    def flush_delayed(self, now: float) -> float | None:
        """Send the delayed frames that are due; returns when the next one is due, if any."""
        while self._delayed and self._delayed[0][0] <= now:
            _, _, dst, frame = heapq.heappop(self._delayed)
            self._send_frame(dst, frame)
        return self._delayed[0][0] if self._delayed else None

    def receive(self, limit: int = 1000, max_bytes: int = 8 << 20) -> list[Message]:
        """Every message waiting now (from at most ``limit`` frames, or about ``max_bytes``: the rest
        waits for the next turn, which keeps a turn short under a stream of large appends), without
        blocking.

        Untrusted until checked: a frame is taken only if it decodes into well-formed messages
        (zraft.raft.messages.from_wire) that all come from the peer whose identity the frame
        arrived under and are all addressed to this node. Anything else is dropped whole,
        counted in ``rejected`` by reason, and logged (rate-limited): never an exception.
        """
        out: list[Message] = []
        taken = 0
        for _ in range(limit):
            if taken >= max_bytes:
                break
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=self.keys is None)
            except zmq.Again:
                break
            taken += len(frames[-1])
            msgs = self._check_frame(frames)
            if not msgs or (self.faults.active() and self.faults.cuts(msgs[0].src)):
                continue
            out.extend(msgs)
        return out

    def _check_frame(self, frames: list[bytes]) -> list[Message]:
        """The frame's messages if it may be taken (see :meth:`receive`); else [] (counted, logged)."""
        if self.keys is not None:  # (frames as zmq.Frame: their user id says whose key the connection has)
            user = frames[-1].get("User-Id")
            frames = [f.bytes for f in frames]
        if len(frames) != 2:
            return self._reject("frames", frames[0], f"{len(frames) - 1} parts, not 1")
        identity, payload = frames
        src = self._peer_ids.get(identity)
        if src is None:
            return self._reject("stranger", identity, "not the identity of a peer")
        if self.keys is not None and user != f"node:{src}":
            return self._reject("impostor", identity, f"node {src}'s identity on a connection of {user}")
        try:
            msgs = decode_batch(payload)
        except ValueError as exc:
            return self._reject("malformed", identity, str(exc))
        for m in msgs:
            if m.src != src:
                return self._reject("forged", identity, f"a message claiming to be from node {m.src}")
            if m.dst != self.me.id:
                return self._reject("misaddressed", identity, f"a message for node {m.dst}")
        return msgs

    def _reject(self, reason: str, identity: bytes, why: str) -> list[Message]:
        self.rejected[reason] += 1
        now = time.monotonic()
        if now - self._last_reject_log >= REJECT_LOG_EVERY_S:
            self._last_reject_log = now
            log.warning("node %d: dropped a peer frame from %r: %s (%s); dropped so far: %s", self.me.id,
                        identity[:40], reason, why[:200], dict(self.rejected))
        return []

    def close(self) -> None:
        self.router.close()
        for d in self.dealers.values():
            d.close()
