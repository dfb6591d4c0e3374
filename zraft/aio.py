"""The client library for asyncio applications: the same methods as zraft.client.Client, awaitable.

    from zraft.aio import Client

    async with Client(endpoints) as c:
        rev = await c.put(b"k", b"v")
        r = await c.range(prefix=b"config/")
        async for event in c.watch(prefix=b"config/", start_revision=rev):
            ...

How: each call runs the blocking client (its leader discovery, retries and exactly-once sessions,
tested once) on a worker thread (asyncio.to_thread), so the event loop never blocks on a socket.
One Client sends one request at a time (calls are queued in order, as the session requires);
open several Clients for requests in parallel. A watch runs on its own thread and client, as
zraft.client.watch does. Locks and elections: use zraft.client's from a thread for now.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from zraft.client.client import Client as SyncClient
from zraft.client.client import RangeResult

if TYPE_CHECKING:
    from zraft.cluster.keys import KeyRing

__all__ = ["Client"]


class Client:
    def __init__(self, endpoints: Iterable[str], timeout: float = 5.0, exactly_once: bool = True,
                 keys: KeyRing | None = None) -> None:
        self.sync = SyncClient(endpoints, timeout=timeout, exactly_once=exactly_once, keys=keys)
        self._turn = asyncio.Lock()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        async with self._turn:
            await asyncio.to_thread(self.sync.close)

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        async with self._turn:
            return await asyncio.to_thread(fn, *args, **kwargs)

    async def put(self, key: bytes | str, value: bytes | str, lease: int | None = None) -> int:
        return await self._run(self.sync.put, key, value, lease=lease)

    async def get(self, key: bytes | str) -> bytes | None:
        return await self._run(self.sync.get, key)

    async def get_meta(self, key: bytes | str) -> dict[str, Any]:
        return await self._run(self.sync.get_meta, key)

    async def delete(self, key: bytes | str) -> bool:
        return await self._run(self.sync.delete, key)

    async def cas(self, key: bytes | str, expect: bytes | str | None, value: bytes | str) -> tuple[bool, bytes | None]:
        return await self._run(self.sync.cas, key, expect, value)

    async def range(self, prefix: bytes | str | None = None, start: bytes | str | None = None,
                    end: bytes | str | None = None, limit: int = 0, keys_only: bool = False) -> RangeResult:
        return await self._run(self.sync.range, prefix, start, end, limit, keys_only)

    async def txn(self, compare: list, success: list, failure: list | None = None) -> dict[str, Any]:
        """compare / success / failure as zraft.client.txn builds them (``value("k") == "v"``, ``put(...)``)."""
        return await self._run(self.sync.raw_txn, compare, success, failure or [])

    async def lease_grant(self, ttl: int) -> int:
        return await self._run(self.sync.lease_grant, ttl)

    async def lease_keepalive(self, lease: int) -> int:
        return await self._run(self.sync.lease_keepalive, lease)

    async def lease_revoke(self, lease: int) -> None:
        await self._run(self.sync.lease_revoke, lease)

    async def status(self, endpoint: str, timeout: float = 1.0) -> dict[str, Any] | None:
        return await self._run(self.sync.status, endpoint, timeout)

    async def watch(self, key: bytes | str | None = None, prefix: bytes | str | None = None,
                    start_revision: int | None = None, poll_s: float = 10.0) -> AsyncIterator[dict[str, Any]]:
        """The changes to ``key`` (or under ``prefix``) from ``start_revision`` on, as zraft.client's watch."""
        if start_revision is None:
            start_revision = (await self.get_meta(b""))["revision"] + 1
        watcher = self.sync.watch(key=key, prefix=prefix, start_revision=start_revision, poll_s=poll_s)
        try:
            while True:
                for event in await asyncio.to_thread(watcher.poll):
                    yield event
        finally:
            watcher.close()
