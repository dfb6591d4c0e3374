"""Crash recovery: kill -9 of every node, and a follower that misses 5,000 writes."""

from __future__ import annotations

import threading
import time

import pytest

from .cluster import NOT_SENT, Cluster, pipeline

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("async_storage", ["1", "0"], ids=["writer-thread", "inline-writes"])
def test_kill_all_nodes_restart_keeps_every_acknowledged_write(make_cluster, async_storage: str) -> None:
    c: Cluster = make_cluster(env={"ZRAFT_ASYNC_STORAGE": async_storage})
    leader = c.wait_leader()
    expected: dict[bytes, bytes | None] = {}

    # Settled history: puts, overwrites, deletes and swaps, all acknowledged.
    items = {b"k%05d" % i: b"v%05d" % i for i in range(1000)}
    assert all(r.get("ok") is True for r in c.put_many(leader, items))
    expected.update(items)
    with c.client() as cl:
        for i in range(0, 1000, 10):
            k = b"k%05d" % i
            assert cl.delete(k) is True
            expected[k] = None
        for i in range(1, 1000, 10):
            k = b"k%05d" % i
            assert cl.cas(k, b"v%05d" % i, b"swapped") == (True, b"swapped")
            expected[k] = b"swapped"
        assert cl.cas(b"k00002", b"wrong", b"nope") == (False, b"v00002")

    # Writes in flight when every node is killed: acknowledged ones must survive, the rest
    # may or may not have been applied.
    racing = {b"race-%05d" % i: b"r%05d" % i for i in range(8000)}
    keys = list(racing)
    reqs = [{"op": "put", "key": k, "value": racing[k]} for k in keys]
    acked_count = 0
    stop = threading.Event()

    def count(_i, rep) -> None:
        nonlocal acked_count
        if rep.get("ok") is True:
            acked_count += 1

    result: list = []
    writer = threading.Thread(target=lambda: result.append(
        pipeline(c.endpoint(leader), reqs, window=32, timeout=60, idle_timeout=3.0, on_reply=count, stop=stop)))
    writer.start()
    try:
        end = time.monotonic() + 30
        while acked_count < 1000 and writer.is_alive():
            assert time.monotonic() < end, f"only {acked_count} racing writes acknowledged in 30 s"
            time.sleep(0.01)
        c.kill_all()  # SIGKILL, all three at once, writes still in flight
    finally:
        writer.join(30)
        stop.set()
    assert not writer.is_alive()
    replies = result[0]
    acked = {k: racing[k] for k, r in zip(keys, replies, strict=True) if isinstance(r, dict) and r.get("ok") is True}
    errors = [r for r in replies if isinstance(r, dict) and r.get("ok") is not True]
    unknown = [k for k, r in zip(keys, replies, strict=True) if r is None]
    never_sent = [k for k, r in zip(keys, replies, strict=True) if r is NOT_SENT]
    print(f"racing writes: {len(acked)} acknowledged, {len(errors)} errors, {len(unknown)} without reply, "
          f"{len(never_sent)} never sent")
    assert len(acked) >= 1000
    expected.update(acked)

    c.start_all()
    leader = c.wait_leader(timeout=30)
    c.check_all_present(leader, expected)
    # Unacknowledged racing writes: either applied or not, never anything else.
    got = c.get_many(leader, unknown)
    odd = [(k, v) for k, v in got.items() if v not in (None, racing[k])]
    assert not odd, odd[:5]
    assert not any(c.get_many(leader, never_sent).values()), "a write that was never sent is there"
    # And the restarted cluster takes new writes.
    with c.client() as cl:
        cl.put(b"after-restart", b"yes")
        assert cl.get(b"after-restart") == b"yes"


def test_follower_down_for_5000_writes_catches_up_and_serves_in_a_quorum(make_cluster) -> None:
    c: Cluster = make_cluster()
    leader = c.wait_leader()
    lagging, other = [i for i in c.ids if i != leader]
    c.kill(lagging)

    items = {b"key-%05d" % i: (b"value-%05d-" % i) + b"x" * 100 for i in range(5000)}
    t0 = time.monotonic()
    reps = c.put_many(leader, items, window=32)
    took = time.monotonic() - t0
    bad = [r for r in reps if r.get("ok") is not True]
    assert not bad, f"{len(bad)} of 5000 writes failed, e.g. {bad[:3]}"
    print(f"5000 writes with one follower down: {took:.2f} s ({5000 / took:.0f}/s)")

    lead_st = c.status(leader)
    st = c.status(other)
    assert st is not None and lead_st is not None
    assert lead_st["commit_index"] >= 5000

    c.start(lagging)
    t0 = time.monotonic()
    st = c.wait_caught_up(lagging, leader, timeout=60)
    print(f"node {lagging} caught up to {st['applied_index']} in {time.monotonic() - t0:.2f} s")
    assert st["applied_index"] >= lead_st["commit_index"]
    assert st["leader"] == leader

    # Now the recovered node is the only follower: the leader can only serve with it.
    c.kill(other)
    assert c.wait_leader([leader, lagging]) == leader  # no election was needed
    c.check_all_present(leader, items)
    with c.client(ids=[leader, lagging]) as cl:
        cl.put(b"quorum-with-recovered-node", b"1")
        assert cl.get(b"quorum-with-recovered-node") == b"1"
