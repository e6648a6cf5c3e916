"""Simulates a program with per-stage costs: timeline, step time, bubbles, peak activations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from . import engine as _engine
from .faults import describe_stuck, engine_error
from .ir import Action, Program


@dataclass(frozen=True)
class Costs:
    """Costs of one microbatch, per *pass*: F, I, W are a rank's whole share of the model.

    A schedule with v stages per rank runs each stage at F/v, I/v, W/v unless ``per_stage``
    gives (F, I, W) for every stage explicitly. A full backward B costs I + W. ``comm`` is the
    time from the end of an action on one rank until its result is usable on another.
    """

    f: float = 1.0
    i: float = 1.0
    w: float = 1.0
    comm: float = 0.0
    per_stage: tuple[tuple[float, float, float], ...] | None = None

    def __post_init__(self) -> None:
        vals = [self.f, self.i, self.w, self.comm]
        if self.per_stage is not None:
            object.__setattr__(self, "per_stage", tuple(tuple(x) for x in self.per_stage))
            vals += [c for x in self.per_stage for c in x]
            if any(len(x) != 3 for x in self.per_stage):
                raise ValueError("per_stage costs need (F, I, W) for every stage")
        if any(c < 0 for c in vals):
            raise ValueError(f"costs must be non-negative, got {self}")

    @classmethod
    def parse(cls, text: str) -> Costs:
        """``"F,I,W"`` or ``"F,I,W,COMM"``, e.g. ``"1,2,1,0.1"``."""
        try:
            vals = [float(x) for x in text.split(",")]
        except ValueError:
            vals = []
        if len(vals) not in (3, 4):
            raise ValueError(
                f"costs are written F,I,W or F,I,W,COMM (e.g. 1,2,1,0.1), not {text!r}"
            )
        return cls(*vals)

    def stage_costs(self, num_stages: int, v: int) -> list[tuple[float, float, float]]:
        if self.per_stage is not None:
            if len(self.per_stage) != num_stages:
                raise ValueError(
                    f"per_stage gives costs for {len(self.per_stage)} stages; "
                    f"the program has {num_stages}"
                )
            return list(self.per_stage)
        return [(self.f / v, self.i / v, self.w / v)] * num_stages

    def table(self, num_stages: int, v: int) -> list[float]:
        """Flat [F, I, W, B] per stage, the engine's cost table."""
        out: list[float] = []
        for f, i, w in self.stage_costs(num_stages, v):
            out += (f, i, w, i + w)
        return out


@dataclass
class Simulation:
    """What a simulated step looks like."""

    program: Program
    costs: Costs
    start: list[list[float]]
    end: list[list[float]]
    busy: list[float]
    peak_activations: list[float]
    makespan: float
    bubble_per_rank: list[float] = field(default_factory=list)
    bubble: float = 0.0

    def span_bubble_per_rank(self) -> list[float]:
        """Idle share of each rank's own span (its first action's start to its last's end).

        The step bubble counts the fill and drain every rank waits through; this counts only
        the gaps between a rank's actions. Where it is 0 (ZB-H2) the fill of one step can
        overlap the drain of the previous one, if nothing synchronises the ranks in between.
        """
        out = []
        for r, acts in enumerate(self.program.ranks):
            times = [(self.start[r][k], self.end[r][k]) for k, a in enumerate(acts) if a.is_compute]
            span = max(e for _, e in times) - min(s for s, _ in times) if times else 0.0
            out.append(1.0 - self.busy[r] / span if span > 0 else 0.0)
        return out

    def timeline(self) -> list[tuple[int, Action, float, float]]:
        """Compute actions as (rank, action, start, end), in rank then program order."""
        return [
            (r, a, self.start[r][k], self.end[r][k])
            for r, acts in enumerate(self.program.ranks)
            for k, a in enumerate(acts)
            if a.is_compute
        ]

    def summary(self) -> dict:
        prog = self.program
        return {
            "schedule": prog.name,
            "p": prog.p,
            "v": prog.v,
            "m": prog.num_microbatches,
            "num_stages": prog.num_stages,
            "costs": {
                "F": self.costs.f,
                "I": self.costs.i,
                "W": self.costs.w,
                "comm": self.costs.comm,
            },
            "makespan": self.makespan,
            "bubble": self.bubble,
            "bubble_per_rank": self.bubble_per_rank,
            "span_bubble_per_rank": self.span_bubble_per_rank(),
            "busy_per_rank": self.busy,
            "peak_activations": self.peak_activations,
        }


def activation_units(program: Program) -> list[float]:
    """Activations one F of each stage holds: 1/v, so a rank's whole share of one
    microbatch counts 1 whatever the schedule."""
    return [1.0 / program.v] * program.num_stages


def simulate(
    program: Program,
    costs: Costs | None = None,
    *,
    w_keep: float = 0.5,
    act: Sequence[float] | None = None,
) -> Simulation:
    """Time ``program`` (compute-only or lowered) with ``costs``.

    Each rank runs its actions in order; an action starts when the rank is free and its
    inputs are there (``costs.comm`` after their producer ends, when that is another rank).
    Memory: F adds the stage's activations, I frees all but ``w_keep`` of them (what W still
    needs), W frees the rest, B frees all.
    """

    costs = costs or Costs()
    if not 0.0 <= w_keep <= 1.0:
        raise ValueError(f"w_keep is a share of a stage's activations, in [0, 1]; got {w_keep}")
    res = _engine.run(
        program,
        strict=False,
        cost=costs.table(program.num_stages, program.v),
        comm=costs.comm,
        act=list(act) if act is not None else activation_units(program),
        w_keep=w_keep,
    )
    if res["error"]:
        raise engine_error(program, res)
    if not res["finished"]:
        raise describe_stuck(program, res["stuck"], strict=False)
    makespan = max((max(e) if e else 0.0) for e in res["end"])
    busy = res["busy"]
    per_rank = [1.0 - b / makespan if makespan > 0 else 0.0 for b in busy]
    total = 1.0 - sum(busy) / (program.p * makespan) if makespan > 0 else 0.0
    return Simulation(
        program,
        costs,
        res["start"],
        res["end"],
        busy,
        res["peak_mem"],
        makespan,
        per_rank,
        total,
    )
