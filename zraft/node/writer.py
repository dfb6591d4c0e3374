"""Raft log writes off the event loop: one background thread, one fsync per batch of Readys.

The node's loop hands each Ready's hard state and entries to :class:`StorageWriter` and goes
on reading requests and acknowledgements while the disk syncs (etcd's async storage writes;
see the contract in ``zraft.raft.core``). The thread takes every write queued since its last
sync and stores them in one synced LevelDB batch, in the order they were submitted, so one
fsync covers everything that arrived meanwhile: group commit across loop turns.

Completion is reported through an eventfd the loop polls beside its sockets; ``durable``
is the sequence number of the last write on disk. plyvel releases the GIL while LevelDB
writes and syncs, so the loop runs during the fsync itself.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import threading

from zraft.node.interfaces import LogStore
from zraft.raft.core import HardState
from zraft.raft.messages import Entry

log = logging.getLogger(__name__)

_STOP = None


class StorageWriterError(RuntimeError):
    """The writer thread failed to persist: the node must stop (it cannot promise anything more)."""


class StorageWriter:
    def __init__(self, storage: LogStore) -> None:
        self.storage = storage
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # readable when writes completed
        self.submitted = 0  # sequence number of the last write handed over
        self.durable = 0  # ... and of the last one on disk (written by the thread only)
        self.batches = 0  # synced batches written: fewer than writes when group commit merges them
        self._jobs: queue.SimpleQueue[tuple[int, HardState | None, list[Entry]] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="zraft-writer", daemon=True)
        self._thread.start()

    def submit(self, hard_state: HardState | None, entries: list[Entry]) -> int:
        """Queue one Ready's writes; returns their sequence number."""
        self.check()
        self.submitted += 1
        self._jobs.put((self.submitted, hard_state, entries))
        return self.submitted

    def completed(self) -> int:
        """Clear the eventfd and return the sequence number of the last durable write."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        self.check()
        return self.durable

    def wait(self, seq: int) -> int:
        """Block until write ``seq`` is durable (before a snapshot is installed)."""
        while self.completed() < seq:
            select.select([self.fd], [], [], 1.0)  # the eventfd stays readable until completed() reads it
        return self.durable

    def check(self) -> None:
        if self._error is not None:
            raise StorageWriterError(f"writing the Raft log failed: {self._error!r}") from self._error

    def close(self) -> None:
        """Finish every queued write, then stop the thread."""
        self._jobs.put(_STOP)
        self._thread.join()
        os.close(self.fd)

    def _run(self) -> None:
        jobs = self._jobs
        stop = False
        while not stop:
            batch = [jobs.get()]
            while True:  # everything queued meanwhile goes into the same synced batch
                try:
                    batch.append(jobs.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stop = True
                batch = [j for j in batch if j is not _STOP]
            if not batch:
                continue
            try:
                self.storage.save_many([(hs, entries) for _, hs, entries in batch])
            except BaseException as exc:  # noqa: BLE001 - handed to the loop, which stops the node
                log.exception("the storage writer failed")
                self._error = exc
                os.eventfd_write(self.fd, 1)
                return
            self.batches += 1
            self.durable = batch[-1][0]
            os.eventfd_write(self.fd, 1)
