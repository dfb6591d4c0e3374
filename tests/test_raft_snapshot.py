"""Unit tests of log compaction and InstallSnapshot: the core's side (RaftNode.compact,
report_snapshot, the leader's snapshot state, the follower's handling of a complete
snapshot) and the streaming protocol of zraft/raft/snapshot.py (SnapshotSender,
SnapshotReceiver). Test names say which rule they check.
"""

from __future__ import annotations

import random

import pytest

from zraft.raft.core import HardState, RaftConfig, RaftNode, Ready, Role, SnapshotMeta
from zraft.raft.log import RaftLog
from zraft.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    RequestVoteResponse,
    SnapshotAck,
    SnapshotChunk,
    from_wire,
    to_wire,
)
from zraft.raft.snapshot import DONE, FAILED, SENDING, SnapshotReceiver, SnapshotSender
from zraft.raft.tracker import ProgressState

ET = 10


def ents(*terms: int, start: int = 1) -> list[Entry]:
    return [Entry(t, start + i, b"e%d/%d" % (start + i, t)) for i, t in enumerate(terms)]


def node(id: int = 1, n: int = 3, term: int = 0, log: tuple[int, ...] = (), applied: int = 0,
         snapshot_index: int = 0, snapshot_term: int = 0, **kw: object) -> RaftNode:
    kw = {"pre_vote": False, "check_quorum": False, **kw}
    config = RaftConfig(id=id, voters=tuple(range(1, n + 1)), election_ticks=ET, **kw)
    rl = RaftLog(ents(*log, start=snapshot_index + 1), snapshot_index=snapshot_index,
                 snapshot_term=snapshot_term, applied=applied)
    return RaftNode(config, HardState(term, None), rl, random.Random(0))


def drain(r: RaftNode) -> Ready:
    rd = r.ready()
    assert not r.has_ready()
    return rd


def only(rd: Ready, cls: type, dst: int | None = None) -> list:
    """The messages of that type (snapshot requests are not messages: they come in their own list)."""
    assert not any(isinstance(m, InstallSnapshot) for m in rd.messages), rd.messages
    pool = rd.snapshot_requests if cls is InstallSnapshot else rd.messages
    return [m for m in pool if isinstance(m, cls) and (dst is None or m.dst == dst)]


def elect(r: RaftNode) -> Ready:
    r.campaign()
    drain(r)
    for p in r.peers[: len(r.peers) // 2]:
        r.step(RequestVoteResponse(r.term, p, r.id, granted=True))
    assert r.role is Role.LEADER
    return drain(r)


def compacted_leader(log: tuple[int, ...] = (1, 1, 1, 1, 1), compact_to: int = 4, n: int = 3) -> RaftNode:
    """A leader (term 2) that committed and applied its log plus its no-op, then compacted to ``compact_to``.

    Follower 2 is up to date; follower 3 acknowledged nothing (its Progress still probes at the end).
    """
    r = node(1, n, term=1, log=log)
    elect(r)
    last = r.log.last_index
    r.step(AppendEntriesResponse(r.term, 2, 1, success=True, match_index=last))
    assert r.commit_index == last
    drain(r)
    assert r.compact(compact_to) == r.log.term_at(compact_to) if compact_to > r.log.snapshot_index else True
    return r


def reject(r: RaftNode, src: int, prev: int, conflict_index: int = 1) -> None:
    r.step(AppendEntriesResponse(r.term, src, r.id, success=False, reject_index=prev, conflict_term=0,
                                 conflict_index=conflict_index))


def to_snapshot_state(r: RaftNode, peer: int = 3) -> InstallSnapshot:
    """Make ``peer`` reject the leader's probe down to index 1: it needs compacted entries."""
    reject(r, peer, r.progress[peer].next - 1)
    rd = drain(r)
    asks = only(rd, InstallSnapshot, peer)
    assert len(asks) == 1 and not only(rd, AppendEntries, peer)
    return asks[0]


# =============================================================================== compaction


def test_compact_drops_the_entries_up_to_the_index_and_returns_its_term() -> None:
    r = node(log=(1, 1, 2, 2, 3), applied=5)
    assert r.compact(3) == 2
    assert (r.log.snapshot_index, r.log.snapshot_term, r.log.first_index, r.log.last_index) == (3, 2, 4, 5)
    assert [e.index for e in r.log.entries] == [4, 5]
    assert not r.has_ready()  # compaction is the driver's own doing: nothing to persist or send


def test_compact_at_or_before_the_log_start_returns_none() -> None:
    r = node(log=(1, 1, 2), applied=3)
    assert r.compact(2) == 1
    assert r.compact(2) is None and r.compact(1) is None and r.compact(0) is None
    assert r.log.snapshot_index == 2


def test_compact_past_the_applied_index_raises() -> None:
    r = node(log=(1, 1, 2, 2), applied=2)
    r.log.commit_to(4)  # committed but not applied yet: still must not go
    with pytest.raises(ValueError, match="past the applied index"):
        r.compact(3)
    assert r.log.snapshot_index == 0 and r.log.last_index == 4


def test_compact_leaves_commit_applied_and_the_rest_of_the_log_alone() -> None:
    r = compacted_leader()
    assert (r.commit_index, r.applied_index, r.log.last_index) == (6, 6, 6)
    assert r.propose([b"x"]) == 7
    rd = drain(r)
    assert [e.index for e in rd.entries] == [7]
    assert only(rd, AppendEntries, 2)[0].prev_index == 6


def test_node_restarted_from_a_compacted_log_counts_the_snapshot_as_committed_and_applied() -> None:
    r = node(log=(2, 3), snapshot_index=10, snapshot_term=2, applied=10)
    assert (r.log.first_index, r.log.last_index, r.log.last_term) == (11, 12, 3)
    assert (r.commit_index, r.applied_index) == (10, 10)
    assert not r.has_ready()


# =============================================================================== leader: snapshot state


def test_leader_asks_the_driver_for_a_snapshot_when_a_follower_needs_compacted_entries() -> None:
    r = compacted_leader()
    ask = to_snapshot_state(r)
    assert ask == InstallSnapshot(r.term, 1, 3, r.log.snapshot_index, r.log.snapshot_term)
    pr = r.progress[3]
    assert pr.pending_snapshot == 4 and pr.paused()


def test_leader_in_snapshot_state_stays_paused_heartbeats_only() -> None:
    r = compacted_leader()
    to_snapshot_state(r)
    r.propose([b"a", b"b"])
    r.step(HeartbeatResponse(r.term, 3, 1, 0))
    r.tick()
    rd = drain(r)
    assert not only(rd, AppendEntries, 3) and not only(rd, InstallSnapshot, 3)  # no second request either
    assert only(rd, Heartbeat, 3)  # still the leader's: its election timer must not fire
    assert only(rd, AppendEntries, 2)
    assert r.progress[3].pending_snapshot == 4


def test_leader_in_snapshot_state_ignores_rejections() -> None:
    r = compacted_leader()
    to_snapshot_state(r)
    reject(r, 3, 5, conflict_index=2)
    assert not only(drain(r), AppendEntries, 3)
    assert r.progress[3].pending_snapshot == 4


def test_report_snapshot_success_resumes_appends_right_after_the_snapshot_index() -> None:
    r = compacted_leader()
    to_snapshot_state(r)
    r.report_snapshot(3, 5)  # the driver streamed its state as of applied 5 (>= the 4 asked for)
    pr = r.progress[3]
    assert pr.state is ProgressState.PROBE
    [ae] = only(drain(r), AppendEntries, 3)
    assert (ae.prev_index, ae.prev_term) == (5, 1) and [e.index for e in ae.entries] == [6]
    # Its answer moves it to replicating, as after any successful probe.
    r.step(AppendEntriesResponse(r.term, 3, 1, success=True, match_index=6))
    assert r.progress[3].match == 6 and r.progress[3].state is ProgressState.REPLICATE


def test_report_snapshot_success_below_the_log_start_asks_for_a_newer_snapshot() -> None:
    r = compacted_leader()
    to_snapshot_state(r)
    r.compact(6)  # the leader compacted on while the stream ran
    r.report_snapshot(3, 4)
    [ask] = only(drain(r), InstallSnapshot, 3)
    assert ask.index == 6 and r.progress[3].pending_snapshot == 6


def test_report_snapshot_failure_waits_for_a_heartbeat_response_then_asks_again() -> None:
    r = compacted_leader()
    to_snapshot_state(r)
    r.report_snapshot(3, None)
    pr = r.progress[3]
    assert pr.state is not ProgressState.SNAPSHOT and pr.paused()
    assert not only(drain(r), InstallSnapshot) and not only(r.ready(), AppendEntries, 3)
    r.step(HeartbeatResponse(r.term, 3, 1, 0))  # a sign of life
    [ask] = only(drain(r), InstallSnapshot, 3)
    assert ask.index == 4 and r.progress[3].pending_snapshot == 4


def test_report_snapshot_is_ignored_outside_snapshot_state_and_off_the_leader() -> None:
    r = compacted_leader()
    before = (r.progress[3].next, r.progress[3].state, r.progress[3].probe_sent)
    r.report_snapshot(3, 5)
    r.report_snapshot(3, None)
    r.report_snapshot(9, 5)  # not a peer
    assert (r.progress[3].next, r.progress[3].state, r.progress[3].probe_sent) == before
    f = node(2, log=(1, 1))
    f.report_snapshot(3, 1)
    assert not f.has_ready()


def test_an_ack_at_or_past_the_snapshot_ends_snapshot_state() -> None:
    """The follower's answer to the InstallSnapshot may arrive before the stream reports DONE."""
    r = compacted_leader()
    to_snapshot_state(r)
    r.step(AppendEntriesResponse(r.term, 3, 1, success=True, match_index=5))
    pr = r.progress[3]
    assert pr.state is ProgressState.REPLICATE and pr.match == 5
    assert [e.index for e in only(drain(r), AppendEntries, 3)[0].entries] == [6]
    r.report_snapshot(3, 5)  # the stream's DONE, later: nothing changes
    assert r.progress[3].state is not ProgressState.SNAPSHOT and r.progress[3].match == 5


def test_leader_never_answers_an_install_snapshot_of_its_own_term() -> None:
    r = compacted_leader()
    with pytest.raises(AssertionError, match="two leaders"):
        r.step(InstallSnapshot(r.term, 2, 1, 3, 1))


def test_leader_restarted_from_a_compacted_log_sends_a_snapshot_to_a_follower_behind_its_start() -> None:
    r = node(1, term=3, log=(3, 3), snapshot_index=20, snapshot_term=3, applied=20)
    rd = elect(r)
    [probe] = only(rd, AppendEntries, 2)
    assert (probe.prev_index, probe.prev_term) == (22, 3)
    reject(r, 2, 22, conflict_index=8)  # the follower's log ends at 7
    [ask] = only(drain(r), InstallSnapshot, 2)
    assert (ask.index, ask.snap_term) == (20, 3)


# =============================================================================== follower: a complete snapshot


def test_follower_takes_a_newer_snapshot_without_the_entry_reset_log_true() -> None:
    r = node(2, term=2, log=(1, 1, 2), applied=1)
    r.log.commit_to(2)
    drain(r)
    r.step(InstallSnapshot(3, 1, 2, 10, 3))
    rd = drain(r)
    assert rd.snapshot == SnapshotMeta(10, 3, reset_log=True)
    assert (r.log.snapshot_index, r.log.snapshot_term, r.log.last_index) == (10, 3, 10) and r.log.entries == []
    assert (r.commit_index, r.applied_index) == (10, 10)
    assert rd.entries == [] and rd.committed == []  # the snapshot replaces entries 2..10: nothing to apply
    assert rd.messages == [AppendEntriesResponse(3, 2, 1, success=True, match_index=10)]
    assert rd.hard_state == HardState(3, None) and r.leader == 1 and r.role is Role.FOLLOWER


def test_follower_takes_a_newer_snapshot_it_holds_the_entry_of_reset_log_false() -> None:
    r = node(2, term=2, log=(1, 1, 2, 2, 2), applied=1)
    r.step(InstallSnapshot(2, 1, 2, 3, 2))
    rd = drain(r)
    assert rd.snapshot == SnapshotMeta(3, 2, reset_log=False)
    assert [e.index for e in r.log.entries] == [4, 5] and r.log.snapshot_index == 3
    assert (r.commit_index, r.applied_index) == (3, 3)
    assert rd.entries == []  # entries 4, 5 are on disk already and stay there
    assert only(rd, AppendEntriesResponse)[0].match_index == 3


def test_follower_with_another_term_at_the_index_drops_its_whole_log() -> None:
    r = node(2, term=3, log=(1, 1, 2, 2, 2))
    r.step(InstallSnapshot(3, 1, 2, 4, 3))
    rd = drain(r)
    assert rd.snapshot == SnapshotMeta(4, 3, reset_log=True)
    assert r.log.entries == [] and (r.log.last_index, r.log.last_term) == (4, 3)


def test_follower_refuses_a_snapshot_not_past_its_commit_index_and_acks_its_commit_index() -> None:
    r = node(2, term=2, log=(1, 1, 2, 2, 2), applied=2)
    r.log.commit_to(4)
    r.step(InstallSnapshot(2, 1, 2, 3, 2))
    rd = drain(r)
    assert rd.snapshot is None  # the driver throws the staged state away
    assert rd.messages == [AppendEntriesResponse(2, 2, 1, success=True, match_index=4)]
    assert r.log.snapshot_index == 0 and r.log.last_index == 5
    assert [e.index for e in rd.committed] == [3, 4]  # its own log goes on as before


def test_follower_refuses_a_snapshot_at_exactly_its_commit_index() -> None:
    r = node(2, term=2, log=(1, 1, 2), applied=3)
    r.step(InstallSnapshot(2, 1, 2, 3, 2))
    rd = drain(r)
    assert rd.snapshot is None and only(rd, AppendEntriesResponse)[0].match_index == 3


def test_entries_after_a_taken_snapshot_are_appended_and_applied_from_its_index_on() -> None:
    r = node(2, term=2, log=(1,))
    r.step(InstallSnapshot(2, 1, 2, 8, 2))
    drain(r)
    r.step(AppendEntries(2, 1, 2, 8, 2, ents(2, 2, start=9), 10))
    rd = drain(r)
    assert [e.index for e in rd.entries] == [9, 10] and [e.index for e in rd.committed] == [9, 10]
    assert only(rd, AppendEntriesResponse)[0].match_index == 10
    # And an append from before the snapshot is acknowledged without touching it (it is all committed).
    r.step(AppendEntries(2, 1, 2, 3, 1, ents(1, 2, start=4), 10))
    rd = drain(r)
    assert rd.entries == [] and only(rd, AppendEntriesResponse)[0].success


def test_snapshot_resets_the_stored_log_when_entries_up_to_its_index_are_not_persisted_yet() -> None:
    """Bug fixed in core.py: an append in the same batch truncated the stored log (entries 3, 4 of
    term 2) and replaced entry 3; with reset_log false the driver would keep the stale stored entry 4."""
    r = node(2, term=3, log=(1, 1, 2, 2), applied=1)
    r.step(AppendEntries(3, 1, 2, 2, 1, [Entry(3, 3, b"new")], 1))
    r.step(InstallSnapshot(3, 1, 2, 3, 3))
    rd = drain(r)
    assert rd.snapshot == SnapshotMeta(3, 3, reset_log=True)
    stored = [] + rd.entries  # what the driver keeps: nothing, then this Ready's entries
    assert stored == r.log.entries == []
    assert r.log.last_index == 3


def test_snapshot_keeping_unpersisted_entries_after_its_index_hands_them_out_again() -> None:
    r = node(2, term=3, log=(1, 1, 2, 2), applied=1)
    r.step(AppendEntries(3, 1, 2, 2, 1, [Entry(3, 3, b"x"), Entry(3, 4, b"y")], 1))
    r.step(InstallSnapshot(3, 1, 2, 3, 3))
    rd = drain(r)
    assert rd.snapshot.reset_log and rd.entries == [Entry(3, 4, b"y")] == r.log.entries


def test_two_snapshots_in_one_ready_reset_the_log_if_either_did() -> None:
    r = node(2, term=3, log=(1, 1, 2))
    r.step(InstallSnapshot(3, 1, 2, 5, 3))  # resets: no entry 5
    r.step(AppendEntries(3, 1, 2, 5, 3, ents(3, 3, start=6), 5))
    r.step(InstallSnapshot(3, 1, 2, 6, 3))  # would keep entry 7 ... but the stored log is the old one
    rd = drain(r)
    assert rd.snapshot == SnapshotMeta(6, 3, reset_log=True)
    assert [e.index for e in rd.entries] == [7]


# =============================================================================== InstallSnapshot and terms


@pytest.mark.parametrize("role", ["follower", "candidate", "leader"])
def test_install_snapshot_with_a_higher_term_converts_to_follower_of_the_sender(role: str) -> None:
    r = node(2, term=2, log=(1, 2))
    if role == "candidate":
        r.campaign()
    elif role == "leader":
        elect(r)
    drain(r)
    r.step(InstallSnapshot(7, 3, 2, 9, 6))
    rd = drain(r)
    assert (r.term, r.role, r.leader, r.voted_for) == (7, Role.FOLLOWER, 3, None)
    assert rd.hard_state == HardState(7, None) and rd.snapshot == SnapshotMeta(9, 6, True)
    assert rd.messages == [AppendEntriesResponse(7, 2, 3, success=True, match_index=9)]


def test_candidate_gets_an_install_snapshot_of_its_term_and_follows_the_leader() -> None:
    r = node(2, term=2, log=(1, 2))
    r.campaign()
    drain(r)
    r.step(InstallSnapshot(r.term, 3, 2, 9, 3))
    assert r.role is Role.FOLLOWER and r.leader == 3 and r.voted_for == 2  # its vote in this term stays
    assert drain(r).snapshot == SnapshotMeta(9, 3, True)


@pytest.mark.parametrize("check_quorum", [True, False])
def test_install_snapshot_with_a_stale_term_changes_nothing_and_tells_the_sender_the_term(
        check_quorum: bool) -> None:
    r = node(2, term=5, log=(1, 2), check_quorum=check_quorum)
    r.step(InstallSnapshot(4, 1, 2, 9, 4))
    rd = drain(r)
    assert rd.snapshot is None and r.log.last_index == 2 and r.term == 5
    if check_quorum:  # (as for a stale AppendEntries: so that the deposed leader steps down)
        assert rd.messages == [AppendEntriesResponse(5, 2, 1, success=False)]
    else:
        assert rd.messages == []


def test_install_snapshot_resets_the_followers_election_timer() -> None:
    r = node(2, term=2, log=(1,))
    for _ in range(ET - 1):
        r.tick()
    r.step(InstallSnapshot(2, 1, 2, 4, 2))
    for _ in range(ET - 1):
        r.tick()
    assert r.role is Role.FOLLOWER and r.leader == 1


# =============================================================================== SnapshotSender


def sender(chunks: list[bytes], window: int = 2, retry: int = 3, give_up: int = 10, **kw: object) -> SnapshotSender:
    return SnapshotSender(stream=77, term=4, src=1, dst=2, index=50, snap_term=3, chunks=iter(chunks),
                          window=window, retry_ticks=retry, give_up_ticks=give_up, **kw)


def ack(seq: int, ok: bool = True, done: bool = False, stream: int = 77, src: int = 2) -> SnapshotAck:
    return SnapshotAck(4, src, 1, stream, seq, ok, done)


def test_sender_keeps_at_most_window_chunks_unacknowledged() -> None:
    s = sender([b"a", b"b", b"c", b"d", b"e"], window=2)
    first = s.pump()
    assert [c.seq for c in first] == [0, 1] and s.pump() == []
    assert [c.seq for c in s.on_ack(ack(0))] == [2]
    assert [c.seq for c in s.on_ack(ack(2))] == [3, 4]  # cumulative: 1 and 2 at once
    assert len(s.unacked) == 2


def test_sender_reads_the_snapshot_lazily_only_window_plus_one_ahead() -> None:
    consumed = []

    def gen():
        for i in range(100):
            consumed.append(i)
            yield b"%d" % i

    s = SnapshotSender(stream=1, term=1, src=1, dst=2, index=5, snap_term=1, chunks=gen(), window=3)
    s.pump()
    assert len(consumed) == 4  # three out, one read ahead (is the third the last?)


def test_sender_last_chunk_carries_the_index_and_term_and_the_others_do_not() -> None:
    s = sender([b"a", b"b"], window=4)
    a, b = s.pump()
    assert (a.last, a.index, a.snap_term) == (False, 0, 0)
    assert (b.last, b.index, b.snap_term, b.data) == (True, 50, 3, b"b")
    assert s.pump() == []  # nothing after the last


def test_sender_empty_snapshot_is_one_last_chunk() -> None:
    s = sender([])
    [c] = s.pump()
    assert (c.seq, c.data, c.last, c.index, c.snap_term) == (0, b"", True, 50, 3)


def test_sender_go_back_n_resends_every_unacknowledged_chunk_every_retry_ticks() -> None:
    s = sender([b"a", b"b", b"c", b"d"], window=3, retry=3)
    s.pump()
    s.on_ack(ack(0))
    assert s.tick() == [] and s.tick() == []
    assert [c.seq for c in s.tick()] == [1, 2, 3]
    assert s.tick() == [] and s.tick() == [] and [c.seq for c in s.tick()] == [1, 2, 3]
    assert s.chunks_sent == 4 + 6


def test_sender_gives_up_after_give_up_ticks_without_progress() -> None:
    s = sender([b"a", b"b"], retry=2, give_up=6)
    s.pump()
    for _ in range(5):
        s.tick()
    assert s.state == SENDING
    assert s.tick() == [] and s.state == FAILED
    assert s.tick() == [] and s.on_ack(ack(1, done=True)) == [] and s.state == FAILED


def test_sender_progress_restarts_the_give_up_clock_but_duplicate_acks_do_not() -> None:
    s = sender([b"a", b"b", b"c"], window=1, retry=2, give_up=4)
    s.pump()
    for _ in range(3):
        s.tick()
    s.on_ack(ack(0))  # progress
    for _ in range(3):
        s.tick()
        s.on_ack(ack(0))  # the same again: no progress
    assert s.state == SENDING
    s.tick()
    assert s.state == FAILED


def test_sender_last_chunk_counts_only_on_the_done_ack() -> None:
    s = sender([b"a", b"b"], window=2)
    s.pump()
    assert s.on_ack(ack(1)) == [] and [c.seq for c in s.unacked] == [1]  # follower has it, core deciding
    assert s.state == SENDING
    s.on_ack(ack(1, done=True))
    assert s.state == DONE and not s.unacked


def test_sender_acks_of_the_last_chunk_without_done_do_not_hold_off_giving_up() -> None:
    """Bug fixed in snapshot.py: re-queueing the last chunk counted as progress, so a follower that
    never decided (answering each resend with "have it all, not done") kept the stream alive forever."""
    s = sender([b"a"], window=1, retry=1, give_up=5)
    s.pump()
    for _ in range(4):
        s.tick()
        s.on_ack(ack(0))
    s.tick()
    assert s.state == FAILED


def test_sender_refusal_of_a_chunk_first_sent_after_an_acknowledgement_fails_at_once() -> None:
    s = sender([b"a", b"b", b"c", b"d"], window=2)
    s.pump()  # 0, 1
    s.on_ack(ack(0))  # 2 goes out: the first chunk sent after the receiver showed it knew the stream
    assert s.on_ack(ack(1, ok=False)) == [] and s.state == SENDING  # 1 went out before: maybe reordering
    assert s.on_ack(ack(2, ok=False)) == [] and s.state == FAILED  # the receiver lost the stream


def test_sender_refusal_of_a_chunk_resent_after_an_acknowledgement_fails() -> None:
    """The whole stream went out in the first window; the receiver acked some, then restarted."""
    s = sender([b"a", b"b", b"c"], window=4, retry=2)
    s.pump()  # 0, 1, 2 (last): all before any ack
    s.on_ack(ack(1))
    assert s.on_ack(ack(2, ok=False)) == [] and s.state == SENDING  # maybe an old refusal
    s.tick()
    assert [c.seq for c in s.tick()] == [2]  # the resend ...
    assert s.on_ack(ack(2, ok=False)) == [] and s.state == FAILED  # ... refused: the stream is gone


def test_sender_refusal_before_any_acknowledgement_keeps_the_stream_going() -> None:
    """Fixed in snapshot.py: chunk 1 overtaking chunk 0 is refused (unknown stream); that must not end
    the stream: the retry resends chunk 0, which begins it."""
    s = sender([b"a", b"b", b"c"], window=2, retry=2)
    s.pump()
    assert s.on_ack(ack(1, ok=False)) == [] and s.state == SENDING
    s.tick()
    assert [c.seq for c in s.tick()] == [0, 1]


def test_sender_ignores_acks_of_other_streams_and_peers() -> None:
    s = sender([b"a", b"b", b"c"], window=1)
    s.pump()
    assert s.on_ack(ack(0, stream=78)) == [] and s.on_ack(ack(0, src=3)) == []
    assert s.on_ack(ack(0, ok=False, stream=78)) == [] and s.state == SENDING
    assert [c.seq for c in s.unacked] == [0]


# =============================================================================== SnapshotReceiver


def chunk(seq: int, data: bytes = b"x", last: bool = False, stream: int = 77, src: int = 1, term: int = 4,
          index: int = 50, snap_term: int = 3) -> SnapshotChunk:
    return SnapshotChunk(term, src, 2, stream, seq, data, last, index if last else 0, snap_term if last else 0)


def test_receiver_takes_chunks_in_order_and_acknowledges_each() -> None:
    r = SnapshotReceiver(2)
    v = r.on_chunk(chunk(0, b"a"), 4)
    assert v.begin and v.data == b"a" and v.reply == SnapshotAck(4, 2, 1, 77, 0, True, False)
    v = r.on_chunk(chunk(1, b"b"), 4)
    assert not v.begin and v.data == b"b" and v.reply.seq == 1 and v.complete is None
    assert r.active and not r.completed


def test_receiver_complete_hands_out_the_install_snapshot_and_waits_for_finish() -> None:
    r = SnapshotReceiver(2)
    r.on_chunk(chunk(0, b"a"), 4)
    v = r.on_chunk(chunk(1, b"b", last=True), 4)
    assert v.data == b"b" and v.reply is None  # no ack until the core decided
    assert v.complete == InstallSnapshot(4, 1, 2, 50, 3)
    assert r.completed and r.active
    assert r.finish() == SnapshotAck(4, 2, 1, 77, 1, True, True)
    assert not r.active and r.finish() is None  # once


def test_receiver_finish_before_completion_gives_nothing() -> None:
    r = SnapshotReceiver(2)
    assert r.finish() is None
    r.on_chunk(chunk(0), 4)
    assert r.finish() is None


def test_receiver_empty_snapshot_completes_on_its_only_chunk() -> None:
    r = SnapshotReceiver(2)
    v = r.on_chunk(chunk(0, b"", last=True), 4)
    assert v.begin and v.data == b"" and v.complete == InstallSnapshot(4, 1, 2, 50, 3)


def test_receiver_duplicate_and_out_of_order_chunks_are_not_taken_and_reacknowledge_the_prefix() -> None:
    r = SnapshotReceiver(2)
    r.on_chunk(chunk(0), 4)
    r.on_chunk(chunk(1), 4)
    for seq in (0, 1, 3, 5):
        v = r.on_chunk(chunk(seq), 4)
        assert v.data is None and not v.begin and v.complete is None
        assert (v.reply.seq, v.reply.ok, v.reply.done) == (1, True, False)
    assert r.on_chunk(chunk(2), 4).data == b"x"


def test_receiver_after_finish_answers_resends_with_done() -> None:
    r = SnapshotReceiver(2)
    r.on_chunk(chunk(0, last=True), 4)
    r.finish()
    v = r.on_chunk(chunk(0, last=True), 4)  # the done ack was lost: the sender resends
    assert v.data is None and v.complete is None and (v.reply.seq, v.reply.done) == (0, True)


def test_receiver_refuses_a_chunk_of_a_stream_it_does_not_know() -> None:
    r = SnapshotReceiver(2)  # e.g. restarted mid-install
    v = r.on_chunk(chunk(3), 4)
    assert v.reply == SnapshotAck(4, 2, 1, 77, 3, False, False) and v.data is None and not v.begin


def test_receiver_new_stream_replaces_the_one_in_progress() -> None:
    r = SnapshotReceiver(2)
    r.on_chunk(chunk(0), 4)
    r.on_chunk(chunk(1), 4)
    v = r.on_chunk(chunk(0, b"n", stream=88, term=5), 5)
    assert v.begin and v.data == b"n" and v.reply.stream == 88
    assert r.on_chunk(chunk(2), 5).reply is None or r.on_chunk(chunk(2), 5).reply.ok is False


def test_receiver_refuses_a_new_stream_of_an_older_term_than_the_one_in_progress() -> None:
    r = SnapshotReceiver(2)
    r.on_chunk(chunk(0, term=6, src=3, stream=5), 6)
    v = r.on_chunk(chunk(0, term=4), 4)  # the core has not learned term 6 yet: the receiver has
    assert not v.begin and v.reply.ok is False


def test_receiver_ignores_chunks_of_a_term_older_than_the_cores() -> None:
    r = SnapshotReceiver(2)
    v = r.on_chunk(chunk(0, term=3), 4)
    assert v == type(v)() and not r.active  # nothing to do, nothing to say to a deposed leader


def test_receiver_refuses_a_new_stream_while_the_core_decides_on_a_complete_one() -> None:
    """Fixed in snapshot.py: the staged state is what the core is deciding on; a new stream beginning
    now would make the driver install (part of) another stream's state at the first one's index."""
    r = SnapshotReceiver(2)
    r.on_chunk(chunk(0, last=True), 4)
    v = r.on_chunk(chunk(0, stream=88), 4)
    assert not v.begin and v.data is None and v.reply.ok is False
    r.finish()
    assert r.on_chunk(chunk(0, stream=88), 4).begin  # once it decided, the new stream may begin


def test_receiver_refuses_a_late_copy_of_the_first_chunk_of_a_stream_it_saw_before() -> None:
    """Fixed in snapshot.py: a duplicate of an old stream's first chunk, delayed in the network, would
    begin that (dead) stream again and throw away the live one."""
    r = SnapshotReceiver(2)
    r.on_chunk(chunk(0, stream=77), 4)
    r.on_chunk(chunk(0, stream=88), 4)
    r.on_chunk(chunk(1, stream=88), 4)
    v = r.on_chunk(chunk(0, stream=77), 4)
    assert not v.begin and v.reply.ok is False
    assert r.on_chunk(chunk(2, stream=88), 4).data == b"x"  # the live stream goes on


def test_receiver_abandon_forgets_the_stream() -> None:
    r = SnapshotReceiver(2)
    r.on_chunk(chunk(0), 4)
    r.abandon()
    assert not r.active and r.on_chunk(chunk(1), 4).reply.ok is False


def test_stream_messages_survive_the_wire_and_install_snapshot_never_comes_off_it() -> None:
    for m in (chunk(3, b"\x00\xff", last=True), SnapshotAck(4, 2, 1, 77, -1, False, True)):
        assert from_wire(to_wire(m)) == m
    with pytest.raises(ValueError, match="unknown raft message type 7"):
        from_wire(to_wire(InstallSnapshot(4, 1, 2, 50, 3)))


def _receive(r: SnapshotReceiver, m: SnapshotChunk, staged: list[bytes]) -> list:
    """The follower's driver, for one chunk: stage what it says, answer what it says."""
    v = r.on_chunk(m, 1)
    if v.begin:
        staged.clear()
    if v.data is not None:
        staged.append(v.data)
    out = [v.reply] if v.reply is not None else []
    if v.complete is not None:
        assert v.complete.index == 40
        out.append(r.finish())
    return out


@pytest.mark.parametrize("seed", range(40))
def test_a_stream_over_a_lossy_duplicating_reordering_channel_delivers_every_record_once(seed: int) -> None:
    rng = random.Random(seed)
    records = [b"r%d" % i for i in range(rng.randrange(0, 30))]
    s = SnapshotSender(stream=9, term=1, src=1, dst=2, index=40, snap_term=1, chunks=iter(records),
                       window=rng.choice((1, 2, 4, 8)), retry_ticks=3, give_up_ticks=10_000)
    # (A tick every 3 units, so a retry interval of 9 units: longer than any delay here, up to 7 units.
    # Then no refusal from before the stream began can come back after a resend, and one stream does it.)
    r = SnapshotReceiver(2)
    staged: list[bytes] = []
    net: list[tuple[int, object]] = [(rng.randrange(5), c) for c in s.pump()]
    now = 0
    while s.state == SENDING:
        now += 1
        assert now < 20_000
        due = [m for t, m in net if t <= now]
        net = [(t, m) for t, m in net if t > now]
        rng.shuffle(due)
        out: list = []
        for m in due:
            out += _receive(r, m, staged) if isinstance(m, SnapshotChunk) else s.on_ack(m)
        if now % 3 == 0:
            out += s.tick()
        for m in out:
            if rng.random() < 0.2:
                continue  # lost
            for _ in range(2 if rng.random() < 0.1 else 1):
                net.append((now + 1 + rng.randrange(6), m))
    assert s.state == DONE
    assert [d for d in staged if d] == records
