"""ppfast.clip_grad_norm_ under ppfast.Pipe (ranks as threads): every order of norm, the tied
weights counted once, non-finite gradients, and the calls it refuses.

The model is tests/distributed/test_split_backward.py's (an embedding tied to the head and a
projection tied to another, converted layers); the reference is the one-device model, whose
ties are one Parameter, clipped by torch.nn.utils.clip_grad_norm_. The distributed cases
(2 and 4 gloo ranks, nccl_emu, PP x DP with DDP, ZeRO-1 and FSDP shards) are in
test_split_backward.py and test_pp_dp.py.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ppfast

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import test_split_backward as tsb  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def pipe_and_reference(schedule: str, p: int, m: int):
    n = 2 * p if schedule in tsb.CHUNKED else p
    stages = [ppfast.nn.convert(s) for s in tsb.build(n)]
    tsb.untie(stages)
    tied = [(f"0.{a}", f"{n - 1}.{b}") for a, b in tsb.TIES.values()]
    pipe = ppfast.Pipe(stages, ["cpu"] * p, chunks=m, schedule=schedule, loss_fn=tsb.loss_fn,
                       tied=tied)  # fmt: skip
    ids, target = tsb.batch(m, 0)
    pipe.step(ids, target=target)
    model = nn.Sequential(*tsb.build(n))
    for x, y in zip(ids.chunk(m), target.chunk(m), strict=True):
        (tsb.loss_fn(model(x), y) / m).backward()
    return pipe, stages, model


def grads(modules) -> dict:
    return {f"{i}.{k}": p.grad.clone() for i, mod in enumerate(modules)
            for k, p in mod.named_parameters()}  # fmt: skip


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, math.inf, -math.inf])
@pytest.mark.parametrize(("schedule", "p"), [("zb-h1", 2), ("zb-v", 2), ("1f1b", 4)])
def test_pipe_clips_like_torch_on_one_device(schedule, p, norm_type):
    pipe, stages, model = pipe_and_reference(schedule, p, 2 * p)
    want_norm = float(torch.linalg.vector_norm(torch.cat(
        [q.grad.flatten() for q in model.parameters()]), norm_type))  # fmt: skip
    max_norm = want_norm / 3  # so that it clips
    want = nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type)
    got = ppfast.clip_grad_norm_(pipe, max_norm, norm_type)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got_grads, want_grads = grads(stages), grads(model)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_a_norm_below_the_limit_leaves_the_gradients_as_they_are():
    pipe, stages, _ = pipe_and_reference("zb-h1", 2, 4)
    before = grads(stages)
    norm = ppfast.clip_grad_norm_(pipe, 1e6)
    assert 0 < float(norm) < 1e6
    for name, g in grads(stages).items():
        torch.testing.assert_close(g, before[name], rtol=0, atol=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_gradient_gives_a_non_finite_norm_on_every_rank(bad):
    pipe, stages, _ = pipe_and_reference("zb-h1", 2, 4)
    # on the last rank only, in a weight of its own (its tied copies do not count)
    own = [
        q for k, q in stages[1].named_parameters() if k not in ("head.weight", "proj_out.weight")
    ]
    own[0].grad.view(-1)[0] = bad
    norm = ppfast.clip_grad_norm_(pipe, 1.0)
    assert not math.isfinite(float(norm))
    # as torch does: scaled anyway, by 0 for an infinite norm (NaN for a NaN one), on every rank
    first = stages[0].embed.weight.grad
    assert first.isnan().all() if math.isnan(bad) else (first == 0).all()
    with pytest.raises(RuntimeError, match="non-finite.*error_if_nonfinite=False"):
        ppfast.clip_grad_norm_(pipe, 1.0, error_if_nonfinite=True)


def test_refusals_say_what_to_change():
    stages = [ppfast.nn.convert(s) for s in tsb.build(2)]
    tsb.untie(stages)
    pipe = ppfast.Pipe(stages, ["cpu"] * 2, chunks=2, schedule="1f1b", loss_fn=tsb.loss_fn)
    with pytest.raises(ValueError, match="after a step"):
        ppfast.clip_grad_norm_(pipe, 1.0)
    pipe.step(tsb.batch(2, 0)[0], target=tsb.batch(2, 0)[1])
    with pytest.raises(ValueError, match="norm_type"):
        ppfast.clip_grad_norm_(pipe, 1.0, norm_type=0)
    with pytest.raises(ValueError, match="pass the ppfast.Pipe"):
        ppfast.clip_grad_norm_(pipe.schedules[0], 1.0)  # one thread's share only
    with pytest.raises(ValueError, match="drop dp_group"):
        ppfast.clip_grad_norm_(pipe, 1.0, dp_group=object())
    with pytest.raises(TypeError, match="PipelineSchedule, a ppfast.Pipe"):
        ppfast.clip_grad_norm_([nn.Linear(2, 2)], 1.0)


# ---------------------------------------------------------------------------- autocast


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


SCHEDULES = ["gpipe", "1f1b", "interleaved-1f1b", "looped-bfs", "interleaved-zb", "zb-h1",
             "zb-h2", "zb-v", "dualpipev"]  # fmt: skip
CHUNKED = {"interleaved-1f1b", "looped-bfs", "interleaved-zb", "zb-v", "dualpipev"}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pipe_ranks_compute_under_the_callers_autocast(schedule):
    """Autocast is per thread: the ranks' threads take the caller's, so bf16 stays bf16.
    Compared with one-device autocast training by flash-attention's rule: the pipeline's
    error against fp32 is at most twice torch's own bf16 error against fp32."""
    x, y = torch.randn(8, 16), torch.randn(8, 16)

    def loss_fn(out, target):
        return nn.functional.mse_loss(out.float(), target)

    n = 4 if schedule in CHUNKED else 2

    def one_device(autocast: bool):
        stages = [Net() for _ in range(n)]
        model = nn.Sequential(*stages)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for xs, ys in zip(x.chunk(4), y.chunk(4), strict=True):
                (loss_fn(model(xs), ys) / 4).backward()
        return grads(stages)

    stages = [ppfast.nn.convert(Net()) for _ in range(n)]
    pipe = ppfast.Pipe(stages, ["cpu"] * 2, chunks=4, schedule=schedule, loss_fn=loss_fn)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pipe.step(x, target=y)
    assert out.dtype == torch.bfloat16  # computed under autocast on the last rank's thread
    got, ref, exact = grads(stages), one_device(True), one_device(False)
    for name, g in exact.items():
        pipe_err = (got[name] - g).abs().max()
        torch_err = (ref[name] - g).abs().max()
        assert torch_err > 0, name  # the reference did compute in bf16
        assert pipe_err <= 2 * torch_err + 1e-6, (name, float(pipe_err), float(torch_err))
