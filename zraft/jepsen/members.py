"""A local cluster whose membership changes while it runs, for the Jepsen ``membership`` scenario.

:class:`ElasticCluster` is a :class:`~zraft.cluster.local.LocalCluster` that can also start fresh
nodes to join the cluster (a new id, free ports, and a Config.txt of their own: their line and the
current members' lines, ``zraft node --join``), admit them once the leader added them, and retire
the nodes the cluster removed (stopped, never started again: a removed id is never reused, and
neither is a port). Every process, the extra ones included, is started through the same
:class:`~zraft.cluster.procs.NodeProcesses`, so every one of them dies with us and is killed by pid
in :meth:`close`, whatever happened.

``ids`` are the nodes that are members (as far as the runner knows) and that it runs; the nodes
started with ``--join`` and not added yet are in ``joining``; ``retired`` the ones gone for good.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from zraft.client import Client
from zraft.cluster.keys import add_node_key
from zraft.cluster.local import LocalCluster
from zraft.cluster.procs import NodeProcesses, free_ports


def config_line(node_id: int, peer: int, client: int, http: int) -> str:
    return f'Ip="127.0.0.1",port="{peer}",id="{node_id}",client_port="{client}",http_port="{http}"\n'


class _Procs(NodeProcesses):
    """NodeProcesses in which a node may have a Config.txt of its own (one that joined)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.configs: dict[int, Path] = {}

    def command(self, node_id: int, extra_args: Sequence[str] = ()) -> list[str]:
        cmd = super().command(node_id, extra_args)
        own = self.configs.get(node_id)
        if own is not None:
            cmd[cmd.index("--config") + 1] = str(own)
        return cmd


class ElasticCluster(LocalCluster):
    """A LocalCluster of ``n`` nodes to begin with, which nodes join and leave (see the module docstring).

    With keys, a new node's keypair is written (as ``zraft keys add`` does) before it starts: the
    others read its public key when they first meet it."""

    def __init__(self, n: int = 3, **kwargs: Any) -> None:
        super().__init__(n, **kwargs)
        old = self.nodes
        self.nodes = _Procs(old.config_path, old.data_dir, old.log_path, env=old.env, cwd=old.cwd,
                            node_args=old.node_args, own_group=old.own_group, on_start=old.on_start)
        old.close()  # it never started anything
        self.lock = threading.RLock()
        self.joining: set[int] = set()  # started with --join, not known to be members yet
        self.retired: dict[int, str] = {}  # id -> why it is gone
        self._next_id = n + 1

    # ------------------------------------------------------------------ membership

    def new_node(self) -> int:
        """A new id with free ports and its own Config.txt (its line, then every member's); not started."""
        with self.lock:
            node_id = self._next_id
            self._next_id += 1
            peer, client, http = free_ports(3)
            self.peer_ports[node_id], self.client_ports[node_id], self.http_ports[node_id] = peer, client, http
            if self.keys_dir is not None:
                add_node_key(self.keys_dir, node_id)
            self.write_config(node_id)
            self.joining.add(node_id)
            return node_id

    def write_config(self, node_id: int) -> Path:
        """Give a node a Config.txt of its own, as an operator would write it now: its line, then every
        current member's (a node that asks the cluster about itself, joining or with an emptied data
        dir, asks the nodes of its Config.txt). It is used from the node's next start on."""
        with self.lock:
            lines = [config_line(i, self.peer_ports[i], self.client_ports[i], self.http_ports[i])
                     for i in [node_id, *(i for i in self.ids if i != node_id)]]
            path = self.workdir / f"Config-{node_id}.txt"
            path.write_text("".join(lines))
            self.nodes.configs[node_id] = path
            return path

    def address(self, node_id: int) -> dict[str, Any]:
        """The fields of an ``add_member`` request for a node."""
        return {"ip": "127.0.0.1", "port": self.peer_ports[node_id], "client_port": self.client_ports[node_id],
                "http_port": self.http_ports[node_id]}

    def admit(self, node_id: int) -> None:
        """The cluster added ``node_id``: it is one of ``ids`` now (restarted without --join from now on)."""
        with self.lock:
            self.joining.discard(node_id)
            if node_id not in self.ids:
                self.ids = sorted([*self.ids, node_id])
                self.n = len(self.ids)

    def retire(self, node_id: int, why: str, grace: float = 5.0) -> None:
        """Stop a node for good (SIGTERM, SIGKILL after ``grace`` s; 0: SIGKILL at once) and forget it."""
        with self.lock:
            if grace > 0:
                self.stop(node_id, grace)
            else:
                self.kill(node_id)
            self.joining.discard(node_id)
            self.retired[node_id] = why
            if node_id in self.ids:
                self.ids = [i for i in self.ids if i != node_id]
                self.n = len(self.ids)

    def start(self, node_id: int) -> Any:
        """Start (or restart) a node: with --join while it is not known to be a member."""
        if node_id in self.retired:
            raise RuntimeError(f"node {node_id} was retired ({self.retired[node_id]})")
        return self.nodes.start(node_id, ["--join"] if node_id in self.joining else [])

    def members(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The leader's ``members`` reply (members, voters, the leader), or None if none came in time."""
        try:
            with self.client(timeout=timeout, ids=[*self.ids, *sorted(self.joining)]) as c:
                return c.members()
        except Exception:  # noqa: BLE001 (no leader, nobody answers: the caller decides)
            return None

    # ------------------------------------------------------------------ requests over the current nodes

    def statuses(self, timeout: float = 1.0, ids: Iterable[int] | None = None) -> dict[int, dict[str, Any] | None]:
        ids = list(self.ids if ids is None else ids)
        with Client([self.endpoint(i) for i in ids], keys=self.ring) as c:
            return dict(zip(ids, c.statuses(timeout), strict=True))
