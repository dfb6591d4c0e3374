"""NodeServer built in-process: real sockets, storage handed in (here the in-memory rooms)."""

from __future__ import annotations

import threading

import pytest

from zraft.client import Client, ZraftError
from zraft.cluster.config import Settings, parse_config
from zraft.cluster.procs import free_ports
from zraft.node.memory import MemoryStorage
from zraft.node.server import NodeServer


@pytest.fixture
def single_node():
    """A one-node cluster served from a thread of this process, on MemoryStorage."""
    port = free_ports(1, block=(0, 100, 200))[0]
    cluster = parse_config(f'Ip="127.0.0.1",port="{port}"\n')
    storage = MemoryStorage()
    server = NodeServer(cluster, 1, storage, Settings(tick_ms=10, http_api=False))
    t = threading.Thread(target=server.run, kwargs={"handle_signals": False}, daemon=True)
    t.start()
    yield server, storage, cluster.node(1).client_endpoint
    server.stopping = True
    t.join(10)
    assert not t.is_alive(), "the server did not stop"


def test_a_node_server_serves_clients_from_storage_it_was_given(single_node) -> None:
    server, storage, endpoint = single_node
    with Client([endpoint], timeout=5.0) as c:
        c.put(b"k", b"v")
        assert c.get(b"k") == b"v"
        assert c.cas(b"k", b"v", b"w") == (True, b"w")
        assert c.delete(b"k") is True
        with pytest.raises(ZraftError, match="bad_request"):
            c._call({"op": "get"}, write=False)  # (a request the protocol refuses)
    assert storage.state.applied_index >= 4 and storage.state.get(b"k") is None
    assert storage.log.last_index == server.raft.log.last_index
    with Client([endpoint]) as c:
        st = c.status(endpoint)
    assert st is not None and st["role"] == "leader" and st["applied_index"] == storage.state.applied_index


def test_a_waiting_watch_on_a_quiet_key_is_woken_at_once_after_many_other_events(single_node) -> None:
    """A watch that waits while more events go by than one history scan looks at (20,000) must still be
    answered as soon as its key changes, not at its timeout (it looks only from the batch that woke it)."""
    import time

    from zraft.client.txn import put

    _server, _storage, endpoint = single_node
    with Client([endpoint], timeout=10.0) as c:
        start = c.put(b"other", b"0") + 1
        got: list = []
        waiter = threading.Thread(target=lambda: got.append(c.request(endpoint, {
            "op": "watch", "key": b"quiet", "start_revision": start, "timeout": 30}, timeout=40)), daemon=True)
        with Client([endpoint], timeout=10.0) as w:
            waiter.start()
            time.sleep(0.2)
            for i in range(170):  # 170 revisions of 128 events each: 21,760 events
                w.txn().then(*[put(b"o/%d/%d" % (i, j), b"x") for j in range(128)]).commit()
            t0 = time.monotonic()
            rev = w.put(b"quiet", b"1")
            waiter.join(10)
            took = time.monotonic() - t0
    assert got and got[0]["ok"], got
    assert [(e["key"], e["revision"]) for e in got[0]["events"]] == [(b"quiet", rev)] and took < 5, took
