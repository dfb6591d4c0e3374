"""Malformed requests over raw ZeroMQ: each gets the error code docs/PROTOCOL.md gives it,
and the node keeps serving afterwards."""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from .cluster import Cluster, ctx, pack, request, unpack


def without_revision(rep: dict) -> dict:
    """A write's reply without its revision (revisions are tested in test_coordination.py)."""
    return {k: v for k, v in rep.items() if k != "revision"}

pytestmark = pytest.mark.integration

KIB, MIB = 1 << 10, 1 << 20

# (name, raw frame, expected error code)
BAD_REQUESTS = [
    ("garbage bytes", b"\xc1\xff\x00garbage", "bad_request"),
    ("empty frame", b"", "bad_request"),
    ("truncated msgpack", pack({"op": "put", "key": b"k", "value": b"v"})[:-2], "bad_request"),
    ("two msgpack values in one frame", pack({"op": "status"}) + pack({"op": "status"}), "bad_request"),
    ("a msgpack list", pack([1, 2, 3]), "bad_request"),
    ("a msgpack string", pack("put"), "bad_request"),
    ("a msgpack nil", pack(None), "bad_request"),
    ("no op", pack({"key": b"k"}), "bad_request"),
    ("unknown op", pack({"op": "frobnicate", "key": b"k"}), "bad_request"),
    ("op in upper case", pack({"op": "PUT", "key": b"k", "value": b"v"}), "bad_request"),
    ("op given as bin", pack({"op": b"get", "key": b"k"}), "bad_request"),
    ("int op", pack({"op": 1, "key": b"k"}), "bad_request"),
    ("nil op", pack({"op": None}), "bad_request"),
    ("list op", pack({"op": ["get"], "key": b"k"}), "bad_request"),
    ("map op", pack({"op": {"get": 1}, "key": b"k"}), "bad_request"),
    ("map with non-text keys", pack({1: "put", 2: b"k"}), "bad_request"),
    ("get without key", pack({"op": "get"}), "bad_request"),
    ("put without key", pack({"op": "put", "value": b"v"}), "bad_request"),
    ("put without value", pack({"op": "put", "key": b"k"}), "bad_request"),
    ("delete without key", pack({"op": "delete"}), "bad_request"),
    ("cas without expect", pack({"op": "cas", "key": b"k", "value": b"v"}), "bad_request"),
    ("cas without value", pack({"op": "cas", "key": b"k", "expect": b"v"}), "bad_request"),
    ("int key", pack({"op": "get", "key": 12}), "bad_request"),
    ("nil key", pack({"op": "get", "key": None}), "bad_request"),
    ("int value", pack({"op": "put", "key": b"k", "value": 12}), "bad_request"),
    ("bool value", pack({"op": "put", "key": b"k", "value": True}), "bad_request"),
    ("nil value in put", pack({"op": "put", "key": b"k", "value": None}), "bad_request"),
    ("map value", pack({"op": "put", "key": b"k", "value": {"a": 1}}), "bad_request"),
    ("list expect", pack({"op": "cas", "key": b"k", "expect": [b"a"], "value": b"v"}), "bad_request"),
    ("float key", pack({"op": "delete", "key": 1.5}), "bad_request"),
    # fixstr of 3 bytes holding invalid UTF-8 as the key: {"op": "get", "key": "\xff\xfe\xfd"}
    ("invalid UTF-8 str key", b"\x82\xa2op\xa3get\xa3key\xa3\xff\xfe\xfd", "bad_request"),
    ("invalid UTF-8 str value",
     b"\x83\xa2op\xa3put\xa3key\xa1k\xa5value\xa2\xc3\x28", "bad_request"),
    ("invalid UTF-8 op", b"\x81\xa2op\xa3\xff\xff\xff", "bad_request"),
    # exactly-once session fields (extension): integers, client_id in 1..2**63-1, seq >= 1, both or neither
    ("str client_id", pack({"op": "put", "key": b"k", "value": b"v", "client_id": "7", "seq": 1}), "bad_request"),
    ("client_id 0", pack({"op": "put", "key": b"k", "value": b"v", "client_id": 0, "seq": 1}), "bad_request"),
    ("seq 0", pack({"op": "put", "key": b"k", "value": b"v", "client_id": 7, "seq": 0}), "bad_request"),
    ("bool seq", pack({"op": "delete", "key": b"k", "client_id": 7, "seq": True}), "bad_request"),
    ("client_id without seq", pack({"op": "put", "key": b"k", "value": b"v", "client_id": 7}), "bad_request"),
    ("seq without client_id", pack({"op": "cas", "key": b"k", "expect": None, "value": b"v", "seq": 1}),
     "bad_request"),
    ("key over 4 KiB", pack({"op": "put", "key": b"k" * (4 * KIB + 1), "value": b"v"}), "too_large"),
    ("key over 4 KiB in a get", pack({"op": "get", "key": b"k" * (4 * KIB + 1)}), "too_large"),
    ("str key over 4 KiB of UTF-8", pack({"op": "get", "key": "é" * (2 * KIB + 1)}), "too_large"),
    ("value over 1 MiB", pack({"op": "put", "key": b"k", "value": b"v" * (MIB + 1)}), "too_large"),
    ("cas value over 1 MiB", pack({"op": "cas", "key": b"k", "expect": None, "value": b"v" * (MIB + 1)}),
     "too_large"),
    ("frame over 2 MiB", pack({"op": "put", "key": b"k", "value": b"v" * (2 * MIB + 10)}), "too_large"),
    ("frame over 2 MiB of garbage", b"\x00" * (2 * MIB + 1), "too_large"),
]


def ask(c: Cluster, node_id: int, raw: bytes, timeout: float = 5.0):
    """One raw request; the decoded reply, or None on no reply in ``timeout`` or as soon as
    the node process is dead."""
    s = ctx().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(c.endpoint(node_id))
        s.send(raw)
        end = time.monotonic() + timeout
        while time.monotonic() < end and c.alive(node_id):
            if s.poll(100):
                return unpack(s.recv())
        return None
    finally:
        s.close()


def assert_serves(c: Cluster, node_id: int, key: bytes) -> None:
    rep = request(c.endpoint(node_id), {"op": "put", "key": key, "value": b"fine"}, timeout=5)
    assert rep.get("ok") is True, f"node {node_id} does not serve a normal put afterwards: {rep}"
    rep = request(c.endpoint(node_id), {"op": "get", "key": key}, timeout=5)
    assert rep == {"ok": True, "value": b"fine"}, rep


@pytest.mark.parametrize("name,raw,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_malformed_request_gets_error_code(shared_cluster: Cluster, name: str, raw: bytes, code: str) -> None:
    c = shared_cluster
    leader = c.wait_leader(c.ids)
    for node_id in (leader, *(i for i in c.ids if i != leader)):  # followers validate too
        rep = ask(c, node_id, raw)
        if rep is None and not c.alive(node_id):
            pytest.fail(f"node {node_id} crashed on {name} (exit code {c.procs[node_id].poll()}); "
                        f"see the tail of {c.log_path(node_id)}")
        assert isinstance(rep, dict), f"node {node_id}: no reply (or not a map) to {name}: {rep!r}"
        assert rep.get("ok") is False and rep.get("error") == code, f"node {node_id}, {name}: {rep!r}"
        assert isinstance(rep.get("message"), str) and rep["message"], rep
    assert_serves(c, leader, f"after {name}".encode())


def test_limits_are_inclusive(shared_cluster: Cluster) -> None:
    c = shared_cluster
    leader = c.wait_leader(c.ids)
    key, value = b"K" * (4 * KIB), b"V" * MIB
    assert request(c.endpoint(leader), {"op": "put", "key": key, "value": value}, timeout=10)["ok"] is True
    assert request(c.endpoint(leader), {"op": "get", "key": key}, timeout=10) == {"ok": True, "value": value}


def test_extra_unknown_fields_are_ignored(shared_cluster: Cluster) -> None:
    c = shared_cluster
    leader = c.wait_leader(c.ids)
    ep = c.endpoint(leader)
    extra = {"flags": 7, "trace": "abc", "nested": {"a": [1, 2]}}
    assert request(ep, {"op": "put", "key": b"x", "value": b"1", **extra})["ok"] is True
    assert request(ep, {"op": "get", "key": b"x", **extra}) == {"ok": True, "value": b"1"}
    rep = request(ep, {"op": "cas", "key": b"x", "expect": b"1", "value": b"2", **extra})
    assert without_revision(rep) == {"ok": True, "swapped": True, "value": b"2"}, rep
    assert without_revision(request(ep, {"op": "delete", "key": b"x", **extra})) == {"ok": True, "deleted": True}
    rep = request(ep, {"op": "status", **extra})
    assert rep["ok"] is True and rep["id"] == leader, rep


def test_str_keys_and_values_mean_their_utf8_bytes(shared_cluster: Cluster) -> None:
    c = shared_cluster
    ep = c.endpoint(c.wait_leader(c.ids))
    assert request(ep, {"op": "put", "key": "clé", "value": "välue"})["ok"] is True
    assert request(ep, {"op": "get", "key": "clé".encode()}) == {"ok": True, "value": "välue".encode()}
    rep = request(ep, {"op": "cas", "key": b"cl\xc3\xa9", "expect": "välue", "value": "neu"})
    assert without_revision(rep) == {"ok": True, "swapped": True, "value": b"neu"}, rep


def test_dealer_with_empty_delimiter_frame(shared_cluster: Cluster) -> None:
    c = shared_cluster
    ep = c.endpoint(c.wait_leader(c.ids))
    s = ctx().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(ep)
        # Several requests in flight on one DEALER; replies come back in some order, each
        # as [empty delimiter, reply].
        s.send_multipart([b"", pack({"op": "put", "key": b"dealer", "value": b"d"})])
        assert s.poll(5000)
        frames = s.recv_multipart()
        assert frames[0] == b"" and len(frames) == 2 and unpack(frames[1])["ok"] is True, frames
        s.send_multipart([b"", pack({"op": "get", "key": b"dealer"})])
        s.send_multipart([b"", b"garbage\xc1"])
        s.send_multipart([b"", pack({"op": "status"})])
        replies = []
        for _ in range(3):
            assert s.poll(5000), f"only {len(replies)} of 3 replies: {replies}"
            frames = s.recv_multipart()
            assert len(frames) == 2 and frames[0] == b"", frames
            replies.append(unpack(frames[1]))
        assert {"ok": True, "value": b"d"} in replies, replies
        assert any(r.get("error") == "bad_request" for r in replies), replies
        assert any(r.get("ok") is True and "role" in r for r in replies), replies
    finally:
        s.close()


def test_oversized_frame_dropped_by_zmq_node_survives(shared_cluster: Cluster) -> None:
    """A frame over 32 times the request limit (64 MiB) is dropped by ZeroMQ without a reply;
    the node lives on and serves everyone else."""
    c = shared_cluster
    leader = c.wait_leader(c.ids)
    rep = request(c.endpoint(leader), raw=b"\x00" * (64 * MIB + 1), timeout=2)
    assert rep is None, rep
    assert c.status(leader) is not None
    assert_serves(c, leader, b"after a 64 MiB frame")


def test_multipart_and_dealer_without_delimiter_do_not_hurt(shared_cluster: Cluster) -> None:
    """Not per the protocol (one frame; a DEALER sends the delimiter first): whatever the
    node answers, it keeps serving."""
    c = shared_cluster
    leader = c.wait_leader(c.ids)
    ep = c.endpoint(leader)
    s = ctx().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    d = ctx().socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(ep)
        s.send_multipart([pack({"op": "status"}), pack({"op": "status"})])
        s.poll(2000)
        d.connect(ep)
        d.send(pack({"op": "status"}))
        d.poll(2000)
    finally:
        s.close()
        d.close()
    assert_serves(c, leader, b"after multipart")
    assert c.wait_leader(c.ids) == leader


def test_unknown_msgpack_types_do_not_hurt(shared_cluster: Cluster) -> None:
    """msgpack ext types and timestamps in places where bytes are expected: bad_request."""
    c = shared_cluster
    leader = c.wait_leader(c.ids)
    ext = msgpack.packb({"op": "put", "key": msgpack.ExtType(5, b"xyz"), "value": b"v"}, use_bin_type=True)
    rep = request(c.endpoint(leader), raw=ext, timeout=5)
    assert isinstance(rep, dict) and rep.get("error") == "bad_request", rep
    assert_serves(c, leader, b"after ext")


def test_exactly_once_session_on_the_wire(shared_cluster: Cluster) -> None:
    """A write resent with the same client_id and seq gets the first reply again and is
    not applied twice; a seq in an unknown session is refused (docs/PROTOCOL.md)."""
    import random

    c = shared_cluster
    ep = c.endpoint(c.wait_leader(c.ids))
    cid = random.randrange(1, 1 << 63)
    sess = {"client_id": cid}
    assert request(ep, {"op": "put", "key": b"ctr", "value": b"0", **sess, "seq": 1})["ok"] is True
    cas = {"op": "cas", "key": b"ctr", "expect": b"0", "value": b"1", **sess, "seq": 2}
    first = request(ep, cas)
    assert without_revision(first) == {"ok": True, "swapped": True, "value": b"1"}, first
    assert request(ep, cas) == first  # a retry: the remembered reply, not "swapped: false"
    assert request(ep, {"op": "get", "key": b"ctr"}) == {"ok": True, "value": b"1"}
    # Someone else changes the key; a late duplicate of seq 2 must not swap it back or anything.
    assert request(ep, {"op": "put", "key": b"ctr", "value": b"other"})["ok"] is True
    assert request(ep, cas) == first
    assert request(ep, {"op": "get", "key": b"ctr"}) == {"ok": True, "value": b"other"}
    # A stale seq and a session never seen with seq > 1: refused, not applied.
    rep = request(ep, {"op": "put", "key": b"ctr", "value": b"stale", **sess, "seq": 1})
    assert rep.get("error") == "session_expired", rep
    rep = request(ep, {"op": "put", "key": b"ctr", "value": b"new", "client_id": cid ^ 1, "seq": 5})
    assert rep.get("error") == "session_expired", rep
    assert request(ep, {"op": "get", "key": b"ctr"}) == {"ok": True, "value": b"other"}
