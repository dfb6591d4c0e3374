"""A three-node cluster through the command line: put/get/delete/cas, exit codes, status."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from .cluster import Cluster, ctx, free_port, pack, run_zraft, status_json, unpack

pytestmark = pytest.mark.integration


def test_cli_put_get_delete_cas(cluster: Cluster) -> None:
    r = cluster.cli("client", "put", "foo", "bar")
    assert (r.rc, r.out) == (0, "OK\n"), str(r)
    r = cluster.cli("client", "get", "foo")
    assert (r.rc, r.out) == (0, "bar\n"), str(r)

    r = cluster.cli("client", "get", "no-such-key")
    assert r.rc == 1 and r.out == "" and "no such key" in r.err, str(r)

    r = cluster.cli("client", "put", "foo", "späť")  # overwrite; non-ASCII goes as UTF-8
    assert r.rc == 0, str(r)
    r = cluster.cli("client", "get", "foo")
    assert (r.rc, r.out) == (0, "späť\n"), str(r)

    r = cluster.cli("client", "delete", "foo")
    assert (r.rc, r.out) == (0, "1\n"), str(r)
    r = cluster.cli("client", "delete", "foo")
    assert (r.rc, r.out) == (0, "0\n"), str(r)
    r = cluster.cli("client", "get", "foo")
    assert r.rc == 1, str(r)

    r = cluster.cli("client", "cas", "c", "ignored", "1", "--absent")
    assert (r.rc, r.out) == (0, "OK\n"), str(r)
    r = cluster.cli("client", "cas", "c", "ignored", "x", "--absent")
    assert r.rc == 1 and "not swapped" in r.err, str(r)
    r = cluster.cli("client", "cas", "c", "wrong", "2")
    assert r.rc == 1 and "not swapped" in r.err and "1" in r.err, str(r)
    r = cluster.cli("client", "cas", "c", "1", "2")
    assert (r.rc, r.out) == (0, "OK\n"), str(r)
    r = cluster.cli("client", "get", "c")
    assert (r.rc, r.out) == (0, "2\n"), str(r)

    # The library sees the same store.
    with cluster.client() as c:
        assert c.get("c") == b"2"
        assert c.get("foo") is None


def test_cluster_status_json(cluster: Cluster) -> None:
    rows = status_json(cluster.cli("cluster", "status", "--json"))
    assert len(rows) == 3, rows
    assert all(r["answers"] is True for r in rows), rows
    assert sorted(r["id"] for r in rows) == [1, 2, 3], rows
    assert [r["endpoint"] for r in sorted(rows, key=lambda r: r["id"])] == cluster.endpoints
    leaders = [r for r in rows if r["role"] == "leader"]
    assert len(leaders) == 1, rows
    lead = leaders[0]
    for r in rows:
        assert r["leader"] == lead["id"] and r["term"] == lead["term"], rows
        for f in ("commit_index", "applied_index", "last_index", "pid"):
            assert isinstance(r[f], int), (f, r)
        assert r["pid"] == cluster.procs[r["id"]].pid, r

    r = cluster.cli("cluster", "status")  # the table
    assert r.rc == 0 and "leader" in r.out, str(r)

    # A node that is down shows up as not answering.
    follower = next(r["id"] for r in rows if r["role"] != "leader")
    cluster.kill(follower)
    rows = status_json(cluster.cli("cluster", "status", "--json"))
    assert {r["id"]: r["answers"] for r in rows if "id" in r} == {i: True for i in cluster.ids if i != follower}
    assert sum(1 for r in rows if not r["answers"]) == 1, rows


def test_cli_minority_gives_exit_code_2_and_no_effect(cluster: Cluster) -> None:
    """With two of three nodes down the survivor steps down (check-quorum): a put fails
    with exit code 2 ("did not take effect"), and really did not take effect."""
    leader = cluster.wait_leader()
    others = [i for i in cluster.ids if i != leader]
    for i in others:
        cluster.kill(i)
    deadline_s = 10.0
    end = time.monotonic() + deadline_s
    while (st := cluster.status(leader)) is None or st["role"] == "leader":
        assert time.monotonic() < end, f"node {leader} still leader {deadline_s} s after losing its quorum: {st}"
        time.sleep(0.05)

    r = cluster.cli("client", "put", "lost", "value", "--timeout", "1.5")
    assert r.rc == 2, str(r)
    r = cluster.cli("client", "get", "lost", "--timeout", "1.5")
    assert r.rc == 2, str(r)

    for i in others:
        cluster.start(i)
    cluster.wait_leader()
    r = cluster.cli("client", "get", "lost")
    assert r.rc == 1, f"a put that failed with exit code 2 took effect: {r}"


def test_cli_exit_code_2_when_unreachable(tmp_path) -> None:
    ep = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    for args in (("get", "k"), ("put", "k", "v"), ("delete", "k")):
        r = run_zraft("client", *args, "--endpoint", ep, "--timeout", "1", cwd=tmp_path)
        assert r.rc == 2, str(r)


class FakeNode:
    """A ROUTER on a free port that answers every request with ``reply`` (None: never answers)."""

    def __init__(self, reply: dict | None) -> None:
        self.reply = reply
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.sock = ctx().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)
        self.requests: list[dict] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            if self.sock.poll(50):
                frames = self.sock.recv_multipart()
                self.requests.append(unpack(frames[-1]))
                if self.reply is not None:
                    self.sock.send_multipart([*frames[:-1], pack(self.reply)])

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        self.sock.close()


@pytest.mark.parametrize("reply", [None, {"ok": False, "error": "timeout", "message": "no commit"}],
                         ids=["no-reply", "timeout-reply"])
def test_cli_exit_code_3_when_write_outcome_unknown(tmp_path, reply) -> None:
    """A write that reached a node but got no answer, or a `timeout` answer: exit code 3.
    The client may resend it only as the very same request of an exactly-once session
    (same client_id and seq, so the cluster can't apply it twice); without a session it
    must not resend it at all."""
    node = FakeNode(reply)
    try:
        for args in (("put", "k", "v"), ("delete", "k"), ("cas", "k", "a", "b")):
            n_before = len(node.requests)
            r = run_zraft("client", *args, "--endpoint", node.endpoint, "--timeout", "0.5", cwd=tmp_path)
            assert r.rc == 3, str(r)
            sent = node.requests[n_before:]
            assert sent, str(r)
            if "client_id" in sent[0]:
                assert all(req == sent[0] for req in sent), f"a resent write differs from the first: {sent[:3]}"
            else:
                assert len(sent) == 1, f"a write without a session was sent {len(sent)} times: {r}"
        # A read is safe to retry: no exit code 3 for it.
        r = run_zraft("client", "get", "k", "--endpoint", node.endpoint, "--timeout", "0.5", cwd=tmp_path)
        assert r.rc == 2, str(r)
    finally:
        node.close()
