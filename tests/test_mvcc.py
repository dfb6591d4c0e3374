"""The coordination API's state machine: revisions, key metadata, range, txn and the watch history,
against a model (hypothesis), on both state stores, through batches, restarts and snapshots."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zraft.client.protocol import Limits, RequestError, parse_request
from zraft.node.leveldb import LevelDBStorage
from zraft.node.memory import MemoryStateStore
from zraft.node.mvcc import CMPS, TARGETS, prefix_end
from zraft.node.statemachine import (
    DELETE,
    GET,
    LEASE_GRANT,
    LEASE_KEEPALIVE,
    LEASE_REVOKE,
    PUT,
    PUT_LEASE,
    RANGE,
    Compacted,
    KVStateMachine,
    check_command,
    encode_delete,
    encode_lease_op,
    encode_put,
    encode_put_lease,
    encode_txn,
)
from zraft.raft.messages import Entry

KEYS = [b"", b"a", b"a/1", b"a/2", b"ab", b"b", b"b\xff", b"\xff"]


def run(sm: KVStateMachine, *commands: bytes) -> list:
    first = sm.applied_index + 1
    return sm.apply([Entry(1, first + i, c) for i, c in enumerate(commands)])


class Model:
    """etcd v3's semantics on a dict: key -> (value, create_revision, mod_revision, version)."""

    def __init__(self) -> None:
        self.kv: dict[bytes, tuple[bytes, int, int, int]] = {}
        self.revision = 1
        self.events: list[tuple[int, str, bytes, bytes | None]] = []

    def _put(self, k: bytes, v: bytes, rev: int) -> None:
        old = self.kv.get(k)
        self.kv[k] = (v, rev, rev, 1) if old is None else (v, old[1], rev, old[3] + 1)
        self.events.append((rev, "put", k, v))

    def _delete(self, k: bytes, rev: int) -> bool:
        if k not in self.kv:
            return False
        del self.kv[k]
        self.events.append((rev, "delete", k, None))
        return True

    def range(self, start: bytes, end: bytes | None, limit: int, keys_only: bool) -> tuple[list, bool]:
        keys = sorted(k for k in self.kv if start <= k and (end is None or k < end))
        cut = keys[:limit] if limit else keys
        return [[k, None if keys_only else self.kv[k][0], self.kv[k][2]] for k in cut], len(cut) < len(keys)

    def holds(self, key: bytes, target: int, cmp: int, operand) -> bool:
        cur = self.kv.get(key)
        name = TARGETS[target]
        if name == "exists":
            return (cur is not None) == operand if CMPS[cmp] == "==" else (cur is not None) != operand
        if name == "value":
            if cur is None:
                return False
            have = cur[0]
        else:
            have = 0 if cur is None else {"create_revision": cur[1], "mod_revision": cur[2], "version": cur[3]}[name]
        return {"==": have == operand, "!=": have != operand, "<": have < operand, ">": have > operand}[CMPS[cmp]]

    def apply(self, cmd: list) -> dict:
        rev = self.revision + 1
        before = len(self.events)
        if cmd[0] == PUT:
            self._put(cmd[1], cmd[2], rev)
            out: dict = {}
        elif cmd[0] == DELETE:
            out = {"deleted": self._delete(cmd[1], rev)}
        else:
            ok = all(self.holds(*c) for c in cmd[1])
            responses = []
            for op in cmd[2] if ok else cmd[3]:
                if op[0] == PUT:
                    self._put(op[1], op[2], rev)
                    responses.append({"ok": True})
                elif op[0] == DELETE:
                    responses.append({"ok": True, "deleted": self._delete(op[1], rev)})
                elif op[0] == GET:
                    cur = self.kv.get(op[1])
                    responses.append({"ok": True, "value": cur and cur[0]})
                else:
                    kvs, more = self.range(op[1], op[2], op[3], op[4])
                    responses.append({"ok": True, "kvs": kvs, "more": more})
            out = {"succeeded": ok, "responses": responses}
        if len(self.events) > before:
            self.revision = rev
        return {**out, "revision": self.revision}


keys = st.sampled_from(KEYS)
values = st.binary(max_size=3)
compares = st.one_of(
    st.tuples(keys, st.just(0), st.integers(0, 3), values),
    st.tuples(keys, st.integers(1, 3), st.integers(0, 3), st.integers(0, 8)),
    st.tuples(keys, st.just(4), st.integers(0, 1), st.booleans()),
).map(list)
reads = st.one_of(st.tuples(st.just(GET), keys),
                  st.tuples(st.just(RANGE), keys, st.one_of(st.none(), keys), st.integers(0, 3), st.booleans()))


@st.composite
def branches(draw) -> list:
    writes = draw(st.lists(st.one_of(st.tuples(st.just(PUT), keys, values), st.tuples(st.just(DELETE), keys)),
                           max_size=4, unique_by=lambda op: op[1]))
    ops = [list(op) for op in writes] + [list(op) for op in draw(st.lists(reads, max_size=2))]
    return draw(st.permutations(ops))


commands = st.one_of(
    st.tuples(st.just(PUT), keys, values).map(lambda c: encode_put(c[1], c[2])),
    keys.map(encode_delete),
    st.tuples(st.lists(compares, max_size=3), branches(), branches()).map(lambda t: encode_txn(*t)),
)


def store(kind: str, tmp_path_factory) -> tuple[object, object | None]:
    if kind == "memory":
        return MemoryStateStore(), None
    storage = LevelDBStorage(tmp_path_factory.mktemp("db"))
    return storage.state, storage


@pytest.mark.parametrize("kind", ["memory", "leveldb"])
@settings(max_examples=60, deadline=None)
@given(cmds=st.lists(commands, max_size=25), cuts=st.sets(st.integers(1, 24)), data=st.data())
def test_the_state_machine_matches_the_model(kind, tmp_path_factory, cmds, cuts, data) -> None:
    """Any commands, in any batches: the results, the revisions (strictly increasing over the writes
    that change something), every key's metadata, range views and the history equal the model's."""
    backend, storage = store(kind, tmp_path_factory)
    try:
        sm, model = KVStateMachine(backend), Model()
        bounds = [0, *sorted(c for c in cuts if c < len(cmds)), len(cmds)]
        for a, b in zip(bounds, bounds[1:], strict=False):
            if b > a:
                got = run(sm, *cmds[a:b])
                assert got == [model.apply(msgpack.unpackb(c)) for c in cmds[a:b]]
        assert sm.revision == model.revision
        for k in KEYS:
            meta, cur = sm.get_meta(k), model.kv.get(k)
            assert (meta and (meta.create_revision, meta.mod_revision, meta.version)) == (cur and cur[1:])
        start, end = data.draw(keys), data.draw(st.one_of(st.none(), keys))
        limit, keys_only = data.draw(st.integers(0, 4)), data.draw(st.booleans())
        assert list(sm.range(start, end, limit, keys_only)) == list(model.range(start, end, limit, keys_only))
        events, upto = sm.watch_events(0, b"", None)
        assert [(e["revision"], e["type"], e["key"], e["value"]) for e in events] == model.events
        assert upto == model.revision
        revs = [e[0] for e in model.events]
        assert revs == sorted(revs) and set(revs) == set(range(2, model.revision + 1))
    finally:
        if storage is not None:
            storage.close()


def test_metadata_revision_and_history_survive_a_restart(tmp_path) -> None:
    s = LevelDBStorage(tmp_path / "db")
    sm = KVStateMachine(s.state, history_revisions=3)
    run(sm, encode_put(b"a", b"1"), encode_put(b"b", b"1"), encode_put(b"a", b"2"), encode_delete(b"b"),
        encode_put(b"c", b"1"))
    s.close()
    s = LevelDBStorage(tmp_path / "db")
    sm = KVStateMachine(s.state, history_revisions=3)
    assert sm.revision == 6 and sm.compacted == 3
    assert sm.get_meta(b"a").fields() == {"create_revision": 2, "mod_revision": 4, "version": 2, "lease": 0}
    with pytest.raises(Compacted) as exc:
        sm.watch_events(3, b"", None)
    assert exc.value.revision == 3
    assert [e["revision"] for e in sm.watch_events(4, b"", None)[0]] == [4, 5, 6]
    run(sm, encode_put(b"d", b"1"))  # the trimming goes on where it stopped
    assert sm.compacted == 4 and [e["revision"] for e in sm.watch_events(5, b"", None)[0]] == [5, 6, 7]
    s.close()


def test_the_history_is_bounded_by_bytes_and_keeps_the_newest_revision() -> None:
    sm = KVStateMachine(MemoryStateStore(), history_bytes=100)
    run(sm, encode_put(b"k", b"x" * 60), encode_put(b"k", b"y" * 60), encode_put(b"k", b"z" * 200))
    events, _ = sm.watch_events(sm.compacted + 1, b"", None)
    assert [e["value"][:1] for e in events] == [b"z"] and sm.compacted == 3


def test_watch_events_are_cut_at_whole_revisions() -> None:
    sm = KVStateMachine(MemoryStateStore())
    txn = encode_txn([], [[PUT, b"a", b"1"], [PUT, b"b", b"1"], [PUT, b"c", b"1"]], [])
    run(sm, txn, txn, encode_put(b"d", b"1"))
    events, upto = sm.watch_events(2, b"", None, max_events=2)
    assert [e["revision"] for e in events] == [2, 2, 2] and upto == 2  # a revision is never split
    events, upto = sm.watch_events(upto + 1, b"b", b"c")
    assert [(e["key"], e["revision"]) for e in events] == [(b"b", 3)] and upto == 4


def test_a_snapshot_carries_metadata_revision_and_history(tmp_path) -> None:
    src = LevelDBStorage(tmp_path / "src")
    sm = KVStateMachine(src.state)
    run(sm, encode_put(b"a", b"1"), encode_put(b"a", b"2"), encode_delete(b"a"), encode_put(b"b", b"1"))
    view = src.state.open_snapshot()
    chunks = list(view.chunks(64))
    view.close()
    for dst_state, closer in ((MemoryStateStore(), None), (LevelDBStorage(tmp_path / "dst"), "storage")):
        state = dst_state.state if closer else dst_state
        state.begin_staging()
        for c in chunks:
            state.stage(c)
        if closer:
            from zraft.raft.core import SnapshotMeta

            dst_state.install_snapshot(SnapshotMeta(sm.applied_index, 1, True), None, [])
        else:
            state.install_staged(sm.applied_index, 1)
        copy = KVStateMachine(state)
        assert copy.revision == sm.revision == 5
        assert copy.get_meta(b"b") == sm.get_meta(b"b") and copy.get_meta(b"a") is None
        assert copy.watch_events(0, b"", None) == sm.watch_events(0, b"", None)
        if closer:
            dst_state.close()
    src.close()


def test_keys_written_before_revisions_count_as_revision_one() -> None:
    sm = KVStateMachine(MemoryStateStore([(b"old", b"v")], applied_index=7))
    assert sm.get_meta(b"old").fields() == {"create_revision": 1, "mod_revision": 1, "version": 1, "lease": 0}
    assert sm.range(b"", None) == ([[b"old", b"v", 1]], False)
    assert run(sm, encode_put(b"old", b"w")) == [{"revision": 2}]
    assert sm.get_meta(b"old").version == 2


def test_commands_from_the_network_are_checked() -> None:
    ok = encode_txn([[b"k", 0, 0, b"v"]], [[PUT, b"k", b"w"], [RANGE, b"a", None, 0, False]], [[GET, b"k"]])
    assert check_command(ok, 10, 10) is None
    bad = [
        encode_txn([[b"k", 9, 0, b"v"]], [], []),  # no such target
        encode_txn([[b"k", 4, 2, True]], [], []),  # exists takes == or != only
        encode_txn([[b"k", 1, 0, b"1"]], [], []),  # a version is an int
        encode_txn([], [[PUT, b"k", b"1"], [DELETE, b"k"]], []),  # a key written twice
        encode_txn([], [[RANGE, b"a", None, -1, False]], []),
        encode_txn([], [[PUT, b"k" * 11, b"1"]], []),  # over the key limit
        encode_txn([], [[7, b"k"]], []),
    ]
    for cmd in bad:
        assert check_command(cmd, 10, 10) is not None, msgpack.unpackb(cmd)


def test_prefix_end() -> None:
    assert prefix_end(b"a") == b"b" and prefix_end(b"a\xff") == b"b" and prefix_end(b"\xff\xff") is None
    assert prefix_end(b"") is None


@pytest.mark.parametrize("req, why", [
    ({"op": "range"}, "exactly one of prefix or start"),
    ({"op": "range", "prefix": b"a", "limit": "3"}, "limit"),
    ({"op": "watch", "prefix": b"a"}, "start_revision"),
    ({"op": "watch", "key": b"a", "prefix": b"b", "start_revision": 1}, "exactly one of key or prefix"),
    ({"op": "watch", "key": b"a", "start_revision": 1, "timeout": 99999}, "timeout"),
    ({"op": "txn", "compare": [[b"k", "exists", "<", True]]}, "exists"),
    ({"op": "txn", "success": [{"op": "cas"}]}, "put, delete, get or range"),
    ({"op": "get", "key": b"k", "meta": 1}, "meta"),
    ({"op": "put", "key": b"k", "value": b"v", "lease": 0}, "lease id"),
    ({"op": "lease_grant", "ttl": 0}, "ttl"),
    ({"op": "lease_grant", "ttl": 1.5}, "ttl"),
    ({"op": "lease_keepalive"}, "lease id"),
    ({"op": "txn", "success": [{"op": "put", "key": b"k", "value": b"v", "lease": -1}]}, "lease id"),
])
def test_bad_coordination_requests_are_refused(req, why) -> None:
    with pytest.raises(RequestError, match=why) as exc:
        parse_request(msgpack.packb(req), Limits())
    assert exc.value.code == "bad_request"


# --- leases -------------------------------------------------------------------------------------


def test_a_revoked_lease_takes_its_keys_at_one_revision(tmp_path) -> None:
    s = LevelDBStorage(tmp_path / "db")
    sm = KVStateMachine(s.state)
    assert run(sm, encode_lease_op(LEASE_GRANT, 7, 10)) == [{"lease": 7, "ttl": 10, "revision": 1}]
    assert sm.lease_changes == [("grant", 7, 10)]
    run(sm, encode_put_lease(b"a", b"1", 7), encode_put_lease(b"b", b"1", 7), encode_put(b"c", b"1"),
        encode_put_lease(b"d", b"1", 7), encode_put(b"d", b"2"))  # a put without the lease detaches d
    assert sm.get_meta(b"a").lease == 7 and sm.get_meta(b"d").lease == 0
    assert sm.lease_keys(7) == [b"a", b"b"]
    [result] = run(sm, encode_put_lease(b"x", b"1", 8))
    assert result["error"] == "lease_not_found" and sm.get(b"x") is None and sm.revision == 6
    assert run(sm, encode_lease_op(LEASE_KEEPALIVE, 7)) == [{"ttl": 10, "revision": 6}]
    s.close()
    s = LevelDBStorage(tmp_path / "db")  # leases and their keys survive a restart
    sm = KVStateMachine(s.state)
    assert sm.leases() == {7: 10} and sm.lease_keys(7) == [b"a", b"b"]
    assert run(sm, encode_lease_op(LEASE_REVOKE, 7)) == [{"revision": 7}]
    events, _ = sm.watch_events(7, b"", None)
    assert [(e["type"], e["key"], e["revision"]) for e in events] == [("delete", b"a", 7), ("delete", b"b", 7)]
    assert sm.get(b"a") is None and sm.get(b"c") == b"1" and sm.get(b"d") == b"2" and sm.leases() == {}
    assert run(sm, encode_lease_op(LEASE_KEEPALIVE, 7))[0]["error"] == "lease_not_found"
    assert run(sm, encode_lease_op(LEASE_REVOKE, 7))[0]["error"] == "lease_not_found"
    s.close()


def test_leases_in_one_batch_and_in_transactions() -> None:
    sm = KVStateMachine(MemoryStateStore())
    txn_ok = encode_txn([], [[PUT_LEASE, b"lock", b"me", 5]], [])
    txn_bad = encode_txn([], [[PUT, b"other", b"1"], [PUT_LEASE, b"lock2", b"me", 6]], [])
    results = run(sm, encode_lease_op(LEASE_GRANT, 5, 3), txn_ok, txn_bad, encode_lease_op(LEASE_REVOKE, 5),
                  encode_lease_op(LEASE_GRANT, 5, 3))
    assert results[1]["succeeded"] and results[2]["error"] == "lease_not_found"
    assert sm.get(b"other") is None  # the failed transaction wrote nothing
    assert results[3] == {"revision": 3} and sm.get(b"lock") is None  # granted, used, revoked in one batch
    assert results[4] == {"lease": 5, "ttl": 3, "revision": 3} and sm.lease_keys(5) == []
    assert run(sm, encode_lease_op(LEASE_GRANT, 5, 9))[0]["error"] == "bad_request"  # an id in use


def test_a_snapshot_carries_leases() -> None:
    src = MemoryStateStore()
    sm = KVStateMachine(src)
    run(sm, encode_lease_op(LEASE_GRANT, 3, 30), encode_put_lease(b"k", b"v", 3))
    view = src.open_snapshot()
    dst = MemoryStateStore()
    dst.begin_staging()
    for c in view.chunks(16):
        dst.stage(c)
    dst.install_staged(sm.applied_index, 1)
    copy = KVStateMachine(dst)
    assert copy.leases() == {3: 30} and copy.lease_keys(3) == [b"k"]
    run(copy, encode_lease_op(LEASE_REVOKE, 3))
    assert copy.get(b"k") is None


def test_the_lease_clock() -> None:
    from zraft.node.leases import RETRY_S, LeaseClock

    clock = LeaseClock()
    clock.reset({1: 10, 2: 5}, now=100.0)  # a new leader: full TTLs from now
    assert clock.due(104.9) == [] and clock.due(105.0) == [2]
    assert clock.due(105.5) == []  # proposed: not again before RETRY_S
    assert clock.due(105.0 + RETRY_S) == [2]
    clock.revoked(2)  # the revoke was applied
    clock.refresh(1, 10, now=109.0)  # a keepalive
    assert clock.due(118.9) == [] and clock.due(119.0) == [1]
    clock.revoked(1)
    assert clock.due(1000.0) == [] and len(clock) == 0
