"""A node's disk fills up: it stops with one clear line, the other two go on committing, nothing
acknowledged is lost, and once there is room again it starts and catches up.

The node's db dir (DATA_DIR/<id>/db) is a small tmpfs (needs root: ``mount -t tmpfs``), grown with
``mount -o remount,size=...`` before the node starts again. Only the db dir: its node.log stays on
the test's disk, so that what the node prints does not depend on whether a line of its log still fit.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from zraft.client import OutcomeUnknown, ZraftError
from zraft.node.leveldb import DAMAGED_FILE, LevelDBStorage

from .cluster import Cluster, output_of_last_start

pytestmark = pytest.mark.integration

WIDE = {"COLUMNS": "100000"}  # the CLI's error on one line (rich wraps at 80 columns off a terminal)
SMALL, LARGE = "8m", "64m"
VALUE_BYTES = 16 << 10  # incompressible: 8 MB holds some 250 entries (each in the log and the data)
FULL_NODE = 3
EXIT_DEADLINE_S = 60.0


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)


@pytest.fixture
def small_disk_cluster(tmp_path: Path) -> Iterator[Callable[[], tuple[Cluster, Path]]]:
    """A factory of a 3-node cluster (not started) whose node 3 has its db dir on an 8 MB tmpfs.
    Teardown kills the nodes (by pid), then unmounts, however the test ended."""
    made: list[tuple[Cluster, Path]] = []

    def make() -> tuple[Cluster, Path]:
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a tmpfs as a node's data dir (os.geteuid() != 0)")
        c = Cluster(tmp_path / f"cluster{len(made)}", env=WIDE)
        mnt = c.data_dir / str(FULL_NODE) / "db"
        mnt.mkdir(parents=True)
        r = _sh("mount", "-t", "tmpfs", "-o", f"size={SMALL}", "tmpfs", str(mnt))
        if r.returncode != 0:
            c.close()
            pytest.skip(f"cannot mount a tmpfs here (`mount -t tmpfs` exited {r.returncode}: {r.stderr.strip()})")
        made.append((c, mnt))
        return c, mnt

    try:
        yield make
    finally:
        problems = []
        for c, mnt in made:
            c.close()  # first: a running node keeps the mount busy
            r = _sh("umount", str(mnt))
            if r.returncode != 0:
                problems.append(f"{mnt}: {r.stderr.strip()}")
                _sh("umount", "-l", str(mnt))
        assert not problems, f"could not unmount cleanly (lazily unmounted): {problems}"


def _fill_until_stopped(c: Cluster, proc: subprocess.Popen, rng: random.Random, acked: dict[bytes, bytes],
                        unknown: dict[bytes, bytes], all_must_succeed: bool) -> int:
    """Write big values through the cluster until ``proc`` (the node on the small disk) has exited,
    then 100 more; returns how many were acknowledged after it stopped."""
    deadline = time.monotonic() + EXIT_DEADLINE_S
    i = len(acked) + len(unknown)
    after = 0
    with c.client(timeout=5.0) as cl:
        while after < 100:
            assert time.monotonic() < deadline, (
                f"node {FULL_NODE} did not stop within {EXIT_DEADLINE_S} s of writes "
                f"({len(acked)} acknowledged); df: {_sh('df', '-h', str(c.data_dir / str(FULL_NODE) / 'db')).stdout}")
            stopped = proc.poll() is not None
            k, v = b"big%06d" % i, rng.randbytes(VALUE_BYTES)
            i += 1
            try:
                cl.put(k, v)
            except OutcomeUnknown:
                assert not all_must_succeed, f"write {k!r} of unknown outcome"
                unknown[k] = v
                continue
            except ZraftError as exc:
                assert not all_must_succeed, f"write {k!r} failed: {exc}"
                continue
            acked[k] = v
            after += stopped
    return after


def _check_full_disk_exit(c: Cluster, proc: subprocess.Popen, db: Path) -> str:
    output = output_of_last_start(c.log_path(FULL_NODE))
    assert proc.returncode not in (0, None), f"exit code {proc.returncode}; output:\n{output}"
    lines = [line for line in output.splitlines() if f"a write to {db} failed" in line]
    assert lines, f"no line says 'a write to {db} failed':\n{output}"
    assert any("No space left on device" in line and "nothing acknowledged is lost" in line for line in lines), output
    assert not (db / DAMAGED_FILE).exists(), "a full disk was taken for damage"
    return output


def _check_own_data(c: Cluster, db: Path, expected: dict[bytes, bytes], unknown: dict[bytes, bytes]) -> None:
    """Stop the node and read its own database: it passes the start-up checks and holds every
    acknowledged value (not only the cluster: this node's copy)."""
    assert c.stop(FULL_NODE) == 0
    storage = LevelDBStorage(db)
    try:
        storage.check()
        wrong = [k for k, v in expected.items() if storage.state.get(k) != v]
        odd = [k for k, v in unknown.items() if storage.state.get(k) not in (None, v)]
    finally:
        storage.close()
    assert not wrong, f"{len(wrong)} of {len(expected)} acknowledged keys wrong in node {FULL_NODE}'s db: {wrong[:5]}"
    assert not odd, f"writes of unknown outcome hold other values in node {FULL_NODE}'s db: {odd[:5]}"


def _remount_and_catch_up(c: Cluster, mnt: Path, leader: int) -> dict:
    r = _sh("mount", "-o", f"remount,size={LARGE}", str(mnt))
    assert r.returncode == 0, f"remount failed: {r.stderr}"
    c.start(FULL_NODE)
    c.wait_caught_up(FULL_NODE, leader, timeout=60)
    statuses = c.wait_converged(timeout=30)  # nothing in flight: its applied index is the leader's commit index
    assert statuses[FULL_NODE]["applied_index"] == statuses[leader]["commit_index"], statuses
    return statuses[FULL_NODE]


def test_follower_disk_full(small_disk_cluster: Callable[[], tuple[Cluster, Path]]) -> None:
    c, mnt = small_disk_cluster()
    # Nodes 1 and 2 first: they elect a leader, and node 3 joins as a follower.
    c.start(1)
    c.start(2)
    leader = c.wait_leader(ids=[1, 2])
    proc = c.start(FULL_NODE)
    assert c.wait_leader() == leader
    c.wait_caught_up(FULL_NODE, leader)

    rng = random.Random(3)
    acked: dict[bytes, bytes] = {}
    unknown: dict[bytes, bytes] = {}
    after = _fill_until_stopped(c, proc, rng, acked, unknown, all_must_succeed=True)
    assert after == 100  # the two others committed every write, before and after node 3 stopped
    output = _check_full_disk_exit(c, proc, mnt)
    print(f"{len(acked)} writes acknowledged; node {FULL_NODE} said: "
          + next(line for line in output.splitlines() if "No space left" in line))

    st = _remount_and_catch_up(c, mnt, leader)
    print(f"after the remount, node {FULL_NODE} caught up: {st}")
    c.check_all_present(leader, acked)
    with c.client() as cl:
        cl.put(b"after", b"the disk grew")
    acked[b"after"] = b"the disk grew"
    c.wait_caught_up(FULL_NODE, leader)
    _check_own_data(c, mnt, acked, unknown)
    # Last, so that everything above is checked even while it fails.
    assert "Traceback" not in output, f"the node stopped with a Python traceback:\n{output}"


def _make_leader(c: Cluster, target: int, timeout: float = 30.0) -> int:
    """Hand the leadership to ``target`` (a leadership transfer, retried while a just-elected
    leader is still committing its first entry)."""
    deadline = time.monotonic() + timeout
    while True:
        leader = c.wait_leader()
        if leader == target:
            return leader
        try:
            with c.client(timeout=10.0) as cl:
                if cl.transfer_leader(target) == target:
                    return c.wait_leader()
        except ZraftError as exc:
            assert time.monotonic() < deadline, f"node {target} did not become leader within {timeout} s: {exc}"
            time.sleep(0.1)


def test_leader_disk_full(small_disk_cluster: Callable[[], tuple[Cluster, Path]]) -> None:
    c, mnt = small_disk_cluster()
    c.start(FULL_NODE)  # first, and serving before the others start: it campaigns as soon as a peer answers
    up = time.monotonic() + 20
    while c.status(FULL_NODE, timeout=0.3) is None:
        assert time.monotonic() < up, f"node {FULL_NODE} does not answer"
        time.sleep(0.05)
    c.start(1)
    c.start(2)
    assert _make_leader(c, FULL_NODE) == FULL_NODE
    print(f"node {FULL_NODE} leads in term {c.status(FULL_NODE)['term']}")
    proc = c.procs[FULL_NODE]

    rng = random.Random(4)
    acked: dict[bytes, bytes] = {}
    unknown: dict[bytes, bytes] = {}
    after = _fill_until_stopped(c, proc, rng, acked, unknown, all_must_succeed=False)
    assert after == 100  # a new leader took over and committed
    output = _check_full_disk_exit(c, proc, mnt)
    print(f"{len(acked)} writes acknowledged, {len(unknown)} of unknown outcome; node {FULL_NODE} said: "
          + next(line for line in output.splitlines() if "No space left" in line))
    leader = c.wait_leader(ids=[1, 2])

    st = _remount_and_catch_up(c, mnt, leader)
    print(f"after the remount, node {FULL_NODE} caught up: {st}")
    assert st["role"] == "follower" and st["leader"] == leader, st
    c.check_all_present(leader, acked)
    got = c.get_many(leader, list(unknown))
    odd = {k: v for k, v in got.items() if v not in (None, unknown[k])}
    assert not odd, f"writes of unknown outcome hold other values: {list(odd)[:5]}"
    _check_own_data(c, mnt, acked, unknown)
    assert "Traceback" not in output, f"the node stopped with a Python traceback:\n{output}"
