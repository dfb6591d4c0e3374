"""The floor under a put's latency: one ZeroMQ request/reply round trip between two Python
processes on 127.0.0.1 (REQ client, ROUTER echo server, 150-byte messages), nothing else.

A zraft put needs two of these (client -> leader -> follower, and back) plus the follower's
fsync, before any Raft or Python work.

    .venv/bin/python benchmarks/zmq_roundtrip.py [N]
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time

import zmq


def echo(port_q: mp.Queue) -> None:
    s = zmq.Context().socket(zmq.ROUTER)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    port_q.put(port)
    while True:
        s.send_multipart(s.recv_multipart())


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    server = ctx.Process(target=echo, args=(q,), daemon=True)
    server.start()
    try:
        s = zmq.Context().socket(zmq.REQ)
        s.connect(f"tcp://127.0.0.1:{q.get(timeout=10)}")
        msg = b"x" * 150
        for _ in range(500):
            s.send(msg)
            s.recv()
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            s.send(msg)
            s.recv()
            lat.append(time.perf_counter() - t)
        lat.sort()
        print(f"{n} round trips: p50 {lat[n // 2] * 1e6:.0f} us, p90 {lat[int(n * 0.9)] * 1e6:.0f} us, "
              f"p99 {lat[int(n * 0.99)] * 1e6:.0f} us, mean {sum(lat) / n * 1e6:.0f} us")
    finally:
        server.terminate()
        server.join(5)


if __name__ == "__main__":
    main()
