"""What ppfast.split(..., "profile") measures on this machine, and whether its cut pays off.

tests/test_partition.py checks the profiled cut with a clock that counts work, so its numbers
are exact; this measures the seconds. The model is the test's: four blocks that apply a
Linear(128) ten times, then twelve that apply it once, cut into 4 stages. Each round, in turn:

    profile   split(..., "profile") with the real clock: the heavy blocks' measured cost
              over the light ones' (10 times the Linear work, less with the fixed cost of
              each call, which every block pays alike; about 5 here), the cut it chose, and
              the 1F1B step (p=4, m=8) simulated from those costs for its cut and for the
              uniform one (4, 4, 4, 4)
    stages    F + B of every stage of each cut, run directly, alternating between the cuts:
              the heaviest stage bounds a pipeline's step, so its time is what the cut buys

One torch thread. Prints medians and ratios and writes bench/results/split_profile.json.

    python bench/bench_split_profile.py [--rounds 5] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ppfast
from ppfast.tools.benchmarks.machine import describe

WIDTH, BATCH = 128, 64


class Repeat(nn.Module):
    def __init__(self, reps: int):
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.reps = reps

    def forward(self, x):
        for _ in range(self.reps):
            x = torch.tanh(self.fc(x))
        return x


def stage_seconds(stage: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward and backward of ``stage`` on ``x``."""
    times = []
    for _ in range(repeats):
        inp = x.detach().requires_grad_()
        t0 = time.perf_counter()
        stage(inp).sum().backward()
        times.append(time.perf_counter() - t0)
    stage.zero_grad(set_to_none=True)
    return statistics.median(times)


def heaviest(split: ppfast.Split, x: torch.Tensor, repeats: int) -> float:
    out = []
    with torch.no_grad():
        inputs = [x]
        for st in split.stages[:-1]:
            inputs.append(st(inputs[-1]))
    for st, inp in zip(split.stages, inputs, strict=True):
        out.append(stage_seconds(st, inp, repeats))
    return max(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20, help="runs per stage per round")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "split_profile.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = [Repeat(10) for _ in range(4)] + [Repeat(1) for _ in range(12)]
    x, y = torch.randn(BATCH, WIDTH), torch.randn(BATCH, WIDTH)
    program = ppfast.generate("1f1b", 4, 8)

    rounds = []
    for _ in range(args.rounds):
        prof = ppfast.split(layers, 4, "profile", sample=x, target=y, loss_fn=F.mse_loss)
        uni = prof.with_counts(ppfast.split(layers, 4).counts)
        heavy = statistics.mean(prof.layer_costs[:4])
        light = statistics.mean(prof.layer_costs[4:])
        sim_prof = ppfast.simulate(program, prof.costs()).makespan
        sim_uni = ppfast.simulate(program, uni.costs()).makespan
        # alternate which cut runs first, so a drift in the machine's speed hits both alike
        order = [("profile", prof), ("uniform", uni)]
        if len(rounds) % 2:
            order.reverse()
        ran = {name: heaviest(s, x, args.repeats) for name, s in order}
        rounds.append({
            "counts": list(prof.counts),
            "heavy_over_light": heavy / light,
            "simulated_profile_s": sim_prof,
            "simulated_uniform_s": sim_uni,
            "heaviest_stage_profile_s": ran["profile"],
            "heaviest_stage_uniform_s": ran["uniform"],
        })  # fmt: skip

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    cuts = sorted({tuple(r["counts"]) for r in rounds})
    summary = {
        "heavy_over_light": med("heavy_over_light"),
        "simulated_ratio": statistics.median(
            r["simulated_profile_s"] / r["simulated_uniform_s"] for r in rounds
        ),
        "heaviest_stage_ratio": statistics.median(
            r["heaviest_stage_profile_s"] / r["heaviest_stage_uniform_s"] for r in rounds
        ),
        "cuts": [list(c) for c in cuts],
    }
    print(f"{args.rounds} rounds, medians (one torch thread)")
    print(f"  heavy block / light block, as profiled: {summary['heavy_over_light']:.2f}")
    print(f"  cuts chosen: {', '.join(str(c) for c in cuts)}  (uniform: (4, 4, 4, 4))")
    print(f"  simulated 1F1B step, p=4 m=8: profile {med('simulated_profile_s') * 1e3:.2f} ms, "
          f"uniform {med('simulated_uniform_s') * 1e3:.2f} ms, "
          f"ratio {summary['simulated_ratio']:.2f}")  # fmt: skip
    print(f"  heaviest stage, F + B run directly: profile "
          f"{med('heaviest_stage_profile_s') * 1e3:.2f} ms, uniform "
          f"{med('heaviest_stage_uniform_s') * 1e3:.2f} ms, "
          f"ratio {summary['heaviest_stage_ratio']:.2f}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"machine": describe(), "rounds": rounds, "summary": summary}
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
