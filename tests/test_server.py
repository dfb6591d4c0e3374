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
