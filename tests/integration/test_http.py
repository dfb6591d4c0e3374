"""The HTTP API (zraft/api/http.py) on real nodes: any node answers, with the wire protocol's guarantees."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from urllib.parse import quote_from_bytes

import pytest

from .cluster import Cluster

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(shared_cluster: Cluster) -> Cluster:
    """The tests here run on the module's one cluster (independent requests), but for the one that
    kills nodes."""
    return shared_cluster


def call(c: Cluster, node_id: int, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", c.base + 200 + node_id - 1, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        rep = conn.getresponse()
        return rep.status, {k.lower(): v for k, v in rep.getheaders()}, rep.read()
    finally:
        conn.close()


def kv(key: bytes) -> str:
    return "/v1/kv/" + quote_from_bytes(key, safe="")


def test_keys_through_any_node(cluster: Cluster) -> None:
    leader = cluster.wait_leader()
    follower = next(i for i in cluster.ids if i != leader)

    # A write through a follower is carried to the leader; a read anywhere sees it.
    status, _, body = call(cluster, follower, "PUT", kv(b"foo"), b"bar")
    assert status == 200 and json.loads(body)["ok"] is True and json.loads(body)["revision"] > 1
    for node in cluster.ids:
        status, headers, body = call(cluster, node, "GET", kv(b"foo"))
        assert (status, body) == (200, b"bar")
        assert headers["content-type"] == "application/octet-stream"
    with cluster.client() as cl:  # the same store as the wire protocol's
        assert cl.get(b"foo") == b"bar"

    # Binary keys and values, percent-encoded in the path.
    key, value = b"\x00bin/\xffkey ?&", bytes(range(256))
    assert call(cluster, leader, "PUT", kv(key), value)[0] == 200
    assert call(cluster, follower, "GET", kv(key))[2] == value

    # Compare-and-swap: by expected value (percent-encoded), or only if absent.
    status, _, body = call(cluster, follower, "PUT", kv(b"foo") + "?expect=nope", b"x")
    assert status == 412
    assert json.loads(body) == {"swapped": False, "value": "bar", "value_base64": "YmFy"}
    status, _, body = call(cluster, follower, "PUT", kv(b"foo") + "?expect=bar", b"baz")
    assert (status, json.loads(body)) == (200, {"swapped": True})
    assert call(cluster, leader, "PUT", kv(b"new") + "?absent", b"1")[0] == 200
    assert call(cluster, leader, "PUT", kv(b"new") + "?absent", b"2")[0] == 412
    assert call(cluster, leader, "GET", kv(b"new"))[2] == b"1"

    # Delete, then 404.
    status, _, body = call(cluster, follower, "DELETE", kv(b"foo"))
    assert (status, json.loads(body)) == (200, {"deleted": True})
    assert json.loads(call(cluster, follower, "DELETE", kv(b"foo"))[2]) == {"deleted": False}
    status, _, body = call(cluster, leader, "GET", kv(b"foo"))
    assert status == 404 and json.loads(body)["error"] == "not_found"


def test_status_cluster_and_health(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster()  # its own: it kills two nodes
    leader = cluster.wait_leader()
    for node in cluster.ids:
        status, _, body = call(cluster, node, "GET", "/v1/status")
        st = json.loads(body)
        assert status == 200 and st["id"] == node and st["role"] in ("leader", "follower")
        status, _, body = call(cluster, node, "GET", "/health")
        assert status == 200, body
        assert json.loads(body)["health"] is True and json.loads(body)["leader"] == leader
    status, _, body = call(cluster, leader, "GET", "/v1/cluster")
    nodes = json.loads(body)["nodes"]
    assert status == 200 and sorted(n["id"] for n in nodes) == cluster.ids and all(n["answers"] for n in nodes)

    # With a majority gone, the survivor is unhealthy (it can't serve a linearizable read).
    survivor = next(i for i in cluster.ids if i != leader)
    for node in cluster.ids:
        if node != survivor:
            cluster.kill(node)
    status, _, body = call(cluster, survivor, "GET", "/health")
    assert status == 503 and json.loads(body)["health"] is False, body


def test_bad_requests_get_clear_errors(cluster: Cluster) -> None:
    node = cluster.wait_leader()
    status, _, body = call(cluster, node, "GET", "/v1/kv/")
    assert status == 400 and "no key" in json.loads(body)["message"]
    status, _, body = call(cluster, node, "PUT", "/v1/kv/", b"v")  # one answer, not two
    assert status == 400 and "no key" in json.loads(body)["message"]
    status, _, body = call(cluster, node, "GET", "/nowhere")
    assert status == 404 and "/v1/kv/KEY" in json.loads(body)["message"]
    status, _, body = call(cluster, node, "PUT", kv(b"k") + "?expect=a&absent", b"v")
    assert status == 400
    # No Content-Length: http.client sends none for a PUT without a body when told so.
    conn = http.client.HTTPConnection("127.0.0.1", cluster.base + 200 + node - 1, timeout=10)
    conn.putrequest("PUT", kv(b"k"))
    conn.endheaders()
    rep = conn.getresponse()
    assert rep.status == 411 and "Content-Length" in json.loads(rep.read())["message"]
    conn.close()
    # Too large: refused before the body is read.
    status, _, body = call(cluster, node, "PUT", kv(b"k"), b"", headers={"Content-Length": str(2 << 20)})
    assert status == 413 and json.loads(body)["error"] == "too_large"
    # A key over the server's limit comes back as the wire protocol's error.
    status, _, body = call(cluster, node, "PUT", kv(b"k" * 5000), b"v")
    assert status == 413, body


def test_coordination_routes_range_txn_meta_leases_and_a_watch_stream(cluster: Cluster) -> None:
    import threading

    leader = cluster.wait_leader()
    follower = next(i for i in cluster.ids if i != leader)
    for k, v in ((b"cfg/a", b"1"), (b"cfg/b", b"\xff"), (b"other", b"x")):
        assert call(cluster, follower, "PUT", kv(k), v)[0] == 200
    status, _, body = call(cluster, follower, "GET", "/v1/kv?prefix=cfg/")
    r = json.loads(body)
    assert status == 200 and [(kv_["key"], kv_["value"]) for kv_ in r["kvs"]] == [("cfg/a", "1"), ("cfg/b", None)]
    assert r["kvs"][1]["value_base64"] == "/w==" and r["more"] is False
    status, _, body = call(cluster, leader, "GET", "/v1/kv?start=cfg/&end=cfg/b%ff&limit=1&keys_only=1")
    r = json.loads(body)
    assert [(kv_["key"], kv_["value"]) for kv_ in r["kvs"]] == [("cfg/a", None)] and r["more"] is True
    meta = json.loads(call(cluster, follower, "GET", kv(b"cfg/a") + "?meta")[2])
    assert meta["value"] == "1" and meta["version"] == 1 and meta["create_revision"] == meta["mod_revision"]

    txn = {"compare": [["cfg/a", "value", "==", "1"]], "success": [{"op": "put", "key": "cfg/a", "value": "2"},
                                                                   {"op": "get", "key": "cfg/b"}]}
    status, _, body = call(cluster, follower, "POST", "/v1/txn", json.dumps(txn).encode())
    r = json.loads(body)
    assert status == 200 and r["succeeded"] and r["responses"][1]["value_base64"] == "/w=="
    assert call(cluster, follower, "POST", "/v1/txn", b'{"compare": [["k", "colour", "==", 1]]}')[0] == 400
    assert call(cluster, follower, "GET", "/v1/txn")[0] == 405

    # A watch stream (Server-Sent Events) from the txn's revision: its put, then two more writes.
    lines: list[bytes] = []

    def stream() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", cluster.base + 200 + follower - 1, timeout=10)
        conn.request("GET", f"/v1/watch?prefix=cfg/&start_revision={r['revision']}&timeout=3")
        rep = conn.getresponse()
        assert rep.status == 200 and rep.getheader("Content-Type") == "text/event-stream"
        lines.extend(rep.read().splitlines())
        conn.close()

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    status, _, body = call(cluster, leader, "POST", "/v1/lease/grant", b'{"ttl": 30}')
    lease = json.loads(body)["lease"]
    assert call(cluster, leader, "PUT", kv(b"cfg/c") + f"?lease={lease}", b"3")[0] == 200
    assert json.loads(call(cluster, follower, "POST", "/v1/lease/keepalive",
                           json.dumps({"lease": lease}).encode())[2])["ttl"] == 30
    assert call(cluster, follower, "POST", "/v1/lease/revoke", json.dumps({"lease": lease}).encode())[0] == 200
    t.join(15)
    events = [json.loads(line[len(b"data: "):]) for line in lines if line.startswith(b"data: ")]
    assert [(e["type"], e["key"]) for e in events] == [("put", "cfg/a"), ("put", "cfg/c"), ("delete", "cfg/c")]
    status, _, body = call(cluster, follower, "POST", "/v1/lease/keepalive", json.dumps({"lease": lease}).encode())
    assert status == 404 and json.loads(body)["error"] == "lease_not_found"
