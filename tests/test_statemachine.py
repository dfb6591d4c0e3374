"""KVStateMachine: put / delete / cas semantics (docs/PROTOCOL.md), batches, no-ops,
the applied index, and its persistence through LevelDBStorage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zraft.node.leveldb import LevelDBStorage
from zraft.node.memory import MemoryStateStore
from zraft.node.statemachine import (
    CAS,
    DELETE,
    PUT,
    SESSION_EXPIRED,
    KVStateMachine,
    SessionRecord,
    encode_cas,
    encode_delete,
    encode_put,
)
from zraft.raft.messages import Entry

REPO = Path(__file__).resolve().parent.parent
# The many-example tests put their databases on tmpfs when there is one: sync=True writes
# cost nothing there, so the run time does not depend on the disk (or on who else fsyncs).
FAST_TMP = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

# --- helpers -----------------------------------------------------------------------------


def put(key: bytes, value: bytes, session: tuple[int, int] | None = None) -> bytes:
    return encode_put(key, value, session)


def delete(key: bytes, session: tuple[int, int] | None = None) -> bytes:
    return encode_delete(key, session)


def cas(key: bytes, expect: bytes | None, value: bytes, session: tuple[int, int] | None = None) -> bytes:
    return encode_cas(key, expect, value, session)


NOOP = b""


def entries_after(index: int, *commands: bytes, term: int = 1) -> list[Entry]:
    return [Entry(term, index + 1 + i, c) for i, c in enumerate(commands)]


def plain(results: list) -> list:
    """Results without their revision (revisions are checked by the model below and in test_mvcc.py)."""
    return [{k: v for k, v in r.items() if k != "revision"} if isinstance(r, dict) else r for r in results]


def apply(sm: KVStateMachine, *commands: bytes) -> list:
    """Apply the commands as one batch right after the state machine's applied index (results without
    their revision)."""
    return plain(sm.apply(entries_after(sm.applied_index, *commands)))


@pytest.fixture(params=["memory", "leveldb"])
def backend(request, tmp_path):
    """The state machine's room of a node's storage, in memory or in LevelDB."""
    if request.param == "memory":
        yield MemoryStateStore()
        return
    storage = LevelDBStorage(tmp_path / "db")
    yield storage.state
    storage.close()


@pytest.fixture
def sm(backend) -> KVStateMachine:
    return KVStateMachine(backend)


def state_of(backend) -> dict[bytes, bytes]:
    """Everything in the backend."""
    return dict(backend.items())


# --- encoding ----------------------------------------------------------------------------


def test_command_encoding() -> None:
    # [op, key, ..., session]: session is None or [client_id, seq]; keys and values are bin.
    assert msgpack.unpackb(encode_put(b"k", b"v")) == [PUT, b"k", b"v", None] == [1, b"k", b"v", None]
    assert msgpack.unpackb(encode_delete(b"k")) == [DELETE, b"k", None] == [2, b"k", None]
    assert msgpack.unpackb(encode_cas(b"k", None, b"v")) == [CAS, b"k", None, b"v", None]
    assert CAS == 3
    assert msgpack.unpackb(encode_cas(b"k", b"", b"v", (7, 3))) == [3, b"k", b"", b"v", [7, 3]]
    assert msgpack.unpackb(encode_put(b"k", b"v", (2**63 - 1, 1))) == [1, b"k", b"v", [2**63 - 1, 1]]
    assert encode_put(b"k", b"v") == b"\x94\x01\xc4\x01k\xc4\x01v\xc0"


# --- put / delete / cas ------------------------------------------------------------------


def test_put_sets_and_overwrites(sm, backend) -> None:
    assert apply(sm, put(b"k", b"v1")) == [{}]
    assert sm.get(b"k") == backend.get(b"k") == b"v1"
    assert apply(sm, put(b"k", b"v2")) == [{}]
    assert sm.get(b"k") == b"v2"
    assert apply(sm, put(b"empty", b"")) == [{}]
    assert sm.get(b"empty") == b""  # an empty value is a value, not an absent key
    assert state_of(backend) == {b"k": b"v2", b"empty": b""}
    assert sm.applied_index == backend.applied_index == 3


def test_delete_reports_whether_the_key_existed(sm, backend) -> None:
    apply(sm, put(b"k", b"v"), put(b"e", b""))
    assert apply(sm, delete(b"k")) == [{"deleted": True}]
    assert sm.get(b"k") is None
    assert apply(sm, delete(b"k")) == [{"deleted": False}]
    assert apply(sm, delete(b"never")) == [{"deleted": False}]
    assert apply(sm, delete(b"e")) == [{"deleted": True}]  # a key holding b"" exists
    assert state_of(backend) == {}
    assert sm.applied_index == backend.applied_index == 6


def test_cas_on_a_present_key(sm) -> None:
    apply(sm, put(b"k", b"old"))
    # Mismatch: no swap, and the value is the unchanged current one.
    assert apply(sm, cas(b"k", b"other", b"new")) == [{"swapped": False, "value": b"old"}]
    assert apply(sm, cas(b"k", None, b"new")) == [{"swapped": False, "value": b"old"}]
    assert apply(sm, cas(b"k", b"", b"new")) == [{"swapped": False, "value": b"old"}]
    assert sm.get(b"k") == b"old"
    # Match: swapped, and the value is the new one.
    assert apply(sm, cas(b"k", b"old", b"new")) == [{"swapped": True, "value": b"new"}]
    assert sm.get(b"k") == b"new"
    # Swapping to the same value still counts as swapped.
    assert apply(sm, cas(b"k", b"new", b"new")) == [{"swapped": True, "value": b"new"}]
    assert sm.get(b"k") == b"new"


def test_cas_on_an_absent_key(sm) -> None:
    assert apply(sm, cas(b"k", b"x", b"v")) == [{"swapped": False, "value": None}]
    assert apply(sm, cas(b"k", b"", b"v")) == [{"swapped": False, "value": None}]  # b"" is not absent
    assert sm.get(b"k") is None
    assert apply(sm, cas(b"k", None, b"v")) == [{"swapped": True, "value": b"v"}]
    assert sm.get(b"k") == b"v"
    assert apply(sm, cas(b"k", None, b"w")) == [{"swapped": False, "value": b"v"}]


def test_cas_with_empty_values(sm) -> None:
    assert apply(sm, cas(b"k", None, b"")) == [{"swapped": True, "value": b""}]
    assert sm.get(b"k") == b""
    assert apply(sm, cas(b"k", None, b"x")) == [{"swapped": False, "value": b""}]  # b"" is present
    assert apply(sm, cas(b"k", b"", b"x")) == [{"swapped": True, "value": b"x"}]
    assert sm.get(b"k") == b"x"


def test_binary_keys_and_values(sm, backend) -> None:
    all_bytes = bytes(range(256))
    results = apply(sm, put(all_bytes, all_bytes), put(b"", b"\x00"), put(b"m/applied", b"\xff" * 8))
    assert results == [{}, {}, {}]
    assert sm.get(all_bytes) == all_bytes
    assert sm.get(b"") == b"\x00"
    assert sm.get(b"m/applied") == b"\xff" * 8
    assert sm.applied_index == backend.applied_index == 3  # a data key named like the meta key is just data
    assert apply(sm, cas(all_bytes, all_bytes, b"\x80")) == [{"swapped": True, "value": b"\x80"}]
    assert apply(sm, delete(b"")) == [{"deleted": True}]
    assert state_of(backend) == {all_bytes: b"\x80", b"m/applied": b"\xff" * 8}


# --- batches ---------------------------------------------------------------------------------


def test_later_commands_in_a_batch_see_earlier_ones(sm, backend) -> None:
    apply(sm, put(b"pre", b"p"))
    results = apply(
        sm,
        put(b"k", b"v1"),
        cas(b"k", b"v1", b"v2"),  # sees the put
        cas(b"k", b"v1", b"v3"),  # sees the swap: no longer v1
        delete(b"k"),  # sees v2: existed
        delete(b"k"),  # sees its own delete: gone
        cas(b"k", None, b"v4"),  # absent within the batch
        delete(b"pre"),  # stored before the batch
        cas(b"pre", None, b"p2"),  # deleted earlier in the batch
        put(b"x", b""),
        cas(b"x", b"", b"y"),  # b"" written in the batch is present
    )
    assert results == [
        {},
        {"swapped": True, "value": b"v2"},
        {"swapped": False, "value": b"v2"},
        {"deleted": True},
        {"deleted": False},
        {"swapped": True, "value": b"v4"},
        {"deleted": True},
        {"swapped": True, "value": b"p2"},
        {},
        {"swapped": True, "value": b"y"},
    ]
    assert state_of(backend) == {b"k": b"v4", b"pre": b"p2", b"x": b"y"}
    assert sm.applied_index == backend.applied_index == 11


def test_put_then_delete_in_one_batch_leaves_nothing(sm, backend) -> None:
    assert apply(sm, put(b"k", b"v"), delete(b"k")) == [{}, {"deleted": True}]
    assert sm.get(b"k") is None
    assert state_of(backend) == {}


def test_noop_entries(sm, backend) -> None:
    assert apply(sm, NOOP) == [None]
    assert sm.applied_index == backend.applied_index == 1
    assert state_of(backend) == {}
    results = apply(sm, NOOP, put(b"k", b"v"), NOOP, delete(b"k"), NOOP)
    assert results == [None, {}, None, {"deleted": True}, None]
    assert sm.applied_index == backend.applied_index == 6
    assert apply(sm, NOOP, NOOP) == [None, None]
    assert sm.applied_index == backend.applied_index == 8


def test_empty_apply_changes_nothing(sm, backend) -> None:
    apply(sm, put(b"k", b"v"))
    assert sm.apply([]) == []
    assert sm.applied_index == backend.applied_index == 1
    assert state_of(backend) == {b"k": b"v"}


def test_terms_do_not_matter_to_the_state_machine(sm) -> None:
    results = plain(sm.apply([Entry(1, 1, put(b"k", b"a")), Entry(5, 2, cas(b"k", b"a", b"b")), Entry(9, 3, NOOP)]))
    assert results == [{}, {"swapped": True, "value": b"b"}, None]
    assert sm.applied_index == 3


# --- gaps and replays --------------------------------------------------------------------------


def test_gap_raises_and_changes_nothing(sm, backend) -> None:
    with pytest.raises(AssertionError):
        sm.apply(entries_after(1, put(b"k", b"v")))  # index 2 after 0
    assert sm.applied_index == backend.applied_index == 0
    assert sm.get(b"k") is None
    apply(sm, put(b"a", b"1"), put(b"b", b"2"))
    with pytest.raises(AssertionError):
        sm.apply(entries_after(3, put(b"k", b"v")))  # index 4 after 2
    assert sm.applied_index == backend.applied_index == 2
    assert state_of(backend) == {b"a": b"1", b"b": b"2"}


@pytest.mark.parametrize("start", [1, 2, 3])
def test_replay_raises_and_changes_nothing(sm, backend, start) -> None:
    apply(sm, put(b"a", b"1"), put(b"b", b"2"), put(b"c", b"3"))
    with pytest.raises(AssertionError):
        sm.apply(entries_after(start - 1, put(b"a", b"replayed"), delete(b"b"), NOOP, NOOP))
    assert sm.applied_index == backend.applied_index == 3
    assert state_of(backend) == {b"a": b"1", b"b": b"2", b"c": b"3"}


def test_unknown_command_raises_and_applies_nothing_of_the_batch(sm, backend) -> None:
    bad = msgpack.packb([99, b"k", None], use_bin_type=True)
    with pytest.raises(ValueError, match="unknown command 99 at index 2"):
        apply(sm, put(b"k", b"v"), bad)
    assert sm.applied_index == backend.applied_index == 0
    assert state_of(backend) == {}


def test_state_machine_starts_from_the_backend_applied_index() -> None:
    kv = MemoryStateStore([(b"k", b"v")], applied_index=41)
    sm = KVStateMachine(kv)
    assert sm.applied_index == 41
    with pytest.raises(AssertionError):
        apply_at(sm, 41, put(b"k", b"x"))
    assert sm.apply(entries_after(41, cas(b"k", b"v", b"w"))) == [{"swapped": True, "value": b"w", "revision": 2}]
    assert sm.applied_index == kv.applied_index == 42
    assert kv.data == {b"k": b"w"}


def apply_at(sm: KVStateMachine, first_index: int, *commands: bytes) -> list:
    return plain(sm.apply(entries_after(first_index - 1, *commands)))


# --- exactly-once sessions -------------------------------------------------------------------


def expired(result) -> bool:
    return (
        isinstance(result, dict)
        and set(result) == {"error", "message"}
        and result["error"] == SESSION_EXPIRED
        and isinstance(result["message"], str)
        and result["message"] != ""
    )


def test_duplicate_gets_the_remembered_result_and_is_not_applied_again(sm, backend) -> None:
    assert apply(sm, cas(b"k", None, b"a", (7, 1))) == [{"swapped": True, "value": b"a"}]
    assert apply(sm, put(b"k", b"b")) == [{}]  # someone else, without a session
    # The retry is answered from memory: had it been applied, it would not have swapped.
    assert apply(sm, cas(b"k", None, b"a", (7, 1))) == [{"swapped": True, "value": b"a"}]
    assert sm.get(b"k") == b"b"
    assert apply(sm, delete(b"k", (7, 2))) == [{"deleted": True}]
    assert apply(sm, delete(b"k", (7, 2))) == [{"deleted": True}]  # not {"deleted": False}
    # Deduplication is by sequence number alone.
    assert apply(sm, put(b"k", b"c", (7, 2))) == [{"deleted": True}]
    assert sm.get(b"k") is None
    assert sm.applied_index == backend.applied_index == 6  # duplicates still advance the applied index
    assert sm.sessions == {7: SessionRecord(2, {"deleted": True, "revision": 4}, 4)}
    assert backend.load_sessions() == sm.sessions


def test_older_sequence_number_is_refused(sm) -> None:
    apply(sm, put(b"k", b"1", (3, 1)), put(b"k", b"3", (3, 3)))
    [result] = apply(sm, put(b"k", b"2", (3, 2)))
    assert expired(result)
    assert sm.get(b"k") == b"3"
    assert sm.sessions[3] == SessionRecord(3, {"revision": 3}, 2)


def test_unknown_client_must_start_at_one(sm, backend) -> None:
    [result] = apply(sm, put(b"k", b"v", (9, 2)))
    assert expired(result)
    assert sm.get(b"k") is None
    assert sm.sessions == {}
    assert backend.load_sessions() == {}
    assert apply(sm, put(b"k", b"v", (9, 1)), put(b"k", b"w", (9, 2))) == [{}, {}]
    assert sm.get(b"k") == b"w"
    assert sm.applied_index == 3


def test_sequence_numbers_may_skip_and_clients_are_separate(sm) -> None:
    results = apply(sm, put(b"a", b"1", (1, 1)), put(b"b", b"1", (2, 1)), put(b"a", b"2", (1, 5)))
    assert results == [{}, {}, {}]
    [result] = apply(sm, put(b"a", b"x", (1, 4)))
    assert expired(result)
    assert apply(sm, put(b"b", b"2", (2, 2))) == [{}]
    assert (sm.get(b"a"), sm.get(b"b")) == (b"2", b"2")
    assert sm.sessions == {1: SessionRecord(5, {"revision": 4}, 3), 2: SessionRecord(2, {"revision": 5}, 5)}


def test_duplicate_within_one_batch(sm, backend) -> None:
    results = apply(sm, delete(b"k", (4, 1)), put(b"k", b"v"), delete(b"k", (4, 1)), delete(b"k", (4, 2)))
    # The third is the first one's remembered result; the fourth deletes what the put wrote.
    assert results == [{"deleted": False}, {}, {"deleted": False}, {"deleted": True}]
    assert sm.get(b"k") is None
    assert backend.load_sessions() == {4: SessionRecord(2, {"deleted": True, "revision": 3}, 4)}


def test_sessions_survive_reopen(tmp_path) -> None:
    path = tmp_path / "db"
    storage = LevelDBStorage(path)
    sm = KVStateMachine(storage.state)
    apply(sm, put(b"k", b"v", (1, 1)), cas(b"k", b"v", b"\x00w", (2**63 - 1, 1)), delete(b"k", (1, 2)))
    before = dict(sm.sessions)
    storage.close()

    storage = LevelDBStorage(path)
    sm = KVStateMachine(storage.state)
    assert sm.sessions == before == {
        1: SessionRecord(2, {"deleted": True, "revision": 4}, 3),
        2**63 - 1: SessionRecord(1, {"swapped": True, "value": b"\x00w", "revision": 3}, 2),
    }
    big = 2**63 - 1
    results = apply(sm, cas(b"k", b"v", b"\x00w", (big, 1)), delete(b"k", (1, 2)), put(b"k", b"z", (1, 1)))
    assert results[:2] == [{"swapped": True, "value": b"\x00w"}, {"deleted": True}]
    assert expired(results[2])
    assert sm.get(b"k") is None
    storage.close()


def test_eviction_forgets_the_least_recently_used(backend) -> None:
    sm = KVStateMachine(backend, max_sessions=10)
    apply(sm, *[put(b"c%d" % c, b"1", (c, 1)) for c in range(1, 11)])  # indexes 1..10
    apply(sm, put(b"c1", b"2", (1, 2)))  # index 11: client 1 is now the most recent
    assert sorted(sm.sessions) == list(range(1, 11))
    apply(sm, put(b"c11", b"1", (11, 1)))  # index 12: 11 sessions, over the bound: back to 9
    assert sorted(sm.sessions) == [1, *range(4, 12)]  # 2 and 3 were the least recently used
    assert backend.load_sessions() == sm.sessions
    [result] = apply(sm, put(b"c2", b"2", (2, 2)))
    assert expired(result)
    assert sm.get(b"c2") == b"1"
    assert apply(sm, put(b"c1", b"3", (1, 3))) == [{}]
    assert sm.get(b"c1") == b"3"


def test_eviction_does_not_depend_on_batching(tmp_path) -> None:
    """Replicas apply the same entries in different batches (and a restart replays them in
    yet others): what is forgotten, and so every result, must be the same."""
    cmds = [put(b"k%d" % c, b"v", (c, 1)) for c in range(1, 12)] + [put(b"late", b"x", (1, 2))]
    entries = [Entry(1, i + 1, c) for i, c in enumerate(cmds)]

    one_by_one = KVStateMachine(MemoryStateStore(), max_sessions=10)
    expected = [r for e in entries for r in one_by_one.apply([e])]
    assert expired(expected[-1])  # client 1 was forgotten when client 11 arrived
    assert one_by_one.get(b"late") is None

    for cut in (None, 11, 5):
        storage = LevelDBStorage(tmp_path / f"db{cut}")
        sm = KVStateMachine(storage.state, max_sessions=10)
        batches = [entries] if cut is None else [entries[:cut], entries[cut:]]
        results = [r for batch in batches for r in sm.apply(batch)]
        assert results == expected, cut
        assert sm.get(b"late") is None
        assert sm.sessions == one_by_one.sessions == storage.state.load_sessions()
        storage.close()


# --- persistence through LevelDB ------------------------------------------------------------


def test_applied_index_and_data_survive_reopen(tmp_path) -> None:
    path = tmp_path / "db"
    storage = LevelDBStorage(path)
    sm = KVStateMachine(storage.state)
    apply(sm, put(b"a", b"1"), put(b"b", b"2"), NOOP)
    apply(sm, delete(b"a"), cas(b"b", b"2", b"3"), put(b"c", b""))
    storage.close()

    storage = LevelDBStorage(path)
    sm = KVStateMachine(storage.state)
    assert sm.applied_index == storage.state.applied_index == 6
    assert storage.state.items() == [(b"b", b"3"), (b"c", b"")]
    assert sm.get(b"a") is None
    # The reopened state machine continues at 7 and refuses a replay of 6.
    with pytest.raises(AssertionError):
        apply_at(sm, 6, put(b"c", b"again"))
    assert apply(sm, cas(b"c", b"", b"4")) == [{"swapped": True, "value": b"4"}]
    storage.close()

    storage = LevelDBStorage(path)
    assert storage.state.applied_index == 7
    assert storage.state.items() == [(b"b", b"3"), (b"c", b"4")]
    storage.close()


def test_noop_only_batch_persists_the_applied_index(tmp_path) -> None:
    storage = LevelDBStorage(tmp_path / "db")
    sm = KVStateMachine(storage.state)
    apply(sm, NOOP, NOOP, NOOP)
    storage.close()
    storage = LevelDBStorage(tmp_path / "db")
    assert storage.state.applied_index == 3
    assert storage.state.items() == []
    storage.close()


_CRASH_CHILD = """
import sys
from zraft.raft.messages import Entry
from zraft.node.statemachine import KVStateMachine, encode_delete, encode_put
from zraft.node.leveldb import LevelDBStorage

storage = LevelDBStorage(sys.argv[1])
sm = KVStateMachine(storage.state)
print("ready", sm.applied_index, flush=True)
if sm.applied_index % 22 == 21:  # the last child was killed between the two batches of a round
    sm.apply([Entry(1, sm.applied_index + 1, encode_put(b"marker%d" % (sm.applied_index + 1), b"x"))])
while True:
    # One batch of 21 entries: every k<j> gets the batch's last index, and the marker key
    # of the previous batch is replaced by this batch's.
    i = sm.applied_index
    last = i + 21
    cmds = [encode_put(b"k%d" % j, b"%d" % last) for j in range(20)]
    cmds.append(encode_delete(b"marker%d" % i))
    sm.apply([Entry(1, i + 1 + n, c) for n, c in enumerate(cmds)])
    sm.apply([Entry(1, last + 1, encode_put(b"marker%d" % (last + 1), b"x"))])
"""


def check_consistent_prefix(storage: LevelDBStorage) -> int:
    """The state after a crash is exactly the state after some whole batch."""
    applied = storage.state.applied_index
    items = dict(storage.state.items())
    if applied == 0:
        assert items == {}
        return 0
    assert applied % 22 in (0, 21)  # the end of one of the two kinds of batch
    last = applied if applied % 22 == 21 else applied - 1
    expected = {b"k%d" % j: b"%d" % last for j in range(20)}
    if applied % 22 == 0:
        expected[b"marker%d" % applied] = b"x"
    assert items == expected
    return applied


def test_applied_index_and_data_are_atomic_across_a_crash(tmp_path) -> None:
    """Kill a process applying batches at random moments: what is stored is always the
    data of exactly the batches up to the stored applied index, never part of one."""
    path = tmp_path / "db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    seen = []
    for delay in (0.05, 0.2, 0.35):
        child = subprocess.Popen(
            [sys.executable, "-c", _CRASH_CHILD, str(path)], env=env, stdout=subprocess.PIPE, text=True
        )
        try:
            line = child.stdout.readline()
            assert line.startswith("ready"), line
            assert int(line.split()[1]) == (seen[-1] if seen else 0)
            time.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            child.stdout.close()
        assert child.returncode == -signal.SIGKILL  # it was still running: killed mid-work
        storage = LevelDBStorage(path)
        try:
            seen.append(check_consistent_prefix(storage))
        finally:
            storage.close()
    assert seen == sorted(seen)
    assert seen[-1] > seen[0] > 0  # the children made progress before being killed


# --- property: any batch split gives the same results as one by one -------------------------

KEYS = [b"", b"k", b"k2", b"\x00\xff"]
VALUES = st.binary(max_size=2)  # small, so that cas often matches
CLIENTS = [1, 2, 3, 2**63 - 1]
sessions = st.none() | st.tuples(st.sampled_from(CLIENTS), st.integers(1, 4))

commands = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(KEYS), VALUES, sessions),
    st.tuples(st.just("delete"), st.sampled_from(KEYS), sessions),
    st.tuples(st.just("cas"), st.sampled_from(KEYS), st.none() | VALUES, VALUES, sessions),
    st.just(("noop",)),
)


def encode(cmd: tuple) -> bytes:
    op = cmd[0]
    if op == "put":
        return encode_put(cmd[1], cmd[2], cmd[3])
    if op == "delete":
        return encode_delete(cmd[1], cmd[2])
    if op == "cas":
        return encode_cas(cmd[1], cmd[2], cmd[3], cmd[4])
    return NOOP


class Model:
    """The documented semantics on a dict, one command at a time: put/delete/cas, and
    sessions forgotten least recently used first (by log index) down to 90% of the bound."""

    def __init__(self, data: dict, sessions: dict[int, SessionRecord], max_sessions: int) -> None:
        self.data = dict(data)
        self.sessions = {c: (r.seq, r.result, r.last_index) for c, r in sessions.items()}
        self.max_sessions = max_sessions
        self.revision = 1  # an empty store's; one more for each command that changes something

    def apply(self, index: int, cmd: tuple):
        op = cmd[0]
        if op == "noop":
            return None
        session = cmd[-1]
        if session is not None:
            client, seq = session
            rec = self.sessions.get(client)
            if rec is not None and seq <= rec[0]:
                return rec[1] if seq == rec[0] else {"error": SESSION_EXPIRED}
            if rec is None and seq > 1:
                return {"error": SESSION_EXPIRED}
        result = self.apply_data(cmd)
        if session is not None:
            self.sessions[client] = (seq, result, index)
            if len(self.sessions) > self.max_sessions:
                by_age = sorted(self.sessions, key=lambda c: self.sessions[c][2])
                for c in by_age[: len(self.sessions) - self.max_sessions * 9 // 10]:
                    del self.sessions[c]
        return result

    def apply_data(self, cmd: tuple) -> dict:
        op, key = cmd[0], cmd[1]
        if op == "put":
            self.data[key] = cmd[2]
            result: dict = {}
            self.revision += 1
        elif op == "delete":
            existed = key in self.data
            self.data.pop(key, None)
            result = {"deleted": existed}
            self.revision += existed
        elif self.data.get(key) == cmd[2]:  # cas; both None: absent and expected absent
            self.data[key] = cmd[3]
            result = {"swapped": True, "value": cmd[3]}
            self.revision += 1
        else:
            result = {"swapped": False, "value": self.data.get(key)}
        return {**result, "revision": self.revision}


def normalized(result):
    """A session error's message is free text: compare its code only."""
    if isinstance(result, dict) and "error" in result:
        assert isinstance(result.get("message"), str)
        return {"error": result["error"]}
    return result


def as_tuples(sessions: dict[int, SessionRecord]) -> dict:
    return {c: (r.seq, r.result, r.last_index) for c, r in sessions.items()}


def split(items: list, cuts: set[int]) -> list[list]:
    bounds = [0, *sorted(cuts), len(items)]
    return [items[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


@st.composite
def scenarios(draw):
    initial = draw(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=len(KEYS)))
    start = draw(st.integers(0, 6) | st.just(2**32 - 1))
    # Sessions left by earlier entries: distinct last indexes, all <= start.
    clients = draw(st.lists(st.sampled_from(CLIENTS), unique=True, max_size=min(start, len(CLIENTS))))
    indexes = draw(st.lists(st.integers(max(1, start - 10), start), unique=True,
                            min_size=len(clients), max_size=len(clients))) if clients else []
    initial_sessions = {
        c: SessionRecord(draw(st.integers(1, 3)), draw(st.just({}) | st.just({"deleted": True})), i)
        for c, i in zip(clients, indexes, strict=True)
    }
    max_sessions = draw(st.sampled_from([1, 2, 3, 10_000]))
    cmds = draw(st.lists(commands, max_size=30))
    cuts = draw(st.sets(st.integers(1, len(cmds) - 1))) if len(cmds) > 1 else set()
    return initial, initial_sessions, start, max_sessions, cmds, cuts


def check_batches(scenario, backend, reopen=None, reopen_at: frozenset = frozenset()) -> Model:
    """Apply the scenario's commands in its batches; ``reopen(backend)`` at some batch
    boundaries restarts the backend and the state machine, as a node restart would."""
    initial, initial_sessions, start, max_sessions, cmds, cuts = scenario
    backend.write(dict(initial), start, dict(initial_sessions))
    model = Model(initial, initial_sessions, max_sessions)
    entries = [Entry(1, start + 1 + i, encode(c)) for i, c in enumerate(cmds)]

    # One entry at a time through a state machine on a dict.
    single_kv = MemoryStateStore(initial.items(), start)
    single_kv.sessions = dict(initial_sessions)
    single = KVStateMachine(single_kv, max_sessions)
    one_by_one = [normalized(r) for e in entries for r in single.apply([e])]

    sm = KVStateMachine(backend, max_sessions)
    assert sm.applied_index == start
    results = []
    for n, batch in enumerate(split(entries, cuts)):
        if n in reopen_at:
            backend = reopen()
            sm = KVStateMachine(backend, max_sessions)
        results.extend(normalized(r) for r in sm.apply(batch))
        expected = [model.apply(e.index, cmds[e.index - start - 1]) for e in batch]
        assert results[-len(batch):] == expected
        # The state after every batch, not only at the end.
        assert sm.applied_index == backend.applied_index == batch[-1].index
        assert state_of(backend) == model.data
        assert as_tuples(sm.sessions) == as_tuples(backend.load_sessions()) == model.sessions
    assert results == one_by_one
    assert sm.applied_index == single.applied_index == start + len(cmds)
    assert state_of(backend) == single_kv.data == model.data
    assert as_tuples(sm.sessions) == as_tuples(single.sessions) == model.sessions
    for k in KEYS:
        assert sm.get(k) == model.data.get(k)
    return model


@settings(max_examples=500, deadline=None)
@given(scenarios())
def test_any_batch_split_matches_one_by_one_on_memory(scenario) -> None:
    check_batches(scenario, MemoryStateStore())


@settings(max_examples=250, deadline=None)
@given(scenarios(), st.data())
def test_any_batch_split_matches_one_by_one_on_leveldb_with_restarts(scenario, data) -> None:
    n_batches = len(split(list(range(len(scenario[4]))), scenario[5]))
    reopen_at = data.draw(st.frozensets(st.integers(0, max(n_batches, 1))), label="reopen_at")

    with tempfile.TemporaryDirectory(prefix="zraft-test-sm-", dir=FAST_TMP) as d:
        stores = [LevelDBStorage(d)]

        def reopen():
            stores[-1].close()
            stores.append(LevelDBStorage(d))
            return stores[-1].state

        try:
            model = check_batches(scenario, stores[-1].state, reopen, reopen_at)
            reopen()  # and everything is there after a final restart
            storage = stores[-1]
            _, _, start, max_sessions, cmds, _ = scenario
            sm = KVStateMachine(storage.state, max_sessions)
            assert sm.applied_index == storage.state.applied_index == start + len(cmds)
            assert dict(storage.state.items()) == model.data
            assert as_tuples(sm.sessions) == model.sessions
        finally:
            stores[-1].close()
