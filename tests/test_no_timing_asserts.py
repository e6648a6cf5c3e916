"""No test asserts on elapsed time, except the timeout tests listed here with their reason.

A bound on wall-clock time fails when the machine is busy (two cores, shared with other
work), not when the code is wrong. Tests check what is counted or ordered instead, and
benchmarks (bench/) measure time. The check reads every tests/**/*.py as an AST:

- a value is *timed* when it comes from a clock (``time.time()``, ``time.monotonic()``,
  ``perf_counter()``, ``datetime.now()``, ...), when its name says it holds a time
  (``elapsed``, ``wall``, ``duration``, ``waited``, ``latency``, ``*_at``), or when it is
  built from timed values: a variable assigned one, within its function (any order, as
  loops revisit assignments); a list a timed value is appended to; a dict key given a timed
  value anywhere in the module (ranks send their results back as dicts); and what
  ``split(..., "profile")`` measured, unless the test gave the profiler a clock that counts;
- an ``assert`` is a timing assertion when it orders (``<``, ``<=``, ``>``, ``>=``) a timed
  value against anything but the literal 0 (a sign check cannot fail on a slow machine).

Equality with a timed value (``metrics.wall == 0.5`` on a constructed object) and the order
of two timestamps taken from events (start <= end of one action) are left alone.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# (file under tests/, test function) -> why its time bound is the thing under test
ALLOWED = {
    ("distributed/test_stall.py", "test_peers_raise_within_2_s_of_a_stalled_rank_giving_up"): (
        "the requirement itself: once a stalled rank gives up (sched.abort), its peers raise "
        "within 2 s of the moment it did"
    ),
    ("distributed/test_stall.py", "test_peers_raise_at_the_timeout_when_nobody_gives_up"): (
        "a timeout test: with nobody giving up, the peers must raise at their timeout, not "
        "hang past it"
    ),
    ("distributed/test_nccl_emu.py", "test_a_group_that_cannot_finish_holds_every_later_one"): (
        "a timeout test: the emulated NCCL watchdog must fire at its 2 s timeout (not before "
        "it, and not never)"
    ),
    ("distributed/test_faults.py", "test_a_killed_rank_is_named_by_every_survivor"): (
        "the requirement itself: survivors name a killed rank within 2 s (NOTICE) of the "
        "recorded moment of its death"
    ),
    ("distributed/test_faults.py", "test_a_frozen_rank_is_named_by_every_survivor"): (
        "the requirement itself: over c10d survivors name a frozen rank within 2 s (NOTICE) of "
        "the moment it stopped; over shared memory, where it is a stall, within its timeout"
    ),
    ("distributed/test_faults.py", "test_a_stall_or_a_lost_message_ends_at_the_timeout"): (
        "a timeout test: a stalled or lost message ends every rank's step at its timeout "
        "(plus the 2 s notice), never later"
    ),
    (
        "distributed/test_shm_hardening.py",
        "test_a_peer_in_another_pid_namespace_that_is_killed_fails_the_wait_within_2_s",
    ): "the requirement itself: a killed peer in another PID namespace is named within 2 s",
    (
        "distributed/test_shm_hardening.py",
        "test_a_live_peer_in_another_pid_namespace_is_not_judged_dead",
    ): (
        "a lower bound only: the receive lasted until the peer's late send (1 s after it "
        "started) instead of failing at once on a misjudged death"
    ),
}

CLOCK_CALLS = {
    "time",
    "time_ns",
    "monotonic",
    "monotonic_ns",
    "perf_counter",
    "perf_counter_ns",
    "process_time",
    "process_time_ns",
    "thread_time",
    "thread_time_ns",
    "now",
    "utcnow",
}
CLOCK_MODULES = {"time", "datetime"}
TIMED_NAME = re.compile(r"(^|_)(elapsed|wall|duration|waited|latency)(_|$)|_at$", re.IGNORECASE)
ORDERING = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_FUNCTION = (ast.FunctionDef, ast.AsyncFunctionDef)


def _identifier(node: ast.AST) -> str | None:
    """The name a value goes by: a variable, an attribute, or a dict key written out."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        key = node.slice.value
        return key if isinstance(key, str) else None
    return None


def _is_profiled_split(node: ast.AST) -> bool:
    """``split(..., "profile", ...)``: ppfast's profiler, whose costs are measured seconds."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    method = [*node.args[2:3], *(k.value for k in node.keywords if k.arg == "method")]
    return name == "split" and any(
        isinstance(m, ast.Constant) and m.value == "profile" for m in method
    )


def _replaces_the_profiler_clock(func: ast.AST) -> bool:
    """``monkeypatch.setattr(..., "_clock", ...)``: the test gave the profiler a clock that
    counts, so what it measures is exact."""
    return any(
        isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == "setattr"
        and any(isinstance(a, ast.Constant) and a.value == "_clock" for a in n.args)
        for n in ast.walk(func)
    )


def _is_clock_call(node: ast.AST, clock_names: set[str]) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    if isinstance(f, ast.Name):  # from time import perf_counter
        return f.id in clock_names
    if isinstance(f, ast.Attribute) and f.attr in CLOCK_CALLS:
        base = f.value
        while isinstance(base, ast.Attribute):  # datetime.datetime.now()
            base = base.value
        return isinstance(base, ast.Name) and base.id in CLOCK_MODULES
    return False


class _Scope:
    """One function's timed variables, and whether it gave the profiler a counting clock."""

    def __init__(self, counted: bool):
        self.names: set[str] = set()
        self.counted = counted


class _Module:
    """What is timed in one module: clock functions imported by name, and dict keys."""

    def __init__(self, tree: ast.Module):
        self.tree = tree
        self.clock_names = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module in CLOCK_MODULES
            for alias in node.names
            if alias.name in CLOCK_CALLS
        }
        self.keys: set[str] = set()
        functions = [n for n in ast.walk(tree) if isinstance(n, _FUNCTION)]
        self.scopes = {id(f): _Scope(_replaces_the_profiler_clock(f)) for f in functions}
        # names and keys feed each other across functions: go round until nothing changes
        changed = True
        while changed:
            changed = False
            for f in functions:
                changed |= self._propagate(f)

    def timed(self, expr: ast.AST, scope: _Scope) -> bool:
        for node in ast.walk(expr):
            if _is_clock_call(node, self.clock_names):
                return True
            if not scope.counted and _is_profiled_split(node):
                return True
            ident = _identifier(node)
            if ident is None:
                continue
            if TIMED_NAME.search(ident):
                return True
            if isinstance(node, ast.Name) and node.id in scope.names:
                return True
            if isinstance(node, ast.Subscript) and ident in self.keys:
                return True
        return False

    def _propagate(self, func: ast.AST) -> bool:
        scope = self.scopes[id(func)]
        before = (len(scope.names), len(self.keys))
        for node in _own_nodes(func):
            if (
                isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign)
                and node.value is not None
            ):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    self._assign(target, node.value, scope)
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    named = isinstance(key, ast.Constant) and isinstance(key.value, str)
                    if named and self.timed(value, scope):
                        self.keys.add(key.value)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("append", "extend", "add")
                and isinstance(node.func.value, ast.Name)
                and any(self.timed(a, scope) for a in node.args)
            ):
                scope.names.add(node.func.value.id)
        return (len(scope.names), len(self.keys)) != before

    def _assign(self, target: ast.AST, value: ast.AST, scope: _Scope) -> None:
        if isinstance(target, ast.Tuple | ast.List):
            if isinstance(value, ast.Tuple | ast.List) and len(value.elts) == len(target.elts):
                for t, v in zip(target.elts, value.elts, strict=True):
                    self._assign(t, v, scope)
                return
            for t in target.elts:
                self._assign(t, value, scope)
            return
        if not self.timed(value, scope):
            return
        if isinstance(target, ast.Name):
            scope.names.add(target.id)
        else:
            key = _identifier(target) if isinstance(target, ast.Subscript) else None
            if key is not None:
                self.keys.add(key)


def _own_nodes(func: ast.AST) -> Iterator[ast.AST]:
    """The nodes of a function, not those of the functions and classes defined inside it
    (each has its own variables; a nested function's dict keys count on its own pass)."""
    stack = list(ast.iter_child_nodes(func))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (*_FUNCTION, ast.ClassDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def _is_zero(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and not isinstance(node.value, bool) and node.value == 0


def timing_asserts(source: str) -> list[tuple[str, int, str]]:
    """(enclosing function, line, source) of every assert in ``source`` that orders a timed
    value; module-level asserts have the function ''."""
    tree = ast.parse(source)
    module = _Module(tree)
    found = []

    def visit(node: ast.AST, func: ast.AST | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, _FUNCTION):
                visit(child, child)
                continue
            if isinstance(child, ast.Assert):
                scope = module.scopes[id(func)] if func is not None else _Scope(False)
                if _orders_timed(module, child.test, scope):
                    name = func.name if func is not None else ""
                    found.append((name, child.lineno, ast.get_source_segment(source, child)))
            visit(child, func)

    visit(tree, None)
    return found


def _orders_timed(module: _Module, test: ast.AST, scope: _Scope) -> bool:
    for node in ast.walk(test):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for op, left, right in zip(node.ops, operands, operands[1:], strict=False):
            if not isinstance(op, ORDERING) or _is_zero(left) or _is_zero(right):
                continue
            if module.timed(left, scope) or module.timed(right, scope):
                return True
    return False


def _test_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


# ------------------------------------------------------------------------------ the tree


def test_no_test_asserts_on_elapsed_time():
    bad, used = [], set()
    for path in _test_files():
        rel = path.relative_to(TESTS).as_posix()
        for func, line, text in timing_asserts(path.read_text()):
            if (rel, func) in ALLOWED:
                used.add((rel, func))
            else:
                bad.append(f"tests/{rel}:{line} in {func or 'the module'}: {text}")
    assert not bad, (
        "these assert on elapsed time, which fails on a busy machine and not when the code is "
        "wrong: check a count or an order of events instead, and measure time in bench/ (or, "
        "for a test of a timeout itself, add it to ALLOWED with the reason):\n" + "\n".join(bad)
    )
    # an entry whose test no longer asserts on time (or is gone) must go too
    stale = sorted(set(ALLOWED) - used)
    assert not stale, f"ALLOWED names tests that assert on no time: {stale}"


# ------------------------------------------------------------------------------ the detector


def _found(source: str) -> list[str]:
    return [func for func, _, _ in timing_asserts(textwrap.dedent(source))]


FLAGGED = {
    "a clock call in the assert": """
        import time
        def test_x():
            assert time.monotonic() < 5
        """,
    "a difference of clock readings, through variables": """
        import time
        def test_x():
            t0 = time.monotonic()
            work()
            took = time.monotonic() - t0
            assert took < 5
        """,
    "perf_counter imported by name, assigned in a tuple": """
        from time import perf_counter as clock
        def test_x():
            a, b = clock(), 1
            assert a - 3 > b
        """,
    "test_errors' old check: a dict key filled from a clock in another function": """
        import time
        def attempt(fn):
            t0 = time.monotonic()
            try:
                fn()
            except Exception as e:
                return {"message": str(e), "took": time.monotonic() - t0}
        def test_x():
            got = attempt(f)
            assert got["took"] < 2 + SLACK, got
        """,
    "test_pipe's old check: the clock read again inside the assert": """
        import time
        def test_x():
            for case in cases:
                t0 = time.monotonic()
                run(case)
                assert time.monotonic() - t0 < timeout / 2
        """,
    "test_partition's old check: a ratio of profiled seconds by name": """
        def test_x():
            heavy, light = costs()
            assert heavy.duration > 3 * light.duration
        """,
    "a result key that names a time": """
        def test_x():
            got = run()
            assert got["elapsed"] < WAIT / 2, got
        """,
    "an _at timestamp": """
        def test_x(res):
            assert res["raised_at"] - res["started_at"] <= 2.0
        """,
    "a list of clock readings": """
        import time
        def test_x():
            seen = []
            seen.append(time.time())
            assert seen[-1] >= limit
        """,
    "test_partition's old check: costs the profiler measured, and a step simulated from them": """
        def test_x(one_thread):
            prof = split(layers, 4, "profile", sample=x, target=y, loss_fn=F.mse_loss)
            uni = prof.with_counts(split(layers, 4).counts)
            heavy, light = sum(prof.layer_costs[:4]) / 4, sum(prof.layer_costs[4:]) / 12
            t_prof = ppfast.simulate(program, prof.costs()).makespan
            t_uni = ppfast.simulate(program, uni.costs()).makespan
            assert t_prof < 0.75 * t_uni
        """,
    "an ordering chained with a sign check": """
        def test_x(m):
            assert 0 < m.wall < 10
        """,
    "datetime.now()": """
        import datetime
        def test_x(deadline):
            assert datetime.datetime.now() < deadline
        """,
    "an assignment after its use in a loop": """
        import time
        def test_x():
            last = None
            for _ in range(3):
                if last is not None:
                    assert stamp - last > 1
                last = stamp
                stamp = time.time()
        """,
}

NOT_FLAGGED = {
    "a clock used for a deadline, never asserted on": """
        import time
        def test_x():
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                poll()
            assert done()
        """,
    "a timing compared for equality on a constructed object": """
        def test_x(m):
            assert m.wall == 0.5 and m.loads == [1]
        """,
    "a sign check": """
        def test_x(m):
            assert m.wall > 0
        """,
    "counts and orders that are not times": """
        def test_x(prof, got):
            assert t_prof < 0.75 * t_uni
            assert got["done"] == [True] * 64
            assert all(s <= e for _, s, e in actions)
            assert len(calls) > 3
        """,
    "the profiler given a clock that counts work": """
        def test_x(monkeypatch):
            monkeypatch.setattr(profile_units, "_clock", lambda modules, args: work)
            prof = split(layers, 4, method="profile", sample=x)
            assert prof.layer_costs[0] > 3 * prof.layer_costs[-1]
        """,
    "a split that is not profiled": """
        def test_x():
            s = split(layers, 4, "parameters")
            assert s.stage_costs[0] > s.stage_costs[1]
        """,
    "a timeout (a setting, not a measurement)": """
        def test_x(sched):
            assert sched.timeout > 60
        """,
    "another function's variable of the same name": """
        import time
        def helper():
            took = time.monotonic()
            return took
        def test_x():
            took = 3
            assert took < 5
        """,
    "a layer's profiled times, which the name does not say are times": """
        def test_x(s):
            assert all(t[2] > 0 for t in s.layer_times)
            assert os.path.getsize(path) > 10
        """,
}


@pytest.mark.parametrize("case", list(FLAGGED))
def test_the_detector_flags(case):
    assert _found(FLAGGED[case]) == ["test_x"], case


@pytest.mark.parametrize("case", list(NOT_FLAGGED))
def test_the_detector_leaves_alone(case):
    assert _found(NOT_FLAGGED[case]) == [], case


def test_the_detector_catches_the_assertions_this_tree_used_to_have():
    """The wall-clock checks replaced by counts and orders, as they were written."""
    old = """
        import time
        def attempt(fn):
            t0 = time.monotonic()
            try:
                fn()
            except Exception as e:
                return {"message": str(e), "elapsed": time.monotonic() - t0}
            return {"type": None, "elapsed": time.monotonic() - t0}
        def test_loss_must_be_scalar(early):
            first = early[0]["non-scalar-loss"]
            assert first["elapsed"] < 2 + SLACK, first
        def test_pipe_failures_raise_the_cause_at_once():
            for pipe, inputs, target, error, words in cases:
                t0 = time.monotonic()
                pipe.step(inputs, target=target)
                assert time.monotonic() - t0 < timeout / 2
        def test_failures_come_back_with_their_tracebacks():
            t0 = time.monotonic()
            run_ranks(raise_or_exit, 3, timeout=60.0, grace=3.0)
            assert time.monotonic() - t0 < 40
        def test_ranks_waiting_to_sum_give_up_when_one_fails():
            t0 = time.monotonic()
            t.join(5)
            assert errors and time.monotonic() - t0 < 5
        def fail_rank_0(rank, world, how):
            start = time.monotonic()
            try:
                t.recv(torch.empty(4), 0, 1).wait(WAIT)
            except RuntimeError as e:
                return {"message": str(e), "elapsed": time.monotonic() - start}
        def test_a_peer_that_gives_up_fails_the_wait_at_once():
            _, got = run_ranks(fail_rank_0, 2, "abort", timeout=60.0)
            assert got["elapsed"] < WAIT / 2, got
        def test_profile_beats_uniform_in_simulation(one_thread):
            prof = split(layers, 4, "profile", sample=x, target=y, loss_fn=F.mse_loss)
            heavy, light = sum(prof.layer_costs[:4]) / 4, sum(prof.layer_costs[4:]) / 12
            assert heavy > 3 * light, prof.describe()
    """
    assert _found(old) == [
        "test_loss_must_be_scalar",
        "test_pipe_failures_raise_the_cause_at_once",
        "test_failures_come_back_with_their_tracebacks",
        "test_ranks_waiting_to_sum_give_up_when_one_fails",
        "test_a_peer_that_gives_up_fails_the_wait_at_once",
        "test_profile_beats_uniform_in_simulation",
    ]
