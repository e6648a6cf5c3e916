"""bf16 autocast around step() reaches every stage, under every schedule, on 2 and 4 gloo ranks.

The toy transformer (tests/distributed/toy_models.py, 2p blocks, Linear layers converted by
ppfast.nn.convert) takes one step of m = 2p microbatches inside ``torch.autocast("cpu",
dtype=torch.bfloat16)``. The reference is the same model on one device, once under the same
autocast and once in fp32. By flash-attention's rule for low-precision tests, every
gradient's largest error against fp32 must be at most twice the one-device autocast run's
(plus a small floor), and that run must itself differ from fp32 (it did compute in bf16).
The losses are compared the same way. The same for ppfast.Pipe is in tests/test_clip.py.
"""

from __future__ import annotations

import functools

import pytest
import torch
import toy_models as tm
from ranks import run_once, run_ranks

import ppfast

MODEL = "transformer"
FLOOR = 1e-6


def train_all(rank: int, p: int, todo: list[str]) -> dict:
    out = {}
    for schedule in todo:
        n = tm.num_stages_of(schedule, p)
        chains = tm.split_stages(tm.build_blocks(MODEL, 2 * p), n)
        mine = [s for s, r in enumerate(tm.placement(schedule, p)) if r == rank]
        stages = [ppfast.PipelineStage(ppfast.nn.convert(chains[s]), s, n, "cpu") for s in mine]
        sched = tm.SCHEDULE_CLASSES[schedule](
            stages[0] if len(stages) == 1 else stages, 2 * p, tm.loss_fn_of(MODEL), timeout=60
        )
        inputs, target = tm.batch(MODEL, 2 * p, 0)
        losses: list = []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sched.step(
                *(inputs if 0 in mine else ()),
                target=target if n - 1 in mine else None,
                losses=losses,
            )
        out[schedule] = {
            "losses": [float(x) for x in losses],
            "grads": tm.stage_state({s: chains[s] for s in mine}, "grad"),
        }
    return out


@functools.cache
def reference(p: int, schedule: str, autocast: bool) -> dict:
    n = tm.num_stages_of(schedule, p)
    chains = tm.split_stages(tm.build_blocks(MODEL, 2 * p), n)
    model = torch.nn.Sequential(*chains)
    inputs, target = tm.batch(MODEL, 2 * p, 0)
    losses = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for x, y in zip(inputs[0].chunk(2 * p), target.chunk(2 * p), strict=True):
            loss = tm.loss_fn_of(MODEL)(model(x), y)
            (loss / (2 * p)).backward()
            losses.append(loss.item())
    return {"losses": losses, "grads": tm.stage_state(dict(enumerate(chains)), "grad")}


@pytest.fixture(scope="module")
def group_run():
    return run_once(lambda p: run_ranks(train_all, p, list(tm.SCHEDULE_CLASSES), timeout=240))


def _within_rule(got: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    ours = (got.float() - exact).abs().max()
    torchs = (ref.float() - exact).abs().max()
    assert ours <= 2 * torchs + FLOOR, (
        f"{what}: error {float(ours):.3g} vs torch's {float(torchs):.3g}"
    )


@pytest.mark.parametrize("schedule", list(tm.SCHEDULE_CLASSES))
@pytest.mark.parametrize("p", [2, 4])
def test_bf16_autocast_matches_one_device_by_the_bf16_rule(group_run, p, schedule):
    per_rank = group_run(p)
    ref, exact = reference(p, schedule, True), reference(p, schedule, False)
    losses = next(r[schedule]["losses"] for r in per_rank if r[schedule]["losses"])
    _within_rule(
        torch.tensor(losses), torch.tensor(ref["losses"]), torch.tensor(exact["losses"]), "losses"
    )
    ours_max = torchs_max = 0.0
    for r in per_rank:
        for s, grads in r[schedule]["grads"].items():
            for name, g in grads.items():
                want, fp32 = ref["grads"][s][name], exact["grads"][s][name]
                torchs_max = max(torchs_max, float((want - fp32).abs().max()))
                ours_max = max(ours_max, float((g.float() - fp32).abs().max()))
                _within_rule(g, want, fp32, f"stage {s} {name}")
    assert torchs_max > 0, "the one-device autocast run computed nothing in bf16"
    # bf16's error, not fp32 rounding: autocast reached the pipeline's stages
    assert ours_max > 0.1 * torchs_max, (ours_max, torchs_max)
