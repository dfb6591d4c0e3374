"""A local zraft cluster of real node processes, for fault injection.

:class:`LocalCluster` writes a Config.txt with free random loopback ports, runs one
``python -m zraft node --allow-faults`` process per node, and can kill (SIGKILL), stop
(SIGTERM), pause (SIGSTOP), resume (SIGCONT) and restart each of them, find the leader,
and send fault injection requests (docs/PROTOCOL.md, op ``fault``).

Every node process gets PR_SET_PDEATHSIG (SIGKILL), so it dies with the runner even if
the runner is killed with SIGKILL. That signal fires when the *thread* that forked the
child exits, so all processes are spawned from one dedicated thread that lives as long
as the cluster: a nemesis thread may restart nodes and then end without taking them
along. :meth:`LocalCluster.close` (also on ``with`` exit) kills every node by pid.
"""

from __future__ import annotations

import ctypes
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from zraft.client import Client

REPO_ROOT = Path(__file__).resolve().parents[2]
STOP_GRACE_S = 5.0

try:
    _LIBC: Any = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded here, never in a forked child
except OSError:  # not Linux: no PR_SET_PDEATHSIG, close() still cleans up
    _LIBC = None
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, own_group: bool = False) -> Callable[[], None]:
    """A ``preexec_fn``: the child is SIGKILLed when the thread that started it dies (Linux).

    ``own_group``: the child leaves our process group, so a Ctrl-C in a terminal reaches only
    us (the Jepsen runner handles it, and stops the nodes itself). Shared with the
    integration tests' helper (tests/integration/cluster.py).
    """
    def run() -> None:  # in the child between fork and exec: no imports, no locks
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(125)
        if own_group:
            os.setpgid(0, 0)

    return run


class _Spawner:
    """One long-lived thread that runs every Popen (see the module docstring)."""

    def __init__(self) -> None:
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="zraft-jepsen-spawner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, fut = item
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the caller
                fut.set_exception(exc)

    def call(self, fn: Callable[[], Any]) -> Any:
        if threading.current_thread() is self._thread:
            return fn()
        fut: Future = Future()
        self._q.put((fn, fut))
        return fut.result()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(5)


# ---------------------------------------------------------------------- ports

_used_ports: set[int] = set()
_ports_lock = threading.Lock()


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (where outgoing connections get theirs)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int, rng: random.Random | None = None) -> list[int]:
    """``count`` distinct ports bindable on 127.0.0.1 now, picked at random below the
    kernel's ephemeral range (where outgoing connections take their local ports, which
    could otherwise steal a port from a node restarted later), never twice per process."""
    rng = rng or random.Random()
    hi = min(ephemeral_low(), 65536) - 1
    lo = 10000 if hi > 12000 else 1024
    out: list[int] = []
    with _ports_lock:
        for _ in range(100 * count + 1000):
            if len(out) == count:
                return out
            p = rng.randrange(lo, hi)
            if p in _used_ports or p in out:
                continue
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
            finally:
                s.close()
            out.append(p)
            _used_ports.add(p)
    raise RuntimeError("no free ports on 127.0.0.1")


# ---------------------------------------------------------------------- the cluster

def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a node: ours without ZRAFT_* settings (the cluster decides them),
    the repo importable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZRAFT_")}
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + old if old else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class LocalCluster:
    """``n`` nodes on 127.0.0.1 in ``workdir`` (a new temporary directory by default,
    removed by :meth:`close` unless ``keep``). ``env`` adds ZRAFT_* settings for the nodes."""

    def __init__(self, n: int = 3, workdir: str | os.PathLike | None = None, env: dict[str, str] | None = None,
                 keep: bool = False, log_level: str = "INFO") -> None:
        if n < 1:
            raise ValueError("a cluster needs at least one node")
        self.n = n
        self.ids = list(range(1, n + 1))
        self.keep = keep
        self.own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="zraft-jepsen-")) if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.env = dict(env or {})
        self.log_level = log_level
        ports = free_ports(3 * n)
        self.peer_ports = dict(zip(self.ids, ports[:n], strict=True))
        self.client_ports = dict(zip(self.ids, ports[n:2 * n], strict=True))
        self.http_ports = dict(zip(self.ids, ports[2 * n:], strict=True))
        self.config_path = self.workdir / "Config.txt"
        self.config_path.write_text("".join(
            f'Ip="127.0.0.1",port="{self.peer_ports[i]}",id="{i}",client_port="{self.client_ports[i]}",'
            f'http_port="{self.http_ports[i]}"\n' for i in self.ids))
        self.procs: dict[int, subprocess.Popen] = {}
        self.spawned_pids: list[int] = []  # every process ever started, for leftover checks
        self.paused: set[int] = set()
        self.lock = threading.RLock()
        self._spawner = _Spawner()
        self._closed = False
        self.client = Client(self.endpoints, timeout=2.0)  # status and fault requests only

    # ------------------------------------------------------------------ addresses

    def endpoint(self, node_id: int) -> str:
        return f"tcp://127.0.0.1:{self.client_ports[node_id]}"

    @property
    def endpoints(self) -> list[str]:
        return [self.endpoint(i) for i in self.ids]

    def log_path(self, node_id: int) -> Path:
        return self.workdir / f"node{node_id}.out"

    # ------------------------------------------------------------------ processes

    def start(self, node_id: int) -> None:
        """Start (or restart) a node that is not running."""
        with self.lock:
            if self._closed:
                raise RuntimeError("the cluster is closed")
            if self.alive(node_id):
                return
            cmd = [sys.executable, "-m", "zraft", "node", "--id", str(node_id), "--config", str(self.config_path),
                   "--data-dir", str(self.data_dir), "--allow-faults", "--log-level", self.log_level]
            log = self.log_path(node_id)
            parent = os.getpid()

            def spawn() -> subprocess.Popen:
                with open(log, "ab") as out:
                    out.write(f"===== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
                    out.flush()
                    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                            env=node_env(self.env), cwd=self.workdir,
                                            preexec_fn=die_with_parent(parent, own_group=True))

            self.procs[node_id] = self._spawner.call(spawn)
            self.spawned_pids.append(self.procs[node_id].pid)
            self.paused.discard(node_id)

    def start_all(self) -> None:
        for i in self.ids:
            self.start(i)

    def alive(self, node_id: int) -> bool:
        p = self.procs.get(node_id)
        return p is not None and p.poll() is None

    def pid(self, node_id: int) -> int | None:
        p = self.procs.get(node_id)
        return p.pid if p is not None and p.poll() is None else None

    def kill(self, node_id: int) -> None:
        """SIGKILL a node (paused or not) and reap it."""
        with self.lock:
            p = self.procs.get(node_id)
            if p is None:
                return
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
            self.paused.discard(node_id)

    def stop(self, node_id: int, grace: float = STOP_GRACE_S) -> int | None:
        """SIGTERM a node (resuming it if paused), SIGKILL after ``grace`` s; its exit code."""
        with self.lock:
            p = self.procs.get(node_id)
            if p is None:
                return None
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                    if node_id in self.paused:
                        os.kill(p.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(grace)
                except subprocess.TimeoutExpired:
                    self.kill(node_id)
            self.paused.discard(node_id)
            return p.returncode

    def pause(self, node_id: int) -> None:
        with self.lock:
            if self.alive(node_id):
                os.kill(self.procs[node_id].pid, signal.SIGSTOP)
                self.paused.add(node_id)

    def resume(self, node_id: int) -> None:
        with self.lock:
            if self.alive(node_id):
                os.kill(self.procs[node_id].pid, signal.SIGCONT)
            self.paused.discard(node_id)

    def restart(self, node_id: int) -> None:
        self.kill(node_id)
        self.start(node_id)

    def running(self) -> list[int]:
        """Nodes that are alive and not paused: the ones that can answer."""
        return [i for i in self.ids if self.alive(i) and i not in self.paused]

    def close(self) -> None:
        """Kill every node by pid, stop the spawner, remove the workdir unless ``keep``."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
            for i in self.ids:
                self.kill(i)
        self.client.close()
        self._spawner.close()
        if self.own_workdir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests

    def status(self, node_id: int, timeout: float = 1.0) -> dict[str, Any] | None:
        return self.client.status(self.endpoint(node_id), timeout)

    def statuses(self, timeout: float = 1.0) -> dict[int, dict[str, Any] | None]:
        return dict(zip(self.ids, self.client.statuses(timeout), strict=True))

    def request(self, node_id: int, req: dict[str, Any], timeout: float = 2.0) -> dict[str, Any] | None:
        """One raw request to one node; the reply, or None if none came in time."""
        return self.client.request(self.endpoint(node_id), req, timeout)

    def fault(self, node_id: int, action: str, timeout: float = 1.0, **fields: Any) -> dict[str, Any] | None:
        """A fault injection request (``isolate``, ``heal``, ``drop``, ``delay``,
        ``drop_replies``, ``clear``, ``show``); the ok reply, or None."""
        rep = self.request(node_id, {"op": "fault", "action": action, **fields}, timeout)
        return rep if rep and rep.get("ok") else None

    def leader(self, timeout: float = 1.0) -> tuple[int, int] | None:
        """(leader id, term) if a node says it leads and a majority agrees; else None."""
        st = {i: s for i, s in self.statuses(timeout).items() if s is not None}
        leaders = [s for s in st.values() if s["role"] == "leader"]
        if not leaders:
            return None
        best = max(leaders, key=lambda s: s["term"])
        agree = sum(1 for s in st.values() if s["term"] == best["term"] and s["leader"] == best["id"])
        if agree * 2 <= self.n:
            return None
        return best["id"], best["term"]

    def wait_for_leader(self, timeout: float = 15.0, exclude: int | None = None) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.leader(timeout=0.5)
            if got is not None and got[0] != exclude:
                return got
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no leader within {timeout} s; statuses: {self.statuses(0.5)}")
            time.sleep(0.05)

    def converged(self, timeout: float = 1.0) -> tuple[bool, dict[int, dict[str, Any] | None]]:
        """All nodes answer, agree on one leader and term, and have applied everything the
        leader has in its log (nothing in flight)."""
        st = self.statuses(timeout)
        if any(s is None for s in st.values()):
            return False, st
        leaders = [s for s in st.values() if s["role"] == "leader"]
        if len(leaders) != 1:
            return False, st
        lead = leaders[0]
        ok = lead["commit_index"] == lead.get("last_index", lead["commit_index"]) and all(
            s["term"] == lead["term"] and s["leader"] == lead["id"] and s["applied_index"] == lead["commit_index"]
            for s in st.values())
        return ok, st

    def wait_converged(self, timeout: float = 30.0) -> dict[int, dict[str, Any] | None]:
        deadline = time.monotonic() + timeout
        while True:
            ok, st = self.converged(0.5)
            if ok:
                return st
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the cluster did not converge within {timeout} s; statuses: {st}")
            time.sleep(0.1)
