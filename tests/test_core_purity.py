"""The Raft core stays pure: no I/O, no clock, no threads, no global randomness.

A static check over the source of zraft/raft/*.py (ast), and a dynamic one: a run with the
global random functions and the clocks booby-trapped replays bit for bit from its seed.
"""

from __future__ import annotations

import ast
import random
import time
from pathlib import Path

import pytest

from zraft.raft.core import HardState, RaftConfig, RaftNode
from zraft.raft.log import RaftLog

RAFT_DIR = Path(__file__).resolve().parent.parent / "zraft" / "raft"
SOURCES = sorted(RAFT_DIR.glob("*.py"))

FORBIDDEN_MODULES = {
    "zmq", "plyvel", "socket", "time", "threading", "asyncio", "os", "select", "selectors", "signal",
    "subprocess", "multiprocessing", "concurrent", "datetime", "io", "pathlib", "shutil", "tempfile",
    "logging", "secrets", "uuid", "sqlite3", "pickle",
}
FORBIDDEN_BUILTINS = {"open", "print", "input", "exec", "eval", "compile", "__import__", "breakpoint", "hash"}
RANDOM_ALLOWED = {"Random"}  # the class, to type and build a seeded generator; never its module functions


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_the_core_sources_are_found() -> None:
    assert {p.name for p in SOURCES} >= {"core.py", "log.py", "messages.py"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_io_clock_or_thread_module_is_imported(path: Path) -> None:
    bad = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []
        else:
            continue
        bad += [f"line {node.lineno}: {n}" for n in names if n.split(".")[0] in FORBIDDEN_MODULES]
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_only_an_injected_rng_is_used(path: Path) -> None:
    """``random`` may be imported for ``random.Random`` only: no random.random(), random.choice()..."""
    bad = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.module == "random":
            bad += [f"line {node.lineno}: from random import {a.name}" for a in node.names
                    if a.name not in RANDOM_ALLOWED]
        elif isinstance(node, ast.Import):
            bad += [f"line {node.lineno}: import random as {a.asname}" for a in node.names
                    if a.name == "random" and a.asname]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "random" and node.attr not in RANDOM_ALLOWED):
            bad.append(f"line {node.lineno}: random.{node.attr}")
    assert not bad, f"{path.name} uses module-level randomness: {bad}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_io_or_nondeterministic_builtins(path: Path) -> None:
    bad = [f"line {n.lineno}: {n.func.id}()" for n in ast.walk(_tree(path))
           if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in FORBIDDEN_BUILTINS]
    assert not bad, f"{path.name} calls {bad}"


def test_the_checks_do_catch_offenders(tmp_path: Path) -> None:
    """The static checks are not vacuous: they flag a made-up offender."""
    offender = tmp_path / "bad.py"
    offender.write_text("import os\nimport random\nfrom time import monotonic\n"
                        "x = random.choice([1])\nprint(x)\n")
    with pytest.raises(AssertionError, match="os"):
        test_no_io_clock_or_thread_module_is_imported(offender)
    with pytest.raises(AssertionError, match="random.choice"):
        test_only_an_injected_rng_is_used(offender)
    with pytest.raises(AssertionError, match="print"):
        test_no_io_or_nondeterministic_builtins(offender)


# ------------------------------------------------------------------ dynamic


def _run_cluster(seed: int) -> list[str]:
    """Three cores wired directly together (no faults); the transcript of everything that came out."""
    rng = random.Random(seed)
    ids = (1, 2, 3)
    nodes = {i: RaftNode(RaftConfig(id=i, voters=ids), HardState(), RaftLog(),
                         random.Random(rng.getrandbits(32))) for i in ids}
    inflight: list = []
    out: list[str] = []
    for step in range(3000):
        if inflight and rng.random() < 0.7:
            m = inflight.pop(rng.randrange(len(inflight)))
            nodes[m.dst].step(m)
        else:
            nodes[rng.choice(ids)].tick()
        if step % 7 == 0:
            for n in nodes.values():
                n.propose([b"put k %d" % step])
                n.read_index([step])
        for i, n in nodes.items():
            rd = n.ready()
            inflight += rd.messages
            out.append(f"{i} {rd}")
    assert any(n.commit_index > 20 for n in nodes.values())
    return out


def test_a_seeded_run_replays_exactly_without_global_random_or_clocks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def trap(*_a: object, **_k: object) -> None:
        raise AssertionError("the core used global randomness or a clock")

    for name in ("random", "randrange", "randint", "choice", "shuffle", "uniform", "getrandbits", "sample"):
        monkeypatch.setattr(random, name, trap)
    for name in ("time", "monotonic", "perf_counter", "time_ns", "monotonic_ns", "sleep"):
        monkeypatch.setattr(time, name, trap)
    first = _run_cluster(42)
    assert _run_cluster(42) == first
    assert _run_cluster(43) != first
