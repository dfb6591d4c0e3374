"""Node memory under a long put load: RSS must stay flat (within 20% from minute 1 to the end).

A fresh 3-node cluster (real processes, 127.0.0.1, default settings), then a closed-loop
put load over 100,000 keys from one pipelining client (64 in flight) for MINUTES minutes.
Every 30 s it prints each node's RSS (from /proc/PID/status), its log length and the
puts so far; at the end, the change of every node's RSS between minute 1 and the end.

    .venv/bin/python benchmarks/memory_soak.py [MINUTES]     # default 5
"""

from __future__ import annotations

import sys
import threading
import time

from _pipeline import pipelined_puts

from zraft.cluster.local import LocalCluster

KEYS = 100_000


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    minutes = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    with LocalCluster(3, log_level="WARNING") as c:
        c.start_all()
        leader, _ = c.wait_for_leader(30)
        pids = {i: c.status(i)["pid"] for i in c.ids}
        stop = threading.Event()
        counter = [0]
        t = threading.Thread(target=pipelined_puts, args=(c.endpoint(leader),),
                             kwargs={"keys": KEYS, "stop": stop, "done": counter}, daemon=True)
        t0 = time.monotonic()
        t.start()
        samples: list[tuple[float, dict[int, float]]] = []
        print(f"leader {leader}; sampling every 30 s for {minutes:g} min", flush=True)
        while (el := time.monotonic() - t0) < minutes * 60:
            time.sleep(min(30.0, minutes * 60 - el))
            el = time.monotonic() - t0
            rss = {i: rss_mb(p) for i, p in pids.items()}
            logs = {i: (s["last_index"] - s["snapshot_index"]) if (s := c.status(i)) else None for i in c.ids}
            samples.append((el, rss))
            print(f"{el:6.0f} s  {counter[0]:>9,} puts  RSS MB " +
                  "  ".join(f"n{i}={v:.1f}" for i, v in rss.items()) + f"  log entries {logs}", flush=True)
        stop.set()
        t.join(5)
        at1 = min(samples, key=lambda s: abs(s[0] - 60))[1]
        end = samples[-1][1]
        print(f"{counter[0]:,} puts in {samples[-1][0]:.0f} s ({counter[0] / samples[-1][0]:.0f}/s)")
        for i in c.ids:
            print(f"node {i}: RSS {at1[i]:.1f} MB at 1 min -> {end[i]:.1f} MB at the end "
                  f"({100 * (end[i] - at1[i]) / at1[i]:+.1f}%)")


if __name__ == "__main__":
    main()
