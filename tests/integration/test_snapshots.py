"""Snapshots, log compaction and InstallSnapshot with real node processes.

Small thresholds (a compaction every few thousand writes) so that the few tens of
thousands of writes a test can afford go through many compactions, and followers that
fall behind can only come back through a snapshot.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from zraft.client import Client
from zraft.cluster.config import load_config

from .cluster import Cluster, child_env, free_port, request, run_zraft, spawn, tail, zraft_cmd

pytestmark = pytest.mark.integration

THRESHOLD = 2000
KEEP = 200
SNAP_ENV = {"ZRAFT_SNAPSHOT_THRESHOLD": str(THRESHOLD), "ZRAFT_SNAPSHOT_KEEP": str(KEEP)}


def wait_same_state(c: Cluster, a: int, b: int, timeout: float = 30.0) -> dict[bytes, bytes]:
    """Wait until nodes a and b have applied the same index, then compare every key."""
    deadline = time.monotonic() + timeout
    while True:
        ia, sa = c.state_of(a)
        ib, sb = c.state_of(b)
        if ia == ib:
            break
        assert time.monotonic() < deadline, f"nodes {a} and {b} stay at applied {ia} and {ib}"
        time.sleep(0.1)
    missing = sorted(set(sa) ^ set(sb))
    differ = [k for k in sa if k in sb and sa[k] != sb[k]]
    assert not missing and not differ, (f"nodes {a} and {b} at index {ia} differ: {len(missing)} keys in one "
                                        f"only (e.g. {missing[:3]}), {len(differ)} values (e.g. {differ[:3]})")
    return sa


def db_bytes(c: Cluster, node_id: int) -> int:
    return sum(p.stat().st_size for p in (c.data_dir / str(node_id) / "db").iterdir() if p.is_file())


def put_batch(c: Cluster, leader: int, start: int, count: int, keys: int) -> dict[bytes, bytes]:
    items = {}
    for i in range(start, start + count):
        items[b"key-%04d" % (i % keys)] = b"value-%07d-" % i + b"x" * 100
    # One request per write (not just the last per key): unique values, in order.
    reqs = [{"op": "put", "key": b"key-%04d" % (i % keys), "value": b"value-%07d-" % i + b"x" * 100}
            for i in range(start, start + count)]
    from .cluster import pipeline

    reps = pipeline(c.endpoint(leader), reqs, window=64, timeout=300)
    bad = [r for r in reps if r.get("ok") is not True]
    assert not bad, f"{len(bad)} of {count} writes failed, e.g. {bad[:3]}"
    return items


def loaded_log_sizes(c: Cluster, node_id: int) -> list[int]:
    """How many log entries each start of the node loaded (from its node.log)."""
    text = (c.data_dir / str(node_id) / "node.log").read_text()
    return [int(hi) - int(lo) + 1 for lo, hi in re.findall(r"starting: term \d+, log (\d+)\.\.(\d+)", text)]


@pytest.mark.slow
def test_long_write_load_keeps_disk_bounded_and_a_lagging_follower_returns_by_snapshot(make_cluster) -> None:
    """200,000 puts over 1,000 keys with one follower down the whole time:

    * every node's database stays bounded (it does not grow with the number of writes) and
      the log holds at most the threshold plus what is in flight;
    * the follower, restarted, comes back through InstallSnapshot and then holds exactly
      the leader's data;
    * a restart loads only the log's tail, however many writes there were.
    """
    c: Cluster = make_cluster(env=SNAP_ENV)
    leader = c.wait_leader()
    lagging, other = [i for i in c.ids if i != leader]
    c.kill(lagging)

    total, step, keys = 200_000, 25_000, 1000
    sizes: list[tuple[int, int, int]] = []
    t0 = time.monotonic()
    expected: dict[bytes, bytes] = {}
    for start in range(0, total, step):
        expected.update(put_batch(c, leader, start, step, keys))
        st = c.status(leader)
        assert st is not None
        held = st["last_index"] - st["snapshot_index"]
        assert held <= THRESHOLD + 64, f"the leader's log holds {held} entries after {start + step} writes: {st}"
        sizes.append((start + step, db_bytes(c, leader), db_bytes(c, other)))
    took = time.monotonic() - t0
    print(f"\n{total} puts over {keys} keys in {took:.1f} s ({total / took:.0f}/s), one follower down")
    for n, a, b in sizes:
        print(f"  after {n:>7} writes: leader db {a / 1e6:6.2f} MB, follower db {b / 1e6:6.2f} MB")
    # Bounded: the last size is no bigger than the largest seen in the first quarter, give or
    # take LevelDB's own compaction schedule (a level may be mid-rewrite at any moment).
    early = max(max(a, b) for n, a, b in sizes[:2])
    late = max(sizes[-1][1:])
    assert late <= 2 * early + (4 << 20), f"the database grows with the writes: {sizes}"

    st = c.status(leader)
    assert st["snapshots"]["compactions"] >= total // THRESHOLD // 2, st

    # The lagging follower: its log ends far before the leader's compacted prefix.
    c.start(lagging)
    t0 = time.monotonic()
    caught = c.wait_caught_up(lagging, leader, timeout=120)
    print(f"node {lagging} caught up to {caught['applied_index']} in {time.monotonic() - t0:.2f} s; "
          f"its snapshot stats: {caught['snapshots']}")
    assert caught["snapshots"]["installed"] >= 1, f"caught up without a snapshot? {caught}"
    data = wait_same_state(c, leader, lagging)
    assert data == expected, "the nodes agree with each other but not with what was written"

    # Restart time after 200,000 writes: it loads the log tail only.
    c.kill(other)
    t0 = time.monotonic()
    c.start(other)
    c.wait_caught_up(other, leader, timeout=60)
    restart = time.monotonic() - t0
    sizes_loaded = loaded_log_sizes(c, other)
    print(f"node {other}: restart to caught up in {restart:.2f} s; entries loaded at each start: {sizes_loaded}")
    assert sizes_loaded[-1] <= THRESHOLD + 64, sizes_loaded


def test_lost_node_is_refused_and_its_replacement_rebuilds_from_the_leaders_snapshot(make_cluster) -> None:
    """A node whose data dir is lost is refused under its old id (it may have voted in a term it would
    vote in again); removed, and replaced by a new member (--join), the replacement rebuilds from a
    snapshot and is a full voter."""
    c: Cluster = make_cluster(env=SNAP_ENV)
    leader = c.wait_leader()
    lost = next(i for i in c.ids if i != leader)
    other = next(i for i in c.ids if i not in (leader, lost))
    expected = put_batch(c, leader, 0, 3 * THRESHOLD, 500)
    c.kill(lost)
    shutil.rmtree(c.data_dir / str(lost))
    expected.update(put_batch(c, leader, 3 * THRESHOLD, 1000, 500))
    assert c.status(leader)["snapshot_index"] > 0
    proc = c.start(lost)
    assert proc.wait(timeout=30) == 4, tail(c.log_path(lost))
    assert f"node {lost} took part in this cluster before" in tail(c.log_path(lost)), tail(c.log_path(lost))
    with c.client(timeout=60) as cl:
        cl.remove_member(lost)
        new_id, port = 4, free_port()
        cfg = c.workdir / "Config-new.txt"
        cfg.write_text(f"ip=127.0.0.1, port={c.peer_ports[leader]}, id={leader}, client_port={c.client_ports[leader]}, "
                       f"http_port={c.http_ports[leader]}\n"
                       f"ip=127.0.0.1, port={port}, id={new_id}, client_port={free_port()}, "
                       f"http_port={free_port()}\n")
        new_cfg = load_config(cfg).node(new_id)
        joined = spawn(zraft_cmd("node", "--id", str(new_id), "--config", str(cfg), "--data-dir", str(c.data_dir),
                                 "--join"), what=f"node {new_id}", log=c.workdir / "node4.out", env=child_env(c.env))
        try:
            cl.add_member(new_id, "127.0.0.1", port, new_cfg.client_port, new_cfg.http_port)
            _check_replacement(c, leader, other, new_id, new_cfg.client_endpoint, expected)
        finally:
            joined.kill()
            joined.wait()


def _check_replacement(c: Cluster, leader: int, other: int, new_id: int, new_ep: str,
                       expected: dict[bytes, bytes]) -> None:
    st = request(new_ep, {"op": "status"})
    assert st["snapshots"]["installed"] >= 1, st
    assert sorted(st["voters"]) == sorted([leader, other, new_id]), st
    # And it is a full voter: it and the leader alone make a quorum.
    c.kill(other)
    with Client([c.endpoint(leader), new_ep], timeout=10) as cl:
        cl.put(b"after-rebuild", b"1")
        assert cl.get(b"after-rebuild") == b"1"
        for k, v in list(expected.items())[::997]:
            assert cl.get(k) == v


def test_follower_killed_in_the_middle_of_an_install_ends_consistent(make_cluster) -> None:
    """Small chunks, one in flight, and every message of the leader held 20 ms (fault injection):
    an install of ~8 MB takes over 20 s, so the follower is surely killed -9 mid-stream.
    Restarted, it must end with exactly the leader's data."""
    env = {**SNAP_ENV, "ZRAFT_SNAPSHOT_CHUNK_BYTES": "8192", "ZRAFT_SNAPSHOT_WINDOW": "1",
           "ZRAFT_ALLOW_FAULTS": "1"}
    c: Cluster = make_cluster(env=env)
    leader = c.wait_leader()
    victim = next(i for i in c.ids if i != leader)
    c.kill(victim)
    reqs = [{"op": "put", "key": b"big-%05d" % i, "value": b"%05d" % i + b"y" * 1000} for i in range(8000)]
    from .cluster import pipeline

    assert all(r.get("ok") is True for r in pipeline(c.endpoint(leader), reqs, window=64, timeout=300))
    assert c.status(leader)["snapshot_index"] > 0
    slow = request(c.endpoint(leader), {"op": "fault", "action": "delay", "delay_ms": 20})
    assert slow and slow.get("ok"), slow

    c.start(victim)
    node_log = c.data_dir / str(victim) / "node.log"
    deadline = time.monotonic() + 30
    while "receiving a snapshot" not in (node_log.read_text() if node_log.exists() else ""):
        assert time.monotonic() < deadline, "the follower never started receiving a snapshot"
        time.sleep(0.01)
    installed_before_kill = "installed a snapshot" in node_log.read_text()
    c.kill(victim)
    assert not installed_before_kill, "the install finished before the kill (it should take over 20 s)"
    clear = request(c.endpoint(leader), {"op": "fault", "action": "clear"})
    assert clear and clear.get("ok"), clear

    c.start(victim)
    st = c.wait_caught_up(victim, leader, timeout=90)
    assert st["snapshots"]["installed"] >= 1, st
    data = wait_same_state(c, leader, victim)
    assert len(data) == 8000


def test_save_restore_into_a_fresh_cluster_and_corrupt_backups_are_refused(make_cluster, tmp_path: Path) -> None:
    c: Cluster = make_cluster(env=SNAP_ENV)
    leader = c.wait_leader()
    expected = put_batch(c, leader, 0, 5000, 700)
    with c.client() as cl:
        cl.delete(b"key-0000")
        del expected[b"key-0000"]
        cl.cas(b"lock", None, b"owner-1")
        expected[b"lock"] = b"owner-1"

    backup = tmp_path / "backup.snap"
    r = c.cli("snapshot", "save", str(backup))
    assert r.rc == 0 and "saved" in r.out, str(r)
    r = run_zraft("snapshot", "info", str(backup), cwd=tmp_path)
    # 700 keys and their metadata, the client's exactly-once session record, the membership, the store's
    # revision record and the watch history: an event for each of the 5,000 puts, the delete and the cas.
    records = 700 + 700 + 1 + 1 + 1 + 5002
    assert r.rc == 0 and "checksum verified" in r.out and f"{records:,} records" in r.out, str(r)

    # A new cluster (other ports, fresh data dir) from the backup.
    fresh = make_cluster(start=False, env=SNAP_ENV, name="restored")
    r = run_zraft("snapshot", "restore", str(backup), "--data-dir", str(fresh.data_dir), "--config",
                  str(fresh.config_path), cwd=tmp_path)
    assert r.rc == 0 and "restored" in r.out, str(r)
    # Restoring over an existing data dir is refused.
    r = run_zraft("snapshot", "restore", str(backup), "--data-dir", str(fresh.data_dir), "--config",
                  str(fresh.config_path), cwd=tmp_path)
    assert r.rc != 0 and "already exists" in r.err and "Traceback" not in r.err, str(r)
    fresh.start_all()
    new_leader = fresh.wait_leader()
    _, data = fresh.state_of(new_leader)
    assert data == expected
    fresh.check_all_present(new_leader, {**expected, b"key-0000": None})
    with fresh.client() as cl:
        cl.put(b"after-restore", b"yes")
        assert cl.get(b"after-restore") == b"yes"

    # Corrupt copies: a flipped byte in the middle, a truncated file, not a backup at all.
    raw = backup.read_bytes()
    flipped = tmp_path / "flipped.snap"
    flipped.write_bytes(raw[:len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 0xFF]) + raw[len(raw) // 2 + 1:])
    truncated = tmp_path / "truncated.snap"
    truncated.write_bytes(raw[:-100])
    junk = tmp_path / "junk.snap"
    junk.write_bytes(b"hello, I am not a backup" * 10)
    for bad, why in ((flipped, "checksum"), (truncated, "checksum"), (junk, "not a zraft backup")):
        target = tmp_path / f"data-{bad.stem}"
        r = run_zraft("snapshot", "restore", str(bad), "--data-dir", str(target), "--config", str(c.config_path),
                      cwd=tmp_path)
        assert r.rc != 0 and why in r.err and "Traceback" not in r.err, str(r)
        assert not (target / "1" / "db").exists(), f"a refused backup still wrote {target}"
