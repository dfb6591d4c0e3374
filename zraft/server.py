"""The node process: one poll loop that drives the Raft core, LevelDB and ZeroMQ.

One turn of the loop (see docs/ARCHITECTURE.md):

1. poll the peer and client sockets until something arrives or the next tick is due;
2. drain everything that is ready: peer messages are stepped into the core, client
   writes of the turn become one proposal batch, client reads one ReadIndex round;
3. handle the core's Ready: persist entries and hard state in one synced WriteBatch
   (group commit), send messages (a leader sends AppendEntries before its own fsync,
   followers only after), apply committed entries in one WriteBatch with the applied
   index, answer the clients whose writes were applied and whose reads are now safe;
4. expire requests that passed their deadline.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import zmq

from zraft import protocol
from zraft.config import ClusterConfig, Settings
from zraft.protocol import Limits, Request, RequestError
from zraft.raft.core import RaftConfig, RaftNode, Ready, Role
from zraft.raft.log import RaftLog
from zraft.statemachine import KVStateMachine, encode_cas, encode_delete, encode_put
from zraft.storage import LevelDBStorage
from zraft.transport import PeerTransport

log = logging.getLogger("zraft.server")

Envelope = list[bytes]  # the ROUTER routing frames of one client request, echoed on the reply


@dataclass(slots=True)
class PendingWrite:
    term: int
    envelope: Envelope


@dataclass(slots=True)
class PendingRead:
    envelope: Envelope
    key: bytes
    index: int = -1  # the applied index the read must wait for; -1 until leadership is confirmed


class NodeServer:
    def __init__(self, cluster: ClusterConfig, node_id: int, data_dir: str | os.PathLike,
                 settings: Settings | None = None, allow_faults: bool = False) -> None:
        self.cluster = cluster
        self.me = cluster.node(node_id)
        self.settings = settings or Settings()
        s = self.settings
        self.limits = Limits(s.max_key_bytes, s.max_value_bytes, s.max_request_bytes)
        self.data_dir = Path(data_dir)
        self.storage = LevelDBStorage(self.data_dir / "db")
        self.sm = KVStateMachine(self.storage)
        persisted = self.storage.load_log()
        raft_log = RaftLog(persisted.entries, persisted.snapshot_index, persisted.snapshot_term,
                           applied=self.storage.applied_index)
        self.node = RaftNode(
            RaftConfig(node_id, tuple(cluster.ids), election_ticks=s.election_ticks,
                       heartbeat_ticks=s.heartbeat_ticks, max_inflight_msgs=s.max_inflight_msgs,
                       max_msg_bytes=s.max_batch_bytes),
            self.storage.load_hard_state(), raft_log)
        self.ctx = zmq.Context()
        peers = [n for n in cluster.nodes if n.id != node_id]
        self.transport = PeerTransport(self.ctx, self.me, peers, max_frame_bytes=4 * s.max_batch_bytes + (1 << 20))
        self.clients = self.ctx.socket(zmq.ROUTER)
        self.clients.setsockopt(zmq.LINGER, 0)
        self.clients.setsockopt(zmq.MAXMSGSIZE, 32 * s.max_request_bytes)
        self.clients.bind(self.me.client_endpoint)
        self.pending_writes: dict[int, PendingWrite] = {}
        self.pending_reads: dict[int, PendingRead] = {}
        self.reads_to_serve: list[int] = []  # confirmed reads waiting for the state machine
        self.deadlines: deque[tuple[float, bool, int]] = deque()  # (deadline, is_write, index or read id)
        self.next_read_id = 0
        self.role, self.term, self.leader = self.node.role, self.node.term, self.node.leader
        self.allow_faults = allow_faults
        self.drop_write_replies = 0  # fault injection: lose the next N replies to applied writes
        self.stopping = False
        log.info("node %d starting: term %d, log %d..%d, applied %d", node_id, self.node.term,
                 raft_log.first_index, raft_log.last_index, self.sm.applied_index)

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        poller = zmq.Poller()
        poller.register(self.transport.router, zmq.POLLIN)
        poller.register(self.clients, zmq.POLLIN)
        tick = self.settings.tick_ms / 1000
        next_tick = time.monotonic() + tick
        try:
            while not self.stopping:
                due = self.transport.flush_delayed(time.monotonic())  # frames held by an injected delay
                wake = next_tick if due is None else min(next_tick, due)
                wait_ms = max(0.0, (wake - time.monotonic()) * 1000)
                ready = dict(poller.poll(wait_ms))
                if self.transport.router in ready:
                    for m in self.transport.receive():
                        self.node.step(m)
                if self.clients in ready:
                    self._serve_clients()
                now = time.monotonic()
                if now >= next_tick:
                    self.node.tick()
                    # After a stall, don't fire a burst of ticks: that would only cause elections.
                    next_tick = max(next_tick + tick, now)
                while self.node.has_ready():
                    self._handle_ready(self.node.ready())
                self._expire(now)
        finally:
            self._shutdown()

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("node %d: %s received, stopping", self.me.id, signal.Signals(signum).name)
        self.stopping = True

    def _handle_ready(self, rd: Ready) -> None:
        if rd.role is not self.role or rd.term != self.term or rd.leader != self.leader:
            log.info("node %d: %s in term %d, leader %s", self.me.id, rd.role.value, rd.term, rd.leader)
            self.role, self.term, self.leader = rd.role, rd.term, rd.leader
        # A leader's appends don't depend on its own fsync (thesis 10.2.1); votes and
        # acknowledgements do. A new term must be durable before anything is sent in it.
        send_first = rd.role is Role.LEADER and rd.hard_state is None
        if send_first:
            self.transport.send(rd.messages)
        self.storage.save(rd.hard_state, rd.entries)
        if not send_first:
            self.transport.send(rd.messages)
        if rd.committed:
            self._apply(rd)
        for rs in rd.reads:
            read = self.pending_reads.get(rs.request_id)
            if read is not None:
                read.index = rs.index
                self.reads_to_serve.append(rs.request_id)
        for rid in rd.dropped_reads:
            read = self.pending_reads.pop(rid, None)
            if read is not None:
                self._reply(read.envelope, self._not_leader())
        if self.reads_to_serve:
            self._serve_reads()

    def _apply(self, rd: Ready) -> None:
        results = self.sm.apply(rd.committed)
        for entry, result in zip(rd.committed, results, strict=False):
            w = self.pending_writes.pop(entry.index, None)
            if w is None:
                continue
            if w.term == entry.term:
                if self.drop_write_replies > 0:
                    self.drop_write_replies -= 1
                    log.warning("fault injection: dropping the reply to the write at index %d", entry.index)
                elif "error" in result:
                    self._reply(w.envelope, protocol.error(result["error"], result["message"]))
                else:
                    self._reply(w.envelope, protocol.ok(**result))
            else:
                # Another leader's entry took this index: our proposal was never committed.
                self._reply(w.envelope, self._not_leader())

    def _serve_reads(self) -> None:
        applied = self.sm.applied_index
        waiting = []
        for rid in self.reads_to_serve:
            read = self.pending_reads.get(rid)
            if read is None:
                continue
            if read.index <= applied:
                del self.pending_reads[rid]
                self._reply(read.envelope, protocol.ok(value=self.sm.get(read.key)))
            else:
                waiting.append(rid)
        self.reads_to_serve = waiting

    def _expire(self, now: float) -> None:
        dl = self.deadlines
        while dl and dl[0][0] <= now:
            _, is_write, ident = dl.popleft()
            pending = self.pending_writes.pop(ident, None) if is_write else self.pending_reads.pop(ident, None)
            if pending is not None:
                what = "the write may or may not have been applied" if is_write else "leadership not confirmed"
                self._reply(pending.envelope, protocol.error(
                    protocol.TIMEOUT, f"no commit within {self.settings.request_timeout_s} s: {what}"))

    # ------------------------------------------------------------------ clients

    def _serve_clients(self, limit: int = 5000) -> None:
        """Drain the client socket: answer what can be answered now, batch the rest."""
        writes: list[tuple[Envelope, bytes]] = []
        reads: list[tuple[Envelope, bytes]] = []
        for _ in range(limit):
            try:
                frames = self.clients.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            envelope, raw = frames[:-1], frames[-1]
            try:
                req = protocol.parse_request(raw, self.limits)
            except RequestError as exc:
                self._reply(envelope, protocol.error(exc.code, str(exc)))
                continue
            if req.op == "status":
                self._reply(envelope, self._status())
            elif req.op == "fault":
                self._reply(envelope, self._fault(req.fault))
            elif self.stopping:
                self._reply(envelope, protocol.error(protocol.UNAVAILABLE, "node is shutting down"))
            elif self.node.role is not Role.LEADER:
                self._reply(envelope, self._not_leader())
            elif req.op == "get":
                reads.append((envelope, req.key))
            else:
                writes.append((envelope, _command(req)))
        if writes:
            self._propose(writes)
        if reads:
            self._read(reads)

    def _propose(self, writes: list[tuple[Envelope, bytes]]) -> None:
        first = self.node.propose([cmd for _, cmd in writes])
        if first is None:
            for envelope, _ in writes:
                self._reply(envelope, self._not_leader())
            return
        deadline = time.monotonic() + self.settings.request_timeout_s
        term = self.node.term
        for i, (envelope, _) in enumerate(writes):
            self.pending_writes[first + i] = PendingWrite(term, envelope)
            self.deadlines.append((deadline, True, first + i))

    def _read(self, reads: list[tuple[Envelope, bytes]]) -> None:
        deadline = time.monotonic() + self.settings.request_timeout_s
        ids = []
        for envelope, key in reads:
            rid = self.next_read_id
            self.next_read_id += 1
            self.pending_reads[rid] = PendingRead(envelope, key)
            self.deadlines.append((deadline, False, rid))
            ids.append(rid)
        self.node.read_index(ids)

    def _status(self) -> bytes:
        n = self.node
        role = "candidate" if n.role is Role.PRE_CANDIDATE else n.role.value
        return protocol.ok(id=self.me.id, role=role, term=n.term, leader=n.leader, commit_index=n.commit_index,
                           applied_index=self.sm.applied_index, last_index=n.log.last_index, pid=os.getpid())

    def _fault(self, req: dict) -> bytes:
        if not self.allow_faults:
            return protocol.error(protocol.BAD_REQUEST, f"fault injection is disabled on node {self.me.id}; start "
                                                        "it with --allow-faults (ZRAFT_ALLOW_FAULTS=1) to enable it")
        f = self.transport.faults
        action = req["action"]
        everyone = set(self.transport.dealers)
        if action == "isolate":
            f.isolated |= everyone if req["peers"] is None else set(req["peers"]) & everyone
        elif action == "heal":
            f.isolated -= everyone if req["peers"] is None else set(req["peers"])
        elif action == "drop":
            f.drop_rate = req["rate"]
        elif action == "delay":
            f.delay_s = req["delay_ms"] / 1000
        elif action == "drop_replies":
            self.drop_write_replies = req["count"]
        elif action == "clear":
            f.isolated.clear()
            f.drop_rate = f.delay_s = 0.0
            self.drop_write_replies = 0
        if action != "show":
            log.warning("node %d: fault injection %s -> %s", self.me.id, req, f.describe())
        return protocol.ok(id=self.me.id, faults={**f.describe(), "drop_replies": self.drop_write_replies})

    def _not_leader(self) -> bytes:
        leader = self.node.leader
        hint = self.cluster.node(leader).client_endpoint if leader is not None and leader != self.me.id else None
        msg = f"node {self.me.id} is not the leader" + (f"; try node {leader}" if hint else "; leader unknown")
        return protocol.error(protocol.NOT_LEADER, msg, leader=hint)

    def _reply(self, envelope: Envelope, payload: bytes) -> None:
        try:
            self.clients.send_multipart([*envelope, payload], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the client is gone or its queue is full: it will time out
            log.debug("reply dropped: %s", exc)

    # ------------------------------------------------------------------ shutdown

    def _shutdown(self) -> None:
        unknown = protocol.error(protocol.TIMEOUT, "node is shutting down; the write may or may not be applied")
        for w in self.pending_writes.values():
            self._reply(w.envelope, unknown)
        unavailable = protocol.error(protocol.UNAVAILABLE, "node is shutting down")
        for r in self.pending_reads.values():
            self._reply(r.envelope, unavailable)
        self.transport.close()
        self.clients.close()
        self.ctx.term()
        self.storage.close()
        log.info("node %d stopped", self.me.id)


def _command(req: Request) -> bytes:
    if req.op == "put":
        return encode_put(req.key, req.value, req.session)
    if req.op == "delete":
        return encode_delete(req.key, req.session)
    return encode_cas(req.key, req.expect, req.value, req.session)


def setup_logging(data_dir: Path, level: str) -> None:
    """Log to DATA_DIR/node.log (always at INFO or finer) and to stderr at ``level``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    file_handler = logging.FileHandler(data_dir / "node.log")
    file_handler.setFormatter(fmt)
    file_handler.setLevel(min(logging.INFO, logging.getLevelName(level.upper())))
    stderr = logging.StreamHandler()
    stderr.setFormatter(fmt)
    stderr.setLevel(level.upper())
    root.addHandler(file_handler)
    root.addHandler(stderr)


def run_node(cluster: ClusterConfig, node_id: int, data_dir: str | os.PathLike, settings: Settings,
             log_level: str = "INFO", allow_faults: bool = False) -> None:
    node_dir = Path(data_dir) / str(node_id)
    setup_logging(node_dir, log_level)
    NodeServer(cluster, node_id, node_dir, settings, allow_faults).run()
