"""Frames sent straight to a node's peer port (a ZeroMQ ROUTER), as a confused or forged peer would."""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from .cluster import Cluster, ctx

pytestmark = pytest.mark.integration


def send_peer_frame(c: Cluster, to: int, frame: bytes, identity: bytes = b"stranger") -> None:
    """One frame to node ``to``'s peer port from a DEALER of its own (the messages in the frame may
    claim any sender; a real peer's identity is taken while it is connected)."""
    d = ctx().socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 2000)
    d.setsockopt(zmq.IDENTITY, identity)
    try:
        d.connect(f"tcp://127.0.0.1:{c.base + to - 1}")
        d.send(frame)
    finally:
        d.close()  # (LINGER: the frame goes out first)


def test_an_install_snapshot_from_the_wire_is_dropped_and_the_node_goes_on(cluster: Cluster) -> None:
    """InstallSnapshot is what a follower's driver hands its core once a whole stream is staged; it
    never travels. One that arrives from the wire must not reach the core (which would take a state
    that storage never got, and trip over the gap at the next apply)."""
    leader = cluster.wait_leader()
    follower = next(i for i in cluster.ids if i != leader)
    with cluster.client() as cl:
        for i in range(20):
            cl.put(b"k%d" % i, b"v%d" % i)
    before = cluster.wait_caught_up(follower, leader)
    term, commit = before["term"], before["commit_index"]
    send_peer_frame(cluster, follower, msgpack.packb([[7, term, leader, follower, commit + 50, term]]))
    with cluster.client() as cl:
        for i in range(20, 40):
            cl.put(b"k%d" % i, b"v%d" % i)
    after = cluster.wait_caught_up(follower, leader)
    assert cluster.alive(follower), "the follower died"
    assert after["snapshot_index"] == before["snapshot_index"] == 0, after
    assert after["snapshots"]["installed"] == 0
    log = (cluster.data_dir / str(follower) / "node.log").read_text()
    assert "dropped an InstallSnapshot" in log
    cluster.check_all_present(leader, {b"k%d" % i: b"v%d" % i for i in range(40)})
    # The follower holds every write too: alone with the leader, it makes the quorum.
    third = next(i for i in cluster.ids if i not in (leader, follower))
    cluster.kill(third)
    deadline = time.monotonic() + 10
    with cluster.client(ids=[leader, follower]) as cl:
        cl.put(b"after", b"1")
        assert cl.get(b"after") == b"1"
    assert time.monotonic() < deadline
