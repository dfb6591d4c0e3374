"""Authentication and encryption (CONTRACT.md, "Authentication and encryption"): CURVE keys on every
socket, each peer known by its key, the HTTP API behind a bearer token."""

from __future__ import annotations

import os
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import pytest
import zmq
import zmq.auth

from zraft.client import Client, ZraftError

from .cluster import Cluster, MCluster, ctx, run_zraft

pytestmark = pytest.mark.integration


def test_keys_init_writes_a_keypair_per_node_one_for_clients_and_a_token_and_never_overwrites(tmp_path: Path) -> None:
    config = tmp_path / "Config.txt"
    config.write_text('Ip="127.0.0.1",port="4900"\nIp="127.0.0.1",port="4901"\n')
    keys = tmp_path / "keys"
    r = run_zraft("keys", "init", str(keys), "--config", str(config), cwd=tmp_path)
    assert r.rc == 0, str(r)
    names = sorted(p.name for p in keys.iterdir())
    assert names == ["client.key", "client.key_secret", "http.token", "node1.key", "node1.key_secret",
                     "node2.key", "node2.key_secret"]
    for secret in ("client.key_secret", "node1.key_secret", "http.token"):
        assert stat.S_IMODE(os.stat(keys / secret).st_mode) == 0o600, secret
    public, secret = zmq.auth.load_certificate(str(keys / "node1.key_secret"))
    assert len(public) == len(secret) == 40
    before = (keys / "node1.key_secret").read_bytes()
    r = run_zraft("keys", "init", str(keys), "--config", str(config), cwd=tmp_path)
    assert r.rc == 1 and "refusing to overwrite" in r.err and "Traceback" not in r.err, str(r)
    assert (keys / "node1.key_secret").read_bytes() == before


def test_with_keys_only_known_clients_are_served_and_the_cli_and_http_use_them(make_cluster) -> None:
    c: Cluster = make_cluster(keys=True)
    leader = c.wait_leader()
    assert c.keys_dir is not None
    keys = str(c.keys_dir)
    r = c.cli("client", "put", "k", "v", "--keys", keys)
    assert r.rc == 0 and r.out == "OK\n", str(r)
    r = c.cli("client", "get", "k", "--keys", keys)
    assert r.rc == 0 and r.out == "v\n", str(r)
    r = c.cli("cluster", "status", "--json", "--keys", keys)
    assert r.rc == 0 and '"role": "leader"' in r.out, str(r)
    # Without the keys, or with a keypair the cluster does not know: no answer at all.
    r = c.cli("client", "get", "k", "--timeout", "1")
    assert r.rc == 2 and "did not answer" in r.err, str(r)
    with Client(c.endpoints, timeout=1.0) as plain, pytest.raises(ZraftError, match="did not answer"):
        plain.get(b"k")
    public, secret = zmq.auth.create_certificates(str(c.workdir), "stranger")
    stranger_pub, stranger_sec = zmq.auth.load_certificate(secret)
    s = ctx().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.curve_publickey, s.curve_secretkey = stranger_pub, stranger_sec
    s.curve_serverkey = c.ring.server_key(c.endpoint(leader))
    s.connect(c.endpoint(leader))
    s.send(msgpack.packb({"op": "status"}))
    assert not s.poll(1000), "a client with an unknown key was answered"
    s.close()
    # The HTTP API: the bearer token, except for /health.
    url = f"http://127.0.0.1:{c.http_ports[leader]}"
    token = (c.keys_dir / "http.token").read_text().strip()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{url}/v1/kv/k", timeout=5)
    assert info.value.code == 401
    req = urllib.request.Request(f"{url}/v1/kv/k", headers={"Authorization": f"Bearer {token}"})
    assert urllib.request.urlopen(req, timeout=5).read() == b"v"
    assert urllib.request.urlopen(f"{url}/health", timeout=5).status == 200
    log = (c.data_dir / str(leader) / "node.log").read_text()
    assert "peers and clients authenticated (CURVE)" in log and "open to anyone" not in log


def test_a_node_without_keys_says_its_ports_are_open(cluster: Cluster) -> None:
    log = (cluster.data_dir / "1" / "node.log").read_text()
    assert "no keys (--keys / ZRAFT_KEYS)" in log and "open to anyone" in log


def test_a_nodes_key_cannot_speak_for_another_node(make_cluster) -> None:
    """Node C's key, on a connection that uses node A's identity (A is down, so the identity is free):
    the connection is authenticated, but as C, so nothing it says in A's name is taken."""
    c: Cluster = make_cluster(keys=True)
    leader = c.wait_leader()
    a, b = (i for i in c.ids if i != leader)
    c.kill(a)
    term = c.status(b)["term"]
    node_c = zmq.auth.load_certificate(str(c.keys_dir / f"node{leader}.key_secret"))
    d = ctx().socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 2000)
    d.setsockopt(zmq.IDENTITY, str(a).encode())
    d.curve_publickey, d.curve_secretkey = node_c
    d.curve_serverkey = c.ring.node_public[b]
    d.connect(f"tcp://127.0.0.1:{c.base + b - 1}")
    for _ in range(5):
        d.send(msgpack.packb([[5, term + 1, a, b, 0, 0]]))  # a heartbeat of a later term, "from A"
    d.close()
    log = c.data_dir / str(b) / "node.log"
    deadline = time.monotonic() + 10
    while "impostor" not in log.read_text():
        assert time.monotonic() < deadline, "the impostor's frames were not reported"
        time.sleep(0.05)
    assert c.status(b)["term"] == term and c.wait_leader(ids=[leader, b]) == leader


def test_with_keys_a_member_added_at_runtime_gets_its_key_with_keys_add_and_takes_part(make_mcluster) -> None:
    c: MCluster = make_mcluster(keys=True)
    leader = c.wait_leader()
    assert c.keys_dir is not None and c.ring is not None
    r = run_zraft("keys", "add", str(c.keys_dir), "--id", "4", cwd=c.workdir)
    assert r.rc == 0 and [Path(p).name for p in r.out.split()] == ["node4.key", "node4.key_secret"], str(r)
    r = run_zraft("keys", "add", str(c.keys_dir), "--id", "4", cwd=c.workdir)
    assert r.rc == 1 and "refusing to overwrite" in r.err and "Traceback" not in r.err, str(r)
    c.new_node(4, via=[leader])
    c.start(4, join=True)  # with ZRAFT_KEYS: the cluster's nodes read node4.key when they first need it
    with Client(c.endpoints, keys=c.ring, timeout=20) as cl:
        rows = cl.add_member(4, "127.0.0.1", c.peer_ports[4], c.client_ports[4], c.http_ports[4])
        assert any(m["id"] == 4 and m["voter"] for m in rows), rows  # a voter: it replicated over CURVE
        cl.put(b"k4", b"v")
        assert cl.transfer_leader(4) == 4
    # A client of the first three nodes only follows the hint to node 4, checked with node 4's key.
    with Client(c.endpoints, keys=c.ring, timeout=20) as cl:
        assert cl.get(b"k4") == b"v"
        assert cl.leader == c.endpoint(4)
