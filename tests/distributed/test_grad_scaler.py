"""ppfast.GradScaler on gloo ranks: the schedule scales its loss, every rank agrees on found-inf,
so a step with an inf on one rank is skipped on all and the scale falls everywhere.

A stack of Linear + Tanh stages (converted, so that W runs apart) trains for 4 steps under
ZB-H1 (2 ranks), ZB-V (2 ranks, 4 stages) and 1F1B on PP=2 x DP=2 (4 ranks, DataParallelGrads).
At step 1 one gradient of one rank (the last stage's rank of the first replica) is made inf
after the step: its optimizer step must be skipped on every rank and every scale halved.
The reference is the unsplit model on one device with torch.amp.GradScaler and the same
poisoned gradient. The model runs in fp32 and the scale is a power of two, so scaling is
exact: losses, scales and parameters must match to rtol 1e-5. A rank's own torch GradScaler
would have stepped where the poisoned rank skipped, and the parameters would differ.

Real fp16 compute (fp16 autocast on CPU, no inf) is checked apart by the low-precision rule:
the parameters off the fp32 run by at most twice torch's own fp16 training.
"""

from __future__ import annotations

import functools

import pytest
import torch
from ranks import run_once, run_ranks
from torch import nn

import ppfast
import ppfast.parallel

RTOL, ATOL = 1e-5, 1e-6
WIDTH, MB, M, STEPS, LR, POISON_STEP = 8, 2, 4, 4, 0.05, 1
SCALER = {"init_scale": 2.0**12, "growth_interval": 2}  # grows at steps with no inf


def build(n: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(n)]


def batch(step: int, m: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(m * MB, WIDTH, generator=g), torch.randn(m * MB, WIDTH, generator=g)


def poison(module: nn.Module) -> None:
    module[0].weight.grad[0, 0] = float("inf")


def train(rank: int, world: int, schedule: str, dp: int, fp16: bool = False) -> dict:
    mesh = ppfast.parallel.pipeline_mesh(pp=world // dp, dp=dp, device_type="cpu")
    n = 4 if schedule == "zb-v" else 2
    where = ppfast.v_placement(2) if schedule == "zb-v" else ppfast.loop_placement(2, 1)
    mine = [s for s, r in enumerate(where) if r == mesh.pp_rank]
    modules = build(n)
    held = [ppfast.nn.convert(modules[s]) for s in mine]
    stages = [
        ppfast.PipelineStage(held[i], s, n, "cpu", group=mesh.pp_group) for i, s in enumerate(mine)
    ]
    cls = ppfast.get_schedule_class(schedule)
    m = M // dp
    sched = cls(stages if len(stages) > 1 else stages[0], m, nn.MSELoss(), timeout=60)
    reducer = ppfast.parallel.DataParallelGrads(sched, mesh.dp_group) if dp > 1 else None
    params = [q for mod in held for q in mod.parameters()]
    opt = torch.optim.SGD(params, lr=LR)
    scaler = ppfast.GradScaler(sched, dp_group=mesh.dp_group if dp > 1 else None, **SCALER)
    out = {"scales": [], "losses": []}
    for step in range(STEPS):
        x, y = mesh.shard(*batch(step, M))
        opt.zero_grad()
        losses: list = []
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            sched.step(
                *((x,) if 0 in mine else ()), target=y if n - 1 in mine else None, losses=losses
            )
        if reducer is not None:
            reducer.reduce()
        if step == POISON_STEP and mesh.dp_rank == 0 and n - 1 in mine and not fp16:
            poison(held[mine.index(n - 1)])  # one rank of one replica only
        scaler.step(opt)
        scaler.update()
        out["scales"].append(float(scaler.get_scale()))
        out["losses"].append([float(v) for v in losses])
    out["params"] = {
        f"{s}.{k}": v.detach().clone()
        for i, s in enumerate(mine)
        for k, v in held[i].named_parameters()
    }
    out["dp_rank"] = mesh.dp_rank
    return out


@functools.cache
def reference(n: int, fp16: bool = False, scaled: bool = True) -> dict:
    """The unsplit model with torch's GradScaler; ``fp16``: under fp16 autocast, and nothing
    poisoned; ``scaled`` False: no scaler and nothing poisoned (the fp32 run the fp16 one is
    measured against)."""
    modules = build(n)
    model = nn.Sequential(*modules)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", enabled=scaled, **SCALER)
    out = {"scales": [], "losses": []}
    for step in range(STEPS):
        x, y = batch(step, M)
        opt.zero_grad()
        losses = []
        for xb, yb in zip(x.chunk(M), y.chunk(M), strict=True):
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                loss = nn.functional.mse_loss(model(xb), yb)
            scaler.scale(loss / M).backward()
            losses.append(loss.item())
        if step == POISON_STEP and scaled and not fp16:
            poison(modules[-1])
        scaler.step(opt)
        scaler.update()
        out["scales"].append(float(scaler.get_scale()))
        out["losses"].append(losses)
    out["params"] = {
        f"{s}.{k}": v.detach().clone()
        for s, mod in enumerate(modules)
        for k, v in mod.named_parameters()
    }
    return out


@pytest.fixture(scope="module")
def group_run():
    return run_once(
        lambda world, schedule, dp, fp16=False: run_ranks(
            train, world, schedule, dp, fp16, timeout=120
        )
    )


@pytest.mark.parametrize(
    ("world", "schedule", "dp"), [(2, "zb-h1", 1), (2, "zb-v", 1), (4, "1f1b", 2)]
)
def test_an_inf_on_one_rank_skips_the_step_on_every_rank(group_run, world, schedule, dp):
    want = reference(4 if schedule == "zb-v" else 2)
    assert want["scales"][POISON_STEP] < want["scales"][POISON_STEP - 1]  # the scale fell
    per_rank = group_run(world, schedule, dp)
    for rank, got in enumerate(per_rank):
        assert got["scales"] == want["scales"], (rank, got["scales"], want["scales"])
        for name, value in got["params"].items():
            torch.testing.assert_close(
                value,
                want["params"][name],
                rtol=RTOL,
                atol=ATOL,
                msg=lambda e, name=name, rank=rank: f"rank {rank} {name}: {e}",
            )
    # the losses of every microbatch of the global batch, by replica
    losses = [
        sum((r["losses"][k] for r in per_rank if r["dp_rank"] == d), [])
        for k in range(STEPS)
        for d in range(dp)
    ]
    flat = [x for k in range(STEPS) for x in want["losses"][k]]
    torch.testing.assert_close(
        torch.tensor(sum(losses, [])), torch.tensor(flat), rtol=RTOL, atol=ATOL
    )


def test_pipe_scales_its_loss_with_the_scaler():
    modules = [ppfast.nn.convert(mod) for mod in build(2)]
    pipe = ppfast.Pipe(modules, ["cpu"] * 2, chunks=M, schedule="zb-h1", loss_fn=nn.MSELoss())
    opt = torch.optim.SGD([q for mod in modules for q in mod.parameters()], lr=LR)
    scaler = ppfast.GradScaler(pipe, **SCALER)
    want = reference(2)
    for step in range(STEPS):
        x, y = batch(step, M)
        opt.zero_grad()
        pipe.step(x, target=y)
        if step == POISON_STEP:
            poison(modules[-1])
        scaler.step(opt)
        scaler.update()
        assert float(scaler.get_scale()) == want["scales"][step]
    for s, mod in enumerate(modules):
        for k, v in mod.named_parameters():
            torch.testing.assert_close(v, want["params"][f"{s}.{k}"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("schedule", ["zb-h1", "zb-v"])
def test_fp16_autocast_with_the_scaler_matches_one_device_by_the_fp16_rule(group_run, schedule):
    """Real fp16 compute: the pipeline's parameters after the steps are off the fp32 run by
    at most twice what torch's own fp16 + GradScaler training on one device is off by."""
    n = 4 if schedule == "zb-v" else 2
    ref, exact = reference(n, True), reference(n, False, False)
    for got in group_run(2, schedule, 1, True):
        assert got["scales"] == ref["scales"]
        # the pipeline did compute in fp16 (fp16's error, not fp32 rounding)
        err = {k: float((v - exact["params"][k]).abs().max()) for k, v in got["params"].items()}
        ref_err = {k: float((v - exact["params"][k]).abs().max()) for k, v in ref["params"].items()}
        assert max(err.values()) > 0.1 * max(ref_err.values()), (err, ref_err)
        for name, value in got["params"].items():
            ours = (value - exact["params"][name]).abs().max()
            torchs = (ref["params"][name] - exact["params"][name]).abs().max()
            assert torchs > 0, name  # the reference did compute in fp16
            assert ours <= 2 * torchs + 1e-6, (name, float(ours), float(torchs))
