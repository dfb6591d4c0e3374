"""Client requests a node has taken and not answered yet, and their deadlines.

A write waits for its log entry to be applied. It is known by the entry's index *and term*: after
a leader loses its term, a later leader (it again, perhaps) may put another write at the same index.
When the entry at an index is applied, the write proposed with that entry's term gets its result
and any other write that waited on that index learns it was never committed (``not_leader``: it
did not take effect). A write whose deadline passes first gets ``timeout`` (outcome unknown).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

Envelope = list[bytes]  # the ROUTER routing frames of one client request, echoed on the reply


@dataclass(slots=True)
class PendingRead:
    envelope: Envelope
    request: Any  # the read (zraft.client.protocol.Request: a get or a range)


class PendingRequests:
    def __init__(self) -> None:
        self.writes: dict[int, dict[int, Envelope]] = {}  # index -> term -> the client waiting
        self.reads: dict[int, PendingRead] = {}
        self.n_writes = 0
        self._next_read = 0
        # (deadline, index, term) for a write, (deadline, -1, read id) for a read; deadlines never go back.
        self._deadlines: deque[tuple[float, int, int]] = deque()

    def add_writes(self, first_index: int, term: int, envelopes: list[Envelope], deadline: float) -> None:
        """Writes proposed together, at consecutive indexes from ``first_index``, in ``term``."""
        for i, envelope in enumerate(envelopes):
            self.writes.setdefault(first_index + i, {})[term] = envelope
            self._deadlines.append((deadline, first_index + i, term))
        self.n_writes += len(envelopes)

    def __len__(self) -> int:
        """How many requests wait."""
        return self.n_writes + len(self.reads)

    def add_read(self, envelope: Envelope, request: Any, deadline: float) -> int:
        rid = self._next_read
        self._next_read += 1
        self.reads[rid] = PendingRead(envelope, request)
        self._deadlines.append((deadline, -1, rid))
        return rid

    def applied(self, index: int, term: int) -> list[tuple[Envelope, bool]]:
        """The writes that waited on the entry (index, term), now applied: each with True if it is its
        entry, False if another leader's entry took the index (it was never committed)."""
        waiting = self.writes.pop(index, None)
        if not waiting:
            return []
        self.n_writes -= len(waiting)
        return [(envelope, t == term) for t, envelope in waiting.items()]

    def take_read(self, rid: int) -> PendingRead | None:
        return self.reads.pop(rid, None)

    def expired(self, now: float) -> list[tuple[Envelope, bool]]:
        """Requests whose deadline passed, each with True for a write, False for a read."""
        out = []
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            _, index, ident = dl.popleft()
            if index < 0:
                read = self.reads.pop(ident, None)
                if read is not None:
                    out.append((read.envelope, False))
                continue
            waiting = self.writes.get(index)
            envelope = waiting.pop(ident, None) if waiting else None
            if envelope is not None:
                out.append((envelope, True))
                self.n_writes -= 1
                if not waiting:
                    del self.writes[index]
        return out

    def drain(self) -> tuple[list[Envelope], list[Envelope]]:
        """Every request still waiting (writes, reads), forgotten (the node is shutting down)."""
        writes = [e for by_term in self.writes.values() for e in by_term.values()]
        reads = [r.envelope for r in self.reads.values()]
        self.writes, self.reads = {}, {}
        self.n_writes = 0
        self._deadlines.clear()
        return writes, reads
