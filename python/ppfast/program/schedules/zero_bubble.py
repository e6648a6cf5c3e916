"""Zero-bubble schedules (Qi et al. 2023, 2024): the backward split into I now and W later.

Costs below are per pass (F = I = W = 1 for a rank's whole share of the model, so a stage of
a schedule with v stages per rank costs 1/v), with no communication time.

- ZB-H1: 1F1B's warmup, I in place of B, and rank r holding back its first r Ws to fill the
  cooldown. Step time exactly 3m + p - 1 for m >= p (1F1B: 3(m + p - 1)); rank 0 peaks at p
  microbatches of activations like 1F1B.
- ZB-H2: greedy, up to 2p - 1 microbatches in flight per rank; no idle time between a rank's
  first and last action once m >= 2p. Its step time equals ZB-H1's, because for v = 1 the last
  rank cannot start before p - 1 and has 3m of work: 3m + p - 1 is the floor. It gains over
  ZB-H1 when hand-offs take time, and in the parallelogram shape the paper exploits.
- ZB-V: V placement, peak p microbatches. Step time 3m + (p-1)/2, the floor for V placement
  (the middle rank starts at (p-1)/2), for m = p and for m >= 2p-1 (checked for p <= 8);
  between those it is up to 2 above (e.g. p=8, m=9: 32.5 for 30.5), below ZB-H1 all the same.
- Interleaved zero bubble (torch's ZB1P): interleaved 1F1B's groups with one warmup forward per
  hop instead of two, I for B, and the first r Ws of rank r held back. Step time exactly
  3m + (p-1)/v for m >= p; rank 0 peaks at p microbatches when p divides m.
"""

from __future__ import annotations

from ..ir import Action, Kind, Program, loop_placement, v_placement
from ._args import check_m, check_p, check_v
from ._greedy import list_schedule
from ._groups import chunk_orders
from .classic import interleaved_warmup

# the delay used to break ties between candidate orders: an order that stays fast when
# hand-offs are slow is the one to keep
_TIE_BREAK_COMM = 0.1


def zb_h1(p: int, m: int) -> Program:
    """ZB-H1: 1F1B with B split into I and W, the Ws of rank r's first r steps deferred."""
    check_p("zb-h1", p)
    check_m("zb-h1", m, 1)
    order = [(0, i) for i in range(m)]
    ranks = [_split_1f1b(r, p, order, order, min(p - 1 - r, m)) for r in range(p)]
    return Program(ranks, loop_placement(p), m, "zb-h1")


def zb_h2(p: int, m: int) -> Program:
    """ZB-H2: greedy zero-bubble order with up to 2p - 1 microbatches in flight per rank."""
    check_p("zb-h2", p)
    check_m("zb-h2", m, 1)
    place = loop_placement(p)
    ranks = list_schedule(place, m, [2 * p - 1] * p)
    return Program(ranks, place, m, "zb-h2")


def zb_v(p: int, m: int) -> Program:
    """ZB-V: rank r holds stages r and 2p-1-r; peak p microbatches of activations.

    Two candidates are built and the faster one at nominal costs is kept: the paper's
    hand-made pattern, which reaches the floor 3m + (p-1)/2 once m >= 2p - 1, and the greedy
    list schedule under the same memory limit, which does better with fewer microbatches,
    where the pattern's padding leaves gaps. Ties go to the order that stays faster when
    hand-offs take time: the pattern's regular steady state, for every m >= 2p - 1 checked.
    """
    check_p("zb-v", p)
    check_m("zb-v", m, 1)
    place = v_placement(p)
    pattern = [_zb_v_pattern(r, p, m) for r in range(p)]
    if m >= 2 * p - 1:
        # the pattern reaches the V floor 3m + (p-1)/2 here; no candidate can beat it
        return Program(pattern, place, m, "zb-v")
    # memory counted in stage activations: one microbatch is two stages' worth
    candidates = [pattern, list_schedule(place, m, [2 * p] * p)]
    ranks = min(candidates, key=lambda c: _score(c, place, m))
    return Program(ranks, place, m, "zb-v")


def interleaved_zero_bubble(p: int, m: int, v: int) -> Program:
    """Interleaved zero bubble (torch's ScheduleInterleavedZeroBubble) for any m >= p."""
    check_p("interleaved-zb", p)
    check_v("interleaved-zb", v)
    check_m(
        "interleaved-zb",
        m,
        p,
        "interleaved schedules need at least p microbatches to keep rank 0 busy between "
        "chunks; use fewer ranks or 'zb-h1'",
    )
    fwd, bwd = chunk_orders(p, m, v)
    ranks = []
    for r in range(p):
        warmup = interleaved_warmup(p, m, v, r, hops=1)
        ranks.append(_split_1f1b(r, p, fwd, bwd, warmup))
    return Program(ranks, loop_placement(p, v), m, "interleaved-zb")


def _split_1f1b(
    rank: int, p: int, fwd: list[tuple[int, int]], bwd: list[tuple[int, int]], warmup: int
) -> list[Action]:
    """Warmup forwards, then F/I pairs, then the remaining Is; each I followed by a W except
    during the rank's first ``rank`` steps, whose Ws move to the end where the pipeline drains.

    ``fwd`` and ``bwd`` list (chunk, microbatch) pairs; chunk c of this rank is stage c*p + rank.
    """
    acts = [Action(c * p + rank, Kind.F, i) for c, i in fwd[:warmup]]
    n_w = 0
    for step, (c, i) in enumerate(bwd):
        if warmup + step < len(fwd):
            fc, fi = fwd[warmup + step]
            acts.append(Action(fc * p + rank, Kind.F, fi))
        acts.append(Action(c * p + rank, Kind.I, i))
        if step >= rank:
            wc, wi = bwd[n_w]
            acts.append(Action(wc * p + rank, Kind.W, wi))
            n_w += 1
    acts += [Action(c * p + rank, Kind.W, i) for c, i in bwd[n_w:]]
    return acts


def _zb_v_pattern(rank: int, p: int, m: int) -> list[Action]:
    """The hand-made ZB-V order of rank ``rank`` (paper, section 6), for n = max(m, 2p-1)
    microbatches with those beyond m dropped (the pattern needs 2p-1 to fill its warmup).

    Chunk 0 is stage ``rank`` (going down the V), chunk 1 stage 2p-1-rank (coming back up).
    Steady state per microbatch: F I W on chunk 0, then F I W on chunk 1.
    """
    n = max(m, 2 * p - 1)
    stage = (rank, 2 * p - 1 - rank)
    count = {(c, k): 0 for c in (0, 1) for k in (Kind.F, Kind.I, Kind.W)}
    seq: list[tuple[int, Kind]] = []

    def do(c: int, k: Kind) -> None:
        seq.append((c, k))
        count[c, k] += 1

    for _ in range(2 * (p - rank) - 1):
        do(0, Kind.F)
    for _ in range(rank):
        do(1, Kind.F)
        do(0, Kind.F)
    for _ in range(p - rank):
        do(1, Kind.F)
        do(1, Kind.I)
        do(1, Kind.W)
    while count[1, Kind.F] < count[0, Kind.F] or count[0, Kind.F] < n:
        if count[0, Kind.F] < n:
            do(0, Kind.F)
        for c in (0, 1):
            if c == 1:
                do(1, Kind.F)
            do(c, Kind.I)
            do(c, Kind.W)
    for _ in range(rank):
        do(0, Kind.I)
        do(1, Kind.I)
    for _ in range(p - rank):
        do(0, Kind.I)
        do(0, Kind.W)
    for c in (1, 0):
        while count[c, Kind.W] < count[c, Kind.I]:
            do(c, Kind.W)

    # number each chunk's F, I and W in order; that order is the microbatch order
    seen = {key: 0 for key in count}
    acts = []
    for c, k in seq:
        i = seen[c, k]
        seen[c, k] += 1
        if i < m:
            acts.append(Action(stage[c], k, i))
    return acts


def _score(ranks: list[list[Action]], place: tuple[int, ...], m: int) -> tuple[float, float]:
    """Step time at nominal costs (one unit per stage and kind), then with slow hand-offs."""
    from ..simulator import Costs, simulate

    prog = Program(ranks, place, m)
    v = prog.v
    return (
        simulate(prog, Costs(v, v, v)).makespan,
        simulate(prog, Costs(v, v, v, _TIE_BREAK_COMM)).makespan,
    )
