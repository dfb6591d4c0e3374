"""The client library's kept-open sockets, against a scripted fake node (a ZeroMQ ROUTER)."""

from __future__ import annotations

import threading

import msgpack
import pytest
import zmq

from zraft.client import Client, OutcomeUnknown


@pytest.fixture
def fake_node():
    """A ROUTER on a random loopback port; the test decides when (and whether) it replies."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    yield router, f"tcp://127.0.0.1:{port}"
    router.close()


def recv_request(router: zmq.Socket) -> tuple[list[bytes], dict]:
    assert router.poll(5000), "the client sent nothing"
    frames = router.recv_multipart()
    return frames[:-1], msgpack.unpackb(frames[-1], raw=False)


def reply(router: zmq.Socket, envelope: list[bytes], body: dict) -> None:
    router.send_multipart([*envelope, msgpack.packb(body, use_bin_type=True)])


def test_a_late_reply_is_never_taken_for_the_next_requests(fake_node) -> None:
    router, ep = fake_node
    with Client([ep], timeout=1.0) as c:
        assert c.request(ep, {"op": "status", "n": 1}, timeout=0.2) is None  # no reply in time
        first, req1 = recv_request(router)
        assert req1["n"] == 1
        reply(router, first, {"ok": True, "n": 1})  # too late: the client gave up on it

        got: list[dict | None] = []
        t = threading.Thread(target=lambda: got.append(c.request(ep, {"op": "status", "n": 2}, timeout=5.0)))
        t.start()
        second, req2 = recv_request(router)  # the same socket sends again (relaxed REQ)
        assert req2["n"] == 2 and second[0] == first[0], "a new connection instead of the kept one"
        reply(router, second, {"ok": True, "n": 2})
        t.join(5)
        assert got == [{"ok": True, "n": 2}]


def test_a_write_without_a_reply_is_unknown_and_the_socket_still_works(fake_node) -> None:
    router, ep = fake_node
    with Client([ep], timeout=0.5, exactly_once=False) as c:
        with pytest.raises(OutcomeUnknown):
            c.put(b"k", b"v")
        envelope, req = recv_request(router)
        assert req["op"] == "put"
        reply(router, envelope, {"ok": True})  # late
        got: list[bytes | None] = []
        t = threading.Thread(target=lambda: got.append(c.get(b"k")))
        t.start()
        envelope, req = recv_request(router)
        assert req["op"] == "get"
        reply(router, envelope, {"ok": True, "value": b"v"})
        t.join(5)
        assert got == [b"v"]


def test_no_write_is_sent_in_the_last_instant_before_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every node answered not_leader (the write certainly did not take effect) until just before the
    deadline. The client must give up with `unavailable`, not send once more with no time left for a
    reply and then call the outcome unknown (the flaky `client put` exit code 3 in test_basic)."""
    import zraft.client.client as zc

    now = [100.0]
    monkeypatch.setattr(zc.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(zc.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    timeouts: list[float] = []

    def exchange(endpoint: str, frame: bytes, timeout: float) -> tuple[bool, dict | None]:
        timeouts.append(timeout)
        if timeout < 0.005:  # no node can answer this fast: sent, no reply
            now[0] += timeout
            return True, None
        now[0] = 100.0 + 1.0 - 0.0004  # this attempt took until 0.4 ms before the deadline
        return True, {"ok": False, "error": "not_leader", "message": "leader unknown", "leader": None}

    c = Client(["tcp://127.0.0.1:1"], timeout=1.0)
    monkeypatch.setattr(c, "_exchange", exchange)
    with pytest.raises(zc.ZraftError) as info:
        c.put(b"k", b"v")
    assert not isinstance(info.value, OutcomeUnknown), info.value
    assert info.value.code == "unavailable"
    assert all(t >= zc.MIN_ATTEMPT_S for t in timeouts), timeouts
