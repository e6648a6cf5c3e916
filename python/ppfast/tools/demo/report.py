"""What the demo prints and writes: progress per step, the summary, pictures, trace and metrics."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import TextIO

from ...program.draw import draw_png, spans_from, stage_chunks
from ...program.ir import Kind, Program, parse_action
from ...program.simulator import Costs, simulate
from ...runtime.metrics import write_timeline
from ..benchmarks.machine import describe
from .choose import Plan
from .options import DemoConfig

# fp32 on both sides, same microbatches: only the order of floating-point sums differs
RTOL, ATOL = 1e-5, 1e-6
# per-step raw data that the summary, the trace and the pictures already give
_NOT_IN_JSON = ("p2p_s", "stage_kind_s", "timeline")


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def _pct(x: float) -> str:
    return f"{x:.1%}" if x == x else "n/a"


def stage_kind_times(actions: list[tuple[str, float, float]]) -> dict[str, float]:
    """Median duration of each (stage, kind) among one rank's plain compute actions, keyed
    "stage:kind" (JSON-friendly); compound actions (overlapped F and B) are left out."""
    by: dict[str, list[float]] = {}
    for name, start, end in actions:
        a = parse_action(name)
        if a.sub is None and a.kind in (Kind.F, Kind.I, Kind.W, Kind.B):
            by.setdefault(f"{a.stage}:{a.kind.value}", []).append(end - start)
    return {k: statistics.median(v) for k, v in by.items()}


def costs_from_run(times: dict[str, float], plan: Plan) -> Costs:
    """Per-stage (F, I, W) as the run measured them (a full backward B counts as I, with no
    W); what the run did not time plainly keeps its profiled cost."""
    out = []
    for s, (f, i, w) in enumerate(plan.costs.per_stage):
        if f"{s}:B" in times:
            i, w = times[f"{s}:B"], 0.0
        out.append((times.get(f"{s}:F", f), times.get(f"{s}:I", i), times.get(f"{s}:W", w)))
    return Costs(comm=plan.costs.comm, per_stage=tuple(out))


class Reporter:
    """Prints as the run goes and, at the end, the summary; writes the output folder."""

    def __init__(self, cfg: DemoConfig, launch: dict, stream: TextIO | None = None):
        self.cfg = cfg
        self.launch = launch
        self.stream = stream or sys.stdout
        self.steps: list[dict] = []
        self.baseline: dict | None = None
        self.plan: Plan | None = None
        self.profile: dict = {}
        self.entropy = math.nan
        self.out = Path(cfg.out)

    def say(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)

    # ------------------------------------------------------------------ as it goes

    def intro(self, entropy: float) -> None:
        cfg, size = self.cfg, self.cfg.size
        self.entropy = entropy
        self.say(f"ppfast demo on {describe()}")
        self.say(f"  ranks: {self.launch['text']}")
        self.say(
            f"  model: GPT, {size.layers} blocks x {size.width} wide, {size.heads} heads, "
            f"vocab {size.vocab}, {size.params() / 1e6:.2f} M parameters (head tied to the "
            "token embedding)"
        )
        self.say(
            f"  data: order-2 Markov chain, seed {cfg.seed}; {cfg.batch} sequences x {cfg.seq} "
            f"tokens per step in {cfg.microbatches} microbatches; loss floor ~{entropy:.2f}"
        )

    def one_device(self, result: dict) -> None:
        self.baseline = result
        t = _median(result["step_times"][1:] or result["step_times"])
        self.say(
            f"one device: {len(result['step_times'])} steps of the unsplit model, "
            f"{t * 1e3:.0f} ms per step, {self.cfg.tokens_per_step / t:,.0f} tokens/s (timed "
            "again between pipelined steps)"
        )

    def planned(self, plan: Plan, costs: dict, comm: float) -> None:
        self.plan = plan
        self.profile = {"stage_costs_s": {str(n): c for n, c in costs.items()}, "comm_s": comm}
        n = plan.program.num_stages
        fiw = " | ".join("/".join(f"{x * 1e3:.1f}" for x in c) for c in plan.costs.per_stage)
        self.say(
            f"profiled F/I/W per microbatch, ms, {n} stages: {fiw}; transfer {comm * 1e3:.2f} ms"
        )
        self.say(f"schedule {plan.reason()}")
        ranks = sorted({plan.program.stage_to_rank[0], plan.program.stage_to_rank[-1]})
        if len(ranks) > 1:
            self.say(
                f"  the tied embedding and head live on ranks {ranks[0]} and {ranks[1]}: "
                "PipelineStage(tied=...) sums their gradients after every step"
            )
        else:
            self.say(f"  the tied embedding and head share one parameter on rank {ranks[0]}")
        skipped = [r for r in plan.rows if "skipped" in r]
        for r in skipped:
            self.say(f"  not run: {r['name']} {r['skipped']}")

    def step(self, k: int, records: list[dict]) -> None:
        """Records of one step, one per rank: time, wall, busy, bubble, losses (last stage)."""
        records = sorted(records, key=lambda r: r["rank"])
        losses = [x for r in records for x in r["losses"]]
        t = max(r["time"] for r in records)
        row = {
            "step": k,
            "loss": statistics.fmean(losses) if losses else math.nan,
            "losses": losses,
            "step_time_s": t,
            "tokens_per_s": self.cfg.tokens_per_step / t,
            "bubble": statistics.fmean(r["bubble"] for r in records),
            "bubble_per_rank": [r["bubble"] for r in records],
            "busy_s_per_rank": [r["busy"] for r in records],
            "wall_s_per_rank": [r["wall"] for r in records],
            "p2p_s": [x for r in records for x in r["p2p"]],
            "stage_kind_s": {k2: v for r in records for k2, v in r["stage_kind_s"].items()},
            "timeline": [x for r in records for x in r["timeline"]],
        }
        self.steps.append(row)
        text = (
            f"step {k + 1:3d}/{self.cfg.steps}  loss {row['loss']:.4f}  "
            f"{row['tokens_per_s']:8,.0f} tokens/s  bubble {_pct(row['bubble']):>5s}"
        )
        ref = self._reference(k)
        if ref is not None:
            ok, rel = _close(losses, ref)
            text += f"  one device {statistics.fmean(ref):.4f} " + (
                "(equal)" if ok else f"(DIFFERS: {rel:.1e} relative)"
            )
        self.say(text)

    def _reference(self, k: int) -> list[float] | None:
        if self.baseline is None or k >= len(self.baseline["losses"]):
            return None
        return self.baseline["losses"][k]

    # ------------------------------------------------------------------ at the end

    def finish(self, program: Program) -> dict:
        """Print the summary and write the output folder; returns the metrics written.
        ``program`` is the lowered program the ranks ran (for the drawing's placement)."""
        metrics = self.metrics()
        self.out.mkdir(parents=True, exist_ok=True)
        files = self.write_pictures(program, metrics)
        metrics["files"] = files
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        self.summary(metrics)
        written = ", ".join(str(self.out / f) for f in [*files.values(), "metrics.json"])
        self.say(
            f"wrote {written} (timeline.png draws step {metrics['summary']['drawn_step'] + 1}, "
            "the one with the median bubble)"
        )
        return metrics

    def _steady(self) -> list[dict]:
        # the first steps agree shapes, fill allocators and warm caches
        warm = 2 if len(self.steps) > 4 else (1 if len(self.steps) > 1 else 0)
        return self.steps[warm:]

    def metrics(self) -> dict:
        cfg, plan = self.cfg, self.plan
        steady = self._steady()
        p = len(steady[0]["bubble_per_rank"]) if steady else cfg.ranks
        run_times = {}
        for key in {k for s in steady for k in s["stage_kind_s"]}:
            run_times[key] = _median(
                [s["stage_kind_s"][key] for s in steady if key in s["stage_kind_s"]]
            )
        at_run = simulate(plan.program, costs_from_run(run_times, plan))
        p2p = sorted(x for s in steady for x in s["p2p_s"])
        tok = _median([s["tokens_per_s"] for s in steady])
        summary = {
            "tokens_per_s": tok,
            "step_time_s": _median([s["step_time_s"] for s in steady]),
            "steps_in_medians": len(steady),
            "bubble_measured": _median([s["bubble"] for s in steady]),
            "bubble_measured_per_rank": [
                _median([s["bubble_per_rank"][r] for s in steady]) for r in range(p)
            ],
            "busy_s_per_rank": [
                _median([s["busy_s_per_rank"][r] for s in steady]) for r in range(p)
            ],
            "wall_s_per_rank": [
                _median([s["wall_s_per_rank"][r] for s in steady]) for r in range(p)
            ],
            "bubble_simulated": plan.sim.bubble,
            "bubble_simulated_per_rank": plan.sim.bubble_per_rank,
            "simulated_step_s": plan.sim.makespan,
            "bubble_simulated_at_run_costs": at_run.bubble,
            "run_stage_kind_s": run_times,
            "p2p_p50_s": _median(p2p),
            "p2p_p99_s": p2p[min(len(p2p) - 1, round(0.99 * (len(p2p) - 1)))] if p2p else math.nan,
            "loss_first": self.steps[0]["loss"] if self.steps else math.nan,
            "loss_last": self.steps[-1]["loss"] if self.steps else math.nan,
            "loss_floor": self.entropy,
        }
        out = {
            "config": cfg.as_dict(),
            "launch": {k: v for k, v in self.launch.items() if k != "text"},
            "machine": describe(),
            "model": {"params": cfg.size.params()},
            "schedule": plan.summary(),
            "profile": self.profile,
            "steps": [{k: v for k, v in s.items() if k not in _NOT_IN_JSON} for s in self.steps],
            "summary": summary,
        }
        if self.baseline is not None:
            times = self.baseline["step_times"]
            t1 = _median(times[1:] or times)
            one = cfg.tokens_per_step / t1
            out["one_device"] = {
                "steps_timed": len(times),
                "step_time_s": t1,
                "tokens_per_s": one,
                "losses": self.baseline["losses"],
                "speedup": tok / one,
                "efficiency": tok / one / p,
            }
            out["loss_check"] = self.loss_check()
        return out

    def loss_check(self) -> dict:
        k = min(len(self.baseline["losses"]), len(self.steps))
        got = [x for s in self.steps[:k] for x in s["losses"]]
        want = [x for ref in self.baseline["losses"][:k] for x in ref]
        ok, rel = _close(got, want)
        diff = max((abs(a - b) for a, b in zip(got, want, strict=False)), default=math.nan)
        return {
            "steps": k,
            "microbatch_losses": len(want),
            "rtol": RTOL,
            "atol": ATOL,
            "max_abs_diff": diff,
            "max_rel_diff": rel,
            "passed": ok,
        }

    def typical_step(self) -> dict:
        """The steady step whose bubble is the median one: what a step usually looked like."""
        steady = sorted(self._steady() or self.steps, key=lambda s: s["bubble"])
        return steady[(len(steady) - 1) // 2]

    def write_pictures(self, program: Program, metrics: dict) -> dict:
        step = self.typical_step()
        metrics["summary"]["drawn_step"] = step["step"]
        name = self.plan.name
        shape = f"{program.p} ranks, m={program.num_microbatches}"
        measured = (
            f"measured: {name}, {shape}, step {step['step'] + 1} (median bubble), "
            f"{max(step['wall_s_per_rank']) * 1e3:.0f} ms, bubble {_pct(step['bubble'])}"
        )
        write_timeline(
            step["timeline"], program, self.out / "timeline.png", self.out / "trace.json", measured
        )
        sim = self.plan.sim
        spans = spans_from((r, a, st * 1e3, en * 1e3) for r, a, st, en in sim.timeline())
        draw_png(
            spans,
            self.out / "timeline_simulated.png",
            num_ranks=program.p,
            stage_chunk=stage_chunks(program.stage_to_rank),
            title=f"simulated at the profiled costs: {name}, {shape}, step "
            f"{sim.makespan * 1e3:.0f} ms, bubble {_pct(sim.bubble)}",
            unit="ms",
        )
        return {
            "timeline": "timeline.png",
            "timeline_simulated": "timeline_simulated.png",
            "trace": "trace.json",
        }

    def summary(self, metrics: dict) -> None:
        s = metrics["summary"]
        p = len(s["bubble_measured_per_rank"])
        self.say()
        self.say("summary")
        self.say(
            f"  loss        {s['loss_first']:.3f} -> {s['loss_last']:.3f} in {len(self.steps)} "
            f"steps (the chain's floor is ~{s['loss_floor']:.2f})"
        )
        one = metrics.get("one_device")
        thr = f"  throughput  {s['tokens_per_s']:,.0f} tokens/s on {p} ranks"
        if one:
            thr += (
                f", one device {one['tokens_per_s']:,.0f} tokens/s (median of "
                f"{one['steps_timed'] - 1} steps): {one['speedup']:.2f}x ({one['efficiency']:.0%} "
                f"of {p}x)"
            )
        self.say(thr)
        per_rank = ", ".join(
            f"rank {r} {_pct(b)}" for r, b in enumerate(s["bubble_measured_per_rank"])
        )
        gap = (s["bubble_measured"] - s["bubble_simulated"]) * 100
        self.say(
            f"  bubble      measured {_pct(s['bubble_measured'])} ({per_rank}); simulated "
            f"{_pct(s['bubble_simulated'])} at the profiled costs ({gap:+.1f} points), "
            f"{_pct(s['bubble_simulated_at_run_costs'])} at the run's own action times"
        )
        self.say(
            f"  step        measured {max(s['wall_s_per_rank']) * 1e3:.0f} ms in the executor "
            f"({s['step_time_s'] * 1e3:.0f} ms with the optimizer), simulated "
            f"{s['simulated_step_s'] * 1e3:.0f} ms"
        )
        self.say(
            f"  p2p         posted to completed: p50 {s['p2p_p50_s'] * 1e3:.1f} ms, p99 "
            f"{s['p2p_p99_s'] * 1e3:.1f} ms (a receive posted before its data is sent counts "
            "the wait for it)"
        )
        check = metrics.get("loss_check")
        if check:
            verdict = "equal" if check["passed"] else "NOT equal"
            self.say(
                f"  check       losses of the first {check['steps']} steps "
                f"({check['microbatch_losses']} microbatches) {verdict} to one device's: max "
                f"relative difference {check['max_rel_diff']:.1e} (tolerance rtol {RTOL:g}, "
                f"atol {ATOL:g})"
            )


def _close(got: list[float], want: list[float]) -> tuple[bool, float]:
    """All within atol + rtol * |want| (torch.testing's rule), and the largest relative
    difference."""
    if len(got) != len(want) or not want:
        return False, math.inf
    ok = all(abs(a - b) <= ATOL + RTOL * abs(b) for a, b in zip(got, want, strict=True))
    rel = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(got, want, strict=True))
    return ok, rel
