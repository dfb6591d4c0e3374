"""zraft/raft/quorum.py: majority and joint configurations, against their definitions (hypothesis)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from zraft.raft.quorum import NO_LIMIT, JointConfig, MajorityConfig, VoteResult

ids = st.sets(st.integers(1, 9), max_size=7)


def _reached_by_majority(voters: frozenset[int], acked: dict[int, int], index: int) -> bool:
    return sum(1 for v in voters if acked.get(v, 0) >= index) > len(voters) // 2


@given(ids, st.dictionaries(st.integers(1, 9), st.integers(0, 50)))
def test_committed_index_is_the_highest_index_a_majority_holds(voters: set[int], acked: dict[int, int]) -> None:
    c = MajorityConfig(voters)
    got = c.committed_index(acked)
    if not voters:
        assert got == NO_LIMIT
        return
    assert got == 0 or _reached_by_majority(c.ids, acked, got)
    assert not _reached_by_majority(c.ids, acked, got + 1)


def test_committed_index_examples() -> None:
    assert MajorityConfig([1, 2, 3]).committed_index({1: 5, 2: 3, 3: 1}) == 3
    assert MajorityConfig([1, 2, 3]).committed_index({1: 5}) == 0  # missing voters count as 0
    assert MajorityConfig([1, 2, 3, 4]).committed_index({1: 9, 2: 8, 3: 7, 4: 1}) == 7  # 3 of 4
    assert MajorityConfig([1]).committed_index({1: 4}) == 4
    assert MajorityConfig([1, 2]).committed_index({1: 4, 2: 2, 7: 100}) == 2  # non-voters ignored


@given(ids, st.dictionaries(st.integers(1, 9), st.booleans()))
def test_vote_result_matches_its_definition(voters: set[int], votes: dict[int, bool]) -> None:
    c = MajorityConfig(voters)
    result = c.vote_result(votes)
    granted = sum(1 for v in voters if votes.get(v) is True)
    possible = granted + sum(1 for v in voters if v not in votes)
    need = len(voters) // 2 + 1
    if not voters or granted >= need:
        assert result is VoteResult.WON
    elif possible >= need:
        assert result is VoteResult.PENDING
    else:
        assert result is VoteResult.LOST


def test_vote_result_examples() -> None:
    c = MajorityConfig([1, 2, 3])
    assert c.vote_result({1: True}) is VoteResult.PENDING
    assert c.vote_result({1: True, 2: True}) is VoteResult.WON
    assert c.vote_result({1: True, 2: False}) is VoteResult.PENDING
    assert c.vote_result({1: True, 2: False, 3: False}) is VoteResult.LOST
    assert c.vote_result({4: True, 5: True}) is VoteResult.PENDING  # non-voters do not count


@given(ids, ids, st.dictionaries(st.integers(1, 9), st.integers(0, 50)))
def test_joint_committed_index_is_the_lower_of_its_halves(a: set[int], b: set[int], acked: dict[int, int]) -> None:
    j = JointConfig(MajorityConfig(a), MajorityConfig(b))
    assert j.committed_index(acked) == min(MajorityConfig(a).committed_index(acked),
                                           MajorityConfig(b).committed_index(acked))


@given(ids, ids, st.dictionaries(st.integers(1, 9), st.booleans()))
def test_joint_vote_needs_both_halves(a: set[int], b: set[int], votes: dict[int, bool]) -> None:
    ra, rb = MajorityConfig(a).vote_result(votes), MajorityConfig(b).vote_result(votes)
    got = JointConfig(MajorityConfig(a), MajorityConfig(b)).vote_result(votes)
    if ra is VoteResult.LOST or rb is VoteResult.LOST:
        assert got is VoteResult.LOST
    elif ra is VoteResult.WON and rb is VoteResult.WON:
        assert got is VoteResult.WON
    else:
        assert got is VoteResult.PENDING


def test_a_joint_config_without_an_outgoing_half_is_a_majority() -> None:
    j = JointConfig(MajorityConfig([1, 2, 3]))
    assert not j.joint and j.ids == {1, 2, 3}
    assert j.committed_index({1: 5, 2: 3, 3: 1}) == 3
    assert j.vote_result({1: True, 2: True}) is VoteResult.WON
    joint = JointConfig(MajorityConfig([1, 2, 3]), MajorityConfig([3, 4, 5]))
    assert joint.joint and joint.ids == {1, 2, 3, 4, 5}
    assert joint.committed_index({1: 5, 2: 5, 3: 5, 4: 1}) == 1  # the outgoing half holds it back
    assert joint.vote_result({1: True, 2: True}) is VoteResult.PENDING
    assert joint.vote_result({1: True, 2: True, 3: True, 4: True}) is VoteResult.WON
    assert joint.vote_result({4: False, 5: False, 1: True, 2: True}) is VoteResult.LOST
