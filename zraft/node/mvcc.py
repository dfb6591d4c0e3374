"""Revisions, key metadata, watch events and transactions: the coordination API's records (etcd v3's model).

The store's **revision** starts at 1 (an empty store, as etcd's) and grows by one with each
committed entry that changes something: a put, a delete of a key that exists, a cas that swapped, a
transaction whose branch wrote. Every key carries a :class:`KeyMeta` (create_revision, mod_revision,
version, lease) in a table of its own beside the data (records of kind :data:`REC_KEYMETA`, same keys
as the data): a key without one was written before revisions existed and counts as created and
modified at revision 1, version 1.

Every change is also an **event** in a bounded history (kind :data:`REC_EVENT`, keyed by revision
and a sequence number within it), written in the same batch as the change, so that a watcher can
resume from any revision the history still holds, on any node. The store's :class:`StoreMeta`
(kind :data:`REC_META`) holds the revision and how far the history was trimmed.

**Leases** (kind :data:`REC_LEASE`: lease id -> its TTL) hold keys (kind :data:`REC_LEASE_KEY`:
lease id + key, the index of a lease's keys; the key's KeyMeta names its lease too). Granting,
keeping alive and revoking are log entries; a lease's deadline is the leader's business alone (by
its clock, never stored): when it passes, the leader proposes the revoke, and every replica
deletes the lease's keys at the same revision.

Everything here is pure: encodings and the evaluation of a transaction's compares.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

# Record kinds of the tables beside the data (zraft.node.statemachine has kinds 0-2).
REC_META, REC_EVENT, REC_KEYMETA, REC_LEASE, REC_LEASE_KEY = 3, 4, 5, 6, 7
MAX_TTL = 1 << 31  # seconds: a lease's TTL is 1..MAX_TTL
FIRST_REVISION = 1  # the revision of an empty store (etcd's)

_KEYMETA = struct.Struct(">QQQQ")
_EVENT_KEY = struct.Struct(">QI")

EVENT_PUT, EVENT_DELETE = 0, 1
EVENT_TYPES = ("put", "delete")

# The state machine's command codes (zraft.node.statemachine), here so that the wire protocol can build a
# transaction's requests in command form without importing the state machine.
PUT, DELETE, CAS, TXN = 1, 2, 3, 4
GET, RANGE = 5, 6  # (inside a transaction only)
LEASE_GRANT, LEASE_KEEPALIVE, LEASE_REVOKE, PUT_LEASE = 7, 8, 9, 10
MAX_TXN_OPS = 128  # compares, and requests in each branch, of one transaction (etcd's default)

# Transaction compares: targets and comparisons, as small ints in commands (names on the wire).
TARGETS = ("value", "version", "create_revision", "mod_revision", "exists")
CMPS = ("==", "!=", "<", ">")
TARGET_VALUE, TARGET_VERSION, TARGET_CREATE, TARGET_MOD, TARGET_EXISTS = range(5)


@dataclass(frozen=True, slots=True)
class KeyMeta:
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0

    def encode(self) -> bytes:
        return _KEYMETA.pack(self.create_revision, self.mod_revision, self.version, self.lease)

    @staticmethod
    def decode(raw: bytes) -> KeyMeta:
        if len(raw) != _KEYMETA.size:
            raise ValueError(f"a key's metadata is {_KEYMETA.size} bytes, not {len(raw)}")
        return KeyMeta(*_KEYMETA.unpack(raw))

    def fields(self) -> dict[str, int]:
        return {"create_revision": self.create_revision, "mod_revision": self.mod_revision,
                "version": self.version, "lease": self.lease}


LEGACY_META = KeyMeta(FIRST_REVISION, FIRST_REVISION, 1)  # a key written before revisions existed


@dataclass(slots=True)
class StoreMeta:
    """The store's revision, and the last revision whose events the history no longer holds."""

    revision: int = FIRST_REVISION
    compacted: int = 0

    def encode(self) -> bytes:
        return msgpack.packb([self.revision, self.compacted])

    @staticmethod
    def decode(raw: bytes | None) -> StoreMeta:
        if raw is None:
            return StoreMeta()
        try:
            revision, compacted = msgpack.unpackb(raw)
        except Exception as exc:  # msgpack's several exception types, or not two fields
            raise ValueError(f"bad store metadata {raw[:40]!r}: {exc}") from None
        if type(revision) is not int or type(compacted) is not int or not 0 <= compacted < revision:
            raise ValueError(f"bad store metadata {raw[:40]!r}")
        return StoreMeta(revision, compacted)


# ---------------------------------------------------------------------- events


def event_key(revision: int, seq: int) -> bytes:
    return _EVENT_KEY.pack(revision, seq)


def event_revision(key: bytes) -> int:
    return _EVENT_KEY.unpack(key)[0]


def encode_event(kind: int, key: bytes, value: bytes | None) -> bytes:
    return msgpack.packb([kind, key, value], use_bin_type=True)


def decode_event(key: bytes, raw: bytes) -> dict[str, Any]:
    """An event as the wire gives it: type, key, value (nil for a delete), revision."""
    kind, k, v = msgpack.unpackb(raw, raw=False)
    return {"type": EVENT_TYPES[kind], "key": k, "value": v, "revision": event_revision(key)}


def check_event(key: bytes, raw: bytes) -> None:
    """ValueError unless (key, raw) is an event record (snapshot chunks from the network are untrusted)."""
    if len(key) != _EVENT_KEY.size:
        raise ValueError(f"an event's key is {_EVENT_KEY.size} bytes")
    try:
        kind, k, v = msgpack.unpackb(raw, raw=False)
    except Exception as exc:  # msgpack's several exception types, or not three fields
        raise ValueError(f"bad event record {raw[:40]!r}: {exc}") from None
    if kind not in (EVENT_PUT, EVENT_DELETE) or type(k) is not bytes or not (
            v is None if kind == EVENT_DELETE else type(v) is bytes):
        raise ValueError(f"bad event record {raw[:40]!r}")


# ---------------------------------------------------------------------- ranges


def prefix_end(prefix: bytes) -> bytes | None:
    """The first key after every key that starts with ``prefix`` (None: no end, the keyspace's last)."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return None


def in_range(key: bytes, start: bytes, end: bytes | None) -> bool:
    return start <= key and (end is None or key < end)


# ---------------------------------------------------------------------- transactions


def compare_holds(target: int, cmp: int, operand: Any, value: bytes | None, meta: KeyMeta | None) -> bool:
    """One compare of a transaction against a key's value and metadata (None, None: no such key).

    As etcd: version and revisions of a missing key are 0; a value compare on a missing key fails
    whatever the comparison; ``exists`` takes ``==`` and ``!=`` against a bool.
    """
    if target == TARGET_EXISTS:
        found = value is not None
        return found == operand if cmp == 0 else found != operand
    if target == TARGET_VALUE:
        if value is None:
            return False
        have: Any = value
    else:
        m = meta or KeyMeta(0, 0, 0)
        have = {TARGET_VERSION: m.version, TARGET_CREATE: m.create_revision, TARGET_MOD: m.mod_revision}[target]
    return _CMP[cmp](have, operand)


_CMP: list[Callable[[Any, Any], bool]] = [
    lambda a, b: a == b, lambda a, b: a != b, lambda a, b: a < b, lambda a, b: a > b]


# ---------------------------------------------------------------------- leases

_U64 = struct.Struct(">Q")


def lease_key(lease: int) -> bytes:
    return _U64.pack(lease)


def lease_id(key: bytes) -> int:
    return _U64.unpack_from(key)[0]


def encode_lease(ttl: int) -> bytes:
    return msgpack.packb([ttl])


def decode_lease(raw: bytes) -> int:
    """A lease record's TTL; ValueError if it is not one."""
    try:
        (ttl,) = msgpack.unpackb(raw)
    except Exception as exc:  # msgpack's several exception types, or not one field
        raise ValueError(f"bad lease record {raw[:40]!r}: {exc}") from None
    if type(ttl) is not int or not 0 < ttl <= MAX_TTL:
        raise ValueError(f"bad lease record {raw[:40]!r}")
    return ttl
