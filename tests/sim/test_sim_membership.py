"""Membership changes on the simulated cluster: directed scenarios, and mutation tests of their checks.

The random runs (test_sim_random.py) run the membership nemesis in about a third of the seeds (adds,
removals of voters and of the leader itself, promotions, leadership transfers, under every fault mix);
the scenarios here each tell one story through the leader's core (``Cluster.add_node``, ``remove_node``,
``promote_node``, ``transfer_leader``), with the full checker on, and end with ``finish()``: healed,
settled, every member agreeing on the membership. The mutation tests break the core the way a real bug
would and check that the runs notice, with the right complaint.
"""

from __future__ import annotations

import pytest
from raftsim import MEMBERSHIP_SHARE, TICK, Cluster, SimNode, SimulationFailure, random_cluster, run_seed

from zraft.raft import confchange
from zraft.raft.confchange import ConfChangeError, Membership
from zraft.raft.core import RaftNode, Role
from zraft.raft.messages import Entry, EntryType

pytestmark = pytest.mark.sim

ET = 10  # election_ticks in these scenarios


def _settle(c: Cluster, ticks: int = 40 * ET) -> SimNode:
    """Run until quiet, with the membership written down, every member seen and no learner left to promote."""
    def done() -> bool:
        if not c.quiet():
            return False
        m = c.leader().raft.membership
        return m.explicit and all(x.seen for x in m.members) and not any(x.promote for x in m.members)

    assert c.run_until(done, ticks), c.describe()
    return c.leader()


def _write(c: Cluster, n: int = 3) -> None:
    for i in range(n):
        assert c.run_until(lambda: c.leader() is not None and not c.leader().raft.transferring, 5 * ET)
        assert c.propose(c.leader().id, [b"k%d" % i]), "not the leader"
        c.run(1)


def _voters(c: Cluster) -> set[int]:
    return set(c.leader().raft.membership.voters)


@pytest.mark.parametrize("seed", range(3))
def test_grow_from_three_to_five_then_shrink_to_three_new_ones(seed: int) -> None:
    c = Cluster(3, seed=seed, clients=False, election_ticks=ET, linger=2)
    _settle(c)
    for _ in range(2):
        node = c.add_node()
        assert node is not None
        _write(c)
        _settle(c)
        assert node.id in _voters(c)  # promoted by the leader's core once it caught up
    assert _voters(c) == {1, 2, 3, 4, 5}
    for old in (1, 2):
        assert c.remove_node(old) is not None
        _write(c)
        _settle(c)
    assert _voters(c) == {3, 4, 5}
    c.run(3 * ET)
    assert c.nodes[1].retired and c.nodes[2].retired  # kept running a while, then stopped for good
    c.finish()
    assert c.stats["members_added"] == 2 and c.stats["members_promoted"] == 2 and c.stats["members_removed"] == 2


def test_a_fresh_node_catches_up_through_a_snapshot_of_the_compacted_log() -> None:
    c = Cluster(3, seed=1, clients=False, election_ticks=ET, snapshot_threshold=5)
    _settle(c)
    _write(c, 30)
    leader = _settle(c)
    assert leader.raft.log.snapshot_index > 0
    node = c.add_node()
    _settle(c)
    assert node.disk.snap_index > 0 and c.stats["snap_installed"] >= 1
    assert node.id in _voters(c) and node.kv == leader.kv
    c.finish()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("with_write", [False, True], ids=["idle", "write"])
def test_a_leader_that_removes_itself_leads_until_the_removal_commits_then_hands_over(with_write: bool,
                                                                                     seed: int) -> None:
    c = Cluster(3, seed=seed, clients=False, election_ticks=ET, linger=3)
    _settle(c)
    c.add_node()
    old = _settle(c)
    term = old.raft.term
    index = c.remove_node(old.id)
    assert index is not None
    assert old.raft.role is Role.LEADER and old.id not in old.raft.membership.voters
    if with_write:  # (then the others may not hold its last entry when the removal commits: it brings one up
        assert c.propose(old.id, [b"k1"]), "it takes writes until its removal commits"  # to date first)
    start = c.now
    assert c.run_until(lambda: old.raft.role is not Role.LEADER, 2 * ET, every=1)
    assert old.raft.commit_index >= index  # it stepped down because its removal committed
    assert c.run_until(lambda: c.leader() not in (None, old), 3 * ET, every=1)
    assert c.leader().raft.term == term + 1
    assert c.now - start < ET * TICK  # TimeoutNow to an up-to-date voter: less than an election timeout
    assert c.stats["removed_leader_stepped_down"] == 1
    c.run(4 * ET)
    assert old.retired
    c.finish()
    assert old.id not in c.leader().raft.membership


def _remove_an_isolated_follower(c: Cluster):
    """Four nodes; a follower cut off, then removed: (the leader, the removed node, the leader's term),
    once the removal committed (the removed node does not know of it: it still takes itself for a voter)."""
    _settle(c)
    c.add_node()
    leader = _settle(c)
    outcast = next(n for n in c.nodes.values() if n is not leader)
    c.isolate(outcast.id)
    index = c.remove_node(outcast.id)
    assert c.run_until(lambda: leader.raft.commit_index >= index, 5 * ET)
    assert outcast.id in outcast.raft.membership.voters  # it does not know: it campaigns
    return leader, outcast, leader.raft.term


@pytest.mark.parametrize("pre_vote, check_quorum", [(True, True), (True, False), (False, True)])
def test_a_removed_node_that_missed_its_removal_neither_leads_nor_disrupts(pre_vote: bool,
                                                                          check_quorum: bool) -> None:
    c = Cluster(3, seed=5, clients=False, election_ticks=ET, pre_vote=pre_vote, check_quorum=check_quorum,
                linger=1000)
    leader, outcast, term = _remove_an_isolated_follower(c)
    c.run(10 * ET)
    c.heal()
    c.run(10 * ET)
    assert c.leader() is leader and all(n.raft.term == term for n in c.nodes.values() if n is not outcast)
    assert outcast.id not in c.leader_of_term.values()
    c.finish()


def test_without_pre_vote_and_check_quorum_a_removed_node_raises_terms_but_never_leads() -> None:
    """The counterpart: nothing keeps its higher terms out, so it deposes leaders; it still cannot win."""
    c = Cluster(3, seed=5, clients=False, election_ticks=ET, pre_vote=False, check_quorum=False, linger=1000)
    leader, outcast, term = _remove_an_isolated_follower(c)
    c.run(10 * ET)
    c.heal()
    c.run(10 * ET)
    assert max(n.raft.term for n in c.nodes.values() if n is not outcast) > term
    assert outcast.id not in c.leader_of_term.values()
    c.retire(outcast.id, "removed")
    c.finish()


@pytest.mark.parametrize("seed", range(3))
def test_leadership_transfer_to_a_chosen_voter_that_was_behind(seed: int) -> None:
    c = Cluster(5, seed=seed, clients=False, election_ticks=ET)
    leader = _settle(c)
    target = next(n for n in c.nodes.values() if n is not leader)
    c.isolate(target.id)
    _write(c, 5)
    c.heal()
    term = leader.raft.term
    assert c.transfer_leader(target.id) == target.id
    assert leader.raft.transferring and not c.propose(leader.id, [b"k0"])  # no writes meanwhile
    assert c.run_until(lambda: c.leader() is target, ET, every=1), c.describe()
    assert target.raft.term == term + 1
    c.finish()


def test_a_node_added_as_a_learner_never_campaigns_and_votes_only_once_promoted() -> None:
    c = Cluster(3, seed=2, clients=False, election_ticks=ET)
    _settle(c)
    node = c.add_node(learner=True)
    leader = _settle(c)
    m = leader.raft.membership
    assert node.id in m.learners and not m.get(node.id).promote
    c.isolate(leader.id)
    roles = set()
    for _ in range(5 * ET):
        c.run(1)
        roles.add(node.raft.role)
    assert roles == {Role.FOLLOWER}
    c.heal()
    _settle(c)
    assert c.promote_node(node.id) is not None
    _settle(c)
    assert node.id in _voters(c)
    c.finish()


# ---------------------------------------------------------------------- raft-dev, 2015
#
# The single-server change bug Diego Ongaro reported on raft-dev in July 2015: S1 leads {S1..S4} in
# term 1 and starts making S5 a voter, an entry only S5 gets; S1 crashes; S2 is elected in term 2 by
# S2, S3, S4 and at once proposes removing S1, which commits on S2 and S3 (a majority of {S2, S3, S4}),
# S4 having heard nothing of term 2; S1 comes back and, with S4's and S5's votes (a majority of
# {S1..S5}), wins term 3 and overwrites the committed removal. The fix: a leader changes nothing
# before an entry of its own term is committed (S2's no-op would have needed S4, or S1).


def _raft_dev_2015(c: Cluster, mutated: bool) -> None:
    s1 = _settle(c)
    s5 = c.add_node(s1.id, learner=True)
    assert s5 is not None
    s1 = _settle(c)
    others = sorted(set(c.ids) - {s1.id, s5.id})
    c.partition([[s1.id, s5.id], others])
    index = c.promote_node(s5.id, s1.id)  # C_add: voters S1..S5, on S1 and S5 only
    assert index is not None and c.run_until(lambda: s5.disk.last_index >= index, ET, every=1)
    t1 = s1.raft.term
    c.crash(s1.id)
    elected: dict[str, SimNode] = {}

    def new_leader(node: SimNode) -> None:
        if node.id in others and node.raft.term > t1 and not elected:
            rest = [i for i in others if i != node.id]
            elected.update(s2=node, s3=c.nodes[rest[0]], s4=c.nodes[rest[1]])
            c.cut(node.id, rest[1])  # before its first append goes out: S4 hears nothing of term 2

    c.on_leader = new_leader
    c.partition([others, [s5.id]])
    assert c.run_until(lambda: bool(elected), 30 * ET), c.describe()
    c.on_leader = None
    s2, s3, s4 = elected["s2"], elected["s3"], elected["s4"]
    assert s2.raft.role is Role.LEADER and s2.raft.commit_index < s2.raft.log.last_index
    if mutated:
        index = c.remove_node(s1.id, s2.id)
        assert index is not None, "the broken core refused"
        assert c.run_until(lambda: s3.raft.commit_index >= index, 3 * ET, every=1)  # on S2 and S3
    else:
        with pytest.raises(ConfChangeError, match="has not committed an entry of its term"):
            s2.raft.propose_membership(confchange.remove_member(s2.raft.membership, s1.id))
    c.partition([[s1.id, s4.id, s5.id], [s2.id, s3.id]])
    c.restart(s1.id)
    assert c.run_until(lambda: any(n.up and n.raft.role is Role.LEADER and n.raft.term > 2 for n in (s1, s4, s5)),
                       40 * ET), c.describe()
    c.heal()
    c.finish()


@pytest.mark.parametrize("seed", range(3))
def test_raft_dev_2015_a_new_leader_changes_nothing_before_an_entry_of_its_term_commits(seed: int) -> None:
    c = Cluster(4, seed=seed, clients=False, election_ticks=ET, pre_vote=True, check_quorum=False, linger=1000)
    _raft_dev_2015(c, mutated=False)


def _propose_membership_without(skip: str):  # noqa: ANN202 (a stand-in for RaftNode.propose_membership)
    """RaftNode.propose_membership without one of its in-progress checks ("committed": the previous change is
    committed; "term": an entry of the leader's own term is)."""
    def propose_membership(self: RaftNode, new: Membership) -> int:
        if self.role is not Role.LEADER:
            raise ConfChangeError("not_leader", f"node {self.id} is not the leader")
        if self.lead_transferee is not None:
            raise ConfChangeError("in_progress", "a transfer runs")
        if skip != "committed" and not self.membership_committed:
            raise ConfChangeError("in_progress", f"the membership change at index {self.config_index} is not "
                                                 "committed yet")
        if skip != "term" and self.log.term_at(self.log.committed) != self.term:
            raise ConfChangeError("in_progress", "just elected")
        if not new.voters or not self.membership.voter_change_ok(new):
            raise ConfChangeError("bad_request", "one voter at a time")
        index = self.log.last_index + 1
        self.log.append([Entry(self.term, index, new.encode(), EntryType.CONFIG)])
        self._set_membership(new, index)
        self._broadcast_append()
        return index

    return propose_membership


@pytest.mark.parametrize("seed", range(3))
def test_checker_notices_a_change_before_an_entry_of_the_leaders_term_commits(
        monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """The 2015 bug itself: without the fix the removal of S1 is lost after it was committed."""
    monkeypatch.setattr(RaftNode, "propose_membership", _propose_membership_without("term"))
    c = Cluster(4, seed=seed, clients=False, election_ticks=ET, pre_vote=True, check_quorum=False, linger=1000)
    with pytest.raises(SimulationFailure, match="leader completeness"):
        _raft_dev_2015(c, mutated=True)


# ---------------------------------------------------------------------- the checker checks (random runs)


def _membership_seeds(count: int) -> list[int]:
    """Seeds whose random run has the membership nemesis."""
    return [s for s in range(int(3 * count / MEMBERSHIP_SHARE)) if random_cluster(s).membership][:count]


def _must_catch(monkeypatch: pytest.MonkeyPatch, target: object, name: str, replacement: object,
                seeds: list[int], expect: tuple[str, ...]) -> None:
    monkeypatch.setattr(target, name, replacement)
    for seed in seeds:
        try:
            run_seed(seed, 6000)
        except SimulationFailure as exc:
            first = str(exc).splitlines()[0]
            assert any(e in first for e in expect), str(exc)[:3000]
            assert f"ZRAFT_SIM_SEED={seed}" in str(exc)
            return
    raise AssertionError(f"no seed in {seeds} noticed the broken {name}")


def test_checker_notices_a_second_change_before_the_first_commits(monkeypatch: pytest.MonkeyPatch) -> None:
    """One change at a time broken: the leader takes a change while the last one is not committed."""
    _must_catch(monkeypatch, RaftNode, "propose_membership", _propose_membership_without("committed"),
                _membership_seeds(10), ("one change at a time", "election safety", "leader completeness",
                                        "durability", "commit safety", "state machine safety"))


def test_checker_notices_a_removed_leader_that_does_not_step_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """A leader whose own removal committed leads on, counting no one's votes but the new voters'."""
    _must_catch(monkeypatch, RaftNode, "_hand_over_and_step_down", lambda self: None, _membership_seeds(20),
                ("removed leader",))
