"""The coordination API on real processes: revisions, range, txn, and watches that miss nothing across
a leader's death (docs/PROTOCOL.md, "Coordination API")."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from zraft.client import OutcomeUnknown, ZraftError
from zraft.client.txn import absent, get, mod_revision, put, range_, value, version

from .cluster import Cluster, request

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(shared_cluster: Cluster) -> Cluster:
    """One cluster for the module (each test keeps to its own keys, and restarts what it kills)."""
    return shared_cluster


def test_revisions_range_txn_and_meta(cluster: Cluster) -> None:
    with cluster.client() as c:
        r1 = c.put(b"cfg/a", b"1")
        r2 = c.put(b"cfg/b", b"2")
        r3 = c.put(b"cfg/a", b"3")
        assert r1 < r2 < r3
        assert not c.delete(b"cfg/none")  # nothing changed: no revision
        c.put(b"other", b"x")
        meta = c.get_meta(b"cfg/a")
        assert (meta["value"], meta["create_revision"], meta["mod_revision"], meta["version"]) == (
            b"3", r1, r3, 2)
        assert c.get_meta(b"cfg/none")["value"] is None

        r = c.range(prefix=b"cfg/")
        assert [(k, v) for k, v, _ in r.kvs] == [(b"cfg/a", b"3"), (b"cfg/b", b"2")] and not r.more
        assert [rev for _, _, rev in r.kvs] == [r3, r2] and r.revision == r3 + 1
        r = c.range(start=b"cfg/", limit=1, keys_only=True)
        assert r.kvs == [(b"cfg/a", None, r3)] and r.more
        assert [k for k, _, _ in c.range_all(b"cfg/", page=1)] == [b"cfg/a", b"cfg/b"]

        t = c.txn().when(value("cfg/a") == "3", version("cfg/b") == 1).then(
            put("cfg/a", "4"), get("cfg/b"), range_(prefix="cfg/")).otherwise(get("cfg/a")).commit()
        assert t.succeeded and t.revision == r3 + 2
        assert t.responses[1]["value"] == b"2"
        assert [kv[1] for kv in t.responses[2]["kvs"]] == [b"4", b"2"]  # the range sees the put before it
        t = c.txn().when(absent("cfg/a")).then(put("cfg/a", "never")).otherwise(get("cfg/a")).commit()
        assert not t.succeeded and t.responses == [{"ok": True, "value": b"4"}] and t.revision == r3 + 2

        # Bad input gets bad_request and changes nothing.
        for bad in ({"op": "txn", "compare": [["k", "colour", "==", 1]]},
                    {"op": "txn", "success": [{"op": "put", "key": b"k", "value": b"1"},
                                              {"op": "delete", "key": b"k"}]},
                    {"op": "range", "prefix": b"a", "start": b"b"},
                    {"op": "range", "start": b"a", "limit": -1},
                    {"op": "watch", "prefix": b"a"}):
            with pytest.raises(ZraftError) as exc:
                c._call(bad, write=False)
            assert exc.value.code == "bad_request", bad
        assert c.get_meta(b"")["revision"] == r3 + 2


def _watch_all(c: Cluster, seen: list[dict], stop: threading.Event, start_revision: int, errors: list[str]) -> None:
    with c.client() as cl, cl.watch(prefix=b"w/", start_revision=start_revision, poll_s=1.0) as w:
        while not stop.is_set():
            try:
                seen.extend(w.poll())
            except ZraftError as exc:
                errors.append(str(exc))
                return


def test_a_watcher_sees_exactly_the_acknowledged_writes_across_a_leader_kill(cluster: Cluster) -> None:
    """Writes go on while the leader is killed and restarted; a watcher (on whatever node answers)
    gets every acknowledged write's event once, in revision order, and nothing that was not written."""
    with cluster.client() as c:
        start = c.put(b"before", b"x") + 1
    seen: list[dict] = []
    errors: list[str] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_all, args=(cluster, seen, stop, start, errors), daemon=True)
    watcher.start()
    acked: dict[int, tuple[bytes, bytes]] = {}  # revision -> (key, value)
    unknown: set[tuple[bytes, bytes]] = set()
    with cluster.client(timeout=10.0) as c:
        for i in range(300):
            if i == 100:
                leader = cluster.wait_leader()
                cluster.kill(leader)
            if i == 200:
                cluster.restart(leader)
            k, v = b"w/%03d" % (i % 17), b"v%d" % i
            try:
                acked[c.put(k, v)] = (k, v)
            except OutcomeUnknown:
                unknown.add((k, v))
        last = max(acked)
    deadline = time.monotonic() + 20
    while (not seen or seen[-1]["revision"] < last) and time.monotonic() < deadline and not errors:
        time.sleep(0.05)
    stop.set()
    watcher.join(10)
    assert not errors, errors
    revisions = [ev["revision"] for ev in seen]
    assert revisions == sorted(set(revisions)), "events out of order, or one given twice"
    got = {ev["revision"]: (ev["key"], ev["value"]) for ev in seen if ev["revision"] <= last}
    missing = {r: kv for r, kv in acked.items() if got.get(r) != kv}
    assert not missing, f"acknowledged writes the watcher did not see: {sorted(missing.items())[:5]}"
    extra = {r: kv for r, kv in got.items() if r not in acked and kv not in unknown}
    assert not extra, f"events of writes nobody made: {sorted(extra.items())[:5]}"
    assert all(ev["type"] == "put" for ev in seen)


def test_watch_waits_then_answers_and_a_trimmed_history_says_compacted(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(env={"ZRAFT_WATCH_HISTORY_REVISIONS": "5"})
    leader = c.wait_leader()
    ep = c.endpoint(leader)
    with c.client() as cl:
        rev = cl.put(b"k", b"1")
        t0 = time.monotonic()
        rep = request(ep, {"op": "watch", "key": b"k", "start_revision": rev + 1, "timeout": 0.5})
        assert rep["ok"] and rep["events"] == [] and rep["revision"] >= rev and time.monotonic() - t0 >= 0.45
        got: list = []
        waiter = threading.Thread(target=lambda: got.append(
            request(ep, {"op": "watch", "key": b"k", "start_revision": rev + 1, "timeout": 10})))
        waiter.start()
        time.sleep(0.2)
        cl.put(b"unrelated", b"x")  # wakes nothing
        rev2 = cl.put(b"k", b"2")
        waiter.join(10)
        assert got and got[0]["ok"] and [(e["key"], e["value"], e["revision"]) for e in got[0]["events"]] == [
            (b"k", b"2", rev2)]
        for i in range(10):
            cl.put(b"k", b"%d" % i)
        rep = request(ep, {"op": "watch", "key": b"k", "start_revision": rev, "timeout": 1})
        assert not rep["ok"] and rep["error"] == "compacted" and rep["compact_revision"] >= rev


HOLDER = """
import sys, time
from zraft.client import Client
with Client(sys.argv[1:]) as c, c.lease(ttl=3) as lease:
    c.put(b"svc/holder", b"here", lease=lease.id)
    print(lease.id, flush=True)
    while lease.alive:
        time.sleep(0.1)
    print("lost", flush=True)
"""


def _gone_within(c: Cluster, key: bytes, seconds: float) -> float | None:
    t0 = time.monotonic()
    with c.client() as cl:
        while time.monotonic() - t0 < seconds:
            if cl.get(key) is None:
                return time.monotonic() - t0
            time.sleep(0.1)
    return None


def test_a_stopped_lease_holder_loses_its_key_and_a_live_one_keeps_it_through_a_failover(cluster: Cluster) -> None:
    import signal
    import subprocess
    import sys

    from .cluster import child_env

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, *cluster.endpoints], stdout=subprocess.PIPE,
                              text=True, env=child_env())
    try:
        lease = int(holder.stdout.readline())
        with cluster.client() as cl, cl.lease(ttl=3) as mine:
            cl.put(b"svc/mine", b"here", lease=mine.id)
            assert cl.get_meta(b"svc/holder")["lease"] == lease
            # A failover: the new leader gives every lease its full TTL again; both holders keep theirs.
            leader = cluster.wait_leader()
            cluster.kill(leader)
            cluster.wait_leader(ids=[i for i in cluster.ids if i != leader])
            time.sleep(3.5)  # longer than the TTL
            assert cl.get(b"svc/holder") == b"here" and cl.get(b"svc/mine") == b"here" and mine.alive
            cluster.restart(leader)
            # The holder process stops (SIGSTOP): no keepalive; its key goes within the TTL (and a tick).
            holder.send_signal(signal.SIGSTOP)
            took = _gone_within(cluster, b"svc/holder", 10.0)
            assert took is not None and took >= 1.5, f"the stopped holder's key went after {took} s (TTL 3 s)"
            assert cl.get(b"svc/mine") == b"here"
            holder.send_signal(signal.SIGCONT)
            assert holder.stdout.readline().strip() == "lost"  # it learns it lost the lease
        assert _gone_within(cluster, b"svc/mine", 1.0) is not None  # revoked when the block ended
    finally:
        holder.kill()
        holder.wait(10)


LOCKER = """
import os, sys, time
from zraft.client import Client
out, rounds, endpoints = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
with Client(endpoints, timeout=15) as c:
    for i in range(rounds):
        with c.lock("shared", ttl=5) as lock:  # (a TTL a loaded machine's failover stays well within)
            with open(out, "a") as f:
                f.write(f"enter {os.getpid()}\\n")
            time.sleep(0.05)
            assert lock.held
            with open(out, "a") as f:
                f.write(f"exit {os.getpid()}\\n")
print("done", flush=True)
"""


def test_lock_holders_never_overlap_under_a_leader_kill_and_a_killed_holder_frees_it_by_its_ttl(
        cluster: Cluster, tmp_path) -> None:
    import signal
    import subprocess
    import sys

    from .cluster import child_env

    out = tmp_path / "critical.log"
    procs = [subprocess.Popen([sys.executable, "-c", LOCKER, str(out), "6", *cluster.endpoints],
                              stdout=subprocess.PIPE, text=True, env=child_env()) for _ in range(3)]
    try:
        deadline = time.monotonic() + 20
        while (not out.exists() or out.read_text().count("exit") < 4) and time.monotonic() < deadline:
            time.sleep(0.05)
        leader = cluster.wait_leader()
        cluster.kill(leader)  # in the middle of the contention
        for p in procs:
            assert p.stdout.readline().strip() == "done", "a locker did not finish"
            p.wait(30)
        cluster.restart(leader)
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
    lines = out.read_text().split()
    pairs = list(zip(lines[0::2], lines[1::2], strict=True))
    assert len(pairs) == 2 * 3 * 6 and all(
        a == "enter" and c == "exit" and b == d for (a, b), (c, d) in zip(pairs[0::2], pairs[1::2], strict=True)), (
        "two holders were inside at once (or one never left): " + " ".join(lines))

    # A holder killed with SIGKILL keeps the lock until its lease's TTL runs out, then the next one gets it.
    with cluster.client() as c:
        holder = subprocess.Popen([sys.executable, "-c", (
            "import sys, time\nfrom zraft.client import Client\nc = Client(sys.argv[1:])\nl = c.lock('shared', ttl=2)\n"
            "l.acquire()\nprint('held', flush=True)\ntime.sleep(60)\n"), *cluster.endpoints],
            stdout=subprocess.PIPE, text=True, env=child_env())
        try:
            assert holder.stdout.readline().strip() == "held"
            holder.send_signal(signal.SIGKILL)
            holder.wait(10)
            t0 = time.monotonic()
            with c.lock("shared", ttl=2):
                took = time.monotonic() - t0
            assert 0.5 <= took <= 8.0, f"the lock came free {took:.1f} s after its holder died (TTL 2 s)"
        finally:
            holder.kill()
            holder.wait(10)


def test_election_campaign_leader_resign(cluster: Cluster) -> None:
    with cluster.client() as a, cluster.client() as b:
        first, second = a.election("sched", ttl=3), b.election("sched", ttl=3)
        assert first.leader() is None
        first.campaign("node-a")
        assert first.leading and first.leader()[1] == b"node-a"
        got: list[bool] = []
        t = threading.Thread(target=lambda: (second.campaign("node-b"), got.append(True)), daemon=True)
        t.start()
        time.sleep(0.5)
        assert not got and second.leader()[1] == b"node-a"  # b waits its turn
        first.resign()
        t.join(10)
        assert got and second.leading and first.leader()[1] == b"node-b"
        second.resign()
        assert first.leader() is None


def test_the_asyncio_client(cluster: Cluster) -> None:
    import asyncio

    from zraft.aio import Client as AioClient
    from zraft.client.txn import put as txn_put

    async def main() -> None:
        async with AioClient(cluster.endpoints) as c:
            rev = await c.put(b"aio/a", b"1")
            assert await c.get(b"aio/a") == b"1" and (await c.get_meta(b"aio/a"))["mod_revision"] == rev
            seen = []

            async def watch() -> None:
                async for ev in c.watch(prefix=b"aio/", start_revision=rev, poll_s=1.0):
                    seen.append((ev["key"], ev["revision"]))
                    if len(seen) == 3:
                        return

            task = asyncio.create_task(watch())
            r = await c.txn([value("aio/a") == "1"], [txn_put("aio/b", "2")])
            assert r["succeeded"]
            lease = await c.lease_grant(5)
            await c.put(b"aio/c", b"3", lease=lease)
            await asyncio.wait_for(task, 10)
            assert [k for k, _ in seen] == [b"aio/a", b"aio/b", b"aio/c"]
            assert [kv[0] for kv in (await c.range(prefix=b"aio/")).kvs] == [b"aio/a", b"aio/b", b"aio/c"]
            await c.lease_revoke(lease)
            assert await c.get(b"aio/c") is None

    asyncio.run(main())


class _Bank:
    """Jepsen's bank workload on txn: transfers that compare both accounts' mod revisions, and audits."""

    def __init__(self, cluster: Cluster, n: int = 5) -> None:
        self.cluster = cluster
        self.accounts = [b"bank/%d" % i for i in range(n)]
        self.stop = threading.Event()
        self.totals: list[int] = []
        self.done: list[bool] = []
        self.errors: list[str] = []

    def transfer(self, seed: int) -> None:
        import random

        rng = random.Random(seed)
        with self.cluster.client(timeout=10.0) as c:
            while not self.stop.is_set():
                src, dst = rng.sample(self.accounts, 2)
                try:
                    self._move(c, src, dst, rng.randint(1, 20))
                except OutcomeUnknown:
                    pass  # applied or not: either keeps the total
                except ZraftError as exc:
                    self.errors.append(str(exc))

    def _move(self, c, src: bytes, dst: bytes, amount: int) -> None:
        got = {k: (int(v), rev) for k, v, rev in c.range(prefix=b"bank/").kvs}
        if got[src][0] >= amount:
            r = c.txn().when(mod_revision(src) == got[src][1], mod_revision(dst) == got[dst][1]).then(
                put(src, str(got[src][0] - amount)), put(dst, str(got[dst][0] + amount))).commit()
            self.done.append(r.succeeded)

    def audit(self) -> None:
        with self.cluster.client(timeout=10.0) as c:
            while not self.stop.is_set():
                try:
                    self.totals.append(sum(int(v) for _, v, _ in c.range(prefix=b"bank/").kvs))
                except ZraftError:
                    pass
                time.sleep(0.01)


def test_bank_transfers_by_txn_keep_the_total_in_every_range_under_a_leader_kill(cluster: Cluster) -> None:
    """Jepsen's bank test, as a checker of its own for txn: accounts move money between them with
    transactions that compare the accounts' mod revisions (optimistic concurrency) while the leader is
    killed; every range read, one consistent cut, must see the same total, and so must the end."""
    bank = _Bank(cluster)
    with cluster.client() as c:
        for a in bank.accounts:
            c.put(a, b"100")
    threads = [threading.Thread(target=bank.transfer, args=(i,), daemon=True) for i in range(3)]
    threads.append(threading.Thread(target=bank.audit, daemon=True))
    for t in threads:
        t.start()

    def until_transfers(n: int) -> None:
        deadline = time.monotonic() + 30
        while sum(bank.done) < n and time.monotonic() < deadline and not bank.errors:
            time.sleep(0.02)

    until_transfers(15)
    leader = cluster.wait_leader()
    cluster.kill(leader)
    cluster.wait_leader(ids=[i for i in cluster.ids if i != leader])
    until_transfers(sum(bank.done) + 15)  # transfers under the new leader
    cluster.restart(leader)
    bank.stop.set()
    for t in threads:
        t.join(20)
    assert not bank.errors, bank.errors[:5]
    assert sum(bank.done) >= 20, f"only {sum(bank.done)} transfers went through"
    assert bank.totals and set(bank.totals) == {500}, f"a range saw another total: {sorted(set(bank.totals))}"
    with cluster.client() as c:
        assert sum(int(v) for _, v, _ in c.range(prefix=b"bank/").kvs) == 500
