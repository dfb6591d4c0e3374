"""A lease kept alive in the background (etcd's ``Lease`` with ``KeepAlive``), as a context manager.

    with client.lease(ttl=10) as lease:
        client.put(b"service/worker-7", b"10.0.0.7:8080", lease=lease.id)
        ...                       # the key lives while this block runs (and the process does)
    # revoked: the key is gone

A thread sends a keepalive every third of the TTL through a client of its own (a Client's writes
are one at a time), and after a failed one (a failover) again within 0.1 s. If the lease is found
expired (the process was stopped longer than the TTL, say), ``lost`` is set and the thread stops:
whatever the lease guarded is gone, and the holder must check ``lost`` (or ``alive``) before it
acts on what it held.
"""

from __future__ import annotations

import threading

from zraft.client import protocol
from zraft.client.client import Client, ZraftError


class Lease:
    def __init__(self, client: Client, ttl: int) -> None:
        self.ttl = ttl
        self.id = client.lease_grant(ttl)
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._keeper = Client(client.endpoints, timeout=max(1.0, ttl / 2), keys=client.keys)
        self._owner = client
        self._thread = threading.Thread(target=self._keep_alive, name=f"lease-{self.id}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return not self.lost.is_set()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.revoke()

    def _keep_alive(self) -> None:
        every = max(0.2, self.ttl / 3)
        wait = every
        while not self._stop.wait(wait):
            try:
                self._keeper.lease_keepalive(self.id)
                wait = every
            except ZraftError as exc:
                if exc.code == protocol.LEASE_NOT_FOUND:
                    self.lost.set()
                    return
                wait = 0.1  # unavailable, outcome unknown (a failover, say): again soon, not a beat later

    def revoke(self) -> None:
        """Stop keeping it alive and revoke it (its keys go now, not at the end of the TTL)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(self.ttl)
        self._keeper.close()
        if not self.lost.is_set():
            try:
                self._owner.lease_revoke(self.id)
            except ZraftError as exc:
                if exc.code != protocol.LEASE_NOT_FOUND:
                    raise
