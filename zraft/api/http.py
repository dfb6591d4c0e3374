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

It runs in its own threads (the standard library's ThreadingHTTPServer) and talks to the
node only through its client port, so the node's loop is the same with or without it.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import queue
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, unquote_to_bytes, urlsplit

from zraft.client import Client, OutcomeUnknown, ZraftError, protocol
from zraft.cluster.config import ClusterConfig, NodeAddress
from zraft.cluster.keys import HTTP_TOKEN_FILE, KeyRing, KeysError

log = logging.getLogger(__name__)

KV_PREFIX = "/v1/kv/"
POOL_SIZE = 8  # clients (and so sessions) at most; more concurrent requests wait for one
HEALTH_KEY = b"\x00zraft-health"  # read, never written: a linearizable read proves a working quorum

_ERROR_STATUS = {
    protocol.BAD_REQUEST: HTTPStatus.BAD_REQUEST,
    protocol.TOO_LARGE: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    protocol.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
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
            self.httpd = ThreadingHTTPServer((me.ip, me.http_port), _handler_for(self))
        except OSError as exc:
            raise OSError(exc.errno, f"HTTP port {me.http_port} on {me.ip}: {exc.strerror}") from None
        self.httpd.daemon_threads = True
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

    def do_GET(self) -> None:  # noqa: N802 - the standard library's naming
        path, _ = self._target()
        if not self._authorized(path):
            return
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
        if not self._authorized(self._target()[0]):
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
        if not self._authorized(self._target()[0]):
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
        length = self.headers.get("Content-Length")
        if length is None:
            self._error(HTTPStatus.LENGTH_REQUIRED, protocol.BAD_REQUEST, "the value goes in the body, with a "
                                                                          "Content-Length (curl --data-binary)")
            return None
        try:
            n = int(length)
        except ValueError:
            n = -1
        if n < 0:
            self._error(HTTPStatus.BAD_REQUEST, protocol.BAD_REQUEST, f"bad Content-Length {length!r}")
            return None
        if n > self.gateway.max_body_bytes:
            self.close_connection = True  # the body stays unread
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, protocol.TOO_LARGE,
                        f"value of {n} bytes; the limit is {self.gateway.max_body_bytes}")
            return None
        return self.rfile.read(n)

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
