"""A follower's data dir damaged while it was stopped: it refuses to start, clearly, and the
other two nodes go on serving; damage found while it runs stops it and is remembered.

Each case: a fresh 3-node cluster, 300 acknowledged writes, one follower stopped cleanly (SIGTERM)
after a restart in the middle of them (LevelDB writes the recovered .log into an .ldb table when it
opens a database, so the follower's db holds both an .ldb table and a .log with the later writes),
its db damaged, and the follower started again while a client writes and reads through the other
two. The outcome each kind of damage has (observed, then asserted so that a regression shows) is in
:data:`DAMAGE`: every one of them is refused at start, with one line naming the data dir and what
is wrong, and no Python traceback.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from zraft.client import OutcomeUnknown, ZraftError
from zraft.node.leveldb import DAMAGED_FILE

from .cluster import Cluster, output_of_last_start

pytestmark = pytest.mark.integration

# The CLI prints its error through rich, which wraps at 80 columns when stderr is not a terminal:
# a wide console keeps each message on one line, so that the test can check it is one line.
WIDE = {"COLUMNS": "100000"}
START_DEADLINE_S = 20.0  # a refusing node exits within this (interpreter start, imports, the checks)
KEYS_BEFORE_RESTART = 150
KEYS_AFTER_RESTART = 150


# ------------------------------------------------------------------------------------ damage


def _newest_log(db: Path) -> Path:
    logs = sorted(db.glob("*.log"), key=lambda p: int(p.stem))
    if not logs or logs[-1].stat().st_size == 0:
        pytest.fail(f"cannot set up the case: no non-empty LevelDB .log in {db}: {sorted(os.listdir(db))}")
    return logs[-1]


def _tables(db: Path) -> list[Path]:
    ldbs = sorted(db.glob("*.ldb"))
    if not ldbs:
        pytest.fail(f"cannot set up the case: no .ldb table in {db} (the restart should have written one): "
                    f"{sorted(os.listdir(db))}")
    return ldbs


def _flip(path: Path, offset: int, count: int) -> None:
    data = bytearray(path.read_bytes())
    assert offset >= 0 and offset + count <= len(data), (path, offset, count, len(data))
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate_newest_log(db: Path) -> str:
    log = _newest_log(db)
    size = log.stat().st_size
    os.truncate(log, size // 2)
    return f"{log.name} cut from {size} to {size // 2} bytes"


def flip_ldb_middle(db: Path) -> str:
    done = []
    for t in _tables(db):
        size = t.stat().st_size
        _flip(t, size // 2, 8)
        done.append(f"{t.name} ({size} bytes) at {size // 2}")
    return "8 bytes flipped in " + ", ".join(done)


def flip_ldb_first_block(db: Path) -> str:
    done = []
    for t in _tables(db):
        _flip(t, 100, 8)  # inside the first data block: it begins with the state machine's keys (d...)
        done.append(t.name)
    return "8 bytes flipped at offset 100 of " + ", ".join(done)


def garbage_manifest(db: Path) -> str:
    manifests = sorted(db.glob("MANIFEST-*"))
    if not manifests:
        pytest.fail(f"cannot set up the case: no MANIFEST in {db}")
    rng = random.Random(20261202)  # the same garbage every run
    for m in manifests:
        m.write_bytes(rng.randbytes(max(m.stat().st_size, 64)))
    return "garbage over " + ", ".join(m.name for m in manifests)


def delete_current(db: Path) -> str:
    (db / "CURRENT").unlink()
    return "CURRENT deleted"


def flip_newest_log_byte(db: Path) -> str:
    log = _newest_log(db)
    size = log.stat().st_size
    _flip(log, size // 2, 1)
    return f"one byte flipped in {log.name} at {size // 2} of {size}"


def delete_tables(db: Path) -> str:
    tables = _tables(db)
    for t in tables:
        t.unlink()
    return "deleted " + ", ".join(t.name for t in tables)


# (what is done to the stopped follower's db, the outcome observed, a pattern its message matches)
REFUSED = "refused to start"
DAMAGE = [
    # LevelDB takes a .log cut short for an unfinished write and drops the tail silently; the durable
    # mark (ZRAFT-MARK, written at the clean stop) sees that the applied index went back.
    pytest.param(truncate_newest_log, REFUSED,
                 r"the database lost writes it held: its applied index is \d+, but it was \d+ at .* "
                 r"\(ZRAFT-MARK\); a LevelDB file was cut short or replaced", id="truncate-newest-log"),
    # The middle of the table is in the log entries' blocks (keys sort d... < l/... < m/...), which
    # the start-up check reads with LevelDB's block checksums on.
    # Every read verifies the blocks it loads, so the block checksum speaks first wherever the bytes land
    # (an unverified seek once cached a damaged block that snappy decompressed without complaint).
    pytest.param(flip_ldb_middle, REFUSED, r"LevelDB: Corruption: block checksum mismatch", id="flip-ldb-middle"),
    # The first block holds the state machine's keys, which the state room seeks at open (to find its
    # generations): the seek's CorruptionError is turned into the same clear refusal.
    pytest.param(flip_ldb_first_block, REFUSED, r"LevelDB: Corruption", id="flip-ldb-first-block"),
    pytest.param(garbage_manifest, REFUSED, r"LevelDB cannot open it: Corruption: ", id="garbage-manifest"),
    # LevelDB (create_if_missing) would make a new database there and delete the old tables as
    # obsolete: the node refuses before opening it, and the files stay as they were.
    pytest.param(delete_current, REFUSED, r"its CURRENT file is missing", id="delete-CURRENT"),
    pytest.param(flip_newest_log_byte, REFUSED, r"LevelDB cannot open it: Corruption: checksum mismatch",
                 id="flip-newest-log-byte"),
    pytest.param(delete_tables, REFUSED, r"LevelDB cannot open it: Corruption: \d+ missing files; e\.g\.: \S+\.ldb",
                 id="delete-ldb-files"),
]


# ------------------------------------------------------------------------------------ helpers


class Load:
    """A client writing (and reading back known keys) through the cluster in a thread, until stopped."""

    def __init__(self, c: Cluster, known: dict[bytes, bytes], prefix: bytes) -> None:
        self.c, self.known, self.prefix = c, dict(known), prefix
        self.acked: dict[bytes, bytes] = {}
        self.unknown: dict[bytes, bytes] = {}
        self.errors: list[str] = []
        self.wrong_reads: list[tuple[bytes, bytes, bytes | None]] = []
        self.reads = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="load", daemon=True)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the load thread did not stop"

    def _run(self) -> None:
        known = list(self.known)
        rng = random.Random(7)
        with self.c.client(timeout=5.0) as cl:
            i = 0
            while not self.stop.is_set():
                k, v = self.prefix + b"%05d" % i, b"w%05d" % i
                i += 1
                try:
                    cl.put(k, v)
                    self.acked[k] = v
                    probe = rng.choice(known)
                    got = cl.get(probe)
                    self.reads += 1
                    if got != self.known[probe]:
                        self.wrong_reads.append((probe, self.known[probe], got))
                except OutcomeUnknown:
                    self.unknown[k] = v
                except ZraftError as exc:
                    self.errors.append(f"{k!r}: {exc}")
                self.stop.wait(0.005)  # pacing: leave the 2 cores to the nodes

    def check(self, during: str) -> None:
        assert not self.errors, f"writes failed {during}: {self.errors[:5]}"
        assert not self.wrong_reads, f"reads answered wrong values {during}: {self.wrong_reads[:5]}"
        assert len(self.acked) >= 5 and self.reads >= 5, (
            f"the cluster served only {len(self.acked)} writes and {self.reads} reads {during}")


def settled_follower(c: Cluster) -> tuple[int, int, dict[bytes, bytes]]:
    """300 acknowledged writes, a follower restarted in the middle of them (its db gets an .ldb table)
    and stopped cleanly at the end. Returns (leader, follower, the acknowledged writes)."""
    leader = c.wait_leader()
    f = next(i for i in c.ids if i != leader)
    acked: dict[bytes, bytes] = {}
    first = {b"key%05d" % i: b"value%05d" % i for i in range(KEYS_BEFORE_RESTART)}
    assert all(r.get("ok") is True for r in c.put_many(leader, first)), "writes failed"
    acked.update(first)
    c.wait_caught_up(f, leader)
    assert c.stop(f) == 0, "the follower did not stop cleanly"
    c.start(f)
    c.wait_caught_up(f, leader)
    second = {b"key%05d" % i: b"value%05d" % i for i in range(KEYS_BEFORE_RESTART,
                                                              KEYS_BEFORE_RESTART + KEYS_AFTER_RESTART)}
    assert all(r.get("ok") is True for r in c.put_many(leader, second)), "writes failed"
    acked.update(second)
    c.wait_caught_up(f, leader)
    assert c.stop(f) == 0, "the follower did not stop cleanly"
    return leader, f, acked


def start_and_watch(c: Cluster, node_id: int, leader: int) -> tuple[str, subprocess.Popen, dict | None]:
    """Start a node; (REFUSED, proc, None) once it has exited, or ("started", proc, status) once it
    serves and has applied what the leader had committed. Fails at the deadline."""
    target = c.status(leader)["commit_index"]
    proc = c.start(node_id)
    deadline = time.monotonic() + START_DEADLINE_S
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return REFUSED, proc, None
        last = c.status(node_id, timeout=0.3)
        if last and last["applied_index"] >= target:
            return "started", proc, last
        time.sleep(0.05)
    raise AssertionError(f"node {node_id} neither exited nor caught up (to {target}) within {START_DEADLINE_S} s; "
                         f"last status {last}; output:\n{output_of_last_start(c.log_path(node_id))}")


def assert_clear_refusal(output: str, db: Path, pattern: str, rc: int | None, traceback_checked_later: bool = False
                         ) -> str:
    """The node exited non-zero with one line that names its data dir and matches ``pattern``, and no
    traceback (unless the caller checks that itself, last, so that the other checks run first)."""
    assert rc not in (0, None), f"exit code {rc}; output:\n{output}"
    if not traceback_checked_later:
        assert "Traceback" not in output, f"a Python traceback instead of a clear message:\n{output}"
    lines = [line for line in output.splitlines() if f"the data dir {db} is damaged" in line]
    assert lines, f"no line says 'the data dir {db} is damaged':\n{output}"
    assert any(re.search(pattern, line) for line in lines), (
        f"the message does not say what was expected ({pattern!r}):\n{output}")
    assert any("restore this node from a backup" in line for line in lines), output
    return lines[-1]


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("damage,expected,pattern", DAMAGE)
def test_damaged_follower_is_refused_and_the_cluster_goes_on(
        make_cluster: Callable[..., Cluster], damage: Callable[[Path], str], expected: str, pattern: str) -> None:
    c = make_cluster(env=WIDE)
    leader, f, acked = settled_follower(c)
    db = c.data_dir / str(f) / "db"
    what = damage(db)
    tables = sorted(p.name for p in db.glob("*.ldb"))
    others = [i for i in c.ids if i != f]

    with Load(c, acked, b"during-") as load:
        outcome, proc, status = start_and_watch(c, f, leader)
        output = output_of_last_start(c.log_path(f))
        if outcome == "started":
            # Whatever it is expected to do: it must not serve anything wrong.
            c.wait_caught_up(f, leader)
            c.check_all_present(c.wait_leader(), acked)
        assert outcome == expected, (f"{what}: expected the node to have {expected}, but it {outcome} "
                                     f"(status {status}); output:\n{output}")
        line = assert_clear_refusal(output, db, pattern, proc.returncode)
        print(f"{what}: refused: {line}")
        # It stays refused: a second start does not come up on what the first attempt left.
        outcome2, proc2, _ = start_and_watch(c, f, leader)
        output2 = output_of_last_start(c.log_path(f))
        assert outcome2 == REFUSED, f"{what}: the second start came up; output:\n{output2}"
        assert_clear_refusal(output2, db, pattern, proc2.returncode)
        # The two others served reads and writes all along; wait for a few more to be sure.
        enough = time.monotonic() + 10
        while len(load.acked) < 20 and time.monotonic() < enough:
            time.sleep(0.05)
    load.check("while the damaged follower was started")

    assert not (db / DAMAGED_FILE).exists(), "damage found at start is not damage found while running"
    if damage is delete_current:  # refused before LevelDB could take the dir for a new database
        assert sorted(p.name for p in db.glob("*.ldb")) == tables, "the tables were not left as they were"
    assert c.wait_leader(ids=others) == leader
    expected_data = {**acked, **load.acked}
    c.check_all_present(leader, expected_data)
    got = c.get_many(leader, list(load.unknown))
    odd = {k: v for k, v in got.items() if v not in (None, load.unknown[k])}
    assert not odd, f"writes of unknown outcome hold other values: {odd}"


def test_damage_found_while_running_stops_the_node_and_is_remembered(make_cluster: Callable[..., Cluster]) -> None:
    """A table block that neither the open nor the start-up check reads (state machine keys in the
    middle of the table) is found when a cas makes the follower read it: it stops, writes
    ZRAFT-DAMAGED, and refuses the next start; the cluster's answer is the right one."""
    c = make_cluster(env=WIDE)
    leader = c.wait_leader()
    f = next(i for i in c.ids if i != leader)
    rng = random.Random(11)
    # Incompressible values: a table stores them verbatim, so one can be found in the file. 150 keys of
    # 200 bytes fill several data blocks of state machine keys; key 75 is in one in the middle.
    acked = {b"r%04d" % i: rng.randbytes(200) for i in range(150)}
    assert all(r.get("ok") is True for r in c.put_many(leader, acked))
    c.wait_caught_up(f, leader)
    assert c.stop(f) == 0
    c.start(f)  # LevelDB writes the recovered .log into an .ldb table at open
    c.wait_caught_up(f, leader)
    assert c.stop(f) == 0
    db = c.data_dir / str(f) / "db"
    victim = b"r0075"
    tables = _tables(db)
    spots = [(t, t.read_bytes().find(acked[victim])) for t in tables]
    spots = [(t, at) for t, at in spots if at >= 0]
    if not spots:
        pytest.fail(f"cannot set up the case: the value of {victim!r} is in none of {tables}")
    table, at = spots[0]  # its first copy: the state machine's record (d... sorts before the log's l/...)
    _flip(table, at + 50, 4)

    outcome, proc, status = start_and_watch(c, f, leader)
    assert outcome == "started", (f"the damaged block was read at start: the case needs a block read only "
                                  f"later; output:\n{output_of_last_start(c.log_path(f))}")
    with c.client() as cl:
        assert cl.cas(victim, acked[victim], b"swapped") == (True, b"swapped")  # the follower applies it too
    try:
        rc = proc.wait(START_DEADLINE_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the follower did not stop on reading the damaged block; status "
                             f"{c.status(f)}") from None
    found_output = output_of_last_start(c.log_path(f))
    line = assert_clear_refusal(found_output, db, r"LevelDB: Corruption: block checksum mismatch", rc,
                                traceback_checked_later=True)
    print(f"found while running: {line}")
    assert (db / DAMAGED_FILE).exists(), f"{DAMAGED_FILE} was not written"

    outcome, proc, _ = start_and_watch(c, f, leader)
    output = output_of_last_start(c.log_path(f))
    assert outcome == REFUSED, f"a node that found damage while running came up again:\n{output}"
    line = assert_clear_refusal(output, db, re.escape(f"(found while running; {db / DAMAGED_FILE} remembers it)"),
                                proc.returncode)
    print(f"next start: {line}")

    acked[victim] = b"swapped"
    with c.client() as cl:
        cl.put(b"after", b"damage")
        acked[b"after"] = b"damage"
    c.check_all_present(c.wait_leader(ids=[i for i in c.ids if i != f]), acked)
    # Last, so that everything above is checked even while it fails: the node that stopped said so
    # in its one line, not with a Python traceback (NodeFailed out of the CLI).
    assert "Traceback" not in found_output, (
        f"the node stopped with a Python traceback after its message:\n{found_output}")


def test_an_emptied_data_dir_is_refused_under_its_old_id(make_cluster: Callable[..., Cluster]) -> None:
    """The operator wiped a follower's db: it may have voted in a term it would vote in again, so it
    must not take part under that id. It asks the others, is told it took part, and says in one line
    to remove it and add it back as a new member; the cluster goes on without it."""
    c = make_cluster(env=WIDE)
    leader = c.wait_leader()
    f = next(i for i in c.ids if i != leader)
    acked = {b"e%03d" % i: b"v%03d" % i for i in range(20)}
    assert all(r.get("ok") is True for r in c.put_many(leader, acked))
    c.wait_caught_up(f, leader)
    assert c.stop(f) == 0
    db = c.data_dir / str(f) / "db"
    shutil.rmtree(db)
    proc = c.start(f)
    assert proc.wait(timeout=START_DEADLINE_S) == 4, output_of_last_start(c.log_path(f))
    output = output_of_last_start(c.log_path(f))
    assert "Traceback" not in output, output
    assert f"error: node {f} refused: node {f} took part in this cluster before" in output, output
    assert f"zraft member remove {f}" in output, output
    more = {b"f%03d" % i: b"w%03d" % i for i in range(20)}
    assert all(r.get("ok") is True for r in c.put_many(leader, more))
    c.check_all_present(leader, {**acked, **more})
