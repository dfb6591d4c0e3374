"""Membership changes as pure functions (zraft/raft/confchange.py) and their wire requests (protocol)."""

from __future__ import annotations

import msgpack
import pytest

from zraft.client.protocol import BAD_REQUEST, Limits, RequestError, parse_request
from zraft.raft import confchange
from zraft.raft.confchange import ConfChangeError, Member, Membership
from zraft.raft.core import HardState, RaftConfig, RaftNode, Role
from zraft.raft.log import RaftLog
from zraft.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    RequestVote,
    RequestVoteResponse,
    TimeoutNow,
)


def three() -> Membership:
    return Membership(tuple(Member(i, "127.0.0.1", 7000 + i, 7100 + i, 7200 + i, seen=True) for i in (1, 2, 3)))


def test_encode_decode_round_trip_keeps_every_field() -> None:
    m = confchange.add_member(three(), 9, "10.0.0.9", 9000, 9100, 9200, learner=False)
    back = Membership.decode(m.encode())
    assert back == m
    assert back.voters == {1, 2, 3} and back.learners == {9}
    assert back.get(9) == Member(9, "10.0.0.9", 9000, 9100, 9200, voter=False, promote=True, seen=False)


@pytest.mark.parametrize("data", [
    b"", b"\xc1", msgpack.packb([2, []]), msgpack.packb([1, [[1, "ip", 1, 2, 3]]]),
    msgpack.packb([1, [[0, "ip", 1, 2, 3, 1]]]), msgpack.packb([1, [[1, "ip", 70000, 2, 3, 1]]]),
    msgpack.packb([1, [[1, "ip", 1, 2, 3, 8]]]), msgpack.packb([1, [[1, b"ip", 1, 2, 3, 1]]]),
    msgpack.packb([1, [[1, "a", 1, 2, 3, 1], [1, "b", 4, 5, 6, 1]]]),
])
def test_malformed_memberships_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        Membership.decode(data)


def test_a_new_member_is_a_learner_first() -> None:
    m = confchange.add_member(three(), 4, "127.0.0.1", 7004, 7104, 7204, learner=False)
    assert m.voters == {1, 2, 3} and m.learners == {4} and m.get(4).promote
    kept = confchange.add_member(three(), 4, "127.0.0.1", 7004, 7104, 7204, learner=True)
    assert not kept.get(4).promote
    assert three().voter_change_ok(m) and m.voter_change_ok(confchange.promote_member(m, 4))


@pytest.mark.parametrize("change, why", [
    (lambda m: confchange.add_member(m, 2, "127.0.0.1", 9000, 9100, 9200, False), "already a member"),
    (lambda m: confchange.add_member(m, 4, "127.0.0.1", 7001, 9100, 9200, False), "in use by node 1"),
    (lambda m: confchange.add_member(m, 4, "127.0.0.1", 9000, 7102, 9200, False), "in use by node 2"),
    (lambda m: confchange.add_member(m, 4, "not-an-ip", 9000, 9100, 9200, False), "IPv4 or IPv6"),
    (lambda m: confchange.add_member(m, 4, "127.0.0.1", 9000, 9000, 9200, False), "must differ"),
    (lambda m: confchange.add_member(m, 4, "127.0.0.1", 0, 9100, 9200, False), "1..65535"),
    (lambda m: confchange.remove_member(m, 7), "not a member"),
    (lambda m: confchange.promote_member(m, 7), "not a member"),
    (lambda m: confchange.promote_member(m, 1), "a voter already"),
    (lambda m: confchange.remove_member(Membership((Member(1),)), 1), "last voter"),
    (lambda m: confchange.demote_member(Membership((Member(1),)), 1), "last voter"),
])
def test_bad_changes_say_why_and_change_nothing(change, why: str) -> None:
    m = three()
    with pytest.raises(ConfChangeError, match=why) as exc:
        change(m)
    assert exc.value.code == "bad_request"
    assert m == three()


def test_two_voters_at_once_is_not_a_single_server_change() -> None:
    m = three()
    two_gone = Membership(tuple(x for x in m.members if x.id == 1))
    assert not m.voter_change_ok(two_gone)
    assert m.voter_change_ok(confchange.remove_member(m, 3))
    assert m.voter_change_ok(confchange.mark_seen(m, {1, 2}))


def _parse(req: dict):
    return parse_request(msgpack.packb(req, use_bin_type=True), Limits())


def test_member_requests_parse_with_their_defaults() -> None:
    r = _parse({"op": "add_member", "id": 4, "ip": "127.0.0.1", "port": 7004})
    assert r.member == {"id": 4, "ip": "127.0.0.1", "port": 7004, "client_port": 7104, "http_port": 7204,
                        "learner": False}
    assert _parse({"op": "transfer_leader"}).member == {"id": None}
    assert _parse({"op": "remove_member", "id": 3}).member == {"id": 3}
    assert _parse({"op": "members"}).op == "members"


@pytest.mark.parametrize("req", [
    {"op": "add_member", "id": 4, "ip": "127.0.0.1"},
    {"op": "add_member", "id": 4, "port": 7004},
    {"op": "add_member", "id": 0, "ip": "127.0.0.1", "port": 7004},
    {"op": "add_member", "id": 4, "ip": "127.0.0.1", "port": 70000},
    {"op": "add_member", "id": 4, "ip": "127.0.0.1", "port": 7004, "learner": 1},
    {"op": "add_member", "id": 4, "ip": "127.0.0.1", "port": 7004, "client_port": "x"},
    {"op": "remove_member"},
    {"op": "promote_member", "id": True},
    {"op": "transfer_leader", "id": -1},
])
def test_bad_member_requests_are_bad_requests(req: dict) -> None:
    with pytest.raises(RequestError) as exc:
        _parse(req)
    assert exc.value.code == BAD_REQUEST


# ---------------------------------------------------------------------- votes across configurations (the core)


def _vote(node, src: int, term: int, last_index: int, last_term: int) -> bool:
    node.step(RequestVote(term, src, node.id, last_index, last_term, pre_vote=False))
    return any(m.granted for m in node.ready().messages if isinstance(m, RequestVoteResponse))


def test_a_node_that_joined_votes_for_a_candidate_whose_log_is_ahead() -> None:
    """Thesis 4.1: add a fourth server to three, lose one, and the new server's vote is needed. Found by the
    simulation (tests/sim, seed 860 of the membership runs): a promoted node that had not received its
    configuration yet refused every candidate, and with one voter holding an uncommitted removal of itself
    (it may not campaign) no one could be elected."""
    fresh = RaftNode(RaftConfig(4, ()), membership=Membership())
    assert not fresh.membership.voters
    assert _vote(fresh, src=2, term=5, last_index=10, last_term=3)


def test_a_node_votes_for_a_non_voter_of_its_configuration_only_if_its_log_is_ahead() -> None:
    """A candidate whose log is ahead may hold the change that made it a voter (seed 2354: stale voters refused
    the only electable candidates); one whose log is not ahead is what a removed node looks like."""
    log = RaftLog([Entry(1, i, b"") for i in (1, 2, 3)])
    node = RaftNode(RaftConfig(1, (1, 2, 3), pre_vote=False), HardState(1), log)
    assert not _vote(node, src=4, term=2, last_index=3, last_term=1)  # as up to date, not a voter: refused
    assert _vote(node, src=4, term=3, last_index=4, last_term=1)  # ahead: its configuration may be newer
    assert _vote(RaftNode(RaftConfig(1, (1, 2, 3), pre_vote=False), HardState(1), RaftLog(list(log.entries))),
                 src=2, term=2, last_index=3, last_term=1)  # a voter, as up to date: granted as ever


def test_a_node_tells_a_stale_leader_it_does_not_know_its_term_without_pre_vote_or_check_quorum() -> None:
    """Found by the simulation (seed 3227 of the membership runs, neither pre-vote nor check-quorum): a voter
    that campaigned alone up to a high term, with a configuration older than the cluster's, never reached
    the leader (its RequestVotes go to the members it knows) and dropped the leader's lower-term appends
    without a word: it never caught up, the leader never learned the term."""
    node = RaftNode(RaftConfig(8, (2, 8, 15), pre_vote=False, check_quorum=False), HardState(134))
    node.step(AppendEntries(71, 22, 8, 0, 0, [], 0))  # from a leader its configuration does not know
    assert [(type(m), m.term) for m in node.ready().messages] == [(AppendEntriesResponse, 134)]
    node.step(AppendEntries(71, 2, 8, 0, 0, [], 0))  # from a member: its own campaigns reach it (as before)
    assert not node.ready().messages


def test_a_leader_takes_the_notice_of_a_newer_term_for_no_rejection() -> None:
    """A notice of a term (AppendEntriesResponse, not success, reject_index 0) sent to a node that has
    become leader of that very term must not move a probe back: the match went to -1 (found by a mutated
    run: then a Heartbeat carried commit -1, which the wire refuses)."""
    log = RaftLog([Entry(1, 1, b"")])
    leader = RaftNode(RaftConfig(1, (1, 2, 3), pre_vote=False), HardState(1), log)
    leader.campaign()
    leader.step(RequestVoteResponse(2, 2, 1, granted=True))
    assert leader.role is Role.LEADER
    leader.ready()
    pr = leader.progress[3]
    leader.step(AppendEntriesResponse(2, 3, 1, success=False, reject_index=pr.next - 1, conflict_index=1))
    assert (pr.match, pr.next) == (0, 1)  # its log is empty: probing from the start
    leader.step(AppendEntriesResponse(2, 3, 1, success=False))  # the notice, of an older append of ours
    assert (pr.match, pr.next) == (0, 1)
    assert all(getattr(m, "commit", 0) >= 0 for m in leader.ready().messages)


def test_a_removed_leader_brings_a_voter_up_to_date_before_it_hands_over() -> None:
    """A leader that removed itself and took writes after the removal: when the removal commits, no voter
    holds its whole log yet. It hands over as a transfer does (no election timeout lost), not by stepping
    down and leaving the others to time out."""
    leader = RaftNode(RaftConfig(1, (1, 2, 3), pre_vote=False), HardState(1), RaftLog([Entry(1, 1, b"")]),
                      membership=three())

    def flush() -> list:
        rd = leader.ready()
        if rd.entries:
            leader.persisted(rd.entries[-1].index, rd.entries[-1].term)
        return rd.messages

    leader.campaign()
    leader.step(RequestVoteResponse(2, 2, 1, granted=True))
    assert leader.role is Role.LEADER
    flush()
    for peer in (2, 3):
        leader.step(AppendEntriesResponse(2, peer, 1, success=True, match_index=leader.log.last_index))
    flush()
    removal = leader.propose_membership(confchange.remove_member(leader.membership, 1))
    write = leader.propose([b"after the removal"])
    assert write == removal + 1
    flush()
    for peer in (2, 3):  # both hold the removal, neither the write
        leader.step(AppendEntriesResponse(2, peer, 1, success=True, match_index=removal))
    msgs = flush()
    assert leader.commit_index >= removal and leader.role is Role.LEADER and leader.lead_transferee == 2
    assert not any(isinstance(m, TimeoutNow) for m in msgs)
    assert leader.propose([b"no more"]) is None  # it takes no writes while it hands over
    leader.step(AppendEntriesResponse(2, 2, 1, success=True, match_index=write))
    msgs = flush()
    assert [m.dst for m in msgs if isinstance(m, TimeoutNow)] == [2]
    assert leader.role is Role.FOLLOWER


def test_a_removed_leader_that_cannot_hand_over_steps_down_after_an_election_timeout() -> None:
    leader = RaftNode(RaftConfig(1, (1, 2, 3), pre_vote=False, election_ticks=10), HardState(1),
                      RaftLog([Entry(1, 1, b"")]), membership=three())
    leader.campaign()
    leader.step(RequestVoteResponse(2, 2, 1, granted=True))
    rd = leader.ready()
    leader.persisted(rd.entries[-1].index, rd.entries[-1].term)
    for peer in (2, 3):
        leader.step(AppendEntriesResponse(2, peer, 1, success=True, match_index=leader.log.last_index))
    removal = leader.propose_membership(confchange.remove_member(leader.membership, 1))
    leader.propose([b"after the removal"])
    rd = leader.ready()
    leader.persisted(rd.entries[-1].index, rd.entries[-1].term)
    for peer in (2, 3):
        leader.step(AppendEntriesResponse(2, peer, 1, success=True, match_index=removal))
    assert leader.role is Role.LEADER and leader.transferring
    for _ in range(10):  # the transferee never answers again
        leader.tick()
    assert leader.role is Role.FOLLOWER
