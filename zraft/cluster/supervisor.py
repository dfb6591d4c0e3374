"""`zraft cluster up`: spawn one node process per Config.txt line, watch them, show their state.

The supervisor does not restart a node that dies: failover is there to be watched.
`zraft cluster stop-node N` / `start-node N` (or `kill-node N` for SIGKILL) reach it
through a control socket, ``DATA_DIR/supervisor.ipc``. Ctrl-C or SIGTERM stops every
node with SIGTERM (SIGKILL after a grace period). The nodes are run by the shared process
manager (zraft.cluster.procs.NodeProcesses): each gets PR_SET_PDEATHSIG, so if the
supervisor itself is killed with SIGKILL its nodes die with it.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from zraft.client import Client
from zraft.client.protocol import commit_span, log_span
from zraft.cluster.config import ClusterConfig, ConfigError, load_config
from zraft.cluster.keys import KeyRing
from zraft.cluster.procs import STOP_GRACE_S, NodeProcesses

REFRESH_S = 0.5
RELOAD_STEP_TIMEOUT_S = 600.0  # one membership change of a reload (a new node may need a big snapshot)


def control_endpoint(data_dir: str | os.PathLike) -> str:
    return f"ipc://{Path(data_dir).resolve() / 'supervisor.ipc'}"


class SupervisorError(RuntimeError):
    """The supervisor cannot start (its message says why)."""


@dataclass
class NodeView:
    """What the supervisor shows of one node: its process, how it ended, its last status."""

    id: int
    proc: subprocess.Popen | None = None
    exit_code: int | None = None
    status: dict[str, Any] | None = field(default=None)


class Supervisor:
    def __init__(self, config_path: Path, cluster: ClusterConfig, data_dir: Path, log_level: str,
                 console: Console | None = None, allow_faults: bool = False, keys: Path | None = None,
                 ring: KeyRing | None = None) -> None:
        self.allow_faults = allow_faults
        self.config_path = config_path.resolve()
        self.cluster = cluster
        self.data_dir = data_dir.resolve()
        self.log_level = log_level
        self.console = console or Console(stderr=True)
        self.nodes = {n.id: NodeView(n.id) for n in cluster.nodes}
        # The nodes get our environment (ZRAFT_* settings included), in process groups of their own:
        # Ctrl-C in the terminal is ours to handle; we stop them.
        self.procs = NodeProcesses(self.config_path, self.data_dir, lambda i: self.data_dir / str(i) / "console.log",
                                   node_args=["--log-level", "WARNING", *(["--allow-faults"] if allow_faults else []),
                                              *(["--keys", str(Path(keys).resolve())] if keys else [])],
                                   own_group=True)
        self.client = Client([n.client_endpoint for n in cluster.nodes], keys=ring)
        self.ring = ring
        self.stopping = False

    # ------------------------------------------------------------------ node processes

    def start_node(self, node_id: int) -> str:
        n = self.nodes[node_id]
        if self.procs.alive(node_id):
            return f"node {node_id} is already running (pid {self.procs.pid(node_id)})"
        n.proc = self.procs.start(node_id)
        n.exit_code, n.status = None, None
        return f"node {node_id} started (pid {n.proc.pid})"

    def stop_node(self, node_id: int, sig: int = signal.SIGTERM) -> str:
        n = self.nodes[node_id]
        if not self.procs.alive(node_id):
            return f"node {node_id} is not running"
        pid = self.procs.pid(node_id)
        if sig == signal.SIGTERM:
            self.procs.stop(node_id, STOP_GRACE_S)
        else:
            self.procs.kill(node_id, sig)
        n.exit_code = None  # (reported by _refresh, like any other death)
        return f"node {node_id} (pid {pid}) stopped with {signal.Signals(sig).name}"

    def stop_all(self) -> None:
        self.procs.stop_all(STOP_GRACE_S)

    # ------------------------------------------------------------------ control socket

    def _handle_control(self, sock: zmq.Socket) -> None:
        while True:
            try:
                raw = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                req = msgpack.unpackb(raw, raw=False)
                op, node_id = req["op"], int(req["id"])
                if op == "reload":
                    msg = self.reload()
                    self.console.print(f"[bold]{msg}[/]")
                    sock.send(msgpack.packb({"ok": True, "message": msg}))
                    continue
                if node_id not in self.nodes:
                    raise KeyError(f"no node {node_id} in {self.config_path.name} (ids: {sorted(self.nodes)})")
                if op == "start":
                    msg = self.start_node(node_id)
                elif op in ("stop", "kill"):
                    msg = self.stop_node(node_id, signal.SIGTERM if op == "stop" else signal.SIGKILL)
                else:
                    raise KeyError(f"unknown control op {op!r}")
                self.console.print(f"[bold]{msg}[/]")
                sock.send(msgpack.packb({"ok": True, "message": msg}))
            except Exception as exc:  # a bad control request must not take the supervisor down
                sock.send(msgpack.packb({"ok": False, "message": str(exc)}))

    # ------------------------------------------------------------------ reload

    def reload(self) -> str:
        """Make the membership match Config.txt as it is now, one change at a time: start each new node
        (``--join``) and add it (it is a voter once caught up), then remove each dropped one and stop
        its process. Adds go first, so the cluster never has fewer voters than both files agree on."""
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            raise RuntimeError(f"Config.txt is not valid now: {exc}") from None
        members = {m["id"]: m for m in self.client.members()["members"]}
        wanted = {n.id: n for n in new.nodes}
        moved = [i for i, n in wanted.items() if i in members and (members[i]["ip"], members[i]["port"])
                 != (n.ip, n.port)]
        if moved:
            raise RuntimeError(f"node(s) {moved} changed address in Config.txt: remove such a node and add it back "
                               "under a new id instead")
        added = [n for i, n in wanted.items() if i not in members]
        removed = [i for i in members if i not in wanted]
        self.cluster = new
        self.client.close()
        self.client = Client([n.client_endpoint for n in new.nodes] + [
            f"tcp://{m['ip']}:{m['client_port']}" for i, m in members.items() if i not in wanted], keys=self.ring,
            timeout=RELOAD_STEP_TIMEOUT_S)
        done = []
        for n in added:
            self.nodes[n.id] = NodeView(n.id)
            self.console.print(f"reload: starting node {n.id} to join, and adding it")
            self.nodes[n.id].proc = self.procs.start(n.id, ["--join"])
            self.client.add_member(n.id, n.ip, n.port, n.client_port, n.http_port)
            done.append(f"added node {n.id}")
        for node_id in removed:
            self.console.print(f"reload: removing node {node_id}")
            self.client.remove_member(node_id)
            if node_id in self.nodes:
                self.stop_node(node_id)
                del self.nodes[node_id]
            done.append(f"removed node {node_id}")
        self.client.close()
        self.client = Client([n.client_endpoint for n in new.nodes], keys=self.ring)
        return "reload: " + ("; ".join(done) if done else "the membership already matches Config.txt")

    # ------------------------------------------------------------------ the view

    def _refresh(self) -> None:
        statuses = dict(zip((a.id for a in self.cluster.nodes), self.client.statuses(timeout=0.3), strict=False))
        for n in self.nodes.values():
            n.status = statuses.get(n.id)
            if n.proc is not None and n.exit_code is None and n.proc.poll() is not None:
                n.exit_code = n.proc.returncode
                how = (f"killed by {signal.Signals(-n.exit_code).name}" if n.exit_code < 0
                       else f"exited with code {n.exit_code}")
                self.console.print(f"[red]node {n.id} (pid {n.proc.pid}) {how}[/]; "
                                   f"bring it back with: zraft cluster start-node {n.id}")

    def table(self) -> Table:
        # Borderless, one space between columns: fits 80 columns with 7-digit indexes.
        t = Table(title=f"zraft cluster ({self.config_path.name}, data in {self.data_dir})", title_justify="left",
                  caption="commit (applied, when behind); log: the indexes it holds", caption_justify="left",
                  box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False)
        for col in ("node", "pid", "role", "term", "leader", "commit", "log", "client", "member"):
            t.add_column(col, justify="right" if col in ("pid", "term", "commit", "log") else "left")
        leader_st = next((n.status for n in self.nodes.values() if n.status and n.status.get("role") == "leader"),
                         None) or {}
        for addr in self.cluster.nodes:
            n = self.nodes.get(addr.id)
            if n is None:
                continue
            alive = n.proc is not None and n.proc.poll() is None
            st = n.status or {}
            role = st.get("role", "-" if not alive else "starting")
            style = {"leader": "bold green", "candidate": "yellow"}.get(role, "")
            pid = "-" if n.proc is None else f"[green]{n.proc.pid}[/]" if alive else f"[red]{n.proc.pid} dead[/]"
            t.add_row(str(addr.id), pid, f"[{style}]{role}[/]" if style else role,
                      str(st.get("term", "-")), str(st.get("leader", "-")), commit_span(st), log_span(st),
                      addr.client_endpoint.removeprefix("tcp://"), _part(addr.id, leader_st, st))
        return t

    # ------------------------------------------------------------------ main loop

    def _lock_data_dir(self) -> int:
        """One supervisor per data dir: a second one would take over the control socket."""
        fd = os.open(self.data_dir / "supervisor.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SupervisorError(f"another `zraft cluster up` is running for data dir {self.data_dir} "
                                  "(it holds supervisor.lock); stop it first, or use another --data-dir") from None
        return fd  # held until this process exits

    def run(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_data_dir()
        ctx = zmq.Context.instance()
        control = ctx.socket(zmq.REP)
        control.setsockopt(zmq.LINGER, 0)
        control.bind(control_endpoint(self.data_dir))
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            for node_id in self.nodes:
                self.console.print(self.start_node(node_id))
            with Live(self.table(), console=self.console, auto_refresh=False,
                      transient=False) as live:
                while not self.stopping:
                    if control.poll(int(REFRESH_S * 1000)):
                        self._handle_control(control)
                    self._refresh()
                    live.update(self.table(), refresh=True)
        finally:
            self.console.print("stopping all nodes...")
            self.stop_all()
            self.procs.close()
            control.close()
            try:
                os.unlink(self.data_dir / "supervisor.ipc")
            except OSError:
                pass
            self.console.print("all nodes stopped")

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True


def _part(node_id: int, leader: dict[str, Any], own: dict[str, Any]) -> str:
    """voter, learner (with how far it is behind the leader while it catches up), or not a member."""
    if node_id in leader.get("voters", ()):
        return "voter"
    if node_id in leader.get("learners", ()):
        behind = leader.get("last_index", 0) - own.get("last_index", 0) if own else None
        return "learner" + (f" ({behind} behind)" if behind else "")
    return "-" if not leader else "[red]not a member[/]"


def send_control(data_dir: str | os.PathLike, op: str, node_id: int, timeout: float = 10.0) -> dict[str, Any]:
    """Ask a running supervisor to start, stop or kill one node, or (op ``reload``, id 0) to reload Config.txt."""
    path = Path(data_dir).resolve() / "supervisor.ipc"
    if not path.exists():
        return {"ok": False, "message": f"no supervisor is running for data dir {Path(data_dir).resolve()} "
                                        "(start one with: zraft cluster up)"}
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(control_endpoint(data_dir))
        sock.send(msgpack.packb({"op": op, "id": node_id}))
        if not sock.poll(int(timeout * 1000)):
            return {"ok": False, "message": "the supervisor did not answer"}
        return msgpack.unpackb(sock.recv(), raw=False)
    finally:
        sock.close()
