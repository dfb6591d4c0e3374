"""Jepsen-style tests: real node processes, concurrent clients, a nemesis, and the
linearizability checker over the whole history.

Each scenario runs ~20 s of faulted operation, kill and membership 24 s (ZRAFT_JEPSEN_DURATION
sets them all), six scenarios in all (the sixth changes the membership while it runs): about
two minutes under faults. The seed of each run is random unless ZRAFT_JEPSEN_SEED is set; it
is printed in the summary (shown with -s, and on failure), so a failing run can be repeated:

    ZRAFT_JEPSEN_SEED=123 bin/test tests/jepsen -k partition -s
    python -m zraft.jepsen --scenario partition --duration 20 --seed 123 --tick-ms 20

(the timing of faults and operations is not reproducible, only the random choices).
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from zraft.client import Client
from zraft.cluster.local import LocalCluster
from zraft.jepsen.history import dump_history
from zraft.jepsen.runner import SCENARIOS, run

pytestmark = pytest.mark.integration

# Seconds of faults per scenario. Two have longer rounds and get more time, so that each still injects a
# good handful of faults: membership (a change, then a fault) and kill (a kill -9 and a restart, with async
# storage; 4 faults in 20 s, the least the test takes, was seen). ZRAFT_JEPSEN_DURATION sets every one.
DURATION = float(os.environ.get("ZRAFT_JEPSEN_DURATION", "0")) or None
DEFAULT_DURATION = {"membership": 24.0, "kill": 24.0}
# Faster elections than the default (50 ms ticks): more leader changes per fault, so the
# same time under faults exercises more of the protocol. Safety does not depend on it.
# Frequent compactions: a node that was killed, paused or cut off comes back through
# InstallSnapshot, so snapshots are checked for linearizability under faults too.
FAST = {"ZRAFT_TICK_MS": "20", "ZRAFT_SNAPSHOT_THRESHOLD": "300", "ZRAFT_SNAPSHOT_KEEP": "30",
        "ZRAFT_SNAPSHOT_CHUNK_BYTES": "512"}
# The kill scenario runs with the Raft log written from the background thread (async storage,
# off by default): kill -9 with writes in flight is what that mode must survive.
ASYNC_STORAGE_SCENARIOS = {"kill"}
# The mixed and membership scenarios run with keys on (CURVE on every socket, as a production cluster
# would; a node added at runtime gets its keypair as `zraft keys add` makes one).
KEYED_SCENARIOS = {"mixed", "membership"}


def _seed() -> int:
    s = os.environ.get("ZRAFT_JEPSEN_SEED")
    return int(s) if s else random.randrange(1 << 31)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2:].split()[0] in (b"Z", b"X")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_is_linearizable(scenario: str, tmp_path: Path) -> None:
    seed = _seed()
    lines: list[str] = []

    def log(s: str) -> None:
        lines.append(s)
        print(s, flush=True)

    env = {**FAST, "ZRAFT_ASYNC_STORAGE": "1"} if scenario in ASYNC_STORAGE_SCENARIOS else FAST
    duration = DURATION or DEFAULT_DURATION.get(scenario, 20.0)
    res = run(scenario, duration=duration, clients=5, nodes=3, seed=seed, keys=5, env=env,
              workdir=str(tmp_path / "cluster"), log=log, with_keys=scenario in KEYED_SCENARIOS)
    summary = res.summary()
    print(summary)
    if not res.ok:
        path = tmp_path / "history.jsonl"
        dump_history(res.history, str(path))
        summary += (f"\n  history written to {path}; re-check it with "
                    f"`python -m zraft.jepsen --check {path}`; node logs in {tmp_path / 'cluster'}")
    # Every node process is gone, whatever happened.
    assert res.pids and all(_gone(p) for p in res.pids), f"node processes left behind: {res.pids}\n{summary}"
    # Faults were injected, of the kind the scenario is about.
    kinds = {f.kind for f in res.faults}
    assert len(res.faults) >= 4, f"only {len(res.faults)} faults injected\n{summary}"
    expect = {"kill": {"kill -9", "stop"}, "pause": {"pause"}, "partition": {"partition", "isolate", "bridge"},
              "leader": {"kill -9", "pause", "isolate", "bridge"},
              "mixed": {"kill -9", "stop", "pause", "partition", "isolate", "bridge"},
              "membership": {"add", "remove"}}
    assert kinds & expect[scenario], f"no {expect[scenario]} fault among {kinds}\n{summary}"
    if scenario == "membership":  # the membership grew and shrank, and every change was done in time
        assert {"add", "remove"} <= kinds, f"not both an add and a remove among {kinds}\n{summary}"
    # The cluster made progress under faults, and came back after them.
    assert res.ok_in_window(writes_only=True) >= 100, f"too little progress under faults\n{summary}"
    assert res.converged, f"the cluster did not converge after healing\n{summary}"
    assert not res.errors, f"errors: {res.errors}\n{summary}"
    assert res.linearizable, f"not linearizable\n{summary}"


# ---------------------------------------------------------------------- targeted tests


def test_local_cluster_kills_every_node_even_when_the_test_fails(tmp_path: Path) -> None:
    """Processes started from another thread survive that thread (PR_SET_PDEATHSIG is per
    thread, so the cluster spawns from its own), and all of them, paused or not, are
    killed by pid when the ``with`` block ends in an exception."""
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="boom"), LocalCluster(3, workdir=tmp_path) as c:
        c.start_all()
        c.wait_for_leader(20)
        t = threading.Thread(target=c.restart, args=(2,))
        t.start()
        t.join()
        time.sleep(0.3)
        assert c.alive(2), "a node restarted from a thread that ended died with it"
        c.pause(1)
        pids = [c.pid(i) for i in c.ids]
        raise RuntimeError("boom")
    assert len(pids) == 3 and all(_gone(p) for p in c.spawned_pids)


def _settled(c: LocalCluster, key: bytes, value: bytes) -> tuple[Client, int, int]:
    """Start the cluster, write ``key``, wait until every node applied it: (client, leader, term)."""
    c.start_all()
    c.wait_for_leader(20)
    client = Client(c.endpoints, timeout=5)
    client.put(key, value)
    st = c.wait_converged(10)
    leader, term = next((s["id"], s["term"]) for s in st.values() if s["role"] == "leader")
    return client, leader, term


def _isolate(c: LocalCluster, node: int) -> None:
    """Cut ``node`` off from every peer, on both sides."""
    others = [i for i in c.ids if i != node]
    assert c.fault(node, "isolate", peers=others) is not None
    for i in others:
        assert c.fault(i, "isolate", peers=[node]) is not None


def _heal(c: LocalCluster) -> None:
    for i in c.ids:
        assert c.fault(i, "clear") is not None


def test_partitioned_old_leader_serves_no_reads_and_no_writes(tmp_path: Path) -> None:
    """Isolate the leader: the majority elects a new one and moves on; the old leader,
    asked directly, must never answer a read or a write with ok (it can't know it is
    still the leader), and its write must never become visible."""
    # Default timing (50 ms ticks): a spurious election from a CPU stall would muddle it.
    with LocalCluster(3, workdir=tmp_path) as c:
        client, old, old_term = _settled(c, b"x", b"before")

        replies: list[tuple[str, float, dict | None]] = []
        stop = threading.Event()

        def ask_old_leader(op: dict) -> None:
            # One request at a time, each waiting for the node's own verdict (deadline 4 s).
            while not stop.is_set():
                t = time.monotonic()
                replies.append((op["op"], t, c.request(old, op, timeout=6.0)))

        _isolate(c, old)
        t_iso = time.monotonic()
        askers = [threading.Thread(target=ask_old_leader, args=(op,), daemon=True)
                  for op in ({"op": "get", "key": b"x"}, {"op": "get", "key": b"x"},
                             {"op": "put", "key": b"x", "value": b"from-the-old-leader"},
                             {"op": "cas", "key": b"x", "expect": b"before", "value": b"cas-on-the-old-leader"})]
        for a in askers:
            a.start()
        new, new_term = c.wait_for_leader(20, exclude=old)
        assert new != old and new_term > old_term
        client.put(b"x", b"after")  # acknowledged by the majority: the old leader's "before" is now stale
        assert client.get(b"x") == b"after"
        # The old leader steps down on its own (check-quorum) and says so.
        deadline = time.monotonic() + 10
        while (st := c.status(old)) is not None and st["role"] == "leader" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert st is not None and st["role"] != "leader", f"the isolated old leader never stepped down: {st}"
        time.sleep(1.5)  # a little more of asking it, after the stale value exists
        stop.set()
        for a in askers:
            a.join(10)
        _heal(c)
        c.wait_converged(20)
        assert client.get(b"x") == b"after"

    assert replies, "no request reached the old leader"
    answered = [(op, t - t_iso, r) for op, t, r in replies if r is not None]
    tally: dict[tuple, int] = {}
    for op, _, r in replies:
        k = (op, "no reply" if r is None else "ok" if r.get("ok") else r.get("error"))
        tally[k] = tally.get(k, 0) + 1
    print(f"old leader {old} (term {old_term}) isolated; new leader {new} (term {new_term}); its answers: {tally}")
    bad = [(op, round(dt, 3), r) for op, dt, r in answered if r.get("ok") or r.get("error") not in ("not_leader",
                                                                                                     "timeout")]
    assert not bad, f"the isolated old leader answered: {bad}"
    assert any(r.get("error") == "not_leader" for _, _, r in answered), f"never said not_leader: {answered}"


def test_rejoining_partitioned_follower_does_not_disrupt_the_leader(tmp_path: Path) -> None:
    """A follower cut off for several election timeouts, then healed, must not raise the
    cluster's term or unseat the leader (pre-vote), and must catch up."""
    # Default timing (50 ms ticks, elections after 0.5-1 s): spurious elections from CPU
    # stalls would be indistinguishable from a disruption by the rejoining node.
    with LocalCluster(3, workdir=tmp_path) as c:
        client, leader, term = _settled(c, b"y", b"0")
        follower = next(i for i in c.ids if i != leader)
        _isolate(c, follower)
        t_end = time.monotonic() + 4.0  # 4 to 8 election timeouts
        n = 0
        while time.monotonic() < t_end:
            n += 1
            client.put(b"y", str(n).encode())  # the majority moves on without it
            time.sleep(0.01)
        st = c.status(follower)
        assert st is not None and st["term"] == term, f"the isolated follower raised its term: {st}"
        assert st["applied_index"] < c.status(leader)["commit_index"]
        _heal(c)
        st = c.wait_converged(20)  # it caught up: every node applied everything
        time.sleep(1.5)  # a few more heartbeat rounds with it back
        st = c.statuses()
        assert c.leader() == (leader, term), f"leader or term changed: {st}"
        assert all(s is not None and s["term"] == term and s["leader"] == leader for s in st.values()), st
        assert client.get(b"y") == str(n).encode()


def test_a_write_whose_reply_is_lost_is_retried_and_applied_once(tmp_path: Path) -> None:
    """The leader applies a write but its reply is dropped (fault injection, ``drop_replies``):
    the client retries within its exactly-once session and gets the first attempt's result;
    the write is not applied a second time. The same retry without a session shows what that
    protects against: the second attempt is applied too (and reports the wrong outcome)."""
    from zraft.client import OutcomeUnknown

    with LocalCluster(3, workdir=tmp_path) as c:
        c.start_all()
        leader, _ = c.wait_for_leader(20)
        c.wait_converged(10)

        # With a session: one lost reply, one retry, the remembered result.
        with Client([c.endpoint(leader)], timeout=8) as client:
            assert c.fault(leader, "drop_replies", count=1)["faults"]["drop_replies"] == 1
            t0 = time.monotonic()
            swapped, value = client.cas(b"once", None, b"first")
            took = time.monotonic() - t0
            assert (swapped, value) == (True, b"first"), "the retry was applied again (it saw its own write)"
            assert took >= 1.0, f"answered in {took:.2f} s: was the reply really dropped?"
            assert c.fault(leader, "show")["faults"]["drop_replies"] == 0, "the fault was never used"
            # A counter makes a double apply visible: cas 0 -> 1 retried must leave 1, not fail.
            client.put(b"counter", b"0")
            c.fault(leader, "drop_replies", count=1)
            assert client.cas(b"counter", b"0", b"1") == (True, b"1")
            assert client.get(b"counter") == b"1"

        # Without a session the client may not retry on its own; done by hand, the retry is a new write.
        with Client([c.endpoint(leader)], timeout=3, exactly_once=False) as raw:
            c.fault(leader, "drop_replies", count=1)
            with pytest.raises(OutcomeUnknown):
                raw.cas(b"twice", None, b"x")
            assert raw.cas(b"twice", None, b"x") == (False, b"x"), "the lost write was not applied at all?"
