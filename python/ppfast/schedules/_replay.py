"""Replays a compute-only program with nominal costs, to choose between candidate orders.

A small pure-Python timing model (the project's simulator lives elsewhere and may need the
native module): every rank runs its actions in order, each as soon as its inputs exist. It
only serves generators that build several candidates and keep the fastest.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..ir import Action, Kind


def makespan(
    ranks: Sequence[Sequence[Action]],
    stage_to_rank: Sequence[int],
    m: int,
    costs: Sequence[tuple[float, float, float]] | None = None,
    comm: float = 0.0,
) -> float:
    """Step time of the program; ``costs[s]`` is (F, I, W) of stage s, B costing I + W."""
    n_stages = len(stage_to_rank)
    costs = list(costs) if costs is not None else [(1.0, 1.0, 1.0)] * n_stages
    f_done: dict[tuple[int, int], float] = {}
    g_done: dict[tuple[int, int], float] = {}
    clock = [0.0] * len(ranks)
    pc = [0] * len(ranks)

    def ready_at(a: Action) -> float | None:
        """When ``a``'s inputs exist, or None if one of them has not been produced yet."""
        s, i = a.stage, a.mb
        if a.kind is Kind.F:
            if s == 0:
                return 0.0
            t = f_done.get((s - 1, i))
            return None if t is None else t + _hop(stage_to_rank, s - 1, s, comm)
        if a.kind is Kind.W:
            return g_done.get((s, i))
        t = f_done.get((s, i))
        if t is None or s == n_stages - 1:
            return t
        g = g_done.get((s + 1, i))
        return None if g is None else max(t, g + _hop(stage_to_rank, s + 1, s, comm))

    progress = True
    while progress:
        progress = False
        for r, acts in enumerate(ranks):
            while pc[r] < len(acts):
                parts = acts[pc[r]].parts()
                times = [ready_at(x) for x in parts]
                if any(t is None for t in times):
                    break
                start = max([clock[r], *times])
                dur = 0.0
                for x in parts:
                    f, i, w = costs[x.stage]
                    dur += {Kind.F: f, Kind.I: i, Kind.W: w, Kind.B: i + w}[x.kind]
                clock[r] = start + dur
                for x in parts:
                    if x.kind is Kind.F:
                        f_done[(x.stage, x.mb)] = clock[r]
                    elif x.kind in (Kind.I, Kind.B):
                        g_done[(x.stage, x.mb)] = clock[r]
                pc[r] += 1
                progress = True
    assert all(pc[r] == len(acts) for r, acts in enumerate(ranks)), "candidate deadlocks"
    return max(clock)


def _hop(stage_to_rank: Sequence[int], src: int, dst: int, comm: float) -> float:
    return comm if stage_to_rank[src] != stage_to_rank[dst] else 0.0
