"""One test per rule of the Raft paper's Figure 2 (and sections 5.2-5.4), after etcd-io/raft's
raft_paper_test.go, plus the ReadIndex rules of the thesis (6.4).

Each test drives a single RaftNode with hand-made messages and asserts on what comes out
of ready(): the hard state to persist, the entries to persist, the messages to send, the
entries to apply and the reads to answer. Test names say which rule they check.
"""

from __future__ import annotations

import random

import pytest

from zraft.raft.core import HardState, RaftConfig, RaftNode, ReadState, Ready, Role
from zraft.raft.log import RaftLog
from zraft.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    Heartbeat,
    HeartbeatResponse,
    RequestVote,
    RequestVoteResponse,
)
from zraft.raft.tracker import ProgressState

ET = 10  # election_ticks


def ents(*terms: int, start: int = 1) -> list[Entry]:
    """Entries with the given terms at indexes start, start + 1, ..."""
    return [Entry(t, start + i, b"e%d/%d" % (start + i, t)) for i, t in enumerate(terms)]


def new_node(id: int = 1, n: int = 3, term: int = 0, vote: int | None = None, log: tuple[int, ...] = (),
             applied: int = 0, pre_vote: bool = False, check_quorum: bool = False, seed: int = 0,
             **kw: object) -> RaftNode:
    config = RaftConfig(id=id, voters=tuple(range(1, n + 1)), election_ticks=ET, pre_vote=pre_vote,
                        check_quorum=check_quorum, **kw)
    return RaftNode(config, HardState(term, vote), RaftLog(ents(*log), applied=applied), random.Random(seed))


def drain(r: RaftNode) -> Ready:
    rd = r.ready()
    assert not r.has_ready()
    return rd


def only(rd: Ready, cls: type) -> list:
    return [m for m in rd.messages if isinstance(m, cls)]


def elect(r: RaftNode) -> Ready:
    """Make ``r`` (pre_vote off) leader of term + 1 with the fewest votes; return the Ready of that."""
    r.campaign()
    assert r.role is Role.CANDIDATE
    drain(r)
    for p in r.peers[: len(r.peers) // 2]:
        r.step(RequestVoteResponse(r.term, p, r.id, granted=True))
    assert r.role is Role.LEADER
    return drain(r)


def leader(n: int = 3, log: tuple[int, ...] = (), term: int | None = None, **kw: object) -> RaftNode:
    """A leader whose no-op is persisted (self counted) but not yet acknowledged by anyone."""
    r = new_node(1, n, term=max(log, default=0) if term is None else term, log=log, **kw)
    elect(r)
    return r


def ack(r: RaftNode, src: int, index: int) -> None:
    r.step(AppendEntriesResponse(r.term, src, r.id, success=True, match_index=index))


def commit_noop(r: RaftNode) -> None:
    for p in r.peers[: len(r.peers) // 2]:
        ack(r, p, r.log.last_index)
    assert r.commit_index == r.log.last_index
    drain(r)


def tick(r: RaftNode, times: int) -> None:
    for _ in range(times):
        r.tick()


# =============================================================================== all servers


@pytest.mark.parametrize("role", ["follower", "pre-candidate", "candidate", "leader"])
@pytest.mark.parametrize("kind", ["AppendEntries", "Heartbeat", "AppendEntriesResponse", "RequestVote",
                                  "RequestVoteResponse", "HeartbeatResponse"])
def test_all_servers_rpc_with_higher_term_sets_current_term_and_converts_to_follower(role: str,
                                                                                     kind: str) -> None:
    """All servers: if RPC request or response contains term T > currentTerm: set currentTerm = T,
    convert to follower (5.1)."""
    r = new_node(term=2, log=(1, 2), pre_vote=role == "pre-candidate")
    if role == "leader":
        elect(r)
    elif role != "follower":
        r.campaign()
        drain(r)
    assert r.role.value == role
    t = r.term + 3
    m = {
        "AppendEntries": AppendEntries(t, 2, 1, 2, 2, [], 0),
        "Heartbeat": Heartbeat(t, 2, 1, 0, 0),
        "AppendEntriesResponse": AppendEntriesResponse(t, 2, 1, success=False),
        "RequestVote": RequestVote(t, 2, 1, 0, 0),  # a candidate with a stale log: no vote
        "RequestVoteResponse": RequestVoteResponse(t, 2, 1, granted=False),
        "HeartbeatResponse": HeartbeatResponse(t, 2, 1, 0),
    }[kind]
    r.step(m)
    assert r.term == t
    assert r.role is Role.FOLLOWER
    assert r.voted_for is None
    assert r.leader == (2 if kind in ("AppendEntries", "Heartbeat") else None)
    rd = drain(r)
    assert rd.hard_state == HardState(t, None)
    assert not only(rd, RequestVoteResponse) or not only(rd, RequestVoteResponse)[0].granted


@pytest.mark.parametrize("kind", ["AppendEntriesResponse", "RequestVote", "RequestVoteResponse",
                                  "HeartbeatResponse"])
def test_all_servers_rpc_with_stale_term_is_ignored(kind: str) -> None:
    """All servers: a message from an older term changes nothing (5.1)."""
    r = leader(3, log=(1, 1), term=4)
    before = (r.term, r.role, r.voted_for, r.log.last_index, r.commit_index)
    m = {
        "AppendEntriesResponse": AppendEntriesResponse(2, 2, 1, success=True, match_index=3),
        "RequestVote": RequestVote(2, 2, 1, 9, 9),
        "RequestVoteResponse": RequestVoteResponse(2, 2, 1, granted=True),
        "HeartbeatResponse": HeartbeatResponse(2, 2, 1, 5),
    }[kind]
    r.step(m)
    assert (r.term, r.role, r.voted_for, r.log.last_index, r.commit_index) == before
    assert not r.has_ready()
    assert r.progress[2].match == 0


def test_all_servers_apply_committed_entries_in_log_order_once() -> None:
    """All servers: if commitIndex > lastApplied: increment lastApplied, apply log[lastApplied] (5.3)."""
    r = new_node(term=1, log=(1, 1, 1, 1), applied=1)
    r.step(AppendEntries(1, 2, 1, 4, 1, [], commit=3))
    rd = drain(r)
    assert rd.committed == ents(1, 1, 1)[1:3]
    assert r.applied_index == 3
    r.step(AppendEntries(1, 2, 1, 4, 1, [], commit=4))
    assert drain(r).committed == [ents(1, 1, 1, 1)[3]]
    r.step(AppendEntries(1, 2, 1, 4, 1, [], commit=4))
    assert drain(r).committed == []


# =============================================================================== RequestVote RPC


def test_request_vote_receiver_rule1_reply_false_if_term_less_than_current_term() -> None:
    """RequestVote receiver 1: reply false if term < currentTerm (5.1). Here: no vote, no change."""
    r = new_node(term=5, log=(1,))
    r.step(RequestVote(4, 2, 1, 5, 4))
    rd = drain(r)
    assert r.voted_for is None and r.term == 5
    assert not any(m.granted for m in only(rd, RequestVoteResponse))
    assert rd.hard_state is None


def test_request_vote_receiver_rule2_grants_one_vote_per_term_first_come_first_served() -> None:
    """RequestVote receiver 2: if votedFor is null or candidateId, and the candidate's log is at
    least as up-to-date as the receiver's, grant vote (5.2, 5.4)."""
    r = new_node(term=1, log=(1,))
    r.step(RequestVote(2, 2, 1, 1, 1))
    rd = drain(r)
    assert only(rd, RequestVoteResponse) == [RequestVoteResponse(2, 1, 2, granted=True)]
    # The vote is in the hard state of the same Ready as the response: persisted before it is sent.
    assert rd.hard_state == HardState(2, 2)

    r.step(RequestVote(2, 3, 1, 1, 1))  # another candidate, same term: refused
    rd = drain(r)
    assert only(rd, RequestVoteResponse) == [RequestVoteResponse(2, 1, 3, granted=False)]
    assert rd.hard_state is None and r.voted_for == 2

    r.step(RequestVote(2, 2, 1, 1, 1))  # the same candidate again (a retry): granted again
    assert only(drain(r), RequestVoteResponse) == [RequestVoteResponse(2, 1, 2, granted=True)]

    r.step(RequestVote(3, 3, 1, 1, 1))  # a new term: a new vote
    rd = drain(r)
    assert only(rd, RequestVoteResponse) == [RequestVoteResponse(3, 1, 3, granted=True)]
    assert rd.hard_state == HardState(3, 3)


@pytest.mark.parametrize(
    "voter_log, cand_index, cand_term, granted",
    [
        ((1, 1, 2), 3, 2, True),  # same last term, same length
        ((1, 1, 2), 4, 2, True),  # same last term, longer
        ((1, 1, 2), 2, 2, False),  # same last term, shorter
        ((1, 1, 2), 1, 3, True),  # higher last term wins even with a much shorter log
        ((1, 1, 2), 9, 1, False),  # lower last term loses even with a much longer log
        ((), 0, 0, True),  # both empty
        ((1,), 0, 0, False),  # empty candidate, non-empty voter
    ],
)
def test_request_vote_receiver_rule2_up_to_date_check_5_4_1(voter_log: tuple[int, ...], cand_index: int,
                                                            cand_term: int, granted: bool) -> None:
    """5.4.1: the log with the later last term is more up to date; with equal last terms, the longer."""
    r = new_node(term=3, log=voter_log)
    r.step(RequestVote(4, 2, 1, cand_index, cand_term))
    rd = drain(r)
    assert only(rd, RequestVoteResponse) == [RequestVoteResponse(4, 1, 2, granted=granted)]
    assert r.voted_for == (2 if granted else None)
    assert rd.hard_state == HardState(4, 2 if granted else None)


# =============================================================================== AppendEntries RPC


def test_append_entries_receiver_rule1_reply_false_if_term_less_than_current_term() -> None:
    """AppendEntries receiver 1: reply false if term < currentTerm (5.1); the reply carries our term
    so the stale leader steps down (here with pre-vote or check-quorum on, as etcd does)."""
    r = new_node(term=3, log=(1, 2), check_quorum=True)
    r.step(AppendEntries(2, 2, 1, 2, 2, ents(2, start=3), commit=3))
    rd = drain(r)
    assert only(rd, AppendEntriesResponse) == [AppendEntriesResponse(3, 1, 2, success=False)]
    assert r.log.last_index == 2 and r.commit_index == 0 and rd.entries == [] and r.leader is None
    # With neither feature on, the stale message is dropped without a word (etcd's behaviour).
    r = new_node(term=3, log=(1, 2))
    r.step(AppendEntries(2, 2, 1, 2, 2, ents(2, start=3), commit=3))
    assert not r.has_ready() and r.log.last_index == 2


@pytest.mark.parametrize(
    "prev_index, prev_term, conflict_term, conflict_index",
    [
        (5, 3, 0, 4),  # the follower's log is too short: hint = its last index + 1
        (3, 3, 2, 2),  # a different term at prev: hint = that term and the first index of it
        (1, 2, 1, 1),
    ],
)
def test_append_entries_receiver_rule2_reply_false_if_log_lacks_prev_entry(prev_index: int, prev_term: int,
                                                                          conflict_term: int,
                                                                          conflict_index: int) -> None:
    """AppendEntries receiver 2: reply false if the log doesn't contain an entry at prevLogIndex whose
    term matches prevLogTerm (5.3), with the hint that lets the leader skip a whole term."""
    r = new_node(term=3, log=(1, 2, 2))
    r.step(AppendEntries(3, 2, 1, prev_index, prev_term, ents(3, start=prev_index + 1), commit=2))
    rd = drain(r)
    assert only(rd, AppendEntriesResponse) == [AppendEntriesResponse(
        3, 1, 2, success=False, reject_index=prev_index, conflict_term=conflict_term,
        conflict_index=conflict_index)]
    assert r.log.entries == ents(1, 2, 2) and rd.entries == [] and r.commit_index == 0


def test_append_entries_receiver_rule3_conflict_deletes_the_entry_and_all_that_follow() -> None:
    """AppendEntries receiver 3: if an existing entry conflicts with a new one (same index, different
    term), delete it and all that follow (5.3). The Ready tells the driver to replace from there."""
    r = new_node(term=2, log=(1, 1, 2, 2, 2), applied=1)
    new = ents(3, start=3)
    r.step(AppendEntries(3, 2, 1, 2, 1, new, commit=2))
    assert r.log.entries == ents(1, 1) + new
    rd = drain(r)
    assert rd.entries == new  # the driver replaces stored entries from index 3 on: 4 and 5 are gone
    assert only(rd, AppendEntriesResponse) == [AppendEntriesResponse(3, 1, 2, success=True, match_index=3)]


def test_append_entries_receiver_rule4_appends_only_new_entries() -> None:
    """AppendEntries receiver 4: append any new entries not already in the log; entries it already has
    are kept, and a stale shorter message does not cut the log."""
    r = new_node(term=2, log=(1, 1, 2))
    r.step(AppendEntries(2, 2, 1, 1, 1, ents(1, 2, 2, 2, start=2), commit=0))
    rd = drain(r)
    assert r.log.entries == ents(1, 1, 2, 2, 2)
    assert rd.entries == ents(2, 2, start=4)  # only the new ones need persisting
    assert only(rd, AppendEntriesResponse)[0].match_index == 5

    r.step(AppendEntries(2, 2, 1, 1, 1, ents(1, 2, start=2), commit=0))  # old, duplicated, reordered
    rd = drain(r)
    assert r.log.entries == ents(1, 1, 2, 2, 2) and rd.entries == []
    assert only(rd, AppendEntriesResponse) == [AppendEntriesResponse(2, 1, 2, success=True, match_index=3)]


@pytest.mark.parametrize(
    "log, prev, entries, leader_commit, commit",
    [
        ((1, 1, 1), 3, (1, 1), 10, 5),  # leaderCommit beyond the last new entry: commit that entry
        ((1, 1, 1), 3, (1, 1), 4, 4),  # leaderCommit below it: commit leaderCommit
        ((1, 1, 1, 1, 1), 1, (1,), 5, 2),  # the last *new* entry (2), not the last of the log (5)
        ((1, 1, 1), 3, (), 2, 2),  # a heartbeat-like append
    ],
)
def test_append_entries_receiver_rule5_commit_is_min_of_leader_commit_and_last_new_entry(
        log: tuple[int, ...], prev: int, entries: tuple[int, ...], leader_commit: int, commit: int) -> None:
    """AppendEntries receiver 5: if leaderCommit > commitIndex, set commitIndex =
    min(leaderCommit, index of last new entry)."""
    r = new_node(term=1, log=log)
    r.step(AppendEntries(1, 2, 1, prev, 1, ents(*entries, start=prev + 1), commit=leader_commit))
    assert r.commit_index == commit
    rd = drain(r)
    assert [e.index for e in rd.committed] == list(range(1, commit + 1))


def test_append_entries_ack_comes_with_the_entries_to_persist() -> None:
    """Persist before you answer: the ack is in the same Ready as the entries it acknowledges."""
    r = new_node(term=1, log=(1,))
    r.step(AppendEntries(1, 2, 1, 1, 1, ents(1, 1, start=2), commit=1))
    rd = drain(r)
    assert rd.entries == ents(1, 1, start=2)
    assert only(rd, AppendEntriesResponse) == [AppendEntriesResponse(1, 1, 2, success=True, match_index=3)]


def test_append_entries_ack_is_not_sent_when_a_newer_leader_overwrites_its_entries_in_the_same_turn() -> None:
    """A driver may step several messages before taking a Ready (one turn of its poll loop). An ack
    queued in that turn is sent only after the Ready is persisted: if a newer leader's entries replace
    the acknowledged ones first, the ack would claim entries that never reach the disk."""
    r = new_node(2, 5, term=2, log=(1, 2))
    r.step(AppendEntries(2, 1, 2, 2, 2, ents(2, 2, start=3), commit=0))  # ack for 4 queued
    r.step(AppendEntries(3, 3, 2, 2, 2, ents(3, start=3), commit=0))  # term 3 replaces 3 and 4
    rd = drain(r)
    assert rd.entries == ents(3, start=3) and rd.hard_state == HardState(3, None)
    assert rd.messages == [AppendEntriesResponse(3, 2, 3, success=True, match_index=3)]


def test_heartbeat_commits_only_what_the_follower_holds() -> None:
    """A heartbeat's commit is min(leader commit, the follower's match); never past the log's end."""
    r = new_node(term=1, log=(1, 1))
    r.step(Heartbeat(1, 2, 1, commit=7, read_seq=3))
    rd = drain(r)
    assert r.commit_index == 2 and r.leader == 2
    assert only(rd, HeartbeatResponse) == [HeartbeatResponse(1, 1, 2, read_seq=3)]


# =============================================================================== followers


def test_followers_election_timeout_converts_to_candidate_without_prevote() -> None:
    """Followers: if election timeout elapses without AppendEntries from the current leader or
    granting a vote: convert to candidate (5.2). Candidates: increment currentTerm, vote for self,
    reset the election timer, send RequestVote to all other servers."""
    r = new_node(term=1, log=(1, 1), n=5)
    ticks = 0
    while r.role is Role.FOLLOWER:
        r.tick()
        ticks += 1
        assert ticks < 2 * ET
    assert ticks >= ET
    assert r.role is Role.CANDIDATE and r.term == 2 and r.voted_for == 1
    rd = drain(r)
    assert rd.hard_state == HardState(2, 1)
    assert rd.messages == [RequestVote(2, 1, p, 2, 1, pre_vote=False) for p in (2, 3, 4, 5)]


def test_followers_election_timeout_goes_through_prevote_when_enabled() -> None:
    """Thesis 9.6: a pre-candidate polls in term + 1 without changing its term or vote; only a
    majority of pre-votes starts the real election."""
    r = new_node(term=1, log=(1, 1), n=5, pre_vote=True)
    tick(r, 2 * ET)
    assert r.role is Role.PRE_CANDIDATE and r.term == 1 and r.voted_for is None
    rd = drain(r)
    assert rd.hard_state is None
    assert rd.messages == [RequestVote(2, 1, p, 2, 1, pre_vote=True) for p in (2, 3, 4, 5)]

    r.step(RequestVoteResponse(2, 2, 1, granted=True, pre_vote=True))
    r.step(RequestVoteResponse(2, 2, 1, granted=True, pre_vote=True))  # a duplicate counts once
    assert r.role is Role.PRE_CANDIDATE and r.term == 1
    r.step(RequestVoteResponse(2, 3, 1, granted=True, pre_vote=True))
    assert r.role is Role.CANDIDATE and r.term == 2 and r.voted_for == 1
    rd = drain(r)
    assert rd.hard_state == HardState(2, 1)
    assert rd.messages == [RequestVote(2, 1, p, 2, 1, pre_vote=False) for p in (2, 3, 4, 5)]


def test_followers_prevote_lost_returns_to_follower_in_the_same_term() -> None:
    r = new_node(term=1, log=(1,), n=3, pre_vote=True)
    r.campaign()
    drain(r)
    r.step(RequestVoteResponse(1, 2, 1, granted=False, pre_vote=True))
    r.step(RequestVoteResponse(1, 3, 1, granted=False, pre_vote=True))
    assert r.role is Role.FOLLOWER and r.term == 1 and r.voted_for is None
    assert drain(r).hard_state is None


def test_followers_prevote_is_answered_without_changing_term_or_vote() -> None:
    """A pre-vote is only a poll: the voter keeps its term and vote, and answers in the asked term."""
    r = new_node(term=2, log=(1, 2), pre_vote=True)
    r.step(RequestVote(3, 2, 1, 2, 2, pre_vote=True))
    rd = drain(r)
    assert rd.messages == [RequestVoteResponse(3, 1, 2, granted=True, pre_vote=True)]
    assert r.term == 2 and r.voted_for is None and rd.hard_state is None
    r.step(RequestVote(3, 3, 1, 1, 1, pre_vote=True))  # a stale log: refused, in our own term
    assert drain(r).messages == [RequestVoteResponse(2, 1, 3, granted=False, pre_vote=True)]


def test_followers_election_timeout_is_randomized_in_one_to_two_timeouts() -> None:
    timeouts = set()
    for seed in range(40):
        r = new_node(seed=seed)
        ticks = 0
        while r.role is Role.FOLLOWER:
            r.tick()
            ticks += 1
        timeouts.add(ticks)
    assert min(timeouts) >= ET and max(timeouts) < 2 * ET and len(timeouts) > ET // 2


def test_followers_timer_is_reset_by_the_leader_and_by_granting_a_vote() -> None:
    r = new_node(term=1, log=(1,))
    for i in range(10 * ET):
        r.tick()
        if i % (ET - 1) == 0:
            r.step(Heartbeat(1, 2, 1, 0, 0))
    assert r.role is Role.FOLLOWER and r.term == 1
    tick(r, ET - 1)
    r.step(RequestVote(2, 3, 1, 1, 1))  # granted: restart the timer
    assert r.voted_for == 3
    tick(r, ET - 1)
    assert r.role is Role.FOLLOWER


def test_followers_timer_is_not_reset_by_a_vote_they_refuse() -> None:
    """Figure 2 restarts the timer only on AppendEntries from the current leader or granting a vote.
    A node with a stale log that keeps campaigning must not hold off the nodes that could win."""
    r = new_node(term=1, log=(1, 1))
    tick(r, ET - 1)
    deadline = r.election_timeout
    r.step(RequestVote(2, 3, 1, 1, 1))  # a stale candidate: the term is adopted, the vote refused
    assert r.term == 2 and r.voted_for is None
    ticks = ET - 1
    while r.role is Role.FOLLOWER:
        r.tick()
        ticks += 1
    # It campaigns no later than one full (new random) timeout after its last reset, at tick 0.
    assert ticks <= max(deadline, r.election_timeout) + 1 < ET - 1 + ET
    assert r.role is Role.CANDIDATE and r.term == 3


# =============================================================================== candidates


@pytest.mark.parametrize("n, grants_needed", [(3, 1), (5, 2)])
def test_candidates_become_leader_on_votes_from_a_majority(n: int, grants_needed: int) -> None:
    """Candidates: if votes received from a majority of servers: become leader (5.2)."""
    r = new_node(term=1, log=(1,), n=n)
    r.campaign()
    drain(r)
    for p in range(2, 2 + grants_needed - 1):
        r.step(RequestVoteResponse(2, p, 1, granted=True))
        assert r.role is Role.CANDIDATE
    r.step(RequestVoteResponse(2, n, 1, granted=False))
    assert r.role is Role.CANDIDATE
    r.step(RequestVoteResponse(2, 1 + grants_needed, 1, granted=True))
    assert r.role is Role.LEADER and r.leader == 1 and r.term == 2


@pytest.mark.parametrize("n", [3, 5])
def test_candidates_lose_on_refusals_from_a_majority(n: int) -> None:
    r = new_node(term=1, log=(1,), n=n)
    r.campaign()
    drain(r)
    for p in range(2, 2 + n // 2):
        assert r.role is Role.CANDIDATE
        r.step(RequestVoteResponse(2, p, 1, granted=False))
        r.step(RequestVoteResponse(2, p, 1, granted=True))  # a contradicting duplicate: first answer stands
    assert r.role is Role.CANDIDATE  # n // 2 refusals are not a majority yet
    r.step(RequestVoteResponse(2, n, 1, granted=False))
    assert r.role is Role.FOLLOWER and r.term == 2 and r.voted_for == 1


@pytest.mark.parametrize("kind", ["AppendEntries", "Heartbeat"])
def test_candidates_convert_to_follower_on_append_entries_from_new_leader(kind: str) -> None:
    """Candidates: if AppendEntries RPC received from new leader: convert to follower (5.2)."""
    r = new_node(term=1, log=(1,))
    r.campaign()
    drain(r)
    if kind == "AppendEntries":
        r.step(AppendEntries(2, 3, 1, 1, 1, ents(2, start=2), commit=0))
        reply = AppendEntriesResponse(2, 1, 3, success=True, match_index=2)
    else:
        r.step(Heartbeat(2, 3, 1, 0, 0))
        reply = HeartbeatResponse(2, 1, 3, 0)
    assert r.role is Role.FOLLOWER and r.leader == 3 and r.term == 2 and r.voted_for == 1
    assert drain(r).messages == [reply]


def test_candidates_start_a_new_election_when_the_timeout_elapses() -> None:
    """Candidates: if election timeout elapses: start new election (5.2)."""
    r = new_node(term=1, log=(1,))
    r.campaign()
    drain(r)
    tick(r, 2 * ET)
    assert r.role is Role.CANDIDATE and r.term == 3 and r.voted_for == 1
    rd = drain(r)
    assert rd.hard_state == HardState(3, 1)
    assert rd.messages == [RequestVote(3, 1, p, 1, 1) for p in (2, 3)]
    r.step(RequestVoteResponse(2, 2, 1, granted=True))  # a vote from the previous election: too late
    assert r.role is Role.CANDIDATE


# =============================================================================== leaders


def test_leaders_append_a_noop_at_the_start_of_their_term_and_send_it() -> None:
    """Leaders: upon election, send AppendEntries to each server (5.2); with a no-op of the new term
    so that entries of earlier terms can be committed (5.4.2, thesis 3.6.2)."""
    r = new_node(term=2, log=(1, 2))
    rd = elect(r)
    assert r.log.entries[-1] == Entry(3, 3, b"")
    assert rd.entries == [Entry(3, 3, b"")]
    assert rd.hard_state is None  # the term and the self-vote went out with the candidate's Ready
    assert rd.messages == [AppendEntries(3, 1, p, 2, 2, [Entry(3, 3, b"")], 0) for p in (2, 3)]


def test_leaders_send_heartbeats_every_heartbeat_interval() -> None:
    """Leaders: repeat empty AppendEntries during idle periods to prevent election timeouts (5.2)."""
    r = leader(3, log=(1,), heartbeat_ticks=2)
    beats = []
    for _ in range(10):
        r.tick()
        beats.append(only(drain(r), Heartbeat))
    assert [len(b) for b in beats] == [0, 2] * 5
    assert {m.dst for m in beats[1]} == {2, 3}
    assert all(m.term == r.term and m.src == 1 for m in beats[1])
    assert r.role is Role.LEADER


def test_leaders_replicate_client_commands_and_commit_on_a_majority() -> None:
    """Leaders: if command received from client: append entry to local log, respond after the entry
    is applied (5.3); commit once a majority stores it."""
    r = leader(5, log=(1,), term=1)  # term 2, no-op at 2
    commit_noop(r)
    first = r.propose([b"a", b"b"])
    assert first == 3
    rd = drain(r)
    assert rd.entries == [Entry(2, 3, b"a"), Entry(2, 4, b"b")]
    # Followers 2 and 3 acknowledged the no-op and stream; 4 and 5 still have a probe outstanding.
    assert {m.dst: (m.prev_index, m.prev_term, m.entries) for m in only(rd, AppendEntries)} == {
        p: (2, 2, rd.entries) for p in (2, 3)}
    ack(r, 4, 2)  # 4 catches up on the no-op: it is sent the new entries in its turn
    assert [(m.dst, m.prev_index, m.entries) for m in only(drain(r), AppendEntries)] == [(4, 2, rd.entries)]
    ack(r, 2, 4)
    assert (r.progress[2].match, r.progress[2].next) == (4, 5)  # if successful: update matchIndex, nextIndex
    assert r.commit_index == 2  # the leader and one follower: 2 of 5
    ack(r, 3, 3)
    assert r.commit_index == 3
    ack(r, 4, 4)
    assert r.commit_index == 4
    assert drain(r).committed == [Entry(2, 3, b"a"), Entry(2, 4, b"b")]
    f = new_node(2, 5, term=2, log=(1,))
    assert f.propose([b"x"]) is None and not f.has_ready()


def test_leaders_pipeline_appends_within_the_inflight_window() -> None:
    """AppendEntries stream without waiting for replies, up to max_inflight_msgs unacknowledged ones."""
    r = leader(3, log=(1,), term=1, max_inflight_msgs=2)
    commit_noop(r)  # follower 2 is now replicating (3 still probing)

    def to_2() -> list[tuple[int, list[bytes]]]:
        msgs = [m for m in only(drain(r), AppendEntries) if m.dst == 2]
        return [(m.prev_index, [e.data for e in m.entries]) for m in msgs]

    sent = []
    for cmd in (b"a", b"b", b"c", b"d"):
        r.propose([cmd])
        sent.append(to_2())
    assert sent == [[(2, [b"a"])], [(3, [b"b"])], [], []]  # the window of 2 is full
    ack(r, 2, 3)  # frees one slot: everything pending goes in one message
    assert to_2() == [(4, [b"c", b"d"])]


def _exchange(lead: RaftNode, follower: RaftNode) -> list[int]:
    """Pass messages between a leader and one follower until quiet; the prev_index of each AppendEntries."""
    prevs = []
    inbox = [m for m in drain(lead).messages if m.dst == follower.id]
    while inbox:
        m = inbox.pop(0)
        if isinstance(m, AppendEntries):
            prevs.append(m.prev_index)
        follower.step(m)
        for reply in drain(follower).messages:
            lead.step(reply)
        inbox += [m for m in drain(lead).messages if m.dst == follower.id and isinstance(m, AppendEntries)]
    return prevs


@pytest.mark.parametrize(
    "follower_log, prevs",
    [
        # Figure 7 (f): the follower holds terms the leader never had: one round trip per term.
        ((1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3), [10, 6, 3]),
        # Figure 7 (e)-like: shorter, and a term the leader has too: skip to the leader's last of it.
        ((1, 1, 1, 4, 4, 4, 4), [10, 7, 5]),
        # Figure 7 (a)-like: a prefix of the leader's log: one reject, then straight to its end.
        ((1, 1, 1, 4, 4, 5, 5, 6), [10, 8]),
        # Figure 7 (c)-like: the leader's log plus an extra entry: matches at once.
        ((1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6), [10]),
    ],
)
def test_leaders_back_up_next_index_a_whole_term_per_round_trip(follower_log: tuple[int, ...],
                                                                prevs: list[int]) -> None:
    """Leaders: if AppendEntries fails because of log inconsistency: decrement nextIndex and retry
    (5.3), skipping a whole conflicting term per round trip thanks to the conflict-term hint."""
    leader_log = (1, 1, 1, 4, 4, 5, 5, 6, 6, 6)
    lead = new_node(1, 3, term=7, log=leader_log)
    lead.campaign()
    drain(lead)
    lead.step(RequestVoteResponse(8, 3, 1, granted=True))
    assert lead.role is Role.LEADER
    follower = new_node(2, 3, term=7, log=follower_log)
    # One AppendEntries per round trip; the last one matches and carries everything after it.
    assert _exchange(lead, follower) == prevs
    assert follower.log.entries == lead.log.entries
    assert lead.progress[2].match == 11 and lead.progress[2].state is ProgressState.REPLICATE
    assert lead.commit_index == 11


def reject(r: RaftNode, src: int, prev: int, conflict_index: int, conflict_term: int = 0) -> None:
    r.step(AppendEntriesResponse(r.term, src, r.id, success=False, reject_index=prev, conflict_term=conflict_term,
                                 conflict_index=conflict_index))


def probes(rd: Ready, dst: int) -> list[int]:
    """The prev_index of every AppendEntries to ``dst`` in the Ready."""
    return [m.prev_index for m in only(rd, AppendEntries) if m.dst == dst]


def test_leaders_a_reordered_rejection_never_lowers_a_healthy_followers_match() -> None:
    """A rejection that arrives late (the network reordered it) says the follower's log was short
    when it answered; it has acknowledged more since. Its match must stay (one entry per message)."""
    r = leader(3, log=(1, 1, 1, 1, 1), term=1, max_msg_bytes=1)  # term 2, last index 6 (5 entries, no-op)
    # (the election's Ready held the first probe, at 5; its answer is the stale one below)
    stale = AppendEntriesResponse(r.term, 2, 1, success=False, reject_index=5, conflict_term=0, conflict_index=4)
    r.step(HeartbeatResponse(r.term, 2, 1, 0))  # a sign of life: the probe at 5 goes again
    assert probes(drain(r), 2) == [5]
    reject(r, 2, 5, conflict_index=4)  # the answer to the second copy: its log ends at 3
    assert probes(drain(r), 2) == [3]
    ack(r, 2, 4)
    drain(r)
    assert r.progress[2].match == 4 and r.progress[2].state is ProgressState.REPLICATE
    r.step(stale)  # now the first copy's answer arrives
    assert r.progress[2].match == 4, r.progress[2]
    rd = drain(r)
    assert all(prev >= 4 for prev in probes(rd, 2)), probes(rd, 2)  # nothing resent below what it holds
    ack(r, 2, 6)
    assert r.progress[2].match == 6 and r.progress[2].state is ProgressState.REPLICATE


def test_leaders_notice_a_follower_that_lost_its_log_and_start_it_over() -> None:
    """A follower restarted empty under its old id (its disk lost) rejects with a log shorter than
    what it acknowledged. A probe sent after that acknowledgement confirms it; then its match goes."""
    r = leader(3, log=(1, 1, 1, 1, 1), term=1)
    ack(r, 2, 6)
    drain(r)
    r.propose([b"x"])
    assert probes(drain(r), 2) == [6]
    reject(r, 2, 6, conflict_index=1)  # empty now; this may be stale, so the leader probes to find out
    assert r.progress[2].match == 6
    assert probes(drain(r), 2) == [6]
    reject(r, 2, 6, conflict_index=1)  # the answer to that probe: the log really is gone
    assert r.progress[2].match == 0
    assert probes(drain(r), 2) == [0]
    ack(r, 2, 7)
    assert r.progress[2].match == 7 and r.commit_index == 7


def test_a_follower_that_lost_its_log_says_so_at_the_first_heartbeat() -> None:
    """A heartbeat's commit is at most what the follower acknowledged: past its log, the log was
    lost. It answers with a rejection too, so an idle leader starts it over without a write."""
    f = new_node(2, 3, term=1)  # empty, like a node whose disk was emptied
    f.step(Heartbeat(1, 1, 2, commit=5, read_seq=4))
    rd = drain(f)
    assert only(rd, HeartbeatResponse) == [HeartbeatResponse(1, 2, 1, 4)]
    (rej,) = only(rd, AppendEntriesResponse)
    assert (rej.success, rej.reject_index, rej.conflict_term, rej.conflict_index) == (False, 5, 0, 1)
    f.step(Heartbeat(1, 1, 2, commit=0, read_seq=5))  # nothing lost: a heartbeat answered as before
    assert only(drain(f), AppendEntriesResponse) == []

    r = leader(3, log=(1, 1, 1, 1, 1), term=1)
    ack(r, 2, 6)
    ack(r, 3, 6)
    drain(r)
    reject(r, 2, 6, conflict_index=1)  # what the follower sends for a heartbeat with commit 6
    assert probes(drain(r), 2) == [6]  # may be stale: probe from the match to find out
    reject(r, 2, 6, conflict_index=1)
    assert r.progress[2].match == 0 and probes(drain(r), 2) == [0]


def test_leaders_commit_only_entries_of_their_term_by_counting_replicas_figure_8() -> None:
    """5.4.2 (Figure 8): a leader never commits an entry of an earlier term by counting replicas;
    it is committed only indirectly, when an entry of the current term after it is."""
    # Figure 8 (c): S1 leads term 4 with log [1, 2]; entry 2 (term 2) reaches a majority.
    r = new_node(1, 5, term=3, log=(1, 2), applied=1)
    elect(r)  # term 4, no-op at index 3
    assert r.term == 4 and r.log.entries[-1] == Entry(4, 3, b"")
    ack(r, 2, 2)
    ack(r, 3, 2)
    assert r.commit_index == 1  # entry 2 is on 3 of 5, but it is of term 2: not committed
    rd = drain(r)
    assert rd.committed == []
    ack(r, 2, 3)
    assert r.commit_index == 1  # the no-op is on 2 of 5
    ack(r, 3, 3)
    assert r.commit_index == 3  # the no-op is on a majority: it and entry 2 commit
    assert [e.index for e in drain(r).committed] == [2, 3]


def test_leaders_step_down_on_a_response_with_a_higher_term() -> None:
    r = leader(3, log=(1,))
    r.step(AppendEntriesResponse(r.term + 1, 2, 1, success=False))
    assert r.role is Role.FOLLOWER and r.leader is None and r.term == 3
    assert drain(r).hard_state == HardState(3, None)


def test_leaders_with_check_quorum_step_down_when_they_hear_from_no_quorum() -> None:
    r = leader(3, log=(1,), check_quorum=True)
    tick(r, ET)  # everyone counts as active for the first election timeout
    assert r.role is Role.LEADER
    r.step(HeartbeatResponse(r.term, 2, 1, 0))  # one follower: with the leader, a quorum of 3
    tick(r, ET)
    assert r.role is Role.LEADER
    tick(r, ET - 1)
    assert r.role is Role.LEADER
    r.tick()  # a whole election timeout without anybody
    assert r.role is Role.FOLLOWER and r.leader is None


def test_check_quorum_lease_ignores_disruptive_vote_requests() -> None:
    """Thesis 4.2.3: within the minimum election timeout of hearing from a leader, ignore RequestVote."""
    r = new_node(term=2, log=(1, 2), check_quorum=True)
    r.step(Heartbeat(2, 2, 1, 0, 0))
    drain(r)
    r.step(RequestVote(5, 3, 1, 9, 9))
    assert r.term == 2 and r.voted_for is None and r.leader == 2 and not r.has_ready()
    tick(r, ET)
    r.step(RequestVote(5, 3, 1, 9, 9))  # the lease ran out: now it votes
    assert r.term == 5 and r.voted_for == 3


# =============================================================================== ReadIndex (thesis 6.4)


@pytest.mark.parametrize("n", [3, 5])
def test_read_index_is_served_only_after_a_quorum_heartbeat_round(n: int) -> None:
    r = leader(n, log=(1,))
    commit_noop(r)
    r.read_index(["a", "b"])
    rd = drain(r)
    beats = only(rd, Heartbeat)
    assert sorted(m.dst for m in beats) == list(range(2, n + 1))
    seq = beats[0].read_seq
    assert all(m.read_seq == seq for m in beats) and rd.reads == []
    r.step(HeartbeatResponse(r.term, 2, 1, seq - 1))  # an echo of an older round proves nothing
    for p in range(2, n // 2 + 1):
        r.step(HeartbeatResponse(r.term, p, 1, seq))
        r.step(HeartbeatResponse(r.term, p, 1, seq))  # duplicates count once
        assert drain(r).reads == []
    r.step(HeartbeatResponse(r.term, n // 2 + 1, 1, seq))
    assert drain(r).reads == [ReadState("a", 2), ReadState("b", 2)]


def test_read_index_issued_before_the_first_commit_of_the_term_waits_for_it() -> None:
    r = leader(3, log=(1, 1), term=1)  # term 2; entries 1-2 of term 1 not known committed
    r.read_index(["x"])
    rd = drain(r)
    assert rd.reads == [] and only(rd, Heartbeat) == []  # no round yet: the commit index is unknown
    ack(r, 2, 3)  # the no-op commits
    rd = drain(r)
    beats = only(rd, Heartbeat)
    assert len(beats) == 2 and rd.reads == []
    r.step(HeartbeatResponse(2, 3, 1, beats[0].read_seq))
    assert drain(r).reads == [ReadState("x", 3)]


def test_read_index_on_a_deposed_leader_is_dropped_never_served() -> None:
    r = leader(3, log=(1,))
    commit_noop(r)
    r.read_index(["old"])
    seq = only(drain(r), Heartbeat)[0].read_seq
    r.step(AppendEntries(r.term + 1, 3, 1, 2, 2, [], 0))  # a newer leader exists
    rd = drain(r)
    assert rd.dropped_reads == ["old"] and rd.reads == []
    r.step(HeartbeatResponse(r.term - 1, 2, 1, seq))  # the quorum echo arrives too late: ignored
    r.read_index(["new"])  # not the leader any more
    rd = drain(r)
    assert rd.dropped_reads == ["new"] and rd.reads == []


def test_read_index_waiting_for_first_commit_is_dropped_when_the_leader_steps_down() -> None:
    r = leader(3, log=(1,), check_quorum=True)
    r.read_index(["x"])
    drain(r)
    tick(r, 2 * ET)
    assert r.role is Role.FOLLOWER
    assert drain(r).dropped_reads == ["x"]


def test_followers_refuse_an_append_that_would_replace_a_committed_entry() -> None:
    """No leader can send one (Leader Completeness): it is forged, or this log is damaged. It is
    dropped and counted; the committed entries stay (it used to stop the node with an assertion)."""
    r = new_node(2, log=(1, 1, 1), term=1)
    r.step(AppendEntries(1, 1, 2, 3, 1, [], commit=3))  # entries 1..3 are committed
    drain(r)
    assert r.commit_index == 3
    r.step(AppendEntries(2, 1, 2, 1, 1, ents(2, 2, start=2), commit=3))  # would replace 2 and 3
    rd = drain(r)
    assert r.contradictions == 1 and not rd.entries and not only(rd, AppendEntriesResponse)
    assert [e.term for e in r.log.entries] == [1, 1, 1] and r.commit_index == 3
    r.step(AppendEntries(2, 1, 2, 3, 1, ents(2, start=4), commit=4))  # an honest one goes on as usual
    assert drain(r).entries == ents(2, start=4) and r.commit_index == 4
