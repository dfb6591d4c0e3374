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
import threading
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
from zraft.cluster.config import ClusterConfig, NodeAddress, Settings
from zraft.cluster.keys import CLIENT_DOMAIN, KeyRing
from zraft.node.driver import Driver, DriverEvents, new_raft_node
from zraft.node.interfaces import SnapshotView, Storage
from zraft.node.leases import LeaseClock
from zraft.node.leveldb import DamageError, LevelDBStorage, damage_text, storage_error_text
from zraft.node.requests import Envelope, PendingRequests
from zraft.node.statemachine import (
    LEASE_GRANT,
    LEASE_KEEPALIVE,
    LEASE_REVOKE,
    Compacted,
    KVStateMachine,
    check_command,
    encode_cas,
    encode_delete,
    encode_lease_op,
    encode_put,
    encode_put_lease,
    encode_txn,
)
from zraft.node.transport import PeerTransport
from zraft.node.watches import Watch, WatchHub
from zraft.node.writer import StorageWriter
from zraft.raft import confchange
from zraft.raft.confchange import ConfChangeError, Member, Membership
from zraft.raft.core import Role
from zraft.raft.messages import Entry

log = logging.getLogger(__name__)

BACKUP_IDLE_S = 60.0  # a backup stream nobody asked for the next chunk of this long is closed
MARK_INTERVAL_S = 5.0  # how often the durable mark (zraft.node.leveldb) is brought up to date
MEMBER_WAIT_S = 600.0  # a membership request waits this long at most (a new member may need a big snapshot)


class NodeFailed(RuntimeError):
    """The node stopped while running because its storage failed (the message says why and what to do)."""


class NodeRefused(RuntimeError):
    """The node may not take part under its id (the message says why and what to do)."""


def bootstrap_membership(cluster: ClusterConfig) -> Membership:
    """A new cluster's first configuration: every node of Config.txt a voter (implicit until a leader
    writes it into the log)."""
    return Membership(tuple(Member(n.id, n.ip, n.port, n.client_port, n.http_port) for n in cluster.nodes),
                      explicit=False)


def member_address(m: Member) -> NodeAddress:
    return NodeAddress(m.id, m.ip, m.port, m.client_port, m.http_port)


@dataclass(slots=True)
class _MemberWait:
    """A membership request answered once ``done`` says so (or at its deadline)."""

    envelope: Envelope
    done: Any  # Callable[[], bytes | None]: the reply once it is due
    deadline: float
    what: str


@dataclass(slots=True)
class _Turn:
    """What one turn of the loop took from the client socket."""

    bytes: int = 0
    write_bytes: int = 0
    writes: list[tuple[Envelope, bytes]] = field(default_factory=list)
    reads: list[tuple[Envelope, Request]] = field(default_factory=list)


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
                 allow_faults: bool = False, keys: KeyRing | None = None, join: bool = False,
                 probation: bool = False) -> None:
        self.cluster = cluster
        self.keys = keys
        self.me = cluster.node(node_id)
        self.settings = s = settings or Settings()
        self.limits = Limits(s.max_key_bytes, s.max_value_bytes, s.max_request_bytes)
        self.storage = storage
        self.sm = KVStateMachine(storage.state, history_revisions=s.watch_history_revisions,
                                 history_bytes=s.watch_history_bytes)
        self.watches = WatchHub()
        self.lease_clock = LeaseClock()  # (the leader's only)
        self.joining = join
        bootstrap = Membership() if join else bootstrap_membership(cluster)
        raft = new_raft_node(s.raft_config(node_id, () if join else tuple(cluster.ids)), storage, bootstrap=bootstrap)
        if join and storage.state.membership is None and raft.log.last_index == 0:
            # Remember, durably, that this node is not a member yet: a restart without --join must not take
            # Config.txt for the cluster's membership.
            state = storage.state
            state.write({}, state.applied_index, None, state.applied_term, Membership().encode())
        # Probation (zraft.raft.core): an empty data dir under an id the cluster may have seen take part, or
        # a node joining: it takes no Raft message until the probe's verdict (or the leader, replicating to
        # it meanwhile, would mark it seen, and the probe would take that for an earlier life of this id).
        raft.probation = probation or (join and not raft.membership.members)
        self.members: dict[int, NodeAddress] = {}
        self._narrowed = True  # the transport talks to the members only (no removal in flight)
        # Log writes in a background thread (async storage), or inline in the loop.
        self.writer = StorageWriter(storage.log) if s.async_storage else None
        self.ctx = zmq.Context()
        # With keys: CURVE on both ports, and a ZAP handler that lets in only the keys it knows (zraft.cluster.keys).
        self.auth = keys.authenticator(self.ctx) if keys is not None else None
        self._set_members(raft.membership)
        peers = [a for i, a in self.members.items() if i != node_id]
        if join:  # not a member yet: whoever Config.txt lists besides this node may bring it in
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
        self.member_waits: list[_MemberWait] = []
        self._next_key_retry = 0.0
        self._client_change: tuple[int, int] | None = None  # (term, index) of the last change a client asked for
        self._probe: _MembershipProbe | None = _MembershipProbe(self) if raft.probation else None
        self.refused: str | None = None  # why this node may not take part (it stops with that)
        self._handoff_until: float | None = None  # stopping: when to stop waiting for a leadership handoff
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
            while not self._stopped_for_good():
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
                    self._tick(now)
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
            self._shutdown(clean, raise_refused=True)

    def _tick(self, now: float) -> None:
        self.driver.tick()
        if self.lease_clock.deadlines and self.raft.role is Role.LEADER and not self.raft.transferring:
            expired = self.lease_clock.due(now)
            if expired:
                log.info("node %d: leases expired: %s", self.me.id, ", ".join(map(str, expired[:10])))
                self.driver.propose([encode_lease_op(LEASE_REVOKE, lease) for lease in expired])
        self._close_idle_backups(now)
        if self._probe is not None:
            self._check_probe()
        if not self._narrowed and self.raft.membership_committed:
            self._connect_members()  # a removal committed: stop talking to the node that left
        if now >= self._next_key_retry:  # a member added at runtime whose public key had not come yet
            self._next_key_retry = now + 1.0
            self.transport.retry_missing_keys()

    def _stopped_for_good(self) -> bool:
        """Stop now? A leader asked to stop first hands leadership to an up-to-date voter (thesis 3.10),
        so a planned restart costs no election timeout; it waits at most an election timeout for that."""
        if not self.stopping:
            return False
        raft = self.raft
        if self._handoff_until is None:
            self._handoff_until = 0.0
            if raft.role is Role.LEADER and len(raft.membership.voters - {self.me.id}) > 0:
                try:
                    target = raft.transfer_leadership()
                except ConfChangeError:
                    return True
                s = self.settings
                self._handoff_until = time.monotonic() + s.election_ticks * s.tick_s
                log.info("node %d: handing leadership to node %d before stopping", self.me.id, target)
                self.driver.process()
                return False
            return True
        if raft.role is Role.LEADER and raft.transferring and time.monotonic() < self._handoff_until:
            return False
        # (A follower without a leader: the target is campaigning; its win lets the clients go on at once.)
        return raft.role is Role.LEADER or raft.leader is not None or time.monotonic() >= self._handoff_until

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
        if role is Role.LEADER:  # every lease gets its full TTL again: a failover never expires one early
            self.lease_clock.reset(self.sm.leases(), time.monotonic())
        else:
            self.lease_clock.clear()
        if leader is None:  # cut off, perhaps: the watchers ask again, elsewhere if this node stays so
            for w in self.watches.all():
                self._answer_watch(w, force=True)

    def membership_changed(self, membership: Membership) -> None:
        self._set_members(membership)
        self._connect_members()
        log.info("node %d: membership %s%s", self.me.id, _describe_membership(membership),
                 "" if self.raft.membership_committed else " (not committed yet)")
        if self.me.id not in membership and membership.explicit and self.raft.membership_committed:
            log.info("node %d: no longer a member of the cluster: it takes no part; stop it", self.me.id)

    def _connect_members(self) -> None:
        """Talk to every member; keep talking to a node that leaves until its removal is committed (a
        leader that removes itself leads until then, and its followers must hear it)."""
        peers = dict(self.members)
        if not self.raft.membership_committed:
            peers = {**self.transport.addresses, **peers}
        self.transport.set_peers(list(peers.values()))
        self._narrowed = self.raft.membership_committed

    def _set_members(self, membership: Membership) -> None:
        """Addresses of every member: from the log's configuration, or for one bootstrapped from an older
        Config.txt without them, from the file."""
        members: dict[int, NodeAddress] = {}
        for m in membership.members:
            if m.ip:
                members[m.id] = member_address(m)
            elif m.id in self.cluster.ids:
                members[m.id] = self.cluster.node(m.id)
        self.members = members

    def applied(self, entries: list[Entry], results: list[Any]) -> None:
        if self.sm.events and self.watches:
            first = self.sm.events[0]["revision"]
            for w in self.watches.woken({ev["key"] for ev in self.sm.events}):
                # A waiting watch has seen every earlier event go by without a match: look from this batch on.
                w.start_revision = max(w.start_revision, first)
                self._answer_watch(w)
        if self.sm.lease_changes and self.raft.role is Role.LEADER:
            self._leases_changed()
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

    def _leases_changed(self) -> None:
        """The leader's clock: a grant or keepalive applied starts the lease's TTL again; a revoke ends it."""
        now = time.monotonic()
        for change, lease, ttl in self.sm.lease_changes:
            if change == "revoke":
                self.lease_clock.revoked(lease)
            else:
                self.lease_clock.refresh(lease, ttl, now)

    def read_ready(self, request_id: Any, index: int) -> None:
        read = self.pending.take_read(request_id)
        if read is None:
            return
        req, sm = read.request, self.sm
        if req.op == "range":  # (one cut: nothing is applied while the loop thread reads)
            kvs, more = sm.range(req.key, req.end, req.limit, req.keys_only, self.settings.max_request_bytes)
            self._reply(read.envelope, protocol.ok(kvs=kvs, more=more, revision=sm.revision))
        elif req.meta:
            meta = sm.get_meta(req.key)
            self._reply(read.envelope, protocol.ok(value=sm.get(req.key), revision=sm.revision,
                                                   **(meta.fields() if meta else {})))
        else:
            self._reply(read.envelope, protocol.ok(value=sm.get(req.key)))

    def state_replaced(self) -> None:
        """A snapshot replaced the state machine (and its history): every watch looks again."""
        for w in self.watches.all():
            self._answer_watch(w)

    def read_dropped(self, request_id: Any) -> None:
        read = self.pending.take_read(request_id)
        if read is not None:
            self._reply(read.envelope, self._not_leader())

    def _expire(self, now: float) -> None:
        """Answer the membership requests now due, and expire the client requests past their deadline."""
        if self.member_waits:
            self._answer_member_waits(now)
        if self.watches:
            for w in self.watches.expired(now):
                self._answer_watch(w, force=True)
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
            self._take(envelope, req, turn)
        if turn.writes:
            self._propose(turn.writes)
        if turn.reads:
            self._read(turn.reads)

    def _take(self, envelope: Envelope, req: Request, turn: _Turn) -> None:
        """One valid request: answered now (admin ops, refusals), a watch, or into the leader's turn."""
        admin = self._ADMIN.get(req.op)
        if admin is not None:
            self._reply(envelope, admin(self, req))
        elif self.stopping:
            self._reply(envelope, protocol.error(protocol.UNAVAILABLE, "node is shutting down"))
        elif req.op == "watch":
            self._watch(envelope, req)
        elif self.raft.role is not Role.LEADER:
            self._reply(envelope, self._not_leader())
        else:
            self._admit(envelope, req, turn)

    def _admit(self, envelope: Envelope, req: Request, turn: _Turn) -> None:
        """A leader's client request: into this turn's batch, or ``busy``."""
        s = self.settings
        if req.op in protocol.MEMBER_OPS:
            self._change_membership(envelope, req)
        elif self.raft.transferring and req.op != "get":
            self._reply(envelope, self._busy(f"leadership is being handed to node {self.raft.lead_transferee}"))
        elif len(self.pending) + len(turn.writes) + len(turn.reads) >= s.max_pending_requests:
            self._reply(envelope, self._busy(f"{s.max_pending_requests} requests are waiting"))
        elif req.op in protocol.READ_OPS:
            turn.reads.append((envelope, req))
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

    def _read(self, reads: list[tuple[Envelope, Request]]) -> None:
        deadline = time.monotonic() + self.settings.request_timeout_s
        self.driver.read_index([self.pending.add_read(envelope, req, deadline) for envelope, req in reads])

    # ------------------------------------------------------------------ watches

    def _watch(self, envelope: Envelope, req: Request) -> None:
        """A watch: answered at once if the history holds events for it (or no longer reaches back to its
        start), else it waits (zraft.node.watches) until an apply brings one or its timeout passes. Any
        member that knows a leader serves it, from its own applied state and history."""
        n = self.raft
        if n.leader is None or n.probation or self.me.id not in n.membership:
            self._reply(envelope, protocol.error(protocol.UNAVAILABLE, f"node {self.me.id} knows no leader "
                                                                       "(or is no member): watch elsewhere"))
            return
        if len(self.watches) >= self.settings.max_watches:
            self._reply(envelope, self._busy(f"{len(self.watches)} watches are waiting"))
            return
        w = Watch(envelope, req.key, req.end, req.start_revision, time.monotonic() + req.timeout)
        if not self._answer_watch(w, force=req.timeout == 0):
            # Nothing for it up to the store's revision: it waits for what comes after (the hub sees every
            # event from now on, so a wake never needs to look further back than the batch that woke it).
            w.start_revision = max(w.start_revision, self.sm.revision + 1)
            self.watches.add(w)

    def _answer_watch(self, w: Watch, force: bool = False) -> bool:
        """Answer ``w`` if the history has events for it (or ``force``: its time is up); True if answered."""
        try:
            events, upto = self.sm.watch_events(w.start_revision, w.start, w.end)
        except Compacted as exc:
            reply = protocol.error(protocol.COMPACTED, f"watch from revision {w.start_revision}: {exc}; start again "
                                                       f"from a revision after {exc.revision}",
                                   compact_revision=exc.revision)
        else:
            if not events and not force and upto >= self.sm.revision:
                return False  # (a scan cut short answers at once: the watcher goes on from upto + 1)
            reply = protocol.ok(events=events, revision=upto)
        self.watches.remove(w)
        self._reply(w.envelope, reply)
        return True

    def _status(self, _req: Request) -> bytes:
        n = self.raft
        role = "candidate" if n.role is Role.PRE_CANDIDATE else n.role.value
        st = self.driver.stats
        snapshots = {"sent": st["snap_sent"], "failed": st["snap_failed"] + st["snap_dropped"],
                     "installed": st["snap_installed"], "refused": st["snap_refused"],
                     "compactions": st["compactions"]}
        m = n.membership
        return protocol.ok(id=self.me.id, role=role, term=n.term, leader=n.leader, commit_index=n.commit_index,
                           applied_index=self.sm.applied_index, last_index=n.log.last_index,
                           snapshot_index=n.log.snapshot_index, pid=os.getpid(), snapshots=snapshots,
                           busy=self.busy_replies, peer_frames_rejected=sum(self.transport.rejected.values()),
                           voters=sorted(m.voters), learners=sorted(m.learners), member=self.me.id in m,
                           probation=n.probation, revision=self.sm.revision, watches=len(self.watches))

    # ------------------------------------------------------------------ membership

    def _members(self, _req: Request | None = None) -> bytes:
        """Every member of this node's latest configuration (any node answers), and how far each is behind."""
        n = self.raft
        return protocol.ok(id=self.me.id, leader=n.leader, members=self._member_list(), explicit=n.membership.explicit,
                           config_index=n.config_index, committed=n.membership_committed, term=n.term,
                           commit_index=n.commit_index)

    def _member_list(self) -> list[dict[str, Any]]:
        n = self.raft
        out = []
        for m in n.membership.members:
            a = self.members.get(m.id)
            row: dict[str, Any] = {"id": m.id, "ip": a.ip if a else m.ip, "port": a.port if a else m.port,
                                   "client_port": a.client_port if a else m.client_port,
                                   "http_port": a.http_port if a else m.http_port, "voter": m.voter,
                                   "promote": m.promote, "seen": m.seen}
            pr = n.progress.get(m.id)
            if pr is not None:  # (the leader knows how far behind each member is)
                row["match"] = pr.match
                row["behind"] = max(0, n.log.last_index - pr.match)
            out.append(row)
        return out

    def _change_membership(self, envelope: Envelope, req: Request) -> None:
        """add_member, remove_member, promote_member, transfer_leader: through the leader's core; the
        reply waits until the change is committed (a voter added: promoted; a transfer: the target leads).

        A change the leader cannot take *yet* for a reason no client caused (it was just elected and
        has not committed an entry of its term, its own bookkeeping change or an earlier leader's is
        in flight, a transfer runs) is tried again each turn for up to two election timeouts before it
        is answered ``in_progress``: those clear within a round trip. A change another client asked
        for and that is not committed yet is ``in_progress`` at once. Only the leader's loop calls it.
        """
        spec = req.member
        assert spec is not None
        s = self.settings
        now = time.monotonic()
        settle_until = now + 2 * s.election_ticks * s.tick_s
        what = (f"node {spec['id']} to lead" if req.op == "transfer_leader" and spec["id"] is not None
                else f"{req.op} of node {spec['id']}")
        waiting: list[Any] = []  # once proposed: the check that the change is done

        def attempt() -> bytes | None:
            if waiting:
                return waiting[0]()
            if self.raft.role is not Role.LEADER:
                return self._not_leader()
            try:
                waiting.append(self._propose_change(req))
            except ConfChangeError as exc:
                if exc.code == "not_leader":
                    return self._not_leader()
                if exc.code == protocol.IN_PROGRESS and not self._client_change_pending() \
                        and time.monotonic() < settle_until:
                    return None
                return protocol.error(exc.code, str(exc))
            return waiting[0]()

        self._wait_member(envelope, now + MEMBER_WAIT_S, what, attempt)

    def _client_change_pending(self) -> bool:
        """Whether the configuration change not committed yet is one a client asked this leader for."""
        raft = self.raft
        return not raft.membership_committed and self._client_change == (raft.term, raft.config_index)

    def _propose_change(self, req: Request) -> Any:
        """Hand one membership request to the core; the check that answers it once done.
        Raises ConfChangeError when the core refuses it."""
        raft = self.raft
        spec = req.member
        assert spec is not None
        node_id = spec["id"]
        if req.op == "transfer_leader":
            return self._propose_transfer(node_id)
        cur = raft.membership
        if req.op == "add_member":
            new = confchange.add_member(cur, node_id, spec["ip"], spec["port"], spec["client_port"],
                                        spec["http_port"], spec["learner"])
        elif req.op == "remove_member":
            new = confchange.remove_member(cur, node_id)
        else:
            new = confchange.promote_member(cur, node_id)
        index = raft.propose_membership(new)
        self._client_change = (raft.term, index)
        log.info("node %d: membership change %s at index %d: %s", self.me.id, req.op, index,
                 _describe_membership(new))
        want_voter = req.op == "promote_member" or (req.op == "add_member" and not spec["learner"])
        term = raft.term
        return lambda: self._change_done(index, term, node_id, want_voter)

    def _change_done(self, index: int, term: int, node_id: int, want_voter: bool) -> bytes | None:
        """The reply to a membership change proposed at (index, term), once it is due."""
        n = self.raft
        if n.log.committed < index:
            if n.term != term and n.log.term_at(index) not in (None, term):
                return protocol.error(protocol.NOT_LEADER, "the change was lost with a change of leader; "
                                                           "see `zraft member list` and retry")
            if n.term != term or n.role is not Role.LEADER:
                return protocol.error(protocol.TIMEOUT, f"node {self.me.id} lost its leadership before the change "
                                                        "committed: it may or may not take effect; see `zraft "
                                                        "member list`")
            return None
        m = n.membership.get(node_id)
        if not want_voter or (m is not None and m.voter and n.membership_committed):
            return protocol.ok(members=self._member_list(), leader=self.me.id)
        return None

    def _propose_transfer(self, node_id: int | None) -> Any:
        target = self.raft.transfer_leadership(node_id)
        log.info("node %d: handing leadership to node %d", self.me.id, target)

        def led() -> bytes | None:
            n = self.raft
            if n.leader == target:
                return protocol.ok(leader=target)
            if n.role is Role.LEADER and n.transferring or n.leader is None:  # (None: the election is on)
                return None
            if n.role is Role.LEADER:  # aborted after an election timeout: this node leads on
                why = f"the transfer to node {target} was given up: it did not take over within an election timeout"
            else:
                why = f"node {target} did not take over: node {n.leader} leads now"
            return protocol.error(protocol.UNAVAILABLE, why)

        return led

    def _wait_member(self, envelope: Envelope, deadline: float, what: str, done: Any) -> None:
        reply = done()
        if reply is not None:
            self._reply(envelope, reply)
        else:
            self.member_waits.append(_MemberWait(envelope, done, deadline, what))

    def _answer_member_waits(self, now: float) -> None:
        waiting = []
        for w in self.member_waits:
            reply = w.done()
            if reply is None and now >= w.deadline:
                reply = protocol.error(protocol.TIMEOUT, f"gave up waiting for {w.what}; it may still happen: "
                                                         "see `zraft member list`")
            if reply is None:
                waiting.append(w)
            else:
                self._reply(w.envelope, reply)
        self.member_waits = waiting

    def _check_probe(self) -> None:
        """Act on what the other members answered about this node (see _MembershipProbe)."""
        probe = self._probe
        assert probe is not None
        verdict = probe.verdict()
        if verdict is None:
            return
        self._probe = None
        probe.stop()
        if verdict.refuse is not None:
            log.error("node %d refused: %s", self.me.id, verdict.refuse)
            self.refused = verdict.refuse
            self.stopping = True
            self._handoff_until = 0.0
            return
        if verdict.peers and not self.raft.membership.members:  # joining: now it can hear from every member
            self.transport.set_peers([a for a in verdict.peers if a.id != self.me.id])
        if self.raft.probation:
            self.raft.probation = False
            log.info("node %d: %s", self.me.id, verdict.why)

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
    _ADMIN = {"status": _status, "fault": _fault, "compact": _compact, "snapshot": _backup, "members": _members}

    def _not_leader(self) -> bytes:
        leader = self.raft.leader
        addr = self.members.get(leader) if leader is not None and leader != self.me.id else None
        hint = addr.client_endpoint if addr is not None else None
        msg = f"node {self.me.id} is not the leader" + (f"; try node {leader}" if hint else "; leader unknown")
        return protocol.error(protocol.NOT_LEADER, msg, leader=hint, leader_id=leader if hint else None)

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

    def _answer_all_waiting(self) -> None:
        """Shutting down: every request still waiting gets its answer now."""
        writes, reads = self.pending.drain()
        unknown = protocol.error(protocol.TIMEOUT, "node is shutting down; the write may or may not be applied")
        for envelope in writes:
            self._reply(envelope, unknown)
        unavailable = protocol.error(protocol.UNAVAILABLE, "node is shutting down")
        for envelope in reads:
            self._reply(envelope, unavailable)
        for w in self.member_waits:
            self._reply(w.envelope, protocol.error(protocol.TIMEOUT, f"node is shutting down; {w.what} may "
                                                                     "still happen: see `zraft member list`"))
        self.member_waits = []
        for w in self.watches.all():
            self.watches.remove(w)
            self._reply(w.envelope, unavailable)

    def _shutdown(self, clean: bool = True, raise_refused: bool = False) -> None:
        self._answer_all_waiting()
        if self.stopping:  # what came in meanwhile gets an answer too (`unavailable`), not silence
            self._serve_clients()
        if self._probe is not None:
            self._probe.stop()
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
        if raise_refused and clean and self.refused is not None:
            raise NodeRefused(self.refused)


@dataclass(slots=True)
class _Verdict:
    refuse: str | None = None  # this node may not take part: why, and what to do
    peers: list[NodeAddress] = field(default_factory=list)  # (joining) the members to hear from
    why: str = ""


class _MembershipProbe:
    """Asks the other nodes of Config.txt for their membership (`members`), from a thread of its own.

    Two nodes need it. One that starts with an empty data dir (on probation: it neither votes nor
    campaigns meanwhile) must make sure the cluster never saw its id take part (docs/PROTOCOL.md,
    "Membership"): refused if any answer marks it seen, or a leader's answer does not list it; let
    in if a leader's answer lists it unseen, or every answer is of a cluster whose first
    configuration no leader has written yet (a new cluster: it merely started late). And a node
    started with --join (on probation too until the verdict) is refused if its id is seen, and
    otherwise learns from the first answer whom to hear from until the leader adds it.
    """

    def __init__(self, server: NodeServer) -> None:
        self.me = server.me.id
        self.joining = server.joining
        self.endpoints = [n.client_endpoint for n in server.cluster.nodes if n.id != self.me]
        self.keys = server.keys
        self.answers: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._logged = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="membership-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from zraft.client.client import Client

        client = Client(self.endpoints or ["tcp://127.0.0.1:1"], exactly_once=False, keys=self.keys)
        try:
            while not self._stop.is_set():
                for ep in self.endpoints:
                    rep = client.request(ep, {"op": "members"}, 0.5)
                    if rep and rep.get("ok") and isinstance(rep.get("members"), list):
                        self.answers[ep] = rep
                self._stop.wait(0.3)
        except Exception as exc:  # noqa: BLE001 (a probe must never take the node down)
            log.warning("node %d: membership probe failed: %s", self.me, exc)
        finally:
            client.close()

    def stop(self) -> None:
        self._stop.set()

    def verdict(self) -> _Verdict | None:
        """What the answers so far decide (None: nothing yet; keep asking)."""
        if not self.endpoints:
            return _Verdict(why="no other node to ask: a cluster of one")
        answers = list(self.answers.values())
        verdict = self._refusal(answers) or (self._join(answers) if self.joining else self._probation(answers))
        now = time.monotonic()
        if verdict is None and now - self._logged >= 5.0:
            self._logged = now
            log.warning("node %d: waiting for %s to answer before it %s (answers so far: %d)", self.me,
                        "a member" if self.joining else "the leader, or the nodes of a new cluster,",
                        "can be added" if self.joining else "votes: its data dir is empty", len(answers))
        return verdict

    def _refusal(self, answers: list[dict[str, Any]]) -> _Verdict | None:
        again = (f"node {self.me} took part in this cluster before, and its data dir is empty now: it may have "
                 f"voted in a term it would vote in again. Remove it (`zraft member remove {self.me}`) and add it "
                 "back as a new member with a new id (`zraft member add ID ...`, then `zraft node --id ID --join`)")
        for rep in answers:
            me = next((m for m in rep["members"] if isinstance(m, dict) and m.get("id") == self.me), None)
            if rep.get("explicit") and me is not None and me.get("seen"):
                return _Verdict(refuse=again)
        return None

    def _join(self, answers: list[dict[str, Any]]) -> _Verdict | None:
        for rep in answers:
            peers = [NodeAddress(m["id"], m["ip"], m["port"], m["client_port"], m["http_port"])
                     for m in rep["members"] if isinstance(m, dict) and m.get("ip")]
            if peers:
                return _Verdict(peers=peers, why="joining: waiting for the leader to add it")
        return None

    def _probation(self, answers: list[dict[str, Any]]) -> _Verdict | None:
        for rep in answers:
            if rep.get("leader") == rep.get("id") and rep.get("explicit"):
                if all(m.get("id") != self.me for m in rep["members"]):
                    return _Verdict(refuse=f"node {self.me} is not a member of this cluster (removed?); to take "
                                           "part, add it as a new member and start it with --join")
                return _Verdict(why="the leader has never seen this id take part: it votes from now on")
        if answers and not any(rep.get("explicit") for rep in answers):
            return _Verdict(why="a new cluster (no configuration written yet): it votes from now on")
        return None


def _describe_membership(m: Membership) -> str:
    voters = ", ".join(str(i) for i in sorted(m.voters)) or "none"
    learners = ", ".join(str(i) for i in sorted(m.learners))
    return f"voters {voters}" + (f"; learners {learners}" if learners else "")


def _command(req: Request) -> bytes:
    if req.op == "put":
        if req.lease:
            return encode_put_lease(req.key, req.value or b"", req.lease, req.session)
        return encode_put(req.key, req.value, req.session)
    if req.op == "delete":
        return encode_delete(req.key, req.session)
    if req.op == "txn":
        assert req.txn is not None
        return encode_txn(*req.txn, req.session)
    if req.op in protocol.LEASE_OPS:
        op = {"lease_grant": LEASE_GRANT, "lease_keepalive": LEASE_KEEPALIVE, "lease_revoke": LEASE_REVOKE}[req.op]
        lease = req.lease or random.SystemRandom().randrange(1, 1 << 63)  # (the leader picks a grant's id)
        return encode_lease_op(op, lease, req.ttl, req.session)
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
             log_level: str = "INFO", allow_faults: bool = False, keys: KeyRing | None = None,
             join: bool = False) -> None:
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
        if fresh and ran_here_before and not join:
            log.warning("node %d: %s holds no data: it asks the cluster whether this id took part before "
                        "(then it refuses to vote again: remove it and add it back as a new member)", node_id, db_dir)
        server = NodeServer(cluster, node_id, storage, settings, allow_faults, keys, join=join,
                            probation=fresh)
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
