"""Admission control under large writes: the leader keeps leading, memory stays bounded, and every
client hears a clear answer (ok, or `busy`: not applied, retry later)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import msgpack
import pytest
import zmq

from .cluster import Cluster, ctx

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIB = 1 << 20
VALUE = b"x" * MIB


def rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    return 0


class Puts:
    """``clients`` DEALER connections to one node, each keeping ``window`` 1 MiB puts in flight."""

    def __init__(self, c: Cluster, node: int, clients: int, window: int) -> None:
        self.counts: Counter[str] = Counter()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(c.endpoint(node), w, window), daemon=True)
                        for w in range(clients)]

    def _run(self, endpoint: str, w: int, window: int) -> None:
        poller = zmq.Poller()
        socks = []
        for _ in range(window):
            s = ctx().socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            poller.register(s, zmq.POLLIN)
            socks.append(s)
        n = 0
        try:
            for s in socks:
                s.send_multipart([b"", msgpack.packb({"op": "put", "key": b"w%d-%d" % (w, n), "value": VALUE})])
                n += 1
            while not self.stop.is_set():
                for s, _ in poller.poll(100):
                    rep = msgpack.unpackb(s.recv_multipart()[-1])
                    with self.lock:
                        self.counts[rep.get("error", "ok")] += 1
                    s.send_multipart([b"", msgpack.packb({"op": "put", "key": b"w%d-%d" % (w, n), "value": VALUE})])
                    n += 1
        finally:
            for s in socks:
                s.close()

    def __enter__(self) -> Puts:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def test_large_puts_from_four_clients_as_fast_as_they_go_cause_no_election_and_bounded_memory(cluster: Cluster):
    """Four clients, eight 1 MiB puts in flight each, for 10 s. Before admission control and the
    byte bounds (log compaction by bytes, one turn's bytes, uncommitted bytes) the leader's memory
    grew with every put (594 MB after 10 s here) and large loads deposed it."""
    leader = cluster.wait_leader()
    term = cluster.status(leader)["term"]
    pid = cluster.procs[leader].pid
    peak = 0
    with Puts(cluster, leader, clients=4, window=8) as load:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            time.sleep(0.2)  # (sampling the RSS: not a wait for a condition)
            peak = max(peak, rss_mb(pid))
    counts = dict(load.counts)
    assert set(counts) <= {"ok", "busy"}, counts
    assert counts.get("ok", 0) >= 100, counts
    assert {i: st["term"] for i, st in cluster.statuses().items()} == dict.fromkeys(cluster.ids, term), \
        "an election happened under load"
    assert cluster.wait_leader() == leader
    assert peak < 450, f"the leader's RSS reached {peak} MB"


def test_a_flood_of_large_puts_gets_clear_answers_and_the_leader_stays_responsive(cluster: Cluster) -> None:
    """One client sends 1 MiB puts without waiting, for 1 s (a thousand of them). Before, the leader
    went to 3 GB, answered nothing (not even status) for many seconds, and lost its leadership with
    none of the writes committed. Now each put is answered, ok or busy, memory stays bounded, and
    the node answers status requests all along."""
    leader = cluster.wait_leader()
    pid = cluster.procs[leader].pid
    s = ctx().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 0)
    s.connect(cluster.endpoint(leader))
    sent = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.0:
        try:
            s.send_multipart([b"", msgpack.packb({"op": "put", "key": b"f%d" % sent, "value": VALUE})], zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            time.sleep(0.001)
    counts: Counter[str] = Counter()
    peak, slowest_status = 0, 0.0
    deadline = time.monotonic() + 60
    try:
        while sum(counts.values()) < sent:
            assert time.monotonic() < deadline, f"only {dict(counts)} of {sent} answered in 60 s"
            if s.poll(100):
                counts[msgpack.unpackb(s.recv_multipart()[-1]).get("error", "ok")] += 1
            peak = max(peak, rss_mb(pid))
            t = time.monotonic()
            assert cluster.status(leader, timeout=5.0) is not None, "the leader does not answer status"
            slowest_status = max(slowest_status, time.monotonic() - t)
    finally:
        s.close()
    # Clear answers only: applied, or refused (busy; not_leader if a disk stall cost an election).
    assert set(counts) <= {"ok", "busy", "not_leader"}, dict(counts)
    assert counts["ok"] >= 50, dict(counts)
    assert peak < 800, f"the leader's RSS reached {peak} MB"
    assert slowest_status < 5.0
    cluster.wait_leader()
    print(f"flood of {sent}: {dict(counts)}, leader peak RSS {peak} MB, slowest status {slowest_status:.2f} s")
