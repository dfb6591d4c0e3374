"""The HTTP API under load: a fresh 3-node cluster (default settings), N client threads, each
with one kept-alive HTTP connection to one node (spread over the three), each doing PUT then
GET of a 128-byte value on its own keys, for T seconds.

    .venv/bin/python benchmarks/http_load.py [THREADS] [SECONDS]     # default 16 threads, 10 s
"""

from __future__ import annotations

import http.client
import sys
import threading
import time

from zraft.cluster.local import LocalCluster

VALUE = b"v" * 128


def worker(port: int, n: int, stop_at: float, out: list[float], errors: list[int]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    j = 0
    while time.monotonic() < stop_at:
        j += 1
        path = f"/v1/kv/t{n}-{j % 100}"
        t0 = time.perf_counter()
        try:
            conn.request("PUT", path, body=VALUE)
            put = conn.getresponse()
            put.read()
            conn.request("GET", path)
            get = conn.getresponse()
            body = get.read()
        except (OSError, http.client.HTTPException):
            errors.append(1)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            continue
        if put.status != 200 or get.status != 200 or body != VALUE:
            errors.append(1)
        else:
            out.append(time.perf_counter() - t0)


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    with LocalCluster(3, log_level="WARNING") as c:
        c.start_all()
        c.wait_for_leader(30)
        ports = [c.http_ports[i] for i in c.ids]
        pairs: list[float] = []
        errors: list[int] = []
        stop_at = time.monotonic() + seconds
        ts = [threading.Thread(target=worker, args=(ports[n % len(ports)], n, stop_at, pairs, errors))
              for n in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    pairs.sort()
    if not pairs:
        sys.exit(f"no request succeeded ({len(errors)} errors)")
    p50, p99 = pairs[len(pairs) // 2], pairs[int(len(pairs) * 0.99)]
    print(f"{threads} threads: {2 * len(pairs) / seconds:,.0f} ops/s (half puts, half gets), errors {len(errors)}, "
          f"PUT+GET pair p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms")


if __name__ == "__main__":
    main()
