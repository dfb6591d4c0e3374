"""The linearizability checker: known bad histories are caught, correct concurrent ones
pass, and property tests against a sequential reference model and a brute-force oracle."""

from __future__ import annotations

import itertools
import math
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from zraft.jepsen.checker import _prepare, check, check_key, jit, wgl
from zraft.jepsen.history import CAS, DELETE, FAIL, GET, OK, PUT, UNKNOWN, Op

INF = math.inf


# ---------------------------------------------------------------------- helpers

def put(v, t0, t1=INF, status=OK, key="k", c=0):
    return Op(PUT, key, t0, t1, status, value=v, process=c)


def get(v, t0, t1=INF, status=OK, key="k", c=0):
    return Op(GET, key, t0, t1, status, result=v, process=c)


def cas(expect, new, t0, t1=INF, swapped=None, after=None, status=OK, key="k", c=0):
    result = None if status != OK else (swapped, after)
    return Op(CAS, key, t0, t1, status, value=new, expect=expect, result=result, process=c)


def delete(existed, t0, t1=INF, status=OK, key="k", c=0):
    return Op(DELETE, key, t0, t1, status, result=existed, process=c)


def verdict(*ops):
    return check(list(ops)).valid


def assert_bad(*ops):
    res = check(list(ops))
    assert res.valid is False, res.verdict
    report = res.report()
    assert "NOT linearizable" in report
    return report


def assert_ok(*ops):
    res = check(list(ops))
    assert res.valid is True, res.report()


# ---------------------------------------------------------------------- violations are caught

def test_stale_read_after_acknowledged_write():
    report = assert_bad(put("a", 0, 1), put("b", 2, 3), get("a", 4, 5, c=1))
    assert "'a'" in report and "#2" in report  # names the read and what it saw


def test_stale_read_concurrent_with_nothing_newer():
    # The read overlaps the write of "b" only partly: it started after "b" was acknowledged.
    assert_bad(put("a", 0, 1), put("b", 1.5, 2.5), get("b", 3, 4), get("a", 5, 6, c=1))


def test_lost_write():
    # An acknowledged put of "b" is never visible: every later read sees the older "a".
    assert_bad(put("a", 0, 1), put("b", 2, 3, c=1), get("a", 4, 5), get("a", 6, 7, c=2), get("a", 8, 9))


def test_read_of_a_value_never_written():
    report = assert_bad(put("a", 0, 1), get("zzz", 2, 3))
    assert "no op ever wrote the value 'zzz'" in report


def test_read_of_a_failed_write():
    assert_bad(put("a", 0, 1), put("b", 2, 3, status=FAIL, c=1), get("b", 4, 5))


def test_read_of_a_write_invoked_after_the_read_completed():
    assert_bad(put("a", 0, 1), get("b", 2, 3), put("b", 4, 5, c=1))
    assert_bad(put("a", 0, 1), get("b", 2, 3), put("b", 4, status=UNKNOWN, c=1))


def test_cas_swapped_against_a_value_that_was_not_there():
    assert_bad(put("a", 0, 1), cas("x", "c", 2, 3, swapped=True, after="c"))
    # and a cas that claims it did not swap although the expected value was there
    assert_bad(put("a", 0, 1), cas("a", "c", 2, 3, swapped=False, after="a"))
    # and one that answers a value the register did not hold
    assert_bad(put("a", 0, 1), cas("x", "c", 2, 3, swapped=False, after="q"))


def test_concurrent_reads_observe_writes_in_opposite_orders():
    assert_bad(
        put("a", 0, 10, c=0), put("b", 0, 10, c=1),
        get("a", 1, 2, c=2), get("b", 3, 4, c=2),
        get("b", 1, 2, c=3), get("a", 3, 4, c=3),
    )


def test_duplicated_write():
    # "a" is written once, overwritten, and then seen again: it was applied twice.
    assert_bad(put("a", 0, 1), get("a", 2, 3), put("b", 4, 5), get("b", 6, 7), get("a", 8, 9))
    # the same with an unknown put: it may take effect once, not twice
    assert_bad(put("a", 0, status=UNKNOWN), get("a", 2, 3), put("b", 4, 5), get("a", 8, 9))


def test_delete_lies_about_existence():
    assert_bad(put("a", 0, 1), delete(False, 2, 3))
    assert_bad(delete(True, 0, 1))
    assert_bad(put("a", 0, 1), delete(True, 2, 3), get("a", 4, 5))


def test_reads_of_an_absent_key():
    assert_ok(get(None, 0, 1), put("a", 2, 3), delete(True, 4, 5), get(None, 6, 7))
    assert_bad(get(None, 0, 1), put("a", 2, 3), get(None, 4, 5))


def test_keys_are_independent():
    ops = [put("a", 0, 1, key="x"), put("b", 0, 1, key="y"), get("a", 2, 3, key="x"), get("b", 2, 3, key="y")]
    assert_ok(*ops)
    res = check([*ops, get("b", 4, 5, key="x")])
    assert res.valid is False
    assert res.keys["y"].valid is True and res.keys["x"].valid is False
    assert "key 'x'" in res.report() and "key 'y'" not in res.report()


# ---------------------------------------------------------------------- correct histories pass

def test_overlapping_writes_read_in_either_order():
    w = [put("a", 0, 10, c=0), put("b", 1, 9, c=1)]
    assert_ok(*w, get("a", 2, 3, c=2), get("b", 11, 12, c=2))
    assert_ok(*w, get("b", 2, 3, c=2), get("a", 11, 12, c=2))
    assert_ok(*w, get("a", 2, 3, c=2), get("b", 4, 5, c=3))
    assert_ok(*w, get("b", 2, 3, c=2), get("a", 4, 5, c=3))
    assert_ok(*w, get(None, 0.5, 1.5, c=2), get("a", 4, 5, c=3))


def test_read_concurrent_with_a_write_sees_old_or_new():
    assert_ok(put("a", 0, 1), put("b", 2, 5, c=1), get("a", 3, 4, c=2))
    assert_ok(put("a", 0, 1), put("b", 2, 5, c=1), get("b", 3, 4, c=2))
    assert_ok(put("a", 0, 1), put("b", 2, 5, c=1), get("b", 3, 4, c=2), get("b", 6, 7, c=2))


def test_unknown_write_that_applied():
    assert_ok(put("a", 0, 1), put("b", 2, status=UNKNOWN, c=1), get("b", 3, 4))
    # ... much later, after other ops completed (a write may sit in a log for a while)
    assert_ok(put("a", 0, 1), put("b", 2, status=UNKNOWN, c=1), get("a", 3, 4), put("c", 5, 6),
              get("c", 7, 8), get("b", 9, 10))


def test_unknown_write_that_never_applied():
    assert_ok(put("a", 0, 1), put("b", 2, status=UNKNOWN, c=1), get("a", 3, 4), get("a", 30, 40))
    assert_ok(delete(False, 0, status=UNKNOWN), cas(None, "x", 1, status=UNKNOWN), get(None, 5, 6))


def test_unknown_write_cannot_apply_before_its_invocation():
    assert_bad(put("a", 0, 1), get("b", 2, 3), put("b", 4, status=UNKNOWN))


def test_failed_ops_are_ignored():
    assert_ok(put("a", 0, 1), put("b", 2, 3, status=FAIL), get("a", 4, 5),
              cas("a", "c", 6, 7, status=FAIL), delete(None, 8, 9, status=FAIL), get("a", 10, 11),
              get("zzz", 12, 13, status=FAIL), get("zzz", 14, status=UNKNOWN))


def test_cas_chains():
    assert_ok(
        cas(None, "a", 0, 1, swapped=True, after="a"),
        cas("a", "b", 2, 3, swapped=True, after="b"),
        cas("a", "c", 4, 5, swapped=False, after="b"),
        cas("b", "c", 6, 7, swapped=True, after="c"),
        get("c", 8, 9),
    )
    # two concurrent cas from the same expected value: exactly one can win
    assert_ok(put("a", 0, 1), cas("a", "b", 2, 5, swapped=True, after="b", c=1),
              cas("a", "c", 2, 5, swapped=False, after="b", c=2))
    assert_bad(put("a", 0, 1), cas("a", "b", 2, 5, swapped=True, after="b", c=1),
               cas("a", "c", 2, 5, swapped=True, after="c", c=2), get("c", 6, 7))
    # a chain through unknown outcomes
    assert_ok(put("a", 0, 1), cas("a", "b", 2, status=UNKNOWN), cas("b", "c", 3, status=UNKNOWN),
              get("c", 10, 11))


def test_delete_put_interleavings():
    assert_ok(put("a", 0, 1), delete(True, 2, 5, c=1), put("b", 3, 4, c=2), get("b", 6, 7))
    assert_ok(put("a", 0, 1), delete(True, 2, 5, c=1), put("b", 3, 4, c=2), get(None, 6, 7))
    assert_ok(delete(False, 0, 1), put("a", 2, 3), delete(True, 4, 5), delete(False, 6, 7))


def test_a_write_that_changes_nothing_now_may_matter_later():
    # The second put of "a" would change nothing at first (the register holds "a"), but
    # it must go after the delete. Regression: it was once linearized greedily, like a read.
    assert_ok(put("a", 0, 1), put("a", 2, 10, c=1), delete(True, 3, 4), get("a", 5, 6))
    assert_ok(put("a", 0, 1), cas("a", "a", 2, 10, swapped=True, after="a", c=1), delete(True, 3, 4),
              cas("a", "b", 5, 6, swapped=False, after=None))
    # Unobserved values all look alike to the checker: the same situation with unique values.
    assert_ok(put("x", 0, 1), put("y", 2, 10, c=1), delete(True, 3, 4), delete(True, 5, 6))


def test_empty_and_trivial_histories():
    assert check([]).valid is True
    assert_ok(get(None, 0, 1))
    assert_ok(put("a", 0, status=UNKNOWN))


def test_budget_exceeded_is_unknown_not_a_hang():
    # Many concurrent writes of values nobody reads, then a read nobody wrote: refuting it
    # needs the whole search; with a tiny budget the verdict is "unknown", quickly.
    ops = [put(f"v{i}", i * 0.001, 100 + i * 0.001, c=i) for i in range(40)]
    ops += [get(f"v{i}", 101 + i, 101.5 + i, c=100 + i) for i in range(40)]
    ops.append(get("nobody", 200, 201))
    t = time.monotonic()
    res = check_key("k", ops, time_budget_s=0.3, max_steps=10**9)
    assert time.monotonic() - t < 3
    assert res.valid is None and "budget exceeded" in res.report and res.verdict.startswith("unknown")
    assert check(ops, time_budget_s=0.3).verdict == "unknown (budget exceeded)"


def test_long_concurrent_history_is_fast():
    """A few thousand ops on one key from 10 clients, with unknown outcomes, both verdicts."""
    import random

    rng = random.Random(1)
    ops = _sequential_history(rng, 3000, clients=10, keys=1, p_unknown=0.03, p_fail=0.03)
    t = time.monotonic()
    res = check(ops)
    assert res.valid is True, res.report()
    # a stale read near the end
    reads = [o for o in ops if o.kind == GET and o.status == OK]
    victim = reads[-20]
    victim.result = "never written"
    res = check(ops)
    assert res.valid is False
    assert f"#{victim.id}" in res.report()
    assert time.monotonic() - t < 20


# ---------------------------------------------------------------------- property tests

SAME = object()  # a cas expecting whatever the register holds when it takes effect


def _sequential_history(rng, n, clients=5, keys=2, p_unknown=0.1, p_fail=0.1):
    """Ops of ``clients`` sequential clients, each taking effect at a point inside its
    interval (an unknown one anywhere after its invocation, or never), applied to a
    sequential model in the order of those points: linearizable by construction."""
    t = [0.0] * clients
    timed = []
    for i in range(n):
        c = rng.randrange(clients)
        inv = t[c] + rng.random() * 0.3
        dur = rng.random() * 2
        t[c] = inv + dur
        lp = inv + rng.random() * dur
        kind = rng.choice([PUT, GET, GET, CAS, DELETE])
        r = rng.random()
        status = UNKNOWN if r < p_unknown else FAIL if r < p_unknown + p_fail else OK
        if status == UNKNOWN and kind == GET:
            status = FAIL
        op = Op(kind, f"k{rng.randrange(keys)}", inv, inv + dur, status, process=c)
        if kind in (PUT, CAS):
            op.value = f"v{i}"
        if kind == CAS:
            op.expect = rng.choice([SAME, SAME, None, f"v{rng.randrange(i + 1)}"])
        if status == UNKNOWN:
            if rng.random() < 0.5:
                op.error = "never"
            elif rng.random() < 0.3:
                lp += rng.random() * 5  # takes effect well after the client gave up on it
        timed.append((lp, op))
    return _replay(timed)


def _replay(timed):
    """Apply the ops in the order of their effect points to a sequential model and fill
    in the results; ops with ``error == "never"`` (unknown outcome) or status fail don't
    take effect. Returns the ops by invocation, numbered."""
    state: dict = {}
    for _, op in sorted(timed, key=lambda x: x[0]):
        cur = state.get(op.key)
        applies = op.status == OK or (op.status == UNKNOWN and op.error != "never")
        if op.kind == GET:
            op.result = cur if op.status == OK else None
        elif op.kind == PUT:
            if applies:
                state[op.key] = op.value
        elif op.kind == CAS:
            if op.expect is SAME:
                op.expect = cur
            hit = op.expect == cur
            op.result = (hit, op.value if hit else cur) if op.status == OK else None
            if applies and hit:
                state[op.key] = op.value
        else:
            op.result = (cur is not None) if op.status == OK else None
            if applies:
                state.pop(op.key, None)
    ops = [op for _, op in sorted(timed, key=lambda x: x[1].invoke)]
    for i, op in enumerate(ops):
        op.id = i
    return ops


@st.composite
def model_histories(draw, max_ops=40):
    """Histories made by a sequential reference model, as in _sequential_history, with
    integer-ish times so that intervals often touch and overlap."""
    n = draw(st.integers(1, max_ops))
    keys = draw(st.integers(1, 3))
    clients = draw(st.integers(1, 6))
    t = [0] * clients
    timed = []
    for i in range(n):
        c = draw(st.integers(0, clients - 1))
        inv = t[c] + draw(st.integers(0, 3))
        dur = draw(st.integers(0, 12))
        t[c] = inv + dur + 1
        lp = inv + draw(st.integers(0, dur)) + draw(st.sampled_from([0.25, 0.5, 0.75]))
        kind = draw(st.sampled_from([PUT, GET, GET, CAS, DELETE]))
        status = draw(st.sampled_from([OK, OK, OK, OK, FAIL, UNKNOWN]))
        if kind == GET and status == UNKNOWN:
            status = FAIL
        op = Op(kind, f"k{draw(st.integers(0, keys - 1))}", float(inv), float(inv + dur + 1), status, process=c)
        if kind in (PUT, CAS):
            op.value = f"v{i}"
        if kind == CAS:
            op.expect = draw(st.sampled_from([None, SAME, f"v{draw(st.integers(0, max(0, i - 1)))}"]))
        if status == UNKNOWN:
            if draw(st.booleans()):
                op.error = "never"
            else:
                lp += draw(st.integers(0, 30))  # possibly long after everything else
        timed.append((lp, op))
    return _replay(timed)


PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(model_histories())
def test_model_histories_are_linearizable(ops):
    res = check(ops)
    assert res.valid is True, res.report()


@PROPS
@given(model_histories(), st.data())
def test_a_read_no_linearization_can_produce_is_rejected(ops, data):
    reads = [op for op in ops if op.kind == GET and op.status == OK]
    assume(reads)
    victim = data.draw(st.sampled_from(reads))
    # Either a value nobody wrote, or the value of a write invoked only after the read
    # completed (values are unique, so no other op could have written it).
    later = [op for op in ops if op.key == victim.key and op.kind in (PUT, CAS) and op.invoke > victim.complete]
    choice = data.draw(st.sampled_from(["never written", *[op.value for op in later]]))
    victim.result = choice
    res = check(ops)
    assert res.valid is False, f"read #{victim.id} of {choice!r} accepted"
    assert f"#{victim.id}" in res.report() or res.report()


# ---------------------------------------------------------------------- the two searches agree, with an oracle

def _brute_force(ops, initial=None) -> bool:
    """Try every subset of the unknown ops and every order: the definition, for tiny histories."""
    from zraft.jepsen.checker import _step

    ops = [op for op in ops if op.status == OK or (op.status == UNKNOWN and op.kind != GET)]
    unknown = [op for op in ops if op.status == UNKNOWN]
    ok = [op for op in ops if op.status == OK]
    for r in range(len(unknown) + 1):
        for chosen in itertools.combinations(unknown, r):
            sel = ok + list(chosen)
            for perm in itertools.permutations(sel):
                # real time: a may not go after b if a.invoke > b.complete... i.e. b returned before a began
                if any(perm[j].complete < perm[i].invoke for i in range(len(perm)) for j in range(i + 1, len(perm))):
                    continue
                state = initial
                for op in perm:
                    legal, state = _step(state, op)
                    if not legal:
                        break
                else:
                    return True
    return False


@st.composite
def random_histories(draw, max_ops=6):
    """Small one-key histories with arbitrary results: about half are not linearizable."""
    n = draw(st.integers(1, max_ops))
    vals = [None, "a", "b", "c"]
    ops = []
    for i in range(n):
        inv = draw(st.integers(0, 10))
        comp = inv + draw(st.integers(0, 6))
        kind = draw(st.sampled_from([PUT, GET, CAS, DELETE]))
        status = draw(st.sampled_from([OK, OK, OK, UNKNOWN]))
        if kind == GET and status == UNKNOWN:
            status = OK
        op = Op(kind, "k", float(inv), float(comp), status, process=i, id=i)
        if kind == PUT:
            op.value = draw(st.sampled_from(vals[1:]))
        elif kind == GET and status == OK:
            op.result = draw(st.sampled_from(vals))
        elif kind == CAS:
            op.expect = draw(st.sampled_from(vals))
            op.value = draw(st.sampled_from(vals[1:]))
            if status == OK:
                op.result = (draw(st.booleans()), draw(st.sampled_from(vals)))
        elif kind == DELETE and status == OK:
            op.result = draw(st.booleans())
        ops.append(op)
    return ops


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_histories())
def test_wgl_and_jit_agree_with_brute_force(ops):
    truth = _brute_force(ops)
    prepared, _, prev_same = _prepare(ops)
    assert wgl(prepared, prev_same)[0] is truth
    assert jit(prepared, prev_same)[0] is truth
    assert check(ops).valid is truth


@pytest.mark.parametrize("seed", range(5))
def test_wgl_and_jit_agree_on_longer_histories(seed):
    import random

    rng = random.Random(seed)
    ops = _sequential_history(rng, 300, clients=6, keys=1, p_unknown=0.1, p_fail=0.05)
    prepared, _, prev_same = _prepare(ops)
    assert wgl(prepared, prev_same)[0] is True
    assert jit(prepared, prev_same)[0] is True
    reads = [o for o in ops if o.kind == GET and o.status == OK]
    rng.choice(reads).result = "never written"
    prepared, _, prev_same = _prepare(ops)
    assert wgl(prepared, prev_same)[0] is False
    assert jit(prepared, prev_same)[0] is False


# ---------------------------------------------------------------------- saved histories and the CLI

def test_history_round_trip_and_check_from_the_command_line(tmp_path, capsys):
    from zraft.jepsen.history import dump_history, load_history
    from zraft.jepsen.runner import main

    ops = [Op(PUT, b"k", 0.5, 1.25, OK, value=b"a", process=0, id=0),
           Op(CAS, b"k", 2.0, INF, UNKNOWN, value=b"b", expect=b"a", process=1, id=1, error="timeout"),
           Op(CAS, b"k", 2.0, 3.0, OK, value=b"c", expect=b"a", result=(False, b"b"), process=2, id=2),
           Op(DELETE, b"k", 4.0, 5.0, OK, result=True, process=0, id=3),
           Op(GET, b"k", 6.0, 7.0, OK, result=None, process=1, id=4),
           Op(GET, b"k", 8.0, 9.0, FAIL, process=1, id=5, error="unavailable")]
    path = tmp_path / "h.jsonl"
    dump_history(ops, str(path))
    back = load_history(str(path))
    assert [(o.kind, o.key, o.invoke, o.complete, o.status, o.value, o.expect, o.result, o.error) for o in back] == \
           [(o.kind, o.key, o.invoke, o.complete, o.status, o.value, o.expect, o.result, o.error) for o in ops]
    assert main(["--check", str(path)]) == 0
    assert "linearizable: yes" in capsys.readouterr().out
    ops[4].result = b"a"  # the read now sees a value that was overwritten and deleted
    dump_history(ops, str(path))
    assert main(["--check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "NOT linearizable" in out and "#4" in out
