"""Bad input to the `zraft` command gives one clear error line and a non-zero exit, never a traceback.

Each test runs the CLI as a subprocess in a temporary directory with its own Config.txt. No
cluster is started: where a node must answer, a one-socket stand-in (FakeNode) does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import msgpack
import pytest
import zmq

from zraft.cluster.procs import free_ports

BIG = 2**70


def run(cwd: Path, *args: str | bytes, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZRAFT_") and k != "FORCE_COLOR"}
    env["NO_COLOR"] = "1"
    return subprocess.run([sys.executable, "-m", "zraft", *args], cwd=cwd, env=env, capture_output=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def assert_error(r: subprocess.CompletedProcess, code: int, message: str) -> None:
    """Exit code ``code``, and stderr is exactly ``error: MESSAGE``."""
    stderr = r.stderr.decode(errors="backslashreplace")
    assert b"Traceback" not in r.stderr, stderr
    assert r.returncode == code, (r.returncode, stderr)
    assert stderr == f"error: {message}\n", stderr


def write_config(d: Path, lines: list[str]) -> Path:
    path = d / "Config.txt"
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture
def ports() -> list[int]:
    return free_ports(3, block=(0, 100, 200))


@pytest.fixture
def cwd(tmp_path: Path, ports: list[int]) -> Path:
    """A directory with a Config.txt of three nodes on free ports, none of them running."""
    write_config(tmp_path, [f'Ip="127.0.0.1",port="{p}"' for p in ports])
    return tmp_path


def endpoints(ports: list[int]) -> str:
    return ", ".join(f"tcp://127.0.0.1:{p + 100}" for p in ports)


# --- ids and ports out of range ------------------------------------------------------------


@pytest.mark.parametrize("command", [["node", "--id", "1"], ["client", "get", "k"], ["cluster", "status"]])
def test_id_out_of_range_in_config(tmp_path, ports, command):
    # An id of 2**70 used to end a node with an OverflowError traceback from msgpack.
    line = f'Ip="127.0.0.1",port="{ports[0]}",id="{BIG}"'
    write_config(tmp_path, [line, f'Ip="127.0.0.1",port="{ports[1]}"'])
    r = run(tmp_path, *command)
    assert_error(r, 1, f"Config.txt:1: id must be a positive integer below 2**63, got {BIG}\n    1 | {line}")


@pytest.mark.parametrize("value", ["0", "-1", str(2**63), str(BIG)])
def test_id_out_of_range_on_the_command_line(cwd, value):
    r = run(cwd, "node", "--id", value, "--data-dir", "data")
    assert_error(r, 1, f"a node id is an integer from 1 to 2**63-1, got {value}")
    assert not (cwd / "data").exists()


@pytest.mark.parametrize("command", ["start-node", "stop-node", "kill-node"])
def test_node_id_out_of_range_for_the_supervisor(cwd, command):
    r = run(cwd, "cluster", command, str(BIG))
    assert_error(r, 1, f"a node id is an integer from 1 to 2**63-1, got {BIG}")


def test_port_out_of_range_in_config(tmp_path):
    line = 'Ip="127.0.0.1",port="70000"'
    write_config(tmp_path, [line])
    r = run(tmp_path, "client", "get", "k")
    assert_error(r, 1, f"Config.txt:1: port 70000 is out of range 1..65535\n    1 | {line}")


def test_fault_peer_out_of_range(cwd):
    r = run(cwd, "fault", "isolate", "1", "--from", str(BIG))
    assert_error(r, 1, f"Config.txt: no node with id {BIG} (known ids: 1, 2, 3)")


def test_fault_count_out_of_range(cwd):
    r = run(cwd, "fault", "drop-replies", "1", str(BIG))
    assert_error(r, 1, f"COUNT must be from 0 to 1000000000, got {BIG}")


# --- address clashes -----------------------------------------------------------------------


def test_localhost_and_127_0_0_1_on_one_port_clash(tmp_path, ports):
    if "127.0.0.1" not in {a[4][0] for a in socket.getaddrinfo("localhost", None)}:
        pytest.skip("localhost does not resolve to 127.0.0.1 here")
    p = ports[0]
    second = f'Ip="localhost",port="{p}"'
    write_config(tmp_path, [f'Ip="127.0.0.1",port="{p}"', second])
    r = run(tmp_path, "node", "--id", "2")
    assert_error(r, 1, f"Config.txt:2: duplicate endpoint localhost:{p} (port): the same address as "
                       f"127.0.0.1:{p}, the port of node 1 on line 1 (both are 127.0.0.1)\n    2 | {second}")


def test_name_that_does_not_resolve_is_no_clash(tmp_path, ports):
    write_config(tmp_path, [f'Ip="127.0.0.1",port="{ports[0]}"', f'Ip="no-such-host.invalid",port="{ports[0]}"'])
    r = run(tmp_path, "node", "--id", "3")
    assert_error(r, 1, "Config.txt: no node with id 3 (known ids: 1, 2)")  # it loaded


# --- status when no node answers -----------------------------------------------------------


def test_client_status_no_node_answers(cwd, ports):
    r = run(cwd, "client", "status")
    assert_error(r, 2, f"no node answered within 1 s at {endpoints(ports)} (is the cluster up?)")
    assert r.stdout.decode() == "[" + ", ".join(
        f'{{"endpoint": "tcp://127.0.0.1:{p + 100}", "answers": false}}' for p in ports) + "]\n"


def test_cluster_status_json_no_node_answers(cwd, ports):
    r = run(cwd, "cluster", "status", "--json", "--timeout", "0.2")
    assert_error(r, 2, f"no node answered within 0.2 s at {endpoints(ports)} (is the cluster up?)")
    assert r.stdout.decode().startswith('[{"endpoint": ')


def test_cluster_status_table_no_node_answers(cwd, ports):
    r = run(cwd, "cluster", "status", "-t", "0.2")
    assert_error(r, 2, f"no node answered within 0.2 s at {endpoints(ports)} (is the cluster up?)")
    out = r.stdout.decode()
    assert "answers" in out and out.count(" no ") == 3, out


# --- a stand-in node ------------------------------------------------------------------------


class FakeNode:
    """A REP socket on the client port that answers like a leader, keeps what it was sent, and
    stores puts (so a get returns them)."""

    def __init__(self, port: int) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(f"tcp://127.0.0.1:{port}")
        self.requests: list[dict] = []
        self.store: dict[bytes, bytes] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _reply(self, req: dict) -> dict:
        op = req["op"]
        if op == "status":
            return {"ok": True, "id": 1, "role": "leader", "term": 1, "leader": 1, "commit_index": 0,
                    "applied_index": 0}
        if op == "put":
            self.store[req["key"]] = req["value"]
            return {"ok": True}
        if op == "get":
            return {"ok": True, "value": self.store.get(req["key"])}
        if op == "delete":
            return {"ok": True, "deleted": self.store.pop(req["key"], None) is not None}
        if op == "cas":
            return {"ok": True, "swapped": False, "value": self.store.get(req["key"])}
        return {"ok": False, "error": "bad_request", "message": f"unknown op {op}"}

    def _serve(self) -> None:
        while not self.stop.is_set():
            if self.sock.poll(50):
                req = msgpack.unpackb(self.sock.recv(), raw=False)
                self.requests.append(req)
                self.sock.send(msgpack.packb(self._reply(req), use_bin_type=True))

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def fake(ports):
    node = FakeNode(ports[0] + 100)
    yield node
    node.close()


def test_status_exits_0_when_one_node_answers(cwd, ports, fake):
    r = run(cwd, "client", "status")
    assert (r.returncode, r.stderr) == (0, b""), r.stderr
    assert '"answers": true' in r.stdout.decode() and '"answers": false' in r.stdout.decode()


# --- keys and values that are not UTF-8 ----------------------------------------------------


def test_non_utf8_key_and_value_are_raw_bytes(cwd, ports, fake):
    # A bytes argv reaches zraft with surrogate escapes; these used to give a UnicodeEncodeError traceback.
    ep = f"127.0.0.1:{ports[0] + 100}"
    r = run(cwd, "client", "put", b"\xff", b"\xfe\x80v", "-e", ep)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"OK\n", b""), r.stderr
    assert (fake.requests[-1]["key"], fake.requests[-1]["value"]) == (b"\xff", b"\xfe\x80v")
    r = run(cwd, "client", "get", b"\xff", "-e", ep)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"\xfe\x80v\n", b""), r.stderr
    assert fake.requests[-1]["key"] == b"\xff"
    # A UTF-8 key is its UTF-8 bytes, as before.
    r = run(cwd, "client", "put", "ключ", "é", "-e", ep)
    assert r.returncode == 0, r.stderr
    assert (fake.requests[-1]["key"], fake.requests[-1]["value"]) == ("ключ".encode(), "é".encode())


def test_non_utf8_key_in_messages(cwd, ports, fake):
    ep = f"127.0.0.1:{ports[0] + 100}"
    assert_error(run(cwd, "client", "get", b"k\xfe", "-e", ep), 1, "no such key: k\\xfe")
    fake.store[b"\xff"] = b"\xfe\x80"
    r = run(cwd, "client", "cas", b"\xff", b"x", b"y\xff", "-e", ep)
    assert_error(r, 1, "not swapped: \\xff is \\xfe\\x80")
    assert (fake.requests[-1]["expect"], fake.requests[-1]["value"]) == (b"x", b"y\xff")
    r = run(cwd, "client", "delete", b"\xff", "-e", ep)
    assert (r.returncode, r.stdout) == (0, b"1\n"), r.stderr


def test_non_utf8_key_with_no_cluster(cwd, ports):
    r = run(cwd, "client", "put", b"\xff", b"v", "-t", "0.3")
    assert_error(r, 2, f"unavailable: gave up after 0.3 s: tcp://127.0.0.1:{ports[0] + 100} did not answer")


# --- --timeout -----------------------------------------------------------------------------

TIMEOUT_ERROR = "--timeout must be a number of seconds above 0 and at most 86400, got {}"


@pytest.mark.parametrize("value, shown", [("nan", "nan"), ("inf", "inf"), ("-inf", "-inf"), ("-1", "-1"),
                                          ("0", "0"), ("1e12", "1e+12")])
def test_bad_timeout(cwd, value, shown):
    # nan used to give a ValueError traceback, inf to hang, 1e12 an OverflowError in ZeroMQ's poll.
    assert_error(run(cwd, "client", "get", "k", "--timeout", value), 1, TIMEOUT_ERROR.format(shown))


@pytest.mark.parametrize("command", [["client", "put", "k", "v"], ["client", "delete", "k"],
                                     ["client", "cas", "k", "a", "b"], ["cluster", "status"],
                                     ["cluster", "status", "--json"], ["snapshot", "save", "backup.zsnap"]])
def test_bad_timeout_on_every_command(cwd, command):
    assert_error(run(cwd, *command, "-t", "nan"), 1, TIMEOUT_ERROR.format("nan"))
    assert not (cwd / "backup.zsnap").exists()


# --- files and endpoints -------------------------------------------------------------------


def test_missing_config(tmp_path):
    assert_error(run(tmp_path, "client", "get", "k"), 1,
                 f"Config.txt: config file not found (cwd: {tmp_path}); pass --config PATH")


def test_config_is_a_directory(tmp_path):
    (tmp_path / "conf").mkdir()
    assert_error(run(tmp_path, "node", "--id", "1", "--config", "conf"), 1,
                 "conf: is a directory, not a config file")


def test_config_not_utf8(tmp_path):
    (tmp_path / "Config.txt").write_bytes(b'Ip="\xff",port="1"\n')
    r = run(tmp_path, "cluster", "status")
    assert b"Traceback" not in r.stderr and r.returncode == 1
    assert r.stderr.startswith(b"error: Config.txt: not UTF-8 text: "), r.stderr


@pytest.mark.parametrize("endpoint", ["foo", "tcp://", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:99999",
                                      "tcp://a b:5000", "udp://127.0.0.1:5000"])
def test_bad_endpoint(cwd, endpoint):
    # A malformed endpoint used to give a ZMQError traceback from connect.
    assert_error(run(cwd, "client", "get", "k", "-e", endpoint), 1,
                 f"--endpoint {endpoint!r}: expected tcp://HOST:PORT or HOST:PORT, with a port in 1..65535")


def test_keys_is_a_file(cwd):
    (cwd / "keys").write_text("not a directory")
    assert_error(run(cwd, "client", "get", "k", "--keys", "keys"), 1,
                 "keys is not a directory: --keys names the directory that zraft keys init made")


@pytest.mark.parametrize("damage", ["directory", "not utf-8"])
def test_unreadable_http_token(cwd, damage):
    r = run(cwd, "keys", "init", "keys")
    assert r.returncode == 0, r.stderr
    token = cwd / "keys" / "http.token"
    token.unlink()
    if damage == "directory":
        token.mkdir()
        reason = "Is a directory"
    else:
        token.write_bytes(b"\xff\xfe")
        reason = "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"
    r = run(cwd, "client", "get", "k", "--keys", "keys", "-t", "0.2")
    assert_error(r, 1, f"cannot read the HTTP token keys/http.token: {reason}")


def test_snapshot_info_of_a_directory(tmp_path):
    assert_error(run(tmp_path, "snapshot", "info", str(tmp_path)), 1, f"{tmp_path} is a directory, not a backup file")
