"""StorageWriter: the Raft log written by a background thread, in order, one fsync per batch."""

from __future__ import annotations

import select
import threading

import pytest

from zraft.node.leveldb import LevelDBStorage
from zraft.node.writer import StorageWriter, StorageWriterError
from zraft.raft.core import HardState
from zraft.raft.messages import Entry


def ents(first: int, *terms: int) -> list[Entry]:
    return [Entry(t, first + i, b"e%d" % (first + i)) for i, t in enumerate(terms)]


@pytest.fixture
def storage(tmp_path):
    """The log room of a LevelDB storage: what the writer writes to."""
    s = LevelDBStorage(tmp_path / "db")
    yield s.log
    s.close()


def test_writes_land_in_order_and_the_eventfd_says_when(storage) -> None:
    w = StorageWriter(storage)
    try:
        a = w.submit(HardState(1, 1), ents(1, 1, 1, 1))
        b = w.submit(None, ents(3, 2, 2))  # replaces entries 3..4 of the first write
        c = w.submit(HardState(2, None), [])
        assert (a, b, c) == (1, 2, 3)
        assert select.select([w.fd], [], [], 5.0)[0] == [w.fd]  # the loop's poller would wake
        assert w.wait(c) == 3 and w.completed() == 3
    finally:
        w.close()
    log = storage.load_log()
    assert [(e.index, e.term) for e in log.entries] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert storage.last_index == 4
    assert storage.load_hard_state() == HardState(2, None)


def test_writes_queued_during_a_sync_share_its_successor(storage) -> None:
    """Group commit: while one batch syncs, everything submitted meanwhile goes into the next one."""
    gate = threading.Event()
    original = storage.save_many

    def slow_save_many(writes):
        gate.wait(5.0)
        original(writes)

    storage.save_many = slow_save_many  # type: ignore[method-assign]
    w = StorageWriter(storage)
    try:
        for i in range(1, 51):
            w.submit(None, ents(i, 1))
        gate.set()
        assert w.wait(50) == 50
        assert w.batches < 50, "every write got its own fsync"
    finally:
        w.close()
    assert storage.last_index == 50


def test_close_finishes_what_is_queued(storage) -> None:
    w = StorageWriter(storage)
    for i in range(1, 201):
        w.submit(HardState(i, None), ents(i, i))
    w.close()
    assert storage.last_index == 200 and storage.load_hard_state() == HardState(200, None)


def test_a_failed_write_stops_the_node_with_the_cause(storage) -> None:
    def broken(_writes):
        raise OSError(28, "No space left on device")

    storage.save_many = broken  # type: ignore[method-assign]
    w = StorageWriter(storage)
    try:
        seq = w.submit(None, ents(1, 1))
        with pytest.raises(StorageWriterError, match="No space left"):
            w.wait(seq)
        with pytest.raises(StorageWriterError):
            w.submit(None, ents(2, 1))  # nothing more is accepted
    finally:
        w.close()
