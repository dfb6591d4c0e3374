"""What the servers can do when the client costs little: one client process, 64 requests in
flight on pipelined DEALER sockets (instead of 32 closed-loop client processes, whose own CPU
takes most of a 2-core host), against a fresh 3-node cluster with default settings.

Prints ops/s per phase and the CPU each node's threads used (cores): main loop, ZeroMQ I/O
thread, LevelDB's background thread.

    .venv/bin/python benchmarks/pipelined.py [SECONDS]     # default 15 per phase
"""

from __future__ import annotations

import os
import sys
import threading
import time

from _pipeline import pipelined_puts

from zraft.cluster.local import LocalCluster

KEYS = 10_000


def thread_ticks(pid: int) -> dict[tuple[str, str], int]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            st = f.read()
        rest = st[st.rindex(")") + 2:].split()
        out[(tid, st[st.index("(") + 1:st.rindex(")")])] = int(rest[11]) + int(rest[12])
    return out


def phase(c: LocalCluster, leader: int, op: str, seconds: float) -> None:
    pids = {i: c.status(i)["pid"] for i in c.ids}
    stop, done = threading.Event(), [0]
    t = threading.Thread(target=pipelined_puts, args=(c.endpoint(leader),),
                         kwargs={"keys": KEYS, "stop": stop, "done": done, "op": op}, daemon=True)
    t.start()
    time.sleep(2)  # warm-up
    before, n0, t0 = {i: thread_ticks(p) for i, p in pids.items()}, done[0], time.monotonic()
    time.sleep(seconds)
    after, n1, dt = {i: thread_ticks(p) for i, p in pids.items()}, done[0], time.monotonic() - t0
    stop.set()
    t.join(15)
    hz = os.sysconf("SC_CLK_TCK")
    print(f"{op}: {(n1 - n0) / dt:,.0f} ops/s over {dt:.1f} s", flush=True)
    for i in c.ids:
        threads = sorted(((after[i][k] - before[i].get(k, 0)) / hz / dt, k) for k in after[i])
        busy = [f"{name} {cores:.2f}" for cores, (_, name) in reversed(threads) if cores >= 0.005]
        print(f"  node {i}{' (leader)' if i == leader else ''}: cores by thread: {', '.join(busy)}", flush=True)


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 15.0
    with LocalCluster(3, log_level="WARNING") as c:
        c.start_all()
        leader, _ = c.wait_for_leader(30)
        pipelined_puts(c.endpoint(leader), keys=KEYS, count=KEYS)  # every key exists for the gets
        for op in ("put", "get"):
            phase(c, leader, op, seconds)


if __name__ == "__main__":
    main()
