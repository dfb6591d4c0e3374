"""Transactions, readable like etcd3's: compares, then the requests of one branch or the other.

    from zraft.client.txn import value, version, exists, put, delete, get, range_

    r = (client.txn()
         .when(value("config/mode") == "blue", version("config/mode") < 10)
         .then(put("config/mode", "green"), get("config/epoch"))
         .otherwise(get("config/mode"))
         .commit())
    r.succeeded, r.responses, r.revision

Everything in it is one entry of the log, applied at one revision: the compares see the state as
it is when the entry is applied, never an older one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zraft.client.client import Client

Key = bytes | str


def _b(v: Key) -> bytes:
    return v.encode() if isinstance(v, str) else v


class _Target:
    """One of a key's values to compare: ``value("k") == b"v"`` makes the wire's compare."""

    def __init__(self, key: Key, target: str) -> None:
        self.key, self.target = _b(key), target

    def _cmp(self, cmp: str, operand: Any) -> list:
        if self.target == "value" and isinstance(operand, str):
            operand = operand.encode()
        return [self.key, self.target, cmp, operand]

    def __eq__(self, operand: object) -> list:  # type: ignore[override]
        return self._cmp("==", operand)

    def __ne__(self, operand: object) -> list:  # type: ignore[override]
        return self._cmp("!=", operand)

    def __lt__(self, operand: Any) -> list:
        return self._cmp("<", operand)

    def __gt__(self, operand: Any) -> list:
        return self._cmp(">", operand)

    __hash__ = None  # type: ignore[assignment]


def value(key: Key) -> _Target:
    return _Target(key, "value")


def version(key: Key) -> _Target:
    return _Target(key, "version")


def create_revision(key: Key) -> _Target:
    return _Target(key, "create_revision")


def mod_revision(key: Key) -> _Target:
    return _Target(key, "mod_revision")


def exists(key: Key) -> list:
    """The key exists (``absent(key)`` for the opposite)."""
    return [_b(key), "exists", "==", True]


def absent(key: Key) -> list:
    return [_b(key), "exists", "==", False]


def put(key: Key, val: Key, lease: int | None = None) -> dict[str, Any]:
    req: dict[str, Any] = {"op": "put", "key": _b(key), "value": _b(val)}
    if lease:
        req["lease"] = lease
    return req


def delete(key: Key) -> dict[str, Any]:
    return {"op": "delete", "key": _b(key)}


def get(key: Key) -> dict[str, Any]:
    return {"op": "get", "key": _b(key)}


def range_(prefix: Key | None = None, start: Key | None = None, end: Key | None = None, limit: int = 0,
           keys_only: bool = False) -> dict[str, Any]:
    req: dict[str, Any] = {"op": "range", "limit": limit, "keys_only": keys_only}
    if prefix is not None:
        req["prefix"] = _b(prefix)
    else:
        req["start"] = _b(start if start is not None else b"")
        if end is not None:
            req["end"] = _b(end)
    return req


@dataclass
class TxnResult:
    succeeded: bool
    responses: list[dict[str, Any]]
    revision: int


@dataclass
class Txn:
    """A transaction being built; :meth:`commit` sends it (once: exactly-once with the client's session)."""

    client: Client
    compares: list[list] = field(default_factory=list)
    success: list[dict[str, Any]] = field(default_factory=list)
    failure: list[dict[str, Any]] = field(default_factory=list)

    def when(self, *compares: list) -> Txn:
        self.compares.extend(compares)
        return self

    def then(self, *ops: dict[str, Any]) -> Txn:
        self.success.extend(ops)
        return self

    def otherwise(self, *ops: dict[str, Any]) -> Txn:
        self.failure.extend(ops)
        return self

    def commit(self) -> TxnResult:
        rep = self.client.raw_txn(self.compares, self.success, self.failure)
        return TxnResult(rep["succeeded"], rep["responses"], rep["revision"])
