"""A linearizability checker for a key-value store of independent registers.

Each key is a register, and keys never interact, so a history is linearizable exactly
when each key's sub-history is (linearizability is local, Herlihy & Wing 1990): every
key is checked on its own, with the register model of :func:`_step`.

Two searches, both from Lowe, "Testing for linearizability" (2017):

* :func:`wgl`, Wing & Gong's depth-first search as improved by Lowe (and used by
  Knossos and Porcupine). The calls and returns of the operations form a doubly linked
  list in time order; the candidates to linearize next are the calls that precede the
  first return still in the list (an op can't go after one that returned before it was
  invoked). Linearize a candidate if the model allows it, take it out of the list, start
  over from the head; on reaching a return, undo the last choice and try the next
  candidate. Configurations (linearized set as a bitmask, register state) are memoized:
  none is explored twice. It finds a linearization of a correct history fast, but to
  refute one it must exhaust every order before the violation, which can take forever.
* :func:`jit`, just-in-time linearization: sweep the history in time order keeping the
  set of all configurations reachable so far; an op is linearized at the latest when
  its return is reached. Its cost grows with the length of the history times what the
  concurrency allows, so it refutes long histories, and it names the earliest op that
  shows the violation. It runs only when WGL does not say "linearizable" in time.

Shared refinements:

* Failed ops certainly did not happen, and reads with unknown outcomes promise
  nothing: both are dropped up front.
* An op with an unknown outcome never returns (its completion is +infinity): it may be
  linearized at any point after its invocation, or never. It is tried only where it
  changes the register (taking effect as a no-op equals not taking effect, with fewer
  options left); a configuration that used a superset of the unknown ops another one
  used, with the same state and the same ok ops linearized, is dominated and pruned;
  and of several interchangeable unknown ops only the first unused one is tried.
* A read-only op (an ok read, a cas that did not swap, a delete of a missing key: its
  result shows it changes nothing wherever it goes) is linearized greedily, with no
  alternatives tried: moving such an op earlier, to the first point where it is a legal
  candidate, never breaks a linearization.
* Written values that nothing ever observes are merged into one (see :func:`_prepare`).

Each key has a budget (time and steps); beyond it the key's result is "unknown (budget
exceeded)", never a hang. A violation report shows the key, the op that can't be
linearized, the value it saw and who wrote it, the ops that completed just before it,
those in flight, and what the register could hold then.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from zraft.jepsen.history import CAS, DELETE, GET, OK, PUT, UNKNOWN, Op, fmt

DEFAULT_TIME_BUDGET_S = 60.0
DEFAULT_MAX_STEPS = 20_000_000
REPORT_PREFIX_OPS = 8  # how many of the ops that completed just before the culprit a report shows


@dataclass
class KeyResult:
    key: Any
    valid: bool | None  # None: unknown (the budget ran out)
    ops: int  # operations the search considered (ok, and unknown writes)
    steps: int
    seconds: float
    report: str = ""  # why not, when valid is False or None
    algorithm: str = ""  # which search decided: "wgl", or "wgl+jit"

    @property
    def verdict(self) -> str:
        return {True: "linearizable", False: "NOT linearizable", None: "unknown (budget exceeded)"}[self.valid]


@dataclass
class CheckResult:
    keys: dict[Any, KeyResult] = field(default_factory=dict)

    @property
    def valid(self) -> bool | None:
        """True if every key is linearizable, False if one is not, None if unknown."""
        vals = [r.valid for r in self.keys.values()]
        if any(v is False for v in vals):
            return False
        if any(v is None for v in vals):
            return None
        return True

    @property
    def verdict(self) -> str:
        return {True: "linearizable", False: "NOT linearizable", None: "unknown (budget exceeded)"}[self.valid]

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.keys.values())

    def report(self) -> str:
        """The reports of every key that is not (known to be) linearizable."""
        return "\n\n".join(r.report for r in self.keys.values() if r.valid is not True)


def check(history: Iterable[Op], time_budget_s: float = DEFAULT_TIME_BUDGET_S,
          max_steps: int = DEFAULT_MAX_STEPS, initial: Any = None) -> CheckResult:
    """Check every key's sub-history; each key gets the whole budget. ``initial`` is the
    value of every key before the history (None: absent)."""
    by_key: dict[Any, list[Op]] = {}
    for n, op in enumerate(history):
        if op.id < 0:
            op.id = n
        by_key.setdefault(op.key, []).append(op)
    res = CheckResult()
    for key in sorted(by_key, key=repr):
        res.keys[key] = check_key(key, by_key[key], time_budget_s, max_steps, initial)
    return res


# ---------------------------------------------------------------------- the register model

def _step(state: Any, op: Op) -> tuple[bool, Any]:
    """(is ``op`` legal on a register holding ``state``, the state after it)."""
    kind = op.kind
    if kind == GET:
        return state == op.result, state
    if kind == PUT:
        return True, op.value
    if kind == CAS:
        hit = state == op.expect
        if op.status == UNKNOWN:
            return True, (op.value if hit else state)
        swapped, after = op.result
        if hit:
            return bool(swapped) and after == op.value, op.value
        return (not swapped) and after == state, state
    if kind == DELETE:
        if op.status == UNKNOWN:
            return True, None
        return bool(op.result) == (state is not None), None
    raise ValueError(f"unknown op kind {kind!r}")


def _read_only(op: Op) -> bool:
    """An ok op whose result shows it changed nothing, wherever it is linearized: a read,
    a cas that did not swap, a delete of a missing key. (A put or a swap may happen to
    change nothing at one point but not at another: those are never read-only.)"""
    if op.status != OK:
        return False
    return op.kind == GET or (op.kind == CAS and not op.result[0]) or (op.kind == DELETE and not op.result)


def _why_not(state: Any, op: Op) -> str:
    """Why ``op`` can't be linearized on a register holding ``state``."""
    kind = op.kind
    if kind == GET:
        return f"it read {fmt(op.result)} but the register holds {fmt(state)}"
    if kind == CAS:
        swapped, after = op.result
        if state == op.expect:
            return (f"the register holds {fmt(state)}, the expected value, so it would swap to "
                    f"{fmt(op.value)}; it answered {'swapped' if swapped else 'not swapped'}, now {fmt(after)}")
        return (f"the register holds {fmt(state)}, not the expected {fmt(op.expect)}, so it would not swap "
                f"and answer {fmt(state)}; it answered {'swapped' if swapped else 'not swapped'}, now {fmt(after)}")
    if kind == DELETE:
        return f"it answered {'existed' if op.result else 'did not exist'} but the register holds {fmt(state)}"
    return "?"


# ---------------------------------------------------------------------- the search

class _Unread:
    """Stands for every written value that no operation ever observes (see _prepare)."""

    def __repr__(self) -> str:
        return "<a value never read>"


UNREAD = _Unread()


def _prepare(ops: Iterable[Op]) -> tuple[list[Op], list[Op], list[int]]:
    """The ops the search needs, sorted by invocation, as copies with canonical values;
    the originals (for reports); and for each unknown op the previous unknown op that is
    interchangeable with it (-1 if none).

    * Failed ops never happened, and reads with unknown outcomes promise nothing: dropped.
    * A written value that no op observes (no read returns it, no cas expects it or
      answers it) behaves exactly like any other such value: the register model only
      ever compares the state with observed values. All of them become one, ``UNREAD``,
      which lets the searches merge many more configurations.
    * Two unknown ops with the same kind and arguments, once both are invoked, can
      stand in for each other (neither ever returns): the searches only try the first
      unused one of such a group.
    """
    orig = sorted((op for op in ops if op.status == OK or (op.status == UNKNOWN and op.kind != GET)),
                  key=lambda o: o.invoke)
    observed = set()
    for op in orig:
        if op.kind == CAS:
            observed.add(op.expect)
            if op.status == OK:
                observed.add(op.result[1])
        elif op.kind == GET:
            observed.add(op.result)
    prepared = []
    for op in orig:
        if op.kind in (PUT, CAS) and op.value not in observed:
            op = dataclasses.replace(op, value=UNREAD)
        prepared.append(op)
    prev_same = [-1] * len(prepared)
    last: dict[tuple, int] = {}
    for i, op in enumerate(prepared):
        if op.status == UNKNOWN:
            cls = (op.kind, op.value, op.expect)
            prev_same[i] = last.get(cls, -1)
            last[cls] = i
    return prepared, orig, prev_same


def check_key(key: Any, ops: Iterable[Op], time_budget_s: float = DEFAULT_TIME_BUDGET_S,
              max_steps: int = DEFAULT_MAX_STEPS, initial: Any = None) -> KeyResult:
    """Check one key's sub-history: WGL first; if it finds no linearization within its
    share of the budget (or none at all), the just-in-time search decides and explains."""
    t_start = time.monotonic()
    deadline = t_start + time_budget_s
    prepared, orig, prev_same = _prepare(ops)
    n = len(prepared)
    if n == 0:
        return KeyResult(key, True, 0, 0, 0.0)
    wgl_steps = min(max_steps // 2, max(200_000, 50 * n))  # plenty for a correct history
    valid, steps = wgl(prepared, prev_same, initial, t_start + time_budget_s / 2, wgl_steps)
    if valid:
        return KeyResult(key, True, n, steps, time.monotonic() - t_start, algorithm="wgl")
    valid2, steps2, failure = jit(prepared, prev_same, initial, deadline, max_steps - steps)
    steps += steps2
    if valid2 is True and valid is False:
        raise AssertionError(f"checker bug: key {fmt(key)}: WGL found no linearization, the JIT search found one")
    if valid2 is None:
        report = (f"key {fmt(key)}: unknown (budget exceeded): no verdict within {time_budget_s} s "
                  f"or {max_steps} steps ({n} ops)")
    elif valid2 is False:
        report = _jit_report(key, orig, *failure)
    else:
        report = ""
    return KeyResult(key, valid2, n, steps, time.monotonic() - t_start, report, algorithm="wgl+jit")


# ---------------------------------------------------------------------- WGL

def wgl(ops: list[Op], prev_same: list[int], initial: Any = None, deadline: float = math.inf,  # noqa: C901
        max_steps: int = DEFAULT_MAX_STEPS) -> tuple[bool | None, int]:
    """Wing & Gong / Lowe depth-first search over ``ops`` (from :func:`_prepare`).
    Returns (True, False, or None if out of budget; steps)."""
    n = len(ops)
    unknown = [op.status == UNKNOWN for op in ops]
    readonly = [_read_only(op) for op in ops]
    # The linked list of entries: entry 2i is op i's call, 2i+1 its return; HEAD is 2n.
    # At equal times calls go first: touching intervals count as concurrent (lenient).
    order = sorted(range(2 * n), key=lambda e: (ops[e >> 1].complete if e & 1 else ops[e >> 1].invoke, e & 1))
    head = 2 * n
    nxt = [-1] * (2 * n + 1)
    prv = [-1] * (2 * n + 1)
    prev = head
    for e in order:
        nxt[prev] = e
        prv[e] = prev
        prev = e
    nxt[prev] = -1

    def lift(i: int) -> None:
        for e in (2 * i, 2 * i + 1):
            p, q = prv[e], nxt[e]
            nxt[p] = q
            if q != -1:
                prv[q] = p

    def unlift(i: int) -> None:
        for e in (2 * i + 1, 2 * i):
            p, q = prv[e], nxt[e]
            nxt[p] = e
            if q != -1:
                prv[q] = e

    # The linearized ops. The ok ones, numbered in invocation order, as ``base``: the
    # first one not linearized (all before it are), and ``rel``: a bitmask of those
    # linearized after it (bit k for number base + k). Numbers behind the front of the
    # search drop out of the mask, which stays as small as the window of concurrent ops,
    # however long the history. The unknown ones: a bitmask ``used``, by unknown number.
    num = [0] * n
    n_ok = n_unk = 0
    for i in range(n):
        if unknown[i]:
            num[i] = n_unk
            n_unk += 1
        else:
            num[i] = n_ok
            n_ok += 1
    ubit = [1 << num[i] if unknown[i] else 0 for i in range(n)]
    state = initial
    base = rel = used = 0
    stack: list[tuple[int, Any, bool, int, int]] = []  # (op, state, greedy?, base, rel) before it
    # Every configuration explored, as (base, rel, state) -> the sets of unknown ops used
    # with it (a subset-minimal list). Each of them was a dead end, and so is any
    # configuration that used more unknown ops: it has the same obligations and fewer
    # options (an unknown op can take effect at most once, and need not at all).
    cache: dict[tuple[int, int, Any], list[int]] = {}
    steps = 0
    entry = nxt[head]
    while True:
        steps += 1
        if steps & 0x3FF == 0 and (steps >= max_steps or time.monotonic() >= deadline):
            return None, steps
        if entry == -1:
            return True, steps  # no return left at all: everything is linearized
        i = entry >> 1
        if not entry & 1:  # a call: try to linearize op i next
            if unknown[i]:
                p = prev_same[i]
                if p >= 0 and not used & ubit[p]:
                    entry = nxt[entry]  # an interchangeable op is still unused: that one goes first
                    continue
            legal, new = _step(state, ops[i])
            if not legal:
                entry = nxt[entry]
                continue
            if unknown[i]:
                if new == state:
                    entry = nxt[entry]  # taking effect now would change nothing: leave it for later
                    continue
                nb, nr, nu = base, rel, used | ubit[i]
            else:
                nr = rel | (1 << (num[i] - base))
                nb = base
                if nr & 1:  # the front moves: drop the run of linearized ops from the mask
                    t = (~nr & (nr + 1)).bit_length() - 1
                    nb, nr = base + t, nr >> t
                nu = used
            k = (nb, nr, new)
            seen = cache.get(k)
            if seen is None:
                cache[k] = [nu]
                fresh = True
            elif any(not u & ~nu for u in seen):
                fresh = False  # dominated by an explored configuration
            else:
                seen[:] = [u for u in seen if nu & ~u]  # drop those it dominates
                seen.append(nu)
                fresh = True
            if fresh:
                stack.append((i, state, readonly[i], base, rel))
                base, rel, used, state = nb, nr, nu, new
                lift(i)
                entry = nxt[head]
                continue
            if not readonly[i]:
                entry = nxt[entry]
                continue
            # A read-only op that leads to an explored dead end: this configuration is one too.
        elif unknown[i]:
            return True, steps  # the first return left is at +infinity: every ok op is linearized
        # Op i returned and is not linearized: a dead end. Undo the last choice; a greedy
        # one had no alternatives, so undo past it.
        while True:
            if not stack:
                return False, steps
            j, state, greedy, base, rel = stack.pop()
            if unknown[j]:
                used ^= ubit[j]
            unlift(j)
            if not greedy:
                break
        entry = nxt[2 * j]


# ---------------------------------------------------------------------- just-in-time linearization

def jit(ops: list[Op], prev_same: list[int], initial: Any = None, deadline: float = math.inf,  # noqa: C901
        max_steps: int = DEFAULT_MAX_STEPS) -> tuple[bool | None, int, tuple]:
    """Just-in-time linearization (Lowe 2017) over ``ops`` (from :func:`_prepare`): sweep
    the calls and returns in time order, keeping every configuration reachable so far:
    (register state, open ops already linearized, unknown ops used). At the return of
    op X each configuration is extended by linearizing open ops until X is linearized;
    if none can be, the history is not linearizable, and X is the earliest op to show
    it. Polynomial in the length of the history (exponential only in the number of ops
    open at once), so it refutes long histories where WGL's backtracking can't.

    Returns (True, False, or None if out of budget; steps; on False the failure:
    (X, the configurations just before, the open ops, the ops that returned last))."""
    n = len(ops)
    unknown = [op.status == UNKNOWN for op in ops]
    readonly = [_read_only(op) for op in ops]
    events = sorted([(op.invoke, 0, i) for i, op in enumerate(ops)]
                    + [(op.complete, 1, i) for i, op in enumerate(ops) if not unknown[i]])
    ubit = [0] * n
    n_unk = 0
    for i in range(n):
        if unknown[i]:
            ubit[i] = 1 << n_unk
            n_unk += 1
    # (state, bitmask of the open ok ops already linearized) -> subset-minimal list of
    # bitmasks of the unknown ops used: fewer used dominates (more options left).
    Front = dict[tuple[Any, int], list[int]]
    frontier: Front = {(initial, 0): [0]}
    open_ok: list[int] = []  # ok ops invoked and not yet returned
    open_unknown: list[int] = []  # unknown ops invoked (they never return)
    recent: list[int] = []  # the ops that returned last, for the report
    steps = 0

    def add(front: Front, st: Any, lin: int, used: int) -> bool:
        """Add a configuration unless one that dominates it is there; True if added."""
        seen = front.get((st, lin))
        if seen is None:
            front[(st, lin)] = [used]
            return True
        if any(not u & ~used for u in seen):
            return False
        seen[:] = [u for u in seen if used & ~u]
        seen.append(used)
        return True

    # Open ok ops get a bit each, from a pool of slots freed at their return: the masks
    # stay as small as the number of ops open at once.
    slot_bit = [0] * n
    free_slots: list[int] = []
    n_slots = 0
    for _, is_return, x in events:
        if not is_return:
            if unknown[x]:
                open_unknown.append(x)
            else:
                open_ok.append(x)
                if free_slots:
                    slot_bit[x] = 1 << free_slots.pop()
                else:
                    slot_bit[x] = 1 << n_slots
                    n_slots += 1
            continue
        xbit = slot_bit[x]
        new_front: Front = {}
        visited: Front = {}
        # Layer k: configurations that used k more unknown ops than where they started.
        # Fewer first, so that the dominating configurations are usually seen first.
        layer = [(st, lin, used) for (st, lin), useds in frontier.items() for used in useds]
        while layer:
            next_layer = []
            todo = layer
            while todo:
                steps += 1
                if steps & 0x3FF == 0 and (steps >= max_steps or time.monotonic() >= deadline):
                    return None, steps, ()
                st, lin, used = todo.pop()
                if not add(visited, st, lin, used):
                    continue
                if lin & xbit:
                    add(new_front, st, lin & ~xbit, used)
                    continue
                greedy = -1  # a legal read-only op goes next, with no alternatives (see the module doc)
                moves = []
                for o in open_ok:
                    b = slot_bit[o]
                    if lin & b:
                        continue
                    legal, new = _step(st, ops[o])
                    if legal:
                        if readonly[o]:
                            greedy = o
                            break
                        moves.append((new, lin | b, used))
                if greedy >= 0:
                    todo.append((st, lin | slot_bit[greedy], used))
                    continue
                todo.extend(moves)
                for o in open_unknown:
                    if used & ubit[o]:
                        continue
                    p = prev_same[o]
                    if p >= 0 and not used & ubit[p]:
                        continue  # an interchangeable op is still unused: that one goes first
                    _, new = _step(st, ops[o])
                    if new != st:
                        next_layer.append((new, lin, used | ubit[o]))
            layer = next_layer
        if not new_front:
            return False, steps, (x, frontier, list(open_ok), list(open_unknown), recent)
        frontier = new_front
        open_ok.remove(x)
        free_slots.append(xbit.bit_length() - 1)
        recent = (recent + [x])[-REPORT_PREFIX_OPS:]
    return True, steps, ()


def _jit_report(key: Any, ops: list[Op], x: int, frontier: dict, open_ok: list[int], open_unknown: list[int],
                recent: list[int]) -> str:
    finite = [t for op in ops for t in (op.invoke, op.complete) if not math.isinf(t)]
    t0 = min(finite) if finite else 0.0
    op = ops[x]
    lines = [f"key {fmt(key)}: NOT linearizable ({len(ops)} ops considered; times in s from {t0:.3f})",
             f"  op #{op.id} completed at {op.complete - t0:.3f}, but no order of the operations before it lets "
             "it take effect within its interval:",
             f"    {op.describe(t0)}"]
    seen = op.result if op.kind == GET else op.result[1] if op.kind == CAS else None
    if op.kind in (GET, CAS) and seen is not None:
        writers = [w for w in ops if w.kind in (PUT, CAS) and w.value == seen and w is not op]
        lines.append(f"  the value {fmt(seen)} it saw was written by:" if writers
                     else f"  no op ever wrote the value {fmt(seen)} it saw")
        lines += [f"    {w.describe(t0)}" for w in writers[:5]]
    if recent:
        lines.append("  the ops that completed just before it:")
        lines += [f"    {ops[j].describe(t0)}" for j in recent]
    others = [j for j in open_ok if j != x]
    if others:
        lines.append("  the other ops in flight:")
        lines += [f"    {ops[j].describe(t0)}" for j in sorted(others)]
    if open_unknown:
        shown = sorted(open_unknown)[-REPORT_PREFIX_OPS:]
        more = len(open_unknown) - len(shown)
        lines.append("  writes with unknown outcomes invoked before it (they may take effect any time after their "
                     "invocation, or never)" + (f", the last {len(shown)} of {len(open_unknown)}:" if more else ":"))
        lines += [f"    {ops[j].describe(t0)}" for j in shown]
    states = sorted({st for st, _ in frontier}, key=repr)
    lines.append("  the register could hold, given the ops that completed before it: "
                 + ", ".join(fmt(s) for s in states))
    if len(states) == 1 and not others:
        legal, _ = _step(states[0], op)
        if not legal:
            lines.append(f"  op #{op.id} can't take effect on {fmt(states[0])}: {_why_not(states[0], op)}")
    return "\n".join(lines)
