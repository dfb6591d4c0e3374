"""Membership changes on real node processes (docs/PROTOCOL.md, "Membership"): grow and shrink under
a write load, membership from disk after a restart, leadership transfer and the handoff on SIGTERM,
removing the leader, a late starter in a new cluster, and clear errors for bad changes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from zraft.client import Client, ZraftError

from .cluster import Cluster, Joiner, free_port, tail


class Writer(threading.Thread):
    """Puts unique keys through a client until stopped; remembers every acknowledged one."""

    def __init__(self, endpoints: list[str]) -> None:
        super().__init__(daemon=True)
        self.client = Client(endpoints, timeout=10)
        self.acked: dict[bytes, bytes] = {}
        self.failed = 0
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            key, value = b"w-%06d" % n, b"v-%06d" % n
            try:
                self.client.put(key, value)
                self.acked[key] = value
            except ZraftError:
                self.failed += 1

    def finish(self) -> dict[bytes, bytes]:
        self.stop.set()
        self.join(30)
        self.client.close()
        return self.acked


def members(cl: Client) -> dict[int, dict]:
    return {m["id"]: m for m in cl.members()["members"]}


def wait_for(what: str, check: Callable[[], object], timeout: float = 20.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_grow_to_five_and_back_to_three_under_writes_then_restart_from_disk(
        make_cluster: Callable[..., Cluster], joiners: list[Joiner]) -> None:
    c = make_cluster()
    leader = c.wait_leader()
    w = Writer(c.endpoints)
    w.start()
    with Client(c.endpoints, timeout=60) as cl:
        for node_id in (4, 5):
            j = Joiner(c, node_id, member=1)
            joiners.append(j)
            j.start()
            got = {m["id"]: m for m in j.add(cl)}
            assert got[node_id]["voter"], got
        assert {i: m["voter"] for i, m in members(cl).items()} == dict.fromkeys((1, 2, 3, 4, 5), True)
        st = c.request(leader, {"op": "status"})
        assert st["voters"] == [1, 2, 3, 4, 5] and st["learners"] == [], st
        # Back to three: the two original followers go (the leader stays), one at a time.
        gone = [i for i in c.ids if i != leader]
        for node_id in gone:
            cl.remove_member(node_id)
        time.sleep(0.3)  # a little more load on the new configuration
        acked = w.finish()
        assert w.failed == 0, f"{w.failed} writes failed while the membership changed"
        assert sorted(members(cl)) == sorted({leader, 4, 5})
        for node_id in gone:
            c.kill(node_id)
        for k, v in list(acked.items())[::7]:
            assert cl.get(k) == v
    assert len(acked) > 20, len(acked)
    # Every node restarts from its disk: the membership is the log's, not Config.txt's.
    for j in joiners:
        j.kill()
    c.kill(leader)
    c.start(leader)
    for j in joiners:
        j.start(join=False)
    with Client([c.endpoint(leader)] + [j.addr.client_endpoint for j in joiners], timeout=20) as cl:
        assert sorted(members(cl)) == sorted({leader, 4, 5})
        cl.put(b"after-restart", b"1")
        assert cl.get(b"after-restart") == b"1"
        missing = [k for k in list(acked)[::13] if cl.get(k) != acked[k]]
        assert not missing, missing[:5]


def test_transfer_and_handoff_on_sigterm_cost_no_election_timeout(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster()
    leader = c.wait_leader()
    target = next(i for i in c.ids if i != leader)
    w = Writer(c.endpoints)
    w.start()
    with Client(c.endpoints, timeout=10) as cl:
        t0 = time.monotonic()
        assert cl.transfer_leader(target) == target
        took = time.monotonic() - t0
        assert took < 1.0, f"the transfer took {took:.2f} s"
        assert c.wait_leader() == target
        nxt = cl.transfer_leader()  # the most up-to-date other voter
        # A change sent to a leader this new (it may not have committed an entry of its term yet) is
        # taken once it has, not refused `in_progress`.
        with Client([c.endpoint(nxt)], timeout=10) as direct:
            direct.add_member(8, "127.0.0.1", free_port(), free_port(), free_port(), learner=True)
            direct.remove_member(8)
        assert nxt != target and c.wait_leader() == nxt
        with pytest.raises(ZraftError) as exc:
            cl.transfer_leader(99)
        assert exc.value.code == "bad_request" and "not a voter" in exc.value.message
    # SIGTERM of the leader: it hands over before it exits.
    t0 = time.monotonic()
    assert c.stop(nxt) == 0
    others = [i for i in c.ids if i != nxt]
    new = wait_for("a new leader", lambda: (lambda lt: lt and lt[0] in others and lt[0])(c.leader(timeout=0.3)),
                   timeout=5.0)
    took = time.monotonic() - t0
    assert took < 1.5, f"a leader after {took:.2f} s (the election timeout would be about 1-2 s)"
    assert "handing leadership to node" in tail(c.log_path(nxt), 60)
    acked = w.finish()
    with Client([c.endpoint(i) for i in others], timeout=10) as cl:
        for k, v in list(acked.items())[::5]:
            assert cl.get(k) == v
    assert new in others


def test_removing_the_leader_hands_over_and_it_takes_no_part(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster()
    leader = c.wait_leader()
    with Client(c.endpoints, timeout=20) as cl:
        cl.put(b"before", b"1")
        cl.remove_member(leader)
        others = [i for i in c.ids if i != leader]
        new = c.wait_leader(ids=others)
        assert new in others
        st = c.request(leader, {"op": "status"})
        assert st["role"] != "leader" and not st["member"], st
        cl.put(b"after", b"2")
        assert cl.get(b"before") == b"1" and cl.get(b"after") == b"2"
        assert sorted(members(cl)) == sorted(others)
    # The removed node, still running, disrupts nothing: the term stays.
    term = c.request(new, {"op": "status"})["term"]
    time.sleep(2.0)  # several election timeouts of the removed node
    assert c.request(new, {"op": "status"})["term"] == term
    assert c.wait_leader(ids=others) == new


def test_bad_changes_get_clear_errors_and_change_nothing(make_cluster: Callable[..., Cluster], tmp_path: Path
                                                         ) -> None:
    c = make_cluster()
    leader = c.wait_leader()
    with Client(c.endpoints, timeout=10) as cl:
        before = members(cl)
        p1 = c.peer_ports[1]
        for fn, code, text in [
            (lambda: cl.add_member(2, "127.0.0.1", free_port()), "bad_request", "already a member"),
            (lambda: cl.add_member(9, "127.0.0.1", p1), "bad_request", "in use by node 1"),
            (lambda: cl.promote_member(9), "bad_request", "not a member"),
            (lambda: cl.remove_member(9), "bad_request", "not a member"),
            (lambda: cl.promote_member(leader), "bad_request", "a voter already"),
        ]:
            with pytest.raises(ZraftError) as exc:
                fn()
            assert exc.value.code == code and text in exc.value.message, (exc.value.code, exc.value.message)
        # A second change while one is in flight: a learner added (its change commits at once), then two
        # changes sent together in one turn of the leader: one of them is refused `in_progress`.
        port = free_port()
        cl.add_member(7, "127.0.0.1", port, free_port(), free_port(), learner=True)
        from .cluster import pipeline
        reps = pipeline(c.endpoint(leader), [{"op": "promote_member", "id": 7}, {"op": "remove_member", "id": 7}],
                        window=2, timeout=10)
        codes = sorted(r.get("error", "ok") for r in reps)
        assert codes == ["in_progress", "ok"], reps
        cl.remove_member(7) if 7 in members(cl) else None
        assert members(cl).keys() == before.keys()
    r = c.cli("member", "add", "2", "--ip", "127.0.0.1", "--port", str(free_port()))
    assert r.rc == 2 and "bad_request: node 2 is already a member" in r.err, str(r)
    r = c.cli("member", "transfer-leader", "42")
    assert r.rc == 2 and "not a voter" in r.err, str(r)
    r = c.cli("member", "list", "--json")
    assert r.rc == 0 and f'"leader": {leader}' in r.out, str(r)
    one = make_cluster(n=1, name="one")
    one.wait_leader()
    with Client(one.endpoints, timeout=10) as cl, pytest.raises(ZraftError) as exc:
        cl.remove_member(1)
    assert "last voter" in exc.value.message


def test_a_node_that_starts_late_into_a_new_cluster_joins_normally(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(start=False)
    for i in (1, 2):
        c.start(i)
    leader = c.wait_leader(ids=[1, 2])
    acked = {b"k%02d" % i: b"v" for i in range(30)}
    assert all(r == {"ok": True} for r in c.put_many(leader, acked))
    c.start(3)
    st = c.wait_caught_up(3, leader)
    assert not st["probation"] and st["member"], st
    c.kill(next(i for i in (1, 2) if i != leader))
    with c.client(timeout=20) as cl:  # node 3 votes: it and the leader are a quorum
        cl.put(b"with-3", b"1")
        assert cl.get(b"with-3") == b"1"
