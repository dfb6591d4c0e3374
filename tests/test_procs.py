"""The process manager (zraft/cluster/procs.py): children that die with us, started safely after fork."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from zraft.cluster.procs import PARENT_GONE, NodeProcesses, die_with_parent, free_ports

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


class Sleepers(NodeProcesses):
    """NodeProcesses whose "nodes" only sleep (the manager is under test, not the node)."""

    def command(self, node_id: int, extra_args: Sequence[str] = ()) -> list[str]:
        return SLEEPER


@pytest.fixture
def sleepers(tmp_path: Path):
    m = Sleepers(tmp_path / "Config.txt", tmp_path / "data", lambda i: tmp_path / f"node{i}.out")
    yield m
    m.close()


def test_a_child_whose_parent_died_before_prctl_exits_at_once() -> None:
    """The child checks that its parent is still the one that forked it (here: it never was)."""
    p = subprocess.Popen([sys.executable, "-c", "print('ran')"], stdout=subprocess.PIPE,
                         preexec_fn=die_with_parent(parent_pid=1))
    out, _ = p.communicate(timeout=10)
    assert p.returncode == PARENT_GONE and out == b""


def test_nothing_is_loaded_in_the_child_between_fork_and_exec(monkeypatch: pytest.MonkeyPatch,
                                                                sleepers: Sleepers) -> None:
    """dlopen after fork, with other threads about (ZeroMQ's, the spawner's), can deadlock: the child
    must use the libc loaded at import. A CDLL made to fail shows any load in the child."""
    def no_loading(*_a: object, **_k: object) -> None:
        raise AssertionError("a library was loaded in the forked child")

    monkeypatch.setattr(ctypes, "CDLL", no_loading)
    monkeypatch.setattr(ctypes.cdll, "LoadLibrary", no_loading)
    p = sleepers.start(1)
    assert sleepers.alive(1) and p.poll() is None
    assert sleepers.kill(1) == -9


def test_a_node_started_from_a_thread_that_ends_keeps_running(sleepers: Sleepers) -> None:
    """PR_SET_PDEATHSIG fires when the forking thread exits: the manager forks from its own thread."""
    t = threading.Thread(target=lambda: sleepers.start(1))
    t.start()
    t.join()
    with pytest.raises(subprocess.TimeoutExpired):  # the death signal, were it sent, kills at once
        sleepers.procs[1].wait(timeout=0.5)
    assert sleepers.alive(1)


def test_stop_pause_resume_and_close(sleepers: Sleepers) -> None:
    sleepers.start(1)
    sleepers.start(2)
    assert sleepers.start(1) is sleepers.procs[1]  # a running node is left alone
    sleepers.pause(2)
    assert sleepers.paused == {2}
    assert sleepers.stop(2, grace=5) == -15  # SIGTERM reaches it although it was stopped
    pids = list(sleepers.spawned_pids)
    sleepers.close()
    assert not sleepers.alive(1) and len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_free_ports_blocks_leave_room_for_the_default_client_and_http_ports() -> None:
    a, b = free_ports(2, block=(0, 1, 100, 101, 200, 201))
    assert abs(a - b) >= 1 and a != b
