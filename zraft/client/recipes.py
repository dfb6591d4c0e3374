"""Locks and leader election on leases, transactions and watches (etcd's ``concurrency`` package).

    with client.lock("jobs/nightly", ttl=10) as lock:
        ...                        # one holder at a time; check lock.held before acting on a lost lease

    election = client.election("scheduler")
    election.campaign(b"node-7")   # blocks until this one leads
    election.leader()              # (key, value) of the leader, or None
    election.resign()

Both are fair. Each contender writes one key under ``PREFIX/`` (its name is its lease's id), attached
to its lease, once: the order of those keys' create revisions is the queue. The first in the queue
holds the lock (leads); each other contender watches the key just before its own for a delete (its
holder released, resigned, or its lease expired), then looks again. Nobody polls, and a release
wakes one waiter, not all of them. A contender that dies lets its lease expire: its key goes after
the TTL and the queue moves on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from zraft.client import protocol, txn
from zraft.client.client import ZraftError
from zraft.client.lease import Lease

if TYPE_CHECKING:
    from zraft.client.client import Client


class _Queue:
    """One contender's place in the queue under ``prefix``: its key, written once with its lease."""

    def __init__(self, client: Client, prefix: bytes, ttl: int, lease: Lease | None = None) -> None:
        self.client = client
        self.prefix = prefix.rstrip(b"/") + b"/"
        self.ttl = ttl
        self.lease = lease
        self._own_lease = lease is None
        self.key = b""
        self.revision = 0  # the create revision of our key: our place in the queue

    def enter(self, value: bytes = b"") -> None:
        """Write our key (once: a retry finds it there). A lease of our own that expired before we could
        use it (a failover longer than its TTL) is replaced by a new one, once."""
        for attempt in (1, 2):
            if self.lease is None:
                self.lease = Lease(self.client, self.ttl)
            self.key = self.prefix + b"%016x" % self.lease.id
            try:
                r = (self.client.txn().when(txn.create_revision(self.key) == 0)
                     .then(txn.put(self.key, value, lease=self.lease.id))
                     .otherwise(txn.get(self.key)).commit())
            except ZraftError as exc:
                if exc.code != protocol.LEASE_NOT_FOUND or attempt == 2 or not self._own_lease:
                    raise
                self.lease.revoke()
                self.lease = None
                continue
            self.revision = r.revision if r.succeeded else self.client.get_meta(self.key)["create_revision"]
            return

    def queue(self) -> tuple[list[tuple[int, bytes, bytes]], int]:
        """Everyone in the queue as (create revision, key, value), first first, and the revision read at.
        (Each key is written once, so its mod revision is its create revision.)"""
        kvs, revision = [], 0
        for r in self.client.range_pages(self.prefix):
            kvs += [(rev, k, v) for k, v, rev in r.kvs]
            revision = revision or r.revision
        return sorted(kvs), revision

    def take_turn(self, value: bytes = b"") -> None:
        """Join the queue and block until first in it (on any failure, leave it)."""
        self.enter(value)
        try:
            self.wait_first()
        except BaseException:
            self.leave()
            raise

    @property
    def holding(self) -> bool:
        """In the queue, with the lease alive (first in it, once take_turn has returned)."""
        return bool(self.key) and self.lease is not None and self.lease.alive

    def wait_first(self) -> None:
        """Block until our key is the first of the queue."""
        while True:
            queue, revision = self.queue()
            ahead = [item for item in queue if item[0] < self.revision]
            if not any(k == self.key for _, k, _ in queue):
                raise LockLost(f"our key {self.key!r} is gone: the lease expired")
            if not ahead:
                return
            self._wait_deleted(ahead[-1][1], revision + 1)

    def _wait_deleted(self, key: bytes, start_revision: int) -> None:
        with self.client.watch(key=key, start_revision=start_revision, poll_s=max(1.0, self.ttl / 2)) as w:
            while True:
                if any(ev["type"] == "delete" for ev in w.poll()):
                    return
                if self.lease is not None and not self.lease.alive:
                    raise LockLost("our lease expired while we waited")

    def leave(self) -> None:
        if self.key:
            try:
                self.client.delete(self.key)
            finally:
                self.key = b""
        if self.lease is not None and self._own_lease:
            self.lease.revoke()
            self.lease = None


class LockLost(Exception):
    """The lease behind a lock or a candidacy expired: whatever it guarded may be someone else's now."""


class Lock:
    """A fair, distributed mutex (etcd's concurrency.Mutex) under ``locks/NAME``, held while its lease
    lives. Use it as a context manager; ``held`` turns false if the lease is lost meanwhile."""

    def __init__(self, client: Client, name: bytes | str, ttl: int = 10) -> None:
        name = name.encode() if isinstance(name, str) else name
        self._q = _Queue(client, b"locks/" + name, ttl)

    def acquire(self) -> None:
        self._q.take_turn()

    def release(self) -> None:
        self._q.leave()

    @property
    def held(self) -> bool:
        return self._q.holding

    @property
    def key(self) -> bytes:
        return self._q.key

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Election:
    """Leader election under ``elections/NAME`` (etcd's concurrency.Election): the first candidate in the
    queue leads, with the value it campaigned with."""

    def __init__(self, client: Client, name: bytes | str, ttl: int = 10) -> None:
        name = name.encode() if isinstance(name, str) else name
        self.client = client
        self._q = _Queue(client, b"elections/" + name, ttl)

    def campaign(self, value: bytes | str) -> None:
        """Stand, and block until this candidate leads."""
        self._q.take_turn(value.encode() if isinstance(value, str) else value)

    def resign(self) -> None:
        self._q.leave()

    @property
    def leading(self) -> bool:
        return self._q.holding

    def leader(self) -> tuple[bytes, bytes] | None:
        """The leader's (key, value), or None if nobody stands."""
        queue, _ = self._q.queue()
        return (queue[0][1], queue[0][2]) if queue else None

    def observe(self) -> Iterator[bytes | None]:
        """The leader's value each time the leader (or its value) changes, None while nobody leads; forever."""
        last: object = object()
        while True:
            queue, revision = self._q.queue()
            now = queue[0][2] if queue else None
            if now != last:
                last = now
                yield now
            with self.client.watch(prefix=self._q.prefix, start_revision=revision + 1) as w:
                while not w.poll():
                    pass
