"""Helpers for the integration tests: real node processes on loopback, raw ZeroMQ requests.

Every process a test starts goes through :func:`spawn` (or, for node processes, the shared
process manager zraft.cluster.procs.NodeProcesses, under :class:`Cluster`), which records it
in :data:`REGISTRY` and gives it PR_SET_PDEATHSIG, so that

* the fixtures can kill it (by pid) when a test ends, pass or fail;
* the per-test leftover check (conftest.py) can prove it is gone;
* it dies with pytest even if pytest itself is killed with SIGKILL.

PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so :func:`spawn` runs
only on the main thread, and node processes are forked by the manager's own spawner thread.

Processes that a test did not start itself but caused (the nodes of a ``zraft cluster
up`` supervisor) are tracked with :meth:`ProcessRegistry.track_pid` and checked too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq

from zraft.cluster.local import LocalCluster
from zraft.cluster.procs import NodeProcesses, die_with_parent, free_ports, node_env

REPO_ROOT = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------ processes

def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every process the tests start: no inherited ZRAFT_* variables
    (the test decides every setting), the repo importable, output unbuffered."""
    env = node_env(extra)
    env.setdefault("COLUMNS", "200")  # rich tables of the CLI: no wrapping in captured output
    return env


def zraft_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "zraft", *args]


def _proc_start_time(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat), or
    None if there is no such process or it is a zombie (dead, only not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    rest = stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces and parens
    if rest[0] in ("Z", "X"):
        return None
    return int(rest[19])


def pid_alive(pid: int) -> bool:
    return _proc_start_time(pid) is not None


@dataclass
class _External:
    pid: int
    start_time: int
    what: str

    def alive(self) -> bool:
        return _proc_start_time(self.pid) == self.start_time  # same pid and not a reused one


class ProcessRegistry:
    """Every process the integration tests started (or caused), for the leftover checks."""

    def __init__(self) -> None:
        self.children: list[tuple[subprocess.Popen, str, bool]] = []  # (process, what, long_lived)
        self.external: list[_External] = []
        self.lock = threading.Lock()

    def add(self, proc: subprocess.Popen, what: str, long_lived: bool = False) -> None:
        """``long_lived``: owned by a fixture wider than one test (it kills it itself); the
        per-test check leaves it alone, the end-of-session check does not."""
        with self.lock:
            self.children.append((proc, what, long_lived))

    def track_pid(self, pid: int, what: str) -> None:
        """Watch a process this test caused but did not spawn (e.g. a supervisor's node)."""
        start = _proc_start_time(pid)
        if start is None:
            return
        with self.lock:
            if not any(e.pid == pid and e.start_time == start for e in self.external):
                self.external.append(_External(pid, start, what))

    def mark(self) -> tuple[int, int]:
        with self.lock:
            return len(self.children), len(self.external)

    def reap_since(self, mark: tuple[int, int] = (0, 0), grace: float = 3.0,
                   include_long_lived: bool = False) -> list[str]:
        """Wait up to ``grace`` s for every process registered since ``mark`` to be gone;
        SIGKILL (by pid) whatever is left. Returns a description of each leftover."""
        with self.lock:
            children = [(p, w) for p, w, long in self.children[mark[0]:] if include_long_lived or not long]
            external = self.external[mark[1]:]
        deadline = time.monotonic() + grace
        leftovers = []
        for proc, what in children:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                leftovers.append(f"pid {proc.pid} ({what})")
                proc.kill()
                proc.wait()
        for ext in external:
            while ext.alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            if ext.alive():
                leftovers.append(f"pid {ext.pid} ({ext.what})")
                try:
                    os.kill(ext.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return leftovers


REGISTRY = ProcessRegistry()

# Output files of the processes of the running test, printed (tails) when it fails.
LOG_FILES: list[Path] = []


def spawn(cmd: Sequence[str], *, what: str, log: Path | None = None, env: dict[str, str] | None = None,
          cwd: Path | None = None, pipes: bool = False, long_lived: bool = False) -> subprocess.Popen:
    """Start a process that dies with pytest. Output goes to ``log`` (appended) or, with
    ``pipes``, to pipes the caller reads. Call from the main thread only."""
    assert threading.current_thread() is threading.main_thread(), "PR_SET_PDEATHSIG is per thread"
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            out.write(f"===== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env or child_env(), cwd=cwd, preexec_fn=die_with_parent(os.getpid()))
        if log not in LOG_FILES:
            LOG_FILES.append(log)
    else:
        stdio = subprocess.PIPE if pipes else subprocess.DEVNULL
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=stdio, stderr=stdio,
                                env=env or child_env(), cwd=cwd, preexec_fn=die_with_parent(os.getpid()))
    REGISTRY.add(proc, what, long_lived)
    return proc


@dataclass
class CliResult:
    args: list[str]
    rc: int
    out: str
    err: str
    seconds: float

    def __str__(self) -> str:
        return (f"`zraft {' '.join(self.args)}` -> rc {self.rc} in {self.seconds:.2f} s\n"
                f"--- stdout\n{self.out}--- stderr\n{self.err}")


def run_zraft(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 30.0) -> CliResult:
    """Run one ``python -m zraft ...`` command to completion (killed after ``timeout``)."""
    t0 = time.monotonic()
    proc = spawn(zraft_cmd(*args), what=f"zraft {' '.join(args)}", env=env, cwd=cwd, pipes=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"`zraft {' '.join(args)}` did not finish in {timeout} s; "
                             f"stdout {out!r}, stderr {err!r}") from None
    return CliResult(list(args), proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"),
                     time.monotonic() - t0)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------------------------ ports


def free_base(n: int = 3) -> int:
    """A port P such that P..P+n-1, P+100.. and P+200.. are all bindable on 127.0.0.1 now (below
    the kernel's ephemeral range, never twice in one session), for Config.txt's default ports."""
    return free_ports(1, block=[off + i for off in (0, 100, 200) for i in range(n)])[0]


def free_port() -> int:
    return free_base(1)


# ------------------------------------------------------------------------------------ raw zmq


def ctx() -> zmq.Context:
    return zmq.Context.instance()


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False)


def request(endpoint: str, req: Any = None, *, raw: bytes | None = None, timeout: float = 5.0) -> Any:
    """One request on a fresh REQ socket; the decoded reply, or None if none came in time."""
    s = ctx().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(endpoint)
        s.send(raw if raw is not None else pack(req))
        if not s.poll(int(timeout * 1000)):
            return None
        return unpack(s.recv())
    finally:
        s.close()


class _NotSent:
    def __repr__(self) -> str:
        return "NOT_SENT"


NOT_SENT = _NotSent()  # pipeline()'s result for a request it never sent


def pipeline(endpoint: str, reqs: Sequence[Any], *, window: int = 32, timeout: float = 60.0,
             idle_timeout: float | None = None, on_reply: Callable[[int, Any], None] | None = None,
             stop: threading.Event | None = None) -> list[Any]:
    """Send ``reqs`` to one node with up to ``window`` in flight at once (one DEALER per
    slot, a new request as soon as its slot's reply is in), all from the calling thread.

    Returns one decoded reply per request: None for one sent with no reply before
    ``timeout`` (overall) or ``idle_timeout`` (no reply at all for that long) or before
    ``stop`` was set, and :data:`NOT_SENT` for one never sent.
    """
    results: list[Any] = [NOT_SENT] * len(reqs)
    poller = zmq.Poller()
    socks: list[zmq.Socket] = []
    inflight: dict[zmq.Socket, int] = {}
    nxt = 0
    try:
        for _ in range(min(window, len(reqs))):
            s = ctx().socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            poller.register(s, zmq.POLLIN)
            socks.append(s)
            s.send_multipart([b"", pack(reqs[nxt])])
            inflight[s] = nxt
            results[nxt] = None
            nxt += 1
        deadline = time.monotonic() + timeout
        last_reply = time.monotonic()
        while inflight and not (stop is not None and stop.is_set()):
            now = time.monotonic()
            if now >= deadline or (idle_timeout is not None and now - last_reply >= idle_timeout):
                break
            for s, _ in poller.poll(100):
                frames = s.recv_multipart()
                i = inflight.pop(s)
                results[i] = unpack(frames[-1])
                last_reply = time.monotonic()
                if on_reply is not None:
                    on_reply(i, results[i])
                if nxt < len(reqs):
                    s.send_multipart([b"", pack(reqs[nxt])])
                    inflight[s] = nxt
                    results[nxt] = None
                    nxt += 1
    finally:
        for s in socks:
            s.close()
    return results


# ------------------------------------------------------------------------------------ a cluster


class Cluster(LocalCluster):
    """``n`` zraft nodes on 127.0.0.1, each a ``python -m zraft node`` process, with the helpers the
    integration tests share.

    Config.txt (in the original C++ format: ``Ip="127.0.0.1",port="P"``, default client and HTTP
    ports), every node's data and output live in ``workdir``. ``env`` holds ZRAFT_* settings for
    the nodes (default: none, i.e. the production defaults). Every node process is registered for
    the leftover checks; ``long_lived``: owned by a fixture wider than one test."""

    def __init__(self, workdir: Path, n: int = 3, env: dict[str, str] | None = None, base: int = 0,
                 long_lived: bool = False, keys: bool = False) -> None:
        self.long_lived = long_lived
        super().__init__(n, workdir, env, log_level=None, allow_faults=False, ports="base", base=base, keys=keys,
                         on_start=self._register)

    def __repr__(self) -> str:
        return f"Cluster({self.workdir}, n={self.n}, base={self.base})"

    def _register(self, node_id: int, proc: subprocess.Popen) -> None:
        REGISTRY.add(proc, f"node {node_id} of {self.workdir.name}", self.long_lived)
        log = self.log_path(node_id)
        if log not in LOG_FILES:
            LOG_FILES.append(log)

    def start(self, node_id: int) -> subprocess.Popen:
        assert not self.alive(node_id), f"node {node_id} runs"
        return super().start(node_id)

    def wait_leader(self, ids: Iterable[int] | None = None, timeout: float = 20.0) -> int:
        """Wait until every node of ``ids`` (default: the running ones) answers, exactly one
        is leader and all agree on it and on the term. Returns the leader's id."""
        ids = [i for i in self.ids if self.alive(i)] if ids is None else list(ids)
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            sts = self.statuses(timeout=0.5, ids=ids)
            last = sts
            if all(sts.values()):
                leaders = [i for i, st in sts.items() if st["role"] == "leader"]
                if len(leaders) == 1:
                    lead = sts[leaders[0]]
                    if all(st["leader"] == leaders[0] and st["term"] == lead["term"] for st in sts.values()):
                        return leaders[0]
            time.sleep(0.05)
        raise AssertionError(f"no agreed leader among nodes {ids} within {timeout} s; last statuses: {last}")

    def wait_caught_up(self, node_id: int, leader: int, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until ``node_id`` has applied everything the leader had committed when asked."""
        st = self.status(leader)
        assert st is not None, f"leader {leader} does not answer"
        target = st["commit_index"]
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.status(node_id, timeout=0.5)
            if last and last["applied_index"] >= target:
                return last
            time.sleep(0.05)
        raise AssertionError(f"node {node_id} did not apply up to {target} (leader {leader}'s commit index) "
                             f"within {timeout} s; last status {last}")

    # --- clients

    def cli(self, *args: str, timeout: float = 30.0) -> CliResult:
        """``python -m zraft ARGS --config THIS/Config.txt`` (the option goes last)."""
        return run_zraft(*args, "--config", str(self.config_path), cwd=self.workdir, timeout=timeout)

    def put_many(self, leader: int, items: dict[bytes, bytes], window: int = 32,
                 timeout: float = 120.0) -> list[Any]:
        reqs = [{"op": "put", "key": k, "value": v} for k, v in items.items()]
        return pipeline(self.endpoint(leader), reqs, window=window, timeout=timeout)

    def state_of(self, node_id: int) -> tuple[int, dict[bytes, bytes]]:
        """(applied index, every key and value) of one running node, read through its `snapshot` op."""
        from zraft.node.statemachine import REC_DATA, decode_chunk

        ep = self.endpoint(node_id)
        rep = request(ep, {"op": "snapshot", "stream": None}, timeout=10)
        assert rep and rep.get("ok"), rep
        index, items = rep["index"], {}
        while True:
            for kind, k, v in decode_chunk(rep["data"]):
                if kind == REC_DATA:
                    items[k] = v
            if rep["done"]:
                return index, items
            rep = request(ep, {"op": "snapshot", "stream": rep["stream"]}, timeout=10)
            assert rep and rep.get("ok"), rep

    def get_many(self, node_id: int, keys: Sequence[bytes], window: int = 32,
                 timeout: float = 120.0) -> dict[bytes, Any]:
        reps = pipeline(self.endpoint(node_id), [{"op": "get", "key": k} for k in keys], window=window,
                        timeout=timeout)
        bad = [(k, r) for k, r in zip(keys, reps, strict=True) if not (isinstance(r, dict) and r.get("ok") is True)]
        assert not bad, f"{len(bad)} of {len(keys)} gets failed on node {node_id}, e.g. {bad[:3]}"
        return {k: r["value"] for k, r in zip(keys, reps, strict=True)}

    def check_all_present(self, node_id: int, expected: dict[bytes, bytes | None]) -> None:
        got = self.get_many(node_id, list(expected))
        wrong = [(k, v, got[k]) for k, v in expected.items() if got[k] != v]
        assert not wrong, (f"{len(wrong)} of {len(expected)} keys wrong on node {node_id} "
                           f"(key, expected, got): {wrong[:5]}")


def status_json(result: CliResult) -> list[dict[str, Any]]:
    assert result.rc == 0, str(result)
    return json.loads(result.out)


def output_of_last_start(path: Path) -> str:
    """What a node wrote (stdout and stderr: its log lines and the CLI's error) since its last start:
    the text after the last ``=====`` header line that the process manager writes before each start."""
    lines = path.read_bytes().decode(errors="replace").splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith("===== ")]
    return "".join(lines[starts[-1] + 1:] if starts else lines)


IP = "127.0.0.1"


class MCluster(Cluster):
    """A :class:`Cluster` that also runs nodes that are not in its Config.txt: :meth:`new_node`
    gives one free ports and a config file of its own (its line and the lines of ``via``),
    :meth:`start` starts it (``join=True``: with ``--join``). Its processes die with the cluster."""

    def __init__(self, workdir: Path, n: int = 3, env: dict[str, str] | None = None, long_lived: bool = False,
                 keys: bool = False) -> None:
        super().__init__(workdir, n=n, env=env, long_lived=long_lived, keys=keys)
        self.extra: dict[int, NodeProcesses] = {}

    def new_node(self, node_id: int, via: Iterable[int] | None = None) -> Path:
        """Ports and a config file for a new node; returns the file's path."""
        assert node_id not in self.peer_ports, f"node {node_id} exists"
        base = free_base(1)
        self.peer_ports[node_id], self.client_ports[node_id], self.http_ports[node_id] = base, base + 100, base + 200
        via = list(self.ids if via is None else via)
        cfg = self.workdir / f"Config-{node_id}.txt"
        cfg.write_text("".join(self.line(i) for i in [node_id, *via]))
        self.extra[node_id] = NodeProcesses(cfg, self.data_dir, self.log_path, env=node_env(self.env),
                                            cwd=self.workdir, own_group=True, on_start=self._register)
        return cfg

    def line(self, node_id: int) -> str:
        return (f'ip="{IP}",port="{self.peer_ports[node_id]}",id="{node_id}",'
                f'client_port="{self.client_ports[node_id]}",http_port="{self.http_ports[node_id]}"\n')

    def add_args(self, node_id: int) -> list[str]:
        """`zraft member add` arguments for a node made by :meth:`new_node`."""
        return ["member", "add", str(node_id), "--ip", IP, "--port", str(self.peer_ports[node_id]),
                "--client-port", str(self.client_ports[node_id]), "--http-port", str(self.http_ports[node_id])]

    def add_member(self, node_id: int, learner: bool = False, timeout: float = 60.0) -> list[dict[str, Any]]:
        with self.client(timeout=timeout, ids=self.running()) as cl:
            return cl.add_member(node_id, IP, self.peer_ports[node_id], self.client_ports[node_id],
                                 self.http_ports[node_id], learner)

    def _procs_of(self, node_id: int) -> NodeProcesses:
        return self.extra.get(node_id, self.nodes)

    def start(self, node_id: int, join: bool = False) -> subprocess.Popen:  # type: ignore[override]
        assert not self.alive(node_id), f"node {node_id} runs"
        return self._procs_of(node_id).start(node_id, ["--join"] if join else [])

    def alive(self, node_id: int) -> bool:
        return self._procs_of(node_id).alive(node_id)

    def pid(self, node_id: int) -> int | None:
        return self._procs_of(node_id).pid(node_id)

    def kill(self, node_id: int, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int | None:
        return self._procs_of(node_id).kill(node_id, sig, timeout)

    def stop(self, node_id: int, grace: float = 5.0) -> int | None:
        return self._procs_of(node_id).stop(node_id, grace)

    @property
    def all_ids(self) -> list[int]:
        return sorted(self.peer_ports)

    def running(self) -> list[int]:
        return [i for i in self.all_ids if self.alive(i)]

    def close(self) -> None:
        for p in self.extra.values():
            p.close()
        super().close()
