"""The HTTP API's membership routes (zraft/api/http.py, docs/PROTOCOL.md "HTTP API") on real nodes:
list, add (POST /v1/members and the original project's /AddVoter/IP:PORT/ID), promote, remove,
transfer the leadership, and clear 400s for what is sent wrong."""

from __future__ import annotations

import http.client
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from .cluster import Cluster, child_env, free_base, spawn, zraft_cmd

pytestmark = pytest.mark.integration

MEMBER_CALL_S = 70.0  # past the gateway's own deadline for a membership request (60 s)


def call(port: int, method: str, path: str, body: Any = None, raw: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """One HTTP request to 127.0.0.1:port (``body`` sent as JSON, or ``raw`` as it is); status and JSON answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=MEMBER_CALL_S)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers=headers or {})
        rep = conn.getresponse()
        return rep.status, json.loads(rep.read())
    finally:
        conn.close()


def ids(members: list[dict[str, Any]]) -> dict[int, bool]:
    """id -> voter."""
    return {m["id"]: m["voter"] for m in members}


@pytest.fixture
def joiners() -> Iterator[list[subprocess.Popen]]:
    """Joining node processes a test starts; killed (by pid) when it ends."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def start_joiner(c: Cluster, procs: list[subprocess.Popen], node_id: int) -> int:
    """``zraft node --id N --config C --join``, C holding its own line (default client and HTTP ports)
    and node 1's; returns its peer port."""
    port = free_base(1)
    cfg = c.workdir / f"Config-{node_id}.txt"
    cfg.write_text(f'ip="127.0.0.1",port="{c.peer_ports[1]}",id="1",client_port="{c.client_ports[1]}",'
                   f'http_port="{c.http_ports[1]}"\n'
                   f'ip="127.0.0.1",port="{port}",id="{node_id}"\n')
    procs.append(spawn(zraft_cmd("node", "--id", str(node_id), "--config", str(cfg), "--data-dir", str(c.data_dir),
                                 "--join"), what=f"node {node_id} (joining)", log=c.workdir / f"node{node_id}.out",
                       env=child_env(c.env)))
    return port


def test_list_add_promote_transfer_and_remove(cluster: Cluster, joiners: list[subprocess.Popen]) -> None:
    c = cluster
    leader = c.wait_leader()
    follower = next(i for i in c.ids if i != leader)
    via = c.http_ports[follower]  # a follower's gateway carries every request to the leader
    ports = {n: start_joiner(c, joiners, n) for n in (4, 5, 6)}

    status, body = call(via, "GET", "/v1/members")
    assert status == 200, body
    assert body["leader"] == leader and ids(body["members"]) == {1: True, 2: True, 3: True}, body
    m1 = next(m for m in body["members"] if m["id"] == 1)
    assert (m1["ip"], m1["port"], m1["client_port"], m1["http_port"]) == (
        "127.0.0.1", c.peer_ports[1], c.client_ports[1], c.http_ports[1])

    # POST /v1/members: a voter, answered once promoted.
    status, body = call(via, "POST", "/v1/members", {"id": 4, "ip": "127.0.0.1", "port": ports[4]})
    assert status == 200, body
    assert ids(body["members"]) == {1: True, 2: True, 3: True, 4: True}, body
    m4 = next(m for m in body["members"] if m["id"] == 4)
    assert (m4["client_port"], m4["http_port"]) == (ports[4] + 100, ports[4] + 200), m4

    # The compatibility route: IP:PORT and ID in the path, default ports, a voter.
    status, body = call(via, "GET", f"/AddVoter/127.0.0.1:{ports[5]}/5")
    assert status == 200, body
    assert ids(body["members"])[5] is True, body

    # A learner, then promoted.
    status, body = call(c.http_ports[leader], "POST", "/v1/members",
                        {"id": 6, "ip": "127.0.0.1", "port": ports[6], "client_port": ports[6] + 100,
                         "http_port": ports[6] + 200, "learner": True})
    assert status == 200, body
    assert ids(body["members"])[6] is False, body
    status, body = call(via, "POST", "/v1/members/6/promote")
    assert status == 200, body
    assert ids(body["members"]) == {1: True, 2: True, 3: True, 4: True, 5: True, 6: True}, body

    # Leadership to node 4, then (no body) to the most up-to-date other voter.
    assert call(via, "POST", "/v1/leader", {"id": 4}) == (200, {"leader": 4})
    status, body = call(ports[4] + 200, "GET", "/v1/members")  # the new member's own gateway
    assert status == 200 and body["leader"] == 4, body
    status, body = call(ports[4] + 200, "POST", "/v1/leader")
    assert status == 200 and body["leader"] not in (None, 4), body
    new_leader = body["leader"]
    status, body = call(via, "GET", "/v1/members")
    assert status == 200 and body["leader"] == new_leader, body

    # Removals.
    status, body = call(via, "DELETE", "/v1/members/5")
    assert status == 200, body
    assert 5 not in ids(body["members"]), body
    status, body = call(via, "DELETE", "/v1/members/6")
    assert status == 200, body
    assert ids(body["members"]) == {1: True, 2: True, 3: True, 4: True}, body
    status, body = call(via, "DELETE", "/v1/members/5")
    assert status == 400 and body["error"] == "bad_request" and "not a member" in body["message"], body

    # The cluster serves writes, and the new member's gateway sees them.
    conn = http.client.HTTPConnection("127.0.0.1", via, timeout=10)
    conn.request("PUT", "/v1/kv/after", body=b"members")
    assert conn.getresponse().status == 200
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", ports[4] + 200, timeout=10)
    conn.request("GET", "/v1/kv/after")
    rep = conn.getresponse()
    assert (rep.status, rep.read()) == (200, b"members")
    conn.close()


BAD_BODIES: list[tuple[bytes, str]] = [
    (b"", "JSON object"),
    (b"{", "not JSON"),
    (b"\xff\xfe{", "not JSON"),
    (b"[1, 2]", "JSON object, not list"),
    (b"[" * 3000 + b"]" * 3000, "limit is 4096"),  # a body over the membership limit: 413, not read
    (b"[" * 2000 + b"]" * 2000, "not JSON"),  # too deeply nested for the parser
    (b'{"id": 7, "ip": "127.0.0.1", "port": 7000, "id": 8}', "given twice"),
    (b'{"id": 7, "ip": "127.0.0.1", "port": 7000, "lerner": true}', "unknown field 'lerner'"),
    (b'{"id": 7, "ip": "127.0.0.1"}', "missing port"),
    (b'{"id": 0, "ip": "127.0.0.1", "port": 7000}', "id must be a node id"),
    (b'{"id": 9223372036854775808, "ip": "127.0.0.1", "port": 7000}', "id must be a node id"),
    (b'{"id": true, "ip": "127.0.0.1", "port": 7000}', "id must be a node id"),
    (b'{"id": "7", "ip": "127.0.0.1", "port": 7000}', "id must be a node id"),
    (b'{"id": 7, "ip": "localhost", "port": 7000}', "IPv4 or IPv6"),
    (b'{"id": 7, "ip": 127, "port": 7000}', "ip must be"),
    (b'{"id": 7, "ip": "127.0.0.1", "port": 70000}', "port must be a port"),
    (b'{"id": 7, "ip": "127.0.0.1", "port": 7000.0}', "port must be a port"),
    (b'{"id": 7, "ip": "127.0.0.1", "port": 65450}', "client_port defaults to port+100"),
    (b'{"id": 7, "ip": "127.0.0.1", "port": 7000, "http_port": 0}', "http_port must be a port"),
    (b'{"id": 7, "ip": "127.0.0.1", "port": 7000, "learner": "yes"}', "learner must be true or false"),
]


def test_bad_membership_requests_get_clear_errors_and_change_nothing(cluster: Cluster) -> None:
    c = cluster
    leader = c.wait_leader()
    via = c.http_ports[next(i for i in c.ids if i != leader)]
    for raw, why in BAD_BODIES:
        status, body = call(via, "POST", "/v1/members", raw=raw)
        want = 413 if "limit" in why else 400
        assert status == want and why in body["message"], (raw[:80], status, body)
        assert body["error"] == ("too_large" if want == 413 else "bad_request"), body

    # What the leader refuses: an existing id, an address in use, unknown ids.
    for raw, why in [
        (json.dumps({"id": 2, "ip": "127.0.0.1", "port": free_base(1)}), "already a member"),
        (json.dumps({"id": 7, "ip": "127.0.0.1", "port": c.peer_ports[3]}), "in use by node 3"),
    ]:
        status, body = call(via, "POST", "/v1/members", raw=raw.encode())
        assert status == 400 and body["error"] == "bad_request" and why in body["message"], body
    for method, path, sent in [("DELETE", "/v1/members/9", None), ("POST", "/v1/members/9/promote", None),
                               ("POST", "/v1/members/2/promote", None), ("POST", "/v1/leader", {"id": 9})]:
        status, body = call(via, method, path, sent)
        assert status == 400 and body["error"] == "bad_request" and body["message"], (method, path, body)

    # Bad ids and addresses in the path; bad transfer bodies.
    for method, path, sent, why in [
        ("DELETE", "/v1/members/abc", None, "bad node id 'abc'"),
        ("DELETE", "/v1/members/0", None, "bad node id '0'"),
        ("DELETE", "/v1/members/", None, "bad node id ''"),
        ("POST", "/v1/members/-1/promote", None, "bad node id '-1'"),
        ("DELETE", "/v1/members/99999999999999999999", None, "bad node id"),
        ("GET", "/AddVoter/127.0.0.1/7", None, "bad address"),
        ("GET", "/AddVoter/127.0.0.1:x/7", None, "bad address"),
        ("GET", "/AddVoter/127.0.0.1:0/7", None, "must be a port"),
        ("GET", "/AddVoter/127.0.0.1:65400/7", None, "port+200"),
        ("GET", "/AddVoter/nohost:7000/7", None, "IPv4 or IPv6"),
        ("GET", "/AddVoter/127.0.0.1:7000/x", None, "bad node id 'x'"),
        ("POST", "/v1/leader", {"id": "2"}, "id must be a node id"),
        ("POST", "/v1/leader", {"leader": 2}, "unknown field 'leader'"),
        ("POST", "/v1/leader", [2], "JSON object"),
    ]:
        status, body = call(via, method, path, sent)
        assert status == 400 and body["error"] == "bad_request" and why in body["message"], (method, path, body)

    # Known routes, wrong methods: 405 with Allow; other paths stay 404.
    conn = http.client.HTTPConnection("127.0.0.1", via, timeout=10)
    conn.request("PUT", "/v1/members", body=b"{}")
    rep = conn.getresponse()
    assert rep.status == 405 and rep.getheader("Allow") == "GET, POST"
    assert json.loads(rep.read())["error"] == "method_not_allowed"
    conn.close()
    assert call(via, "GET", "/v1/leader")[0] == 405
    assert call(via, "GET", "/v1/members/2")[0] == 405
    assert call(via, "POST", "/v1/members/2/demote")[0] == 404

    status, body = call(via, "GET", "/v1/members")
    assert status == 200 and body["leader"] == leader and ids(body["members"]) == {1: True, 2: True, 3: True}, body


def test_with_keys_the_membership_routes_need_the_token(make_cluster) -> None:
    c: Cluster = make_cluster(keys=True)
    leader = c.wait_leader()
    assert c.keys_dir is not None
    token = (c.keys_dir / "http.token").read_text().strip()
    port = c.http_ports[leader]
    for method, path, sent in [("GET", "/v1/members", None), ("POST", "/v1/leader", {"id": 2}),
                               ("DELETE", "/v1/members/3", None), ("GET", "/AddVoter/127.0.0.1:7000/7", None),
                               ("POST", "/v1/members", {"id": 7, "ip": "127.0.0.1", "port": 7000})]:
        status, body = call(port, method, path, sent)
        assert status == 401 and body["error"] == "unauthorized", (method, path, body)
    status, body = call(port, "GET", "/v1/members", headers={"Authorization": f"Bearer {token}"})
    assert status == 200 and body["leader"] == leader and ids(body["members"]) == {1: True, 2: True, 3: True}, body
