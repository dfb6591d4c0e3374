"""Jepsen-style runs: concurrent clients record a history while a nemesis injects faults;
then the cluster is healed, every key is read once more, and the whole history is
checked for linearizability.

    python -m zraft.jepsen --scenario mixed --duration 600 --clients 5 --nodes 3 [--seed N] [--keep]

Clients are threads, each with its own :class:`zraft.client.Client`, doing random
put / get / cas / delete on a few keys with unique values; by default every other client
uses exactly-once sessions for its writes (the library's default: a write whose reply is
lost is retried, and the cluster must not apply it twice), the others don't (a write
whose reply is lost is given up as unknown). Each op is recorded with its invocation
and completion times and its outcome:

* ``ok``: the reply was ok;
* ``fail``: it certainly did not take effect: a :class:`ZraftError` that is not
  :class:`OutcomeUnknown` (``not_leader``, ``unavailable``, ``bad_request``,
  ``too_large``, or the client gave up without the request ever being accepted); and
  any failed read (a read has no effect);
* ``unknown``: a write that raised :class:`OutcomeUnknown` (no reply, or a ``timeout``
  reply), or anything unexpected: it may have taken effect, at any later time, or not.

Scenarios (the nemesis):

=========== ===========================================================================
kill        SIGKILL a random node, restart it a little later; sometimes a clean stop
            (SIGTERM) instead, or SIGKILL of a majority or of every node at once
pause       SIGSTOP a random node (sometimes a majority), SIGCONT it a little later
partition   cut one node (random, or the leader) off from all others, split the others
            in two halves that only one node bridges, or split the cluster in a random
            majority and minority (fault API ``isolate`` with ``peers``, on both sides);
            then heal
leader      aimed at the current leader: kill it, pause it, cut it off, or cut it off
            from all nodes but one, which still talks to everyone (a bridge)
mixed       all of the above, plus message loss and delay between nodes, lost replies
            to applied writes (``drop_replies``), and two faults at once
membership  membership changes (zraft/jepsen/members.py starts and retires the nodes),
            every other fault one of the above on one node or a leadership transfer:
            add a fresh node (a new id and ports, ``--join``); remove a voter, the leader
            sometimes (left running a while sometimes: it must not disrupt anyone); replace
            a killed node (add a new one, remove the dead one); lose a node's disk (kill
            it, empty its data dir, check that it is refused under its old id, replace it).
            A change sometimes runs during a kill, pause or isolation of another node, and
            only when a majority of the voters stays up in every configuration it passes
            through; 3 to 5 voters. The clients follow the membership.
=========== ===========================================================================

At the end everything is healed (paused nodes resumed, dead ones restarted, network
faults cleared), the runner waits for the cluster to converge (one leader, every node
caught up), reads every key, and checks the history, final reads included. That also
checks that nothing acknowledged was lost: an ok write must be the final value or have
been overwritten by an op linearized after it.

The command's exit code is 0 only if the history is linearizable, the cluster converged
after healing and the run had no errors (a fault request not acknowledged, a failed
final read, ...). ``--history FILE`` saves the history; ``--check FILE`` checks a saved
one again.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zraft.client import Client, OutcomeUnknown, ZraftError, protocol
from zraft.cluster.local import LocalCluster
from zraft.jepsen.checker import CheckResult, check
from zraft.jepsen.history import (
    CAS,
    DELETE,
    FAIL,
    GET,
    KINDS,
    OK,
    PUT,
    UNKNOWN,
    WRITES,
    Op,
    dump_history,
    fmt,
    load_history,
)
from zraft.jepsen.members import ElasticCluster

SCENARIOS = ("kill", "pause", "partition", "leader", "mixed", "membership")
# The op mix of the clients.
OP_WEIGHTS = {GET: 40, PUT: 25, CAS: 25, DELETE: 10}


@dataclass
class Fault:
    """One fault the nemesis injected: what, on which nodes, from when to when (s from the start)."""

    kind: str
    nodes: list[int]
    start: float
    end: float | None = None
    detail: str = ""

    def describe(self) -> str:
        end = f"{self.end:7.2f}" if self.end is not None else "    end"
        where = ",".join(map(str, self.nodes))
        return f"{self.start:7.2f} -> {end} s  {self.kind:<13} node{'s' if len(self.nodes) > 1 else ''} {where}" + (
            f"  ({self.detail})" if self.detail else "")


@dataclass
class Result:
    scenario: str
    seed: int
    nodes: int
    clients: int
    duration: float
    history: list[Op]
    faults: list[Fault]
    check: CheckResult | None
    t0: float  # time.monotonic() of the start of the faulted window
    t_end: float  # ... and of its end
    final_values: dict[Any, Any] = field(default_factory=dict)
    converged: bool = False
    convergence: str = ""  # how it converged, or why not
    errors: list[str] = field(default_factory=list)  # anything else that went wrong
    workdir: str = ""
    sessions: str = "mixed"
    pids: list[int] = field(default_factory=list)  # every node process the run started

    @property
    def linearizable(self) -> bool:
        return self.check is not None and self.check.valid is True

    @property
    def ok(self) -> bool:
        """Linearizable, converged after healing, and no runner errors."""
        return self.linearizable and self.converged and not self.errors

    def counts(self) -> dict[str, Counter]:
        out: dict[str, Counter] = {k: Counter() for k in KINDS}
        for op in self.history:
            if op.process >= 0:
                out[op.kind][op.status] += 1
        return out

    def ok_in_window(self, writes_only: bool = False) -> int:
        """Ok ops of the clients that completed inside the faulted window."""
        return sum(1 for op in self.history if op.status == OK and op.process >= 0
                   and self.t0 <= op.complete <= self.t_end and (not writes_only or op.kind in WRITES))

    def summary(self) -> str:
        lines = [f"zraft jepsen: scenario {self.scenario}, {self.nodes} nodes, {self.clients} clients "
                 f"(sessions {self.sessions}), {self.duration:g} s of faults, seed {self.seed}"]
        counts = self.counts()
        lines.append(f"  {'ops':<8}{'ok':>8}{'failed':>8}{'unknown':>9}")
        total: Counter = Counter()
        for kind in KINDS:
            c = counts[kind]
            total.update(c)
            lines.append(f"  {kind:<8}{c[OK]:>8}{c[FAIL]:>8}{c[UNKNOWN]:>9}")
        lines.append(f"  {'total':<8}{total[OK]:>8}{total[FAIL]:>8}{total[UNKNOWN]:>9}")
        win = self.t_end - self.t0
        lines.append(f"  ok in the faulted window: {self.ok_in_window()} ops, {self.ok_in_window(True)} writes "
                     f"({self.ok_in_window() / win if win > 0 else 0:.0f} ops/s)")
        lines.append(f"  faults injected: {len(self.faults)}")
        lines += [f"    {f.describe()}" for f in self.faults]
        lines.append(f"  after healing: {self.convergence}")
        if self.final_values:
            lines.append("  final values: " + ", ".join(f"{fmt(k)}={fmt(v)}" for k, v in self.final_values.items()))
        for e in self.errors:
            lines.append(f"  error: {e}")
        if self.check is not None:
            per_key = ", ".join(f"{fmt(k)}: {r.ops} ops {r.seconds:.1f} s" for k, r in self.check.keys.items())
            lines.append(f"  checker: {per_key}")
            lines.append(f"  linearizable: {'yes' if self.linearizable else 'NO'} ({self.check.verdict})")
            if not self.linearizable:
                lines.append(self.check.report())
        else:
            lines.append("  linearizable: NO (not checked)")
        if self.workdir:
            lines.append(f"  cluster files kept in {self.workdir}")
        return "\n".join(lines)


# ---------------------------------------------------------------------- history recording

class Recorder:
    def __init__(self) -> None:
        self.ops: list[Op] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def add(self, op: Op) -> Op:
        with self._lock:
            op.id = next(self._ids)
            self.ops.append(op)
        return op

    def tally(self) -> Counter:
        return Counter(op.status for op in list(self.ops))


def run_op(client: Client, kind: str, key: bytes, value: bytes | None = None, expect: bytes | None = None,
           process: int = -1) -> Op:
    """Run one op and record its outcome (see the module docstring)."""
    invoke = time.monotonic()
    status, result, error = OK, None, None
    try:
        if kind == GET:
            result = client.get(key)
        elif kind == PUT:
            client.put(key, value)
        elif kind == CAS:
            result = client.cas(key, expect, value)
        else:
            result = client.delete(key)
    except OutcomeUnknown as exc:
        status, error = (FAIL if kind == GET else UNKNOWN), exc.code
    except ZraftError as exc:
        status, error = FAIL, exc.code
    except Exception as exc:  # not expected: for a write, assume the worst
        status, error = (FAIL if kind == GET else UNKNOWN), f"{type(exc).__name__}: {exc}"
    complete = time.monotonic()
    return Op(kind, key, invoke, complete, status, value=value, expect=expect, result=result, process=process,
              error=error)


def make_client(endpoints: list[str], timeout: float, exactly_once: bool | None = None, keys: Any = None) -> Client:
    """A client; ``exactly_once`` None means the library's default; ``keys``: the cluster's KeyRing, if any."""
    extra = {"keys": keys} if keys is not None else {}
    if exactly_once is None or "exactly_once" not in inspect.signature(Client).parameters:
        return Client(endpoints, timeout=timeout, **extra)
    return Client(endpoints, timeout=timeout, exactly_once=exactly_once, **extra)


class Worker(threading.Thread):
    """One client: random ops on random keys until told to stop."""

    def __init__(self, cid: int, endpoints: list[str], keys: list[bytes], rec: Recorder, stop: threading.Event,
                 seed: int, timeout: float, seen: dict[bytes, bytes | None], exactly_once: bool | None = None,
                 ring: Any = None, members: Callable[[], list[str]] | None = None) -> None:
        super().__init__(name=f"jepsen-client-{cid}", daemon=True)
        self.cid = cid
        self.client = make_client(endpoints, timeout, exactly_once, ring)
        self.keys = keys
        self.rec = rec
        self.stop = stop
        self.rng = random.Random(seed)
        self.seen = seen  # the last value any client saw per key: cas expectations that may hit
        self.members = members  # the current members' endpoints, when the membership changes
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            kinds = list(OP_WEIGHTS)
            weights = list(OP_WEIGHTS.values())
            for n in itertools.count():
                if self.stop.is_set():
                    return
                if self.members is not None and (eps := self.members()) != self.client.endpoints:
                    self.client.endpoints = eps  # between two ops: the client is this thread's alone
                kind = self.rng.choices(kinds, weights)[0]
                key = self.rng.choice(self.keys)
                value = f"c{self.cid}-{n}".encode() if kind in (PUT, CAS) else None
                expect = None
                if kind == CAS:
                    expect = self.seen.get(key) if self.rng.random() < 0.8 else None
                op = self.rec.add(run_op(self.client, kind, key, value, expect, self.cid))
                if op.status == OK:
                    if kind == GET:
                        self.seen[key] = op.result
                    elif kind == PUT:
                        self.seen[key] = value
                    elif kind == CAS:
                        self.seen[key] = op.result[1]
                    else:
                        self.seen[key] = None
        except BaseException as exc:  # reported by the runner
            self.error = exc
        finally:
            self.client.close()


# ---------------------------------------------------------------------- the nemesis

class Nemesis(threading.Thread):
    """Injects the faults of a scenario until ``stop``; keeps track of what is broken so
    that :meth:`heal_all` can undo everything."""

    HOLD = (1.0, 3.5)  # how long a fault lasts, s
    QUIET = (0.5, 2.0)  # calm between faults, s

    def __init__(self, cluster: LocalCluster, scenario: str, rng: random.Random, t0: float,
                 stop: threading.Event, log: Callable[[str], None]) -> None:
        super().__init__(name="jepsen-nemesis", daemon=True)
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}; expected one of {', '.join(SCENARIOS)}")
        self.cluster = cluster
        self.scenario = scenario
        self.rng = rng
        self.t0 = t0
        self.stop = stop
        self.log = log
        self.faults: list[Fault] = []
        self.dead: set[int] = set()
        self.paused: set[int] = set()
        self.cut: dict[int, set[int]] = {i: set() for i in cluster.ids}  # desired isolation per node
        self.acked: dict[int, set[int] | None] = {i: set() for i in cluster.ids}  # what each node has (None: unsure)
        self.net = {"drop": 0.0, "delay": 0.0}  # desired message loss rate and delay (ms), all nodes
        self.errors: list[str] = []
        self.lock = threading.RLock()
        # The membership scenario: nodes that lost their disk (never restarted; removed in the same round),
        # removed nodes left running for a round, the rounds so far, and the removals so far.
        self.lost: set[int] = set()
        self.leftover: list[int] = []
        self.rounds = 0
        self.removals = 0
        self.unsure: set[int] = set()  # nodes whose removal was not done in time

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ------------------------------------------------------------------ the schedule

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.check_exits()
                undo = self.inject()
                self.sleep(*self.HOLD)
                for u in reversed(undo):
                    u()
                self.sleep(*self.QUIET)
        except Exception as exc:  # reported by the runner
            self.errors.append(f"nemesis: {type(exc).__name__}: {exc}")
            self.log(f"nemesis failed: {exc!r}")

    def check_exits(self) -> None:
        """A node that exited without being killed or stopped is an error (it is restarted at healing)."""
        with self.lock:
            for node in self.cluster.ids:
                if node not in self.dead and not self.cluster.alive(node):
                    proc = self.cluster.procs.get(node)
                    code = proc.returncode if proc is not None else None
                    self.dead.add(node)
                    self.paused.discard(node)
                    self.acked[node] = set()
                    why = f"node {node} exited by itself (exit code {code}; see its log)"
                    self.errors.append(f"nemesis: {why}, found at {self.now():.1f} s")
                    self.log(f"[{self.now():6.1f}s] nemesis: {why}")

    def sleep(self, lo: float, hi: float) -> None:
        self.stop.wait(self.rng.uniform(lo, hi))

    def inject(self) -> list[Callable[[], None]]:
        """Inject one fault (or two at once, in mixed); returns the ways to undo them."""
        s = self.scenario
        if s == "mixed":
            s = self.rng.choice(["kill", "pause", "partition", "leader", "network", "replies", "double"])
        return self._INJECT[s](self)

    def _inject_kill(self) -> list[Callable[[], None]]:
        rng, ids = self.rng, self.cluster.ids
        r = rng.random()
        if r < 0.6:
            return [self.kill(rng.choice(ids))]
        if r < 0.75:
            return [self.stop_node(rng.choice(ids))]
        # a crash of a majority, or of every node: what was acknowledged must survive it
        k = len(ids) if rng.random() < 0.5 else len(ids) // 2 + 1
        return [self.kill_many(rng.sample(ids, k))]

    def _inject_pause(self) -> list[Callable[[], None]]:
        rng, ids = self.rng, self.cluster.ids
        if rng.random() < 0.75:
            return [self.pause(rng.choice(ids))]
        return [self.pause(n) for n in rng.sample(ids, len(ids) // 2 + 1)]  # a majority: all stall

    def _inject_leader(self) -> list[Callable[[], None]]:
        rng, ids = self.rng, self.cluster.ids
        target = self.find_leader()
        label = "the leader"
        if target is None:
            target, label = rng.choice(ids), "no leader found: a random node"
        what = rng.choice(["kill", "pause", "isolate", "bridge"])
        if what == "kill":
            return [self.kill(target, label)]
        if what == "pause":
            return [self.pause(target, label)]
        if what == "isolate":
            return [self.isolate(target, label)]
        # cut the leader off from all but one node, which still talks to everyone
        others = [i for i in ids if i != target]
        b = rng.choice(others)
        rest = [i for i in others if i != b]
        if not rest:
            return [self.isolate(target)]
        return [self.partition([target], rest, "bridge", f"{label}; only node {b} talks to both sides")]

    def _inject_double(self) -> list[Callable[[], None]]:
        """Two at once: a partition and a process fault on one random node."""
        undo = [self.partition_random()]
        node = self.rng.choice(self.cluster.ids)
        undo.append(self.kill(node) if self.rng.random() < 0.5 else self.pause(node))
        return undo

    # ------------------------------------------------------------------ the membership scenario

    VOTERS = (3, 5)  # the membership scenario keeps between 3 and 5 voters
    CHANGE_TIMEOUT_S = 30.0  # a membership change asked for with a majority up must be done by then

    def _inject_membership(self) -> list[Callable[[], None]]:
        """Every other round a membership change (sometimes during a fault of another node), and in
        between a fault of one node or a leadership transfer: a majority of the voters is always up."""
        self.rounds += 1
        self._retire_leftovers()
        if self.rounds % 2 == 1:
            return self._membership_change()
        rng = self.rng
        what = rng.choice(["kill", "stop", "pause", "isolate", "partition", "transfer", "transfer", "network"])
        if what == "transfer":
            self._transfer()
            return []
        if what == "partition":
            return [self.partition_random()]
        if what == "network":
            return [self.network(drop=rng.choice([0.0, 0.1, 0.2]), delay=rng.choice([0.0, 20.0, 50.0]))]
        target = self.find_leader() if rng.random() < 0.5 else None
        label = "the leader" if target is not None else ""
        if target is None:
            target = rng.choice(self.cluster.ids)
        return [self._one_node_fault(what, target, label)]

    def _one_node_fault(self, what: str, node: int, detail: str = "") -> Callable[[], None]:
        if what == "kill":
            return self.kill(node, detail)
        if what == "stop":
            return self.stop_node(node)
        if what == "pause":
            return self.pause(node, detail)
        return self.isolate(node, detail)

    def _membership(self) -> tuple[set[int], int | None] | None:
        """(voters, leader) by the leader's latest configuration; None if no leader answers. Brings the
        cluster's list of members in line with it first (see _reconcile)."""
        info = self.cluster.members(timeout=5.0)
        if info is None:
            return None
        self._reconcile(info)
        return {m["id"] for m in info["members"] if m.get("voter")}, info.get("leader")

    def _reconcile(self, info: dict[str, Any]) -> None:
        """A removal left not done (an error already) may have taken effect later: a node the leader's
        committed configuration no longer lists is retired."""
        if not info.get("committed"):
            return
        listed = {m["id"] for m in info["members"]}
        for node in sorted(self.unsure & (set(self.cluster.ids) - listed)):
            self.unsure.discard(node)
            self._forget(node)
            self.cluster.retire(node, "no longer a member")
            self.log(f"[{self.now():6.1f}s] nemesis: node {node} turned out to be removed after all: retired")

    def _retire_leftovers(self) -> None:
        for node in self.leftover:
            self.cluster.retire(node, "removed")
        self.leftover = []

    @staticmethod
    def _majority_up(configs: list[set[int]], down: set[int]) -> bool:
        return all(len(v - down) * 2 > len(v) for v in configs)

    def _membership_change(self) -> list[Callable[[], None]]:
        """One change, chosen to keep 3 to 5 voters: add, remove (the leader sometimes), replace a
        killed node, or lose a node's disk and replace it. Returns the undo of a fault of another node
        held during the change, if there was one."""
        rng = self.rng
        got = self._membership()
        if got is None:
            self.log(f"[{self.now():6.1f}s] nemesis: no leader to ask for a membership change")
            return []
        voters, leader = got
        lo, hi = self.VOTERS
        r = rng.random()
        if len(voters) <= lo:
            op = "add" if r < 0.5 else "replace" if r < 0.8 else "wipe"
        elif len(voters) >= hi:
            op = "remove"
        else:
            op = "remove" if self.removals == 0 or r < 0.5 else "add"
        target = None
        if op != "add":
            target = leader if leader in voters and rng.random() < 0.4 else rng.choice(sorted(voters))
        # The configurations the change passes through, and the nodes it takes down itself.
        new = -1  # a node to be added
        configs = {"add": [voters, voters | {new}], "remove": [voters, voters - {target}],
                   "replace": [voters, voters | {new}, (voters | {new}) - {target}]}
        configs["wipe"] = configs["replace"]
        down = {target} if op in ("replace", "wipe") else set()
        undo: list[Callable[[], None]] = []
        if rng.random() < 0.4:  # ... during a fault of another node (the leader, sometimes)
            others = [i for i in self.cluster.ids if i != target]
            node = leader if leader in others and rng.random() < 0.3 else rng.choice(others)
            if self._majority_up(configs[op], down | {node}):
                what = rng.choice(["kill", "pause", "isolate"])
                detail = "during a change" + ("; the leader" if node == leader else "")
                undo.append(self._one_node_fault(what, node, detail))
        label = "; the leader" if target == leader else ""
        if op == "add":
            self._add()
        elif op == "remove":
            self._remove(target, label[2:], leave_running=rng.random() < 0.5)
        elif op == "replace":
            ended = self.kill(target, "to be replaced" + label)
            added = self._add(f"; replaces node {target}")
            self._remove(target, f"dead; replaced by node {added}" if added else "dead")
            ended()
        else:
            self._wipe(target, label)
        return undo

    def _track(self, node: int) -> None:
        with self.lock:
            self.cut.setdefault(node, set())
            self.acked.setdefault(node, set())

    def _forget(self, node: int) -> None:
        """A node that left: no faults of it or for it any more."""
        with self.lock:
            self.dead.discard(node)
            self.paused.discard(node)
            self.lost.discard(node)
            self.cut.pop(node, None)
            self.acked.pop(node, None)
            for peers in self.cut.values():
                peers.discard(node)
            for peers in self.acked.values():
                if peers is not None:
                    peers.discard(node)

    def _add(self, detail: str = "") -> int | None:
        """Start a fresh node with --join and add it (a voter once caught up); its id, if it was added."""
        c = self.cluster
        node = c.new_node()
        self._track(node)
        c.start(node)
        f = self._record("add", [node], "a fresh node, --join" + detail)
        ok, how = self._change("add", node, lambda cl: cl.add_member(node, **c.address(node)))
        if ok:
            c.admit(node)
        elif node in c.joining:
            self._forget(node)
            c.retire(node, "its add was not done", grace=0)
        f.detail += f"; {how}"
        self._end(f)
        return node if ok else None

    def _remove(self, node: int, detail: str = "", leave_running: bool = False) -> bool:
        """Remove a member; once done, stop it (or, ``leave_running``, in the next round: a removed node
        must not disrupt anyone meanwhile)."""
        f = self._record("remove", [node], detail)
        ok, how = self._change("remove", node, lambda cl: cl.remove_member(node))
        if ok:
            self.removals += 1
            running = self.cluster.alive(node) and node not in self.paused
            self._forget(node)
            if leave_running and running:
                self.leftover.append(node)
                self.cluster.ids = [i for i in self.cluster.ids if i != node]
                self.cluster.n = len(self.cluster.ids)
                how += "; left running for a round"
            else:
                self.cluster.retire(node, "removed")
        else:
            self.unsure.add(node)
        f.detail += ("; " if f.detail else "") + how
        self._end(f)
        return ok

    def _wipe(self, node: int, label: str = "") -> None:
        """A node loses its disk: killed, its data dir emptied (its log file kept), restarted under its
        old id, which must be refused; then replaced by a fresh node and removed."""
        c = self.cluster
        with self.lock:
            c.kill(node)
            self.dead.add(node)
            self.paused.discard(node)
            self.lost.add(node)
        f = self._record("wipe disk", [node], "kill -9, data dir emptied, restarted under its old id" + label)
        node_dir = c.data_dir / str(node)
        for p in node_dir.iterdir():
            if p.name != "node.log":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        c.write_config(node)  # the current members: the ones it asks about itself
        proc = c.start(node)
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            code = None
        if code == 4:
            f.detail += "; refused (exit 4)"
        else:
            st = c.status(node) if code is None else None
            how = (f"exited with code {code}" if code is not None else
                   "still on probation after 20 s" if st is not None and st.get("probation") else
                   f"it takes part: {st}" if st is not None else "still running after 20 s, not answering")
            c.kill(node)
            f.detail += f"; NOT refused: {how}"
            self.errors.append(f"nemesis: node {node} restarted with an emptied data dir under its old id was not "
                               f"refused (exit code 4): {how}")
        self._end(f)
        added = self._add(f"; replaces node {node}")
        self._remove(node, "its disk was lost" + (f"; replaced by node {added}" if added else ""))

    def _transfer(self) -> None:
        """Hand leadership to a random other voter that is up (or, sometimes, let the leader choose)."""
        got = self._membership()
        if got is None or got[1] is None:
            self.log(f"[{self.now():6.1f}s] nemesis: no leader to transfer leadership from")
            return
        voters, leader = got
        up = [i for i in sorted(voters) if i != leader and i in self.cluster.ids and i not in self.dead
              and i not in self.paused]
        target = self.rng.choice(up) if up and self.rng.random() < 0.7 else None
        f = self._record("transfer", [leader] + ([target] if target is not None else []),
                         f"from node {leader} to " + (f"node {target}" if target is not None else "its choice"))
        t = time.monotonic()
        try:
            with self.cluster.client(timeout=5.0) as cl:
                new = cl.transfer_leader(target)
            f.detail += f"; node {new} leads after {time.monotonic() - t:.2f} s"
        except ZraftError as exc:  # a transfer may be given up (after an election timeout): no harm done
            f.detail += f"; not done: {exc.code}"
        self._end(f)

    def _change(self, what: str, node: int, call: Callable[[Client], Any]) -> tuple[bool, str]:
        """Ask for a membership change until it is done, certainly refused, or CHANGE_TIMEOUT_S have
        passed (then it counts as an error: a majority of the voters was up all along); (done, how it
        went). Whatever the cluster did not take (``in_progress``, no leader, ``busy``) is asked again,
        and so is a change whose outcome is unknown: a repeat of one that took effect is refused
        (``bad_request``), and the membership tells whether it is done."""
        t0 = time.monotonic()
        deadline = t0 + self.CHANGE_TIMEOUT_S
        tries, last = 0, ""
        while True:
            tries += 1
            try:
                with self.cluster.client(timeout=min(10.0, max(1.0, deadline - time.monotonic()))) as cl:
                    call(cl)
                return True, f"done in {time.monotonic() - t0:.1f} s" + (f", {tries} tries" if tries > 1 else "")
            except ZraftError as exc:
                last = f"{exc.code}: {exc.message}"
                if exc.code == protocol.BAD_REQUEST:
                    break  # refused as asked; done already, if an earlier attempt took effect
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        done = self._done(what, node, deadline)
        if done:
            return True, f"done in {time.monotonic() - t0:.1f} s, {tries} tries (the last: {last})"
        why = (f"{what} of node {node} not done within {self.CHANGE_TIMEOUT_S:g} s, {tries} tries, the last: "
               f"{last}" if time.monotonic() >= deadline else f"{what} of node {node} refused: {last}")
        self.errors.append(f"nemesis: {why}")
        self.log(f"[{self.now():6.1f}s] nemesis: {why}")
        return False, why

    def _done(self, what: str, node: int, deadline: float) -> bool:
        """Whether the leader's configuration has the change (for an add: the node a voter), waiting
        until ``deadline`` (at least a few seconds) for it."""
        until = max(deadline, time.monotonic() + 5.0)
        while True:
            info = self.cluster.members(timeout=2.0)
            if info is not None:
                m = next((m for m in info["members"] if m["id"] == node), None)
                if (what == "add" and m is not None and m.get("voter")) or (what == "remove" and m is None):
                    return True
            if time.monotonic() >= until:
                return False
            time.sleep(0.2)

    _INJECT: dict[str, Callable[[Nemesis], list[Callable[[], None]]]] = {
        "kill": _inject_kill,
        "pause": _inject_pause,
        "partition": lambda self: [self.partition_random()],
        "leader": _inject_leader,
        "network": lambda self: [self.network(drop=self.rng.choice([0.0, 0.1, 0.3, 0.5]),
                                              delay=self.rng.choice([0.0, 20.0, 50.0, 150.0]))],
        "replies": lambda self: [self.drop_replies(self.find_leader() or self.rng.choice(self.cluster.ids),
                                                   self.rng.randint(2, 10))],
        "double": _inject_double,
        "membership": _inject_membership,
    }

    # ------------------------------------------------------------------ faults

    def _record(self, kind: str, nodes: list[int], detail: str = "") -> Fault:
        f = Fault(kind, sorted(nodes), self.now(), detail=detail)
        self.faults.append(f)
        self.log(f"[{f.start:6.1f}s] nemesis: {kind} node{'s' if len(nodes) > 1 else ''} "
                 f"{','.join(map(str, sorted(nodes)))}" + (f" ({detail})" if detail else ""))
        return f

    def _end(self, f: Fault) -> None:
        f.end = self.now()

    def find_leader(self) -> int | None:
        """The current leader, waiting up to 2 s for one; None if there is none."""
        deadline = time.monotonic() + 2.0
        while not self.stop.is_set():
            got = self.cluster.leader(timeout=0.5)
            if got is not None:
                return got[0]
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        return None

    def kill(self, node: int, detail: str = "") -> Callable[[], None]:
        with self.lock:
            if node in self.dead:
                return lambda: None
            self.cluster.kill(node)
            self.dead.add(node)
            self.paused.discard(node)
            self.acked[node] = set()  # a new process starts with no faults
            f = self._record("kill -9", [node], detail)

        def undo() -> None:
            self.restart(node)
            self._end(f)

        return undo

    def kill_many(self, nodes: list[int]) -> Callable[[], None]:
        with self.lock:
            nodes = [n for n in nodes if n not in self.dead]
            for node in nodes:
                self.cluster.kill(node)
                self.dead.add(node)
                self.paused.discard(node)
                self.acked[node] = set()
            f = self._record("kill -9", nodes, "all at once")

        def undo() -> None:
            for node in nodes:
                self.restart(node)
            self._end(f)

        return undo

    def stop_node(self, node: int) -> Callable[[], None]:
        """A clean stop (SIGTERM), restarted later."""
        with self.lock:
            if node in self.dead:
                return lambda: None
            self.cluster.stop(node)
            self.dead.add(node)
            self.paused.discard(node)
            self.acked[node] = set()
            f = self._record("stop", [node], "SIGTERM")

        def undo() -> None:
            self.restart(node)
            self._end(f)

        return undo

    def restart(self, node: int) -> None:
        with self.lock:
            if node not in self.dead:
                return
            self.cluster.start(node)
            self.dead.discard(node)
            deadline = time.monotonic() + 10
            while self.cluster.status(node, 0.5) is None and time.monotonic() < deadline:
                time.sleep(0.05)  # let it come up before it is told its network faults
            self.log(f"[{self.now():6.1f}s] nemesis: restarted node {node}")
        self.sync_node(node)

    def pause(self, node: int, detail: str = "") -> Callable[[], None]:
        with self.lock:
            if node in self.dead or node in self.paused:
                return lambda: None
            self.cluster.pause(node)
            self.paused.add(node)
            f = self._record("pause", [node], detail)

        def undo() -> None:
            self.resume(node)
            self._end(f)

        return undo

    def resume(self, node: int) -> None:
        with self.lock:
            if node not in self.paused:
                return
            self.cluster.resume(node)
            self.paused.discard(node)
        self.sync_node(node)

    def isolate(self, node: int, detail: str = "") -> Callable[[], None]:
        others = [i for i in self.cluster.ids if i != node]
        return self.partition([node], others, "isolate", detail)

    def bridge(self, node: int | None = None) -> Callable[[], None]:
        """Split the others in two halves that can't talk to each other; ``node`` (random
        if None) still talks to both: a non-transitive partition."""
        ids = list(self.cluster.ids)
        self.rng.shuffle(ids)
        if node is None:
            node = ids[0]
        others = [i for i in ids if i != node]
        if len(others) < 2:
            return self.isolate(node)
        k = len(others) // 2
        return self.partition(others[:k], others[k:], "bridge", f"only node {node} talks to both sides")

    def partition_random(self) -> Callable[[], None]:
        """Cut one node off, a bridge, or a random minority off the majority (the same as
        cutting one node off, with three nodes). The side cut off holds the leader more
        often than chance would have it: that is where the trouble is."""
        ids = list(self.cluster.ids)
        self.rng.shuffle(ids)
        r = self.rng.random()
        if r < 0.25 and len(ids) >= 3:
            return self.bridge()
        leader = self.find_leader() if self.rng.random() < 0.6 else None  # None: a random node
        if leader is not None:
            ids.remove(leader)
            ids.insert(0, leader)
        if r < 0.7 or len(ids) < 3:
            return self.isolate(ids[0], "the leader" if leader is not None else "")
        k = self.rng.randint(1, (len(ids) - 1) // 2)  # a minority of k nodes, the rest a majority
        return self.partition(ids[:k], ids[k:], "partition", "with the leader" if leader is not None else "")

    def partition(self, side_a: list[int], side_b: list[int], kind: str, detail: str = "") -> Callable[[], None]:
        with self.lock:
            for a in side_a:
                self.cut[a] |= set(side_b)
            for b in side_b:
                self.cut[b] |= set(side_a)
            f = self._record(kind, side_a, f"from {','.join(map(str, sorted(side_b)))}" + (
                f"; {detail}" if detail else ""))
        self.sync_all()

        def undo() -> None:
            with self.lock:  # (a node removed from the cluster meanwhile has no entry any more)
                for a in side_a:
                    if a in self.cut:
                        self.cut[a] -= set(side_b)
                for b in side_b:
                    if b in self.cut:
                        self.cut[b] -= set(side_a)
            self.sync_all()
            self._end(f)

        return undo

    def network(self, drop: float, delay: float) -> Callable[[], None]:
        if drop == 0 and delay == 0:
            drop = 0.2
        with self.lock:
            self.net = {"drop": drop, "delay": delay}
            f = self._record("network", list(self.cluster.ids), f"drop {drop:.0%}, delay {delay:g} ms")
        self.sync_all()

        def undo() -> None:
            with self.lock:
                self.net = {"drop": 0.0, "delay": 0.0}
            self.sync_all()
            self._end(f)

        return undo

    def drop_replies(self, node: int, count: int) -> Callable[[], None]:
        with self.lock:
            if node in self.dead or node in self.paused:
                return lambda: None
            ok = self.cluster.fault(node, "drop_replies", count=count) is not None
            f = self._record("drop replies", [node], f"the next {count} replies to applied writes"
                             + ("" if ok else "; not acknowledged"))

        def undo() -> None:
            with self.lock:
                if node not in self.dead and node not in self.paused:
                    self.cluster.fault(node, "drop_replies", count=0)
            self._end(f)

        return undo

    # ------------------------------------------------------------------ pushing network state

    def sync_all(self) -> None:
        for i in self.cluster.ids:
            self.sync_node(i)

    def sync_node(self, node: int) -> None:
        """Bring one running node's network faults to what is desired (no-op if it can't answer)."""
        with self.lock:
            if node in self.dead or node in self.paused:
                return
            want = set(self.cut[node])
            have = self.acked[node]

            def fault(action: str, **fields: Any) -> bool:  # up to three tries
                return any(self.cluster.fault(node, action, **fields) is not None for _ in range(3))

            ok = True
            if have is None:
                ok = fault("clear")
                have = set()
            if ok and have - want:
                ok = fault("heal", peers=sorted(have - want))
            if ok and want - have:
                ok = fault("isolate", peers=sorted(want - have))
            if ok:
                ok = fault("drop", rate=self.net["drop"]) and fault("delay", delay_ms=self.net["delay"])
            self.acked[node] = want if ok else None
            if not ok:
                self.errors.append(f"nemesis: node {node} did not acknowledge a fault request at {self.now():.1f} s")
                self.log(f"[{self.now():6.1f}s] nemesis: node {node} did not acknowledge a fault request")

    def heal_all(self) -> None:
        """Undo everything: resume the paused, restart the dead, clear every network fault."""
        self.check_exits()
        with self.lock:
            self._retire_leftovers()
            for node in sorted(self.paused):
                self.resume(node)
            for node in sorted(self.dead - self.lost):
                self.restart(node)
            self.cut = {i: set() for i in self.cluster.ids}
            self.net = {"drop": 0.0, "delay": 0.0}
            for i in self.cluster.ids:
                self.acked[i] = None  # clear everything, drop_replies included
            self.sync_all()
            now = self.now()
            for f in self.faults:
                if f.end is None:
                    f.end = now


# ---------------------------------------------------------------------- a run

def run(scenario: str = "mixed", duration: float = 60.0, clients: int = 5, nodes: int = 3, seed: int | None = None,
        keys: int = 5, keep: bool = False, workdir: str | None = None, env: dict[str, str] | None = None,
        client_timeout: float = 2.0, log: Callable[[str], None] | None = None, progress_every: float = 5.0,
        check_budget_s: float = 60.0, sessions: str = "mixed", with_keys: bool = False) -> Result:
    """One run: start a cluster, ``duration`` s of faulted operation, heal, final reads, check.

    ``sessions``: whether the clients' writes use exactly-once sessions: "on", "off", or
    "mixed" (every other client). ``with_keys``: the cluster and every client use CURVE keys."""
    if sessions not in ("on", "off", "mixed"):
        raise ValueError(f"sessions must be on, off or mixed, not {sessions!r}")
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {', '.join(SCENARIOS)}")
    if seed is None:
        seed = random.randrange(1 << 31)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    rng = random.Random(seed)
    key_names = [f"k{i}".encode() for i in range(keys)]
    log(f"zraft jepsen: scenario {scenario}, {nodes} nodes, {clients} clients (sessions {sessions}), "
        f"{duration:g} s, seed {seed}" + (", with keys (CURVE)" if with_keys else ""))
    rec = Recorder()
    errors: list[str] = []
    cluster = (ElasticCluster if scenario == "membership" else LocalCluster)(nodes, workdir=workdir, env=env,
                                                                              keep=keep, keys=with_keys)
    stop = threading.Event()
    workers: list[Worker] = []
    nemesis: Nemesis | None = None
    t0 = t_end = time.monotonic()
    final: dict[Any, Any] = {}
    converged, convergence = False, ""
    try:
        cluster.start_all()
        leader = cluster.wait_for_leader(30)
        log(f"cluster up in {cluster.workdir}: leader {leader[0]}, term {leader[1]}")
        seen: dict[bytes, bytes | None] = {}
        workers = [Worker(c, cluster.endpoints, key_names, rec, stop, rng.randrange(1 << 31), client_timeout, seen,
                          sessions == "on" or (sessions == "mixed" and c % 2 == 0), cluster.ring,
                          (lambda: cluster.endpoints) if isinstance(cluster, ElasticCluster) else None)
                   for c in range(clients)]
        t0 = time.monotonic()
        nemesis = Nemesis(cluster, scenario, random.Random(rng.randrange(1 << 31)), t0, stop, log)
        for w in workers:
            w.start()
        nemesis.start()
        _operate(rec, nemesis, t0 + duration, progress_every, log)
        stop.set()
        t_end = time.monotonic()
        errors += _stop(workers, nemesis, client_timeout)
        log(f"[{time.monotonic() - t0:6.1f}s] healing")
        nemesis.heal_all()
        errors += nemesis.errors
        converged, convergence = _converge(cluster)
        log(f"[{time.monotonic() - t0:6.1f}s] {convergence}")
        final, read_errors = _final_reads(cluster, key_names, rec)
        errors += read_errors
    except Exception as exc:
        errors.append(f"runner: {type(exc).__name__}: {exc}")
        stop.set()
        if nemesis is not None and nemesis.is_alive():
            nemesis.join(10)
    finally:
        stop.set()
        cluster.close()
    log(f"checking {len(rec.ops)} ops")
    result = Result(scenario, seed, nodes, clients, duration, rec.ops, nemesis.faults if nemesis else [],
                    check(rec.ops, time_budget_s=check_budget_s), t0, t_end, final, converged, convergence, errors,
                    str(cluster.workdir) if keep else "", sessions, list(cluster.spawned_pids))
    return result


def _operate(rec: Recorder, nemesis: Nemesis, end: float, progress_every: float, log: Callable[[str], None]) -> None:
    """The faulted part of a run: wait until ``end``, saying how it goes every ``progress_every`` s."""
    t0 = nemesis.t0
    next_progress = t0 + progress_every
    while (now := time.monotonic()) < end:
        time.sleep(min(0.2, end - now))
        if time.monotonic() >= next_progress:
            next_progress += progress_every
            c = rec.tally()
            log(f"[{time.monotonic() - t0:6.1f}s] ops: {c[OK]} ok, {c[FAIL]} failed, {c[UNKNOWN]} unknown; "
                f"faults so far: {len(nemesis.faults)}")


def _stop(workers: list[Worker], nemesis: Nemesis, client_timeout: float) -> list[str]:
    """Wait for the clients and the nemesis to stop (``stop`` is set); what went wrong with them."""
    errors = []
    nemesis.join(30 + 3 * Nemesis.CHANGE_TIMEOUT_S)  # a membership round may be under way: let it finish
    for w in workers:
        w.join(2 * client_timeout + 5)
        if w.is_alive():
            errors.append(f"client {w.cid} did not stop")
        if w.error is not None:
            errors.append(f"client {w.cid} crashed: {w.error!r}")
    if nemesis.is_alive():
        errors.append("the nemesis did not stop")
    return errors


def _converge(cluster: LocalCluster) -> tuple[bool, str]:
    """Wait for the healed cluster to agree on everything; (converged, what happened)."""
    t_heal = time.monotonic()
    try:
        st = cluster.wait_converged(30)
        lead = next(s for s in st.values() if s and s["role"] == "leader")
        converged = True
        convergence = (f"converged in {time.monotonic() - t_heal:.1f} s: leader {lead['id']}, term {lead['term']},"
                       f" commit index {lead['commit_index']} on every node")
        if isinstance(cluster, ElasticCluster):
            convergence += f"; voters {lead.get('voters')}, learners {lead.get('learners')}"
    except TimeoutError as exc:
        converged, convergence = False, f"did NOT converge: {exc}"
    return converged, convergence + "; " + _snapshot_counts(cluster.data_dir)


def _final_reads(cluster: LocalCluster, key_names: list[bytes], rec: Recorder) -> tuple[dict[Any, Any], list[str]]:
    """Read every key once more after healing (part of the history too); (values, failures)."""
    final: dict[Any, Any] = {}
    errors = []
    with cluster.client(timeout=5.0) as reader:
        for key in key_names:
            for _attempt in range(5):
                op = run_op(reader, GET, key, process=-2)
                if op.status == OK:
                    break
            rec.add(op)
            if op.status == OK:
                final[key] = op.result
            else:
                errors.append(f"the final read of {fmt(key)} failed: {op.error}")
    return final, errors


def _snapshot_counts(data_dir: Path) -> str:
    """How often the nodes compacted their logs and installed snapshots (from their log files)."""
    compactions = installs = 0
    for f in data_dir.glob("*/node.log"):
        text = f.read_text(errors="replace")
        compactions += text.count("log compacted up to")
        installs += text.count("installed a snapshot")
    return f"{compactions} log compactions, {installs} snapshots installed"


# ---------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zraft.jepsen",
                                description="Jepsen-style linearizability test of zraft under faults: local node "
                                            "processes, concurrent clients, a nemesis, then a linearizability check.")
    p.add_argument("--scenario", choices=SCENARIOS, default="mixed", help="which faults to inject (default mixed)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of faulted operation (default 60)")
    p.add_argument("--clients", type=int, default=5, help="concurrent clients (default 5)")
    p.add_argument("--nodes", type=int, default=3, help="cluster size (default 3)")
    p.add_argument("--keys", type=int, default=5, help="keys the clients work on (default 5)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random choices (default: random)")
    p.add_argument("--keep", action="store_true", help="keep the cluster's directory (config, data, logs)")
    p.add_argument("--workdir", default=None, help="where the cluster lives (default: a temporary directory)")
    p.add_argument("--client-timeout", type=float, default=2.0, help="client request timeout, s (default 2)")
    p.add_argument("--sessions", choices=("on", "off", "mixed"), default="mixed",
                   help="exactly-once sessions for the clients' writes: all, none, or every other client "
                        "(default mixed)")
    p.add_argument("--with-keys", action="store_true",
                   help="run the cluster and every client with CURVE keys (zraft keys init), as in production")
    p.add_argument("--tick-ms", type=int, default=None, help="ZRAFT_TICK_MS of the nodes (default: theirs)")
    p.add_argument("--node-env", action="append", default=[], metavar="ZRAFT_NAME=VALUE",
                   help="a setting for the nodes, e.g. ZRAFT_SNAPSHOT_THRESHOLD=300 (repeatable)")
    p.add_argument("--history", default=None, help="write the history to this file (JSON lines, one op each)")
    p.add_argument("--check", metavar="FILE", default=None,
                   help="run nothing: check a history written by --history, and print the verdict")
    a = p.parse_args(argv)
    if a.check:
        res_check = check(load_history(a.check))
        for k, r in res_check.keys.items():
            print(f"{fmt(k)}: {r.ops} ops, {r.verdict} ({r.algorithm}, {r.steps} steps, {r.seconds:.2f} s)")
        if res_check.valid is not True:
            print(res_check.report())
        print(f"linearizable: {'yes' if res_check.valid is True else 'NO'} ({res_check.verdict})")
        return 0 if res_check.valid is True else 1
    env = {"ZRAFT_TICK_MS": str(a.tick_ms)} if a.tick_ms else {}
    for item in a.node_env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("ZRAFT_"):
            p.error(f"--node-env takes ZRAFT_NAME=VALUE, not {item!r}")
        env[name] = value
    try:
        res = run(a.scenario, a.duration, a.clients, a.nodes, a.seed, keys=a.keys, keep=a.keep, workdir=a.workdir,
                  env=env, client_timeout=a.client_timeout, sessions=a.sessions, with_keys=a.with_keys)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if a.history:
        dump_history(res.history, a.history)
    print(res.summary())
    return 0 if res.ok else 1
