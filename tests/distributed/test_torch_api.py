"""One training script, written for torch.distributed.pipelining, runs on ppfast by its import.

``script`` below is what a torch user writes: stages with ``PipelineStage``, a schedule from
``get_schedule_class(name)(stage(s), n_microbatches=..., loss_fn=...)``, two steps of
``step(x / target=y, losses=...)`` with an optimizer, then ``eval`` for validation. It runs
on 2 gloo ranks (and again on 2 nccl_emu ranks) once with torch.distributed.pipelining and
once with ppfast, for every schedule both have; losses, outputs, gradients and parameters
after the steps, and the eval pass must agree (fp32, rtol 1e-5). Where torch's own eval
fails (torch 2.13, V-placed schedules), only ppfast's runs;
tests/test_pipe.py and test_equivalence.py check every schedule's eval against one device.
"""

from __future__ import annotations

import pytest
import torch
from ranks import run_once, run_ranks
from torch import nn

SCHEDULES = {  # torch's name -> stages per rank
    "GPipe": 1,
    "1F1B": 1,
    "Interleaved1F1B": 2,
    "LoopedBFS": 2,
    "InterleavedZeroBubble": 2,
    "ZBVZeroBubble": 2,
    "DualPipeV": 2,
}
M = 4
V_PLACED = {"ZBVZeroBubble", "DualPipeV"}


def script(runtime: str, rank: int, world: int, name: str) -> dict:
    """The user's code; ``runtime`` only picks the import."""
    if runtime == "torch":
        import torch.distributed.pipelining as pp
        from torch.distributed.pipelining.schedules import get_schedule_class
    else:
        import ppfast as pp
        from ppfast import get_schedule_class

    v = SCHEDULES[name]
    n = world * v
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(n)]
    if name in V_PLACED:
        mine = [rank, 2 * world - 1 - rank]
    else:
        mine = [s for s in range(n) if s % world == rank]
    stages = [pp.PipelineStage(layers[s], s, n, torch.device("cpu")) for s in mine]
    schedule = get_schedule_class(name)(
        stages if v > 1 else stages[0], n_microbatches=M, loss_fn=nn.MSELoss()
    )
    params = [q for s in mine for q in layers[s].parameters()]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    out: dict = {"losses": [], "outputs": [], "grads": []}
    for _ in range(3):  # two steps, then one batch for eval
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
        if len(out["losses"]) == 2:
            break
        opt.zero_grad()
        losses: list = []
        args = (x,) if 0 in mine else ()
        result = schedule.step(*args, target=y if n - 1 in mine else None, losses=losses)
        out["losses"].append([t.item() for t in losses])
        out["outputs"].append(result)
        out["grads"].append([q.grad.clone() for q in params])
        opt.step()
    out["params"] = [q.detach().clone() for q in params]
    # torch added eval in 2.8; under V placement its eval fails (2.13: an assertion on one rank
    # while the other waits, or a receive of a garbage size), so only ppfast's runs there
    if hasattr(schedule, "eval") and (runtime == "ppfast" or name not in V_PLACED):
        losses = []
        args = (x,) if 0 in mine else ()
        result = schedule.eval(*args, target=y if n - 1 in mine else None, losses=losses)
        out["eval"] = ([float(t) for t in losses], result)
    return out


def both(rank: int, world: int) -> dict:
    return {
        (runtime, name): script(runtime, rank, world, name)
        for name in SCHEDULES
        for runtime in ("torch", "ppfast")
    }


_runs = run_once(lambda: run_ranks(both, 2, timeout=240))
# nccl_emu: NCCL's matching without tags, groups completing as one; ppfast over c10d
_nccl_runs = run_once(
    lambda: run_ranks(both, 2, timeout=240, backend="nccl_emu", env={"PPFAST_TRANSPORT": "c10d"})
)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_same_script_same_training(name):
    _check_same(_runs(), name)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_same_script_same_training_on_nccl_emu(name):
    """torch's schedules and ppfast's both run on NCCL's semantics (torch 2.13, p = 2)."""
    _check_same(_nccl_runs(), name)


def _check_same(per_rank: list, name: str) -> None:
    for rank, results in enumerate(per_rank):
        want, got = results[("torch", name)], results[("ppfast", name)]
        for k in ("losses", "outputs", "grads", "params"):
            torch.testing.assert_close(
                got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"rank {rank} {k}"
            )
        assert "eval" in got  # ppfast's eval runs under every schedule
        if "eval" in want:
            torch.testing.assert_close(got["eval"], want["eval"], rtol=1e-5, atol=1e-6)
