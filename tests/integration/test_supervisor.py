"""`zraft cluster up` (the supervisor) and its control commands, as a user runs them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from zraft.client import Client

from .cluster import (
    LOG_FILES,
    REGISTRY,
    CliResult,
    Cluster,
    child_env,
    free_port,
    pid_alive,
    run_zraft,
    spawn,
    zraft_cmd,
)

pytestmark = pytest.mark.integration


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2:].split()[1])


class Supervised:
    """A `zraft cluster up` process and the cluster it runs (a :class:`Cluster` used only
    for its Config.txt, addresses and status helpers: it starts no process itself)."""

    def __init__(self, workdir: Path, c: Cluster | None = None) -> None:
        self.c = c or Cluster(workdir)
        self.out = self.c.workdir / "supervisor.out"
        self.proc: subprocess.Popen | None = None

    def up(self) -> dict[int, int]:
        """Start the supervisor; wait for its three nodes and a leader. Returns {id: pid}."""
        self.mark = self.out.stat().st_size if self.out.exists() else 0
        self.proc = spawn(zraft_cmd("cluster", "up", "--config", str(self.c.config_path),
                                    "--data-dir", str(self.c.data_dir)),
                          what="zraft cluster up", log=self.out, env=child_env(), cwd=self.c.workdir)
        for i in self.c.ids:
            path = self.c.data_dir / str(i) / "console.log"
            if path not in LOG_FILES:
                LOG_FILES.append(path)
        self.c.wait_leader(self.c.ids, timeout=30)
        return self.pids()

    def pids(self, ids=None) -> dict[int, int]:
        sts = self.c.statuses(ids=ids)
        assert all(sts.values()), sts
        pids = {i: st["pid"] for i, st in sts.items()}
        for i, pid in pids.items():
            REGISTRY.track_pid(pid, f"node {i} of a supervisor")
            assert _ppid(pid) == self.proc.pid, f"node {i} (pid {pid}) is not the supervisor's child"
        return pids

    def ctl(self, *args: str, timeout: float = 30.0) -> CliResult:
        return run_zraft("cluster", *args, "--data-dir", str(self.c.data_dir), cwd=self.c.workdir, timeout=timeout)

    def output(self) -> str:
        return self.out.read_bytes()[self.mark:].decode(errors="replace")

    def wait_output(self, text: str, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while text not in self.output():
            assert time.monotonic() < end, f"the supervisor did not print {text!r} within {timeout} s"
            assert self.proc.poll() is None, f"the supervisor exited with {self.proc.returncode}"
            time.sleep(0.05)

    def wait_gone(self, pids, timeout: float) -> float:
        t0 = time.monotonic()
        while any(pid_alive(p) for p in pids):
            alive = [p for p in pids if pid_alive(p)]
            assert time.monotonic() - t0 < timeout, f"pids {alive} still alive {timeout} s later"
            time.sleep(0.02)
        return time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def supervised(tmp_path: Path):
    s = Supervised(tmp_path / "sup")
    try:
        yield s
    finally:
        s.kill()  # its nodes die with it (PR_SET_PDEATHSIG); the leftover check makes sure


def test_supervisor_control_commands_and_sigterm(supervised: Supervised) -> None:
    s, c = supervised, supervised.c
    pids = s.up()
    assert len(set(pids.values())) == 3
    leader = c.wait_leader(c.ids)
    follower = next(i for i in c.ids if i != leader)
    with c.client() as cl:
        cl.put(b"k", b"v")

    # kill-node: SIGKILL through the control socket; the supervisor reports the death.
    r = s.ctl("kill-node", str(follower))
    assert r.rc == 0 and "SIGKILL" in r.out, str(r)
    assert not pid_alive(pids[follower])
    assert c.status(follower, timeout=0.5) is None
    s.wait_output(f"node {follower} (pid {pids[follower]}) killed by SIGKILL")

    r = s.ctl("start-node", str(follower))
    assert r.rc == 0 and "started" in r.out, str(r)
    c.wait_leader(c.ids)
    new_pid = s.pids([follower])[follower]
    assert new_pid != pids[follower]
    pids[follower] = new_pid
    r = s.ctl("start-node", str(follower))
    assert r.rc == 0 and "already running" in r.out, str(r)

    # stop-node: a clean stop (SIGTERM), reported with its exit code.
    r = s.ctl("stop-node", str(follower))
    assert r.rc == 0 and "SIGTERM" in r.out, str(r)
    assert not pid_alive(pids[follower])
    s.wait_output(f"node {follower} (pid {pids[follower]}) exited with code 0")
    r = s.ctl("stop-node", str(follower))
    assert r.rc == 0 and "not running" in r.out, str(r)
    r = s.ctl("start-node", str(follower))
    assert r.rc == 0, str(r)
    c.wait_leader(c.ids)
    pids.update(s.pids([follower]))

    # A node that dies on its own (here: SIGKILL from outside) is reported too.
    victim = next(i for i in c.ids if i != follower)
    os.kill(pids[victim], signal.SIGKILL)
    s.wait_output(f"node {victim} (pid {pids[victim]}) killed by SIGKILL")
    r = s.ctl("start-node", str(victim))
    assert r.rc == 0, str(r)
    c.wait_leader(c.ids)
    pids.update(s.pids([victim]))

    # Bad control requests: a clear error, and the supervisor lives on.
    r = s.ctl("kill-node", "9")
    assert r.rc != 0 and "9" in r.err, str(r)
    assert s.proc.poll() is None

    with c.client() as cl:
        assert cl.get(b"k") == b"v"

    # SIGTERM: every node stops, then the supervisor exits 0 and removes its control socket.
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    rc = s.proc.wait(30)
    took = time.monotonic() - t0
    assert rc == 0, f"supervisor exited with {rc} after SIGTERM"
    assert not any(pid_alive(p) for p in pids.values()), pids
    assert "all nodes stopped" in s.output()
    assert not (c.data_dir / "supervisor.ipc").exists()
    print(f"SIGTERM: supervisor and nodes gone in {took:.2f} s")
    for i in c.ids:  # each node stopped cleanly (SIGTERM), none was killed
        log = (c.data_dir / str(i) / "node.log").read_text()
        assert f"node {i} stopped" in log.splitlines()[-1], log.splitlines()[-3:]

    r = s.ctl("stop-node", "1", timeout=15)
    assert r.rc != 0 and "no supervisor" in r.err, str(r)


def test_supervisor_sigint_stops_all_and_data_survives(supervised: Supervised) -> None:
    s, c = supervised, supervised.c
    s.up()
    items = {f"k{i}".encode(): f"v{i}".encode() for i in range(50)}
    with c.client() as cl:
        for k, v in items.items():
            cl.put(k, v)
    pids = s.pids()
    s.proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert s.proc.wait(30) == 0
    assert not any(pid_alive(p) for p in pids.values()), pids

    s.up()  # same data dir
    c.check_all_present(c.wait_leader(c.ids), items)


def test_supervisor_sigkill_takes_its_nodes_down(supervised: Supervised) -> None:
    s, c = supervised, supervised.c
    pids = s.up()
    with c.client() as cl:
        cl.put(b"before", b"sigkill")
    s.proc.kill()
    s.proc.wait()
    took = s.wait_gone(pids.values(), timeout=3.0)
    print(f"SIGKILL of the supervisor: its nodes gone {took:.2f} s later")

    # A new supervisor on the same data dir starts (over the stale control socket) and
    # has the data.
    pids = s.up()
    with c.client() as cl:
        assert cl.get(b"before") == b"sigkill"
    r = s.ctl("kill-node", "1", timeout=15)
    assert r.rc == 0, str(r)
    s.wait_output("node 1 (pid")


def test_control_commands_without_a_supervisor(tmp_path: Path) -> None:
    r = run_zraft("cluster", "stop-node", "1", "--data-dir", str(tmp_path / "data"), cwd=tmp_path)
    assert r.rc != 0 and "no supervisor" in r.err, str(r)


def test_second_supervisor_on_the_same_data_dir_refuses(supervised: Supervised) -> None:
    """A second `cluster up` on a data dir a running supervisor owns must fail clearly and
    leave the first one (its nodes and its control socket) alone."""
    s, c = supervised, supervised.c
    pids = s.up()
    second = Supervised(c.workdir, c)
    second.out = c.workdir / "supervisor2.out"
    second.mark = 0
    second.proc = spawn(zraft_cmd("cluster", "up", "--config", str(c.config_path), "--data-dir", str(c.data_dir)),
                        what="second zraft cluster up", log=second.out, env=child_env(), cwd=c.workdir)
    try:
        try:
            rc = second.proc.wait(10)
        except subprocess.TimeoutExpired:
            rc = None
        assert rc is not None and rc != 0, (
            "a second `cluster up` on the same data dir keeps running (its nodes can't start) and has taken "
            f"over DATA_DIR/supervisor.ipc; its output:\n{second.output()[-1500:]}")
    finally:
        second.kill()
    # The first supervisor is still in charge of its nodes.
    assert all(pid_alive(p) for p in pids.values())
    r = s.ctl("kill-node", "1")
    assert r.rc == 0 and "SIGKILL" in r.out, f"the control socket no longer reaches the first supervisor: {r}"
    assert not pid_alive(pids[1])


def test_cluster_reload_adds_the_new_lines_and_removes_the_dropped_ones(supervised: Supervised) -> None:
    """Config.txt edited under a running `cluster up`: `zraft cluster reload` starts the new node with
    --join and adds it (a voter once caught up), then removes the dropped node and stops its process;
    nothing written before is lost, and the membership is the file's."""
    s = supervised
    c = s.c
    pids = s.up()
    with c.client(timeout=10) as cl:
        for i in range(50):
            cl.put(b"before-%02d" % i, b"v")
    new = free_port()
    c.config_path.write_text("".join(f'Ip="127.0.0.1",port="{c.peer_ports[i]}",id="{i}"\n' for i in (1, 2))
                             + f'Ip="127.0.0.1",port="{new}",id="4"\n')
    r = s.ctl("reload", timeout=120)
    assert r.rc == 0 and r.out.strip() == "reload: added node 4; removed node 3", str(r)
    s.wait_gone([pids[3]], timeout=10)
    endpoints = [c.endpoint(1), c.endpoint(2), f"tcp://127.0.0.1:{new + 100}"]
    with Client(endpoints, timeout=10) as cl:
        rep = cl.members()
        assert sorted((m["id"], m["voter"]) for m in rep["members"]) == [(1, True), (2, True), (4, True)], rep
        assert all(cl.get(b"before-%02d" % i) == b"v" for i in range(50))
        cl.put(b"after", b"reload")
        st = cl.status(endpoints[2])
        assert st is not None and st["voters"] == [1, 2, 4] and st["role"] in ("follower", "leader"), st
    REGISTRY.track_pid(st["pid"], "node 4 of a supervisor")
    assert _ppid(st["pid"]) == s.proc.pid, "node 4 is not the supervisor's child"
    r = s.ctl("reload", timeout=60)
    assert r.rc == 0 and "already matches" in r.out, str(r)
