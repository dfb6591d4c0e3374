"""CPU per put of the state machine's apply alone, in-process on LevelDB (no cluster): 60,000 puts
over 10,000 keys, in batches of 64 (as a loaded node applies them), best of 5 rounds of 10,000.

    .venv/bin/python benchmarks/apply_cost.py [DIR]      # DIR: where the database goes (default: a temp dir)

Run it from another checkout with PYTHONPATH=that-checkout to compare two versions (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import sys
import tempfile
import time

from zraft.node.leveldb import LevelDBStorage
from zraft.node.statemachine import KVStateMachine, encode_put
from zraft.raft.messages import Entry


def main(path: str) -> None:
    storage = LevelDBStorage(path)
    sm = KVStateMachine(storage.state)
    cmds = [encode_put(b"key-%07d" % (i % 10_000), b"v" * 128, (1, i + 1)) for i in range(60_000)]

    def run(first: int, last: int) -> None:
        i = first
        while i < last:
            batch = [Entry(1, sm.applied_index + 1 + j, cmds[i + j]) for j in range(64) if i + j < last]
            sm.apply(batch)
            i += len(batch)

    run(0, 10_000)  # every key exists from here on
    best = min(_timed(run, 10_000 * (r + 1), 10_000 * (r + 2)) for r in range(5))
    print(f"{best / 10_000 * 1e6:.1f} us of CPU per put (apply only, best of 5)")
    storage.close()


def _timed(run, first: int, last: int) -> float:
    t = time.process_time()
    run(first, last)
    return time.process_time() - t


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(tmp + "/db")
