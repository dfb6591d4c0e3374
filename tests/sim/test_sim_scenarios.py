"""Directed scenarios on the simulated cluster: pre-vote, check-quorum, reads on a deposed leader.

Each runs with the full safety checker on (any violation fails the test), on a few seeds,
and each has a counterpart showing that the property really comes from the feature under
test: without it the same scenario goes the other way.
"""

from __future__ import annotations

import pytest
from raftsim import MIXES, Cluster, SimNode, SimulationFailure, run_seed

from zraft.raft.core import Role

pytestmark = pytest.mark.sim

ELECTION = 10  # election_ticks in these scenarios


def _elect(c: Cluster) -> SimNode:
    return c.settled_leader(20 * ELECTION)


def _write(c: Cluster, node: SimNode, n: int = 3) -> None:
    for _ in range(n):
        assert c.propose(node.id, [b"k0"]), "not the leader"
        c.run(1)


def _terms(c: Cluster) -> dict[int, int]:
    return {n.id: n.raft.term for n in c.nodes.values()}


SEEDS = range(6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("writes_meanwhile", [False, True], ids=["idle", "writes"])
def test_prevote_rejoining_node_does_not_raise_the_term(writes_meanwhile: bool, seed: int) -> None:
    c = Cluster(3, seed=seed, clients=False, election_ticks=ELECTION, pre_vote=True, check_quorum=True)
    leader = _elect(c)
    _write(c, leader)
    term = leader.raft.term
    outcast = next(n for n in c.nodes.values() if n is not leader)

    c.isolate(outcast.id)
    roles = set()
    for _ in range(10 * ELECTION):  # ten election timeouts alone
        if writes_meanwhile:
            c.propose(leader.id, [b"k1"])
        c.run(1)
        roles.add(outcast.raft.role)
        assert outcast.raft.term == term, "the isolated node raised its term"
    assert Role.PRE_CANDIDATE in roles, "the isolated node never even tried to campaign"

    c.heal()
    assert c.run_until(c.quiet, 10 * ELECTION), c.describe()
    assert c.leader() is leader
    assert set(_terms(c).values()) == {term}
    assert outcast.raft.log.entries == leader.raft.log.entries
    c.finish()


def test_without_prevote_the_rejoining_node_deposes_the_leader() -> None:
    """The counterpart: the same story without pre-vote ends with a new term."""
    c = Cluster(3, seed=7, clients=False, election_ticks=ELECTION, pre_vote=False, check_quorum=True)
    leader = _elect(c)
    _write(c, leader)
    term = leader.raft.term
    outcast = next(n for n in c.nodes.values() if n is not leader)
    c.isolate(outcast.id)
    c.run(10 * ELECTION)
    assert outcast.raft.term > term + 3
    c.heal()
    assert c.run_until(c.quiet, 20 * ELECTION), c.describe()
    assert min(_terms(c).values()) > term
    c.finish()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [3, 5])
def test_check_quorum_partitioned_leader_steps_down_within_two_election_timeouts(n: int, seed: int) -> None:
    c = Cluster(n, seed=seed, clients=False, election_ticks=ELECTION, check_quorum=True)
    leader = _elect(c)
    _write(c, leader)
    c.isolate(leader.id)
    ticks = 0
    while leader.raft.role is Role.LEADER:
        c.run(1)
        ticks += 1
        assert ticks <= 2 * ELECTION + 1, f"still leader after {ticks} ticks alone"
    assert ticks >= 1
    assert leader.raft.leader is None
    # Meanwhile the majority elected someone else, in a later term.
    assert c.run_until(lambda: c.leader() is not None and c.leader() is not leader, 5 * ELECTION)
    assert c.leader().raft.term > leader.raft.term
    c.heal()
    c.finish()


def test_without_check_quorum_a_partitioned_leader_stays_leader() -> None:
    c = Cluster(3, seed=11, clients=False, election_ticks=ELECTION, check_quorum=False)
    leader = _elect(c)
    c.isolate(leader.id)
    c.run(10 * ELECTION)
    assert leader.raft.role is Role.LEADER
    assert len(c.leaders_now()) == 2  # in different terms: the majority moved on
    c.heal()
    c.finish()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("check_quorum", [True, False])
def test_deposed_leader_never_serves_reads_issued_after_it_was_cut_off(check_quorum: bool, seed: int) -> None:
    c = Cluster(3, seed=seed, clients=False, election_ticks=ELECTION, check_quorum=check_quorum)
    old = _elect(c)
    _write(c, old)
    before = c.read(old.id)  # issued while it is the leader: served
    assert c.run_until(lambda: before.state == "served", ELECTION)

    c.isolate(old.id)
    reads = []
    new = None
    for _ in range(6 * ELECTION):
        if old.raft.role is Role.LEADER:
            reads.append(c.read(old.id))
        leaders = [n for n in c.leaders_now() if n is not old]
        if leaders:
            new = leaders[0]
            c.propose(new.id, [b"k0"])  # the majority writes on: a read on the old leader would be stale
        c.run(1)
        assert all(r.state == "pending" or r.state == "dropped" for r in reads)
    assert len(reads) >= ELECTION
    assert new is not None and new.raft.term > old.raft.term
    if check_quorum:
        assert old.raft.role is not Role.LEADER
        assert all(r.state == "dropped" for r in reads)  # dropped as it stepped down
    else:
        assert old.raft.role is Role.LEADER  # it does not know; its reads wait for a quorum forever
        assert all(r.state == "pending" for r in reads)
    c.heal()
    c.finish()  # it learns of the new term: the rest are dropped, none served
    assert all(r.state == "dropped" for r in reads)
    assert c.stats["served"] == 1


# ---------------------------------------------------------------------- the checker checks
#
# Break the core on purpose, the way a real bug would: the random runs must notice, with the
# right complaint, and the failure must name its seed. Without these, a checker that checks
# nothing would pass every seed too.


def _must_catch(monkeypatch: pytest.MonkeyPatch, target: object, name: str, replacement: object,
                seeds: list[int], expect: str) -> None:
    monkeypatch.setattr(target, name, replacement)
    for seed in seeds:
        try:
            run_seed(seed, 6000)
        except SimulationFailure as exc:
            assert expect in str(exc).splitlines()[0], str(exc)[:3000]
            assert f"ZRAFT_SIM_SEED={seed}" in str(exc)
            return
    raise AssertionError(f"no seed in {seeds} noticed the broken {name}")


def _seeds_of(mix_name: str, count: int) -> list[int]:
    """Seeds that random_cluster runs with this fault mix, 3 and 5 nodes alternating."""
    m = next(i for i, mix in enumerate(MIXES) if mix.name == mix_name)
    return [2 * (len(MIXES) * k + m) + k % 2 for k in range(count)]


def test_checker_notices_votes_for_stale_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """5.4.1 broken: vote for any candidate, however stale its log."""
    from zraft.raft.log import RaftLog

    _must_catch(monkeypatch, RaftLog, "is_up_to_date", lambda self, i, t: True, list(range(40)),
                "leader completeness")


def test_checker_notices_commits_counted_for_earlier_terms(monkeypatch: pytest.MonkeyPatch) -> None:
    """5.4.2 broken (Figure 8): commit by counting replicas whatever the entry's term."""
    from zraft.raft.core import RaftNode

    original = RaftNode._maybe_commit

    def maybe_commit(self: RaftNode) -> None:
        original(self)
        matches = sorted((pr.match for pr in self.progress.values()), reverse=True)
        self.log.commit_to(matches[len(matches) // 2])

    _must_catch(monkeypatch, RaftNode, "_maybe_commit", maybe_commit, _seeds_of("leader churn", 40),
                "leader completeness")


def test_checker_notices_reads_served_without_a_heartbeat_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """ReadIndex broken: answer at once with the commit index, without confirming leadership."""
    from zraft.raft.core import RaftNode, ReadState

    def read_index(self: RaftNode, ids: list) -> None:
        if self.role is Role.LEADER:
            self._reads_ready.extend(ReadState(i, self.log.committed) for i in ids)
        else:
            self._reads_dropped.extend(ids)

    _must_catch(monkeypatch, RaftNode, "read_index", read_index, list(range(40)), "linearizability")


def test_checker_notices_a_driver_that_forgets_the_vote(monkeypatch: pytest.MonkeyPatch) -> None:
    """Persist-before-send broken: the vote is sent but never reaches the disk."""
    from zraft.raft.core import HardState, RaftNode, Ready

    original = RaftNode.ready

    def ready(self: RaftNode) -> Ready:
        rd = original(self)
        if rd.hard_state is not None and rd.hard_state.voted_for not in (None, self.id):
            rd.hard_state = HardState(rd.hard_state.term, None)
        return rd

    _must_catch(monkeypatch, RaftNode, "ready", ready, list(range(10)), "grants")


def _async_seeds(count: int) -> list[int]:
    """Seeds whose cluster writes in the background (async storage), any fault mix."""
    from raftsim import random_cluster

    return [s for s in range(4 * count) if random_cluster(s).async_writes][:count]


def test_async_seeds_lose_writes_in_flight_and_drain_for_snapshots() -> None:
    """The async runs exercise what they are for: crashes with writes in flight, and drains."""
    totals = {"async_writes": 0, "lost_writes": 0, "drains": 0}
    for seed in _async_seeds(20):
        c = run_seed(seed, 3000)
        for k in totals:
            totals[k] += c.stats[k]
    assert totals["async_writes"] > 10_000 and totals["lost_writes"] > 10 and totals["drains"] > 5, totals


def test_checker_notices_a_leader_that_counts_itself_before_its_write_is_durable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Async storage broken: the leader counts its own copy the moment it hands an entry out."""
    from zraft.raft.core import RaftNode, Ready

    original = RaftNode.ready

    def ready(self: RaftNode) -> Ready:
        rd = original(self)
        if rd.entries and self.role is Role.LEADER:
            self.stable_index = self.progress[self.id].match = rd.entries[-1].index
            self._maybe_commit()
        return rd

    _must_catch(monkeypatch, RaftNode, "ready", ready, _async_seeds(40), "durability")


def test_checker_notices_a_driver_that_sends_before_it_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The production driver broken: every message of a Ready goes out before its write (votes and
    acknowledgements too). The simulation runs that driver, so it must notice."""
    from zraft.node.driver import Driver

    original = Driver._handle_ready

    def handle_ready(self: Driver, rd: object) -> None:
        self.transport.send(rd.messages)
        rd.messages = []
        original(self, rd)

    _must_catch(monkeypatch, Driver, "_handle_ready", handle_ready, list(range(10)), "disk")
