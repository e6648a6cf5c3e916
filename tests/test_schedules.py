"""Schedule generators: literal tables, structure, and the bubbles and peaks they promise.

Unless a test says otherwise, costs are equal and per pass (F = I = W = 1 for a rank's whole
share of the model, so a stage of a v-stage-per-rank schedule costs 1/v), with no
communication time; peaks count activations in microbatches of a rank's share, with a pending
W still holding half of its stage's (w_keep = 0.5, the simulator's default).
"""

from __future__ import annotations

import ast
import functools
import math
from collections import Counter
from pathlib import Path

import pytest

import ppfast.program.schedules as schedules_pkg
from ppfast.program.ir import Kind, Program, loop_placement, v_placement
from ppfast.program.schedules import SCHEDULES, generate, lookup, schedule_names
from ppfast.program.simulator import Costs, simulate
from ppfast.program.validate import validate

EPS = 1e-9
PS = [2, 3, 4, 8]
INTERLEAVED = ["interleaved-1f1b", "interleaved-zb"]


def _ms(p: int) -> list[int]:
    # multiples of p and two that are not (p + 1 and 3p - 1 are not multiples for p >= 2)
    return [p, 2 * p, 4 * p, 8 * p, p + 1, 3 * p - 1]


GRID = [(p, m) for p in PS for m in _ms(p)]


@functools.cache
def _program(name: str, p: int, m: int, v: int | None = None) -> Program:
    return generate(name, p, m, v)


@functools.cache
def _sim(name: str, p: int, m: int, v: int | None = None, costs: Costs | None = None):
    return simulate(_program(name, p, m, v), costs or Costs())


def _rows(text: str) -> str:
    """A table as to_text() writes it; a line not starting with 'rank' continues the last."""
    rows: list[str] = []
    for line in text.strip().splitlines():
        line = line.strip()
        if line.startswith("rank"):
            rows.append(line)
        else:
            rows[-1] += " " + line
    return "\n".join(rows)


# ---------------------------------------------------------------- literal tables


LITERAL = {
    ("gpipe", 2, 3, None): """
        rank 0: 0F0 0F1 0F2 0B0 0B1 0B2
        rank 1: 1F0 1F1 1F2 1B0 1B1 1B2
    """,
    ("1f1b", 2, 4, None): """
        rank 0: 0F0 0F1 0B0 0F2 0B1 0F3 0B2 0B3
        rank 1: 1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3
    """,
    # groups of p = 2; rank r warms up with (v-1)*2 + 2*(p-1-r) forwards (Megatron, torch)
    ("interleaved-1f1b", 2, 4, 2): """
        rank 0: 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3
        rank 1: 1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3
    """,
    # m = 3 is not a multiple of p = 2: one group of 3, so rank 0 warms up with 3 + 2 forwards
    ("interleaved-1f1b", 2, 3, 2): """
        rank 0: 0F0 0F1 0F2 2F0 2F1 2F2 2B0 2B1 2B2 0B0 0B1 0B2
        rank 1: 1F0 1F1 1F2 3F0 3B0 3F1 3B1 3F2 3B2 1B0 1B1 1B2
    """,
    # torch's ScheduleLoopedBFS order: each local stage's forwards for every microbatch, then
    # the backwards from the last local stage, microbatches in reverse
    ("looped-bfs", 2, 3, 2): """
        rank 0: 0F0 0F1 0F2 2F0 2F1 2F2 2B2 2B1 2B0 0B2 0B1 0B0
        rank 1: 1F0 1F1 1F2 3F0 3F1 3F2 3B2 3B1 3B0 1B2 1B1 1B0
    """,
    # torch's ZB1P order: one warmup forward per hop, the first r Ws of rank r at the end
    ("interleaved-zb", 2, 4, 2): """
        rank 0: 0F0 0F1 2F0 2F1 2I0 2W0 0F2 2I1 2W1 0F3 0I0 0W0
                2F2 0I1 0W1 2F3 2I2 2W2 2I3 2W3 0I2 0W2 0I3 0W3
        rank 1: 1F0 1F1 3F0 3I0 3F1 3I1 3W0 1F2 1I0 3W1 1F3 1I1
                1W0 3F2 3I2 1W1 3F3 3I3 3W2 1I2 3W3 1I3 1W2 1W3
    """,
    ("zb-h1", 3, 3, None): """
        rank 0: 0F0 0F1 0F2 0I0 0W0 0I1 0W1 0I2 0W2
        rank 1: 1F0 1F1 1I0 1F2 1I1 1W0 1I2 1W1 1W2
        rank 2: 2F0 2I0 2F1 2I1 2F2 2I2 2W0 2W1 2W2
    """,
    # greedy: rank 1 may hold 2p-1 = 3 forwards until their Ws, so it runs 1W0 before 1F3
    ("zb-h2", 2, 4, None): """
        rank 0: 0F0 0F1 0F2 0I0 0W0 0I1 0F3 0I2 0W1 0W2 0I3 0W3
        rank 1: 1F0 1I0 1F1 1I1 1F2 1I2 1W0 1F3 1I3 1W1 1W2 1W3
    """,
    # the paper's pattern (the same order as torch's ScheduleZBVZeroBubble)
    ("zb-v", 2, 4, None): """
        rank 0: 0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0F3 0I0 0W0
                3F2 3I2 3W2 0I1 0W1 3F3 3I3 3W3 0I2 0W2 0I3 0W3
        rank 1: 1F0 2F0 1F1 2F1 2I0 2W0 1F2 1I0 1W0 2F2 2I1 2W1
                1F3 1I1 1W1 2F3 2I2 2W2 1I2 2I3 1I3 1W2 2W3 1W3
    """,
    # the same order as torch's ScheduleDualPipeV
    ("dualpipev", 2, 4, None): """
        rank 0: 0F0 0F1 0F2 3F0 3I0 3W0 3F1 (0F3;3B1)OVERLAP_F_B (3F2;0B0)OVERLAP_F_B
                3B2 (3F3;0B1)OVERLAP_F_B 3B3 0I2 0W2 0I3 0W3
        rank 1: 1F0 2F0 1F1 2F1 1F2 2B0 (2F2;1B0)OVERLAP_F_B (1F3;2B1)OVERLAP_F_B
                (2F3;1B1)OVERLAP_F_B 2B2 1B2 2I3 1I3 2W3 1W3
    """,
}


@pytest.mark.parametrize(("name", "p", "m", "v"), list(LITERAL), ids=str)
def test_literal_tables(name, p, m, v):
    text = LITERAL[name, p, m, v]
    prog = generate(name, p, m, v)
    assert prog.to_text() == _rows(text)
    assert str(prog) == prog.to_text()
    assert prog.name == name
    assert prog.num_microbatches == m


# ---------------------------------------------------------------- structure


def _check_complete(prog: Program) -> None:
    """One F per (stage, mb), then either one B, or one I and later one W, on the stage's rank."""
    where: dict[tuple[Kind, int, int], tuple[int, int]] = {}
    for r, acts in enumerate(prog.ranks):
        for k, a in enumerate(acts):
            assert a.kind not in (Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B)
            for x in a.parts():
                assert prog.stage_to_rank[x.stage] == r, f"{x} is on rank {r}"
                key = (x.kind, x.stage, x.mb)
                assert key not in where, f"{x} appears twice"
                where[key] = (r, k)
    for s in range(prog.num_stages):
        for i in range(prog.num_microbatches):
            f = where[(Kind.F, s, i)]
            if (Kind.B, s, i) in where:
                assert (Kind.I, s, i) not in where and (Kind.W, s, i) not in where
                assert f < where[(Kind.B, s, i)]
            else:
                assert f < where[(Kind.I, s, i)] < where[(Kind.W, s, i)]
    expected = prog.num_stages * prog.num_microbatches
    counts = Counter(kind for kind, _, _ in where)
    assert counts[Kind.F] == expected
    assert counts[Kind.B] + counts[Kind.I] == expected and counts[Kind.I] == counts[Kind.W]


def _all_on(p: int, m: int):
    for name in schedule_names():
        spec = SCHEDULES[name]
        if m < spec.min_m(p) or spec.options:
            continue  # searched schedules (auto) have their own tests
        for v in [2, 3] if spec.v_free else [None]:
            yield name, v


@pytest.mark.parametrize(("p", "m"), GRID)
def test_every_schedule_is_complete_lowers_and_passes_the_dry_run(p, m):
    for name, v in _all_on(p, m):
        prog = _program(name, p, m, v)
        spec = lookup(name)
        assert prog.name == name
        vv = v or spec.default_v
        place = loop_placement(p, vv) if spec.placement == "loop" else v_placement(p)
        assert prog.stage_to_rank == place
        _check_complete(prog)
        kinds = {x.kind for acts in prog.ranks for a in acts for x in a.parts()}
        assert (Kind.I in kinds) == spec.split_backward, name
        # dependencies in order: the timed walk finishes, lowering and the dry run pass
        validate(prog)


def test_generators_are_deterministic():
    for name, v in _all_on(4, 9):
        assert generate(name, 4, 9, v).ranks == generate(name, 4, 9, v).ranks


def test_schedule_modules_import_no_torch():
    # schedules are data; the layer must not touch torch or devices
    for path in Path(schedules_pkg.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "torch" for n in names), path.name


# ---------------------------------------------------------------- bubbles and step times


@pytest.mark.parametrize(("p", "m"), GRID)
def test_gpipe_and_1f1b_bubble(p, m):
    for name in ["gpipe", "1f1b"]:
        sim = _sim(name, p, m)
        assert sim.bubble == pytest.approx((p - 1) / (m + p - 1), abs=EPS)
        assert sim.makespan == pytest.approx(3 * (m + p - 1), abs=EPS)


@pytest.mark.parametrize(("p", "m"), GRID)
@pytest.mark.parametrize("v", [2, 3])
def test_interleaved_1f1b_bubble_for_any_m_at_least_p(p, m, v):
    sim = _sim("interleaved-1f1b", p, m, v)
    assert sim.bubble == pytest.approx((p - 1) / (v * m + p - 1), abs=EPS)


@pytest.mark.parametrize("costs", [Costs(1, 0.25, 0.25), Costs(1, 2, 2)], ids=["B<F", "B>F"])
@pytest.mark.parametrize(("p", "m"), [(3, 4), (4, 8), (4, 11), (8, 13)])
def test_interleaved_1f1b_bubble_holds_for_other_f_to_b_ratios(p, m, costs):
    sim = _sim("interleaved-1f1b", p, m, 2, costs)
    assert sim.bubble == pytest.approx((p - 1) / (2 * m + p - 1), abs=EPS)


def _looped_bfs_bubble(p: int, m: int, v: int) -> float:
    # m >= p: every rank's forwards run back to back, then its backwards, with p-1 stage
    # passes of fill and of drain, as interleaved 1F1B. m < p: rank 0 waits for each
    # microbatch to come round the ring, so the step is GPipe's over v*p stages, v*p+m-1
    # stage passes, of which a rank is busy v*m.
    return 1 - v * m / (v * max(m, p) + min(m, p) - 1)


@pytest.mark.parametrize(("p", "m"), GRID + [(4, 1), (4, 3), (8, 2), (8, 5)])
@pytest.mark.parametrize("v", [2, 3])
def test_looped_bfs_bubble(p, m, v):
    sim = _sim("looped-bfs", p, m, v)
    assert sim.bubble == pytest.approx(_looped_bfs_bubble(p, m, v), abs=EPS)
    if m >= p:
        assert sim.bubble == pytest.approx((p - 1) / (v * m + p - 1), abs=EPS)
    # every rank holds all of its stages' activations at the turn, as GPipe does
    assert sim.peak_activations == pytest.approx([m] * p)


@pytest.mark.parametrize(("p", "m"), GRID)
def test_zb_h1_step_time_is_3m_plus_p_minus_1(p, m):
    assert _sim("zb-h1", p, m).makespan == pytest.approx(3 * m + p - 1, abs=EPS)
    # a third of 1F1B's bubble time
    bubble_time = _sim("zb-h1", p, m).makespan - 3 * m
    assert bubble_time == pytest.approx((_sim("1f1b", p, m).makespan - 3 * m) / 3, abs=EPS)


@pytest.mark.parametrize(("p", "m"), GRID)
def test_zb_h2_never_slower_than_zb_h1_and_has_no_idle_inside(p, m):
    h1, h2 = _sim("zb-h1", p, m), _sim("zb-h2", p, m)
    # for v = 1 the last rank starts at p-1 with 3m of work: ZB-H1 already meets that floor
    assert h2.makespan == pytest.approx(h1.makespan, abs=EPS)
    if m >= 2 * p:
        # the parallelogram: no rank waits between its first and its last action
        for r in range(p):
            span = max(h2.end[r]) - min(h2.start[r])
            assert span == pytest.approx(h2.busy[r], abs=EPS)
    comm = Costs(comm=0.1)
    assert _sim("zb-h2", p, m, None, comm).makespan <= _sim("zb-h1", p, m, None, comm).makespan


@pytest.mark.parametrize(("p", "m"), GRID)
def test_zb_v_beats_zb_h1(p, m):
    zbv = _sim("zb-v", p, m).makespan
    assert zbv < _sim("zb-h1", p, m).makespan - EPS
    floor = 3 * m + (p - 1) / 2  # the middle rank cannot start before (p-1)/2
    if m == p or m >= 2 * p - 1:
        assert zbv == pytest.approx(floor, abs=EPS)
    else:
        assert floor - EPS <= zbv <= floor + 2


@pytest.mark.parametrize(("p", "m"), GRID)
@pytest.mark.parametrize("v", [2, 3])
def test_interleaved_zb_step_time(p, m, v):
    assert _sim("interleaved-zb", p, m, v).makespan == pytest.approx(3 * m + (p - 1) / v, abs=EPS)


@pytest.mark.parametrize(("p", "m"), [(p, m) for p, m in GRID if m >= 2 * p])
def test_dualpipev_step_time(p, m):
    # the simulator charges an OVERLAP_F_B the sum of its parts: what DualPipeV gains is the
    # communication hidden inside each pair, which this cost model does not show
    assert _sim("dualpipev", p, m).makespan == pytest.approx(3 * m + p - 1, abs=EPS)


# ---------------------------------------------------------------- peak activations


def _first_group(p: int, m: int) -> int:
    return math.ceil(m / (m // p))


def _expected_peak(name: str, p: int, m: int, v: int | None) -> float:
    if name in ("gpipe", "looped-bfs"):
        return m
    if name in ("1f1b", "zb-h1", "zb-v"):
        return min(p, m)
    if name == "zb-h2":
        return min(2 * p - 1, m)
    if name == "dualpipev":
        return p + 0.5  # 2p + 1 stage activations of half a microbatch each
    g = _first_group(p, m)
    if name == "interleaved-1f1b":
        return min((v - 1) * g + 2 * p - 1, v * m) / v
    if name == "interleaved-zb":
        return min((v - 1) * g + p, v * m) / v
    raise AssertionError(name)


@pytest.mark.parametrize(("p", "m"), GRID)
def test_peak_activations(p, m):
    for name, v in _all_on(p, m):
        peaks = _sim(name, p, m, v).peak_activations
        assert max(peaks) == pytest.approx(_expected_peak(name, p, m, v), abs=1e-6), (name, v)
    assert _sim("1f1b", p, m).peak_activations[0] == p


def test_interleaved_peak_when_p_divides_m():
    # p + (p-1)/v microbatches for interleaved 1F1B, p for its zero-bubble variant
    assert max(_sim("interleaved-1f1b", 4, 16, 2).peak_activations) == pytest.approx(5.5)
    assert max(_sim("interleaved-zb", 4, 16, 2).peak_activations) == pytest.approx(4.0)


# ---------------------------------------------------------------- registry and bad input


def test_schedule_names_and_specs():
    assert schedule_names() == [
        "gpipe",
        "1f1b",
        "interleaved-1f1b",
        "looped-bfs",
        "interleaved-zb",
        "zb-h1",
        "zb-h2",
        "zb-v",
        "dualpipev",
        "auto",
    ]
    table = {
        n: (s.placement, s.default_v, s.v_free, s.split_backward, s.min_m(4))
        for n, s in SCHEDULES.items()
    }
    assert table == {
        "gpipe": ("loop", 1, False, False, 1),
        "1f1b": ("loop", 1, False, False, 1),
        "interleaved-1f1b": ("loop", 2, True, False, 4),
        "looped-bfs": ("loop", 2, True, False, 1),
        "interleaved-zb": ("loop", 2, True, True, 4),
        "zb-h1": ("loop", 1, False, True, 1),
        "zb-h2": ("loop", 1, False, True, 1),
        "zb-v": ("v", 2, False, True, 1),
        "dualpipev": ("v", 2, False, True, 8),
        "auto": ("searched", 2, True, True, 1),
    }


@pytest.mark.parametrize(
    ("spelling", "name"),
    [
        ("GPipe", "gpipe"),
        ("1F1B", "1f1b"),
        ("Interleaved1F1B", "interleaved-1f1b"),
        ("ScheduleInterleaved1F1B", "interleaved-1f1b"),
        ("InterleavedZeroBubble", "interleaved-zb"),
        ("ZBVZeroBubble", "zb-v"),
        ("DualPipeV", "dualpipev"),
        ("LoopedBFS", "looped-bfs"),
        ("ScheduleLoopedBFS", "looped-bfs"),
        ("looped_bfs", "looped-bfs"),
        ("ZB-H1", "zb-h1"),
        ("zb_h2", "zb-h2"),
        ("Interleaved-1F1B", "interleaved-1f1b"),
    ],
)
def test_names_are_case_insensitive_and_accept_torch_class_names(spelling, name):
    assert lookup(spelling).name == name
    assert generate(spelling, 2, 4).name == name


def test_default_v_and_explicit_v():
    assert generate("interleaved-1f1b", 2, 4).v == 2
    assert generate("interleaved-zb", 2, 4, 3).v == 3
    assert generate("looped-bfs", 2, 4).v == 2
    assert generate("looped-bfs", 2, 1, 4).v == 4
    assert generate("zb-v", 2, 4, 2).v == 2
    assert generate("1f1b", 2, 4, 1).v == 1


@pytest.mark.parametrize(
    ("args", "kwargs", "says"),
    [
        (("warp", 2, 4), {}, "known schedules: gpipe, 1f1b"),
        (("1f1b", 0, 4), {}, "p must be at least 1"),
        (("1f1b", 2.0, 4), {}, "must be an int"),
        (("1f1b", 2, 0), {}, "m must be at least 1"),
        (("interleaved-1f1b", 4, 3), {}, "at least 4"),
        (("interleaved-zb", 4, 3, 2), {}, "at least 4"),
        (("interleaved-1f1b", 2, 4, 1), {}, "v must be at least 2"),
        (("looped-bfs", 2, 4, 1), {}, "v must be at least 2"),
        (("looped-bfs", 2, 0), {}, "m must be at least 1"),
        (("dualpipev", 4, 7), {}, "at least 8"),
        (("gpipe", 2, 4, 2), {}, "v=2 has no meaning"),
        (("zb-v", 2, 4, 3), {}, "v=3 has no meaning"),
        (("zb-h1", 2, 4), {"mem_cap": 3}, "unknown options ['mem_cap']"),
    ],
)
def test_bad_input_says_what_to_change(args, kwargs, says):
    with pytest.raises(ValueError) as e:
        generate(*args, **kwargs)
    assert says in str(e.value)
