"""The zraft client library: leader discovery, redirects and honest retries.

    from zraft.client import Client
    with Client(["tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001"]) as c:
        c.put(b"foo", b"bar")
        c.get(b"foo")          # b"bar"

Requests go to the last known leader. A ``not_leader`` reply is followed to the hinted
leader; a node that can't be reached, or one that knows no leader, is skipped for the
next one, with backoff, until the deadline. Reads and anything that certainly did not
take effect are retried.

Writes are exactly-once by default: each carries the client's session (a random
``client_id`` and a sequence number, Raft thesis 6.3), so a write whose reply was lost
is retried safely: the cluster answers a duplicate from its session memory instead of
applying it twice. Without a session (``exactly_once=False``) a write whose outcome is
unknown (sent, but no reply, or a ``timeout`` reply) is never retried. Either way, a
write still unresolved at the deadline raises :class:`OutcomeUnknown`.

A Client keeps one ZeroMQ REQ socket per node, open across requests (relaxed and
correlated, so a request that got no reply never blocks the next one, and a late reply to
it is dropped). Close it (or use ``with``) to release them. Its writes are not thread-safe:
give each thread its own Client (a session is one sequence of requests, one at a time);
status and raw requests may be shared, one socket exchange at a time.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from zraft.client import protocol
from zraft.client.txn import Txn, range_
from zraft.node.mvcc import prefix_end

if TYPE_CHECKING:
    from zraft.client.lease import Lease
    from zraft.client.recipes import Election, Lock
    from zraft.client.watch import Watcher
    from zraft.cluster.keys import KeyRing

CONNECT_TIMEOUT_S = 0.3
# No attempt starts with less time than this left: a request sent with no real chance of a reply
# would turn a certain "did not take effect" (the not_leader answers so far) into "outcome unknown".
MIN_ATTEMPT_S = 0.02


class _NoKey(Exception):
    """With keys: the public key of the node at an endpoint is unknown (it cannot be checked)."""


class ZraftError(Exception):
    """A request failed. ``code`` is the protocol's error code (or ``unreachable``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class OutcomeUnknown(ZraftError):
    """A write was sent but its outcome is unknown: it may or may not have been applied."""


def _ms(seconds: float) -> int:
    """A poll timeout in whole milliseconds, rounded up (rounding down would make 0.4 ms a 0 ms poll)."""
    return max(0, math.ceil(seconds * 1000))


def _bytes(v: bytes | str) -> bytes:
    return v.encode() if isinstance(v, str) else v


@dataclass
class RangeResult:
    kvs: list[tuple[bytes, bytes | None, int]]  # (key, value or None with keys_only, mod_revision)
    more: bool  # more keys follow (past the limit, or past the node's reply size)
    revision: int  # the store's revision the range was read at


class Client:
    """A client of the cluster at ``endpoints``. ``keys``: a zraft.cluster.keys.KeyRing for a cluster
    run with keys (CURVE: authenticated and encrypted; each node's public key checks its endpoint)."""

    def __init__(self, endpoints: Iterable[str], timeout: float = 5.0, exactly_once: bool = True,
                 keys: KeyRing | None = None) -> None:
        self.endpoints = list(endpoints)
        self.keys = keys
        if not self.endpoints:
            raise ValueError("no endpoints")
        self.timeout = timeout
        self.exactly_once = exactly_once
        self.client_id = 0
        self.seq = 0
        if exactly_once:
            self._new_session()
        self.ctx = zmq.Context.instance()
        self.leader: str | None = None
        self._next = 0
        self._socks: dict[str, zmq.Socket] = {}
        self._lock = threading.Lock()  # one exchange at a time on the sockets

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for sock in self._socks.values():
                sock.close()
            self._socks.clear()

    # ------------------------------------------------------------------ operations

    def put(self, key: bytes | str, value: bytes | str, lease: int | None = None) -> int:
        """Set ``key`` (attached to ``lease``: it goes when the lease does); the revision of the write."""
        req: dict[str, Any] = {"op": "put", "key": _bytes(key), "value": _bytes(value)}
        if lease:
            req["lease"] = lease
        return self._call(req, write=True).get("revision", 0)

    # ------------------------------------------------------------------ leases (docs/PROTOCOL.md)

    def lease_grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds (by the leader's clock, renewed by keepalives); its id."""
        return self._call({"op": "lease_grant", "ttl": ttl}, write=True)["lease"]

    def lease_keepalive(self, lease: int) -> int:
        """Start the lease's TTL again; the TTL. ZraftError ``lease_not_found`` once it expired."""
        return self._call({"op": "lease_keepalive", "lease": lease}, write=True)["ttl"]

    def lease_revoke(self, lease: int) -> None:
        """End the lease now: its keys are deleted, at one revision."""
        self._call({"op": "lease_revoke", "lease": lease}, write=True)

    def lock(self, name: bytes | str, ttl: int = 10) -> Lock:
        """A fair distributed lock (zraft.client.recipes.Lock): ``with client.lock("name"): ...``."""
        from zraft.client.recipes import Lock

        return Lock(self, name, ttl)

    def election(self, name: bytes | str, ttl: int = 10) -> Election:
        """Leader election (zraft.client.recipes.Election): campaign, leader, observe, resign."""
        from zraft.client.recipes import Election

        return Election(self, name, ttl)

    def lease(self, ttl: int) -> Lease:
        """A lease kept alive in the background while the ``with`` block runs, revoked after it."""
        from zraft.client.lease import Lease

        return Lease(self, ttl)

    def get(self, key: bytes | str) -> bytes | None:
        return self._call({"op": "get", "key": _bytes(key)}, write=False)["value"]

    def get_meta(self, key: bytes | str) -> dict[str, Any]:
        """``value`` (None: no such key), ``revision`` (the store's), and for a key that exists its
        ``create_revision``, ``mod_revision``, ``version`` and ``lease``."""
        rep = self._call({"op": "get", "key": _bytes(key), "meta": True}, write=False)
        return {k: v for k, v in rep.items() if k not in ("ok", "id")}

    def range(self, prefix: bytes | str | None = None, start: bytes | str | None = None,
              end: bytes | str | None = None, limit: int = 0, keys_only: bool = False) -> RangeResult:
        """The keys under ``prefix``, or in [start, end) (no end: to the last key), in key order: at most
        ``limit`` (0: no limit; the node also cuts a reply at about its request size limit, with ``more``)."""
        rep = self._call(range_(prefix, start, end, limit, keys_only), write=False)
        return RangeResult([(k, v, rev) for k, v, rev in rep["kvs"]], rep["more"], rep["revision"])

    def range_pages(self, prefix: bytes | str, page: int = 1000, keys_only: bool = False) -> Iterator[RangeResult]:
        """Every key under ``prefix``, page after page (each page linearizable; together not one cut)."""
        start, end = _bytes(prefix), prefix_end(_bytes(prefix))
        while True:
            r = self.range(start=start, end=end, limit=page, keys_only=keys_only)
            yield r
            if not r.more or not r.kvs:
                return
            start = r.kvs[-1][0] + b"\x00"

    def range_all(self, prefix: bytes | str, page: int = 1000) -> Iterator[tuple[bytes, bytes, int]]:
        """Every key under ``prefix`` as (key, value, mod_revision), page by page (see range_pages)."""
        for r in self.range_pages(prefix, page):
            yield from r.kvs

    def txn(self) -> Txn:
        """A transaction to build and commit (zraft.client.txn)."""
        return Txn(self)

    def raw_txn(self, compare: list, success: list, failure: list) -> dict[str, Any]:
        return self._call({"op": "txn", "compare": compare, "success": success, "failure": failure}, write=True)

    def watch(self, key: bytes | str | None = None, prefix: bytes | str | None = None,
              start_revision: int | None = None, poll_s: float = 10.0) -> Watcher:
        """An iterator over the changes to ``key`` (or under ``prefix``) from ``start_revision`` on (None:
        from the next write), in revision order, none missed or repeated, resuming by itself across
        leader changes and lost connections (zraft.client.watch). Close it when done."""
        from zraft.client.watch import Watcher

        if start_revision is None:
            start_revision = self.get_meta(b"")["revision"] + 1
        return Watcher(self.endpoints, key, prefix, start_revision, poll_s, self.keys)

    def delete(self, key: bytes | str) -> bool:
        return self._call({"op": "delete", "key": _bytes(key)}, write=True)["deleted"]

    def cas(self, key: bytes | str, expect: bytes | str | None, value: bytes | str) -> tuple[bool, bytes | None]:
        """Set ``key`` to ``value`` if it holds ``expect`` (None: if absent). Returns (swapped, current value)."""
        rep = self._call({"op": "cas", "key": _bytes(key), "expect": None if expect is None else _bytes(expect),
                          "value": _bytes(value)}, write=True)
        return rep["swapped"], rep["value"]

    # ------------------------------------------------------------------ membership (docs/PROTOCOL.md)

    def members(self) -> dict[str, Any]:
        """The leader's membership reply (``leader``, ``members``: id, addresses, ``voter``, and how far behind)."""
        return self._call({"op": "members"}, write=False, leader_only=True)

    def change_members(self, op: str, node_id: int | None, **fields: Any) -> dict[str, Any]:
        """One membership request (``add_member``, ``remove_member``, ``promote_member``); the leader's
        whole reply (``members`` after the change, ``leader``). Sent as a write without a session: if it
        times out, whether it took effect is unknown (``members()`` tells)."""
        return self._call({"op": op, "id": node_id, **fields}, write=True, session=False)

    def add_member(self, node_id: int, ip: str, port: int, client_port: int | None = None,
                   http_port: int | None = None, learner: bool = False) -> list[dict[str, Any]]:
        """Add a member; returns once it is committed (without ``learner``: once the leader promoted it)."""
        return self.change_members("add_member", node_id, ip=ip, port=port, client_port=client_port,
                                   http_port=http_port, learner=learner)["members"]

    def remove_member(self, node_id: int) -> list[dict[str, Any]]:
        return self.change_members("remove_member", node_id)["members"]

    def promote_member(self, node_id: int) -> list[dict[str, Any]]:
        return self.change_members("promote_member", node_id)["members"]

    def transfer_leader(self, node_id: int | None = None) -> int:
        """Hand leadership to ``node_id`` (None: the most up-to-date voter); the new leader's id."""
        return self._call({"op": "transfer_leader", "id": node_id}, write=True, session=False)["leader"]

    def status(self, endpoint: str, timeout: float = 1.0) -> dict[str, Any] | None:
        """One node's status, or None if it does not answer within ``timeout``."""
        rep = self.request(endpoint, {"op": "status"}, timeout)
        return rep if rep and rep.get("ok") else None

    def statuses(self, timeout: float = 1.0) -> list[dict[str, Any] | None]:
        """Every endpoint's status, asked all at once; None for a node that does not answer in time (or,
        with keys, whose public key is unknown)."""
        frame = msgpack.packb({"op": "status"}, use_bin_type=True)
        socks: list[zmq.Socket | None] = []
        for ep in self.endpoints:
            try:
                server_key = self._server_key(ep)
            except _NoKey:  # it can't be asked
                socks.append(None)
                continue
            s = self.ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            if server_key is not None:
                self.keys.connect_to(s, server_key)
            s.connect(ep)
            s.send(frame)
            socks.append(s)
        asked = [s for s in socks if s is not None]
        poller = zmq.Poller()
        for s in asked:
            poller.register(s, zmq.POLLIN)
        out: dict[zmq.Socket, dict[str, Any] | None] = dict.fromkeys(asked)
        deadline = time.monotonic() + timeout
        try:
            pending = len(asked)
            while pending and (left := deadline - time.monotonic()) > 0:
                for s, _ in poller.poll(int(left * 1000) + 1):
                    rep = msgpack.unpackb(s.recv(), raw=False)
                    out[s] = rep if isinstance(rep, dict) and rep.get("ok") else None
                    poller.unregister(s)
                    pending -= 1
        finally:
            for s in asked:
                s.close()
        return [None if s is None else out[s] for s in socks]

    # ------------------------------------------------------------------ plumbing

    def request(self, endpoint: str, req: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """One raw request to one node; None if it can't be reached (or, with keys, its key is unknown)
        or does not answer in time."""
        try:
            _, rep = self._exchange(endpoint, msgpack.packb(req, use_bin_type=True), timeout)
        except _NoKey:
            return None
        return rep

    def _exchange(self, endpoint: str, frame: bytes, timeout: float) -> tuple[bool, dict[str, Any] | None]:
        """Returns (sent, reply). ``sent`` is False only when the node certainly never got the request."""
        with self._lock:
            sock = self._socks.get(endpoint)
            if sock is None:
                server_key = self._server_key(endpoint)  # (before anything is cached)
                sock = self._socks[endpoint] = self.ctx.socket(zmq.REQ)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a node we are not connected to
                sock.setsockopt(zmq.REQ_RELAXED, 1)  # a request without a reply does not block the next
                sock.setsockopt(zmq.REQ_CORRELATE, 1)  # ... and its late reply is dropped, not taken for ours
                if server_key is not None:
                    self.keys.connect_to(sock, server_key)
                sock.connect(endpoint)
            if not sock.poll(_ms(min(timeout, CONNECT_TIMEOUT_S)), zmq.POLLOUT):
                return False, None
            sock.send(frame)
            if not sock.poll(_ms(timeout)):
                return True, None
            rep = msgpack.unpackb(sock.recv(), raw=False)
        if self.keys is not None and isinstance(rep, dict):
            self._learn_members(rep)
        return True, rep

    def _server_key(self, endpoint: str) -> bytes | None:
        """With keys, the public key of the node at ``endpoint`` (_NoKey if unknown); None without."""
        if self.keys is None:
            return None
        try:
            return self.keys.server_key(endpoint)
        except ValueError as exc:  # KeysError (not imported here: the keys module loads zmq.auth)
            raise _NoKey(str(exc)) from None

    def _learn_members(self, rep: dict[str, Any]) -> None:
        """With keys: which node serves each client endpoint a reply names (members, a leader hint),
        so that a member added at runtime is checked with its own public key."""
        keys = self.keys
        assert keys is not None
        for m in rep.get("members") or ():
            if isinstance(m, dict) and isinstance(m.get("id"), int):
                keys.learn_member(m["id"], f"tcp://{m.get('ip')}:{m.get('client_port')}")
        hint, leader_id = rep.get("leader"), rep.get("leader_id")
        if isinstance(hint, str) and isinstance(leader_id, int):
            keys.learn_member(leader_id, hint)

    def _targets(self) -> str:
        if self.leader is not None:
            return self.leader
        ep = self.endpoints[self._next % len(self.endpoints)]
        self._next += 1
        return ep

    def _new_session(self) -> None:
        self.client_id = random.SystemRandom().randrange(1, 1 << 63)
        self.seq = 0

    def _call(self, req: dict[str, Any], write: bool, leader_only: bool = False,
              session: bool = True, attempt_timeout: float | None = None) -> dict[str, Any]:
        """One request until its answer or the deadline. ``write``: it changes something, so an attempt
        without an answer leaves the outcome unknown (with a session, it is retried exactly once)."""
        call = _Call(req, write, session=write and session and self.exactly_once,
                     deadline=time.monotonic() + self.timeout)
        if call.session:
            self.seq += 1
            call.encode(self.client_id, self.seq)
        else:
            call.encode()
        # A read, or a write with a session, that gets no answer is retried (a node that stopped with the
        # request unread never answers), so don't wait the whole deadline on one attempt.
        if attempt_timeout is None:
            attempt_timeout = max(1.0, self.timeout / 4) if call.session or not write else self.timeout
        while True:
            remaining = call.deadline - time.monotonic()
            if remaining < MIN_ATTEMPT_S:
                raise call.given_up(self.timeout)
            endpoint = self._targets()
            try:
                sent, rep = self._exchange(endpoint, call.frame, min(remaining, attempt_timeout))
            except _NoKey as exc:  # a leader hint to a node we have no public key for
                self.leader = None
                call.last_error = str(exc)
                call.pause()
                continue
            if rep is None:
                self.leader = None
                call.no_reply(endpoint, sent)
            elif rep.get("ok") is True:
                if leader_only and rep.get("leader") != rep.get("id"):
                    # Any node answers, from its latest configuration; the leader's is the one that counts.
                    leader = next((m for m in rep.get("members", []) if m.get("id") == rep.get("leader")), None)
                    self.leader = f"tcp://{leader['ip']}:{leader['client_port']}" if leader else None
                    call.last_error = f"{endpoint} is not the leader"
                    if self.leader is None or self.leader == endpoint:
                        self.leader = None
                        call.pause()
                    continue
                self.leader = endpoint
                return rep
            else:
                self._refused(call, endpoint, rep)

    def _refused(self, call: _Call, endpoint: str, rep: dict[str, Any]) -> None:
        """An error reply: retry (after a pause, elsewhere, in a new session) or raise."""
        code, message = rep.get("error", "?"), rep.get("message", "")
        call.last_error = f"{code} from {endpoint}: {message}"
        if code == protocol.SESSION_EXPIRED and call.session and not call.ambiguous:
            # Certainly not applied: the cluster forgot our session. Start a new one and resend.
            self._new_session()
            self.seq += 1
            call.encode(self.client_id, self.seq)
        elif code == protocol.NOT_LEADER:
            hint = rep.get("leader")
            self.leader = hint if hint and hint != endpoint else None
            if self.leader is None:  # no known leader (an election is on): wait a little
                call.pause()
        elif code == protocol.UNAVAILABLE:
            self.leader = None
            call.pause()
        elif code == protocol.BUSY:  # the leader is overloaded: the same node, a little later
            call.pause()
        elif code == protocol.TIMEOUT and call.write:
            call.ambiguous = True
            if not call.session:
                raise OutcomeUnknown(code, message)
        elif code == protocol.SESSION_EXPIRED:
            raise OutcomeUnknown(code, f"{message}; an earlier attempt of this write may have been applied")
        elif code != protocol.TIMEOUT:
            raise ZraftError(code, message)


@dataclass
class _Call:
    """One request's attempts until an answer or the deadline, and what is known of its outcome."""

    req: dict[str, Any]
    write: bool
    session: bool
    deadline: float
    frame: bytes = b""
    backoff: float = 0.02
    last_error: str = "no node answered"
    ambiguous: bool = False  # an attempt of this write may have been applied

    def encode(self, client_id: int | None = None, seq: int | None = None) -> None:
        req = self.req if client_id is None else {**self.req, "client_id": client_id, "seq": seq}
        self.frame = msgpack.packb(req, use_bin_type=True)

    def pause(self) -> None:
        time.sleep(min(self.backoff, max(0.0, self.deadline - time.monotonic())))
        self.backoff = min(self.backoff * 2, 0.5)

    def no_reply(self, endpoint: str, sent: bool) -> None:
        self.last_error = f"{endpoint} did not answer"
        if sent and self.write:
            self.ambiguous = True
            if not self.session:
                raise OutcomeUnknown(protocol.TIMEOUT, f"no reply from {endpoint}: the write may or may "
                                                       "not have been applied")

    def given_up(self, timeout: float) -> ZraftError:
        if self.ambiguous:
            return OutcomeUnknown(protocol.TIMEOUT, f"gave up after {timeout} s: {self.last_error}; the "
                                                    "write may or may not have been applied")
        return ZraftError(protocol.UNAVAILABLE, f"gave up after {timeout} s: {self.last_error}")
