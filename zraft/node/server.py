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

Snapshots (docs/ARCHITECTURE.md, "Snapshots"): after applying, a node compacts its log
once it holds ``snapshot_threshold`` applied entries (the state machine in LevelDB *is*
the snapshot, so nothing is copied). When the core asks for a follower to get a
snapshot, the leader streams a LevelDB snapshot of its state machine in chunks
(:class:`~zraft.raft.snapshot.SnapshotSender`) beside its normal work; the follower
stages them beside its live state and switches in one atomic write when its core takes
the complete snapshot.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zmq

from zraft.api.http import HttpGateway
from zraft.client import protocol
from zraft.client.protocol import Limits, Request, RequestError
from zraft.cluster.config import ClusterConfig, Settings
from zraft.node.statemachine import KVStateMachine, encode_cas, encode_delete, encode_put
from zraft.node.storage import LevelDBStorage, SnapshotView
from zraft.node.transport import PeerTransport
from zraft.node.writer import StorageWriter
from zraft.raft.core import RaftConfig, RaftNode, Ready, Role
from zraft.raft.log import RaftLog
from zraft.raft.messages import Message, SnapshotAck, SnapshotChunk
from zraft.raft.snapshot import DONE, FAILED, SENDING, SnapshotReceiver, SnapshotSender

log = logging.getLogger("zraft.node.server")

Envelope = list[bytes]  # the ROUTER routing frames of one client request, echoed on the reply


@dataclass(slots=True)
class PendingWrite:
    term: int
    envelope: Envelope


@dataclass(slots=True)
class OutgoingSnapshot:
    sender: SnapshotSender
    view: SnapshotView
    started: float


@dataclass(slots=True)
class BackupStream:
    """A snapshot being read out by a client (`zraft snapshot save`), one chunk per request."""

    view: SnapshotView
    chunks: Iterator[bytes]
    seq: int = 0
    last_used: float = 0.0


BACKUP_IDLE_S = 60.0  # a backup stream nobody asked for the next chunk of this long is closed
GC_KEYS_PER_TURN = 2000  # dead state machine keys deleted per turn of the loop
RECEIVE_IDLE_ELECTIONS = 30  # a snapshot stream silent this many election timeouts is dropped (senders give up at 10)


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
                       max_msg_bytes=s.max_batch_bytes, async_storage=s.async_storage),
            self.storage.load_hard_state(), raft_log)
        # Log writes in a background thread (async storage), or inline in the loop.
        self.writer = StorageWriter(self.storage) if s.async_storage else None
        # Readys whose writes are in flight: (write sequence number, Ready, messages to send once durable).
        self.waiting: deque[tuple[int, Ready, list[Message]]] = deque()
        self.ctx = zmq.Context()
        peers = [n for n in cluster.nodes if n.id != node_id]
        self.transport = PeerTransport(self.ctx, self.me, peers, max_frame_bytes=4 * s.max_batch_bytes + (1 << 20))
        self.clients = self.ctx.socket(zmq.ROUTER)
        self.clients.setsockopt(zmq.LINGER, 0)
        self.clients.setsockopt(zmq.MAXMSGSIZE, 32 * s.max_request_bytes)
        self.clients.bind(self.me.client_endpoint)
        # The HTTP API (zraft.api.http): its own threads, a client of this node's client port.
        self.http = (HttpGateway(cluster, self.me, s.request_timeout_s + 1.0, s.max_value_bytes)
                     if s.http_api else None)
        self.pending_writes: dict[int, PendingWrite] = {}
        self.pending_reads: dict[int, PendingRead] = {}
        self.reads_to_serve: list[int] = []  # confirmed reads waiting for the state machine
        self.deadlines: deque[tuple[float, bool, int]] = deque()  # (deadline, is_write, index or read id)
        self.next_read_id = 0
        self.role, self.term, self.leader = self.node.role, self.node.term, self.node.leader
        self.allow_faults = allow_faults
        self.drop_write_replies = 0  # fault injection: lose the next N replies to applied writes
        self.stopping = False
        self.outgoing: dict[int, OutgoingSnapshot] = {}  # peer -> the snapshot stream to it
        self.receiver = SnapshotReceiver(node_id)
        self.chunk_seen_at = 0.0
        self.backups: dict[int, BackupStream] = {}
        self._ids = random.Random()  # stream ids: unique across restarts, so a follower never mixes streams
        self.snapshot_stats = {"sent": 0, "failed": 0, "installed": 0, "refused": 0, "compactions": 0}
        log.info("node %d starting: term %d, log %d..%d, applied %d; clients on %s, HTTP on %s; log writes %s",
                 node_id, self.node.term, raft_log.first_index, raft_log.last_index, self.sm.applied_index,
                 self.me.client_endpoint, self.me.http_endpoint if self.http is not None else "(off)",
                 "in a background thread" if self.writer is not None else "inline")

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if self.writer is not None:
            # The writer needs the GIL back after each fsync; don't let it wait a whole 5 ms slice.
            sys.setswitchinterval(0.0005)
        poller = zmq.Poller()
        poller.register(self.transport.router, zmq.POLLIN)
        poller.register(self.clients, zmq.POLLIN)
        if self.writer is not None:
            poller.register(self.writer.fd, zmq.POLLIN)
        tick = self.settings.tick_ms / 1000
        next_tick = time.monotonic() + tick
        try:
            while not self.stopping:
                due = self.transport.flush_delayed(time.monotonic())  # frames held by an injected delay
                wake = next_tick if due is None else min(next_tick, due)
                # Whole milliseconds, rounded up: zmq would round a fraction down to 0 and spin.
                wait_ms = max(0, math.ceil((wake - time.monotonic()) * 1000))
                ready = dict(poller.poll(wait_ms))
                if self.writer is not None and self.writer.fd in ready:
                    self._writes_done(self.writer.completed())
                if self.transport.router in ready:
                    for m in self.transport.receive():
                        if isinstance(m, SnapshotChunk):
                            self._on_chunk(m)
                        elif isinstance(m, SnapshotAck):
                            self._on_snapshot_ack(m)
                        else:
                            self.node.step(m)
                if self.clients in ready:
                    self._serve_clients()
                now = time.monotonic()
                if now >= next_tick:
                    self.node.tick()
                    self._tick_snapshots()
                    # After a stall, don't fire a burst of ticks: that would only cause elections.
                    next_tick = max(next_tick + tick, now)
                while self.node.has_ready():
                    self._handle_ready(self.node.ready())
                self._expire(now)
                if self.storage.has_garbage:
                    self.storage.collect_garbage(GC_KEYS_PER_TURN)
        finally:
            self._shutdown()

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("node %d: %s received, stopping", self.me.id, signal.Signals(signum).name)
        self.stopping = True

    def _handle_ready(self, rd: Ready) -> None:
        if rd.role is not self.role or rd.term != self.term or rd.leader != self.leader:
            log.info("node %d: %s in term %d, leader %s", self.me.id, rd.role.value, rd.term, rd.leader)
            self.role, self.term, self.leader = rd.role, rd.term, rd.leader
        deciding = self.receiver.awaiting_verdict  # a complete snapshot was stepped in: this Ready decides
        # A leader's appends don't depend on its own fsync (thesis 10.2.1); votes and
        # acknowledgements do. A new term must be durable before anything is sent in it.
        send_first = rd.role is Role.LEADER and rd.hard_state is None and rd.snapshot is None
        if send_first:
            self.transport.send(rd.messages)
        rest = [] if send_first else rd.messages
        writer = self.writer
        if writer is not None and not (deciding or rd.snapshot is not None):
            if rd.hard_state is not None or rd.entries:
                self.waiting.append((writer.submit(rd.hard_state, rd.entries), rd, rest))
                return
            if self.waiting:  # nothing of its own to write, but it may depend on what is in flight
                self.waiting.append((writer.submitted, rd, rest))
                return
        elif writer is not None and self.waiting:
            self._writes_done(writer.wait(writer.submitted), compact=False)  # a snapshot waits for them all
        if deciding:
            self._decide_install(rd)
        if writer is not None:
            writer.check()
        self.storage.save(rd.hard_state, rd.entries)
        mark = rd.persist_mark
        if writer is not None and mark is not None:
            self.node.persisted(*mark)
        self._finish_ready(rd, rest)
        if deciding:
            self.transport.send([self.receiver.finish()])  # the "done" ack, after this Ready's own messages

    def _writes_done(self, durable: int, compact: bool = True) -> None:
        """Release what waited for writes up to ``durable``: the Readys' messages, applies and reads."""
        waiting = self.waiting
        while waiting and waiting[0][0] <= durable:
            _, rd, msgs = waiting.popleft()
            mark = rd.persist_mark
            if mark is not None:
                self.node.persisted(*mark)
            self._finish_ready(rd, msgs, compact)

    def _finish_ready(self, rd: Ready, msgs: list[Message], compact: bool = True) -> None:
        """Steps 2-4 of the core's contract, once the Ready (and every earlier one) is durable."""
        if msgs:
            self.transport.send(msgs)
        if rd.committed:
            self._apply(rd)
            if compact:  # (not while a snapshot that replaces the log waits)
                self._maybe_compact()
        for want in rd.snapshot_requests:
            self._start_snapshot(want.dst)
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
                    self._reply(w.envelope, protocol.ok(**result) if result else protocol.OK)
            else:
                # Another leader's entry took this index: our proposal was never committed.
                self._reply(w.envelope, self._not_leader())

    # ------------------------------------------------------------------ snapshots

    def _maybe_compact(self, force: bool = False) -> int:
        """Drop the log up to (nearly) the applied index once it is long enough; returns its new start."""
        s = self.settings
        first, applied = self.node.log.snapshot_index, self.sm.applied_index
        if not force and applied - first < s.snapshot_threshold:
            return first
        target = applied if force else applied - min(s.snapshot_keep, s.snapshot_threshold - 1)
        term = self.node.compact(target)
        if term is None:
            return first
        # Synced: the applies before it become durable too, before the entries they came from go.
        self.storage.compact(target, term)
        self.snapshot_stats["compactions"] += 1
        log.info("node %d: log compacted up to %d (term %d); it now holds %d entries", self.me.id, target, term,
                 self.node.log.last_index - target)
        return target

    def _start_snapshot(self, peer: int) -> None:
        out = self.outgoing.get(peer)
        if out is not None:
            if out.sender.term == self.node.term:
                return  # one stream per follower at a time
            self._end_snapshot(peer, None)
        view = self.storage.open_snapshot()
        sender = SnapshotSender(stream=self._ids.getrandbits(62) + 1, term=self.node.term, src=self.me.id,
                                dst=peer, index=view.index, snap_term=view.term,
                                chunks=view.chunks(self.settings.snapshot_chunk_bytes),
                                window=self.settings.snapshot_window, retry_ticks=max(2, self.settings.election_ticks),
                                give_up_ticks=10 * self.settings.election_ticks)
        self.outgoing[peer] = OutgoingSnapshot(sender, view, time.monotonic())
        log.info("node %d: sending a snapshot at %d (term %d) to node %d", self.me.id, view.index, view.term, peer)
        self.transport.send(sender.pump())

    def _end_snapshot(self, peer: int, index: int | None) -> None:
        out = self.outgoing.pop(peer)
        out.view.close()
        s = out.sender
        took = time.monotonic() - out.started
        if index is None:
            self.snapshot_stats["failed"] += 1
            log.warning("node %d: snapshot stream to node %d failed after %.1f s (%d chunks sent)", self.me.id,
                        peer, took, s.chunks_sent)
        else:
            self.snapshot_stats["sent"] += 1
            log.info("node %d: snapshot at %d delivered to node %d in %.1f s (%d chunks, %d bytes)", self.me.id,
                     index, peer, took, s.chunks_sent, s.bytes_sent)
        if s.term == self.node.term and self.node.role is Role.LEADER:
            # A stream of an earlier term says nothing about this term's Progress of that follower.
            self.node.report_snapshot(peer, index)

    def _on_snapshot_ack(self, ack: SnapshotAck) -> None:
        out = self.outgoing.get(ack.src)
        if out is None:
            return
        self.transport.send(out.sender.on_ack(ack))
        if out.sender.state != SENDING:
            self._end_snapshot(ack.src, out.sender.index if out.sender.state == DONE else None)

    def _tick_snapshots(self) -> None:
        for peer, out in list(self.outgoing.items()):
            if self.node.role is not Role.LEADER or out.sender.term != self.node.term:
                self._end_snapshot(peer, None)
                continue
            self.transport.send(out.sender.tick())
            if out.sender.state == FAILED:
                self._end_snapshot(peer, None)
        now = time.monotonic()
        idle_limit = RECEIVE_IDLE_ELECTIONS * self.settings.election_ticks * self.settings.tick_s
        if self.receiver.active and not self.receiver.completed and now - self.chunk_seen_at > idle_limit:
            # The leader gave up on this stream long ago (or is gone): free the staged keys.
            log.warning("node %d: snapshot stream from node %d idle; staged state discarded", self.me.id,
                        self.receiver.src)
            self.receiver.abandon()
            self.storage.discard_staged()
        for sid, b in list(self.backups.items()):
            if now - b.last_used > BACKUP_IDLE_S:
                b.view.close()
                del self.backups[sid]

    def _on_chunk(self, chunk: SnapshotChunk) -> None:
        self.chunk_seen_at = time.monotonic()
        v = self.receiver.on_chunk(chunk, self.node.term)
        if v.begin:
            log.info("node %d: receiving a snapshot from node %d", self.me.id, chunk.src)
            self.storage.begin_staging()
        if v.data is not None:
            try:
                self.storage.stage(v.data)
            except ValueError as exc:
                log.warning("node %d: dropping a malformed snapshot chunk: %s", self.me.id, exc)
                self.receiver.abandon()
                self.storage.discard_staged()
                return
        if v.reply is not None:
            self.transport.send([v.reply])
        if v.complete is not None:
            self.node.step(v.complete)

    def _decide_install(self, rd: Ready) -> None:
        """Step 0 of the core's contract: the first Ready after a complete snapshot was stepped in."""
        if rd.snapshot is None:
            self.snapshot_stats["refused"] += 1
            log.info("node %d: snapshot not needed (commit index %d); discarded", self.me.id, rd.commit_index)
            self.storage.discard_staged()
            return
        self.storage.install_staged(rd.snapshot)
        self.sm.reload()
        self.snapshot_stats["installed"] += 1
        log.info("node %d: installed a snapshot at %d (term %d)", self.me.id, rd.snapshot.index, rd.snapshot.term)

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
            elif req.op == "compact":
                first = self._maybe_compact(force=True)
                self._reply(envelope, protocol.ok(id=self.me.id, snapshot_index=first,
                                                  applied_index=self.sm.applied_index))
            elif req.op == "snapshot":
                self._reply(envelope, self._backup(req.stream))
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
                           applied_index=self.sm.applied_index, last_index=n.log.last_index,
                           snapshot_index=n.log.snapshot_index, pid=os.getpid(), snapshots=self.snapshot_stats)

    def _backup(self, stream: int | None) -> bytes:
        """One chunk of a point-in-time copy of the state machine (`zraft snapshot save`)."""
        now = time.monotonic()
        if stream is None:
            view = self.storage.open_snapshot()
            stream = self._ids.getrandbits(62) + 1
            self.backups[stream] = BackupStream(view, view.chunks(self.settings.snapshot_chunk_bytes), 0, now)
            log.info("node %d: snapshot for a backup at %d (term %d)", self.me.id, view.index, view.term)
        b = self.backups.get(stream)
        if b is None:
            return protocol.error(protocol.BAD_REQUEST, f"no snapshot stream {stream} on node {self.me.id} "
                                                        f"(finished, or idle for over {BACKUP_IDLE_S:.0f} s)")
        data = next(b.chunks, None)
        b.seq += 1
        b.last_used = now
        done = data is None
        if done:
            b.view.close()
            del self.backups[stream]
        return protocol.ok(id=self.me.id, stream=stream, seq=b.seq, index=b.view.index, term=b.view.term,
                           data=data or b"", done=done)

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
        for out in self.outgoing.values():
            out.view.close()
        for b in self.backups.values():
            b.view.close()
        if self.http is not None:
            self.http.close()
        if self.writer is not None:
            self.writer.close()  # what is queued still reaches the disk
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
