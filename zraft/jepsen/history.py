"""Operations of a recorded history: what a client asked, when, and what came back.

An :class:`Op` is one client operation on one key, with its invocation and completion
times (``time.monotonic()`` of the recording process) and its outcome:

* ``ok``: it took effect (writes) or returned what it returned (reads), exactly once,
  at some instant between invocation and completion;
* ``fail``: it certainly did not take effect (``not_leader``, ``unavailable``, ...);
* ``unknown``: it may have taken effect at any instant after its invocation, or never
  (no reply, or a ``timeout`` reply to a write). Its completion counts as +infinity.

Results (``result``) of ok operations, by kind:

======== ============================ =========================================
kind     arguments                    result
======== ============================ =========================================
put      ``value``                    None
get                                   the value read, None for "no such key"
cas      ``expect``, ``value`` (new)  ``(swapped, value after the operation)``
delete                                whether the key existed
======== ============================ =========================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

PUT, GET, CAS, DELETE = "put", "get", "cas", "delete"
KINDS = (PUT, GET, CAS, DELETE)
OK, FAIL, UNKNOWN = "ok", "fail", "unknown"
WRITES = frozenset({PUT, CAS, DELETE})


@dataclass(slots=True)
class Op:
    kind: str
    key: Any
    invoke: float
    complete: float = math.inf  # +inf for an unknown outcome
    status: str = OK
    value: Any = None  # put: the value written; cas: the new value
    expect: Any = None  # cas: the value it expects (None: absent)
    result: Any = None  # see the module docstring
    process: int = -1  # the client that ran it (for reports only)
    id: int = -1  # position in the whole history (for reports only)
    error: str | None = field(default=None)  # why it failed or is unknown (for reports only)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown op kind {self.kind!r}")
        if self.status not in (OK, FAIL, UNKNOWN):
            raise ValueError(f"unknown status {self.status!r}")
        if self.status == UNKNOWN:
            self.complete = math.inf
        if self.complete < self.invoke:
            raise ValueError(f"op completes ({self.complete}) before it is invoked ({self.invoke})")

    def describe(self, t0: float = 0.0) -> str:
        """One line: ``#12 c3 [1.234 -> 1.301] cas k1 'a' -> 'b' => (True, 'b') ok``."""
        end = "      ?" if math.isinf(self.complete) else f"{self.complete - t0:7.3f}"
        if self.kind == PUT:
            what = f"put {fmt(self.key)} {fmt(self.value)}"
        elif self.kind == GET:
            what = f"get {fmt(self.key)}"
        elif self.kind == CAS:
            what = f"cas {fmt(self.key)} {fmt(self.expect)} -> {fmt(self.value)}"
        else:
            what = f"delete {fmt(self.key)}"
        if self.status == OK:
            if self.kind == GET:
                what += f" => {fmt(self.result)}"
            elif self.kind == CAS:
                swapped, after = self.result
                what += f" => {'swapped' if swapped else 'not swapped'}, now {fmt(after)}"
            elif self.kind == DELETE:
                what += f" => {'existed' if self.result else 'did not exist'}"
        status = self.status + (f" ({self.error})" if self.error and self.status != OK else "")
        proc = f"c{self.process}" if self.process >= 0 else "  "
        return f"#{self.id:<5} {proc:>4} [{self.invoke - t0:7.3f} -> {end}] {what}  {status}"


def fmt(v: Any) -> str:
    """A value for humans: bytes shown as text when they are printable."""
    if v is None:
        return "nil"
    if isinstance(v, bytes):
        try:
            s = v.decode()
            if s.isprintable():
                return repr(s)
        except UnicodeDecodeError:
            pass
    return repr(v)


# ---------------------------------------------------------------------- saving and loading

def _enc(v: Any) -> Any:
    if isinstance(v, bytes):
        return {"b": v.decode("latin-1")}
    if isinstance(v, tuple | list):
        return [_enc(x) for x in v]
    return v


def _dec(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"b"}:
        return v["b"].encode("latin-1")
    if isinstance(v, list):
        return tuple(_dec(x) for x in v)
    return v


def dump_history(ops: list[Op], path: str) -> None:
    """Write a history as JSON lines, one op each, times at full precision."""
    import json

    with open(path, "w") as f:
        for op in ops:
            f.write(json.dumps({"id": op.id, "process": op.process, "kind": op.kind, "key": _enc(op.key),
                                "invoke": op.invoke, "complete": None if math.isinf(op.complete) else op.complete,
                                "status": op.status, "value": _enc(op.value), "expect": _enc(op.expect),
                                "result": _enc(op.result), "error": op.error}) + "\n")


def load_history(path: str) -> list[Op]:
    """Read a history written by :func:`dump_history`."""
    import json

    ops = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            d = json.loads(line)
            ops.append(Op(d["kind"], _dec(d["key"]), d["invoke"],
                          math.inf if d["complete"] is None else d["complete"], d["status"],
                          value=_dec(d["value"]), expect=_dec(d["expect"]), result=_dec(d["result"]),
                          process=d["process"], id=d["id"], error=d["error"]))
    return ops
