"""Fixtures of the integration tests: clusters of real node processes, and the guarantee
that no test leaves a process behind."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .cluster import LOG_FILES, REGISTRY, Cluster, MCluster, tail


@pytest.fixture(autouse=True)
def _no_process_left_behind() -> Iterator[None]:
    """Runs around every test (set up first, torn down last): once the test and its other
    fixtures are done, every process it started (or caused) must be gone. Leftovers are
    killed by pid, and the test errors."""
    LOG_FILES.clear()
    mark = REGISTRY.mark()
    yield
    leftovers = REGISTRY.reap_since(mark)
    if leftovers:
        pytest.fail("processes left behind (now killed): " + ", ".join(leftovers), pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """On failure, append the tail of every output file of the test's processes."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        item.zraft_failed = True  # type: ignore[attr-defined]  # for fixtures' teardown checks
        for path in LOG_FILES:
            rep.sections.append((f"tail of {path}", tail(path)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leftovers = REGISTRY.reap_since((0, 0), grace=1.0, include_long_lived=True)
    if leftovers:
        print("\nzraft integration tests: processes left behind (now killed): " + ", ".join(leftovers))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., MCluster]]:
    """A factory: ``make_cluster(n=3, env={...}, start=True, name=None, keys=False)``. Its clusters can
    also run nodes that are not in their Config.txt (cluster.MCluster). Every cluster it made is
    killed (SIGKILL, by pid), extra nodes included, when the test ends, however it ends."""
    clusters: list[MCluster] = []

    def make(n: int = 3, env: dict[str, str] | None = None, start: bool = True, name: str | None = None,
             keys: bool = False) -> MCluster:
        c = MCluster(tmp_path / (name or f"cluster{len(clusters)}"), n=n, env=dict(env or {}), keys=keys)
        clusters.append(c)
        if start:
            c.start_all()
        return c

    try:
        yield make
    finally:
        for c in clusters:
            c.close()


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    """Three nodes with the default settings, up and agreed on a leader."""
    c = make_cluster()
    c.wait_leader()
    return c


@pytest.fixture
def make_mcluster(make_cluster: Callable[..., MCluster]) -> Callable[..., MCluster]:
    """``make_cluster`` under the name the membership tests use (its clusters are MClusters)."""
    return make_cluster


@pytest.fixture(scope="module")
def _module_cluster(tmp_path_factory):
    """One cluster for every test of a module that asks for ``shared_cluster`` (tests that leave it as
    they found it: independent requests), killed at the end of the module."""
    c = MCluster(tmp_path_factory.mktemp("shared"), long_lived=True)
    try:
        c.start_all()
        c.wait_leader()
        yield c
    finally:
        c.close()


@pytest.fixture
def shared_cluster(_module_cluster: Cluster, request: pytest.FixtureRequest):
    """The module's cluster, every node running (a node an earlier case crashed is started
    again, so one crash fails one case, not all that follow); each case fails if it
    leaves a node dead."""
    c = _module_cluster
    LOG_FILES.extend(c.log_path(i) for i in c.ids)
    for i in c.ids:
        if not c.alive(i):
            c.start(i)
    c.wait_leader(c.ids)
    yield c
    dead = {i: c.procs[i].poll() for i in c.ids if not c.alive(i)}
    assert not dead or getattr(request.node, "zraft_failed", False), (
        f"node(s) died (id: exit code): {dead}; see the tails of their output")
