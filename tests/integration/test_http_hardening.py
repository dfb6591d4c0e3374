"""The HTTP API against hostile or broken clients, on raw sockets: exact framing (no request
smuggling, no truncated value stored), a real listen backlog, a bounded worker pool, idle
connections closed. Each case is one of issue 12's findings on 87f753c."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Callable

import pytest

from zraft.api.http import IDLE_TIMEOUT_S, WORKERS

from .cluster import Cluster
from .test_http import call, kv

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(shared_cluster: Cluster) -> Cluster:
    """Every test here runs on the module's one cluster (each case leaves it as it found it)."""
    return shared_cluster

SMUGGLED = b"DELETE /v1/kv/base HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"


def http_port(c: Cluster, node_id: int) -> int:
    return c.base + 200 + node_id - 1


def connect(c: Cluster, node_id: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", http_port(c, node_id)), timeout=timeout)


def read_responses(sock: socket.socket, deadline_s: float = 10.0) -> list[tuple[int, dict[str, str], bytes]]:
    """Every response the server sends until it closes the connection (or the deadline)."""
    data = b""
    end = time.monotonic() + deadline_s
    sock.settimeout(0.2)
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            if _complete(data):
                break
            continue
        if not chunk:
            break
        data += chunk
    return _parse(data)


def _split(data: bytes) -> tuple[tuple[int, dict[str, str], bytes] | None, bytes]:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None, data
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    n = int(headers.get("content-length", "0"))
    if len(rest) < n:
        return None, data
    return (status, headers, rest[:n]), rest[n:]


def _complete(data: bytes) -> bool:
    while data:
        one, data = _split(data)
        if one is None:
            return False
    return True


def _parse(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    out = []
    while data:
        one, data = _split(data)
        assert one is not None, f"an unfinished response: {data[:200]!r}"
        out.append(one)
    return out


def exchange(c: Cluster, node_id: int, raw: bytes, half_close: bool = False) -> list[tuple[int, dict[str, str], bytes]]:
    with connect(c, node_id) as s:
        s.sendall(raw)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        return read_responses(s)


def put_base(c: Cluster, node_id: int) -> None:
    status, _, body = call(c, node_id, "PUT", kv(b"base"), b"kept")
    assert status == 200, body


def assert_base_kept(c: Cluster, node_id: int) -> None:
    status, _, body = call(c, node_id, "GET", kv(b"base"))
    assert (status, body) == (200, b"kept"), "the smuggled DELETE ran"


def test_a_short_body_is_a_400_and_stores_nothing(cluster: Cluster) -> None:
    node = cluster.wait_leader()
    raw = b"PUT /v1/kv/short HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-forty-bytes-of-the-hundred-declared"
    replies = exchange(cluster, node, raw, half_close=True)
    assert [r[0] for r in replies] == [400], replies
    assert "ended after 40 of its 100 bytes" in json.loads(replies[0][2])["message"]
    assert call(cluster, node, "GET", kv(b"short"))[0] == 404


def test_a_get_body_is_never_read_as_the_next_request(cluster: Cluster) -> None:
    node = cluster.wait_leader()
    put_base(cluster, node)
    raw = (b"GET /v1/kv/base HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED)
           + b"GET /v1/kv/base HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    replies = exchange(cluster, node, raw)
    # Two requests, two answers: the body of the first was read as its body, and ignored.
    assert [(r[0], r[2]) for r in replies] == [(200, b"kept"), (200, b"kept")], replies
    assert_base_kept(cluster, node)


def test_a_chunked_body_is_refused_and_the_connection_closed(cluster: Cluster) -> None:
    node = cluster.wait_leader()
    put_base(cluster, node)
    chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    raw = (b"PUT /v1/kv/chunky HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk + SMUGGLED)
    replies = exchange(cluster, node, raw)
    assert [r[0] for r in replies] == [411], replies
    assert replies[0][1].get("connection") == "close"
    assert "Transfer-Encoding is not supported" in json.loads(replies[0][2])["message"]
    assert_base_kept(cluster, node)
    assert call(cluster, node, "GET", kv(b"chunky"))[0] == 404
    # With a Content-Length too (the classic CL.TE smuggling): refused the same way.
    raw = (b"PUT /v1/kv/chunky HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
           + chunk + SMUGGLED)
    assert [r[0] for r in exchange(cluster, node, raw)] == [411]
    assert_base_kept(cluster, node)


@pytest.mark.parametrize("lengths", [["+5"], ["0_5"], ["5, 5"], ["-5"], ["0x5"], ["5", "5"], ["5", "6"],
                                     ["99999999999999999999999"], ["٥"]],
                         ids=["plus", "underscore", "list", "negative", "hex", "twice-same", "twice-different",
                              "huge", "arabic-digit"])
def test_only_one_exact_content_length_is_accepted(cluster: Cluster, lengths: list[str]) -> None:
    node = cluster.wait_leader()
    put_base(cluster, node)
    headers = b"".join(b"Content-Length: %s\r\n" % v.encode() for v in lengths)
    raw = b"PUT /v1/kv/framed HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\nvalue" + SMUGGLED
    replies = exchange(cluster, node, raw)
    assert [r[0] for r in replies] == [400], replies
    assert replies[0][1].get("connection") == "close"
    assert "Content-Length" in json.loads(replies[0][2])["message"]
    assert call(cluster, node, "GET", kv(b"framed"))[0] == 404
    assert_base_kept(cluster, node)


def test_an_error_before_the_route_still_reads_the_body(cluster: Cluster) -> None:
    """A PUT to no route, or an unauthorized... any early answer: the body is not the next request."""
    node = cluster.wait_leader()
    put_base(cluster, node)
    raw = (b"PUT /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED)
           + b"PUT /v1/kv/?x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED)
           + b"GET /v1/kv/base HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    replies = exchange(cluster, node, raw)
    assert [r[0] for r in replies] == [404, 400, 200], replies
    assert_base_kept(cluster, node)


def test_exact_framing_keeps_the_ordinary_cases_working(cluster: Cluster) -> None:
    node = cluster.wait_leader()
    raw = (b"PUT /v1/kv/a HTTP/1.1\r\nHost: x\r\nContent-Length:  3 \r\n\r\none"
           b"PUT /v1/kv/b HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
           b"GET /v1/kv/a HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /v1/kv/b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    replies = exchange(cluster, node, raw)
    assert [r[0] for r in replies] == [200, 200, 200, 200], replies
    assert all(json.loads(r[2])["ok"] is True for r in replies[:2]) and [r[2] for r in replies[2:]] == [b"one", b""]


def listen_queue(port: int) -> tuple[int, int] | None:
    """The listening socket's (connections waiting to be accepted, backlog): ss's Recv-Q and Send-Q
    for a LISTEN socket; None without ss."""
    try:
        out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10).stdout
    except FileNotFoundError:
        return None
    fields = out.split()
    return (int(fields[1]), int(fields[2])) if len(fields) >= 3 else None


def thread_count(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^Threads:\s+(\d+)", f.read(), re.M).group(1))


def test_a_real_backlog_and_many_concurrent_requests(cluster: Cluster) -> None:
    node = cluster.wait_leader()
    queue = listen_queue(http_port(cluster, node))
    if queue is None:
        pytest.fail("cannot read the listen backlog: `ss` (iproute2) is missing")
    backlog = queue[1]
    assert backlog >= min(socket.SOMAXCONN, 1024), backlog
    put_base(cluster, node)
    n = 400
    socks = []
    for _ in range(n):  # all connected before any is answered: the backlog holds them
        socks.append(connect(cluster, node, timeout=30))
    try:
        for s in socks:
            s.sendall(b"GET /v1/kv/base HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answers = [read_responses(s, deadline_s=60) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert all([(r[0], r[2]) for r in a] == [(200, b"kept")] for a in answers), [a for a in answers if
                                                                                 len(a) != 1][:3]


def wait_accepted(c: Cluster, node_id: int) -> None:
    """Until the node's HTTP server has accepted every connection made so far."""
    end = time.monotonic() + 30
    while (q := listen_queue(http_port(c, node_id))) is None or q[0] > 0:
        assert q is not None, "cannot read the accept queue: `ss` (iproute2) is missing"
        assert time.monotonic() < end, f"the server did not accept the connections: {q}"
        time.sleep(0.05)


def closed_by_server(socks: list[socket.socket], within_s: float) -> list[bytes]:
    """What the server sent on each connection before closing it; fails if one stays open."""
    end = time.monotonic() + within_s
    got = []
    for i, s in enumerate(socks):
        data = b""
        while True:
            s.settimeout(max(0.05, end - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                raise AssertionError(f"connection {i} of {len(socks)} still open after {within_s} s") from None
            except ConnectionResetError:  # closed with unread bytes of ours in its buffer: the kernel resets
                break
            if not chunk:
                break
            data += chunk
        got.append(data)
    return got


def stall(c: Cluster, node_id: int, n: int, head: Callable[[int], bytes]) -> list[socket.socket]:
    """``n`` connections, the i-th having sent ``head(i)`` and nothing more, all accepted by the server.
    The caller closes them."""
    socks = []
    try:
        for i in range(n):
            s = connect(c, node_id, timeout=30)
            socks.append(s)
            if data := head(i):
                s.sendall(data)
        wait_accepted(c, node_id)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def test_half_sent_requests_hold_no_worker(cluster: Cluster) -> None:
    """1,000 connections that never finish their request head: no thread each, ordinary requests
    answered at once, and each closed after IDLE_TIMEOUT_S."""
    node = cluster.wait_leader()
    pid = cluster.procs[node].pid
    put_base(cluster, node)
    before = thread_count(pid)
    stalled = stall(cluster, node, 1000, lambda i: b"GET /v1/kv/base HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"")
    try:
        assert thread_count(pid) <= before + 2, (thread_count(pid), before)
        # Answered well before any stalled connection times out and frees anything.
        with connect(cluster, node, timeout=IDLE_TIMEOUT_S / 2) as s:
            started = time.monotonic()
            s.sendall(b"GET /v1/kv/base HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert [(r[0], r[2]) for r in read_responses(s, IDLE_TIMEOUT_S / 2)] == [(200, b"kept")]
            print(f"1,000 stalled connections: an ordinary GET took {time.monotonic() - started:.3f} s")
        assert closed_by_server(stalled, IDLE_TIMEOUT_S + 10) == [b""] * len(stalled)
    finally:
        for s in stalled:
            s.close()
    assert cluster.procs[node].poll() is None, "the node died"


def test_half_sent_bodies_hold_at_most_the_pool(cluster: Cluster) -> None:
    node = cluster.wait_leader()
    pid = cluster.procs[node].pid
    before = thread_count(pid)
    # More than the pool: some wait for a worker.
    stalled = stall(cluster, node, WORKERS + 36,
                    lambda i: b"PUT /v1/kv/half HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf")
    try:
        threads = thread_count(pid)
        assert threads <= before + WORKERS + 2, f"{threads} threads (before: {before}; the pool: {WORKERS})"
        # Each body's deadline passes: a 408 and the connection closed, nothing stored.
        rounds = -(-len(stalled) // WORKERS)
        answers = closed_by_server(stalled, rounds * (IDLE_TIMEOUT_S + 1) + 10)
    finally:
        for s in stalled:
            s.close()
    statuses = [_parse(a)[0][0] if a else None for a in answers]
    assert statuses == [408] * len(stalled), statuses
    assert call(cluster, node, "GET", kv(b"half"))[0] == 404
    assert thread_count(pid) <= before + WORKERS + 2
