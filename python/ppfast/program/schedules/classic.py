"""GPipe, 1F1B, interleaved 1F1B and looped BFS: schedules whose backward is one B action."""

from __future__ import annotations

from ..ir import Action, Kind, Program, loop_placement
from ._args import check_m, check_p, check_v
from ._groups import chunk_orders, group_sizes


def gpipe(p: int, m: int) -> Program:
    """All forwards, then all backwards, in microbatch order.

    With equal costs and no communication the bubble is (p-1)/(m+p-1) and every rank holds the
    activations of all m microbatches at the turn.
    """
    check_p("gpipe", p)
    check_m("gpipe", m, 1)
    ranks = [
        [Action(r, Kind.F, i) for i in range(m)] + [Action(r, Kind.B, i) for i in range(m)]
        for r in range(p)
    ]
    return Program(ranks, loop_placement(p), m, "gpipe")


def one_f_one_b(p: int, m: int) -> Program:
    """1F1B: rank r runs min(p-1-r, m) warmup forwards, then F/B pairs, then the cooldown Bs.

    Bubble (p-1)/(m+p-1) like GPipe, but rank r holds at most min(p-r, m) microbatches.
    """
    check_p("1f1b", p)
    check_m("1f1b", m, 1)
    ranks = []
    for r in range(p):
        warmup = min(p - 1 - r, m)
        acts = [Action(r, Kind.F, i) for i in range(warmup)]
        for k in range(m - warmup):
            acts += [Action(r, Kind.F, warmup + k), Action(r, Kind.B, k)]
        acts += [Action(r, Kind.B, i) for i in range(m - warmup, m)]
        ranks.append(acts)
    return Program(ranks, loop_placement(p), m, "1f1b")


def interleaved_warmup(p: int, m: int, v: int, rank: int, hops: int) -> int:
    """Forwards a rank runs before its first backward in the interleaved schedules.

    (v-1) times the first group's size lets the first microbatch reach the last chunk; each
    rank further from the end of the ring then needs ``hops`` more forwards to cover the round
    trip of the first backward (2 for 1F1B as in Megatron, which also absorbs communication
    latency; 1 for the zero-bubble variant, as in torch, whose W fills that slack instead).
    """
    return min((v - 1) * group_sizes(p, m)[0] + hops * (p - 1 - rank), v * m)


def interleaved_1f1b(p: int, m: int, v: int) -> Program:
    """Interleaved 1F1B (Megatron): v stages per rank on the loop placement, any m >= p.

    Microbatches run in groups (see ``_groups``); rank r runs
    ``(v-1)*g + 2*(p-1-r)`` warmup forwards (g = the first group's size, p when p divides m),
    then F/B pairs, then the remaining Bs. With equal per-stage costs and no communication the
    bubble is exactly (p-1)/(v*m+p-1) for every m >= p (checked by simulation for p <= 8,
    v <= 5, p <= m <= 7p). Rank 0 holds at most ``(v-1)*g + 2p - 1`` stage activations, i.e.
    p + (p-1)/v microbatches' worth when p divides m.

    m < p is refused: rank 0 would finish a chunk's forwards before the first microbatch
    came back for the next chunk, so the bound cannot be reached; use 1F1B there.
    """
    check_p("interleaved-1f1b", p)
    check_v("interleaved-1f1b", v)
    check_m(
        "interleaved-1f1b",
        m,
        p,
        "interleaved schedules need at least p microbatches to keep rank 0 busy between "
        "chunks; use fewer ranks or '1f1b'",
    )
    fwd, bwd = chunk_orders(p, m, v)
    ranks = []
    for r in range(p):
        warmup = interleaved_warmup(p, m, v, r, hops=2)
        acts = [Action(c * p + r, Kind.F, i) for c, i in fwd[:warmup]]
        for (fc, fi), (bc, bi) in zip(fwd[warmup:], bwd, strict=False):
            acts += [Action(fc * p + r, Kind.F, fi), Action(bc * p + r, Kind.B, bi)]
        acts += [Action(c * p + r, Kind.B, i) for c, i in bwd[len(fwd) - warmup :]]
        ranks.append(acts)
    return Program(ranks, loop_placement(p, v), m, "interleaved-1f1b")


def looped_bfs(p: int, m: int, v: int) -> Program:
    """Looped BFS (Lamy-Poirier, arXiv 2211.05953): v stages per rank on the loop placement.

    Each rank runs the forwards of every microbatch through its first stage, then through its
    next stage, and so on; then the backwards, last stage first, each stage's microbatches in
    reverse (torch's ScheduleLoopedBFS order: the last microbatch forward is the first whose
    gradient comes back). Like GPipe it holds all m microbatches at the turn. With equal
    per-stage costs and no communication the bubble is (p-1)/(v*m+p-1) for m >= p, as
    interleaved 1F1B's; for m < p rank 0 waits for each microbatch to come round the ring, so
    the step is that of GPipe over v*p stages, and the bubble 1 - v*m/(v*p+m-1).
    """
    check_p("looped-bfs", p)
    check_v("looped-bfs", v)
    check_m("looped-bfs", m, 1)
    ranks = []
    for r in range(p):
        stages = range(r, v * p, p)
        acts = [Action(s, Kind.F, i) for s in stages for i in range(m)]
        acts += [Action(s, Kind.B, i) for s in reversed(stages) for i in reversed(range(m))]
        ranks.append(acts)
    return Program(ranks, loop_placement(p, v), m, "looped-bfs")
