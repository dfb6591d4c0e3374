"""Shared by the benchmark scripts: a closed-loop put load from one thread, many in flight."""

from __future__ import annotations

import threading

import msgpack
import zmq


def pipelined_puts(endpoint: str, *, keys: int, count: int | None = None, stop: threading.Event | None = None,
                   done: list[int] | None = None, window: int = 64, value_size: int = 128, op: str = "put") -> int:
    """Put ``key-NNNNNNN`` (``keys`` distinct) with unique 128-byte values, ``window`` requests
    in flight, until ``count`` are acknowledged or ``stop`` is set. Returns how many were;
    ``done[0]``, if given, counts them as they come. Raises on an error reply or 10 s of silence.
    ``op="get"`` reads the same keys instead (linearizable gets)."""
    ctx = zmq.Context.instance()
    poller = zmq.Poller()
    socks: list[zmq.Socket] = []
    sent = acked = 0
    pad = b"v" * max(0, value_size - 12)

    def send(s: zmq.Socket) -> None:
        nonlocal sent
        key = b"key-%07d" % (sent % keys)
        req = {"op": "put", "key": key, "value": b"%012d" % sent + pad} if op == "put" else {"op": "get", "key": key}
        s.send_multipart([b"", msgpack.packb(req)])
        sent += 1

    try:
        for _ in range(window if count is None else min(window, count)):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            poller.register(s, zmq.POLLIN)
            socks.append(s)
            send(s)
        while (count is None or acked < count) and not (stop is not None and stop.is_set()):
            ready = dict(poller.poll(10_000))
            if not ready:
                raise RuntimeError(f"no reply for 10 s after {acked} puts")
            for s in ready:
                rep = msgpack.unpackb(s.recv_multipart()[-1])
                if not rep.get("ok"):
                    raise RuntimeError(f"put failed: {rep}")
                acked += 1
                if done is not None:
                    done[0] = acked
                if count is None or sent < count:
                    send(s)
    finally:
        for s in socks:
            s.close()
    return acked
