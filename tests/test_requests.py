"""PendingRequests (zraft/node/requests.py): which client a finished entry answers, and deadlines."""

from __future__ import annotations

from zraft.node.requests import PendingRequests

A, B, C = [b"a"], [b"b"], [b"c"]


def test_a_later_write_at_the_same_index_does_not_replace_the_earlier_one() -> None:
    """Leader of term 2 proposes A at index 10 and loses its term; leading again in term 4, it puts B
    at index 10. When (10, term 4) is applied, B gets its result and A learns it did not take effect.
    Keyed by index alone, B overwrote A: A was never answered, and A's deadline timed out B."""
    p = PendingRequests()
    p.add_writes(10, 2, [A], deadline=5.0)
    p.add_writes(10, 4, [B], deadline=9.0)
    assert p.expired(6.0) == [(A, True)]  # A's deadline: A times out, B keeps waiting
    assert p.applied(10, 4) == [(B, True)]
    assert p.applied(10, 4) == []  # answered once


def test_the_entry_of_another_term_answers_every_write_at_its_index_as_not_taken() -> None:
    p = PendingRequests()
    p.add_writes(7, 2, [A, C], deadline=5.0)
    p.add_writes(7, 3, [B], deadline=5.0)
    assert sorted(p.applied(7, 5)) == [(A, False), (B, False)]  # a term-5 leader's entry took index 7
    assert p.applied(8, 2) == [(C, True)]
    assert p.expired(100.0) == []  # nothing is left to time out


def test_reads_and_writes_expire_in_deadline_order_and_drain_at_shutdown() -> None:
    p = PendingRequests()
    r = p.add_read(A, b"k", deadline=1.0)
    p.add_writes(3, 1, [B], deadline=2.0)
    p.add_read(C, b"k2", deadline=3.0)
    assert p.take_read(r) is not None and p.take_read(r) is None
    assert p.expired(2.5) == [(B, True)]
    writes, reads = p.drain()
    assert writes == [] and reads == [C]
    assert p.expired(10.0) == []
