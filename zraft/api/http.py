"""The HTTP API each node serves on its ``http_port``: keys, status and health for curl.

    curl -X PUT --data-binary bar http://127.0.0.1:5100/v1/kv/foo      {"ok": true}
    curl http://127.0.0.1:5100/v1/kv/foo                              bar
    curl -X DELETE http://127.0.0.1:5100/v1/kv/foo                    {"deleted": true}
    curl http://127.0.0.1:5100/health                                 {"health": true, ...}

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

import base64
import hmac
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

_ERROR_STATUS = {
    protocol.BAD_REQUEST: HTTPStatus.BAD_REQUEST,
    protocol.TOO_LARGE: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    protocol.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    protocol.BUSY: HTTPStatus.SERVICE_UNAVAILABLE,
    protocol.TIMEOUT: HTTPStatus.GATEWAY_TIMEOUT,
}


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


class _Handler(BaseHTTPRequestHandler):
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
        if not self._authorized(self._target()[0]):
            return False
        if declared > self.gateway.max_body_bytes:
            self.close_connection = True  # the body stays unread
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, protocol.TOO_LARGE,
                        f"value of {declared} bytes; the limit is {self.gateway.max_body_bytes}")
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
        if path.startswith(KV_PREFIX):
            target = self._kv_target()
            if target is not None:
                key = target[0]
                self._with_client(lambda c: self._send_value(c.get(key)))
        elif path == "/v1/status":
            self._with_client(self._status)
        elif path == "/v1/cluster":
            self._with_client(lambda c: self._json(HTTPStatus.OK, {"nodes": [
                {"endpoint": ep, "answers": st is not None, **(st or {})}
                for ep, st in zip(c.endpoints, c.statuses(), strict=True)]}))
        elif path == "/health":
            self._with_client(self._health)
        else:
            self._not_found(path)

    def do_PUT(self) -> None:  # noqa: N802
        if not self._begin():
            return
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
        else:
            self._with_client(lambda c: (c.put(key, value), self._json(HTTPStatus.OK, {"ok": True})))

    def do_POST(self) -> None:  # noqa: N802
        self.do_PUT()

    def do_DELETE(self) -> None:  # noqa: N802
        if not self._begin():
            return
        target = self._kv_target()
        if target is not None:
            key = target[0]
            self._with_client(lambda c: self._json(HTTPStatus.OK, {"deleted": c.delete(key)}))

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
            op(client)
        except OutcomeUnknown as exc:
            self._error(HTTPStatus.GATEWAY_TIMEOUT, exc.code, str(exc))
        except ZraftError as exc:
            self._error(_ERROR_STATUS.get(exc.code, HTTPStatus.BAD_GATEWAY), exc.code, str(exc))
        finally:
            gw.release(client)

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
            body.update(_value_fields(current))
        self._json(HTTPStatus.OK if swapped else HTTPStatus.PRECONDITION_FAILED, body)

    def _not_found(self, path: str) -> None:
        self._error(HTTPStatus.NOT_FOUND, "not_found", f"no route {self.command} {path}; see docs/PROTOCOL.md "
                                                       "(/v1/kv/KEY, /v1/status, /v1/cluster, /health)")

    def _error(self, status: HTTPStatus, code: str, message: str) -> None:
        self._json(status, {"error": code, "message": message})

    def _json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode() + b"\n"
        self.send_response(status)
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


def _value_fields(value: bytes | None) -> dict[str, Any]:
    """A value in JSON: as text when it is UTF-8, and always as base64 (values are bytes)."""
    if value is None:
        return {"value": None, "value_base64": None}
    try:
        text: str | None = value.decode()
    except UnicodeDecodeError:
        text = None
    return {"value": text, "value_base64": base64.b64encode(value).decode()}
