"""The leader's lease clock: when each lease runs out, by this node's monotonic clock.

Deadlines are never stored or replicated: only the leader keeps them, and a node that becomes
leader gives every lease its full TTL again (etcd's rule), so a failover never expires a lease
early (it may expire one late, by at most the time the election took). When a deadline passes the
leader proposes the lease's revoke; every replica then deletes its keys at the same revision. A
revoke that was proposed but not applied (a lost leadership, say) is proposed again after
``RETRY_S``, unless a keepalive came first.
"""

from __future__ import annotations

import heapq

RETRY_S = 1.0


class LeaseClock:
    def __init__(self) -> None:
        self.deadlines: dict[int, float] = {}
        self._heap: list[tuple[float, int]] = []

    def __len__(self) -> int:
        return len(self.deadlines)

    def reset(self, leases: dict[int, int], now: float) -> None:
        """This node became leader: every lease starts its TTL now."""
        self.deadlines = {lease: now + ttl for lease, ttl in leases.items()}
        self._heap = [(d, lease) for lease, d in self.deadlines.items()]
        heapq.heapify(self._heap)

    def clear(self) -> None:
        self.deadlines.clear()
        self._heap.clear()

    def refresh(self, lease: int, ttl: int, now: float) -> None:
        """A grant or a keepalive was applied."""
        self.deadlines[lease] = now + ttl
        heapq.heappush(self._heap, (now + ttl, lease))

    def revoked(self, lease: int) -> None:
        self.deadlines.pop(lease, None)

    def due(self, now: float) -> list[int]:
        """The leases whose deadline passed (each is due again after RETRY_S if it is still there)."""
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, lease = heapq.heappop(heap)
            if self.deadlines.get(lease) != deadline:
                continue  # refreshed or revoked since: a stale heap entry
            out.append(lease)
            self.deadlines[lease] = now + RETRY_S
            heapq.heappush(heap, (now + RETRY_S, lease))
        return out
