"""The coordination API's HTTP routes (docs/PROTOCOL.md, "HTTP API"): range, txn, watch, leases.

    curl 'http://127.0.0.1:5100/v1/kv?prefix=config/'                 {"kvs": [...], "more": false, "revision": 9}
    curl -X POST --data '{"compare": [["k", "value", "==", "a"]], "success": [{"op": "put", "key": "k",
         "value": "b"}]}' http://127.0.0.1:5100/v1/txn                 {"succeeded": true, ...}
    curl -N 'http://127.0.0.1:5100/v1/watch?prefix=config/&start_revision=9'   (Server-Sent Events)
    curl -X POST --data '{"ttl": 10}' http://127.0.0.1:5100/v1/lease/grant      {"lease": 7..., "ttl": 10}

Keys and values in JSON bodies are text (UTF-8); in answers each comes as text (null when it is
not UTF-8) and as base64 (``key_base64``, ``value_base64``), as the key routes do. Everything goes
through the client library, like the other routes. A watch holds one of the gateway's workers for
as long as its stream is open (this server is thread-per-connection; issue 15 moves the API to an
ASGI server): at most ``MAX_STREAMS`` streams at once per node, past it 503 busy.
"""

from __future__ import annotations

import base64
import json
import threading
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_to_bytes

from zraft.client import Client, ZraftError, protocol
from zraft.client.watch import Watcher

MAX_STREAMS = 32  # watch streams open at once through one node's gateway (each holds a worker)
STREAM_POLL_S = 5.0  # a stream's long polls; a comment line goes out after each empty one (a dead client shows)
_LEASE_ROUTES = {"/v1/lease/grant": "ttl", "/v1/lease/keepalive": "lease", "/v1/lease/revoke": "lease"}


class Invalid(Exception):
    """A request refused as sent (400 bad_request, with this message)."""


def text_fields(name: str, data: bytes | None) -> dict[str, Any]:
    """Bytes in JSON: as text when they are UTF-8, and always as base64."""
    if data is None:
        return {name: None, f"{name}_base64": None}
    try:
        text: str | None = data.decode()
    except UnicodeDecodeError:
        text = None
    return {name: text, f"{name}_base64": base64.b64encode(data).decode()}


def kv_json(kv: list | tuple) -> dict[str, Any]:
    key, value, rev = kv
    return {**text_fields("key", key), **text_fields("value", value), "mod_revision": rev}


def reply_json(rep: dict[str, Any]) -> dict[str, Any]:
    """A wire reply (a txn's response, a watch event) with its bytes made JSON."""
    out: dict[str, Any] = {}
    for name, v in rep.items():
        if name == "kvs":
            out["kvs"] = [kv_json(kv) for kv in v]
        elif name in ("key", "value"):
            out.update(text_fields(name, v))
        elif name != "ok":
            out[name] = v
    return out


class CoordinationRoutes:
    """Mixed into the gateway's request handler (zraft.api.http), which provides the helpers used here."""

    _streams = threading.BoundedSemaphore(MAX_STREAMS)

    def _coordination(self, path: str) -> bool:
        """Serve ``path`` if it is one of these routes (True, once answered)."""
        route = {"/v1/kv": ("GET", self._range), "/v1/txn": ("POST", self._txn),
                 "/v1/watch": ("GET", self._watch)}.get(path)
        if route is None and path in _LEASE_ROUTES:
            route = ("POST", self._lease)
        if route is None:
            return False
        method, serve = route
        if self.command != method and not (method == "POST" and self.command == "PUT"):
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed", f"{path} answers {method}",
                        allow=method)
            return True
        try:
            serve(path)
        except Invalid as exc:
            self._error(HTTPStatus.BAD_REQUEST, protocol.BAD_REQUEST, str(exc))
        return True

    # --- routes

    def _range(self, _path: str) -> None:
        q = self._query_bytes()
        limit = non_negative(q.get("limit", b"0"), "limit")
        keys_only = q.get("keys_only", b"0") not in (b"0", b"false", b"")
        if ("prefix" in q) == ("start" in q):
            raise Invalid("give ?prefix=P, or ?start=S (and &end=E)")
        self._with_client(lambda c: self._json(HTTPStatus.OK, self._range_json(c.range(
            prefix=q.get("prefix"), start=q.get("start"), end=q.get("end"), limit=limit, keys_only=keys_only))))

    @staticmethod
    def _range_json(r: Any) -> dict[str, Any]:
        return {"kvs": [kv_json(kv) for kv in r.kvs], "more": r.more, "revision": r.revision}

    def _txn(self, _path: str) -> None:
        body = self._json_object(frozenset({"compare", "success", "failure"}), required=True)

        def run(c: Client) -> None:
            rep = c.raw_txn(body.get("compare") or [], body.get("success") or [], body.get("failure") or [])
            self._json(HTTPStatus.OK, {"succeeded": rep["succeeded"], "revision": rep["revision"],
                                       "responses": [reply_json(r) for r in rep["responses"]]})

        self._with_client(run)

    def _lease(self, path: str) -> None:
        field = _LEASE_ROUTES[path]
        body = self._json_object(frozenset({field}), required=True)
        n = body.get(field)
        if type(n) is not int or n <= 0:
            raise Invalid(f"{field} must be a positive integer")
        if path.endswith("grant"):
            self._with_client(lambda c: self._json(HTTPStatus.OK, {"lease": c.lease_grant(n), "ttl": n}))
        elif path.endswith("keepalive"):
            self._with_client(lambda c: self._json(HTTPStatus.OK, {"lease": n, "ttl": c.lease_keepalive(n)}))
        else:
            self._with_client(lambda c: (c.lease_revoke(n), self._json(HTTPStatus.OK, {"ok": True})))

    def _watch(self, _path: str) -> None:
        """Server-Sent Events: one ``event: put|delete`` with ``id: REVISION`` and a JSON ``data:`` line per
        change, from ``start_revision`` (default: the next write) until the client goes (or ``timeout``)."""
        q = self._query_bytes()
        if ("key" in q) == ("prefix" in q):
            raise Invalid("give ?key=K or ?prefix=P")
        start = non_negative(q["start_revision"], "start_revision") if "start_revision" in q else None
        timeout = non_negative(q.get("timeout", b"0"), "timeout")
        if not self._streams.acquire(blocking=False):
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, protocol.BUSY, f"{MAX_STREAMS} watch streams are open "
                                                                       "through this node; retry later")
            return
        try:
            self._stream(q.get("key"), q.get("prefix"), start, timeout)
        finally:
            self._streams.release()

    def _stream(self, key: bytes | None, prefix: bytes | None, start: int | None, timeout: int) -> None:
        import time

        gw = self.gateway
        client = gw.client()
        try:
            if start is None:
                start = client.get_meta(b"")["revision"] + 1
            endpoints, keys = client.endpoints, client.keys
        except ZraftError as exc:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, exc.code, str(exc))
            return
        finally:
            gw.release(client)
        self.close_connection = True  # the stream's end is the connection's
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        ends = time.monotonic() + timeout if timeout else None
        with Watcher(endpoints, key, prefix, start, STREAM_POLL_S, keys) as w:
            try:
                while ends is None or time.monotonic() < ends:
                    events = w.poll()
                    out = b"".join(b"event: %s\nid: %d\ndata: %s\n\n" % (
                        ev["type"].encode(), ev["revision"], json.dumps(reply_json(ev)).encode()) for ev in events)
                    self.wfile.write(out or b": no change up to revision %d\n\n" % (w.next_revision - 1))
                    self.wfile.flush()
            except ZraftError as exc:  # compacted: the stream ends with it
                self.wfile.write(b"event: error\ndata: %s\n\n" % json.dumps(
                    {"error": exc.code, "message": exc.message}).encode())
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                return  # the client went away

    def _query_bytes(self) -> dict[str, bytes]:
        return {name: unquote_to_bytes(raw) for name, raw in self._target()[1].items()}


def non_negative(raw: bytes, name: str) -> int:
    """A query parameter that must be an integer from 0 to 2**63-1 (Invalid otherwise)."""
    if not raw.isdigit() or len(raw) > 19 or int(raw) >= 1 << 63:
        raise Invalid(f"{name} must be an integer from 0 to 2**63-1")
    return int(raw)
