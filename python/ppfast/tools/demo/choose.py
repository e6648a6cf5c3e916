"""Which schedule the demo runs: each candidate simulated at the profiled costs, fastest kept."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...program.ir import Program
from ...program.schedules import generate, lookup, schedule_names
from ...program.simulator import Costs, Simulation, simulate

StageCosts = dict[int, list[tuple[float, float, float]]]


def splits_tie(program: Program) -> bool:
    """The first stage (token embedding) and the last (the head sharing its weight) run on
    different ranks."""
    return program.stage_to_rank[0] != program.stage_to_rank[-1]


@dataclass
class Plan:
    """The schedule to run, its simulation at the profiled costs, and how the others fared."""

    name: str
    program: Program
    costs: Costs
    sim: Simulation
    rows: list[dict] = field(default_factory=list)
    forced: bool = False

    def summary(self) -> dict:
        return {
            "schedule": self.name,
            "chosen_by": "--schedule" if self.forced else "fastest in simulation",
            "num_stages": self.program.num_stages,
            "stage_to_rank": list(self.program.stage_to_rank),
            "simulated_step_s": self.sim.makespan,
            "simulated_bubble": self.sim.bubble,
            "simulated_bubble_per_rank": self.sim.bubble_per_rank,
            "simulated_peak_activations": self.sim.peak_activations,
            "costs_s": {
                "per_stage_FIW": [list(c) for c in self.costs.per_stage],
                "comm": self.costs.comm,
            },
            "candidates": self.rows,
        }

    def reason(self) -> str:
        """One or two sentences: what runs, and why."""
        ms = self.sim.makespan * 1e3
        head = f"{self.name}: simulated step {ms:.0f} ms, bubble {self.sim.bubble:.1%}"
        if self.forced:
            return f"{head} (chosen with --schedule)"
        others = sorted(
            (r for r in self.rows if "step_s" in r and r["name"] != self.name),
            key=lambda r: r["step_s"],
        )
        why = f"{head}, the fastest of {1 + len(others)} schedules simulated at these costs"
        if others:
            nxt = others[0]
            why += f"; next {nxt['name']} {nxt['step_s'] * 1e3:.0f} ms"
            worst = others[-1]
            if worst is not nxt:
                why += f", slowest {worst['name']} {worst['step_s'] * 1e3:.0f} ms"
        return why


def candidate_names(schedule: str | None) -> list[str]:
    return [lookup(schedule).name] if schedule else schedule_names()


def stage_counts(p: int, schedule: str | None) -> list[int]:
    """Stage counts to profile: one stage per rank and two per rank (V and interleaved)."""
    spec = lookup(schedule) if schedule else None
    if spec is None or spec.name == "auto":
        return [p, 2 * p]
    return [spec.default_v * p]


def _program(name: str, p: int, m: int, costs: StageCosts, comm: float) -> Program:
    if name != "auto":
        return generate(name, p, m)
    # auto takes one set of per-pass costs: the whole model's, shared out over the ranks
    n = 2 * p if 2 * p in costs else p
    f, i, w = (sum(c[k] for c in costs[n]) / p for k in range(3))
    return generate("auto", p, m, costs=Costs(f, i, w, comm))


def plan(
    p: int,
    m: int,
    layers: int,
    costs: StageCosts,
    comm: float,
    schedule: str | None = None,
) -> Plan:
    """Simulate each candidate (or only ``schedule``) at the profiled per-stage ``costs`` and
    ``comm``; the fastest wins, ties going to the smaller activation peak, then to the
    fixed schedule over auto."""
    rows: list[dict] = []
    best: tuple[float, float, str, Program, Costs, Simulation] | None = None
    for name in candidate_names(schedule):
        row: dict = {"name": name}
        rows.append(row)
        try:
            program = _program(name, p, m, costs, comm)
        except ValueError as e:
            row["skipped"] = str(e)
            continue
        if name == "auto":
            row["name"] = f"auto ({program.meta.get('chosen', '?')})"
        n = program.num_stages
        if n > layers:
            row["skipped"] = f"needs {n} stages, more than the {layers} blocks (--layers)"
            continue
        if n not in costs:
            row["skipped"] = f"{n} stages were not profiled"
            continue
        stage_costs = Costs(comm=comm, per_stage=tuple(costs[n]))
        sim = simulate(program, stage_costs)
        peak = max(sim.peak_activations)
        row.update({"step_s": sim.makespan, "bubble": sim.bubble, "peak_activations": peak})
        eps = 1e-9 * sim.makespan
        if (
            best is None
            or sim.makespan < best[0] - eps
            or (sim.makespan <= best[0] + eps and peak < best[1] - 1e-9)
        ):
            best = (sim.makespan, peak, row["name"], program, stage_costs, sim)
    if best is None:
        raise ValueError(_nothing_runs(rows, schedule))
    _, _, name, program, stage_costs, sim = best
    return Plan(name, program, stage_costs, sim, rows, forced=schedule is not None)


def _nothing_runs(rows: list[dict], schedule: str | None) -> str:
    if schedule:
        return f"--schedule {schedule} cannot run these settings: {rows[0]['skipped']}"
    why = "; ".join(f"{r['name']}: {r['skipped']}" for r in rows if "skipped" in r)
    return f"no schedule can run these settings: {why}"
