"""Frames sent straight to a node's peer port (a ZeroMQ ROUTER), as a confused or forged peer would."""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    that storage never got, and trip over the gap at the next apply). Three walls stand in its way
    now: the transport takes frames only from peers, the decoder knows no type 7 on the wire, and
    the driver drops one (tests/test_driver.py)."""
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
    assert "dropped a peer frame" in log
    cluster.check_all_present(leader, {b"k%d" % i: b"v%d" % i for i in range(40)})
    # The follower holds every write too: alone with the leader, it makes the quorum.
    third = next(i for i in cluster.ids if i not in (leader, follower))
    cluster.kill(third)
    deadline = time.monotonic() + 10
    with cluster.client(ids=[leader, follower]) as cl:
        cl.put(b"after", b"1")
        assert cl.get(b"after") == b"1"
    assert time.monotonic() < deadline


def _wait_membership_settled(c: Cluster, leader: int, timeout: float = 10.0) -> None:
    """Until the leader has written the first configuration and marked every member seen (its own log
    entries, docs/PROTOCOL.md "Membership"), so that from then on only clients' writes grow the log."""
    deadline = time.monotonic() + timeout
    while True:
        rep = c.request(leader, {"op": "members"})
        if rep and rep.get("explicit") and rep.get("committed") and all(m["seen"] for m in rep["members"]):
            return
        assert time.monotonic() < deadline, f"the membership did not settle: {rep}"
        time.sleep(0.05)


def _state(c: Cluster) -> dict[int, tuple]:
    """Each node's (term, last index, commit index): what a forged frame must not move."""
    out = {}
    for i, status in c.statuses(timeout=1.0).items():
        assert status is not None, f"node {i} does not answer"
        out[i] = (status["term"], status["last_index"], status["commit_index"])
    return out


def test_the_forged_frames_of_the_review_are_dropped_and_change_nothing(cluster: Cluster) -> None:
    """Issue 12's findings, each sent from a connection that is not a peer's (as an attacker would:
    a real peer's identity is taken while it is connected): a snapshot chunk that wiped every key,
    a term of 2**64-1 that crash-looped every node, fields of the wrong type, an AppendEntries that
    replaced a key, a heartbeat of term + 1 that deposed the leader."""
    leader = cluster.wait_leader()
    follower = next(i for i in cluster.ids if i != leader)
    expected = {b"key%03d" % i: b"v%d" % i for i in range(100)}
    assert all(r.get("ok") is True for r in cluster.put_many(leader, expected))
    st = cluster.wait_caught_up(follower, leader)
    t, commit = st["term"], st["commit_index"]
    before = _state(cluster)
    forged = [
        [[8, t + 1, leader, follower, 12345, 0, msgpack.packb([0, b"key050", b"OWNED"]), True, commit + 50, t + 1000]],
        [[8, t, leader, follower, 12345, 0, msgpack.packb([0, b"key050", b"OWNED"]), True, commit + 50, t]],
        [[5, 2**64 - 1, leader, follower, 0, 0]],
        [[5, str(t), leader, follower, 0, 0]],
        [[5, t, [leader], follower, 0, 0]],
        [[3, t, leader, follower, commit - 1, t, [t, 0, msgpack.packb([1, b"key005", b"EVIL", None])], commit]],
        [[5, t + 1, leader, follower, commit, 0]],
        [[5, t + 1, follower, leader, commit, 0]],  # to the leader, as if from the follower
    ]
    for frame in forged:
        for target in (follower, leader):
            send_peer_frame(cluster, target, msgpack.packb(frame))
    for identity in (str(leader).encode(), str(follower).encode()):  # taken: ZeroMQ refuses the connection
        send_peer_frame(cluster, follower if identity != str(follower).encode() else leader,
                        msgpack.packb(forged[0]), identity=identity)
    with cluster.client() as cl:  # a client round trip: everything sent before it has been read
        cl.put(b"after", b"1")
    after = _state(cluster)
    assert {i: a[0] for i, a in after.items()} == {i: b[0] for i, b in before.items()}, "a term moved"
    assert cluster.wait_leader() == leader
    assert all(cluster.alive(i) for i in cluster.ids)
    cluster.check_all_present(leader, expected)
    for i in cluster.ids:  # every node holds exactly what was written, also after a restart
        cluster.kill(i)
        cluster.start(i)
    new_leader = cluster.wait_leader()
    cluster.check_all_present(new_leader, {**expected, b"after": b"1"})
    logs = "".join((cluster.data_dir / str(i) / "node.log").read_text() for i in cluster.ids)
    assert "dropped a peer frame" in logs and "Traceback" not in logs


def _messages(t: int, ids: list[int]) -> st.SearchStrategy:
    """Raft and stream messages of every wire type, near the cluster's term, between its members."""
    term = st.integers(max(0, t - 2), t + 2) | st.sampled_from([0, 2**63 - 1, 2**64 - 1, -1])
    idx = st.integers(0, 300) | st.sampled_from([2**63 - 1, 2**63, -1])
    node = st.sampled_from(ids) | st.sampled_from([0, 99, -1])
    flag = st.booleans() | st.sampled_from([0, 1, None])
    data = st.binary(max_size=40) | st.builds(lambda k, v: msgpack.packb([1, k, v, None]), st.binary(max_size=4),
                                             st.binary(max_size=4))
    entries = st.lists(st.tuples(term, st.sampled_from([0, 1, 2]), data), max_size=4).map(
        lambda es: [x for e in es for x in e])
    return st.one_of(
        st.tuples(st.just(1), term, node, node, idx, term, flag),
        st.tuples(st.just(2), term, node, node, flag, flag),
        st.tuples(st.just(3), term, node, node, idx, term, entries, idx),
        st.tuples(st.just(4), term, node, node, flag, idx, idx, term, idx),
        st.tuples(st.just(5), term, node, node, idx, idx),
        st.tuples(st.just(6), term, node, node, idx),
        st.tuples(st.just(7), term, node, node, idx, term),
        st.tuples(st.just(8), term, node, node, idx, idx, data, flag, idx, term),
        st.tuples(st.just(9), term, node, node, idx, idx, flag, flag),
    ).map(list)


def _mutated(frame: list, data: st.DataObject) -> list:
    """The frame with one field of one message replaced by something else of any type."""
    if not frame:
        return frame
    m = list(frame[data.draw(st.integers(0, len(frame) - 1))])
    m[data.draw(st.integers(0, len(m) - 1))] = data.draw(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=3) | st.binary(max_size=3)
        | st.lists(st.integers(-(2**63), 2**64 - 1), max_size=3))
    return [m, *frame[1:]]


def test_peer_fuzz_the_node_stays_up_unchanged_and_serving(cluster: Cluster) -> None:
    """Random and mutated messages of every type, to the leader's and a follower's peer port, from
    connections that are not peers' (hypothesis: 400 frames, and 1 in 7 raw bytes). The nodes stay
    up, nothing of their logs or data changes but what a normal client writes meanwhile, and that
    client is served throughout."""
    leader = cluster.wait_leader()
    follower = next(i for i in cluster.ids if i != leader)
    t = cluster.status(leader)["term"]
    _wait_membership_settled(cluster, leader)
    cluster.wait_caught_up(follower, leader)
    before = _state(cluster)
    written: dict[bytes, bytes] = {}
    socks = {}
    for target in (leader, follower):
        d = ctx().socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.setsockopt(zmq.IDENTITY, b"fuzz-%d" % target)
        d.connect(f"tcp://127.0.0.1:{cluster.base + target - 1}")
        socks[target] = d
    sent = [0]
    cl = cluster.client()

    @settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(frame=st.lists(_messages(t, cluster.ids), min_size=1, max_size=3), mutate=st.booleans(),
           raw=st.binary(max_size=30), data=st.data())
    def send_one(frame: list, mutate: bool, raw: bytes, data: st.DataObject) -> None:
        n = sent[0] = sent[0] + 1
        if n % 40 == 0:  # a normal client, served all along
            key, value = b"fuzz-%d" % n, b"%d" % n
            cl.put(key, value)
            written[key] = value
            assert cl.get(key) == value
        if mutate:
            frame = _mutated(frame, data)
        socks[leader if n % 2 else follower].send(msgpack.packb(frame, use_bin_type=True) if n % 7 else raw)

    try:
        send_one()
    finally:
        cl.close()
        for d in socks.values():
            d.close()
    assert sent[0] >= 400 and len(written) >= 10
    after = _state(cluster)
    assert {i: a[0] for i, a in after.items()} == {i: b[0] for i, b in before.items()}, "a term moved"
    assert all(cluster.alive(i) for i in cluster.ids)
    assert cluster.wait_leader() == leader
    cluster.check_all_present(leader, written)
    expected_last = before[leader][1] + len(written)
    assert after[leader][1] == expected_last, f"the log grew by more than the client's writes: {before} {after}"
    for i in cluster.ids:
        assert cluster.wait_caught_up(i, leader)["last_index"] == expected_last
    rejected = sum(("dropped a peer frame" in (cluster.data_dir / str(i) / "node.log").read_text()) for i in (
        leader, follower))
    assert rejected == 2, "each fuzzed node logged what it dropped"
