"""The coordination API's costs on a fresh 3-node cluster (default settings):

1. range: ``limit 100`` under a prefix of a store of N keys, against a single get (p50/p99 of
   sequential requests from one client): a range costs the keys it returns, not the store's size;
2. puts/s (pipelined, 64 in flight, one client process) with no watch waiting, then with W
   watches waiting on the leader on keys nobody writes;
3. watch fan-out: 100 watchers on one prefix (each its own long poll, spread over the nodes),
   200 sequential puts; the time from each put's send to each watcher's receipt;
4. lease keepalives/s (each a log entry) over 1,000 leases, 64 in flight.

    .venv/bin/python benchmarks/coordination.py [N_KEYS] [W]     # defaults 100000 and 1000
"""

from __future__ import annotations

import statistics
import sys
import threading
import time

import msgpack
import zmq
from _pipeline import pipelined_puts

from zraft.cluster.local import LocalCluster


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def timed(cl, fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t) * 1000)
    return out


def put_rate(endpoint: str, seconds: float) -> float:
    stop, done = threading.Event(), [0]
    t = threading.Thread(target=pipelined_puts, args=(endpoint,), kwargs={"keys": 10_000, "stop": stop, "done": done},
                         daemon=True)
    t.start()
    time.sleep(1.0)
    first, t0 = done[0], time.monotonic()
    time.sleep(seconds)
    n, t1 = done[0], time.monotonic()
    stop.set()
    t.join(15)
    return (n - first) / (t1 - t0)


def idle_watches(endpoint: str, count: int) -> list[zmq.Socket]:
    ctx = zmq.Context.instance()
    socks = []
    for _ in range(10):  # a DEALER holds any number of requests in flight: 10 sockets, count/10 watches each
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        socks.append(s)
    for i in range(count):
        socks[i % 10].send_multipart([b"", msgpack.packb({"op": "watch", "prefix": b"idle/%04d/" % i,
                                                          "start_revision": 1 << 40, "timeout": 600})])
    return socks


def main() -> None:
    n_keys = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    n_watch = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    with LocalCluster(3, log_level="WARNING") as c:
        c.start_all()
        leader, _ = c.wait_for_leader(30)
        ep = c.endpoint(leader)
        t0 = time.monotonic()
        pipelined_puts(ep, keys=n_keys, count=n_keys)
        print(f"loaded {n_keys:,} keys in {time.monotonic() - t0:.1f} s")
        with c.client() as cl:
            gets = timed(cl, lambda i: cl.get(b"key-%07d" % (i * 7919 % n_keys)), 500)
            ranges = timed(cl, lambda i: cl.range(prefix=b"key-00%02d" % (i % 90 + 10), limit=100), 500)
            assert len(cl.range(prefix=b"key-0010", limit=100).kvs) == 100
        print(f"get:              p50 {statistics.median(gets):.2f} ms, p99 {pct(gets, 0.99):.2f} ms")
        print(f"range (limit 100): p50 {statistics.median(ranges):.2f} ms, p99 {pct(ranges, 0.99):.2f} ms")
        base = put_rate(ep, 8)
        socks = idle_watches(ep, n_watch)
        time.sleep(1.0)
        waiting = c.status(leader)["watches"]
        loaded = put_rate(ep, 8)
        print(f"puts/s, pipelined: {base:,.0f} with no watch, {loaded:,.0f} with {waiting:,} watches waiting "
              f"({(loaded / base - 1) * 100:+.1f}%)")
        for s in socks:
            s.close()
        fan_out(c, leader, watchers=100, puts=200)
        keepalives(c, ep, leases=1000, seconds=8)


def fan_out(c: LocalCluster, leader: int, watchers: int, puts: int) -> None:
    """``watchers`` long polls on one prefix, spread over the nodes, one thread; ``puts`` sequential puts;
    the time from each put being sent to each watcher's receipt of its event."""
    ctx = zmq.Context.instance()
    with c.client() as cl:
        start = cl.get_meta(b"")["revision"] + 1
    socks = []
    for i in range(watchers):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(c.endpoint(c.ids[i % len(c.ids)]))
        socks.append(s)
    next_rev = dict.fromkeys(socks, start)
    sent_at: dict[bytes, float] = {}  # key -> when its put was sent (each key is put once)
    lat: list[float] = []

    def ask(s: zmq.Socket) -> None:
        s.send_multipart([b"", msgpack.packb({"op": "watch", "prefix": b"fan/", "start_revision": next_rev[s],
                                              "timeout": 5})])

    for s in socks:
        ask(s)
    done = threading.Event()

    def writer() -> None:
        with c.client() as w:
            for i in range(puts):
                sent_at[b"fan/%04d" % i] = time.perf_counter()
                w.put(b"fan/%04d" % i, b"x")
        done.set()

    threading.Thread(target=writer, daemon=True).start()
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    deadline = time.monotonic() + 60
    while len(lat) < watchers * puts and time.monotonic() < deadline:
        for s, _ in poller.poll(1000):
            rep = msgpack.unpackb(s.recv_multipart()[-1])
            now = time.perf_counter()
            lat += [(now - sent_at[ev["key"]]) * 1000 for ev in rep.get("events", [])]
            next_rev[s] = rep["revision"] + 1 if rep.get("ok") else next_rev[s]
            ask(s)
    got = len(lat)
    for s in socks:
        s.close()
    print(f"watch fan-out, {watchers} watchers over {len(c.ids)} nodes, {puts} puts: {got:,} events delivered "
          f"of {watchers * puts:,}; from the put's send to receipt p50 {statistics.median(lat):.2f} ms, "
          f"p99 {pct(lat, 0.99):.2f} ms")


def keepalives(c: LocalCluster, endpoint: str, leases: int, seconds: float) -> None:
    """Grant ``leases`` leases, then keep them alive round-robin as fast as 64 in flight allow."""
    ctx = zmq.Context.instance()
    with c.client() as cl:
        ids = [cl.lease_grant(60) for _ in range(leases)]
    socks = []
    for _ in range(64):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        socks.append(s)
    n = done = 0
    for s in socks:
        s.send_multipart([b"", msgpack.packb({"op": "lease_keepalive", "lease": ids[n % leases]})])
        n += 1
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        for s, _ in poller.poll(1000):
            rep = msgpack.unpackb(s.recv_multipart()[-1])
            assert rep.get("ok"), rep
            done += 1
            s.send_multipart([b"", msgpack.packb({"op": "lease_keepalive", "lease": ids[n % leases]})])
            n += 1
    rate = done / (time.monotonic() - t0)
    for s in socks:
        s.close()
    print(f"lease keepalives, {leases:,} leases, 64 in flight: {rate:,.0f}/s (each is a log entry); "
          f"{leases:,} leases of TTL 10 s kept alive every 3.3 s need {leases * 3 / 10:,.0f}/s")


if __name__ == "__main__":
    main()
