"""zraft/raft/tracker.py: Inflights by count and bytes, Progress states, the ProgressTracker."""

from __future__ import annotations

import pytest

from zraft.raft.core import RaftConfig, RaftNode
from zraft.raft.messages import AppendEntriesResponse, Entry
from zraft.raft.quorum import VoteResult
from zraft.raft.tracker import Inflights, Progress, ProgressState, ProgressTracker


def test_inflights_are_bounded_by_count() -> None:
    f = Inflights(max_msgs=3)
    for i in (5, 7, 9):
        assert not f.full()
        f.add(i, 100)
    assert f.full() and len(f) == 3 and f.bytes == 300
    f.free_le(7)
    assert len(f) == 1 and f.bytes == 100 and not f.full()
    f.free_first_one()
    assert len(f) == 0 and f.bytes == 0
    f.free_first_one()  # nothing to free: no error
    assert len(f) == 0


def test_inflights_are_bounded_by_bytes_too() -> None:
    f = Inflights(max_msgs=100, max_bytes=1000)
    f.add(1, 600)
    assert not f.full()
    f.add(2, 600)  # one message may take it over the bound; then nothing more until acks come
    assert f.full() and f.bytes == 1200
    f.free_le(1)
    assert not f.full() and f.bytes == 600
    f.reset()
    assert len(f) == 0 and f.bytes == 0


def test_inflights_refuse_nonsense_bounds() -> None:
    with pytest.raises(ValueError):
        Inflights(0)
    with pytest.raises(ValueError):
        Inflights(1, -1)


def _progress(next_index: int = 5, match: int = 4, msgs: int = 2, max_bytes: int = 0) -> Progress:
    return Progress(next_index, Inflights(msgs, max_bytes), match)


def test_progress_states_and_pausing() -> None:
    pr = _progress()
    assert pr.state is ProgressState.PROBE and not pr.paused()
    pr.sent(None)  # the probe
    assert pr.probe_sent and pr.paused()
    pr.become_replicate()
    assert pr.state is ProgressState.REPLICATE and pr.next == 5 and not pr.paused()
    pr.sent(6, 10)
    pr.sent(8, 10)
    assert pr.next == 9 and pr.paused()  # the window of 2 messages is full
    assert pr.maybe_update(6) and pr.match == 6
    pr.inflights.free_le(6)
    assert not pr.paused()
    assert not pr.maybe_update(5)  # an old acknowledgement changes nothing
    pr.become_snapshot(20)
    assert pr.state is ProgressState.SNAPSHOT and pr.pending_snapshot == 20 and pr.paused()
    pr.become_probe()
    assert pr.state is ProgressState.PROBE and pr.next == 7 and pr.pending_snapshot == 0 and len(pr.inflights) == 0


def test_tracker_answers_every_quorum_question() -> None:
    t = ProgressTracker([1, 2, 3], max_inflight_msgs=4)
    t.reset(next_index=11)
    assert t.ids == [1, 2, 3] and all(pr.next == 11 for pr in t.progress.values())
    t.progress[1].match, t.progress[2].match, t.progress[3].match = 10, 7, 3
    assert t.committed() == 7
    t.progress[1].recent_active = True
    assert not t.quorum_active()
    t.progress[3].recent_active = True
    assert t.quorum_active()
    t.progress[1].read_seq, t.progress[2].read_seq = 5, 4
    assert t.confirmed_read_seq() == 4
    t.reset_votes()
    t.record_vote(1, True)
    assert t.tally_votes() is VoteResult.PENDING
    t.record_vote(2, False)
    t.record_vote(2, True)  # only the first answer counts
    assert t.tally_votes() is VoteResult.PENDING
    t.record_vote(3, False)
    assert t.tally_votes() is VoteResult.LOST
    t.clear()
    assert t.progress == {}


def test_the_leader_is_tracked_like_any_member() -> None:
    """A single-node cluster commits through the tracker alone: its own match is its durable log."""
    r = RaftNode(RaftConfig(id=1, voters=(1,), election_ticks=2))
    while r.role.value != "leader":
        r.tick()
        r.ready()
    assert r.progress[1].state is ProgressState.REPLICATE
    r.propose([b"x"])
    r.ready()  # handed to the driver: durable before the next call, so it counts
    assert r.progress[1].match == r.log.last_index == r.commit_index


def test_inflight_bytes_bound_the_leaders_window() -> None:
    """With max_inflight_bytes, a follower gets no more appends once that many bytes are unacknowledged."""
    r = RaftNode(RaftConfig(id=1, voters=(1, 2, 3), election_ticks=2, max_msg_bytes=100,
                            max_inflight_msgs=256, max_inflight_bytes=300))
    while r.role.value != "leader":
        r.tick()
        rd = r.ready()
        for m in rd.messages:
            if m.TYPE == 1:  # RequestVote: grant it
                from zraft.raft.messages import RequestVoteResponse
                r.step(RequestVoteResponse(m.term, m.dst, 1, granted=True, pre_vote=m.pre_vote))
    r.ready()
    for p in (2, 3):  # both acknowledge the no-op: replicating
        r.step(AppendEntriesResponse(r.term, p, 1, success=True, match_index=r.log.last_index))
    r.ready()
    for _ in range(20):  # 20 proposals of ~106 bytes each: one AppendEntries each, while the window allows
        r.propose([b"v" * 90])
    appends = [m for m in r.ready().messages if m.TYPE == 3 and m.dst == 2]
    sent = sum(len(m.entries) for m in appends)
    assert sent == 3, f"{sent} entries in flight to node 2 with a 300-byte bound"
    assert r.progress[2].inflights.full()
    r.step(AppendEntriesResponse(r.term, 2, 1, success=True, match_index=appends[0].entries[-1].index))
    more = [m for m in r.ready().messages if m.TYPE == 3 and m.dst == 2]
    assert more and more[0].entries[0].index == appends[-1].entries[-1].index + 1
    assert isinstance(more[0].entries[0], Entry)


def test_the_leader_counts_the_bytes_it_has_not_committed_yet() -> None:
    r = RaftNode(RaftConfig(id=1, voters=(1, 2, 3), election_ticks=2, pre_vote=False))
    while r.role.value != "leader":
        r.tick()
        for m in r.ready().messages:
            if m.TYPE == 1:
                from zraft.raft.messages import RequestVoteResponse
                r.step(RequestVoteResponse(m.term, m.dst, 1, granted=True))
    r.ready()
    assert r.uncommitted_bytes == 0  # (the no-op carries nothing)
    r.propose([b"x" * 100, b"y" * 50])
    r.ready()
    assert r.uncommitted_bytes == 150
    r.step(AppendEntriesResponse(r.term, 2, 1, success=True, match_index=r.log.last_index - 1))
    assert r.uncommitted_bytes == 50 and r.commit_index == r.log.last_index - 1
    r.step(AppendEntriesResponse(r.term, 2, 1, success=True, match_index=r.log.last_index))
    assert r.uncommitted_bytes == 0
    r.propose([b"z" * 10])
    r.step(AppendEntriesResponse(r.term + 1, 2, 1, success=False))  # a newer term: no longer leader
    assert r.role.value == "follower" and r.uncommitted_bytes == 0
