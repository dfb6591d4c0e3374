"""Streaming a snapshot from the leader to one follower, sans-I/O.

The core only decides *that* a follower needs a snapshot (it emits an
:class:`~zraft.raft.messages.InstallSnapshot` in ``Ready.snapshot_requests``) and, on the follower, *whether*
to take a complete one (the driver steps an ``InstallSnapshot`` in once every chunk
has arrived). Moving the state machine's contents is the drivers' business, done by
the two state machines here, so that the node server and the simulation run the same
protocol:

* :class:`SnapshotSender` (leader) cuts the state into chunks as it goes, keeps at
  most ``window`` of them unacknowledged (bounded memory: the rest is not even read
  yet), resends from the first unacknowledged one when acknowledgements stop coming
  (go-back-N), and gives up after a while, so the core can probe and ask again.
* :class:`SnapshotReceiver` (follower) takes chunks strictly in order, one stream at a
  time, and acknowledges cumulatively. The driver writes each chunk's records into a
  staging area beside the live state; only when the core accepts the complete
  snapshot does the driver switch to it, in one atomic write. A chunk of a stream the
  receiver does not know (it restarted mid-install, say) is refused, naming the chunk;
  if that chunk was sent (or resent) after the receiver had acknowledged part of the
  stream, the receiver lost the stream and the sender fails at once rather than time
  out. (A refusal of a chunk sent only before may just answer a chunk that overtook the
  first one: the sender goes on, resending, until the next refusal or the give-up.)
  While a complete stream waits for the core's verdict (between ``complete`` and
  :meth:`SnapshotReceiver.finish`), no other stream may begin: the staged state is the
  one the core is deciding on.

Time is counted in ticks, like the core's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from zraft.raft.messages import InstallSnapshot, SnapshotAck, SnapshotChunk

SENDING, DONE, FAILED = "sending", "done", "failed"
RECENT_STREAMS = 16  # how many stream ids a receiver remembers, to refuse late copies of their first chunk


class SnapshotSender:
    """The leader's side of one snapshot stream to one follower."""

    def __init__(self, *, stream: int, term: int, src: int, dst: int, index: int, snap_term: int,
                 chunks: Iterator[bytes], window: int = 4, retry_ticks: int = 4, give_up_ticks: int = 100) -> None:
        self.stream, self.term, self.src, self.dst = stream, term, src, dst
        self.index, self.snap_term = index, snap_term
        self.window = max(1, window)
        self.retry_ticks = max(1, retry_ticks)
        self.give_up_ticks = max(self.retry_ticks + 1, give_up_ticks)
        self._chunks = chunks
        self._ahead: bytes | None = next(chunks, None)  # one chunk read ahead: is the current one the last?
        self._next_seq = 0
        self.acked = -1  # every chunk up to this one is acknowledged
        self._sent_after_ack = -1  # chunks from this one on were first sent after the first acknowledgement
        self._resent_after_ack = False  # the unacknowledged chunks went out again after it
        self.unacked: deque[SnapshotChunk] = deque()
        self.idle_ticks = 0
        self.state = SENDING
        self.chunks_sent = 0  # including resends
        self.bytes_sent = 0

    def _make(self) -> SnapshotChunk:
        data = self._ahead if self._ahead is not None else b""
        self._ahead = next(self._chunks, None)
        last = self._ahead is None
        c = SnapshotChunk(self.term, self.src, self.dst, self.stream, self._next_seq, data, last,
                          self.index if last else 0, self.snap_term if last else 0)
        self._next_seq += 1
        return c

    def _out(self, chunks: list[SnapshotChunk]) -> list[SnapshotChunk]:
        self.chunks_sent += len(chunks)
        self.bytes_sent += sum(len(c.data) for c in chunks)
        return chunks

    def pump(self) -> list[SnapshotChunk]:
        """New chunks that the window has room for (the first call starts the stream)."""
        out: list[SnapshotChunk] = []
        while self.state == SENDING and len(self.unacked) < self.window and (
                not self.unacked or not self.unacked[-1].last):
            c = self._make()
            self.unacked.append(c)
            out.append(c)
        return self._out(out)

    def on_ack(self, ack: SnapshotAck) -> list[SnapshotChunk]:
        """Take an acknowledgement; returns the chunks that may go out now."""
        if self.state != SENDING or ack.stream != self.stream or ack.src != self.dst:
            return []
        if not ack.ok:
            # The receiver does not know this stream. If it refuses a chunk first sent after it had
            # acknowledged some of the stream, it lost the stream (it restarted, or another stream replaced
            # it): give up now. Otherwise the refusal may answer a chunk that overtook the first one, or
            # come from a receiver busy with another stream: go on (the retries resend) until the give-up.
            # (A resend after the first acknowledgement counts too, unless the refusal took longer than a
            # retry interval to come back.)
            if self.acked >= 0 and (self._sent_after_ack <= ack.seq
                                    or (self._resent_after_ack and ack.seq > self.acked)):
                self.state = FAILED
            return []
        progressed = False
        while self.unacked and self.unacked[0].seq <= ack.seq:
            c = self.unacked[0]
            if c.last and not ack.done:
                break  # the last chunk counts only once the follower has decided
            self.unacked.popleft()
            if self.acked < 0:
                self._sent_after_ack = self._next_seq
            self.acked = c.seq
            progressed = True
        if ack.done and ack.seq >= self._next_seq - 1 and self._ahead is None and not self.unacked:
            self.state = DONE
            return []
        if progressed:
            self.idle_ticks = 0
        return self.pump()

    def tick(self) -> list[SnapshotChunk]:
        """One tick without news: maybe resend from the first unacknowledged chunk, maybe give up."""
        if self.state != SENDING:
            return []
        self.idle_ticks += 1
        if self.idle_ticks >= self.give_up_ticks:
            self.state = FAILED
            return []
        if self.idle_ticks % self.retry_ticks == 0:
            self._resent_after_ack = self._resent_after_ack or (self.acked >= 0 and bool(self.unacked))
            return self._out(list(self.unacked))
        return []


@dataclass(slots=True)
class ChunkVerdict:
    """What the driver does with one received chunk, in this order."""

    begin: bool = False  # a new stream starts: throw away whatever is staged
    data: bytes | None = None  # records to add to the staged state
    complete: InstallSnapshot | None = None  # every chunk is in: step this into the core
    reply: SnapshotAck | None = None  # send this now


class SnapshotReceiver:
    """The follower's side: one stream at a time, chunks strictly in order."""

    def __init__(self, me: int) -> None:
        self.me = me
        self.src = 0  # the current stream: sender and id (0, 0: none)
        self.stream = 0
        self.term = 0
        self.expected = 0  # next sequence number wanted
        self.completed = False  # every chunk arrived; waiting for (or past) the core's verdict
        self.finished = False  # the core decided; the last chunk has been acknowledged as done
        # Streams begun lately: a late duplicate of one's first chunk must not begin it again (and
        # throw away the stream in progress). Stream ids are unique, so a stream never starts twice.
        self._begun: deque[tuple[int, int]] = deque(maxlen=RECENT_STREAMS)

    @property
    def active(self) -> bool:
        return self.stream != 0 and not self.finished

    @property
    def awaiting_verdict(self) -> bool:
        """Every chunk is in and stepped into the core; its next Ready decides, then :meth:`finish`."""
        return self.completed and not self.finished

    def _ack(self, c: SnapshotChunk, seq: int, ok: bool = True, done: bool = False) -> SnapshotAck:
        return SnapshotAck(c.term, self.me, c.src, c.stream, seq, ok, done)

    def on_chunk(self, c: SnapshotChunk, current_term: int) -> ChunkVerdict:
        if c.term < current_term:
            return ChunkVerdict()  # from a deposed leader: nothing to say to it
        same = c.src == self.src and c.stream == self.stream
        if not same:
            if (c.seq != 0 or (self.active and c.term < self.term) or (self.completed and not self.finished)
                    or (c.src, c.stream) in self._begun):
                # Not the start of a stream; or a stream of an older term than the one in progress; or the
                # core is deciding on a complete stream, whose staged state must stay as it is till finish();
                # or a late copy of the first chunk of a stream that was here before. The refusal names
                # the chunk (see SnapshotSender.on_ack).
                return ChunkVerdict(reply=self._ack(c, c.seq, ok=False))
            self._begun.append((c.src, c.stream))
            self.src, self.stream, self.term = c.src, c.stream, c.term
            self.expected, self.completed, self.finished = 0, False, False
            return self._take(c, ChunkVerdict(begin=True))
        if self.finished:
            return ChunkVerdict(reply=self._ack(c, self.expected - 1, done=True))
        if c.seq != self.expected or self.completed:
            # A duplicate or a gap: say what we have, the sender goes back to it.
            return ChunkVerdict(reply=self._ack(c, self.expected - 1))
        return self._take(c, ChunkVerdict())

    def _take(self, c: SnapshotChunk, v: ChunkVerdict) -> ChunkVerdict:
        self.expected = c.seq + 1
        v.data = c.data
        if c.last:
            self.completed = True
            v.complete = InstallSnapshot(c.term, c.src, self.me, c.index, c.snap_term)
        else:
            v.reply = self._ack(c, c.seq)
        return v

    def finish(self) -> SnapshotAck | None:
        """The core has taken (or refused) the completed snapshot: acknowledge the last chunk."""
        if not self.completed or self.finished:
            return None
        self.finished = True
        return SnapshotAck(self.term, self.me, self.src, self.stream, self.expected - 1, True, True)

    def abandon(self) -> None:
        """Forget the current stream (the staged state was thrown away)."""
        self.src = self.stream = self.term = self.expected = 0
        self.completed = self.finished = False
