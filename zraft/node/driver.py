"""The driver: the one implementation of the Raft core's Ready contract (zraft/raft/core.py).

A :class:`Driver` owns a :class:`~zraft.raft.core.RaftNode` and works it against the small
interfaces of zraft.node.interfaces: storage (its log room and state room), a state machine,
a transport and, with async storage, a log writer. The node server (zraft.node.server) and
the deterministic simulation (tests/sim) both run this class, so every seed of the simulation
tests the code that runs in production; each brings only what is its own: the server its
sockets, clients and clock, the simulation its scheduler, network, faults and checkers.

The events a driver takes, each followed by :meth:`Driver.process` (one turn):

* :meth:`receive`: peer messages. Raft messages go to the core; snapshot chunks and their
  acknowledgements are the driver's own (zraft.raft.snapshot); an InstallSnapshot is never
  taken from the wire: only the driver's receiver makes one, once a whole stream is staged.
* :meth:`tick`: one unit of logical time, for the core and the snapshot streams.
* :meth:`propose` and :meth:`read_index`: client writes and linearizable reads.
* :meth:`writes_done`: (async storage) the log writer finished some writes.

What the driver reports back goes through :class:`DriverEvents`: entries applied with their
results, reads now safe to serve (or that cannot be served here), leadership changes.

One turn, per Ready (the contract, in the order it asks for):

0. a snapshot the core took: the staged state becomes the state machine and the log begins
   after it, in the same atomic, durable write as step 1 (or the staged state is thrown away);
1. hard state and entries are written durably (inline, or queued to the log writer, which
   writes Readys in order; then everything below waits until that write, and every earlier
   one, is durable, and the core hears of it through ``persisted``);
2. messages are sent; a leader's may go out before its own write (thesis 10.2.1) when the
   Ready changes neither the term nor the vote nor the log's start;
3. committed entries are applied, the log compacted once long enough, snapshot streams
   started for followers that need one, and reads answered once applied reaches their index.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zraft.node.interfaces import LogWriter, SnapshotView, StateMachine, Storage, Transport
from zraft.raft.confchange import Membership
from zraft.raft.core import RaftConfig, RaftNode, Ready, Role
from zraft.raft.log import RaftLog
from zraft.raft.messages import (
    AppendEntries,
    Entry,
    EntryType,
    InstallSnapshot,
    Message,
    SnapshotAck,
    SnapshotChunk,
    StreamMessage,
)
from zraft.raft.snapshot import DONE, FAILED, SENDING, SnapshotReceiver, SnapshotSender

log = logging.getLogger(__name__)


@dataclass
class DriverConfig:
    """The driver's policies (the node takes them from Settings; the simulation from its seed)."""

    snapshot_threshold: int = 10_000  # compact once the log holds this many applied entries (0: never)
    snapshot_keep: int = 5_000  # applied entries kept after a compaction, for followers a little behind
    snapshot_log_bytes: int = 64 << 20  # ... or once the entries' data in the log passes this (0: no bound)
    snapshot_chunk_bytes: int = 256 << 10
    snapshot_window: int = 4  # chunks in flight per snapshot stream
    snapshot_retry_ticks: int = 10  # resend unacknowledged chunks after this many ticks without progress
    snapshot_give_up_ticks: int = 100  # ... and give up after this many (the core asks again later)
    receive_idle_ticks: int = 300  # a stream we receive, silent this long, is dropped (senders give up sooner)
    gc_keys_per_turn: int = 2000  # dead state machine keys deleted per turn
    early_send: bool = True  # a leader sends before its own write when nothing it sends depends on it


class DriverEvents:
    """What a driver reports to the layer above it. Every method does nothing unless overridden."""

    def applied(self, entries: list[Entry], results: list[Any]) -> None:
        """Committed entries were applied, in order, with the state machine's result for each."""

    def read_ready(self, request_id: Any, index: int) -> None:
        """A read may be served now: the state machine has applied ``index``, its ReadIndex."""

    def read_dropped(self, request_id: Any) -> None:
        """A read cannot be served here (this node is not, or no longer, the leader)."""

    def role_changed(self, role: Role, term: int, leader: int | None) -> None:
        """The node's role, term or known leader changed."""

    def membership_changed(self, membership: Membership) -> None:
        """The latest configuration changed (an entry appended or replaced, or a snapshot taken in)."""

    def state_replaced(self) -> None:
        """A snapshot replaced the state machine's state (its data, history and applied index)."""


@dataclass(slots=True)
class _Outgoing:
    sender: SnapshotSender
    view: SnapshotView
    started: float


def new_raft_node(config: RaftConfig, storage: Storage, rng: random.Random | None = None,
                  bootstrap: Membership | None = None) -> RaftNode:
    """A core restarted from what ``storage`` holds: hard state, the log, the applied index and the
    membership (the stored state machine's, else ``bootstrap``, else ``config.voters``; a
    configuration entry in the log comes after either and wins)."""
    persisted = storage.log.load_log()
    raft_log = RaftLog(persisted.entries, persisted.snapshot_index, persisted.snapshot_term,
                       applied=storage.state.applied_index)
    stored = storage.state.membership
    membership = Membership.decode(stored) if stored is not None else bootstrap
    return RaftNode(config, storage.log.load_hard_state(), raft_log, rng, membership)


class Driver:
    def __init__(self, raft: RaftNode, storage: Storage, sm: StateMachine, transport: Transport,
                 events: DriverEvents | None = None, config: DriverConfig | None = None,
                 writer: LogWriter | None = None, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic, stats: dict[str, int] | None = None,
                 check_command: Callable[[bytes], str | None] | None = None) -> None:
        if raft.config.async_storage != (writer is not None):
            raise ValueError("async storage needs a log writer, and a log writer needs async storage")
        self.raft = raft
        self.id = raft.id
        self.storage = storage
        self.sm = sm
        self.transport = transport
        self.events = events or DriverEvents()
        self.config = config or DriverConfig()
        self.writer = writer
        self._ids = rng or random.Random()  # snapshot stream ids: unique across restarts
        self.clock = clock
        # Counters for status and tests; a shared dict may be given (the simulation sums all nodes).
        self.stats = stats if stats is not None else {}
        for key in _STATS:
            self.stats.setdefault(key, 0)
        self.role, self.term, self.leader = raft.role, raft.term, raft.leader
        # Readys whose writes are in flight (async storage): (write sequence number, Ready, messages to send).
        self.waiting: deque[tuple[int, Ready, list[Message]]] = deque()
        self._reads: list[tuple[Any, int]] = []  # (request id, index): confirmed, waiting for the state machine
        self.outgoing: dict[int, _Outgoing] = {}  # peer -> the snapshot stream to it
        self.receiver = SnapshotReceiver(self.id)
        self._receive_idle = 0  # ticks since the last chunk of the stream being received
        # Why a normal entry's data is not a command the state machine would make (None: it is one).
        self.check_command = check_command
        self._last_reject_log = -1e18

    # ------------------------------------------------------------------ events in

    def receive(self, messages: list[Message | StreamMessage]) -> None:
        """Peer messages, decoded, checked and addressed to this node (zraft.node.transport)."""
        raft = self.raft
        for m in messages:
            if isinstance(m, SnapshotChunk):
                self._on_chunk(m)
            elif isinstance(m, SnapshotAck):
                self._on_snapshot_ack(m)
            elif isinstance(m, InstallSnapshot):
                # Only this driver's receiver makes one, once a whole stream is staged: from the wire it
                # would make the core take a state that storage never got.
                self._reject("install_snapshot_from_wire", m, "an InstallSnapshot off the wire")
            elif isinstance(m, AppendEntries) and not self._commands_ok(m):
                continue
            else:
                raft.step(m)

    def _commands_ok(self, m: AppendEntries) -> bool:
        """Entries from the network are checked as client requests are: a bad one drops the message."""
        check = self.check_command
        for e in m.entries:
            why = None
            if e.type == EntryType.CONFIG:
                try:
                    Membership.decode(e.data)
                except ValueError as exc:
                    why = str(exc)
            elif e.data and check is not None:
                why = check(e.data)
            if why is not None:
                self._reject("bad_entry", m, f"entry {e.index}: {why}")
                return False
        return True

    def _reject(self, reason: str, m: object, why: str) -> None:
        self.stats["rejected_" + reason] = self.stats.get("rejected_" + reason, 0) + 1
        now = self.clock()
        if now - self._last_reject_log >= 5.0:  # every one is counted; one warning at most every 5 s
            self._last_reject_log = now
            log.warning("node %d: dropped %s from node %s: %s", self.id, type(m).__name__, getattr(m, "src", "?"),
                        why[:200])

    def tick(self) -> None:
        self.raft.tick()
        self._tick_snapshots()

    def propose(self, commands: list[bytes]) -> int | None:
        """Append commands on the leader; the index of the first, or None when not the leader."""
        return self.raft.propose(commands)

    def read_index(self, request_ids: list[Any]) -> None:
        self.raft.read_index(request_ids)

    def writes_done(self) -> None:
        """(async storage) Release what waited for the writes that are durable now."""
        assert self.writer is not None
        self._release(self.writer.completed())

    def process(self) -> None:
        """Handle every Ready the core has; then one bounded step of garbage collection."""
        raft = self.raft
        while raft.has_ready():
            self._handle_ready(raft.ready())
        state = self.storage.state
        if state.has_garbage:
            state.collect_garbage(self.config.gc_keys_per_turn)

    def compact_now(self) -> int:
        """Compact the log up to the applied index now; the index the log begins after."""
        return self._maybe_compact(force=True)

    def close(self) -> None:
        """Release the views of snapshot streams still running."""
        for out in self.outgoing.values():
            out.view.close()
        self.outgoing.clear()

    # ------------------------------------------------------------------ the Ready contract

    def _handle_ready(self, rd: Ready) -> None:
        self._notify(rd)
        deciding = self.receiver.awaiting_verdict  # a complete snapshot was stepped in: this Ready decides
        # A leader's appends don't depend on its own write (thesis 10.2.1); votes and acknowledgements
        # do, and a new term must be durable before anything is sent in it.
        send_first = (self.config.early_send and rd.role is Role.LEADER and rd.hard_state is None
                      and rd.snapshot is None and not deciding)
        if send_first:
            self.transport.send(rd.messages)
        rest = [] if send_first else rd.messages
        writer = self.writer
        if writer is not None:
            if not (deciding or rd.snapshot is not None):
                if rd.hard_state is not None or rd.entries:
                    self.waiting.append((writer.submit(rd.hard_state, rd.entries), rd, rest))
                    return
                if self.waiting:  # nothing of its own to write, but it may depend on what is in flight
                    self.waiting.append((writer.submitted, rd, rest))
                    return
            elif self.waiting:  # a snapshot is installed once every earlier write is durable
                self.stats["drains"] += 1
                self._release(writer.wait(writer.submitted), compact=False)
            writer.check()
        self._write(rd, deciding)
        mark = rd.persist_mark
        if writer is not None and mark is not None:
            self.raft.persisted(*mark)
        self._finish(rd, rest)
        if deciding:
            self.transport.send([self.receiver.finish()])  # the "done" ack, after this Ready's own messages

    def _notify(self, rd: Ready) -> None:
        if rd.role is not self.role or rd.term != self.term or rd.leader != self.leader:
            self.role, self.term, self.leader = rd.role, rd.term, rd.leader
            self.events.role_changed(rd.role, rd.term, rd.leader)
        if rd.membership is not None:
            for peer in [p for p in self.outgoing if p not in rd.membership]:
                self._end_snapshot(peer, None, report=False)  # no longer a member: the core dropped its Progress
            self.events.membership_changed(rd.membership)

    def _write(self, rd: Ready, deciding: bool) -> None:
        """Steps 0 and 1: install (or throw away) the staged snapshot, and write hard state and entries."""
        if rd.snapshot is not None:
            if not deciding:
                raise AssertionError(f"node {self.id}: the core took a snapshot no stream staged: {rd.snapshot}")
            self.storage.install_snapshot(rd.snapshot, rd.hard_state, rd.entries)
            self.sm.reload()
            self.events.state_replaced()
            self.stats["snap_installed"] += 1
            self.stats["snap_reset_log"] += rd.snapshot.reset_log
            log.info("node %d: installed a snapshot at %d (term %d)", self.id, rd.snapshot.index, rd.snapshot.term)
            return
        if deciding:
            self.stats["snap_refused"] += 1
            log.info("node %d: snapshot not needed (commit index %d); discarded", self.id, rd.commit_index)
            self.storage.state.discard_staged()
        self.storage.log.save(rd.hard_state, rd.entries)

    def _release(self, durable: int, compact: bool = True) -> None:
        """Finish the Readys whose writes (and every earlier one's) are durable up to ``durable``."""
        waiting = self.waiting
        while waiting and waiting[0][0] <= durable:
            _, rd, msgs = waiting.popleft()
            mark = rd.persist_mark
            if mark is not None:
                self.raft.persisted(*mark)
            self._finish(rd, msgs, compact)

    def _finish(self, rd: Ready, msgs: list[Message], compact: bool = True) -> None:
        """Steps 2 and 3, once the Ready (and every earlier one) is durable."""
        if msgs:
            self.transport.send(msgs)
        if rd.committed:
            self.events.applied(rd.committed, self.sm.apply(rd.committed))
            if compact:  # (not while a snapshot that replaces the log waits)
                self._maybe_compact()
        for want in rd.snapshot_requests:
            self._start_snapshot(want)
        if rd.reads:
            self._reads.extend((rs.request_id, rs.index) for rs in rd.reads)
        for rid in rd.dropped_reads:
            self.events.read_dropped(rid)
        if self._reads:
            self._serve_reads()

    def _serve_reads(self) -> None:
        applied = self.sm.applied_index
        waiting = []
        for rid, index in self._reads:
            if index <= applied:
                self.events.read_ready(rid, index)
            else:
                waiting.append((rid, index))
        self._reads = waiting

    # ------------------------------------------------------------------ compaction

    def _maybe_compact(self, force: bool = False) -> int:
        """Drop the log up to (nearly) the applied index once it is long enough, by entries or by bytes
        (a log of large values would otherwise fill the memory long before the entry count does);
        returns the index the log begins after."""
        c = self.config
        first, applied = self.raft.log.snapshot_index, self.sm.applied_index
        by_count = c.snapshot_threshold and applied - first >= c.snapshot_threshold
        by_bytes = c.snapshot_log_bytes and self.raft.log.bytes >= c.snapshot_log_bytes and applied > first
        if not (force or by_count or by_bytes):
            return first
        if force:
            target = applied
        else:
            keep = min(c.snapshot_keep, c.snapshot_threshold - 1) if c.snapshot_threshold else c.snapshot_keep
            target = applied - keep
            if c.snapshot_log_bytes:  # and what is kept holds a quarter of the byte bound at most
                target = max(target, self._kept_within(applied, c.snapshot_log_bytes // 4))
        term = self.raft.compact(target)
        if term is None:
            return first
        self.storage.compact(target, term)  # (the applies before it become durable first)
        self.stats["compactions"] += 1
        log.info("node %d: log compacted up to %d (term %d); it now holds %d entries", self.id, target, term,
                 self.raft.log.last_index - target)
        return target

    def _kept_within(self, applied: int, budget: int) -> int:
        """The index to compact to so that the applied entries after it hold ``budget`` bytes at most."""
        raft_log = self.raft.log
        i, kept = applied, 0
        while i > raft_log.snapshot_index:
            size = len(raft_log.entries[i - raft_log.snapshot_index - 1].data)
            if kept + size > budget:
                break
            kept += size
            i -= 1
        return i

    # ------------------------------------------------------------------ snapshot streams we send

    def _start_snapshot(self, want: InstallSnapshot) -> None:
        raft = self.raft
        self.stats["snap_requests"] += 1
        if raft.role is not Role.LEADER or want.term != raft.term:
            return  # it stepped down in the same turn; its core no longer waits for an outcome
        peer = want.dst
        out = self.outgoing.get(peer)
        if out is not None:
            if out.sender.term == raft.term:
                self.stats["snap_requests_ignored"] += 1
                return  # one stream per follower at a time
            self._end_snapshot(peer, None)
        c = self.config
        view = self.storage.state.open_snapshot()
        if view.index < want.index:
            view.close()
            raise AssertionError(f"node {self.id}: a snapshot at {want.index} is asked for with only "
                                 f"{view.index} applied")
        sender = SnapshotSender(stream=self._ids.getrandbits(62) + 1, term=raft.term, src=self.id, dst=peer,
                                index=view.index, snap_term=view.term, chunks=view.chunks(c.snapshot_chunk_bytes),
                                window=c.snapshot_window, retry_ticks=c.snapshot_retry_ticks,
                                give_up_ticks=c.snapshot_give_up_ticks)
        self.outgoing[peer] = _Outgoing(sender, view, self.clock())
        self.stats["snap_streams"] += 1
        log.info("node %d: sending a snapshot at %d (term %d) to node %d", self.id, view.index, view.term, peer)
        self.transport.send(sender.pump())

    def _end_snapshot(self, peer: int, index: int | None, report: bool = True) -> None:
        out = self.outgoing.pop(peer)
        out.view.close()
        s = out.sender
        took = self.clock() - out.started
        if index is None:
            self.stats["snap_failed" if report else "snap_dropped"] += 1
            log.warning("node %d: snapshot stream to node %d %s after %.1f s (%d chunks sent)", self.id, peer,
                        "failed" if report else "dropped (no longer leader of its term)", took, s.chunks_sent)
        else:
            self.stats["snap_sent"] += 1
            log.info("node %d: snapshot at %d delivered to node %d in %.1f s (%d chunks, %d bytes)", self.id,
                     index, peer, took, s.chunks_sent, s.bytes_sent)
        if report and s.term == self.raft.term and self.raft.role is Role.LEADER:
            # A stream of an earlier term says nothing about this term's Progress of that follower.
            self.raft.report_snapshot(peer, index)

    def _on_snapshot_ack(self, ack: SnapshotAck) -> None:
        out = self.outgoing.get(ack.src)
        if out is None or out.sender.stream != ack.stream:
            return
        if self.raft.role is not Role.LEADER or out.sender.term != self.raft.term:
            return  # ended at the next tick
        self.transport.send(out.sender.on_ack(ack))
        if out.sender.state != SENDING:
            self._end_snapshot(ack.src, out.sender.index if out.sender.state == DONE else None)

    def _tick_snapshots(self) -> None:
        raft = self.raft
        for peer, out in list(self.outgoing.items()):
            if raft.role is not Role.LEADER or out.sender.term != raft.term:
                self._end_snapshot(peer, None, report=False)  # the Progress it was for is gone
                continue
            self.transport.send(out.sender.tick())
            if out.sender.state == FAILED:
                self._end_snapshot(peer, None)
        receiver = self.receiver
        if receiver.active and not receiver.completed:
            self._receive_idle += 1
            if self._receive_idle > self.config.receive_idle_ticks:
                # The leader gave up on this stream long ago (or is gone): free the staged state.
                log.warning("node %d: snapshot stream from node %d idle; staged state discarded", self.id,
                            receiver.src)
                receiver.abandon()
                self.storage.state.discard_staged()

    # ------------------------------------------------------------------ snapshot streams we receive

    def _on_chunk(self, chunk: SnapshotChunk) -> None:
        raft = self.raft
        if chunk.term != raft.term or chunk.src != raft.leader:
            # Only the leader this node follows, in its term, may replace its state. (The stream's
            # sender retries; by then this node has heard of the new term or leader, if there is one.)
            self._reject("chunk_not_from_leader", chunk,
                         f"a chunk of term {chunk.term}; this node is in term {raft.term}, leader {raft.leader}")
            return
        self._receive_idle = 0
        state = self.storage.state
        v = self.receiver.on_chunk(chunk, self.raft.term)
        if v.begin:
            log.info("node %d: receiving a snapshot from node %d", self.id, chunk.src)
            state.begin_staging()
        if v.data is not None:
            try:
                state.stage(v.data)
            except ValueError as exc:
                log.warning("node %d: dropping a malformed snapshot chunk: %s", self.id, exc)
                self.receiver.abandon()
                state.discard_staged()
                return
        if v.reply is not None:
            self.transport.send([v.reply])
        if v.complete is not None:
            config = state.staged_membership()
            if config is not None:
                v.complete.config = config
            self.raft.step(v.complete)


_STATS = ("compactions", "snap_requests", "snap_requests_ignored", "snap_streams", "snap_sent", "snap_failed",
          "snap_dropped", "snap_installed", "snap_reset_log", "snap_refused", "drains",
          "rejected_install_snapshot_from_wire", "rejected_bad_entry", "rejected_chunk_not_from_leader")
