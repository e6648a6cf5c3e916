"""Runtime metrics: one JSON-ready record per rank and step, and profiler ranges per action."""

from __future__ import annotations

import dataclasses
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


def test_device_metrics_wait_for_the_device_only_when_read():
    # On a device the runner returns before the step has finished there; the figures are read
    # (and the device waited for) once, at the first access, and then behave like any others.
    loads = []
    eager = ppfast.StepMetrics(1, 0.5, 0.4, 0.2, [("0F0", 0.0, 0.4)], [0.001])

    def load():
        loads.append(1)
        return eager

    from ppfast.runtime.metrics import DeferredStepMetrics

    deferred = DeferredStepMetrics(1, load)
    assert deferred.rank == 1 and loads == []
    assert deferred.wall == 0.5 and loads == [1]
    assert deferred.actions == eager.actions and deferred.as_dict() == eager.as_dict()
    assert dataclasses.astuple(deferred) == dataclasses.astuple(eager) and loads == [1]


def test_a_host_step_says_its_index_and_that_its_times_are_final():
    chains = [nn.Linear(4, 4), nn.Linear(4, 4)]
    pipe = ppfast.Pipe(chains, ["cpu"] * 2, chunks=2, schedule="1f1b", loss_fn=nn.MSELoss())
    for k in range(2):
        pipe.step(torch.randn(4, 4), target=torch.randn(4, 4))
        for sched in pipe.schedules:
            res = sched._runner.last
            assert res["index"] == k and res["on_device"] is False
            assert type(sched.last_metrics) is ppfast.StepMetrics
