"""A local zraft cluster of real node processes on 127.0.0.1, for tests, fault injection and benchmarks.

:class:`LocalCluster` writes a Config.txt with free loopback ports, runs one node process per
line through :class:`~zraft.cluster.procs.NodeProcesses` (so every node dies with us, even if we
are killed with SIGKILL), and can kill (SIGKILL), stop (SIGTERM), pause (SIGSTOP), resume
(SIGCONT) and restart each of them, find the leader, and send fault injection requests
(docs/PROTOCOL.md, op ``fault``). The Jepsen runner, ``zraft bench --spawn`` and the
integration tests' cluster (tests/integration/cluster.py) are built on it.
:meth:`LocalCluster.close` (also on ``with`` exit) kills every node by pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from zraft.client import Client
from zraft.cluster.config import load_config
from zraft.cluster.keys import KeyRing, init_keys
from zraft.cluster.procs import NodeProcesses, free_ports, node_env


class LocalCluster:
    """``n`` nodes on 127.0.0.1 in ``workdir`` (a new temporary directory by default, removed by
    :meth:`close` unless ``keep``). ``env`` adds ZRAFT_* settings for the nodes.

    ``keys``: make keys (``zraft keys init`` into WORKDIR/keys) and run the nodes and every client with
    them (CURVE, the HTTP token); ``ring`` is then the clients' KeyRing.
    ``ports``: ``"explicit"`` writes every port of every node into Config.txt (random free ones);
    ``"base"`` writes the original C++ project's format, ``Ip="127.0.0.1",port="P"`` with
    consecutive peer ports from a free ``base`` and the default client and HTTP ports (P + 100,
    P + 200). ``allow_faults`` starts the nodes with ``--allow-faults``; ``on_start(id, proc)``
    hears of every process started.
    """

    def __init__(self, n: int = 3, workdir: str | os.PathLike | None = None, env: dict[str, str] | None = None,
                 keep: bool = False, log_level: str | None = "INFO", *, allow_faults: bool = True,
                 ports: str = "explicit", base: int = 0, keys: bool = False,
                 on_start: Callable[[int, subprocess.Popen], None] | None = None) -> None:
        if n < 1:
            raise ValueError("a cluster needs at least one node")
        self.n = n
        self.ids = list(range(1, n + 1))
        self.keep = keep
        self.own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="zraft-local-")) if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.env = dict(env or {})
        self.config_path = self.workdir / "Config.txt"
        if ports == "base":
            block = [off + i for off in (0, 100, 200) for i in range(n)]
            self.base = base or free_ports(1, block=block)[0]
            self.peer_ports = {i: self.base + i - 1 for i in self.ids}
            self.client_ports = {i: p + 100 for i, p in self.peer_ports.items()}
            self.http_ports = {i: p + 200 for i, p in self.peer_ports.items()}
            lines = [f'Ip="127.0.0.1",port="{self.peer_ports[i]}"\n' for i in self.ids]
        else:
            got = free_ports(3 * n)
            self.base = 0
            self.peer_ports = dict(zip(self.ids, got[:n], strict=True))
            self.client_ports = dict(zip(self.ids, got[n:2 * n], strict=True))
            self.http_ports = dict(zip(self.ids, got[2 * n:], strict=True))
            lines = [f'Ip="127.0.0.1",port="{self.peer_ports[i]}",id="{i}",client_port="{self.client_ports[i]}",'
                     f'http_port="{self.http_ports[i]}"\n' for i in self.ids]
        self.config_path.write_text("".join(lines))
        self.keys_dir: Path | None = None
        self.ring: KeyRing | None = None
        if keys:
            self.keys_dir = self.workdir / "keys"
            cluster = load_config(self.config_path)
            init_keys(self.keys_dir, cluster)
            self.ring = KeyRing.load(self.keys_dir, cluster)
            self.env["ZRAFT_KEYS"] = str(self.keys_dir)
        args = (["--allow-faults"] if allow_faults else []) + (["--log-level", log_level] if log_level else [])
        self.nodes = NodeProcesses(self.config_path, self.data_dir, self.log_path, env=node_env(self.env),
                                   cwd=self.workdir, node_args=args, own_group=True, on_start=on_start)
        self._admin = Client(self.endpoints, timeout=2.0, keys=self.ring)  # status and fault requests only

    # ------------------------------------------------------------------ addresses

    def endpoint(self, node_id: int) -> str:
        return f"tcp://127.0.0.1:{self.client_ports[node_id]}"

    @property
    def endpoints(self) -> list[str]:
        return [self.endpoint(i) for i in self.ids]

    def log_path(self, node_id: int) -> Path:
        return self.workdir / f"node{node_id}.out"

    # ------------------------------------------------------------------ processes

    @property
    def procs(self) -> dict[int, subprocess.Popen]:
        return self.nodes.procs

    @property
    def spawned_pids(self) -> list[int]:
        return self.nodes.spawned_pids

    @property
    def paused(self) -> set[int]:
        return self.nodes.paused

    def start(self, node_id: int) -> subprocess.Popen:
        """Start (or restart) a node that is not running."""
        return self.nodes.start(node_id)

    def start_all(self) -> None:
        for i in self.ids:
            self.start(i)

    def alive(self, node_id: int) -> bool:
        return self.nodes.alive(node_id)

    def pid(self, node_id: int) -> int | None:
        return self.nodes.pid(node_id)

    def kill(self, node_id: int, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int | None:
        """Signal a node (SIGKILL by default) and wait for it to exit; its exit code."""
        return self.nodes.kill(node_id, sig, timeout)

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        running = [i for i in self.ids if self.alive(i)]
        for i in running:
            self.procs[i].send_signal(sig)
        for i in running:
            self.kill(i, sig)

    def stop(self, node_id: int, grace: float = 5.0) -> int | None:
        """SIGTERM a node (resuming it if paused), SIGKILL after ``grace`` s; its exit code."""
        return self.nodes.stop(node_id, grace)

    def pause(self, node_id: int) -> None:
        self.nodes.pause(node_id)

    def resume(self, node_id: int) -> None:
        self.nodes.resume(node_id)

    def restart(self, node_id: int) -> None:
        self.kill(node_id)
        self.start(node_id)

    def running(self) -> list[int]:
        """Nodes that are alive and not paused: the ones that can answer."""
        return [i for i in self.ids if self.alive(i) and i not in self.paused]

    def close(self) -> None:
        """Kill every node by pid, remove the workdir unless ``keep`` (or it was given)."""
        self.nodes.close()
        self._admin.close()
        if self.own_workdir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests

    def client(self, timeout: float = 5.0, ids: Iterable[int] | None = None) -> Client:
        """A new client of the cluster (or of the nodes ``ids``); close it when done."""
        return Client([self.endpoint(i) for i in (self.ids if ids is None else ids)], timeout=timeout,
                      keys=self.ring)

    def status(self, node_id: int, timeout: float = 1.0) -> dict[str, Any] | None:
        return self._admin.status(self.endpoint(node_id), timeout)

    def statuses(self, timeout: float = 1.0, ids: Iterable[int] | None = None) -> dict[int, dict[str, Any] | None]:
        """The status of every node of ``ids`` (default: all), asked all at once; None if no answer."""
        if ids is None:
            return dict(zip(self.ids, self._admin.statuses(timeout), strict=True))
        ids = list(ids)
        with Client([self.endpoint(i) for i in ids], keys=self.ring) as c:
            return dict(zip(ids, c.statuses(timeout), strict=True))

    def request(self, node_id: int, req: dict[str, Any], timeout: float = 2.0) -> dict[str, Any] | None:
        """One raw request to one node; the reply, or None if none came in time."""
        return self._admin.request(self.endpoint(node_id), req, timeout)

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
