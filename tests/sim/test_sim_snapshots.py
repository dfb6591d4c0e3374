"""Directed scenarios for log compaction and InstallSnapshot on the simulated cluster.

Every node compacts aggressively (every few applied entries, keeping none), so a follower
that misses a few writes can only come back through a snapshot stream. Each scenario runs
with the full safety checker on, over a few seeds, and ends with ``finish()`` (heal, settle,
identical KV everywhere, logs that agree where they overlap). The mutation tests at the end
break the snapshot path on purpose and check that the random runs notice.
"""

from __future__ import annotations

import pytest
from raftsim import Cluster, SimNode
from test_sim_scenarios import _must_catch

from zraft.raft.core import Role
from zraft.raft.snapshot import SENDING

pytestmark = pytest.mark.sim

ELECTION = 10
KEYS = [b"k%d" % i for i in range(12)]
SEEDS = range(4)


def _cluster(n: int, seed: int, **kw: object) -> Cluster:
    opts = dict(clients=False, election_ticks=ELECTION, keys=len(KEYS), snapshot_threshold=4, snapshot_keep=0,
                chunk_items=1, snapshot_window=2, snapshot_retry_ticks=3, snapshot_give_up_ticks=10 * ELECTION)
    opts.update(kw)
    return Cluster(n, seed, **opts)


def _elect(c: Cluster) -> SimNode:
    return c.settled_leader(20 * ELECTION)


def _write(c: Cluster, leader: SimNode, rounds: int = 8) -> None:
    """Write every key, ``rounds`` times, through the leader (the KV gets len(KEYS) records)."""
    for r in range(rounds):
        assert c.propose(leader.id, KEYS[r % 3::3] or KEYS), "not the leader"
        c.run(1)


def _lagging(c: Cluster, leader: SimNode) -> SimNode:
    return next(n for n in c.nodes.values() if n is not leader)


def _behind_the_leaders_snapshot(c: Cluster, leader: SimNode, follower: SimNode) -> None:
    """The entries the follower needs next are compacted away on the leader."""
    c.run(3)
    assert leader.raft.log.snapshot_index > follower.disk.last_index, c.describe()


def _left_behind(c: Cluster) -> tuple[SimNode, SimNode]:
    """Elect, cut a follower off while the leader writes and compacts past what the follower
    holds, then heal: only a snapshot can bring it back."""
    leader = _elect(c)
    follower = _lagging(c, leader)
    c.isolate(follower.id)
    _write(c, leader)
    _behind_the_leaders_snapshot(c, leader, follower)
    c.heal()
    return leader, follower


def _mid_install(c: Cluster) -> tuple[SimNode, SimNode]:
    """:func:`_left_behind`, then run until the follower is in the middle of the install."""
    leader, follower = _left_behind(c)
    _until_mid_install(c, follower)
    return leader, follower


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [3, 5])
def test_partitioned_follower_comes_back_through_install_snapshot(n: int, seed: int) -> None:
    c = _cluster(n, seed)
    leader, follower = _left_behind(c)
    assert c.run_until(c.quiet, 30 * ELECTION), c.describe()
    assert c.stats["snap_installed"] >= 1 and c.stats["snap_sent"] >= 1
    assert follower.raft.log.snapshot_index > 0
    assert follower.kv == leader.kv and len(follower.kv) == len(KEYS)
    c.finish()


@pytest.mark.parametrize("seed", SEEDS)
def test_follower_down_while_the_leader_compacts_restarts_into_a_snapshot(seed: int) -> None:
    c = _cluster(3, seed)
    leader = _elect(c)
    follower = _lagging(c, leader)
    _write(c, leader, 2)
    c.crash(follower.id)
    _write(c, leader)
    _behind_the_leaders_snapshot(c, leader, follower)
    c.restart(follower.id)
    assert c.run_until(c.quiet, 30 * ELECTION), c.describe()
    assert c.stats["snap_installed"] >= 1
    # The restarted node's log now begins after the snapshot, on disk too.
    assert follower.disk.snap_index == follower.raft.log.snapshot_index > 0
    c.finish()


def _until_mid_install(c: Cluster, follower: SimNode, staged: int = 2) -> None:
    """Run until the follower has staged at least ``staged`` records of a stream it has not completed."""
    def mid() -> bool:
        d = follower.disk
        return (follower.up and follower.receiver.active and not follower.receiver.completed
                and d.staged is not None and len(d.staged) >= staged)
    assert c.run_until(mid, 30 * ELECTION, every=1), c.describe()




@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("window", [1, 4])
def test_follower_crash_mid_install_loses_the_staged_part_and_keeps_its_old_state(window: int,
                                                                                   seed: int) -> None:
    c = _cluster(3, seed, snapshot_window=window)
    leader, follower = _mid_install(c)
    d = follower.disk
    before = (dict(d.kv), d.applied, d.snap_index, list(d.entries), d.hard_state)
    c.crash(follower.id)
    assert c.stats["install_crashes"] == 1
    assert d.staged is not None  # still there while the node is down ...
    c.run(5)
    c.restart(follower.id)  # (the checker compares the restarted KV with the committed log's)
    assert d.staged is None  # ... and gone once it restarts
    assert (d.kv, d.applied, d.snap_index, d.entries, d.hard_state) == before
    assert c.stats["snap_installed"] == 0
    # The leader's stream fails (the restarted receiver refuses it) or times out; a new one gets through.
    assert c.run_until(c.quiet, 40 * ELECTION), c.describe()
    assert c.stats["snap_failed"] >= 1 and c.stats["snap_installed"] >= 1
    assert follower.kv == leader.kv
    c.finish()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("how", ["crash", "isolate"])
def test_leader_change_mid_stream_the_new_leader_streams_its_own_snapshot(how: str, seed: int) -> None:
    c = _cluster(5, seed, snapshot_window=1)
    leader, follower = _mid_install(c)
    assert follower.id in leader.outgoing and leader.outgoing[follower.id].state == SENDING
    old_term = leader.raft.term
    if how == "crash":
        c.crash(leader.id)
    else:
        c.isolate(leader.id)
    assert c.run_until(lambda: (c.leader() is not None and c.leader() is not leader
                                and c.leader().raft.term > old_term), 20 * ELECTION), c.describe()
    new = c.leader()
    _write(c, new, 3)  # the new leader writes and compacts on: the follower needs its snapshot
    assert c.run_until(lambda: follower.raft.log.snapshot_index > 0 and follower.raft.term > old_term
                       and follower.raft.commit_index >= new.raft.log.snapshot_index, 40 * ELECTION), c.describe()
    assert c.stats["snap_installed"] >= 1
    if how == "isolate":
        assert leader.raft.role is not Role.LEADER or leader.raft.term == old_term
    c.heal()
    c.finish()
    assert follower.kv == new.kv


def test_a_snapshot_the_follower_already_has_is_refused_and_the_stream_still_ends() -> None:
    """The follower catches up by appends while the stream is in flight: the core refuses it."""
    refused = 0
    for seed in range(12):
        c = _cluster(3, seed, snapshot_window=1, latency=(1, 4 * 10))
        leader = _elect(c)
        follower = _lagging(c, leader)
        c.isolate(follower.id)
        _write(c, leader)
        c.heal()
        c.finish()
        refused += c.stats["snap_refused"]
    assert refused  # (the finish() of each run checked that every stream ended and the cluster settled)


# ---------------------------------------------------------------------- the checker checks




def test_checker_notices_a_receiver_that_skips_a_missing_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out-of-order chunks taken as they come: the installed KV misses records."""
    from zraft.raft.snapshot import SnapshotReceiver

    original = SnapshotReceiver.on_chunk

    def on_chunk(self: SnapshotReceiver, c: object, term: int) -> object:
        if c.src == self.src and c.stream == self.stream and c.seq > self.expected and not self.completed:
            self.expected = c.seq  # pretend the gap is not there
        return original(self, c, term)

    _must_catch(monkeypatch, SnapshotReceiver, "on_chunk", on_chunk, list(range(40)), "differs from the committed")


def test_checker_notices_a_snapshot_that_keeps_a_conflicting_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """RaftLog.restore broken: keep the entries after the index even when the log lacks (index, term)."""
    from zraft.raft.log import RaftLog

    def restore(self: RaftLog, index: int, term: int) -> None:
        keep = [e for e in self.entries if e.index > index]
        self.entries = keep if keep and keep[0].index == index + 1 else []
        self.snapshot_index, self.snapshot_term = index, term
        self.unstable_from = max(self.unstable_from, index + 1)
        self.committed = self.applied = index

    _must_catch(monkeypatch, RaftLog, "restore", restore, list(range(60)), "disk log")
