"""A watch that resumes by itself: the ``watch`` op's long polls, one after the other.

Each poll asks one node for the events from ``next_revision`` on and waits up to ``poll_s`` for
one; its reply says up to which revision the events are complete, so the next poll starts right
after it: nothing is missed or given twice, whichever node answers (every member keeps the same
history). A node that knows no leader, or does not answer, is left for another. A history that no
longer reaches back to ``next_revision`` raises ``ZraftError("compacted")``: the watcher must read
the state again (a range) and watch from that range's revision + 1.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from zraft.client import protocol
from zraft.client.client import Client, ZraftError

if TYPE_CHECKING:
    from zraft.cluster.keys import KeyRing

_RETRIED = (protocol.UNAVAILABLE, protocol.BUSY, protocol.TIMEOUT, protocol.NOT_LEADER)


class Watcher(Iterator[dict[str, Any]]):
    """Events (``type``, ``key``, ``value``, ``revision``) in revision order, for as long as it is iterated."""

    def __init__(self, endpoints: list[str], key: bytes | str | None, prefix: bytes | str | None,
                 start_revision: int, poll_s: float = 10.0, keys: KeyRing | None = None) -> None:
        if (key is None) == (prefix is None):
            raise ValueError("watch a key or a prefix (one of them)")
        self.poll_s = poll_s
        self.next_revision = start_revision
        name, what = ("key", key) if key is not None else ("prefix", prefix)
        self._req: dict[str, Any] = {"op": "watch", name: what.encode() if isinstance(what, str) else what}
        # Its own client: a long poll holds a socket, and the caller's client stays free meanwhile.
        self._client = Client(endpoints, timeout=poll_s + 5.0, exactly_once=False, keys=keys)
        self._buffer: deque[dict[str, Any]] = deque()
        self.closed = False

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.closed = True
        self._client.close()

    def __next__(self) -> dict[str, Any]:
        while not self._buffer:
            if self.closed:
                raise StopIteration
            self._buffer.extend(self.poll())
        return self._buffer.popleft()

    def poll(self, wait_s: float | None = None) -> list[dict[str, Any]]:
        """One long poll (at most ``wait_s``, default ``poll_s``); the events it brought (use either this
        or iteration, not both). Errors that another node or a later try may not have are retried quietly."""
        wait = self.poll_s if wait_s is None else wait_s
        req = {**self._req, "start_revision": self.next_revision, "timeout": wait}
        try:
            rep = self._client._call(req, write=False, attempt_timeout=wait + 2.0)
        except ZraftError as exc:
            if exc.code not in _RETRIED:
                raise
            time.sleep(0.05)
            return []
        self.next_revision = rep["revision"] + 1
        return rep["events"]
