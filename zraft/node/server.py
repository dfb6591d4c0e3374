"""The node process: one poll loop around a :class:`~zraft.node.driver.Driver`.

The driver owns the Raft core's Ready contract (persist, send, apply, snapshots); this module
owns what is the server's alone: the sockets, the clock, the clients and their deadlines, fault
injection, status and backups. One turn of the loop (docs/ARCHITECTURE.md):

1. poll the peer and client sockets (and, with async storage, the log writer's eventfd) until
   something arrives or the next tick is due;
2. drain everything that is ready: peer messages go to the driver, client writes of the turn
   become one proposal batch, client reads one ReadIndex round; a due tick ticks the driver;
3. ``driver.process()``: every Ready is persisted, sent and applied; the driver tells us what
   was applied and which reads are safe, and we answer those clients;
4. expire requests that passed their deadline.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plyvel
import zmq

from zraft.api.http import HttpGateway
from zraft.client import protocol
from zraft.client.protocol import Limits, Request, RequestError
from zraft.cluster.config import ClusterConfig, Settings
from zraft.cluster.keys import CLIENT_DOMAIN, KeyRing
from zraft.node.driver import Driver, DriverEvents, new_raft_node
from zraft.node.interfaces import SnapshotView, Storage
from zraft.node.leveldb import DamageError, LevelDBStorage, damage_text, storage_error_text
from zraft.node.requests import Envelope, PendingRequests
from zraft.node.statemachine import KVStateMachine, check_command, encode_cas, encode_delete, encode_put
from zraft.node.transport import PeerTransport
from zraft.node.writer import StorageWriter
from zraft.raft.core import Role
from zraft.raft.messages import Entry

log = logging.getLogger(__name__)

BACKUP_IDLE_S = 60.0  # a backup stream nobody asked for the next chunk of this long is closed
MARK_INTERVAL_S = 5.0  # how often the durable mark (zraft.node.leveldb) is brought up to date


class NodeFailed(RuntimeError):
    """The node stopped while running because its storage failed (the message says why and what to do)."""


@dataclass(slots=True)
class _Turn:
    """What one turn of the loop took from the client socket."""

    bytes: int = 0
    write_bytes: int = 0
    writes: list[tuple[Envelope, bytes]] = field(default_factory=list)
    reads: list[tuple[Envelope, bytes]] = field(default_factory=list)


@dataclass(slots=True)
class BackupStream:
    """A snapshot being read out by a client (`zraft snapshot save`), one chunk per request."""

    view: SnapshotView
    chunks: Iterator[bytes]
    seq: int = 0
    last_used: float = 0.0


class NodeServer(DriverEvents):
    """One node: its sockets and clients around a driver. ``storage`` is the node's (LevelDB in
    production, see :func:`run_node`); the server closes it on shutdown."""

    def __init__(self, cluster: ClusterConfig, node_id: int, storage: Storage, settings: Settings | None = None,
                 allow_faults: bool = False, keys: KeyRing | None = None) -> None:
        self.cluster = cluster
        self.keys = keys
        self.me = cluster.node(node_id)
        self.settings = s = settings or Settings()
        self.limits = Limits(s.max_key_bytes, s.max_value_bytes, s.max_request_bytes)
        self.storage = storage
        self.sm = KVStateMachine(storage.state)
        raft = new_raft_node(s.raft_config(node_id, tuple(cluster.ids)), storage)
        # Log writes in a background thread (async storage), or inline in the loop.
        self.writer = StorageWriter(storage.log) if s.async_storage else None
        self.ctx = zmq.Context()
        # With keys: CURVE on both ports, and a ZAP handler that lets in only the keys it knows (zraft.cluster.keys).
        self.auth = keys.authenticator(self.ctx) if keys is not None else None
        peers = [n for n in cluster.nodes if n.id != node_id]
        self.transport = PeerTransport(self.ctx, self.me, peers, max_frame_bytes=s.peer_frame_bytes, keys=keys)
        self.driver = Driver(raft, storage, self.sm, self.transport, events=self, config=s.driver_config(),
                             writer=self.writer, rng=random.Random(),
                             check_command=functools.partial(check_command, max_key_bytes=s.max_key_bytes,
                                                             max_value_bytes=s.max_value_bytes))
        self.raft = raft
        self.clients = self.ctx.socket(zmq.ROUTER)
        self.clients.setsockopt(zmq.LINGER, 0)
        # Bounded memory per client connection: a frame a bit over the request limit at most, a few queued.
        self.clients.setsockopt(zmq.MAXMSGSIZE, s.client_frame_bytes)
        self.clients.setsockopt(zmq.RCVHWM, 64)
        self.clients.setsockopt(zmq.SNDHWM, 1000)
        if keys is not None:
            keys.serve(self.clients, CLIENT_DOMAIN)
        self.clients.bind(self.me.client_endpoint)
        # The HTTP API (zraft.api.http): its own threads, a client of this node's client port.
        self.http = (HttpGateway(cluster, self.me, s.request_timeout_s + 1.0, s.max_value_bytes, keys=keys)
                     if s.http_api else None)
        self.pending = PendingRequests()
        self.allow_faults = allow_faults
        self.drop_write_replies = 0  # fault injection: lose the next N replies to applied writes
        self.busy_replies = 0
        self.slow_turns = 0
        self._slow_logged = -math.inf
        self.stopping = False
        self._marked: tuple[int, int | None, int] | None = None  # (term, vote, applied) in the durable mark
        self.backups: dict[int, BackupStream] = {}
        self._ids = random.Random()  # backup stream ids
        log.info("node %d starting: term %d, log %d..%d, applied %d; clients on %s, HTTP on %s; log writes %s",
                 node_id, raft.term, raft.log.first_index, raft.log.last_index, self.sm.applied_index,
                 self.me.client_endpoint, self.me.http_endpoint if self.http is not None else "(off)",
                 "in a background thread" if self.writer is not None else "inline")
        if keys is None:
            log.warning("node %d: no keys (--keys / ZRAFT_KEYS): its peer port %s and client port %s are open to "
                        "anyone who can reach them, unencrypted", node_id, self.me.peer_endpoint,
                        self.me.client_endpoint)
        else:
            log.info("node %d: keys from %s: peers and clients authenticated (CURVE), traffic encrypted", node_id,
                     keys.directory)

    # ------------------------------------------------------------------ the loop

    def run(self, handle_signals: bool = True) -> None:
        """Serve until SIGTERM or SIGINT (``handle_signals``, in the main thread) or ``stopping`` is set."""
        if handle_signals:
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
        tick = self.settings.tick_s
        next_tick = time.monotonic() + tick
        next_mark = time.monotonic() + MARK_INTERVAL_S
        driver = self.driver
        clean = False
        try:
            while not self.stopping:
                due = self.transport.flush_delayed(time.monotonic())  # frames held by an injected delay
                wake = next_tick if due is None else min(next_tick, due)
                # Whole milliseconds, rounded up: zmq would round a fraction down to 0 and spin.
                wait_ms = max(0, math.ceil((wake - time.monotonic()) * 1000))
                ready = dict(poller.poll(wait_ms))
                if self.writer is not None and self.writer.fd in ready:
                    driver.writes_done()
                if self.transport.router in ready:
                    driver.receive(self.transport.receive(max_bytes=2 * self.settings.max_turn_bytes))
                if self.clients in ready:
                    self._serve_clients()
                now = time.monotonic()
                if now >= next_tick:
                    driver.tick()
                    self._close_idle_backups(now)
                    if now >= next_mark:
                        self._write_mark()
                        next_mark = now + MARK_INTERVAL_S
                    # After a stall, don't fire a burst of ticks: that would only cause elections.
                    next_tick = max(next_tick + tick, now)
                driver.process()
                self._expire(now)
                self._note_slow_turn(now)
            clean = True
        finally:
            self._shutdown(clean)

    def _note_slow_turn(self, started: float) -> None:
        """A turn that takes half an election timeout risks one: say so (at most every 10 s)."""
        took = time.monotonic() - started
        s = self.settings
        if took >= s.election_ticks * s.tick_s / 2:
            self.slow_turns += 1
            if started - self._slow_logged >= 10.0:
                self._slow_logged = started
                log.warning("node %d: a turn of the loop took %.0f ms (election timeout %.0f ms; %d slow turns "
                            "so far): the disk or the machine is too slow for this load", self.me.id, took * 1000,
                            s.election_ticks * s.tick_s * 1000, self.slow_turns)

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("node %d: %s received, stopping", self.me.id, signal.Signals(signum).name)
        self.stopping = True

    # ------------------------------------------------------------------ what the driver tells us

    def role_changed(self, role: Role, term: int, leader: int | None) -> None:
        log.info("node %d: %s in term %d, leader %s", self.me.id, role.value, term, leader)

    def applied(self, entries: list[Entry], results: list[Any]) -> None:
        pending = self.pending
        if not pending.writes:
            return
        for entry, result in zip(entries, results, strict=True):
            for envelope, ours in pending.applied(entry.index, entry.term):
                if not ours:  # another leader's entry took this index: our proposal was never committed
                    self._reply(envelope, self._not_leader())
                elif self.drop_write_replies > 0:
                    self.drop_write_replies -= 1
                    log.warning("fault injection: dropping the reply to the write at index %d", entry.index)
                elif "error" in result:
                    self._reply(envelope, protocol.error(result["error"], result["message"]))
                else:
                    self._reply(envelope, protocol.ok(**result) if result else protocol.OK)

    def read_ready(self, request_id: Any, index: int) -> None:
        read = self.pending.take_read(request_id)
        if read is not None:
            self._reply(read.envelope, protocol.ok(value=self.sm.get(read.key)))

    def read_dropped(self, request_id: Any) -> None:
        read = self.pending.take_read(request_id)
        if read is not None:
            self._reply(read.envelope, self._not_leader())

    def _expire(self, now: float) -> None:
        timeout = self.settings.request_timeout_s
        for envelope, is_write in self.pending.expired(now):
            what = "the write may or may not have been applied" if is_write else "leadership not confirmed"
            self._reply(envelope, protocol.error(protocol.TIMEOUT, f"no commit within {timeout} s: {what}"))

    # ------------------------------------------------------------------ clients

    def _serve_clients(self, limit: int = 5000) -> None:
        """Drain the client socket: answer what can be answered now, batch the writes and the reads.

        Admission control: one turn takes at most ``max_turn_bytes`` of requests (the rest wait in the
        socket for the next turn, so the loop keeps its heartbeats), and a request past the bounds on
        requests waiting or bytes uncommitted is answered ``busy`` at once (it did not take effect).
        """
        turn = _Turn()
        budget = self.settings.max_turn_bytes
        for _ in range(limit):
            if turn.bytes >= budget:
                break
            try:
                frames = self.clients.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            envelope, raw = frames[:-1], frames[-1]
            turn.bytes += len(raw)
            try:
                req = protocol.parse_request(raw, self.limits)
            except RequestError as exc:
                self._reply(envelope, protocol.error(exc.code, str(exc)))
                continue
            admin = self._ADMIN.get(req.op)
            if admin is not None:
                self._reply(envelope, admin(self, req))
            elif self.stopping:
                self._reply(envelope, protocol.error(protocol.UNAVAILABLE, "node is shutting down"))
            elif self.raft.role is not Role.LEADER:
                self._reply(envelope, self._not_leader())
            else:
                self._admit(envelope, req, turn)
        if turn.writes:
            self._propose(turn.writes)
        if turn.reads:
            self._read(turn.reads)

    def _admit(self, envelope: Envelope, req: Request, turn: _Turn) -> None:
        """A leader's client request: into this turn's batch, or ``busy``."""
        s = self.settings
        if len(self.pending) + len(turn.writes) + len(turn.reads) >= s.max_pending_requests:
            self._reply(envelope, self._busy(f"{s.max_pending_requests} requests are waiting"))
        elif req.op == "get":
            turn.reads.append((envelope, req.key))
        else:
            cmd = _command(req)
            held = self.raft.uncommitted_bytes + turn.write_bytes
            if held and held + len(cmd) > s.max_uncommitted_bytes:
                self._reply(envelope, self._busy(f"{held} bytes of writes wait for their commit"))
                return
            turn.writes.append((envelope, cmd))
            turn.write_bytes += len(cmd)

    def _busy(self, why: str) -> bytes:
        self.busy_replies += 1
        return protocol.error(protocol.BUSY, f"node {self.me.id} is busy ({why}); not applied, retry later")

    def _propose(self, writes: list[tuple[Envelope, bytes]]) -> None:
        first = self.driver.propose([cmd for _, cmd in writes])
        if first is None:
            for envelope, _ in writes:
                self._reply(envelope, self._not_leader())
            return
        deadline = time.monotonic() + self.settings.request_timeout_s
        self.pending.add_writes(first, self.raft.term, [envelope for envelope, _ in writes], deadline)

    def _read(self, reads: list[tuple[Envelope, bytes]]) -> None:
        deadline = time.monotonic() + self.settings.request_timeout_s
        self.driver.read_index([self.pending.add_read(envelope, key, deadline) for envelope, key in reads])

    def _status(self, _req: Request) -> bytes:
        n = self.raft
        role = "candidate" if n.role is Role.PRE_CANDIDATE else n.role.value
        st = self.driver.stats
        snapshots = {"sent": st["snap_sent"], "failed": st["snap_failed"] + st["snap_dropped"],
                     "installed": st["snap_installed"], "refused": st["snap_refused"],
                     "compactions": st["compactions"]}
        return protocol.ok(id=self.me.id, role=role, term=n.term, leader=n.leader, commit_index=n.commit_index,
                           applied_index=self.sm.applied_index, last_index=n.log.last_index,
                           snapshot_index=n.log.snapshot_index, pid=os.getpid(), snapshots=snapshots,
                           busy=self.busy_replies, peer_frames_rejected=sum(self.transport.rejected.values()))

    def _compact(self, _req: Request) -> bytes:
        first = self.driver.compact_now()
        return protocol.ok(id=self.me.id, snapshot_index=first, applied_index=self.sm.applied_index)

    def _backup(self, req: Request) -> bytes:
        """One chunk of a point-in-time copy of the state machine (`zraft snapshot save`)."""
        now = time.monotonic()
        stream = req.stream
        if stream is None:
            view = self.storage.state.open_snapshot()
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

    def _close_idle_backups(self, now: float) -> None:
        for sid, b in list(self.backups.items()):
            if now - b.last_used > BACKUP_IDLE_S:
                b.view.close()
                del self.backups[sid]

    def _fault(self, req: Request) -> bytes:
        if not self.allow_faults:
            return protocol.error(protocol.BAD_REQUEST, f"fault injection is disabled on node {self.me.id}; start "
                                                        "it with --allow-faults (ZRAFT_ALLOW_FAULTS=1) to enable it")
        fault = req.fault
        assert fault is not None
        f = self.transport.faults
        action = fault["action"]
        if action == "drop_replies":
            self.drop_write_replies = fault["count"]
        elif action == "clear":
            self.drop_write_replies = 0
        f.apply(fault, set(self.transport.dealers))
        if action != "show":
            log.warning("node %d: fault injection %s -> %s", self.me.id, fault, f.describe())
        return protocol.ok(id=self.me.id, faults={**f.describe(), "drop_replies": self.drop_write_replies})

    # Ops every node answers at once, leader or not: op -> handler(self, request) -> reply.
    _ADMIN = {"status": _status, "fault": _fault, "compact": _compact, "snapshot": _backup}

    def _not_leader(self) -> bytes:
        leader = self.raft.leader
        hint = self.cluster.node(leader).client_endpoint if leader is not None and leader != self.me.id else None
        msg = f"node {self.me.id} is not the leader" + (f"; try node {leader}" if hint else "; leader unknown")
        return protocol.error(protocol.NOT_LEADER, msg, leader=hint)

    def _reply(self, envelope: Envelope, payload: bytes) -> None:
        try:
            self.clients.send_multipart([*envelope, payload], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the client is gone or its queue is full: it will time out
            log.debug("reply dropped: %s", exc)

    # ------------------------------------------------------------------ shutdown

    def _write_mark(self) -> None:
        """Bring the durable mark up to date when the term, vote or applied index moved."""
        now = (self.raft.term, self.raft.voted_for, self.sm.applied_index)
        if now != self._marked:
            self.storage.write_mark()
            self._marked = now

    def _shutdown(self, clean: bool = True) -> None:
        writes, reads = self.pending.drain()
        unknown = protocol.error(protocol.TIMEOUT, "node is shutting down; the write may or may not be applied")
        for envelope in writes:
            self._reply(envelope, unknown)
        unavailable = protocol.error(protocol.UNAVAILABLE, "node is shutting down")
        for envelope in reads:
            self._reply(envelope, unavailable)
        self.driver.close()
        for b in self.backups.values():
            b.view.close()
        if self.http is not None:
            self.http.close()
        if self.writer is not None:
            self.writer.close()  # what is queued still reaches the disk
        if clean:
            self._write_mark()
        self.transport.close()
        self.clients.close()
        if self.auth is not None:
            self.auth.stop()
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
             log_level: str = "INFO", allow_faults: bool = False, keys: KeyRing | None = None) -> None:
    """Run one node until it is stopped. A data dir that fails its checks raises StorageError (the
    node does not start); storage that fails while the node runs raises NodeFailed: damage found is
    remembered in the data dir (the next start refuses too), a failed write (a full disk) is not."""
    node_dir = Path(data_dir) / str(node_id)
    db_dir = node_dir / "db"
    fresh = not db_dir.is_dir() or not any(db_dir.iterdir())
    ran_here_before = (node_dir / "node.log").exists()  # its log is there, its data is not
    setup_logging(node_dir, log_level)
    storage = LevelDBStorage(db_dir)
    try:
        storage.check()
        if fresh and ran_here_before:
            log.warning("node %d: %s holds no data: starting with an empty log and state, as a new node. "
                        "If this node held data before, it has forgotten its votes and log: stop it and "
                        "restore it from a backup (docs/OPERATIONS.md)", node_id, db_dir)
        server = NodeServer(cluster, node_id, storage, settings, allow_faults, keys)
    except BaseException:
        storage.close()
        raise
    try:
        server.run()
    except (DamageError, plyvel.CorruptionError) as exc:
        message = storage.damage_message(damage_text(exc))
        storage.mark_damaged(message)
        log.error("node %d stopped: %s", node_id, message)
        raise NodeFailed(message) from None
    except (plyvel.Error, OSError) as exc:
        message = (f"a write to {db_dir} failed ({storage_error_text(exc)}); nothing acknowledged is lost, "
                   "as a write is acknowledged only once it is durable: free space or fix the disk, then "
                   "start the node again")
        log.error("node %d stopped: %s", node_id, message)
        raise NodeFailed(message) from None
