"""A node that can't start says why, quickly, and starts nothing."""

from __future__ import annotations

import pytest

from .cluster import Cluster, free_base, run_zraft

pytestmark = pytest.mark.integration

QUICK_S = 10.0  # interpreter start plus imports on a loaded CI machine; no waiting on anything


def good_lines(base: int) -> list[str]:
    return [f'Ip="127.0.0.1",port="{base + i}"' for i in range(3)]


BAD_LINES = [
    ("unknown name", 'Ip="127.0.0.1",port="{p}",colour="red"', "colour"),
    ("missing port", 'Ip="127.0.0.1"', "port"),
    ("missing ip", 'port="{p}"', "ip"),
    ("port not a number", 'Ip="127.0.0.1",port="49x0"', "port"),
    ("port out of range", 'Ip="127.0.0.1",port="70000"', "70000"),
    ("not name=value", 'just some words', "just some words"),
    ("duplicate id", 'Ip="127.0.0.1",port="{p}",id="1"', "id"),
]


@pytest.mark.parametrize("case,line,word", BAD_LINES, ids=[b[0] for b in BAD_LINES])
@pytest.mark.parametrize("command", ["node", "cluster-up"])
def test_bad_config_line_is_a_clear_error(tmp_path, case, line, word, command) -> None:
    base = free_base(4)
    lines = ["# a comment, then a blank line", "", *good_lines(base)]
    lines.insert(3, line.format(p=base + 3))  # the bad line is line 4 of the file
    cfg = tmp_path / "Config.txt"
    cfg.write_text("\n".join(lines) + "\n")
    data = tmp_path / "data"
    if command == "node":
        r = run_zraft("node", "--id", "2", "--config", str(cfg), "--data-dir", str(data), cwd=tmp_path,
                      timeout=QUICK_S * 3)
    else:
        r = run_zraft("cluster", "up", "--config", str(cfg), "--data-dir", str(data), cwd=tmp_path,
                      timeout=QUICK_S * 3)
    assert r.rc != 0, str(r)
    assert r.seconds < QUICK_S, str(r)
    assert "Config.txt:4" in r.err, f"the error does not name the line: {r}"
    assert word in r.err, str(r)
    assert "Traceback" not in r.err, str(r)
    assert not (data / "2").exists() and not (data / "1").exists(), "a node started anyway"


def test_unknown_node_id(tmp_path) -> None:
    c = Cluster(tmp_path)
    r = run_zraft("node", "--id", "7", "--config", str(c.config_path), "--data-dir", str(c.data_dir),
                  cwd=tmp_path)
    assert r.rc != 0 and r.seconds < QUICK_S, str(r)
    assert "7" in r.err and "id" in r.err, str(r)
    assert "Traceback" not in r.err, str(r)
    assert not (c.data_dir / "7").exists()


def test_missing_config_file(tmp_path) -> None:
    r = run_zraft("node", "--id", "1", "--config", str(tmp_path / "nope.txt"), cwd=tmp_path)
    assert r.rc != 0 and r.seconds < QUICK_S, str(r)
    assert "nope.txt" in r.err and "Traceback" not in r.err, str(r)


def test_second_node_on_the_same_data_dir_fails_clearly(make_cluster) -> None:
    c: Cluster = make_cluster()
    leader = c.wait_leader()
    with c.client() as cl:
        cl.put(b"precious", b"data")

    # Same id, same data dir, same Config.txt: a second copy of a running node.
    r = run_zraft("node", "--id", str(leader), "--config", str(c.config_path), "--data-dir", str(c.data_dir),
                  cwd=c.workdir)
    assert r.rc != 0 and r.seconds < QUICK_S, str(r)
    assert "Traceback" not in r.err, str(r)
    assert "lock" in r.err.lower(), f"the error does not say the data dir is locked (in use): {r}"

    # Same data dir under another Config.txt (other ports): only the LevelDB lock stops it.
    other = c.workdir / "Other.txt"
    base = free_base(3)
    other.write_text("".join(f'Ip="127.0.0.1",port="{base + i}"\n' for i in range(3)))
    r = run_zraft("node", "--id", str(leader), "--config", str(other), "--data-dir", str(c.data_dir),
                  cwd=c.workdir)
    assert r.rc != 0 and r.seconds < QUICK_S, str(r)
    assert "lock" in r.err.lower(), str(r)

    # The running node was not disturbed.
    assert c.alive(leader)
    assert c.wait_leader() == leader
    with c.client() as cl:
        assert cl.get(b"precious") == b"data"
        cl.put(b"still", b"writable")
    c.kill(leader)  # and its data survives a crash as usual
    c.start(leader)
    lead = c.wait_leader()
    with c.client() as cl:
        assert cl.get(b"precious") == b"data" and cl.get(b"still") == b"writable"
    assert lead in c.ids


@pytest.mark.parametrize("offset", [100, 200], ids=["client-port", "http-port"])
def test_port_in_use_fails_clearly(make_cluster, tmp_path, offset: int) -> None:
    """Another program holds a node's client (or HTTP) port: that node fails with a clear error."""
    import socket

    c: Cluster = make_cluster(start=False)
    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", c.base + offset))  # node 1's client or HTTP port
        blocker.listen()
        r = run_zraft("node", "--id", "1", "--config", str(c.config_path), "--data-dir", str(c.data_dir),
                      cwd=c.workdir)
    finally:
        blocker.close()
    assert r.rc != 0 and r.seconds < QUICK_S, str(r)
    assert "Traceback" not in r.err, str(r)
    assert str(c.base + offset) in r.err or "in use" in r.err.lower(), str(r)
    if offset == 200:
        assert "HTTP port" in r.err and str(c.base + 200) in r.err, str(r)
