"""``auto``: the fastest schedule, at given costs, that stays under a memory cap.

In the spirit of the zero-bubble paper's automatic scheduler: a greedy list scheduler, run
with the measured per-stage F, I, W and communication costs, places each rank's next action
(I on the critical path first, F while memory allows, W to fill what would idle) under the cap,
for each placement that can help (one stage per rank, V, interleaved). Every fixed schedule
that fits the cap is a candidate too, and every candidate is timed by the simulator with the
same costs; the fastest wins (ties go to the smaller peak). So ``auto`` is never slower in
simulation than any fixed schedule that respects the cap, and it is faster where the costs are
skewed enough that no hand-made shape fits them.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..ir import Program, loop_placement, v_placement
from ..simulator import Costs, simulate
from ._greedy import list_schedule

_EPS = 1e-9


def _fixed_candidates(p: int, m: int, v: int | None, fixed: Sequence) -> list[Program]:
    out = []
    for spec in fixed:
        vs = [None] if not spec.v_free else sorted({v or spec.default_v, spec.default_v})
        for vv in vs:
            try:
                out.append(spec.build(p, m, spec.resolve_v(vv)))
            except ValueError:
                continue  # this schedule cannot run this (p, m, v)
    return out


def _greedy_candidates(p: int, m: int, v: int | None, costs: Costs, cap: float) -> list[Program]:
    placements = [("greedy-loop", loop_placement(p), 1), ("greedy-v", v_placement(p), 2)]
    for vv in sorted({2, v or 2}):
        if vv > 1:
            placements.append((f"greedy-interleaved-v{vv}", loop_placement(p, vv), vv))
    out = []
    for name, place, vv in placements:
        n = len(place)
        stage_costs = costs.stage_costs(n, vv)
        act = [1.0 / vv] * n
        # a lower limit sometimes beats the cap itself: fewer forwards in flight let the
        # backward wave start earlier on skewed costs
        limits = sorted({cap, max(1.0, cap - 1.0), max(1.0, (cap + 1.0) / 2)}, reverse=True)
        for limit in limits:
            if limit + _EPS < 1.0 / vv:
                continue
            try:
                ranks = list_schedule(place, m, [limit] * p, stage_costs, act, costs.comm)
            except AssertionError:
                continue  # the greedy stalls under this limit (V placement with a tiny cap)
            prog = Program(ranks, place, m, name)
            prog.meta["mem_limit"] = limit
            out.append(prog)
    return out


def auto(
    p: int,
    m: int,
    v: int | None = None,
    *,
    costs: Costs | None = None,
    mem_cap: float | None = None,
    w_keep: float = 0.5,
    fixed: Sequence = (),
) -> Program:
    """The fastest program found for ``costs`` whose simulated peak activations per rank
    (in microbatches of a rank's share of the model) stay within ``mem_cap``.

    ``mem_cap`` defaults to p, 1F1B's peak. ``v`` adds interleaved candidates with that many
    stages per rank. ``fixed`` are the registry's fixed schedules (``ScheduleSpec``), tried as
    candidates beside the searched ones. The returned program's ``meta`` says which candidate
    won and how every candidate fared.
    """
    costs = costs or Costs()
    if costs.per_stage is not None:
        raise ValueError(
            "auto takes per-pass costs (F, I, W, comm), one set for every rank; per-stage "
            "costs fix the stage count, which auto chooses"
        )
    cap = float(p if mem_cap is None else mem_cap)
    if cap < 1.0:
        raise ValueError(
            f"mem_cap={mem_cap} is below one microbatch of activations; a pipeline needs at "
            "least 1 (the cap counts microbatches of a rank's share of the model)"
        )
    candidates = _fixed_candidates(p, m, v, fixed) + _greedy_candidates(p, m, v, costs, cap)
    table = []
    best = None
    for prog in candidates:
        sim = simulate(prog, costs, w_keep=w_keep)
        peak = max(sim.peak_activations)
        fits = peak <= cap + _EPS
        table.append({"name": prog.name, "makespan": sim.makespan, "peak": peak, "fits": fits})
        if fits and (
            best is None
            or sim.makespan < best[0] - _EPS
            or (abs(sim.makespan - best[0]) <= _EPS and peak < best[1] - _EPS)
        ):
            best = (sim.makespan, peak, prog)
    if best is None:
        smallest = min(table, key=lambda x: x["peak"])
        raise ValueError(
            f"no schedule for p={p}, m={m} stays under mem_cap={cap:g}; the smallest peak "
            f"found is {smallest['peak']:g} ({smallest['name']}): raise the cap"
        )
    chosen = best[2]
    result = Program(
        [list(acts) for acts in chosen.ranks], chosen.stage_to_rank, m, "auto", dict(chosen.meta)
    )
    result.meta.update(
        {"chosen": chosen.name, "mem_cap": cap, "makespan": best[0], "candidates": table}
    )
    return result
