"""The one process manager: node processes started, signalled and reaped by pid, dying with us.

:class:`NodeProcesses` runs one ``python -m zraft node --id N`` process per node of a Config.txt.
The `cluster up` supervisor (zraft/cluster/supervisor.py), the local clusters of the Jepsen runner
and ``zraft bench --spawn`` (zraft/cluster/local.py) and the integration tests all use it.

Every child gets PR_SET_PDEATHSIG (SIGKILL), so it dies with us even if we are killed with
SIGKILL. The signal fires when the *thread* that forked the child exits, so every process is
forked from one thread that lives as long as the manager: a thread of the caller's (a nemesis,
say) may start a node and then end without taking it along. The ``preexec_fn`` that sets it runs
between fork and exec, where only async-signal-safe work is allowed: libc is loaded here, at
import, never in the child (dlopen after fork in a process with other threads may deadlock), and
the child checks that its parent is still the one that forked it (the parent may die between
fork and prctl).
"""

from __future__ import annotations

import ctypes
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
STOP_GRACE_S = 5.0

try:
    _LIBC: Any = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded here, never in a forked child
except OSError:  # not Linux: no PR_SET_PDEATHSIG; the managers still kill their children by pid
    _LIBC = None
_PR_SET_PDEATHSIG = 1
PARENT_GONE = 125  # the exit code of a child whose parent died before it could ask to die with it


def die_with_parent(parent_pid: int, own_group: bool = False) -> Callable[[], None]:
    """A ``preexec_fn``: the child is SIGKILLed when the thread that forked it ends (Linux).

    ``own_group``: the child leaves our process group, so a Ctrl-C in a terminal reaches only us
    (and we stop the children ourselves).
    """
    def run() -> None:  # in the child between fork and exec: no imports, no locks, no dlopen
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(PARENT_GONE)
        if own_group:
            os.setpgid(0, 0)

    return run


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for a node we control: ours without ZRAFT_* settings (the caller decides
    them), the repo importable, output unbuffered, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZRAFT_")}
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + old if old else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class _Spawner:
    """One long-lived thread that forks every child (see the module docstring)."""

    def __init__(self) -> None:
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="zraft-spawner", daemon=True)
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


class NodeProcesses:
    """The node processes of one Config.txt and data dir.

    ``log_path(id)``: where a node's stdout and stderr go (appended, with a header line per start).
    ``env``: the nodes' environment (default: ours). ``node_args``: more arguments of ``zraft node``.
    ``own_group``: each node in a process group of its own. ``on_start(id, proc)``: called for every
    process started (the tests register them for their leftover checks).
    """

    def __init__(self, config_path: Path, data_dir: Path, log_path: Callable[[int], Path], *,
                 env: dict[str, str] | None = None, cwd: Path | None = None, node_args: Sequence[str] = (),
                 own_group: bool = False, on_start: Callable[[int, subprocess.Popen], None] | None = None) -> None:
        self.config_path = config_path
        self.data_dir = data_dir
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.node_args = list(node_args)
        self.own_group = own_group
        self.on_start = on_start
        self.procs: dict[int, subprocess.Popen] = {}
        self.spawned_pids: list[int] = []  # every process ever started, for leftover checks
        self.paused: set[int] = set()
        self.lock = threading.RLock()
        self._spawner = _Spawner()
        self._closed = False

    def command(self, node_id: int, extra_args: Sequence[str] = ()) -> list[str]:
        return [sys.executable, "-m", "zraft", "node", "--id", str(node_id), "--config", str(self.config_path),
                "--data-dir", str(self.data_dir), *self.node_args, *extra_args]

    def start(self, node_id: int, extra_args: Sequence[str] = ()) -> subprocess.Popen:
        """Start a node that is not running (a running one is left alone); its process. ``extra_args``: more
        arguments of ``zraft node`` for this start (``--join``)."""
        with self.lock:
            if self._closed:
                raise RuntimeError("the node processes are closed")
            running = self.procs.get(node_id)
            if running is not None and running.poll() is None:
                return running
            cmd = self.command(node_id, extra_args)
            log = self.log_path(node_id)
            parent = os.getpid()

            def spawn() -> subprocess.Popen:
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "ab") as out:
                    out.write(f"===== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
                    out.flush()
                    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                            env=self.env, cwd=self.cwd,
                                            preexec_fn=die_with_parent(parent, own_group=self.own_group))

            proc = self._spawner.call(spawn)
            self.procs[node_id] = proc
            self.spawned_pids.append(proc.pid)
            self.paused.discard(node_id)
            if self.on_start is not None:
                self.on_start(node_id, proc)
            return proc

    def alive(self, node_id: int) -> bool:
        p = self.procs.get(node_id)
        return p is not None and p.poll() is None

    def pid(self, node_id: int) -> int | None:
        p = self.procs.get(node_id)
        return p.pid if p is not None and p.poll() is None else None

    def kill(self, node_id: int, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int | None:
        """Signal a node (SIGKILL by default, paused or not) and reap it; its exit code (None: never ran)."""
        with self.lock:
            p = self._signal(node_id, sig)
            return None if p is None else p.wait(timeout)

    def stop(self, node_id: int, grace: float = STOP_GRACE_S) -> int | None:
        """SIGTERM a node (resuming it if paused), SIGKILL after ``grace`` s; its exit code."""
        with self.lock:
            p = self._signal(node_id, signal.SIGTERM)
            if p is None:
                return None
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill(node_id)
            return p.returncode

    def _signal(self, node_id: int, sig: int) -> subprocess.Popen | None:
        """Send ``sig`` to a running node (and SIGCONT if it was paused, so it can act on it)."""
        p = self.procs.get(node_id)
        if p is None:
            return None
        if p.poll() is None:
            try:
                os.kill(p.pid, sig)
                if node_id in self.paused and sig != signal.SIGKILL:
                    os.kill(p.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.paused.discard(node_id)
        return p

    def stop_all(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM every running node at once; SIGKILL those still there after ``grace`` s."""
        with self.lock:
            running = [(i, p) for i, p in self.procs.items() if p.poll() is None]
            for i, p in running:
                p.send_signal(signal.SIGTERM)
                if i in self.paused:
                    p.send_signal(signal.SIGCONT)
            deadline = time.monotonic() + grace
            for i, p in running:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.kill(i)
            self.paused.clear()

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

    def close(self) -> None:
        """Kill every node by pid and stop the spawner thread."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
            for i in list(self.procs):
                self.kill(i)
        self._spawner.close()


# ---------------------------------------------------------------------- ports

_used_ports: set[int] = set()
_ports_lock = threading.Lock()


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (where outgoing connections get theirs)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(ports: Sequence[int]) -> bool:
    socks = []
    try:
        for p in ports:
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def free_ports(count: int, rng: random.Random | None = None, block: Sequence[int] | None = None) -> list[int]:
    """``count`` distinct ports bindable on 127.0.0.1 now, picked at random below the kernel's
    ephemeral range (where outgoing connections take their local ports, which could otherwise steal
    a port from a node restarted later), never twice per process.

    With ``block`` (offsets, e.g. (0, 100, 200)), each port P returned has every P + offset free and
    unused too (for Config.txt's defaults: client_port = port + 100, http_port = port + 200)."""
    rng = rng or random.Random()
    offsets = list(block or (0,))
    hi = min(ephemeral_low(), 65536) - 1 - max(offsets)
    lo = 10000 if hi > 12000 else 1024
    out: list[int] = []
    with _ports_lock:
        for _ in range(100 * count + 1000):
            if len(out) == count:
                return out
            p = rng.randrange(lo, hi)
            wanted = [p + o for o in offsets]
            if any(w in _used_ports for w in wanted) or not _bindable(wanted):
                continue
            out.append(p)
            _used_ports.update(wanted)
    raise RuntimeError("no free ports on 127.0.0.1")
