"""Eight concurrent clients writing while the leader is killed with SIGKILL."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from .cluster import Cluster

pytestmark = pytest.mark.integration

CLIENTS = 8
CLIENT_TIMEOUT_S = 3.0
SLACK_S = 0.5  # scheduling noise on a loaded 2-core machine
BEFORE_KILL_S = 2.0
AFTER_KILL_S = 4.0


@dataclass
class Outcome:
    op: str  # "put" or "cas"
    key: bytes
    value: bytes
    result: str  # "ok", "failed" (certainly not applied), "unknown", "crash" (an unexpected exception)
    detail: str
    start: float
    seconds: float


@dataclass
class Writer:
    """One client thread: puts of unique keys, alternating with a compare-and-swap that
    counts up a counter only this client writes. A cas answered ok must have swapped:
    ``swapped: false`` would mean an earlier attempt of the same cas was applied and the
    retry was applied (or answered) as a new request, i.e. not exactly once."""

    c: Cluster
    n: int
    exactly_once: bool
    stop: threading.Event
    outcomes: list[Outcome] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    counter: int | None = None  # the counter's value as this client knows it; None: unknown

    @property
    def counter_key(self) -> bytes:
        return f"counter{self.n}".encode()

    def call(self, op: str, key: bytes, value: bytes, fn) -> object:
        from zraft.client import OutcomeUnknown, ZraftError

        t0 = time.monotonic()
        rep = None
        try:
            rep = fn()
            result, detail = "ok", ""
        except OutcomeUnknown as exc:
            result, detail = "unknown", exc.code
        except ZraftError as exc:
            result, detail = "failed", exc.code
        except Exception as exc:  # anything else is a client bug: keep it, fail below
            result, detail = "crash", repr(exc)
        self.outcomes.append(Outcome(op, key, value, result, detail, t0, time.monotonic() - t0))
        return rep if result == "ok" else None

    def run(self) -> None:
        from zraft.client import Client, ZraftError

        seq = 0
        with Client(self.c.endpoints, timeout=CLIENT_TIMEOUT_S, exactly_once=self.exactly_once) as cl:
            self.counter = 0
            while not self.stop.is_set():
                seq += 1
                key, value = f"client{self.n}-{seq:06d}".encode(), f"value of client {self.n} write {seq}".encode()
                self.call("put", key, value, lambda: cl.put(key, value))  # noqa: B023

                if self.counter is None:  # resynchronise after a cas with unknown outcome
                    try:
                        v = cl.get(self.counter_key)
                        self.counter = 0 if v is None else int(v)
                    except ZraftError:
                        continue
                old, new = self.counter, self.counter + 1
                expect = None if old == 0 else str(old).encode()
                rep = self.call("cas", self.counter_key, str(new).encode(),
                                lambda: cl.cas(self.counter_key, expect, str(new).encode()))  # noqa: B023
                last = self.outcomes[-1]
                if last.result == "ok":
                    swapped, current = rep
                    if swapped and current == str(new).encode():
                        self.counter = new
                    else:
                        self.anomalies.append(f"cas {old}->{new} answered swapped={swapped}, value={current!r}")
                        self.counter = None
                elif last.result == "failed":
                    pass  # certainly not applied: the counter is still `old`
                else:
                    self.counter = None


def test_eight_clients_leader_killed_no_acknowledged_write_lost(make_cluster) -> None:
    c: Cluster = make_cluster()
    leader = c.wait_leader()
    stop = threading.Event()
    # Half the clients with exactly-once sessions (writes resent safely), half without
    # (a write whose reply is lost is reported as unknown, never resent).
    writers = [Writer(c, n, exactly_once=n % 2 == 0, stop=stop) for n in range(CLIENTS)]
    threads = [threading.Thread(target=w.run, name=f"writer{w.n}") for w in writers]
    for t in threads:
        t.start()
    try:
        time.sleep(BEFORE_KILL_S)  # let them write (load, not a condition: nothing waits on it)
        t_kill = time.monotonic()
        c.kill(leader)
        time.sleep(AFTER_KILL_S)
    finally:
        stop.set()
        for t in threads:
            t.join(CLIENT_TIMEOUT_S + 10)
    assert not any(t.is_alive() for t in threads), "a client call hung"
    outcomes = [w.outcomes for w in writers]

    alls = [o for per in outcomes for o in per]
    counts = Counter(o.result for o in alls)
    details = Counter((o.result, o.detail) for o in alls if o.result != "ok")
    after_kill_ok = sum(1 for o in alls if o.result == "ok" and o.start > t_kill)
    longest = max(alls, key=lambda o: o.seconds)
    print(f"\n{len(alls)} writes by {CLIENTS} clients: {dict(counts)}; not ok by code: {dict(details)}; "
          f"{after_kill_ok} acknowledged after the kill; longest call {longest.seconds:.3f} s "
          f"({longest.result} {longest.detail})")
    for w in writers:
        print(f"  client {w.n} (exactly_once={w.exactly_once}): {dict(Counter(o.result for o in w.outcomes))}")

    assert counts["crash"] == 0, [o for o in alls if o.result == "crash"][:3]
    assert all(per for per in outcomes), "a client never finished a call"
    slow = [o for o in alls if o.seconds > CLIENT_TIMEOUT_S + SLACK_S]
    assert not slow, f"{len(slow)} calls ran past the client timeout {CLIENT_TIMEOUT_S} s + {SLACK_S} s: {slow[:3]}"
    assert after_kill_ok > 0, "no write acknowledged after the leader was killed"

    survivors = [i for i in c.ids if i != leader]
    new_leader = c.wait_leader(survivors)
    anomalies = [(w.n, a) for w in writers for a in w.anomalies]
    assert not anomalies, f"compare-and-swap applied or answered twice: {anomalies[:5]}"
    # Each counter holds the value of its client's last acknowledged cas (unless that client lost track).
    with c.client() as cl:
        for w in writers:
            v = cl.get(w.counter_key)
            got = 0 if v is None else int(v)
            if w.counter is not None:
                assert got == w.counter, f"client {w.n}'s counter is {got}, its last acknowledged cas set {w.counter}"
    puts = [o for o in alls if o.op == "put"]
    acked = {o.key: o.value for o in puts if o.result == "ok"}
    c.check_all_present(new_leader, acked)
    failed = [o for o in puts if o.result == "failed"]
    got = c.get_many(new_leader, [o.key for o in failed])
    took_effect = [o for o in failed if got[o.key] is not None]
    assert not took_effect, f"writes that failed (= did not take effect) are in the store: {took_effect[:3]}"
    unknown = [o for o in puts if o.result == "unknown"]
    got = c.get_many(new_leader, [o.key for o in unknown])
    assert all(got[o.key] in (None, o.value) for o in unknown)
    print(f"  of {len(unknown)} writes with unknown outcome, {sum(1 for o in unknown if got[o.key])} were applied")
