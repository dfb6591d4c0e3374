"""Unit tests of RaftLog: snapshot offset, term_at, matches, merge, take_unstable, commit/apply, compact."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zraft.raft.log import CompactedError, RaftLog
from zraft.raft.messages import Entry


def ents(*terms: int, start: int = 1, tag: bytes = b"") -> list[Entry]:
    return [Entry(t, start + i, b"%s%d/%d" % (tag, start + i, t)) for i, t in enumerate(terms)]


def persisted(*terms: int, **kw: int) -> RaftLog:
    """A log as a restarted node loads it: everything already persisted."""
    log = RaftLog(ents(*terms, start=kw.get("snapshot_index", 0) + 1), **kw)
    assert log.take_unstable() == []
    return log


# ------------------------------------------------------------------ construction and reading


def test_empty_log() -> None:
    log = RaftLog()
    assert (log.first_index, log.last_index, log.last_term) == (1, 0, 0)
    assert log.term_at(0) == 0 and log.term_at(1) is None
    assert log.matches(0, 0) and not log.matches(0, 1) and not log.matches(1, 0)
    assert (log.committed, log.applied) == (0, 0)
    assert log.take_unstable() == [] and log.take_committed() == []


@pytest.mark.parametrize("entries, snapshot_index", [
    (ents(1, 1, start=2), 0),  # does not start right after the snapshot
    (ents(1, 1, start=5), 5),
    ([Entry(1, 1), Entry(1, 3)], 0),  # a gap
    (ents(2, 1), 0),  # terms go down
])
def test_constructor_rejects_malformed_logs(entries: list[Entry], snapshot_index: int) -> None:
    with pytest.raises(ValueError):
        RaftLog(entries, snapshot_index=snapshot_index)


def test_snapshot_offset_shifts_every_index() -> None:
    log = persisted(3, 3, 4, snapshot_index=5, snapshot_term=2, applied=3)
    assert (log.first_index, log.last_index, log.last_term) == (6, 8, 4)
    assert log.term_at(5) == 2  # the snapshot's own term
    assert [log.term_at(i) for i in (6, 7, 8, 9)] == [3, 3, 4, None]
    with pytest.raises(CompactedError):
        log.term_at(4)
    assert log.slice(6, 8) == ents(3, 3, start=6)
    assert log.slice(7, 100) == ents(3, 4, start=7)
    with pytest.raises(CompactedError):
        log.slice(5, 7)
    # Everything in a snapshot is applied and committed, whatever applied index was given.
    assert (log.applied, log.committed) == (5, 5)
    assert RaftLog(ents(3, start=6), snapshot_index=5, snapshot_term=2, applied=7).applied == 7


def test_snapshot_with_no_entries_after_it() -> None:
    log = RaftLog([], snapshot_index=4, snapshot_term=2)
    assert (log.first_index, log.last_index, log.last_term) == (5, 4, 2)
    assert log.matches(4, 2) and not log.matches(4, 1) and not log.matches(5, 2)


def test_matches_is_the_consistency_check() -> None:
    log = persisted(1, 1, 2, 3)
    assert log.matches(0, 0)
    assert log.matches(3, 2) and log.matches(4, 3)
    assert not log.matches(3, 1) and not log.matches(5, 3) and not log.matches(4, 2)
    snap = persisted(3, snapshot_index=5, snapshot_term=2)
    # Inside the snapshot everything is committed, and committed entries match any leader's.
    assert snap.matches(2, 1) and snap.matches(5, 2) and snap.matches(6, 3) and not snap.matches(6, 2)


@pytest.mark.parametrize("last_index, last_term, ok", [
    (4, 3, True), (9, 3, True), (3, 3, False),  # same last term: the longer log (or equal) wins
    (1, 4, True), (0, 9, True),  # a later last term wins however short
    (100, 2, False), (0, 0, False),
])
def test_is_up_to_date_5_4_1(last_index: int, last_term: int, ok: bool) -> None:
    assert persisted(1, 1, 2, 3).is_up_to_date(last_index, last_term) is ok


def test_first_and_last_index_of_term() -> None:
    log = persisted(1, 1, 2, 2, 2, 4, 4)
    assert [log.first_index_of_term(i) for i in range(1, 8)] == [1, 1, 3, 3, 3, 6, 6]
    assert log.first_index_of_term(0) == 0
    assert [log.last_index_of_term(t) for t in (1, 2, 3, 4, 5)] == [2, 5, None, 7, None]
    snap = persisted(2, 2, 3, snapshot_index=5, snapshot_term=2)
    assert snap.first_index_of_term(7) == 6  # does not cross into the snapshot
    assert snap.last_index_of_term(2) == 7


# ------------------------------------------------------------------ merge (AppendEntries receiver 3 and 4)


def test_merge_appends_at_the_end() -> None:
    log = persisted(1, 1)
    assert log.merge(2, ents(1, 2, start=3)) == 4
    assert log.entries == ents(1, 1, 1, 2)
    assert log.take_unstable() == ents(1, 2, start=3)
    assert log.take_unstable() == []


def test_merge_of_entries_already_held_changes_nothing() -> None:
    log = persisted(1, 1, 2, 2)
    assert log.merge(1, ents(1, 2, start=2)) == 3  # the index of the last *new* entry, not of the log
    assert log.entries == ents(1, 1, 2, 2) and log.take_unstable() == []
    assert log.merge(4, []) == 4 and log.merge(0, []) == 0


def test_merge_truncates_at_the_first_conflict_and_reports_the_replacement() -> None:
    log = persisted(1, 1, 2, 2, 2)
    new = ents(1, 3, 3, start=2, tag=b"new")
    assert log.merge(1, new) == 4
    # Entry 2 is already held (same index and term means the same entry: log matching): kept, not
    # rewritten; the rest is replaced from 3 on, including the old entry 5 the new ones do not reach.
    assert log.entries == ents(1, 1) + ents(3, 3, start=3, tag=b"new")
    assert log.last_index == 4
    assert log.take_unstable() == ents(3, 3, start=3, tag=b"new")


def test_merge_truncation_of_unstable_entries_only() -> None:
    log = persisted(1, 1)
    log.merge(2, ents(2, 2, 2, start=3))  # 3-5 unstable
    log.merge(3, ents(4, start=4, tag=b"x"))  # 4-5 replaced before anything was persisted
    assert log.take_unstable() == ents(2, start=3) + ents(4, start=4, tag=b"x")
    assert log.last_index == 4


def test_merge_after_partial_persist_reports_from_the_truncation_point() -> None:
    log = persisted(1)
    log.merge(1, ents(2, 2, 2, start=2))
    assert log.take_unstable() == ents(2, 2, 2, start=2)  # persisted now
    log.merge(2, ents(3, start=3, tag=b"x"))
    assert log.take_unstable() == ents(3, start=3, tag=b"x")  # the driver replaces from 3 on


def test_merge_refuses_to_overwrite_committed_entries() -> None:
    log = persisted(1, 1, 2)
    log.commit_to(3)
    with pytest.raises(AssertionError):
        log.merge(2, ents(3, start=3))
    assert log.entries == ents(1, 1, 2)


def test_merge_skips_entries_inside_the_snapshot() -> None:
    log = persisted(2, 2, snapshot_index=3, snapshot_term=1)
    assert log.merge(1, ents(1, 1, 2, 2, 3, start=2)) == 6
    assert log.entries == ents(2, 2, start=4) + ents(3, start=6)
    assert log.take_unstable() == ents(3, start=6)


def _terms(max_len: int = 12) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(1, 4), max_size=max_len).map(sorted)


@settings(max_examples=300, deadline=None)
@given(leader=_terms(), follower=_terms(), data=st.data())
def test_merge_model(leader: list[int], follower: list[int], data: st.DataObject) -> None:
    """Against a model: after a successful consistency check at prev, merging leader[prev:hi] makes the
    log agree with the leader up to hi, keeps what follows when nothing conflicts, and take_unstable()
    returns exactly the suffix to write from the first changed index on."""
    lead = ents(*[2 * t for t in leader], tag=b"L")  # even terms
    # The follower shares a prefix with the leader, then diverges with odd terms: log matching holds
    # (an (index, term) pair never names two different entries).
    shared = data.draw(st.integers(0, len(lead)))
    floor = lead[shared - 1].term + 1 if shared else 1
    fol = lead[:shared] + ents(*[max(2 * t + 1, floor) for t in follower], start=shared + 1, tag=b"F")
    log = RaftLog(list(fol))
    prev = data.draw(st.integers(0, shared))
    hi = data.draw(st.integers(prev, len(lead)))
    assert log.matches(prev, lead[prev - 1].term if prev else 0)
    assert log.merge(prev, lead[prev:hi]) == hi
    after = log.entries
    if hi <= shared:  # nothing new: a duplicate, the log is untouched
        assert after == fol and log.take_unstable() == []
    elif shared < len(fol):  # the leader's entries conflict with the follower's suffix: replaced
        assert after == lead[:hi]
        assert log.take_unstable() == lead[shared:hi]
    else:  # the follower's log is a prefix of the leader's: appended
        assert after == lead[:hi]
        assert log.take_unstable() == lead[shared:hi]


# ------------------------------------------------------------------ commit, apply, compact


def test_commit_is_monotonic_and_committed_entries_come_out_once() -> None:
    log = persisted(1, 1, 1, 1)
    assert log.commit_to(2) and not log.commit_to(1) and not log.commit_to(2)
    assert log.committed == 2
    assert log.take_committed() == ents(1, 1)
    assert log.take_committed() == []
    log.commit_to(4)
    assert log.take_committed() == ents(1, 1, start=3) and log.applied == 4


def test_restart_resumes_applying_after_the_applied_index() -> None:
    log = persisted(1, 1, 2, applied=2)
    assert (log.applied, log.committed) == (2, 2)
    log.commit_to(3)
    assert log.take_committed() == ents(2, start=3)


def test_compact_drops_the_prefix_and_remembers_its_last_term() -> None:
    log = persisted(1, 1, 2, 2, 3)
    log.commit_to(4)
    log.take_committed()
    log.compact(3, 2)
    assert (log.snapshot_index, log.snapshot_term, log.first_index, log.last_index) == (3, 2, 4, 5)
    assert log.entries == ents(2, 3, start=4)
    assert log.term_at(3) == 2 and log.term_at(5) == 3
    with pytest.raises(CompactedError):
        log.term_at(2)
    log.compact(2, 1)  # below the snapshot: nothing to do
    assert (log.snapshot_index, log.entries) == (3, ents(2, 3, start=4))
    assert log.take_unstable() == []


def test_compact_past_the_end_installs_a_snapshot() -> None:
    log = persisted(1, 1)
    log.merge(2, ents(1, start=3))  # unstable
    log.compact(10, 4)
    assert (log.first_index, log.last_index, log.last_term) == (11, 10, 4)
    assert log.entries == [] and log.take_unstable() == []
    assert (log.committed, log.applied) == (10, 10)
    log.append(ents(5, start=11))
    assert log.take_unstable() == ents(5, start=11)


def test_the_log_knows_how_many_bytes_of_data_it_holds() -> None:
    from zraft.raft.messages import Entry as E

    log = RaftLog([E(1, 1, b"aa"), E(1, 2, b"bbb")])
    assert log.bytes == 5
    log.append([E(2, 3, b"cccc")])
    assert log.bytes == 9
    log.merge(1, [E(3, 2, b"z")])  # replaces 2 and 3
    assert log.bytes == 3 and [e.data for e in log.entries] == [b"aa", b"z"]
    log.commit_to(2)
    log.take_committed()
    log.compact(1, 1)
    assert log.bytes == 1
    log.restore(9, 3)
    assert log.bytes == 0
