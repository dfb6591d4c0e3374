"""Watches waiting on a node for the events of their keys (the ``watch`` op's long poll).

A waiting watch costs the loop nothing per turn: it sits in two indexes, by exact key and by key
prefix (the distinct prefix lengths in use are kept, so matching an event looks up one dict entry
per length, not one per watch), and in a deadline heap that the loop looks at only when its head
is due. When an apply brings events, each is matched against the indexes and the watches it wakes
are answered from the history (zraft.node.statemachine.KVStateMachine.watch_events), which holds
everything from their start revision on: an event is never delivered from memory, so nothing is
missed or given twice, whatever batching or snapshot came between.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from zraft.node.requests import Envelope


@dataclass(slots=True)
class Watch:
    envelope: Envelope
    start: bytes
    end: bytes | None  # [start, end): a key's watch has end = key + b"\0", a prefix's its prefix's end
    start_revision: int
    deadline: float
    id: int = 0
    done: bool = False


@dataclass(slots=True)
class _Prefixed:
    """Prefix watches, by their prefix."""

    by_start: dict[bytes, set[int]] = field(default_factory=dict)
    lengths: dict[int, int] = field(default_factory=dict)  # start length -> how many starts have it


class WatchHub:
    def __init__(self) -> None:
        self.watches: dict[int, Watch] = {}
        self._ids = itertools.count(1)
        self._by_key: dict[bytes, set[int]] = {}  # single-key watches
        self._ranges = _Prefixed()  # prefix watches
        self._deadlines: list[tuple[float, int]] = []

    def __len__(self) -> int:
        return len(self.watches)

    def add(self, w: Watch) -> None:
        w.id = next(self._ids)
        self.watches[w.id] = w
        if w.end == w.start + b"\0":
            self._by_key.setdefault(w.start, set()).add(w.id)
        else:
            r = self._ranges
            ids = r.by_start.setdefault(w.start, set())
            if not ids:
                r.lengths[len(w.start)] = r.lengths.get(len(w.start), 0) + 1
            ids.add(w.id)
        heapq.heappush(self._deadlines, (w.deadline, w.id))

    def remove(self, w: Watch) -> None:
        if self.watches.pop(w.id, None) is None:
            return
        w.done = True
        if w.end == w.start + b"\0":
            _discard(self._by_key, w.start, w.id)
        else:
            r = self._ranges
            if _discard(r.by_start, w.start, w.id):
                n = r.lengths[len(w.start)] - 1
                if n:
                    r.lengths[len(w.start)] = n
                else:
                    del r.lengths[len(w.start)]

    def woken(self, keys: Iterable[bytes]) -> list[Watch]:
        """The watches an event on any of ``keys`` concerns (each once)."""
        found: dict[int, Watch] = {}
        watches, by_key, r = self.watches, self._by_key, self._ranges
        for key in keys:
            for wid in by_key.get(key, ()):
                found[wid] = watches[wid]
            for n in r.lengths:
                if n <= len(key):
                    for wid in r.by_start.get(key[:n], ()):  # (a prefix watch: its range is its prefix's)
                        found[wid] = watches[wid]
        return list(found.values())

    def expired(self, now: float) -> list[Watch]:
        """The watches whose deadline passed (they are answered with no events)."""
        out = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, wid = heapq.heappop(heap)
            w = self.watches.get(wid)
            if w is not None:
                out.append(w)
        return out

    def all(self) -> list[Watch]:
        return list(self.watches.values())


def _discard(index: dict[bytes, Any], key: bytes, wid: int) -> bool:
    """Take ``wid`` out of ``index[key]``; True if that emptied it."""
    ids = index.get(key)
    if ids is None:
        return False
    ids.discard(wid)
    if not ids:
        del index[key]
        return True
    return False
