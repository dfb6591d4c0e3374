"""Config.txt parsing (parse_config, load_config) and Settings.from_env."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import zraft.cluster.config as config_module
from zraft.cluster.config import (
    MAX_NODE_ID,
    ClusterConfig,
    ConfigError,
    NodeAddress,
    Settings,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parent.parent

ORIGINAL = 'Ip="127.0.0.1",port="4900"\nIp="127.0.0.1",port="4901"\nIp="127.0.0.1",port="4902"\n'


def error_of(text: str, source: str = "Config.txt") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source)
    return info.value


def assert_line_error(text: str, lineno: int, *fragments: str) -> ConfigError:
    """The error names the source and line number, quotes the line, and says why."""
    exc = error_of(text)
    message = str(exc)
    line = text.splitlines()[lineno - 1].rstrip()
    assert message.startswith(f"Config.txt:{lineno}: "), message
    assert line in message, message
    assert exc.source == "Config.txt"
    assert exc.lineno == lineno
    assert exc.line == line
    for fragment in fragments:
        assert fragment in message, message
    return exc


# --- the original format --------------------------------------------------------------------


def test_original_format():
    cfg = parse_config(ORIGINAL)
    assert isinstance(cfg, ClusterConfig)
    assert cfg.source == "<string>"
    assert cfg.nodes == (
        NodeAddress(1, "127.0.0.1", 4900, 5000, 5100),
        NodeAddress(2, "127.0.0.1", 4901, 5001, 5101),
        NodeAddress(3, "127.0.0.1", 4902, 5002, 5102),
    )
    assert cfg.ids == [1, 2, 3]
    assert len(cfg) == 3
    assert cfg.quorum == 2


def test_repo_config_txt_is_the_three_node_loopback_cluster():
    cfg = load_config(REPO / "Config.txt")
    assert [(n.id, n.ip, n.port, n.client_port, n.http_port) for n in cfg.nodes] == [
        (1, "127.0.0.1", 4900, 5000, 5100),
        (2, "127.0.0.1", 4901, 5001, 5101),
        (3, "127.0.0.1", 4902, 5002, 5102),
    ]
    # The original lines are there exactly as in the contract.
    lines = (REPO / "Config.txt").read_text().splitlines()
    assert lines[0].startswith("#")
    assert [ln for ln in lines if not ln.startswith("#")] == ORIGINAL.splitlines()


def test_endpoints():
    n = parse_config(ORIGINAL).node(2)
    assert n.peer_endpoint == "tcp://127.0.0.1:4901"
    assert n.client_endpoint == "tcp://127.0.0.1:5001"
    assert n.bind_peer_endpoint == "tcp://127.0.0.1:4901"
    assert n.bind_client_endpoint == "tcp://127.0.0.1:5001"
    assert n.http_endpoint == "http://127.0.0.1:5101"


def test_node_lookup_and_unknown_id():
    cfg = parse_config(ORIGINAL, "Config.txt")
    assert cfg.node(3).port == 4902
    with pytest.raises(ConfigError) as info:
        cfg.node(7)
    assert "7" in str(info.value)
    assert "1, 2, 3" in str(info.value)
    assert "Config.txt" in str(info.value)
    assert [n.id for n in cfg.peers(2)] == [1, 3]
    assert list(cfg) == list(cfg.nodes)


def test_frozen():
    cfg = parse_config(ORIGINAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.nodes[0].port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.source = "x"  # type: ignore[misc]


# --- optional fields and lenient syntax ------------------------------------------------------


def test_all_optional_fields():
    cfg = parse_config(
        'ip="10.0.0.1",port="7000",id="5",client_port="7100",http_port="8080"\n'
        'ip="10.0.0.2",port="7000",id="9",client_port="9000",http_port="9001"\n'
    )
    assert cfg.nodes == (
        NodeAddress(5, "10.0.0.1", 7000, 7100, 8080),
        NodeAddress(9, "10.0.0.2", 7000, 9000, 9001),
    )
    assert cfg.ids == [5, 9]
    assert cfg.node(9).client_endpoint == "tcp://10.0.0.2:9000"


def test_pairs_in_any_order():
    cfg = parse_config('http_port="1",port="2",id="3",ip="h",client_port="4"')
    assert cfg.nodes == (NodeAddress(3, "h", 2, 4, 1),)


def test_only_some_optional_fields():
    cfg = parse_config('ip="a",port="1000",client_port="3000"\nip="a",port="1001",http_port="4000"\n')
    assert cfg.nodes == (NodeAddress(1, "a", 1000, 3000, 1200), NodeAddress(2, "a", 1001, 1101, 4000))


@pytest.mark.parametrize(
    "name_ip, name_port", [("ip", "port"), ("IP", "PORT"), ("Ip", "Port"), ("iP", "pOrT")]
)
def test_names_are_case_insensitive(name_ip, name_port):
    cfg = parse_config(f'{name_ip}="127.0.0.1",{name_port}="4900",ID="4",Client_Port="6000",HTTP_PORT="6001"')
    assert cfg.nodes == (NodeAddress(4, "127.0.0.1", 4900, 6000, 6001),)


def test_values_are_case_preserved():
    assert parse_config('ip="MyHost.Example",port="1"').nodes[0].ip == "MyHost.Example"


@pytest.mark.parametrize(
    "line",
    [
        "ip=127.0.0.1,port=4900",
        'ip = "127.0.0.1" , port = "4900"',
        '  ip="127.0.0.1",port="4900"  ',
        '\tIp =127.0.0.1 ,\tport= "4900"',
        'ip="127.0.0.1",port="4900",',  # one trailing comma is tolerated
        'ip="127.0.0.1",port=" 4900 "',
        'ip="127.0.0.1",port="+4900"',
    ],
)
def test_unquoted_values_and_whitespace(line):
    assert parse_config(line).nodes == (NodeAddress(1, "127.0.0.1", 4900, 5000, 5100),)


def test_comments_and_blank_lines():
    text = (
        "# a comment\n"
        "\n"
        'Ip="127.0.0.1",port="4900"\n'
        "   # an indented comment with = and , and \"quotes\"\n"
        "   \n"
        "\t\n"
        '#Ip="127.0.0.1",port="4901"\n'
        'Ip="127.0.0.1",port="4902"\n'
        "\n"
    )
    cfg = parse_config(text)
    # ids count node lines only: comments and blank lines don't use up a number.
    assert [(n.id, n.port) for n in cfg.nodes] == [(1, 4900), (2, 4902)]


def test_crlf_bom_and_no_final_newline():
    text = '\ufeffIp="127.0.0.1",port="4900"\r\nIp="127.0.0.1",port="4901"'
    assert parse_config(text).ids == [1, 2]


def test_default_ids_mix_with_explicit_ones():
    cfg = parse_config('ip="a",port="1",id="10"\nip="a",port="2"\nip="a",port="3",id="1"\n')
    assert cfg.ids == [10, 2, 1]
    assert cfg.node(1).port == 3


def test_nodes_on_different_hosts_may_share_ports():
    cfg = parse_config('ip="10.0.0.1",port="4900"\nip="10.0.0.2",port="4900"\nip="10.0.0.3",port="4900"\n')
    assert {n.port for n in cfg.nodes} == {4900}


def test_hyphenated_names_are_accepted():
    cfg = parse_config('ip="a",port="10",client-port="20",HTTP-Port="30"')
    assert cfg.nodes == (NodeAddress(1, "a", 10, 20, 30),)


def test_port_bounds_are_inclusive():
    cfg = parse_config('ip="a",port="1",client_port="65535",http_port="2"')
    assert cfg.nodes == (NodeAddress(1, "a", 1, 65535, 2),)


# --- errors ----------------------------------------------------------------------------------


def test_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "bad",
    [
        'Ip:"127.0.0.1",port="4900"',
        'Ip="127.0.0.1";port="4900"',
        'Ip="127.0.0.1" port="4900"',
        "just some words",
        '"127.0.0.1","4900"',
        'Ip="127.0.0.1,port="4900"',
        'Ip="127.0.0.1"x,port="4900"',
        'Ip="127.0.0.1",,port="4900"',
        ',Ip="127.0.0.1",port="4900"',
        'Ip="127.0.0.1",port="4900",,',
        '=1,Ip="127.0.0.1",port="4900"',
    ],
)
def test_malformed_pair(bad):
    text = f'# header\nIp="127.0.0.1",port="4800"\n\n{bad}\n'
    assert_line_error(text, 4)


def test_malformed_pair_message():
    exc = assert_line_error('ip="a",port="1"\nip:"a",port="2"\n', 2, "malformed", 'name="value"')
    assert "ip:" in exc.reason


def test_unknown_name():
    assert_line_error('ip="a",port="1"\nip="a",port="2",role="leader"\n', 2, "unknown name", "role",
                      "client_port")


def test_name_given_twice():
    assert_line_error('ip="a",port="1",Port="2"\n', 1, "port", "twice")


@pytest.mark.parametrize("field", ["ip", "port"])
def test_missing_required(field):
    pairs = {"ip": 'ip="127.0.0.1"', "port": 'port="4900"'}
    del pairs[field]
    line = ",".join(pairs.values()) + ',id="2"'
    assert_line_error(f'ip="127.0.0.1",port="4800"\n{line}\n', 2, f"missing {field}")


@pytest.mark.parametrize("value", ["", "   ", "127.0 .0.1"])
def test_bad_ip(value):
    assert_line_error(f'ip="{value}",port="1"', 1, "ip")


@pytest.mark.parametrize("field", ["port", "client_port", "http_port", "id"])
@pytest.mark.parametrize("value", ["abc", "49o0", "4900.0", "0x10", "", "1 2", "٣"])
def test_non_integer(field, value):
    line = f'ip="a",port="10",{field}="{value}"' if field != "port" else f'ip="a",port="{value}"'
    assert_line_error(f"\n{line}\n", 2, field, "integer")


@pytest.mark.parametrize("field", ["port", "client_port", "http_port"])
@pytest.mark.parametrize("value", ["0", "-1", "65536", "100000"])
def test_port_out_of_range(field, value):
    line = f'ip="a",port="10",{field}="{value}"' if field != "port" else f'ip="a",port="{value}"'
    assert_line_error(line, 1, field, "out of range", "65535")


@pytest.mark.parametrize("port, field", [("65436", "client_port"), ("65400", "http_port")])
def test_default_port_out_of_range(port, field):
    assert_line_error(f'ip="a",port="{port}"', 1, field, "out of range", "default")


def test_default_port_out_of_range_is_fine_when_given():
    cfg = parse_config('ip="a",port="65500",client_port="1000",http_port="1001"')
    assert cfg.nodes[0].port == 65500


@pytest.mark.parametrize("value", ["0", "-3"])
def test_non_positive_id(value):
    assert_line_error(f'ip="a",port="1",id="{value}"', 1, "id", "positive")


@pytest.mark.parametrize("value", [str(2**63), str(2**70), "1" + "0" * 40])
def test_id_too_large(value):
    # 2**70 used to pass here and end the node with an OverflowError traceback in msgpack.
    exc = assert_line_error(f'ip="a",port="1",id="{value}"', 1, "id", "positive", "below 2**63", value)
    assert exc.reason == f"id must be a positive integer below 2**63, got {value}"


def test_largest_id():
    from zraft.raft.messages import MAX_WIRE_INT

    assert MAX_NODE_ID == MAX_WIRE_INT == 2**63 - 1  # what a peer message may carry as src and dst
    assert parse_config(f'ip="a",port="1",id="{2**63 - 1}"').ids == [2**63 - 1]


def test_duplicate_explicit_id():
    text = 'ip="a",port="1",id="7"\n#\nip="a",port="2",id="7"\n'
    assert_line_error(text, 3, "duplicate id 7", "line 1")


def test_duplicate_id_from_default():
    # The second node line defaults to id 2, which the first already took.
    text = 'ip="a",port="1",id="2"\nip="a",port="2"\n'
    assert_line_error(text, 2, "duplicate id 2", "default", "line 1")


def test_duplicate_peer_endpoint():
    text = 'Ip="127.0.0.1",port="4900"\nIp="127.0.0.1",port="4901"\nIp="127.0.0.1",port="4900"\n'
    assert_line_error(text, 3, "duplicate endpoint", "127.0.0.1:4900", "line 1")


def test_port_clashes_with_another_nodes_default_client_port():
    text = 'ip="a",port="4900"\nip="a",port="5000"\n'  # node 1's client port is 5000
    assert_line_error(text, 2, "duplicate endpoint", "a:5000", "client_port", "line 1")


def test_client_port_clashes_with_another_nodes_http_port():
    text = 'ip="a",port="1"\nip="a",port="2",client_port="201"\n'  # node 1's http port is 201
    assert_line_error(text, 2, "duplicate endpoint", "a:201", "http_port")


def _fake_resolver(table: dict[str, list[str]]):
    """A getaddrinfo that knows only the hosts of ``table`` (host -> addresses)."""

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in table[host]]
    return getaddrinfo


def test_localhost_and_127_0_0_1_on_one_port_clash():
    if "127.0.0.1" not in {a[4][0] for a in socket.getaddrinfo("localhost", None)}:
        pytest.skip("localhost does not resolve to 127.0.0.1 here")
    text = 'Ip="127.0.0.1",port="4900"\nIp="localhost",port="4900"\n'
    exc = assert_line_error(text, 2, "duplicate endpoint localhost:4900 (port)", "127.0.0.1:4900", "line 1")
    assert exc.reason == ("duplicate endpoint localhost:4900 (port): the same address as 127.0.0.1:4900, "
                          "the port of node 1 on line 1 (both are 127.0.0.1)")


def test_names_that_resolve_to_one_address_clash_on_every_port(monkeypatch):
    monkeypatch.setattr(config_module.socket, "getaddrinfo", _fake_resolver(
        {"lo": ["127.0.0.1", "::1"], "127.0.0.1": ["127.0.0.1"], "db": ["10.0.0.5"], "other": ["10.0.0.6"]}))
    # node 1's default client port 5000 is node 2's peer port, on another name for the same host
    text = 'ip="127.0.0.1",port="4900"\nip="lo",port="5000"\n'
    assert_line_error(text, 2, "duplicate endpoint lo:5000 (port)", "127.0.0.1:5000",
                      "the client_port of node 1 on line 1", "both are 127.0.0.1")
    # ... and a derived http port
    text = 'ip="lo",port="4900"\nip="127.0.0.1",port="6000",client_port="5100"\n'
    assert_line_error(text, 2, "duplicate endpoint 127.0.0.1:5100 (client_port)", "the http_port of node 1")
    # other hosts on the same port are fine, and so are names that do not resolve
    cfg = parse_config('ip="db",port="4900"\nip="other",port="4900"\nip="nowhere",port="4900"\n'
                       'ip="lo",port="4900"\nip="elsewhere",port="4900"\n')
    assert [n.ip for n in cfg.nodes] == ["db", "other", "nowhere", "lo", "elsewhere"]


def test_names_differing_in_case_clash():
    text = 'ip="NodeA.example",port="4900"\nip="nodea.EXAMPLE",port="4900"\n'
    assert_line_error(text, 2, "duplicate endpoint nodea.EXAMPLE:4900 (port): already the port of node 1")


@pytest.mark.parametrize("failure", [UnicodeError("label too long"), OSError("resolver broken"),
                                     ValueError("embedded null")])
def test_resolver_failure_is_no_clash(monkeypatch, failure):
    def getaddrinfo(*args, **kwargs):
        raise failure
    monkeypatch.setattr(config_module.socket, "getaddrinfo", getaddrinfo)
    cfg = parse_config(f'ip="{"x" * 70}.example",port="4900"\nip="127.0.0.1",port="4900"\n')
    assert len(cfg) == 2


def test_distinct_loopback_addresses_share_a_port():
    cfg = parse_config('ip="127.0.0.1",port="4900"\nip="127.0.0.2",port="4900"\nip="127.0.0.3",port="4900"\n')
    assert len(cfg) == 3


def test_ports_of_one_node_clash():
    assert_line_error('ip="a",port="1",client_port="1"', 1, "client_port", "port", "a:1")
    assert_line_error('ip="a",port="1",http_port="101"', 1, "http_port", "client_port", "a:101")


@pytest.mark.parametrize("text", ["", "\n\n", "# only\n# comments\n", "   \n\t\n", "\ufeff"])
def test_empty(text):
    exc = error_of(text)
    assert str(exc).startswith("Config.txt: ")
    assert "no nodes" in str(exc)


def test_first_error_wins_and_nothing_is_returned():
    text = 'ip="a",port="1"\nip="a",port="x"\nip="a",bogus="1"\n'
    assert_line_error(text, 2, "port")


# --- load_config ----------------------------------------------------------------------------


def test_load_config(tmp_path):
    path = tmp_path / "Config.txt"
    path.write_text(ORIGINAL)
    cfg = load_config(path)
    assert cfg.source == str(path)
    assert cfg.ids == [1, 2, 3]
    assert load_config(str(path)) == cfg


def test_load_config_error_names_the_file(tmp_path):
    path = tmp_path / "Config.txt"
    path.write_text('Ip="127.0.0.1",port="4900"\nIp="127.0.0.1",port="49x1"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:2: ")
    assert 'port="49x1"' in str(info.value)


def test_load_config_missing_file(tmp_path):
    path = tmp_path / "nope" / "Config.txt"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_load_config_directory(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_load_config_not_utf8(tmp_path):
    path = tmp_path / "Config.txt"
    path.write_bytes(b'Ip="\xff\xfe",port="1"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "UTF-8" in str(info.value)


# --- property: whatever is written in the format parses back ---------------------------------

_ips = st.sampled_from(["127.0.0.1", "127.0.0.2", "10.1.2.3", "localhost", "node-a.example"])
_HOST = {"localhost": "127.0.0.1"}  # one host: a port of one is taken on the other too


@st.composite
def _clusters(draw):
    n = draw(st.integers(1, 7))
    used: set[tuple[str, int]] = set()
    nodes = []
    ids = draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n, unique=True))
    for i in range(n):
        ip = draw(_ips)
        ports = []
        for _ in range(3):
            host = _HOST.get(ip, ip)
            p = draw(st.integers(1, 65535).filter(lambda p, host=host: (host, p) not in used))
            used.add((host, p))
            ports.append(p)
        nodes.append(NodeAddress(ids[i], ip, *ports))
    return nodes


def _render(node: NodeAddress, style: int) -> str:
    pairs = [("Ip", node.ip), ("port", str(node.port)), ("ID", str(node.id)),
             ("client_port", str(node.client_port)), ("HTTP_PORT", str(node.http_port))]
    if style == 0:
        return ",".join(f'{k}="{v}"' for k, v in pairs)
    if style == 1:
        return " , ".join(f"{k.lower()} = {v}" for k, v in reversed(pairs))
    return ", ".join(f'{k.upper()}= "{v}"' for k, v in pairs)


@given(_clusters(), st.lists(st.integers(0, 2), min_size=7, max_size=7), st.booleans())
def test_roundtrip(nodes, styles, comments):
    lines = []
    for node, style in zip(nodes, styles, strict=False):
        if comments:
            lines += ["# node follows", ""]
        lines.append(_render(node, style))
    cfg = parse_config("\n".join(lines))
    assert list(cfg.nodes) == nodes


@given(st.text(max_size=200))
def test_arbitrary_text_parses_or_raises_config_error(text):
    try:
        cfg = parse_config(text)
    except ConfigError:
        return
    assert cfg.nodes


# --- Settings --------------------------------------------------------------------------------


def test_settings_defaults():
    s = Settings()
    assert (s.tick_ms, s.election_ticks, s.heartbeat_ticks) == (50, 10, 2)
    assert s.request_timeout_s == 4.0
    assert (s.max_key_bytes, s.max_value_bytes, s.max_request_bytes) == (4096, 1 << 20, 2 << 20)
    assert (s.max_inflight_msgs, s.max_msg_bytes, s.max_inflight_bytes) == (256, 1 << 20, 64 << 20)
    assert (s.snapshot_threshold, s.snapshot_keep, s.snapshot_chunk_bytes, s.snapshot_window) == (
        10_000, 5_000, 256 << 10, 4)
    assert s.tick_s == 0.05
    assert Settings.from_env({}) == s


def test_settings_from_env_overrides_every_field():
    env = {
        "ZRAFT_TICK_MS": "20",
        "ZRAFT_ELECTION_TICKS": "15",
        "ZRAFT_HEARTBEAT_TICKS": "3",
        "ZRAFT_REQUEST_TIMEOUT_S": "1.5",
        "ZRAFT_MAX_KEY_BYTES": "100",
        "ZRAFT_MAX_VALUE_BYTES": " 2000 ",
        "ZRAFT_MAX_REQUEST_BYTES": "1_000_000",
        "ZRAFT_MAX_INFLIGHT_MSGS": "8",
        "ZRAFT_MAX_MSG_BYTES": "65536",
        "ZRAFT_SNAPSHOT_THRESHOLD": "500",
        "ZRAFT_SNAPSHOT_KEEP": "50",
        "ZRAFT_SNAPSHOT_CHUNK_BYTES": "4096",
        "ZRAFT_SNAPSHOT_WINDOW": "2",
        "ZRAFT_MAX_INFLIGHT_BYTES": "1000000",
        "ZRAFT_SNAPSHOT_LOG_BYTES": "3000000",
        "ZRAFT_MAX_UNCOMMITTED_BYTES": "5000000",
        "ZRAFT_MAX_PENDING_REQUESTS": "300",
        "ZRAFT_MAX_TURN_BYTES": "70000",
    }
    s = Settings.from_env(env)
    assert s == Settings(tick_ms=20, election_ticks=15, heartbeat_ticks=3, request_timeout_s=1.5, max_key_bytes=100,
                         max_value_bytes=2000, max_request_bytes=1_000_000, max_inflight_msgs=8, max_msg_bytes=65536,
                         snapshot_threshold=500, snapshot_keep=50, snapshot_chunk_bytes=4096, snapshot_window=2,
                         max_inflight_bytes=1_000_000, snapshot_log_bytes=3_000_000, max_uncommitted_bytes=5_000_000,
                         max_pending_requests=300, max_turn_bytes=70_000)
    assert isinstance(s.tick_ms, int)
    assert isinstance(s.request_timeout_s, float)


def test_settings_older_env_name_is_read_when_the_new_one_is_unset():
    assert Settings.from_env({"ZRAFT_MAX_BATCH_BYTES": "4096"}).max_msg_bytes == 4096
    assert Settings.from_env({"ZRAFT_MAX_BATCH_BYTES": "4096", "ZRAFT_MAX_MSG_BYTES": "8192"}).max_msg_bytes == 8192


def test_settings_hand_the_core_and_the_driver_their_values_under_the_same_names():
    s = Settings.from_env({"ZRAFT_HEARTBEAT_TICKS": "3", "ZRAFT_MAX_MSG_BYTES": "5000", "ZRAFT_ASYNC_STORAGE": "1",
                           "ZRAFT_SNAPSHOT_THRESHOLD": "77"})
    rc = s.raft_config(2, (1, 2, 3))
    assert (rc.id, rc.voters, rc.heartbeat_ticks, rc.election_ticks) == (2, (1, 2, 3), 3, 10)
    assert (rc.max_msg_bytes, rc.max_inflight_msgs, rc.max_inflight_bytes, rc.async_storage) == (
        5000, 256, 64 << 20, True)
    dc = s.driver_config()
    assert (dc.snapshot_threshold, dc.snapshot_keep, dc.snapshot_chunk_bytes, dc.snapshot_window) == (
        77, 5000, 256 << 10, 4)


def test_settings_float_field_accepts_integers():
    assert Settings.from_env({"ZRAFT_REQUEST_TIMEOUT_S": "2"}).request_timeout_s == 2.0
    assert Settings.from_env({"ZRAFT_REQUEST_TIMEOUT_S": "2.5e-1"}).request_timeout_s == 0.25


def test_settings_from_os_environ(monkeypatch):
    monkeypatch.setenv("ZRAFT_TICK_MS", "33")
    assert Settings.from_env().tick_ms == 33


def test_settings_keyword_overrides_win_over_env():
    s = Settings.from_env({"ZRAFT_TICK_MS": "20", "ZRAFT_ELECTION_TICKS": "30"}, tick_ms=7)
    assert (s.tick_ms, s.election_ticks) == (7, 30)


def test_settings_unknown_override():
    with pytest.raises(TypeError):
        Settings.from_env({}, tick_seconds=1)


def test_settings_ignore_other_and_empty_variables():
    env = {"ZRAFT_CONFIG": "x", "ZRAFT_DATA_DIR": "/tmp", "tick_ms": "1", "ZRAFT_TICK_MS": "", "PATH": "/bin"}
    assert Settings.from_env(env) == Settings()


def test_settings_env_names_are_upper_case():
    assert Settings.from_env({"zraft_tick_ms": "1"}).tick_ms == 50
    assert Settings.env_var("max_key_bytes") == "ZRAFT_MAX_KEY_BYTES"


@pytest.mark.parametrize(
    "var, value",
    [
        ("ZRAFT_TICK_MS", "fast"),
        ("ZRAFT_TICK_MS", "2.5"),
        ("ZRAFT_TICK_MS", "0"),
        ("ZRAFT_TICK_MS", "-20"),
        ("ZRAFT_ELECTION_TICKS", "1e3"),
        ("ZRAFT_MAX_VALUE_BYTES", "1MB"),
        ("ZRAFT_MAX_INFLIGHT_MSGS", "0x10"),
        ("ZRAFT_REQUEST_TIMEOUT_S", "soon"),
        ("ZRAFT_REQUEST_TIMEOUT_S", "0"),
        ("ZRAFT_REQUEST_TIMEOUT_S", "-1.0"),
        ("ZRAFT_REQUEST_TIMEOUT_S", "nan"),
        ("ZRAFT_REQUEST_TIMEOUT_S", "inf"),
    ],
)
def test_settings_bad_env_value_names_the_variable(var, value):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: value})
    assert var in str(info.value)
    assert value.strip() in str(info.value)


def test_settings_heartbeat_must_be_shorter_than_election():
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"ZRAFT_HEARTBEAT_TICKS": "10"})
    assert "heartbeat_ticks" in str(info.value)
    assert "election_ticks" in str(info.value)
    with pytest.raises(ConfigError):
        Settings(election_ticks=3, heartbeat_ticks=5)


@pytest.mark.parametrize("kwargs", [{"tick_ms": 0}, {"tick_ms": "50"}, {"tick_ms": 1.5}, {"tick_ms": True},
                                    {"request_timeout_s": -1}, {"max_key_bytes": None}])
def test_settings_bad_direct_values(kwargs):
    with pytest.raises(ConfigError):
        Settings(**kwargs)
    with pytest.raises(ConfigError):
        Settings.from_env({}, **kwargs)


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().tick_ms = 1  # type: ignore[misc]


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("on", True), ("TRUE", True), ("yes", True),
                                            ("0", False), ("off", False), ("False", False), ("no", False)])
def test_switch_settings_from_the_environment(raw: str, value: bool) -> None:
    assert Settings.from_env({"ZRAFT_ASYNC_STORAGE": raw}).async_storage is value


def test_switch_settings_reject_other_words() -> None:
    with pytest.raises(ConfigError, match="ZRAFT_ASYNC_STORAGE='maybe'"):
        Settings.from_env({"ZRAFT_ASYNC_STORAGE": "maybe"})
    with pytest.raises(ConfigError, match="must be true or false"):
        Settings(async_storage=1)  # type: ignore[arg-type]
