"""Membership changes as pure functions (zraft/raft/confchange.py) and their wire requests (protocol)."""

from __future__ import annotations

import msgpack
import pytest

from zraft.client.protocol import BAD_REQUEST, Limits, RequestError, parse_request
from zraft.raft import confchange
from zraft.raft.confchange import ConfChangeError, Member, Membership


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
