"""The Raft log as the core sees it.

The log may begin after a snapshot: ``snapshot_index``/``snapshot_term`` describe the
last compacted entry, and ``entries[0]`` (if any) has index ``snapshot_index + 1``.
Entries from ``unstable_from`` on have not been handed to the driver for persistence
yet; the driver learns about them from :meth:`take_unstable`.
"""

from __future__ import annotations

from zraft.raft.messages import Entry


class CompactedError(LookupError):
    """The requested index lies inside the snapshot: the entry is gone."""


class RaftLog:
    __slots__ = ("snapshot_index", "snapshot_term", "entries", "unstable_from", "committed", "applied", "bytes")

    def __init__(self, entries: list[Entry] | None = None, snapshot_index: int = 0, snapshot_term: int = 0,
                 applied: int = 0) -> None:
        self.snapshot_index = snapshot_index
        self.snapshot_term = snapshot_term
        self.entries: list[Entry] = list(entries or [])
        if self.entries and self.entries[0].index != snapshot_index + 1:
            raise ValueError(f"log starts at {self.entries[0].index}, expected {snapshot_index + 1}")
        for prev, cur in zip(self.entries, self.entries[1:], strict=False):
            if cur.index != prev.index + 1 or cur.term < prev.term:
                raise ValueError(f"log is not contiguous or terms decrease at index {cur.index}")
        self.unstable_from = self.last_index + 1  # everything given to us is already persisted
        self.bytes = sum(len(e.data) for e in self.entries)  # the entries' data held in memory
        # Applied entries are committed, and nothing before the snapshot can be uncommitted.
        self.applied = max(applied, snapshot_index)
        self.committed = self.applied

    # --- reading -------------------------------------------------------------------

    @property
    def first_index(self) -> int:
        return self.snapshot_index + 1

    @property
    def last_index(self) -> int:
        return self.snapshot_index + len(self.entries)

    @property
    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.snapshot_term

    def term_at(self, index: int) -> int | None:
        """Term of the entry at ``index``; None past the end. Raises CompactedError inside the snapshot."""
        if index == self.snapshot_index:
            return self.snapshot_term
        if index < self.snapshot_index:
            raise CompactedError(index)
        if index > self.last_index:
            return None
        return self.entries[index - self.snapshot_index - 1].term

    def matches(self, index: int, term: int) -> bool:
        """True when the log holds an entry at ``index`` with ``term`` (the consistency check)."""
        try:
            return self.term_at(index) == term
        except CompactedError:
            # Everything in the snapshot is committed, and committed entries match any leader's.
            return True

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries with lo <= index < hi."""
        if lo <= self.snapshot_index:
            raise CompactedError(lo)
        off = self.snapshot_index + 1
        return self.entries[lo - off : hi - off]

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Is a log ending at (last_index, last_term) at least as up to date as ours? (5.4.1)"""
        return last_term > self.last_term or (last_term == self.last_term and last_index >= self.last_index)

    def first_index_of_term(self, index: int) -> int:
        """The first index of the run of entries with ``index``'s term, not crossing the snapshot."""
        term = self.term_at(index)
        off = self.snapshot_index + 1
        i = index
        while i > self.first_index and self.entries[i - 1 - off].term == term:
            i -= 1
        return i

    def last_index_of_term(self, term: int) -> int | None:
        """The last index holding ``term``, or None if the log holds no entry of that term."""
        for e in reversed(self.entries):
            if e.term == term:
                return e.index
            if e.term < term:
                return None
        return None

    # --- changing --------------------------------------------------------------------

    def append(self, entries: list[Entry]) -> None:
        """Append entries that directly follow the last one (the leader's own proposals)."""
        self.entries.extend(entries)
        self.bytes += sum(len(e.data) for e in entries)

    def merge(self, prev_index: int, entries: list[Entry]) -> int:
        """Follower side of AppendEntries after the consistency check at prev_index passed.

        Skips entries we already hold, truncates at the first conflict (Figure 2, receiver
        rule 3) and appends the rest (rule 4). Returns the index of the last new entry.
        """
        last_new = prev_index + len(entries)
        for i, e in enumerate(entries):
            if e.index <= self.snapshot_index:
                continue
            held = self.term_at(e.index)
            if held == e.term:
                continue
            if held is not None:
                if e.index <= self.committed:
                    raise AssertionError(f"conflict at committed index {e.index}: a bug, or a corrupted log")
                cut = e.index - self.snapshot_index - 1
                self.bytes -= sum(len(x.data) for x in self.entries[cut:])
                del self.entries[cut:]
                self.unstable_from = min(self.unstable_from, e.index)
            self.entries.extend(entries[i:])
            self.bytes += sum(len(x.data) for x in entries[i:])
            break
        return last_new

    def take_unstable(self) -> list[Entry]:
        """Entries the driver must persist now; they count as persisted from here on."""
        if self.unstable_from > self.last_index:
            return []
        out = self.slice(self.unstable_from, self.last_index + 1)
        self.unstable_from = self.last_index + 1
        return out

    def commit_to(self, index: int) -> bool:
        if index > self.committed:
            self.committed = index
            return True
        return False

    def take_committed(self) -> list[Entry]:
        """Committed entries not yet handed out for applying; they count as applied from here on."""
        if self.committed <= self.applied:
            return []
        out = self.slice(self.applied + 1, self.committed + 1)
        self.applied = self.committed
        return out

    def restore(self, index: int, term: int) -> None:
        """Begin the log after a snapshot at (index, term), which must be past the commit index.

        Entries after it stay if the log holds (index, term) itself (log matching: they are
        the leader's too); otherwise every entry goes. Everything up to ``index`` counts as
        committed and applied: the snapshot is the state machine there.
        """
        if index <= self.committed:
            raise ValueError(f"snapshot at {index} is not past the commit index {self.committed}")
        if index <= self.last_index and self.term_at(index) == term:
            self.compact(index, term)
        else:
            self.entries = []
            self.bytes = 0
            self.snapshot_index, self.snapshot_term = index, term
            self.unstable_from = index + 1
        self.committed = self.applied = index

    def compact(self, index: int, term: int) -> None:
        """Drop entries up to ``index`` (already in a snapshot) and remember its term."""
        if index <= self.snapshot_index:
            return
        drop = index - self.snapshot_index
        self.bytes -= sum(len(e.data) for e in self.entries[:drop])
        self.entries = self.entries[drop:] if index <= self.last_index else []
        self.snapshot_index, self.snapshot_term = index, term
        self.unstable_from = max(self.unstable_from, index + 1)
        self.committed = max(self.committed, index)
        self.applied = max(self.applied, index)
