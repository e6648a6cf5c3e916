"""Runtime metrics: one JSON-ready record per rank and step, and profiler ranges per action."""

from __future__ import annotations

import json

import torch
from ranks import run_ranks
from torch import nn

import ppfast


def step_with_profiler(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    stages = [ppfast.nn.convert(nn.Sequential(nn.Linear(8, 8), nn.GELU())) for _ in range(4)]
    mine = [ppfast.PipelineStage(stages[s], s, 4, "cpu") for s in (rank, 3 - rank)]
    sched = ppfast.ScheduleZBVZeroBubble(mine, 4, nn.MSELoss(), timeout=30)
    x, y = torch.randn(8, 8), torch.randn(8, 8)
    run = (lambda: sched.step(x, target=y)) if rank == 0 else sched.step
    run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    names = {e.name for e in prof.events()}
    actions = [text for text, _, _ in sched.last_metrics.actions]
    comm = [str(a) for a in sched.program.ranks[rank] if not a.is_compute]
    return {
        "metrics": sched.last_metrics.as_dict(),
        "names": sorted(n.removeprefix("ppfast:") for n in names if n.startswith("ppfast:")),
        "actions": actions + comm,
    }


def test_metrics_record_and_profiler_ranges():
    out = run_ranks(step_with_profiler, 2, timeout=90.0)
    for rank, res in enumerate(out):
        met = res["metrics"]
        json.dumps(met)  # loggable as it is
        assert met["rank"] == rank and met["step_time"] > 0
        assert 0 < met["busy_time"] <= met["step_time"]
        assert abs(met["bubble"] - (1 - met["busy_time"] / met["step_time"])) < 1e-9
        # ZB-V: rank r holds stages r and 3 - r; their busy times add up to the rank's
        stages = {str(rank), str(3 - rank)}
        assert set(met["busy_per_stage"]) == stages
        assert abs(sum(met["busy_per_stage"].values()) - met["busy_time"]) < 1e-6
        assert met["num_actions"] == len(
            [a for a in res["actions"] if "SEND" not in a and "RECV" not in a]
        )
        assert 0 <= met["p2p_p50"] <= met["p2p_p99"]
        # every compute and communication action is a range, "ppfast:" + its text
        missing = [a for a in res["actions"] if a not in res["names"]]
        assert not missing and f"{rank}F0" in res["names"], missing
