"""After a step fails, the schedule says at once that it cannot step again and what to do,
on every rank, instead of running into the broken transport (a hang or garbage).

Rank 1's stage raises in its forward at the first step; both ranks' steps fail (rank 0 with
PipelineCommError naming rank 1). The second step then raises PipelineCommError on both
ranks before anything is sent, saying the group must be restarted, and it does so well within
the schedule's timeout (it is counted: the step must not reach the transport at all).
"""

from __future__ import annotations

import torch
from ranks import run_ranks
from torch import nn

import ppfast


class Fails(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        raise RuntimeError("this stage's forward failed")


def fail_then_step(rank: int, world: int) -> dict:
    module = nn.Linear(4, 4) if rank == 0 else Fails()
    stage = ppfast.PipelineStage(module, rank, 2, "cpu")
    sched = ppfast.Schedule1F1B(stage, 2, nn.MSELoss(), timeout=30)
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    args = (x,) if rank == 0 else ()
    target = y if rank == 1 else None
    out = {}
    try:
        sched.step(*args, target=target)
    except Exception as e:  # noqa: BLE001
        out["first"] = f"{type(e).__name__}: {e}"
    posted = []
    runner = sched._runner
    real = runner.step
    runner.step = lambda *a, **k: posted.append(1) or real(*a, **k)
    try:
        sched.step(*args, target=target)
    except ppfast.PipelineCommError as e:
        out["second"] = str(e)
    out["reached_the_transport"] = bool(posted)
    return out


def test_a_failed_step_leaves_a_schedule_that_refuses_to_step_again():
    for rank, got in enumerate(run_ranks(fail_then_step, 2, timeout=90)):
        assert "first" in got, (rank, got)
        assert "cannot step again" in got.get("second", ""), (rank, got)
        assert "start it again" in got["second"], (rank, got)
        assert not got["reached_the_transport"], (rank, got)
