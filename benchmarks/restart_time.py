"""Restart time of a node after N writes: it must not grow with N (the log is compacted).

For each N: a fresh 3-node cluster (real processes, 127.0.0.1), N puts over 1,000 keys
(64 in flight), then one follower is killed with SIGKILL and started again; measured:
the time until it answers `status`, and until it has applied the leader's commit index.
Also printed: how many log entries it loaded at start, and its database size.

    .venv/bin/python benchmarks/restart_time.py 50000 200000
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from _pipeline import pipelined_puts

from zraft.cluster.local import LocalCluster


def db_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 1e6


def measure(n: int) -> dict:
    with LocalCluster(3, log_level="WARNING") as c:
        c.start_all()
        leader, _ = c.wait_for_leader(30)
        t0 = time.monotonic()
        pipelined_puts(c.endpoint(leader), keys=1000, count=n)
        write_s = time.monotonic() - t0
        follower = next(i for i in c.ids if i != leader)
        c.wait_converged(30)
        c.kill(follower)  # SIGKILL
        target = c.status(leader)["commit_index"]
        t0 = time.monotonic()
        c.start(follower)
        answers = caught = None
        while caught is None:
            st = c.status(follower)
            now = time.monotonic() - t0
            if st is not None:
                answers = answers if answers is not None else now
                if st["applied_index"] >= target:
                    caught = now
            if now > 60:
                raise RuntimeError("the follower did not catch up within 60 s")
            time.sleep(0.005)
        text = (c.data_dir / str(follower) / "node.log").read_text()
        lo, hi = re.findall(r"starting: term \d+, log (\d+)\.\.(\d+)", text)[-1]
        return {"writes": n, "write_s": round(write_s, 1), "answers_s": round(answers, 3),
                "caught_up_s": round(caught, 3), "entries_loaded": int(hi) - int(lo) + 1,
                "db_mb": round(db_mb(c.data_dir / str(follower) / "db"), 2)}


def main() -> None:
    counts = [int(a) for a in sys.argv[1:]] or [50_000, 200_000]
    print("| writes before the restart | restart until it answers | until caught up | log entries loaded "
          "| its database |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n in counts:
        r = measure(n)
        print(f"| {r['writes']:,} | {r['answers_s']:.3f} s | {r['caught_up_s']:.3f} s | {r['entries_loaded']:,} "
              f"| {r['db_mb']:.1f} MB |", flush=True)


if __name__ == "__main__":
    main()
