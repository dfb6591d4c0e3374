"""The HTTP API each node serves on its ``http_port``: keys, status and health for curl.

    curl -X PUT --data-binary bar http://127.0.0.1:5100/v1/kv/foo      {"ok": true, "revision": 2}
    curl http://127.0.0.1:5100/v1/kv/foo                              bar
    curl -X DELETE http://127.0.0.1:5100/v1/kv/foo                    {"deleted": true}
    curl http://127.0.0.1:5100/health                                 {"health": true, ...}
    curl http://127.0.0.1:5100/v1/members                             {"leader": 1, "members": [...]}
    curl -X POST --data '{"id": 4, "ip": "127.0.0.1", "port": 5003}' http://127.0.0.1:5100/v1/members

Membership requests (/v1/members, /v1/leader, the original project's /AddVoter/IP:PORT/ID) go
through the same client library (``add_member`` and the rest), on clients of their own with a
generous deadline (MEMBER_TIMEOUT_S: a new member catches up before it is promoted), at most
MEMBER_REQUESTS at once, so they neither starve the key routes of pooled clients nor hold many
workers.

Any node answers: the gateway is a client of the whole cluster (``zraft.client.Client``,
this node's own endpoint first), so a request to a follower is carried to the leader and
gets the same guarantees as the wire protocol: a write is acknowledged once committed on a
majority and applied, a get is linearizable, and writes are exactly-once (each pooled
client holds a session). docs/PROTOCOL.md lists every route and status code.

It runs in its own threads and talks to the node only through its client port, so the node's
loop is the same with or without it. The standard library's HTTP parser is used on a
bounded worker pool, with the framing checked strictly before any route runs: one exact
Content-Length (digits only), no Transfer-Encoding, a declared body always read whole (or
the connection closed), so that no byte of a body is ever taken for a request; a short body
is a 400 and stores nothing. Connections beyond the pool wait in a real listen backlog;
an idle or stalled connection is closed after IDLE_TIMEOUT_S.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import queue
import re
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import unquote, unquote_to_bytes, urlsplit

from zraft.api.coordination import CoordinationRoutes, text_fields
from zraft.api.coordination import Invalid as _Invalid
from zraft.api.coordination import non_negative as _int
from zraft.client import Client, OutcomeUnknown, ZraftError, protocol
from zraft.cluster.config import ClusterConfig, NodeAddress
from zraft.cluster.keys import HTTP_TOKEN_FILE, KeyRing, KeysError

log = logging.getLogger(__name__)

KV_PREFIX = "/v1/kv/"
POOL_SIZE = 8  # clients (and so sessions) at most; more concurrent requests wait for one
HEALTH_KEY = b"\x00zraft-health"  # read, never written: a linearizable read proves a working quorum
WORKERS = 64  # connections served at once, each by one thread
MAX_WAITING = 1024  # accepted connections waiting for a worker; past it, a 503 at once
IDLE_TIMEOUT_S = 5.0  # a connection silent this long (idle keep-alive, or a request or body stalled) is closed
MAX_HEAD_BYTES = 64 << 10  # a request line and headers together
MIN_BODY_BYTES_PER_S = 64 << 10  # a body must arrive within IDLE_TIMEOUT_S + its size at this rate
_RECHECK_S = 0.05  # how soon a connection whose head is incomplete is looked at again
_DIGITS = re.compile(r"[0-9]{1,19}")

LEADER_PATH = "/v1/leader"
MEMBER_TIMEOUT_S = 60.0  # a membership request's deadline: a new member may need a while to catch up
MEMBER_REQUESTS = 4  # membership requests served at once through one gateway; past it, 503 busy
MAX_MEMBER_BODY_BYTES = 4096  # a membership request's JSON body
MAX_NODE_ID = (1 << 63) - 1
# The membership routes: /v1/members, /v1/members/ID (id), /v1/members/ID/promote (id, promote), /v1/leader,
# /AddVoter/IP:PORT/ID (addr, voter); matched against the path as sent (still percent-encoded).
_MEMBER_ROUTES = re.compile(r"/v1/members(?:/(?P<id>[^/]*)(?P<promote>/promote)?)?|/v1/leader"
                            r"|/AddVoter/(?P<addr>[^/]*)/(?P<voter>[^/]*)")
_MEMBER_METHODS = {  # route -> the methods it answers
    "members": ("GET", "POST"), "member": ("DELETE",), "promote": ("POST",), "leader": ("POST",),
    "add_voter": ("GET", "POST"),
}
_ADD_FIELDS = frozenset({"id", "ip", "port", "client_port", "http_port", "learner"})

_ERROR_STATUS = {
    protocol.BAD_REQUEST: HTTPStatus.BAD_REQUEST,
    protocol.TOO_LARGE: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    protocol.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    protocol.BUSY: HTTPStatus.SERVICE_UNAVAILABLE,
    protocol.TIMEOUT: HTTPStatus.GATEWAY_TIMEOUT,
    protocol.IN_PROGRESS: HTTPStatus.CONFLICT,  # another membership change is not committed yet
    protocol.NOT_LEADER: HTTPStatus.SERVICE_UNAVAILABLE,  # a membership change lost with its leader
    protocol.COMPACTED: HTTPStatus.GONE,  # a watch from a revision the history no longer holds
    protocol.LEASE_NOT_FOUND: HTTPStatus.NOT_FOUND,
}


def _cluster_nodes(client: Client, me: str) -> list[dict[str, Any]]:
    """Every member's status (the members this node knows of, Config.txt's nodes if it cannot say)."""
    rep = client.request(me, {"op": "members"}, 2.0)
    eps = client.endpoints
    if rep and rep.get("ok") and rep.get("members"):
        eps = [f"tcp://{m['ip']}:{m['client_port']}" for m in rep["members"]]
    with Client(eps, keys=client.keys) as every:
        return [{"endpoint": ep, "answers": st is not None, **(st or {})}
                for ep, st in zip(eps, every.statuses(), strict=True)]


class HttpGateway:
    """The HTTP server of one node, serving in background threads until ``close()``."""

    def __init__(self, cluster: ClusterConfig, me: NodeAddress, timeout_s: float, max_body_bytes: int,
                 keys: KeyRing | None = None) -> None:
        endpoints = [me.client_endpoint] + [n.client_endpoint for n in cluster.nodes if n.id != me.id]
        self.me = me
        self.keys = keys  # with keys: the gateway is a client with this node's key; requests need the token
        self.token = keys.http_token if keys is not None else None
        if keys is not None and not self.token:
            raise KeysError(f"no {HTTP_TOKEN_FILE} in {keys.directory}: the HTTP API needs one with keys on")
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        self._endpoints = endpoints
        self._pool: queue.LifoQueue[Client] = queue.LifoQueue()
        self._made = 0
        self._member_clients: list[Client] = []  # idle clients of membership requests
        self._member_made = 0
        self._lock = threading.Lock()
        try:
            self.httpd = _PooledServer((me.ip, me.http_port), _handler_for(self))
        except OSError as exc:
            raise OSError(exc.errno, f"HTTP port {me.http_port} on {me.ip}: {exc.strerror}") from None
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="zraft-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def client(self) -> Client:
        """A client from the pool (made on demand, at most POOL_SIZE); give it back with ``release``."""
        with self._lock:
            if self._pool.empty() and self._made < POOL_SIZE:
                self._made += 1
                return Client(self._endpoints, timeout=self.timeout_s, keys=self.keys)
        return self._pool.get()

    def release(self, client: Client) -> None:
        self._pool.put(client)

    def member_client(self) -> Client | None:
        """A client for one membership request (deadline MEMBER_TIMEOUT_S), or None when MEMBER_REQUESTS
        are being served already; give it back with ``release_member``."""
        with self._lock:
            if self._member_clients:
                return self._member_clients.pop()
            if self._member_made < MEMBER_REQUESTS:
                self._member_made += 1
                # No session: the client sends membership changes without one anyway.
                return Client(self._endpoints, timeout=MEMBER_TIMEOUT_S, exactly_once=False, keys=self.keys)
        return None

    def release_member(self, client: Client) -> None:
        with self._lock:
            self._member_clients.append(client)


def _canned(status: str, code: str, message: str) -> bytes:
    """A whole HTTP response with a JSON error body, for answers sent before any handler runs."""
    body = json.dumps({"error": code, "message": message}).encode() + b"\n"
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


_OVERLOADED = _canned("503 Service Unavailable", protocol.BUSY, "too many HTTP connections; retry in a moment")
_HEAD_TOO_LARGE = _canned("431 Request Header Fields Too Large", protocol.BAD_REQUEST,
                          f"the request line and headers exceed {MAX_HEAD_BYTES} bytes")


class _PooledServer(HTTPServer):
    """An HTTPServer whose connections are served by a fixed pool of WORKERS threads (the standard
    library's ThreadingHTTPServer starts one thread per connection, without bound), with a listen
    backlog of SOMAXCONN rather than 5.

    A connection gets a worker only once its first request's head has arrived whole (seen with
    MSG_PEEK, so the worker reads it as usual): until then it costs a file descriptor and nothing
    else, and one that has not sent its head within IDLE_TIMEOUT_S is closed. So idle or half-sent
    connections cannot hold the workers. Past WORKERS + MAX_WAITING open connections, a new one is
    answered 503 at once. While some wait for a worker, a worker closes its connection after the
    current response rather than keep it alive."""

    request_queue_size = socket.SOMAXCONN
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="zraft-http")  # first: a failed bind closes it
        super().__init__(address, handler)
        self._lock = threading.Lock()
        self._queued = 0  # handed to the pool, not yet taken by a worker
        self._open = 0  # handed to the pool, not yet closed
        self._selector = selectors.DefaultSelector()
        self._heading: dict[socket.socket, tuple[Any, float]] = {}  # head not yet whole: (address, deadline)
        self._parked: dict[socket.socket, float] = {}  # looked at, incomplete: out of the selector until then
        self._stop = threading.Event()
        self._stopped = threading.Event()

    def crowded(self) -> bool:
        return self._queued > 0

    # ---------------------------------------------------------------- the accepting thread

    def serve_forever(self, poll_interval: float = 0.25) -> None:
        self.socket.setblocking(False)
        self._selector.register(self.socket, selectors.EVENT_READ)
        next_sweep = 0.0
        try:
            while not self._stop.is_set():
                for key, _ in self._selector.select(_RECHECK_S if self._heading else poll_interval):
                    if key.fileobj is self.socket:
                        self._accept_all()
                    else:
                        self._look(key.fileobj)  # type: ignore[arg-type]
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + _RECHECK_S
        finally:
            for conn in list(self._heading):
                self._drop(conn)
            self._selector.close()
            self._stopped.set()

    def shutdown(self) -> None:
        self._stop.set()
        self._stopped.wait()

    def _accept_all(self) -> None:
        while True:
            try:
                conn, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, most likely: the listener is kept
                log.warning("http: accept failed: %s", exc)
                return
            if len(self._heading) + self._open >= WORKERS + MAX_WAITING:
                _answer_and_close(conn, _OVERLOADED)
                continue
            conn.setblocking(False)
            self._heading[conn] = (address, time.monotonic() + IDLE_TIMEOUT_S)
            self._selector.register(conn, selectors.EVENT_READ)

    def _look(self, conn: socket.socket) -> None:
        """Data arrived on a connection whose head is not whole yet: hand it over once it is."""
        try:
            head = conn.recv(MAX_HEAD_BYTES + 4, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            head = b""
        if not head:  # the client went away
            self._drop(conn)
            return
        self._selector.unregister(conn)
        if b"\r\n\r\n" in head or b"\n\n" in head:
            address, _ = self._heading.pop(conn)
            conn.setblocking(True)
            self._hand_over(conn, address)
        elif len(head) > MAX_HEAD_BYTES:
            self._heading.pop(conn)
            _answer_and_close(conn, _HEAD_TOO_LARGE)
        else:  # level-triggered: look again a little later, not at once (no busy loop)
            self._parked[conn] = time.monotonic() + _RECHECK_S

    def _sweep(self, now: float) -> None:
        for conn, wake in list(self._parked.items()):
            if wake <= now:
                del self._parked[conn]
                self._selector.register(conn, selectors.EVENT_READ)
        for conn, (_, deadline) in list(self._heading.items()):
            if deadline <= now:
                self._drop(conn)  # its head did not arrive in time

    def _drop(self, conn: socket.socket) -> None:
        self._heading.pop(conn, None)
        if self._parked.pop(conn, None) is None:
            try:
                self._selector.unregister(conn)
            except (KeyError, ValueError):
                pass
        conn.close()

    # ---------------------------------------------------------------- the workers

    def _hand_over(self, request: socket.socket, client_address: Any) -> None:
        with self._lock:
            self._open += 1
            self._queued += 1
        self._pool.submit(self._serve, request, client_address)

    def _serve(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._queued -= 1
        try:
            self.finish_request(request, client_address)
        except OSError as exc:  # a client gone, or not reading its answer within IDLE_TIMEOUT_S
            log.debug("http: connection from %s ended: %s", client_address, exc)
        except Exception:  # noqa: BLE001 - one connection's failure is logged, the server goes on
            log.exception("http: serving %s failed", client_address)
        finally:
            self.shutdown_request(request)
            with self._lock:
                self._open -= 1

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _answer_and_close(conn: socket.socket, response: bytes) -> None:
    try:
        conn.settimeout(1.0)
        conn.sendall(response)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    conn.close()


def _handler_for(gw: HttpGateway) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        gateway = gw

    return Handler


class _Handler(CoordinationRoutes, BaseHTTPRequestHandler):
    gateway: HttpGateway
    server_version = "zraft"
    protocol_version = "HTTP/1.1"  # keep-alive: curl and load tools reuse the connection
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle holds the body back
    # until the client's delayed ACK (40 ms per request on a kept-alive connection).
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT_S  # on the connection's socket: every read waits at most this long
    body = b""  # the request's body, read whole by _begin before any route runs
    _connection_sent = False  # this response has a Connection header already

    # ------------------------------------------------------------------ routes

    def _authorized(self, path: str) -> bool:
        """With keys, every route but /health needs ``Authorization: Bearer <DIR/http.token>``."""
        token = self.gateway.token
        if token is None or path == "/health":
            return True
        given = self.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return True
        self.close_connection = True  # a body sent with it stays unread: never take it for a request
        self._error(HTTPStatus.UNAUTHORIZED, "unauthorized", "this API needs Authorization: Bearer <token> "
                                                            "(the token is in the keys directory, http.token)")
        return False

    def _begin(self) -> bool:
        """Check the request's framing, its authorization, then read its declared body whole (a GET
        or DELETE body too, and ignored: never left to be read as the next request). False once an
        error has been sent (and the connection marked to close if any of the body is unread)."""
        declared = self._declared_length()
        if declared is None:
            return False
        path = self._target()[0]
        if not self._authorized(path):
            return False
        membership = _MEMBER_ROUTES.fullmatch(path) is not None
        limit = MAX_MEMBER_BODY_BYTES if membership else self.gateway.max_body_bytes
        if declared > limit:
            self.close_connection = True  # the body stays unread
            what = "a membership request's body" if membership else "value"
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, protocol.TOO_LARGE,
                        f"{what} of {declared} bytes; the limit is {limit}")
            return False
        try:
            self.body = self._read_body(declared)
        except TimeoutError:
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_TIMEOUT, protocol.BAD_REQUEST,
                        f"the body of {declared} bytes did not arrive in time; nothing was stored")
            return False
        if len(self.body) < declared:
            self.close_connection = True
            self._error(HTTPStatus.BAD_REQUEST, protocol.BAD_REQUEST,
                        f"the body ended after {len(self.body)} of its {declared} bytes (Content-Length); "
                        "nothing was stored")
            return False
        return True

    def _read_body(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer if the client closes), within a deadline for the whole body, so a
        trickling client cannot hold a worker for long; TimeoutError past it."""
        deadline = time.monotonic() + IDLE_TIMEOUT_S + n / MIN_BODY_BYTES_PER_S
        parts: list[bytes] = []
        got = 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.connection.settimeout(min(IDLE_TIMEOUT_S, left))
            chunk = self.rfile.read1(min(n - got, 1 << 16))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        self.connection.settimeout(IDLE_TIMEOUT_S)
        return b"".join(parts)

    def _declared_length(self) -> int | None:
        """The body's length from its one Content-Length (0 without one); None once a 400 or 411 is sent.
        Anything ambiguous closes the connection: where its body ends is unknown."""
        if self.headers.get_all("Transfer-Encoding"):
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, protocol.BAD_REQUEST,
                        "Transfer-Encoding is not supported: send the body with a Content-Length "
                        "(curl --data-binary)")
            return None
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return 0
        if len(lengths) > 1:
            self.close_connection = True
            self._error(HTTPStatus.BAD_REQUEST, protocol.BAD_REQUEST,
                        f"{len(lengths)} Content-Length headers; give exactly one")
            return None
        text = lengths[0].strip(" \t")
        if not _DIGITS.fullmatch(text):
            self.close_connection = True
            self._error(HTTPStatus.BAD_REQUEST, protocol.BAD_REQUEST,
                        f"bad Content-Length {lengths[0]!r}: digits only")
            return None
        return int(text)

    def do_GET(self) -> None:  # noqa: N802 - the standard library's naming
        if not self._begin():
            return
        path, _ = self._target()
        if self._membership(path) or self._coordination(path):
            return
        if path.startswith(KV_PREFIX):
            target = self._kv_target()
            if target is not None:
                key, query = target
                if "meta" in query:
                    self._with_client(lambda c: self._json(HTTPStatus.OK, _meta_json(c.get_meta(key))))
                else:
                    self._with_client(lambda c: self._send_value(c.get(key)))
        elif path == "/v1/status":
            self._with_client(self._status)
        elif path == "/v1/cluster":
            self._with_client(lambda c: self._json(HTTPStatus.OK, {"nodes": _cluster_nodes(
                c, self.gateway.me.client_endpoint)}))
        elif path == "/health":
            self._with_client(self._health)
        else:
            self._not_found(path)

    def do_PUT(self) -> None:  # noqa: N802
        if self._begin() and not self._membership(self._target()[0]) and not self._coordination(self._target()[0]):
            self._kv_put()

    def do_POST(self) -> None:  # noqa: N802
        self.do_PUT()

    def do_DELETE(self) -> None:  # noqa: N802
        if not self._begin() or self._membership(self._target()[0]):
            return
        target = self._kv_target()
        if target is not None:
            key = target[0]
            self._with_client(lambda c: self._json(HTTPStatus.OK, {"deleted": c.delete(key)}))

    def _kv_put(self) -> None:
        """PUT or POST /v1/kv/KEY: a put, or with ?expect= or ?absent a compare-and-swap."""
        target = self._kv_target()
        if target is None:
            return
        key, query = target
        if "expect" in query and "absent" in query:
            self._error(HTTPStatus.BAD_REQUEST, protocol.BAD_REQUEST, "give either ?expect=VALUE or ?absent")
            return
        value = self._body()
        if value is None:
            return
        if "expect" in query or "absent" in query:
            expect = unquote_to_bytes(query["expect"]) if "expect" in query else None
            self._with_client(lambda c: self._swapped(*c.cas(key, expect, value)))
            return
        try:
            lease = _int(query.get("lease", "0").encode(), "lease")
        except _Invalid:
            self._error(HTTPStatus.BAD_REQUEST, protocol.BAD_REQUEST, "?lease= takes a lease id (from /v1/lease/grant)")
            return
        self._with_client(lambda c: self._json(HTTPStatus.OK, {"ok": True, "revision": c.put(
            key, value, lease=lease or None)}))

    # ------------------------------------------------------------------ membership routes

    def _membership(self, path: str) -> bool:
        """Serve ``path`` if it is a membership route (True, once answered); False for the other routes."""
        m = _MEMBER_ROUTES.fullmatch(path)
        if m is None:
            return False
        if m["addr"] is not None:
            route = "add_voter"
        elif path == LEADER_PATH:
            route = "leader"
        elif m["id"] is None:
            route = "members"
        else:
            route = "promote" if m["promote"] else "member"
        allowed = _MEMBER_METHODS[route]
        if self.command not in allowed:
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed",
                        f"{path} answers {' and '.join(allowed)}, not {self.command}; see docs/PROTOCOL.md",
                        allow=", ".join(allowed))
            return True
        try:
            self._member_route(route, m)
        except _Invalid as exc:
            self._error(HTTPStatus.BAD_REQUEST, protocol.BAD_REQUEST, str(exc))
        return True

    def _member_route(self, route: str, m: re.Match[str]) -> None:
        """One membership request, validated here (raises _Invalid) and sent through the client library."""
        if route == "members" and self.command == "GET":
            self._with_client(self._members)
        elif route == "members":
            spec = _add_spec(self._json_object(_ADD_FIELDS, required=True))
            self._with_member_client(lambda c: self._json(HTTPStatus.OK, {"members": c.add_member(**spec)}))
        elif route == "member":
            node_id = _path_id(m["id"])
            self._with_member_client(lambda c: self._json(HTTPStatus.OK, {"members": c.remove_member(node_id)}))
        elif route == "promote":
            node_id = _path_id(m["id"])
            self._with_member_client(lambda c: self._json(HTTPStatus.OK, {"members": c.promote_member(node_id)}))
        elif route == "leader":
            target = self._json_object(frozenset({"id"}), required=False).get("id")
            target = None if target is None else _node_id(target, "id")
            self._with_member_client(lambda c: self._json(HTTPStatus.OK, {"leader": c.transfer_leader(target)}))
        else:  # /AddVoter/IP:PORT/ID: a voter with the default client and HTTP ports
            spec = _add_voter_spec(unquote(m["addr"]), m["voter"])
            self._with_member_client(lambda c: self._json(HTTPStatus.OK, {"members": c.add_member(**spec)}))

    def _members(self, client: Client) -> None:
        rep = client.members()
        self._json(HTTPStatus.OK, {"leader": rep.get("leader"), "members": rep.get("members", [])})

    def _json_object(self, fields: frozenset[str], required: bool) -> dict[str, Any]:
        """The body as a JSON object with no fields but ``fields``; an empty body is {} unless ``required``."""
        if not self.body.strip():
            if required:
                raise _Invalid(f"the body must be a JSON object with {', '.join(sorted(fields))}")
            return {}
        try:
            body = json.loads(self.body, object_pairs_hook=_no_duplicate_fields)
        except (ValueError, RecursionError) as exc:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            raise _Invalid(f"the body is not JSON: {str(exc):.200}") from None
        if not isinstance(body, dict):
            raise _Invalid(f"the body must be a JSON object, not {type(body).__name__}")
        unknown = sorted(set(body) - fields)
        if unknown:
            raise _Invalid(f"unknown field {unknown[0]!r:.60}: expected {', '.join(sorted(fields))}")
        return body

    # ------------------------------------------------------------------ helpers

    def _target(self) -> tuple[str, dict[str, str]]:
        """The path, and the query's parameters with their values still percent-encoded (they may be binary)."""
        parts = urlsplit(self.path)
        query = {}
        for item in parts.query.split("&") if parts.query else ():
            name, _, raw = item.partition("=")
            query[unquote(name)] = raw
        return parts.path, query

    def _kv_target(self) -> tuple[bytes, dict[str, str]] | None:
        """The key of a /v1/kv/KEY request and its query; None once an error has been sent."""
        path, query = self._target()
        if not path.startswith(KV_PREFIX):
            self._not_found(path)
            return None
        key = unquote_to_bytes(path[len(KV_PREFIX):])
        if not key:
            self._error(HTTPStatus.BAD_REQUEST, protocol.BAD_REQUEST, "no key: use /v1/kv/KEY")
            return None
        return key, query

    def _body(self) -> bytes | None:
        """A PUT's value: the body _begin read; None (and a 411 sent) when no Content-Length declared it."""
        if self.headers.get("Content-Length") is None:
            self._error(HTTPStatus.LENGTH_REQUIRED, protocol.BAD_REQUEST, "the value goes in the body, with a "
                                                                          "Content-Length (curl --data-binary)")
            return None
        return self.body

    def _with_client(self, op: Any) -> None:
        gw = self.gateway
        client = gw.client()
        try:
            self._answer(op, client)
        finally:
            gw.release(client)

    def _with_member_client(self, op: Any) -> None:
        """``op`` on a client of the membership requests (a long deadline), or 503 busy if all are in use."""
        gw = self.gateway
        client = gw.member_client()
        if client is None:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, protocol.BUSY, f"{MEMBER_REQUESTS} membership requests "
                                                                       "are under way through this node; retry later")
            return
        try:
            self._answer(op, client)
        finally:
            gw.release_member(client)

    def _answer(self, op: Any, client: Client) -> None:
        """``op(client)``, its errors answered with their codes."""
        try:
            op(client)
        except OutcomeUnknown as exc:
            self._error(HTTPStatus.GATEWAY_TIMEOUT, exc.code, str(exc))
        except ZraftError as exc:
            self._error(_ERROR_STATUS.get(exc.code, HTTPStatus.BAD_GATEWAY), exc.code, str(exc))

    def _own_status(self, client: Client) -> dict[str, Any] | None:
        """This node's status reply without its ``ok``, or None if its server does not answer."""
        st = client.status(self.gateway.me.client_endpoint)
        return None if st is None else {k: v for k, v in st.items() if k != "ok"}

    def _status(self, client: Client) -> None:
        st = self._own_status(client)
        if st is None:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, protocol.UNAVAILABLE, "this node's server does not answer")
        else:
            self._json(HTTPStatus.OK, st)

    def _health(self, client: Client) -> None:
        """Healthy: this node answers, knows a leader, and a linearizable read goes through in time."""
        st = self._own_status(client)
        if st is None or st.get("leader") is None:
            why = "this node does not answer" if st is None else "this node knows no leader"
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"health": False, "reason": why})
            return
        try:
            client.get(HEALTH_KEY)
        except ZraftError as exc:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"health": False, "reason": f"no quorum read: {exc}"})
            return
        self._json(HTTPStatus.OK, {"health": True, "id": st.get("id"), "role": st.get("role"),
                                   "leader": st.get("leader"), "term": st.get("term")})

    def _send_value(self, value: bytes | None) -> None:
        if value is None:
            self._error(HTTPStatus.NOT_FOUND, "not_found", "no such key")
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(value)))
        self.end_headers()
        self.wfile.write(value)

    def _swapped(self, swapped: bool, current: bytes | None) -> None:
        body: dict[str, Any] = {"swapped": swapped}
        if not swapped:
            body.update(text_fields("value", current))
        self._json(HTTPStatus.OK if swapped else HTTPStatus.PRECONDITION_FAILED, body)

    def _not_found(self, path: str) -> None:
        self._error(HTTPStatus.NOT_FOUND, "not_found", f"no route {self.command} {path}; see docs/PROTOCOL.md "
                                                       "(/v1/kv/KEY, /v1/kv?prefix=, /v1/txn, /v1/watch, "
                                                       "/v1/lease/..., /v1/status, /v1/cluster, /v1/members, "
                                                       "/v1/leader, /health)")

    def _error(self, status: HTTPStatus, code: str, message: str, allow: str | None = None) -> None:
        self._json(status, {"error": code, "message": message}, allow)

    def _json(self, status: HTTPStatus, body: dict[str, Any], allow: str | None = None) -> None:
        data = json.dumps(body).encode() + b"\n"
        self.send_response(status)
        if allow is not None:
            self.send_header("Allow", allow)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() == "connection":
            self._connection_sent = True
        super().send_header(keyword, value)

    def end_headers(self) -> None:
        """Say ``Connection: close`` whenever the connection will close: after a framing error (where
        the body ends is unknown) or while connections wait for a worker (give this one to them)."""
        if self.server.crowded():  # type: ignore[attr-defined]
            self.close_connection = True
        if self.close_connection and not self._connection_sent:
            self.send_header("Connection", "close")
        self._connection_sent = False
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the standard library's signature
        log.debug("http %s: " + format, self.address_string(), *args)


def _meta_json(rep: dict[str, Any]) -> dict[str, Any]:
    """GET /v1/kv/KEY?meta: the value (text and base64), the store's revision and the key's metadata."""
    return {**text_fields("value", rep.get("value")), **{k: v for k, v in rep.items() if k != "value"}}


def _no_duplicate_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise ValueError(f"the field {name!r:.60} is given twice")
        out[name] = value
    return out


def _node_id(value: Any, name: str) -> int:
    if type(value) is not int or not 0 < value <= MAX_NODE_ID:
        raise _Invalid(f"{name} must be a node id, an integer from 1 to 2**63-1, not {json.dumps(value):.60}")
    return value


def _path_id(text: str) -> int:
    """The node id in a path (/v1/members/ID, /AddVoter/IP:PORT/ID), percent-encoded or not."""
    text = unquote(text)
    if not _DIGITS.fullmatch(text) or not 0 < int(text) <= MAX_NODE_ID:
        raise _Invalid(f"bad node id {text!r:.60} in the path: an integer from 1 to 2**63-1")
    return int(text)


def _port(value: Any, name: str) -> int:
    if type(value) is not int or not 0 < value < 65536:
        raise _Invalid(f"{name} must be a port, an integer from 1 to 65535, not {json.dumps(value):.60}")
    return value


def _ip(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"ip must be the node's IPv4 or IPv6 address (text), not {json.dumps(value):.60}")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise _Invalid(f"ip must be an IPv4 or IPv6 address, not {value!r:.60}") from None
    return value


def _add_spec(body: dict[str, Any]) -> dict[str, Any]:
    """add_member's arguments from a POST /v1/members body; client_port and http_port default to port+100
    and port+200 (the node's own defaults), which must be ports too."""
    missing = [name for name in ("id", "ip", "port") if name not in body]
    if missing:
        raise _Invalid(f"missing {', '.join(missing)}: the body is {{\"id\", \"ip\", \"port\"}}, optional "
                       "\"client_port\", \"http_port\", \"learner\"")
    port = _port(body["port"], "port")
    spec: dict[str, Any] = {"node_id": _node_id(body["id"], "id"), "ip": _ip(body["ip"]), "port": port}
    for name, offset in (("client_port", 100), ("http_port", 200)):
        value = body.get(name)
        if value is None and port + offset > 65535:
            raise _Invalid(f"{name} defaults to port+{offset}, {port + offset}, which is no port: give {name}")
        spec[name] = None if value is None else _port(value, name)
    learner = body.get("learner", False)
    if type(learner) is not bool:
        raise _Invalid(f"learner must be true or false, not {json.dumps(learner):.60}")
    spec["learner"] = learner
    return spec


def _add_voter_spec(address: str, node_id: str) -> dict[str, Any]:
    """add_member's arguments from /AddVoter/IP:PORT/ID ([IPv6]:PORT too): a voter, default ports."""
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not _DIGITS.fullmatch(port_text):
        raise _Invalid(f"bad address {address!r:.60}: use /AddVoter/IP:PORT/ID, PORT the node's peer port")
    port = _port(int(port_text), "the peer port")
    if port + 200 > 65535:
        raise _Invalid(f"peer port {port}: its HTTP port would be port+200, {port + 200}; use POST /v1/members "
                       "with client_port and http_port")
    return {"node_id": _path_id(node_id), "ip": _ip(host), "port": port}
