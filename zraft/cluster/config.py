"""Cluster configuration (Config.txt) and per-node tunables (environment).

Config.txt holds one node a line as ``name="value"`` pairs separated by commas; names
are case-insensitive. The original C++ project's format stays valid as it is::

    Ip="127.0.0.1",port="4900"
    Ip="127.0.0.1",port="4901"
    Ip="127.0.0.1",port="4902"

Names: ``ip`` and ``port`` (required), ``id`` (default: the 1-based count of node
lines), ``client_port`` (default ``port + 100``) and ``http_port`` (default
``port + 200``). Values may also be given unquoted, and whitespace around ``=`` and
``,`` is allowed. Blank lines and lines whose first non-blank character is ``#`` are
ignored. Ids are 1..2**63-1 (what a peer message can carry), ports 1..65535. No two nodes
may share an endpoint: the same port on the same host, by name (case-insensitive) or by
address (``localhost`` and ``127.0.0.1`` are one host where the one resolves to the other;
a name that does not resolve here clashes only with itself). Every other problem is a
:class:`ConfigError` that names the file and line and quotes the line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zraft.raft.messages import MAX_WIRE_INT

if TYPE_CHECKING:
    from zraft.node.driver import DriverConfig
    from zraft.raft.core import RaftConfig

__all__ = [
    "ClusterConfig",
    "ConfigError",
    "MAX_NODE_ID",
    "NodeAddress",
    "Settings",
    "load_config",
    "parse_config",
]


class ConfigError(ValueError):
    """A bad Config.txt or setting; the message names where and why.

    ``source`` and ``lineno`` (1-based, or None when no single line is at fault) and
    ``line`` (the offending text) are kept as attributes too.
    """

    def __init__(self, message: str, *, source: str | None = None, lineno: int | None = None,
                 line: str | None = None) -> None:
        self.reason = message
        self.source = source
        self.lineno = lineno
        self.line = line
        if source is not None and lineno is not None:
            text = f"{source}:{lineno}: {message}"
        elif source is not None:
            text = f"{source}: {message}"
        else:
            text = message
        if line is not None:
            text += f"\n    {lineno} | {line}" if lineno is not None else f"\n    | {line}"
        super().__init__(text)


@dataclass(frozen=True)
class NodeAddress:
    """Where one node listens; peers and clients connect to the same addresses."""

    id: int
    ip: str
    port: int  # peer port: ZeroMQ ROUTER for Raft RPC
    client_port: int  # client REQ/REP endpoint
    http_port: int  # HTTP API

    @property
    def peer_endpoint(self) -> str:
        return f"tcp://{self.ip}:{self.port}"

    @property
    def client_endpoint(self) -> str:
        return f"tcp://{self.ip}:{self.client_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://{self.ip}:{self.http_port}"

    # A node binds to the address it is listed with (never the wildcard), so several
    # nodes can share a host on different loopback addresses.
    @property
    def bind_peer_endpoint(self) -> str:
        return self.peer_endpoint

    @property
    def bind_client_endpoint(self) -> str:
        return self.client_endpoint


@dataclass(frozen=True)
class ClusterConfig:
    """All nodes of the cluster, in the order of the file."""

    nodes: tuple[NodeAddress, ...]
    source: str = "<string>"

    def node(self, node_id: int) -> NodeAddress:
        for n in self.nodes:
            if n.id == node_id:
                return n
        known = ", ".join(str(i) for i in self.ids) or "none"
        raise ConfigError(f"no node with id {node_id} (known ids: {known})", source=self.source)

    @property
    def ids(self) -> list[int]:
        return [n.id for n in self.nodes]

    def peers(self, node_id: int) -> list[NodeAddress]:
        """Every node but ``node_id`` (which must exist)."""
        self.node(node_id)
        return [n for n in self.nodes if n.id != node_id]

    @property
    def quorum(self) -> int:
        return len(self.nodes) // 2 + 1

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self):
        return iter(self.nodes)


# ---------------------------------------------------------------------------------------------
# Config.txt

MAX_NODE_ID = MAX_WIRE_INT  # 2**63-1: what a peer message may carry as src and dst (zraft.raft.messages)

_FIELDS = ("ip", "port", "id", "client_port", "http_port")
_PORT_FIELDS = ("port", "client_port", "http_port")

# One pair: a name, '=', then a double-quoted value (no escapes) or a bare one running to
# the next comma. Followed by ',' or the end of the line.
_PAIR = re.compile(
    r"""\s*(?P<name>[A-Za-z_][A-Za-z0-9_-]*)\s*=\s*
        (?:"(?P<quoted>[^"]*)"|(?P<bare>[^",]*?))\s*
        (?P<sep>,|$)""",
    re.VERBOSE,
)
_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)


def _parse_pairs(text: str, err) -> dict[str, str]:
    pairs: dict[str, str] = {}
    pos = 0
    while True:
        m = _PAIR.match(text, pos)
        if m is None:
            rest = text[pos:].strip()
            if rest.startswith(","):
                raise err("empty pair (two commas in a row?)")
            raise err(f'malformed pair {rest.split(",")[0].strip()!r}: expected name="value"')
        raw_name = m.group("name")
        name = raw_name.lower().replace("-", "_")
        if name not in _FIELDS:
            raise err(f"unknown name {raw_name!r} (known names: {', '.join(_FIELDS)})")
        if name in pairs:
            raise err(f"{name!r} given twice")
        value = m.group("quoted") if m.group("quoted") is not None else m.group("bare")
        pairs[name] = value
        pos = m.end()
        if m.group("sep") == "":
            return pairs
        if text[pos:].strip() == "":  # tolerate one trailing comma
            return pairs


def _parse_int(name: str, value: str, err) -> int:
    v = value.strip()
    if not _INT.fullmatch(v):
        raise err(f"{name} must be an integer, got {value!r}")
    return int(v)


def _check_port(name: str, value: int, err, how: str = "") -> int:
    if not 1 <= value <= 65535:
        raise err(f"{name} {value}{how} is out of range 1..65535")
    return value


def parse_config(text: str, source: str = "<string>") -> ClusterConfig:
    """Parse the text of a Config.txt; ``source`` names it in error messages."""
    if text.startswith("\ufeff"):
        text = text[1:]
    nodes: list[NodeAddress] = []
    id_lines: dict[int, int] = {}
    endpoints: dict[int, list[_Claim]] = {}  # port -> every endpoint on it so far
    resolved: dict[str, frozenset[str]] = {}  # host -> its addresses (empty: it does not resolve)
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue

        def err(message: str, _lineno: int = lineno, _line: str = raw.rstrip()) -> ConfigError:
            return ConfigError(message, source=source, lineno=_lineno, line=_line)

        node = _parse_node_line(line, len(nodes) + 1, id_lines, err)
        id_lines[node.id] = lineno
        _claim_endpoints(node, lineno, endpoints, resolved, err)
        nodes.append(node)
    if not nodes:
        raise ConfigError("no nodes defined (the file is empty or has only comments)", source=source)
    return ClusterConfig(nodes=tuple(nodes), source=source)


def _parse_node_line(line: str, default_id: int, id_lines: dict[int, int], err) -> NodeAddress:
    """One node line's address; ``default_id`` is the count of node lines so far, this one included."""
    pairs = _parse_pairs(line, err)
    for required in ("ip", "port"):
        if required not in pairs:
            raise err(f"missing {required}")
    ip = pairs["ip"].strip()
    if not ip or any(c.isspace() for c in ip):
        raise err(f"ip must be a non-empty address without spaces, got {pairs['ip']!r}")
    port = _check_port("port", _parse_int("port", pairs["port"], err), err)
    ports = {"port": port}
    for field, offset in (("client_port", 100), ("http_port", 200)):
        if field in pairs:
            ports[field] = _check_port(field, _parse_int(field, pairs[field], err), err)
        else:
            ports[field] = _check_port(field, port + offset, err,
                                       f" (default: port + {offset}; set {field} explicitly)")
    if "id" in pairs:
        node_id = _parse_int("id", pairs["id"], err)
        if not 1 <= node_id <= MAX_NODE_ID:
            raise err(f"id must be a positive integer below 2**63, got {node_id}")
        how = ""
    else:
        node_id = default_id
        how = " (the default: the number of this node line)"
    if node_id in id_lines:
        raise err(f"duplicate id {node_id}{how}: already used on line {id_lines[node_id]}")
    return NodeAddress(id=node_id, ip=ip, port=port, client_port=ports["client_port"], http_port=ports["http_port"])


@dataclass(frozen=True)
class _Claim:
    ip: str
    lineno: int
    field: str
    node_id: int


def _addresses(host: str, resolved: dict[str, frozenset[str]]) -> frozenset[str]:
    """The addresses ``host`` resolves to here (an IP address: itself), or none when it does not
    resolve (a name of another site, say): such a name clashes only with itself."""
    if host not in resolved:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError, ValueError):  # gaierror is an OSError; a label too long is a UnicodeError
            infos = []
        resolved[host] = frozenset(str(info[4][0]) for info in infos)
    return resolved[host]


def _claim_endpoints(node: NodeAddress, lineno: int, endpoints: dict[int, list[_Claim]],
                     resolved: dict[str, frozenset[str]], err) -> None:
    """Each of the node's three endpoints must be its own and nobody else's: no other node may
    listen on the same port of the same host, by name (case-insensitive) or by address
    (``localhost`` and ``127.0.0.1`` are one host when the first resolves to the second)."""
    seen_here: dict[int, str] = {}
    for field in _PORT_FIELDS:
        port = getattr(node, field)
        if port in seen_here:
            raise err(f"{field} and {seen_here[port]} are the same endpoint {node.ip}:{port}")
        seen_here[port] = field
        for other in endpoints.get(port, ()):
            where = f"the {other.field} of node {other.node_id} on line {other.lineno}"
            if other.ip.lower() == node.ip.lower():
                raise err(f"duplicate endpoint {node.ip}:{port} ({field}): already {where}")
            common = _addresses(node.ip, resolved) & _addresses(other.ip, resolved)
            if common:
                raise err(f"duplicate endpoint {node.ip}:{port} ({field}): the same address as "
                          f"{other.ip}:{port}, {where} (both are {', '.join(sorted(common))})")
    for field in _PORT_FIELDS:
        endpoints.setdefault(getattr(node, field), []).append(_Claim(node.ip, lineno, field, node.id))


def load_config(path: str | os.PathLike) -> ClusterConfig:
    """Read and parse a Config.txt file."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(
            f"config file not found (cwd: {os.getcwd()}); pass --config PATH", source=source
        ) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, not a config file", source=source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text: {exc}", source=source) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", source=source) from None
    return parse_config(text, source=source)


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    """Tunables of a node, each overridable by an environment variable ZRAFT_<NAME upper>.

    For example ``ZRAFT_TICK_MS=20`` or ``ZRAFT_REQUEST_TIMEOUT_S=1.5``. Numbers must be
    positive; switches (``ZRAFT_ASYNC_STORAGE=0``) take 1/0, true/false, yes/no or on/off;
    ``heartbeat_ticks`` must be less than ``election_ticks``.

    This is the one place a node's tunables come from: :meth:`raft_config` and
    :meth:`driver_config` hand the core and the driver theirs, under the same names.
    """

    tick_ms: int = 50
    election_ticks: int = 10
    heartbeat_ticks: int = 2
    request_timeout_s: float = 4.0
    max_key_bytes: int = 4096
    max_value_bytes: int = 1 << 20
    max_request_bytes: int = 2 << 20
    max_inflight_msgs: int = 256  # pipelining window per follower, in AppendEntries messages
    max_msg_bytes: int = 1 << 20  # entry bytes per AppendEntries (soft: one entry always goes)
    snapshot_threshold: int = 10_000  # compact the log once it holds this many applied entries
    snapshot_keep: int = 5_000  # applied entries kept after a compaction, for followers a little behind
    snapshot_log_bytes: int = 64 << 20  # ... or once the log's entries hold this many bytes of data
    snapshot_chunk_bytes: int = 256 << 10  # size of one InstallSnapshot chunk
    snapshot_window: int = 4  # chunks in flight per snapshot stream
    max_inflight_bytes: int = 64 << 20  # ... and in entry bytes, per follower
    # Admission control: past these a request is answered `busy` at once (it did not take effect), so
    # that a flood of requests never keeps the leader from its heartbeats.
    max_uncommitted_bytes: int = 64 << 20  # commands the leader holds proposed and not yet committed
    max_pending_requests: int = 20_000  # client requests waiting for their commit or read
    max_turn_bytes: int = 1 << 20  # request bytes one turn takes from the client socket (peers: twice that)
    # Raft log writes in a background thread while the loop goes on (zraft.node.writer). Off by default:
    # on a 2-core host the thread hand-offs cost more than the overlap gains (docs/BENCHMARKS.md).
    async_storage: bool = False
    http_api: bool = True  # serve the HTTP API on each node's http_port (zraft.api.http)
    # The watch history (zraft.node.mvcc): the events of this many recent revisions, within these bytes.
    watch_history_revisions: int = 100_000
    watch_history_bytes: int = 64 << 20
    max_watches: int = 10_000  # watches waiting on one node at once (past it: busy)

    ENV_PREFIX = "ZRAFT_"  # not a field: no annotation
    ENV_ALIASES = {"max_msg_bytes": "ZRAFT_MAX_BATCH_BYTES"}  # older names, read when the new one is unset

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_setting(f, getattr(self, f.name), f.name)
        if self.heartbeat_ticks >= self.election_ticks:
            raise ConfigError(
                f"heartbeat_ticks ({self.heartbeat_ticks}) must be less than "
                f"election_ticks ({self.election_ticks})"
            )

    @property
    def tick_s(self) -> float:
        return self.tick_ms / 1000.0

    @property
    def peer_frame_bytes(self) -> int:
        """The largest peer frame a node takes (ZeroMQ's MAXMSGSIZE); senders cut frames well below it."""
        return 4 * self.max_msg_bytes + (1 << 20)

    @property
    def client_frame_bytes(self) -> int:
        """The largest client frame a node reads (MAXMSGSIZE): a bit over the request limit, so a
        request that is somewhat too large gets `too_large`, and a huge one costs no memory."""
        return 2 * self.max_request_bytes + (64 << 10)

    def raft_config(self, node_id: int, voters: tuple[int, ...]) -> RaftConfig:
        from zraft.raft.core import RaftConfig

        return RaftConfig(node_id, voters, election_ticks=self.election_ticks, heartbeat_ticks=self.heartbeat_ticks,
                          max_inflight_msgs=self.max_inflight_msgs, max_inflight_bytes=self.max_inflight_bytes,
                          max_msg_bytes=self.max_msg_bytes, async_storage=self.async_storage)

    def driver_config(self) -> DriverConfig:
        from zraft.node.driver import DriverConfig

        e = self.election_ticks
        return DriverConfig(snapshot_threshold=self.snapshot_threshold, snapshot_keep=self.snapshot_keep,
                            snapshot_log_bytes=self.snapshot_log_bytes,
                            snapshot_chunk_bytes=self.snapshot_chunk_bytes, snapshot_window=self.snapshot_window,
                            snapshot_retry_ticks=max(2, e), snapshot_give_up_ticks=10 * e, receive_idle_ticks=30 * e)

    @classmethod
    def env_var(cls, name: str) -> str:
        return cls.ENV_PREFIX + name.upper()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ZRAFT_* variables of ``environ`` (default ``os.environ``), then
        ``overrides`` (keyword arguments win). Empty variables count as unset; other
        ZRAFT_* variables are ignored."""
        env = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(overrides) - set(fields)
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name, f in fields.items():
            var = cls.env_var(name)
            raw = env.get(var)
            if (raw is None or raw.strip() == "") and name in cls.ENV_ALIASES:
                var = cls.ENV_ALIASES[name]
                raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            values[name] = _parse_setting(f, raw, var)
        for name, value in overrides.items():
            _check_setting(fields[name], value, name)
            values[name] = value
        return cls(**values)


def _is_float_field(f: dataclasses.Field) -> bool:
    return f.type in (float, "float")


def _parse_setting(f: dataclasses.Field, raw: str, var: str) -> int | float | bool:
    if _is_bool_field(f):
        switch = _SWITCH.get(raw.strip().lower())
        if switch is None:
            raise ConfigError(f"environment variable {var}={raw!r}: must be 1/0, true/false, yes/no or on/off")
        return switch
    text = raw.strip().replace("_", "")
    try:
        value: int | float = float(text) if _is_float_field(f) else int(text, 10)
    except ValueError:
        kind = "a number" if _is_float_field(f) else "an integer"
        raise ConfigError(f"environment variable {var}={raw!r}: must be {kind}") from None
    _check_setting(f, value, f"environment variable {var}")
    return value


_SWITCH = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _is_bool_field(f: dataclasses.Field) -> bool:
    return f.type in (bool, "bool")


def _check_setting(f: dataclasses.Field, value: Any, what: str) -> None:
    if _is_bool_field(f):
        if not isinstance(value, bool):
            raise ConfigError(f"{what}: must be true or false, got {value!r}")
        return
    if _is_float_field(f):
        ok_type = isinstance(value, int | float) and not isinstance(value, bool)
        kind = "a number"
    else:
        ok_type = isinstance(value, int) and not isinstance(value, bool)
        kind = "an integer"
    if not ok_type:
        raise ConfigError(f"{what}: must be {kind}, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what}={value!r}: must be positive")
