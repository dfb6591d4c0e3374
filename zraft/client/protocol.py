"""The client wire protocol (docs/PROTOCOL.md): request validation and reply shapes.

One request and one reply, each a single frame holding one msgpack map with text keys.
Keys and values may arrive as bin or str (str means its UTF-8 bytes); replies carry bin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from zraft.node import mvcc
from zraft.node.mvcc import MAX_TXN_OPS, prefix_end

SESSION_EXPIRED = "session_expired"
NOT_LEADER = "not_leader"
BAD_REQUEST = "bad_request"
TOO_LARGE = "too_large"
TIMEOUT = "timeout"
UNAVAILABLE = "unavailable"
BUSY = "busy"  # too much in flight on this node: did not take effect, retry later
IN_PROGRESS = "in_progress"  # another membership change is not committed yet: did not take effect
COMPACTED = "compacted"  # a watch from a revision the history no longer holds
LEASE_NOT_FOUND = "lease_not_found"  # the lease expired, was revoked, or never existed

LEASE_OPS = frozenset({"lease_grant", "lease_keepalive", "lease_revoke"})
WRITE_OPS = frozenset({"put", "delete", "cas", "txn"}) | LEASE_OPS
READ_OPS = frozenset({"get", "range"})  # served by the leader through ReadIndex
MEMBER_OPS = frozenset({"add_member", "remove_member", "promote_member", "transfer_leader"})
OPS = WRITE_OPS | READ_OPS | MEMBER_OPS | {"status", "fault", "compact", "snapshot", "members", "watch"}
MAX_WATCH_TIMEOUT_S = 3600.0
FAULT_ACTIONS = frozenset({"isolate", "heal", "drop", "delay", "drop_replies", "clear", "show"})


class RequestError(Exception):
    """A request that can't be served as sent; ``code`` is BAD_REQUEST or TOO_LARGE."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Limits:
    max_key_bytes: int = 4096
    max_value_bytes: int = 1 << 20
    max_request_bytes: int = 2 << 20


@dataclass(slots=True)
class Request:
    op: str
    key: bytes = b""
    value: bytes | None = None
    expect: bytes | None = None
    fault: dict[str, Any] | None = None  # op "fault": the validated fault injection request
    session: tuple[int, int] | None = None  # writes: (client_id, seq) for exactly-once
    stream: int | None = None  # op "snapshot": the stream to continue, None to start one
    member: dict[str, Any] | None = None  # membership ops: id (None: any, for transfer_leader), addresses, learner
    meta: bool = False  # get: with the key's revisions and version
    end: bytes | None = None  # range, watch: [key, end) (None: to the keyspace's end)
    limit: int = 0  # range: at most this many keys (0: no limit)
    keys_only: bool = False  # range
    txn: tuple[list, list, list] | None = None  # txn: compares, success ops, failure ops (command form)
    start_revision: int = 0  # watch
    lease: int = 0  # put (0: none), lease_keepalive, lease_revoke; lease_grant: the id asked for (0: any)
    ttl: int = 0  # lease_grant
    timeout: float = 30.0  # watch: how long to wait for an event


def _as_bytes(req: dict, name: str, limit: int, nil_ok: bool = False) -> bytes | None:
    if name not in req:
        raise RequestError(BAD_REQUEST, f"{req['op']} needs the field {name!r}")
    v = req[name]
    if v is None and nil_ok:
        return None
    if isinstance(v, str):
        v = v.encode()
    elif not isinstance(v, bytes):
        want = "bin, str or nil" if nil_ok else "bin or str"
        raise RequestError(BAD_REQUEST, f"field {name!r} must be {want}, not {type(v).__name__}")
    if len(v) > limit:
        raise RequestError(TOO_LARGE, f"{name} is {len(v)} bytes, over the limit of {limit}")
    return v


def parse_request(raw: bytes, limits: Limits) -> Request:
    """Decode and validate one request frame. Raises RequestError."""
    if len(raw) > limits.max_request_bytes:
        raise RequestError(TOO_LARGE, f"request is {len(raw)} bytes, over the limit of {limits.max_request_bytes}")
    try:
        req = msgpack.unpackb(raw, raw=False)
    except Exception as exc:  # msgpack raises many unrelated types for bad input
        raise RequestError(BAD_REQUEST, f"not a single msgpack value ({type(exc).__name__}: {exc})") from None
    if not isinstance(req, dict):
        raise RequestError(BAD_REQUEST, f"a request is a msgpack map, not {type(req).__name__}")
    op = req.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise RequestError(BAD_REQUEST, f"unknown op {op!r}; expected one of {sorted(OPS)}")
    return _PARSERS[op](req, limits)


def _parse_admin(req: dict, _limits: Limits) -> Request:
    return Request(req["op"])


def _parse_snapshot(req: dict, _limits: Limits) -> Request:
    stream = req.get("stream")
    if stream is not None and (type(stream) is not int or stream <= 0):
        raise RequestError(BAD_REQUEST, "stream must be a positive integer, or nil to start a snapshot")
    return Request("snapshot", stream=stream)


def _parse_key_op(req: dict, limits: Limits) -> Request:
    """get, put, delete and cas: a key, and for writes a session, a value, an expected value."""
    op = req["op"]
    key = _as_bytes(req, "key", limits.max_key_bytes)
    if op == "get":
        return Request(op, key, meta=_flag(req, "meta"))
    session = _parse_session(req)
    if op == "delete":
        return Request(op, key, session=session)
    value = _as_bytes(req, "value", limits.max_value_bytes)
    if op == "put":
        return Request(op, key, value, session=session, lease=_lease_id(req, "lease", optional=True))
    return Request(op, key, value, _as_bytes(req, "expect", limits.max_value_bytes, nil_ok=True), session=session)


def _parse_session(req: dict) -> tuple[int, int] | None:
    """Optional exactly-once session of a write: ``client_id`` (1..2**63-1) and ``seq`` (>= 1)."""
    client_id, seq = req.get("client_id"), req.get("seq")
    if client_id is None and seq is None:
        return None
    if type(client_id) is not int or not 0 < client_id < 1 << 63:
        raise RequestError(BAD_REQUEST, "client_id must be an integer from 1 to 2**63-1")
    if type(seq) is not int or not 0 < seq < 1 << 63:
        raise RequestError(BAD_REQUEST, "a write with a client_id needs seq, an integer from 1 to 2**63-1")
    return client_id, seq


def _parse_fault(req: dict) -> dict[str, Any]:
    """Validate a fault injection request (docs/PROTOCOL.md, "Fault injection")."""
    action = req.get("action")
    if not isinstance(action, str) or action not in FAULT_ACTIONS:
        raise RequestError(BAD_REQUEST, f"unknown fault action {action!r}; expected one of {sorted(FAULT_ACTIONS)}")
    out: dict[str, Any] = {"action": action}
    if action in ("isolate", "heal"):
        peers = req.get("peers")
        if peers is not None and not (isinstance(peers, list) and all(type(p) is int for p in peers)):
            raise RequestError(BAD_REQUEST, "peers must be a list of node ids, or nil for all peers")
        out["peers"] = peers
    elif action == "drop":
        rate = req.get("rate")
        if type(rate) not in (int, float) or not 0 <= rate <= 1:
            raise RequestError(BAD_REQUEST, "rate must be a number from 0 to 1")
        out["rate"] = float(rate)
    elif action == "delay":
        ms = req.get("delay_ms")
        if type(ms) not in (int, float) or not 0 <= ms <= 60_000:
            raise RequestError(BAD_REQUEST, "delay_ms must be a number from 0 to 60000")
        out["delay_ms"] = float(ms)
    elif action == "drop_replies":
        count = req.get("count")
        if type(count) is not int or count < 0:
            raise RequestError(BAD_REQUEST, "count must be a non-negative integer")
        out["count"] = count
    return out


def _parse_member(req: dict, _limits: Limits) -> Request:
    """add_member, remove_member, promote_member, transfer_leader (docs/PROTOCOL.md, "Membership")."""
    op = req["op"]
    node_id = req.get("id")
    if not (node_id is None and op == "transfer_leader") and (type(node_id) is not int
                                                             or not 0 < node_id < 1 << 63):
        raise RequestError(BAD_REQUEST, f"{op} needs id, a node id from 1 to 2**63-1")
    out: dict[str, Any] = {"id": node_id}
    if op == "add_member":
        ip = req.get("ip")
        if not isinstance(ip, str) or not ip:
            raise RequestError(BAD_REQUEST, "add_member needs ip, the new node's address (text)")
        port = req.get("port")
        if type(port) is not int or not 0 < port < 65536:
            raise RequestError(BAD_REQUEST, "add_member needs port, its peer port (1..65535)")
        out.update(ip=ip, port=port)
        for name, default in (("client_port", port + 100), ("http_port", port + 200)):
            p = req.get(name, default)
            if p is None:
                p = default
            if type(p) is not int or not 0 < p < 65536:
                raise RequestError(BAD_REQUEST, f"{name} must be a port (1..65535), not {p!r:.40}")
            out[name] = p
        learner = req.get("learner", False)
        if type(learner) is not bool:
            raise RequestError(BAD_REQUEST, "learner must be true or false")
        out["learner"] = learner
    return Request(op, member=out)


def _lease_id(req: dict, name: str, optional: bool = False) -> int:
    v = req.get(name)
    if v is None and optional:
        return 0
    if type(v) is not int or not 0 < v < 1 << 63:
        raise RequestError(BAD_REQUEST, f"{req['op']} needs {name}, a lease id from 1 to 2**63-1")
    return v


def _parse_lease(req: dict, _limits: Limits) -> Request:
    op = req["op"]
    session = _parse_session(req)
    if op != "lease_grant":
        return Request(op, lease=_lease_id(req, "lease"), session=session)
    ttl = req.get("ttl")
    if type(ttl) is not int or not 0 < ttl <= 1 << 31:
        raise RequestError(BAD_REQUEST, "lease_grant needs ttl, a whole number of seconds from 1 to 2**31")
    return Request(op, ttl=ttl, lease=_lease_id(req, "id", optional=True), session=session)


def _flag(req: dict, name: str) -> bool:
    v = req.get(name, False)
    if v is None:
        return False
    if type(v) is not bool:
        raise RequestError(BAD_REQUEST, f"{name} must be true or false")
    return v


def _key_range(req: dict, limits: Limits) -> tuple[bytes, bytes | None]:
    """A range's ``prefix``, or ``start`` with an optional ``end`` (exclusive; without it, to the keyspace's
    end); a watch's ``key`` or ``prefix``."""


    names = ("key", "prefix") if req["op"] == "watch" else ("prefix", "start")
    given = [name for name in names if req.get(name) is not None]
    if len(given) != 1:
        raise RequestError(BAD_REQUEST, f"{req['op']} needs exactly one of {' or '.join(names)}")
    name = given[0]
    first = _as_bytes(req, name, limits.max_key_bytes)
    assert first is not None
    if name == "key":
        return first, first + b"\x00"
    if name == "prefix":
        return first, prefix_end(first)
    end = _as_bytes(req, "end", limits.max_key_bytes, nil_ok=True) if "end" in req else None
    return first, end


def _parse_range(req: dict, limits: Limits) -> Request:
    start, end = _key_range(req, limits)
    limit = req.get("limit", 0)
    if limit is None:
        limit = 0
    if type(limit) is not int or not 0 <= limit < 1 << 63:
        raise RequestError(BAD_REQUEST, "limit must be a non-negative integer (0: no limit)")
    return Request("range", start, end=end, limit=limit, keys_only=_flag(req, "keys_only"))


def _parse_watch(req: dict, limits: Limits) -> Request:
    start, end = _key_range(req, limits)
    rev = req.get("start_revision")
    if type(rev) is not int or not 0 <= rev < 1 << 63:
        raise RequestError(BAD_REQUEST, "watch needs start_revision, a non-negative integer")
    timeout = req.get("timeout", 30.0)
    if timeout is None:
        timeout = 30.0
    if type(timeout) not in (int, float) or not 0 <= timeout <= MAX_WATCH_TIMEOUT_S:
        raise RequestError(BAD_REQUEST, f"timeout must be a number of seconds from 0 to {MAX_WATCH_TIMEOUT_S:g}")
    return Request("watch", start, end=end, start_revision=rev, timeout=float(timeout))


def _parse_txn(req: dict, limits: Limits) -> Request:
    """txn: compares, then the success or the failure branch (put, delete, get and range maps)."""
    compares = req.get("compare", [])
    if compares is None:
        compares = []
    if not isinstance(compares, list) or len(compares) > MAX_TXN_OPS:
        raise RequestError(BAD_REQUEST, f"compare must be a list of at most {MAX_TXN_OPS} compares")
    cmps = [_parse_compare(c, limits) for c in compares]
    branches = []
    for name in ("success", "failure"):
        ops = req.get(name, [])
        if ops is None:
            ops = []
        if not isinstance(ops, list) or len(ops) > MAX_TXN_OPS:
            raise RequestError(BAD_REQUEST, f"{name} must be a list of at most {MAX_TXN_OPS} requests")
        branch = [_parse_txn_op(op, limits) for op in ops]
        written = [op[1] for op in branch if op[0] in (mvcc.PUT, mvcc.DELETE, mvcc.PUT_LEASE)]
        if len(set(written)) != len(written):
            raise RequestError(BAD_REQUEST, f"a key is written twice in {name} (etcd's rule: once per branch)")
        branches.append(branch)
    return Request("txn", txn=(cmps, branches[0], branches[1]), session=_parse_session(req))


def _parse_compare(c: Any, limits: Limits) -> list:
    if not (isinstance(c, list) and len(c) == 4):
        raise RequestError(BAD_REQUEST, "a compare is [key, target, cmp, operand]")
    key = c[0].encode() if isinstance(c[0], str) else c[0]
    if type(key) is not bytes or len(key) > limits.max_key_bytes:
        raise RequestError(BAD_REQUEST, "a compare's key must be bin or str within the key limit")
    if c[1] not in mvcc.TARGETS:
        raise RequestError(BAD_REQUEST, f"a compare's target must be one of {list(mvcc.TARGETS)}, not {c[1]!r:.40}")
    if c[2] not in mvcc.CMPS:
        raise RequestError(BAD_REQUEST, f"a compare's cmp must be one of {list(mvcc.CMPS)}, not {c[2]!r:.40}")
    target, cmp, operand = mvcc.TARGETS.index(c[1]), mvcc.CMPS.index(c[2]), c[3]
    if c[1] == "value":
        operand = operand.encode() if isinstance(operand, str) else operand
        if type(operand) is not bytes or len(operand) > limits.max_value_bytes:
            raise RequestError(BAD_REQUEST, "a value compare's operand must be bin or str within the value limit")
    elif c[1] == "exists":
        if type(operand) is not bool or cmp > 1:
            raise RequestError(BAD_REQUEST, "an exists compare takes == or != and true or false")
    elif type(operand) is not int or not 0 <= operand < 1 << 63:
        raise RequestError(BAD_REQUEST, f"a {c[1]} compare's operand must be a non-negative integer")
    return [key, target, cmp, operand]


def _parse_txn_op(op: Any, limits: Limits) -> list:
    """One request of a branch, in the state machine's command form (zraft.node.statemachine)."""
    if not isinstance(op, dict) or op.get("op") not in ("put", "delete", "get", "range"):
        raise RequestError(BAD_REQUEST, "a transaction's request is a map with op put, delete, get or range")
    kind = op["op"]
    if kind == "range":
        r = _parse_range(op, limits)
        return [mvcc.RANGE, r.key, r.end, r.limit, r.keys_only]
    key = _as_bytes(op, "key", limits.max_key_bytes)
    if kind == "put":
        lease = _lease_id(op, "lease", optional=True)
        value = _as_bytes(op, "value", limits.max_value_bytes)
        return [mvcc.PUT_LEASE, key, value, lease] if lease else [mvcc.PUT, key, value]
    return [mvcc.DELETE if kind == "delete" else mvcc.GET, key]


_PARSERS = {
    "members": _parse_admin,
    "add_member": _parse_member, "remove_member": _parse_member, "promote_member": _parse_member,
    "transfer_leader": _parse_member,
    "status": _parse_admin, "compact": _parse_admin, "snapshot": _parse_snapshot,
    "fault": lambda req, _limits: Request("fault", fault=_parse_fault(req)),
    "get": _parse_key_op, "put": _parse_key_op, "delete": _parse_key_op, "cas": _parse_key_op,
    "range": _parse_range, "txn": _parse_txn, "watch": _parse_watch,
    "lease_grant": _parse_lease, "lease_keepalive": _parse_lease, "lease_revoke": _parse_lease,
}
assert set(_PARSERS) == OPS, "every op has its parser"


def ok(**fields: Any) -> bytes:
    return msgpack.packb({"ok": True, **fields}, use_bin_type=True)


OK = ok()  # the reply to every put: encoded once


def log_span(status: dict[str, Any]) -> str:
    """The indexes a node's log holds, from its status reply: it begins after its last compaction."""
    if "last_index" not in status:
        return "-"
    return f"{status.get('snapshot_index', 0) + 1}..{status['last_index']}"


def commit_span(status: dict[str, Any]) -> str:
    """A node's commit index from its status reply, with the applied index beside it when that lags."""
    if "commit_index" not in status:
        return "-"
    commit, applied = status["commit_index"], status.get("applied_index", status["commit_index"])
    return str(commit) if applied == commit else f"{commit} ({applied})"


def error(code: str, message: str, **fields: Any) -> bytes:
    return msgpack.packb({"ok": False, "error": code, "message": message, **fields}, use_bin_type=True)
