"""Membership changes with real node processes (CONTRACT.md "Membership", docs/PROTOCOL.md).

Growing and shrinking the cluster under a write load, replacing a dead node, removing the
leader, leadership transfer, a learner that can only catch up from a snapshot, membership
surviving a restart of every node, the errors of bad requests (library and CLI), the
emptied-disk rule, and the leadership handoff of a leader stopped with SIGTERM.

The write loads record every operation as a zraft.jepsen history: at the end each key's
history (with a final read of every key) must be linearizable, which covers "no acknowledged
write is lost" (each write also goes to a key of its own, checked one by one for a clearer
message). Nodes that are not in the cluster's Config.txt (ids above 3) run from a config file
of their own holding their line and some members' lines, started with ``--join``.
"""

from __future__ import annotations

import itertools
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from zraft.client import Client, ZraftError
from zraft.jepsen.checker import check
from zraft.jepsen.history import GET, OK, PUT, Op
from zraft.jepsen.runner import Recorder, run_op

from .cluster import IP, LOG_FILES, MCluster, free_base, output_of_last_start

pytestmark = pytest.mark.integration

ELECTION_TIMEOUT_S = 0.5  # the default settings: 10 ticks of 50 ms (randomized up to twice that)


# ------------------------------------------------------------------------------------ helpers


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 20.0, every: float = 0.05) -> Any:
    """Poll ``fn`` until it returns something truthy (returned); fail after ``timeout`` with ``what``
    and the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")
        time.sleep(every)


def members(c: MCluster, node_id: int) -> dict[str, Any] | None:
    rep = c.request(node_id, {"op": "members"}, timeout=1.0)
    return rep if rep and rep.get("ok") else None


def settled(c: MCluster, leader: int) -> dict[str, Any] | None:
    """The leader's membership once it has no change of its own left to make (first configuration
    written and committed, every member that took part marked seen, no promotion pending), or None."""
    rep = members(c, leader)
    if not (rep and rep["leader"] == leader and rep["explicit"] and rep["committed"]):
        return None
    st = c.status(leader, timeout=1.0)
    if st is None or st["commit_index"] < rep["config_index"]:
        return None
    if any(m["promote"] or (m.get("match", 0) > 0 and not m["seen"]) for m in rep["members"]):
        return None
    return rep


def wait_settled(c: MCluster, leader: int, timeout: float = 10.0) -> dict[str, Any]:
    return wait_for(f"node {leader}'s membership settling", lambda: settled(c, leader), timeout)


def voters_learners(c: MCluster, leader: int) -> tuple[list[int], list[int]]:
    rep = members(c, leader)
    assert rep is not None, f"node {leader} does not answer `members`"
    return (sorted(m["id"] for m in rep["members"] if m["voter"]),
            sorted(m["id"] for m in rep["members"] if not m["voter"]))


def current_leader(c: MCluster, ids: Sequence[int]) -> int | None:
    """The leader that every node of ``ids`` agrees on (same term), or None."""
    sts = c.statuses(timeout=0.3, ids=ids)
    if not all(sts.values()):
        return None
    leaders = [i for i, st in sts.items() if st["role"] == "leader"]
    if len(leaders) != 1:
        return None
    lead = sts[leaders[0]]
    ok = all(st["leader"] == leaders[0] and st["term"] == lead["term"] for st in sts.values())
    return leaders[0] if ok else None


def cli_ok(c: MCluster, *args: str, timeout: float = 60.0) -> str:
    r = c.cli(*args, timeout=timeout)
    assert r.rc == 0, str(r)
    return r.out


def cli_error(c: MCluster, *args: str, rc: int = 2, message: str = "") -> None:
    """A CLI command that must fail with exit code ``rc`` and one ``error: ...`` line holding ``message``."""
    r = c.cli(*args)
    assert r.rc == rc, str(r)
    assert "Traceback" not in r.err, str(r)
    assert f"error: {message}" in r.err.replace("\n", " "), str(r)


def put_all(c: MCluster, leader: int, items: dict[bytes, bytes]) -> None:
    reps = c.put_many(leader, items)
    bad = [r for r in reps if not (isinstance(r, dict) and r.get("ok") is True)]
    assert not bad, f"{len(bad)} of {len(items)} puts failed, e.g. {bad[:3]}"


# ------------------------------------------------------------------------------------ the write load


class Load:
    """``clients`` threads, each with its own exactly-once Client of ``endpoints``, until :meth:`stop`:
    each turn a put of a key of its own, then a put of one of a few shared registers (a value unique
    to it) and a get of another; every op is recorded for the linearizability check."""

    def __init__(self, endpoints: Sequence[str], tag: str, clients: int = 2, registers: int = 3,
                 timeout: float = 10.0) -> None:
        self.endpoints = list(endpoints)
        self.tag = tag
        self.registers = [f"{tag}-reg{i}".encode() for i in range(registers)]
        self.rec = Recorder()
        self.stop_event = threading.Event()
        self.timeout = timeout
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), name=f"load-{tag}-{i}", daemon=True)
                        for i in range(clients)]
        self._oks = 0
        self._lock = threading.Lock()

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, cid: int) -> None:
        try:
            with Client(self.endpoints, timeout=self.timeout) as cl:
                for n in itertools.count():
                    if self.stop_event.is_set():
                        return
                    own = f"{self.tag}-c{cid}-{n:06d}".encode()
                    value = f"c{cid}-{n}".encode()
                    reg = self.registers[n % len(self.registers)]
                    other = self.registers[(n + 1) % len(self.registers)]
                    for kind, key in ((PUT, own), (PUT, reg), (GET, other)):
                        op = self.rec.add(run_op(cl, kind, key, value if kind == PUT else None, process=cid))
                        if op.status == OK and kind == PUT:
                            with self._lock:
                                self._oks += 1
        except BaseException as exc:  # noqa: BLE001 (reported by stop())
            self.errors.append(exc)

    @property
    def acked_writes(self) -> int:
        with self._lock:
            return self._oks

    def wait_progress(self, n: int = 20, timeout: float = 15.0, what: str = "") -> None:
        """Wait until ``n`` more writes are acknowledged than now."""
        start = self.acked_writes
        wait_for(f"{n} more acknowledged writes {what}".strip(), lambda: self.acked_writes >= start + n, timeout)

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(self.timeout + 5)
        assert not any(t.is_alive() for t in self.threads), "a load thread did not stop"
        assert not self.errors, f"a load thread failed: {self.errors!r}"

    def verify(self, c: MCluster, leader: int) -> dict[str, int]:
        """After :meth:`stop`: read every key once more from ``leader``; every acknowledged write must
        be there, and every key's history (with that read) must be linearizable. Returns counts."""
        ops = list(self.rec.ops)
        own = {op.key: op.value for op in ops if op.kind == PUT and op.status == OK and op.key not in self.registers}
        keys = sorted({op.key for op in ops})
        t0 = time.monotonic()
        got = c.get_many(leader, keys)
        t1 = time.monotonic()
        lost = [(k, v, got[k]) for k, v in own.items() if got[k] != v]
        assert not lost, (f"{len(lost)} of {len(own)} acknowledged writes lost (key, written, read now): "
                          f"{lost[:5]}")
        history = ops + [Op(GET, k, t0, t1, OK, result=got[k]) for k in keys]
        res = check(history, time_budget_s=20.0)
        assert res.valid is True, f"history of {len(history)} ops: {res.verdict}\n{res.report()}"
        counts = {"ops": len(ops), "ok_writes": sum(1 for op in ops if op.kind == PUT and op.status == OK),
                  "unknown": sum(1 for op in ops if op.status == "unknown"),
                  "failed": sum(1 for op in ops if op.status == "fail")}
        print(f"load {self.tag}: {counts}")
        return counts


# ------------------------------------------------------------------------------------ 1. grow and shrink


def test_grow_3_to_5_with_join_and_shrink_back_under_load(make_mcluster: Callable[..., MCluster]) -> None:
    c = make_mcluster()
    leader = c.wait_leader()
    wait_settled(c, leader)
    # Node 4 knows one member only, node 5 all three.
    c.new_node(4, via=[1])
    c.new_node(5)
    with Load(c.endpoints, "grow") as load:
        load.wait_progress(what="before any change")
        for new in (4, 5):
            c.start(new, join=True)
            t0 = time.monotonic()
            out = cli_ok(c, *c.add_args(new))
            took = time.monotonic() - t0
            assert f"node {new} is a voter now" in out, out
            # It returned once a voter: the leader says so at once, and so does the new node soon.
            leader = c.wait_leader(ids=c.running())
            assert new in voters_learners(c, leader)[0], members(c, leader)
            wait_for(f"node {new} seeing itself a voter",
                     lambda n=new: (st := c.status(n)) and n in st["voters"] and st["member"])
            print(f"node {new} added (a voter) in {took:.2f} s")
            load.wait_progress(what=f"after adding node {new}")
            wait_settled(c, leader)

        # `cluster status` (every node's row) shows voters and learners.
        rows = json.loads(cli_ok(c, "cluster", "status", "--json", *[a for i in c.all_ids
                                                                     for a in ("-e", c.endpoint(i))]))
        assert [r["id"] for r in rows] == [1, 2, 3, 4, 5], rows
        for r in rows:
            assert r["answers"] and r["voters"] == [1, 2, 3, 4, 5] and r["learners"] == [], r
        listed = json.loads(cli_ok(c, "member", "list", "--json"))
        assert sorted(m["id"] for m in listed["members"]) == [1, 2, 3, 4, 5], listed
        assert all(m["role"] == "voter" for m in listed["members"]), listed

        # Shrink back to 3: remove the two new ones (if one of them leads, it hands over).
        for gone in (5, 4):
            out = cli_ok(c, "member", "remove", str(gone))
            assert f"node {gone} is no longer a member" in out, out
            rest = [i for i in c.running() if i != gone]
            leader = wait_for("a leader among the others", lambda r=rest: current_leader(c, r))
            assert gone not in voters_learners(c, leader)[0] + voters_learners(c, leader)[1]
            load.wait_progress(what=f"after removing node {gone}")
            c.stop(gone)
            wait_settled(c, leader)
    load.verify(c, c.wait_leader(ids=[1, 2, 3]))
    leader = c.wait_leader(ids=[1, 2, 3])
    assert voters_learners(c, leader) == ([1, 2, 3], [])
    for i in (1, 2, 3):
        st = c.wait_caught_up(i, leader)
        assert st["voters"] == [1, 2, 3] and st["learners"] == [], st


# ------------------------------------------------------------------------------------ 2. replace a dead node


def test_replace_a_dead_node(make_mcluster: Callable[..., MCluster]) -> None:
    c = make_mcluster()
    leader = c.wait_leader()
    wait_settled(c, leader)
    c.new_node(6, via=[1, 2])
    with Load(c.endpoints, "replace") as load:
        load.wait_progress()
        c.kill(3)
        leader = c.wait_leader(ids=[1, 2])
        load.wait_progress(what="with node 3 dead")
        with c.client(timeout=20, ids=[1, 2]) as cl:
            got = cl.remove_member(3)
        assert sorted(m["id"] for m in got) == [1, 2], got
        leader = c.wait_leader(ids=[1, 2])
        assert voters_learners(c, leader) == ([1, 2], [])
        load.wait_progress(what="with node 3 removed")
        wait_settled(c, leader)
        c.start(6, join=True)
        got = c.add_member(6)
        assert sorted(m["id"] for m in got if m["voter"]) == [1, 2, 6], got
        load.wait_progress(what="with node 6 added")
    leader = c.wait_leader(ids=[1, 2, 6])
    load.verify(c, leader)
    st = c.wait_caught_up(6, leader)
    assert st["voters"] == [1, 2, 6] and st["member"], st
    # Node 6 counts: with node 2 gone too, 1 and 6 still make a majority.
    c.kill(2 if leader != 2 else 1)
    survivors = [i for i in (1, 2, 6) if c.alive(i)]
    with c.client(timeout=10, ids=survivors) as cl:
        cl.put(b"after-replace", b"1")
        assert cl.get(b"after-replace") == b"1"


# ------------------------------------------------------------------------------------ 3. remove the leader


def test_remove_the_leader(make_mcluster: Callable[..., MCluster]) -> None:
    c = make_mcluster()
    old = c.wait_leader()
    wait_settled(c, old)
    rest = [i for i in c.ids if i != old]
    with Load(c.endpoints, "rmleader") as load:
        load.wait_progress()
        with c.client(timeout=20) as cl:
            got = cl.remove_member(old)
        assert sorted(m["id"] for m in got) == rest, got
        new = wait_for("a leader among the others", lambda: current_leader(c, rest), timeout=5)
        load.wait_progress(what="after the leader's removal")
        term = c.status(new)["term"]
        # The removed node knows it (it appended the change itself), and takes no part: over a couple of
        # election timeouts of writes, it neither leads nor campaigns, and the term does not move.
        deadline = time.monotonic() + 4 * ELECTION_TIMEOUT_S
        while time.monotonic() < deadline:
            st = c.status(old)
            assert st is not None and st["role"] == "follower" and not st["member"], st
            assert old not in st["voters"] and old not in st["learners"], st
            time.sleep(0.1)
        load.wait_progress(what="with the removed node still running")
    leader = c.wait_leader(ids=rest)
    load.verify(c, leader)
    st = c.status(leader)
    assert st["term"] == term and st["voters"] == rest, (term, st)
    assert c.alive(old)


# ------------------------------------------------------------------------------------ 4. leadership transfer


def test_transfer_leadership_under_load(make_mcluster: Callable[..., MCluster]) -> None:
    c = make_mcluster()
    leader = c.wait_leader()
    wait_settled(c, leader)
    timings = []
    with Load(c.endpoints, "transfer") as load:
        load.wait_progress()
        # The library, to a named voter.
        target = next(i for i in c.ids if i != leader)
        t0 = time.monotonic()
        with c.client(timeout=10) as cl:
            assert cl.transfer_leader(target) == target
        timings.append(time.monotonic() - t0)
        # A change sent to a leader this new (it may not have committed an entry of its term yet) is
        # taken once it has, not refused `in_progress`.
        c.new_node(9)
        with c.client(timeout=10, ids=[target]) as direct:
            direct.add_member(9, IP, c.peer_ports[9], c.client_ports[9], c.http_ports[9], learner=True)
            direct.remove_member(9)
        st = c.status(target)
        assert st["role"] == "leader", st
        assert c.wait_leader(timeout=2) == target
        load.wait_progress(what=f"after the transfer to node {target}")

        # The CLI, to a named voter: it says who leads, and that node does lead when it returns.
        leader, target = target, next(i for i in c.ids if i != target)
        out = cli_ok(c, "member", "transfer-leader", str(target))
        assert f"node {target} leads" in out, out
        assert c.status(target)["role"] == "leader"
        load.wait_progress(what=f"after the transfer to node {target}")

        # The CLI and the library without an id: the most up-to-date other voter.
        out = cli_ok(c, "member", "transfer-leader")
        now = c.wait_leader(timeout=2)
        assert now != target and f"node {now} leads" in out, (out, now)
        load.wait_progress()
        t0 = time.monotonic()
        with c.client(timeout=10) as cl:
            got = cl.transfer_leader()
        timings.append(time.monotonic() - t0)
        assert got != now and c.status(got)["role"] == "leader"
        load.wait_progress()
    print("transfer times (library): " + ", ".join(f"{t:.3f}" for t in timings) + " s")
    load.verify(c, c.wait_leader())
    assert all(t < 2.0 for t in timings), timings


# ------------------------------------------------------------------------------------ 5. learner from a snapshot


def test_learner_added_after_compaction_gets_a_snapshot(make_mcluster: Callable[..., MCluster]) -> None:
    c = make_mcluster(env={"ZRAFT_SNAPSHOT_THRESHOLD": "300", "ZRAFT_SNAPSHOT_KEEP": "20"})
    leader = c.wait_leader()
    wait_settled(c, leader)
    put_all(c, leader, {b"snap-%05d" % i: b"value-%05d" % i for i in range(1500)})
    out = cli_ok(c, "snapshot", "compact")
    assert "log begins after" in out, out
    st = c.status(leader)
    assert st["snapshot_index"] > 100, st  # index 1.. are gone: only a snapshot can bring a new node up
    c.new_node(4, via=[leader])
    c.start(4, join=True)
    out = cli_ok(c, *c.add_args(4), "--learner")
    assert "node 4 is a learner now" in out, out
    assert voters_learners(c, leader) == ([1, 2, 3], [4])
    st4 = c.wait_caught_up(4, leader)
    assert st4["snapshots"]["installed"] >= 1, st4
    assert st4["voters"] == [1, 2, 3] and st4["learners"] == [4] and st4["member"], st4
    assert st4["role"] == "follower", st4
    # It holds exactly what the leader holds; and once promoted (CLI), it can even lead.
    put_all(c, leader, {b"after-learner": b"1"})
    c.wait_caught_up(4, leader)
    ia, sa = c.state_of(leader)
    ib, sb = c.state_of(4)
    assert sa == sb, (ia, ib, len(sa), len(sb))
    assert len(sa) == 1501
    out = cli_ok(c, "member", "promote", "4")
    assert "node 4 is a voter now" in out, out
    wait_settled(c, leader)
    with c.client(timeout=10, ids=[*c.ids, 4]) as cl:
        assert cl.transfer_leader(4) == 4
        assert cl.get(b"snap-01234") == b"value-01234"


# ------------------------------------------------------------------------------------ 6. membership from disk


def test_membership_comes_back_from_disk_after_restarting_every_node(make_mcluster: Callable[..., MCluster]) -> None:
    c = make_mcluster()
    leader = c.wait_leader()
    wait_settled(c, leader)
    put_all(c, leader, {b"before-%03d" % i: b"x" for i in range(50)})
    c.new_node(4, via=[1])
    c.start(4, join=True)
    c.add_member(4)
    leader = c.wait_leader(ids=[1, 2, 3, 4])
    wait_settled(c, leader)
    with c.client(timeout=20) as cl:
        cl.remove_member(2)
    c.stop(2)
    leader = c.wait_leader(ids=[1, 3, 4])
    put_all(c, leader, {b"after-%03d" % i: b"y" for i in range(50)})
    for i in (1, 3, 4):
        c.wait_caught_up(i, leader)
    original = c.config_path.read_text()
    for i in (1, 3, 4):
        c.kill(i)
    # The original Config.txt (nodes 1, 2, 3) for nodes 1 and 3; node 4's own file (4 and 1) for node 4.
    assert c.config_path.read_text() == original and original.count("\n") == 3
    for i in (1, 3, 4):
        c.start(i)
    leader = c.wait_leader(ids=[1, 3, 4])
    for i in (1, 3, 4):
        rep = members(c, i)
        assert rep is not None and sorted(m["id"] for m in rep["members"]) == [1, 3, 4], rep
        assert all(m["voter"] for m in rep["members"]), rep
    listed = json.loads(cli_ok(c, "member", "list", "--json"))
    assert sorted(m["id"] for m in listed["members"]) == [1, 3, 4], listed
    m4 = next(m for m in listed["members"] if m["id"] == 4)
    assert (m4["port"], m4["client_port"]) == (c.peer_ports[4], c.client_ports[4]), m4
    c.check_all_present(leader, {**{b"before-%03d" % i: b"x" for i in range(50)},
                                 **{b"after-%03d" % i: b"y" for i in range(50)}})
    # Nodes 1 and 3 alone (their Config.txt still lists 2) make a majority of {1, 3, 4}.
    c.kill(4)
    with c.client(timeout=10, ids=[1, 3]) as cl:
        cl.put(b"without-4", b"1")
        assert cl.get(b"without-4") == b"1"


# ------------------------------------------------------------------------------------ 7. bad input


@pytest.fixture
def bad(_module_cluster: MCluster) -> Iterator[tuple[MCluster, int, dict[str, Any]]]:
    """The shared cluster, settled: (cluster, leader, its membership); afterwards the membership
    must be what it was."""
    shared = _module_cluster
    for i in shared.all_ids:
        LOG_FILES.append(shared.log_path(i))
    leader = shared.wait_leader(ids=shared.ids)
    before = wait_settled(shared, leader)
    yield shared, leader, before
    leader = shared.wait_leader(ids=shared.ids)
    after = wait_settled(shared, leader)
    strip = [{k: m[k] for k in ("id", "ip", "port", "client_port", "http_port", "voter")} for m in before["members"]]
    assert [{k: m[k] for k in strip[0]} for m in after["members"]] == strip, after


def expect_refused(fn: Callable[[], Any], code: str, message: str) -> None:
    with pytest.raises(ZraftError) as exc:
        fn()
    assert exc.value.code == code and message in exc.value.message, exc.value


def test_bad_add_existing_id_and_address_in_use(bad: tuple[MCluster, int, dict[str, Any]]) -> None:
    c, leader, _ = bad
    p2 = c.peer_ports[2]
    with c.client(timeout=5) as cl:
        expect_refused(lambda: cl.add_member(2, IP, free_base(1)), "bad_request", "node 2 is already a member")
        # Node 1's peer port, and (another new id) node 3's client port as this one's peer port.
        expect_refused(lambda: cl.add_member(9, IP, c.peer_ports[1], 40001, 40002), "bad_request",
                       f"{IP}:{c.peer_ports[1]} is in use by node 1")
        expect_refused(lambda: cl.add_member(9, IP, c.client_ports[3], 40001, 40002), "bad_request",
                       "is in use by node 3")
    cli_error(c, "member", "add", "2", "--ip", IP, "--port", str(free_base(1)),
              message="bad_request: node 2 is already a member")
    cli_error(c, "member", "add", "9", "--ip", IP, "--port", str(p2),
              message=f"bad_request: {IP}:{p2} is in use by node 2")


def test_bad_promote_remove_transfer_non_members(bad: tuple[MCluster, int, dict[str, Any]]) -> None:
    c, leader, _ = bad
    with c.client(timeout=5) as cl:
        expect_refused(lambda: cl.promote_member(42), "bad_request", "node 42 is not a member")
        expect_refused(lambda: cl.promote_member(2), "bad_request", "node 2 is a voter already")
        expect_refused(lambda: cl.remove_member(42), "bad_request", "node 42 is not a member")
        expect_refused(lambda: cl.transfer_leader(42), "bad_request", "node 42 is not a voter")
    cli_error(c, "member", "promote", "42", message="bad_request: node 42 is not a member")
    cli_error(c, "member", "remove", "42", message="bad_request: node 42 is not a member")
    cli_error(c, "member", "transfer-leader", "42", message="bad_request: node 42 is not a voter")
    assert c.wait_leader(ids=c.ids) == leader  # a refused transfer moves nothing


def test_bad_pending_promotion_is_no_change_in_flight_and_learners_cannot_lead(
        bad: tuple[MCluster, int, dict[str, Any]]) -> None:
    """A member added without --learner that never starts: the add is committed (a learner to be
    promoted) but the command waits for its promotion and gives up (outcome unknown: exit 3). That
    pending promotion does not block other changes; transferring to either learner is refused."""
    c, leader, _ = bad
    for i in (7, 8):
        if i not in c.peer_ports:
            c.new_node(i)
    r = c.cli(*c.add_args(7), "--timeout", "1.5")
    assert r.rc == 3 and "outcome unknown" in r.err and "Traceback" not in r.err, str(r)
    rep = members(c, leader)
    m7 = next(m for m in rep["members"] if m["id"] == 7)
    assert not m7["voter"] and m7["promote"] and rep["committed"], rep
    try:
        got = c.add_member(8, learner=True, timeout=5)  # not in_progress
        assert sorted(m["id"] for m in got if not m["voter"]) == [7, 8], got
        with c.client(timeout=5) as cl:
            expect_refused(lambda: cl.transfer_leader(7), "bad_request", "node 7 is not a voter")
            expect_refused(lambda: cl.transfer_leader(8), "bad_request", "node 8 is not a voter")
        cli_error(c, "member", "transfer-leader", "8", message="bad_request: node 8 is not a voter")
        assert c.wait_leader(ids=c.ids) == leader
    finally:
        with c.client(timeout=10) as cl:
            for i in (7, 8):
                if any(m["id"] == i for m in members(c, c.wait_leader(ids=c.ids))["members"]):
                    cl.remove_member(i)


def test_bad_second_change_in_flight_is_in_progress(bad: tuple[MCluster, int, dict[str, Any]]) -> None:
    """Two add_member requests that reach the leader in one turn of its loop (it is paused while
    they are sent): the first is taken, the second answered in_progress and does not happen."""
    c, leader, _ = bad
    import zmq

    from .cluster import ctx, pack, unpack

    for i in (10, 11):
        if i not in c.peer_ports:
            c.new_node(i)
    socks = []
    try:
        for _ in (10, 11):
            s = ctx().socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(c.endpoint(leader))
            socks.append(s)
        for s in socks:  # connected before the pause (a paused node still accepts at the TCP level)
            assert s.poll(2000, zmq.POLLOUT)
        c.pause(leader)
        try:
            for s, i in zip(socks, (10, 11), strict=True):
                s.send(pack({"op": "add_member", "id": i, "ip": IP, "port": c.peer_ports[i],
                             "client_port": c.client_ports[i], "http_port": c.http_ports[i], "learner": True}))
            time.sleep(0.05)  # (not for correctness: lets both requests reach the paused node's socket)
        finally:
            c.resume(leader)
        replies = []
        for s in socks:
            assert s.poll(5000), "no reply"
            replies.append(unpack(s.recv()))
    finally:
        for s in socks:
            s.close()
    oks = [r for r in replies if r.get("ok")]
    refused = [r for r in replies if not r.get("ok")]
    assert len(oks) == 1 and len(refused) == 1, replies
    assert refused[0]["error"] == "in_progress" and "not committed" in refused[0]["message"], refused
    added = 10 if replies[0].get("ok") else 11
    other = 21 - added
    rep = members(c, leader)
    ids = [m["id"] for m in rep["members"]]
    assert added in ids and other not in ids, rep
    with c.client(timeout=10) as cl:
        cl.remove_member(added)


def test_bad_remove_the_last_voter(make_mcluster: Callable[..., MCluster]) -> None:
    c = make_mcluster(n=1)
    leader = c.wait_leader()
    assert leader == 1
    wait_settled(c, 1)
    with c.client(timeout=5) as cl:
        expect_refused(lambda: cl.remove_member(1), "bad_request", "node 1 is the last voter")
        expect_refused(lambda: cl.transfer_leader(), "bad_request", "no other voter")
    cli_error(c, "member", "remove", "1", message="bad_request: node 1 is the last voter")
    st = c.status(1)
    assert st["role"] == "leader" and st["voters"] == [1] and st["member"], st
    with c.client(timeout=5) as cl:
        cl.put(b"k", b"v")
        assert cl.get(b"k") == b"v"


# ------------------------------------------------------------------------------------ 8. the emptied-disk rule


def test_a_wiped_node_is_refused_under_its_old_id(make_mcluster: Callable[..., MCluster]) -> None:
    c = make_mcluster()
    leader = c.wait_leader()
    before = wait_settled(c, leader)
    put_all(c, leader, {b"w-%03d" % i: b"v" for i in range(100)})
    f = next(i for i in c.ids if i != leader)
    c.wait_caught_up(f, leader)
    term = c.status(leader)["term"]
    c.kill(f)
    shutil.rmtree(c.data_dir / str(f))
    proc = c.start(f)
    assert proc.wait(timeout=30) == 4, output_of_last_start(c.log_path(f))
    out = output_of_last_start(c.log_path(f))
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert f"node {f} refused: node {f} took part in this cluster before" in errors[0], errors
    assert f"zraft member remove {f}" in errors[0] and "zraft member add" in errors[0], errors
    # The cluster did not notice: same leader, same term, same membership, it takes writes.
    rest = [i for i in c.ids if i != f]
    assert c.wait_leader(ids=rest) == leader
    assert c.status(leader)["term"] == term
    after = members(c, leader)
    assert [(m["id"], m["voter"]) for m in after["members"]] == [(m["id"], m["voter"]) for m in before["members"]]
    put_all(c, leader, {b"w2-%03d" % i: b"v" for i in range(50)})


def test_a_node_starting_late_into_a_new_cluster_joins_and_catches_up(make_mcluster: Callable[..., MCluster]) -> None:
    c = make_mcluster(start=False)
    c.start(1)
    c.start(2)
    leader = c.wait_leader(ids=[1, 2])
    wait_settled(c, leader)
    items = {b"early-%03d" % i: b"v%03d" % i for i in range(200)}
    put_all(c, leader, items)
    c.start(3)  # empty data dir, never ran: on probation until the leader says it never saw it
    st = c.wait_caught_up(3, leader)
    wait_for("node 3 off probation and seen", lambda: (s := c.status(3)) and not s["probation"] and s["member"]
             and settled(c, leader) and all(m["seen"] for m in members(c, leader)["members"]))
    assert st["voters"] == [1, 2, 3], st
    # A full voter: with node 1 or 2 gone, node 3 makes the majority.
    other = next(i for i in (1, 2) if i != leader)
    c.kill(other)
    with c.client(timeout=10, ids=[leader, 3]) as cl:
        cl.put(b"late", b"1")
        for k in list(items)[::37]:
            assert cl.get(k) == items[k]


# ------------------------------------------------------------------------------------ 9. SIGTERM of the leader


def test_sigterm_of_the_leader_hands_over(make_mcluster: Callable[..., MCluster]) -> None:
    c = make_mcluster()
    leader = c.wait_leader()
    wait_settled(c, leader)
    rest = [i for i in c.ids if i != leader]
    with Load(c.endpoints, "sigterm") as load:
        load.wait_progress()
        t0 = time.monotonic()
        rc = c.stop(leader)
        exited = time.monotonic()
        new = wait_for("a new leader", lambda: current_leader(c, rest), timeout=5, every=0.01)
        found = time.monotonic()
        load.wait_progress(what="after the leader stopped")
    print(f"SIGTERM -> exit {exited - t0:.3f} s; exit -> node {new} leads (agreed) {found - exited:.3f} s")
    assert rc == 0, f"node {leader} exited {rc} after SIGTERM"
    assert found - exited < 1.0, f"no agreed leader within 1 s of the old leader's exit ({found - exited:.3f} s)"
    assert exited - t0 < 2 * ELECTION_TIMEOUT_S + 1.0, exited - t0
    out = (c.data_dir / str(leader) / "node.log").read_text()
    assert "handing leadership to node" in out, out[-2000:]
    load.verify(c, c.wait_leader(ids=rest))
