"""On a GPU: ppfast.Pipe (ranks as threads on one device, transfers on their own streams)
matches the same model trained on that device, microbatch by microbatch.

The CUDA path orders sends and receives against compute with events and times actions with
events; these tests are what checks it. fp32 with TF32 off, so both sides run the same
kernels: losses and every gradient within rtol 1e-5, parameters after 3 SGD steps too.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import ppfast

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
from toy_models import CHUNKED, batch, build_blocks, make_optimizer, mse_loss  # noqa: E402

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

RTOL, ATOL = 1e-5, 1e-6
STEPS = 3


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def train_one_device(blocks, m: int) -> dict:
    model = torch.nn.Sequential(*blocks).cuda()
    opt = make_optimizer(model.parameters())
    out = {"losses": [], "grads": []}
    for k in range(STEPS):
        (x,), y = batch("transformer", m, k)
        opt.zero_grad()
        losses = []
        for xb, yb in zip(x.cuda().chunk(m), y.cuda().chunk(m), strict=True):
            loss = mse_loss(model(xb), yb)
            (loss / m).backward()
            losses.append(loss.item())
        out["losses"].append(losses)
        out["grads"].append([q.grad.clone() for q in model.parameters()])
        opt.step()
    out["params"] = [q.detach().clone() for q in model.parameters()]
    return out


@pytest.mark.parametrize("convert", [False, True], ids=["nn.Linear", "ppfast.nn.Linear"])
@pytest.mark.parametrize("schedule", ["1f1b", "interleaved-1f1b", "zb-h1", "zb-v", "dualpipev"])
def test_pipe_on_one_gpu_matches_one_device(schedule, convert):
    p, m = 2, 4
    n = 2 * p if schedule in CHUNKED else p
    blocks = build_blocks("transformer", n)
    want = train_one_device(copy.deepcopy(blocks), m)
    stages = [torch.nn.Sequential(b) for b in blocks]
    if convert:
        stages = [ppfast.nn.convert(s) for s in stages]
    pipe = ppfast.Pipe(stages, ["cuda"] * p, chunks=m, schedule=schedule, loss_fn=mse_loss)
    params = [q for s in stages for q in s.parameters()]
    opt = make_optimizer(params)
    for k in range(STEPS):
        (x,), y = batch("transformer", m, k)
        opt.zero_grad()
        losses: list = []
        pipe.step(x.cuda(), target=y.cuda(), losses=losses)
        torch.testing.assert_close(
            [float(v) for v in losses], want["losses"][k], rtol=RTOL, atol=ATOL
        )
        torch.testing.assert_close([q.grad for q in params], want["grads"][k], rtol=RTOL, atol=ATOL)
        opt.step()
    torch.testing.assert_close([q.detach() for q in params], want["params"], rtol=RTOL, atol=ATOL)
    # action times come from CUDA events: every compute action has a start before its end
    for metrics in pipe.last_metrics:
        assert metrics.actions and all(s <= e for _, s, e in metrics.actions)
        assert 0.0 <= metrics.bubble < 1.0


def test_device_metrics_are_read_lazily_and_only_for_recent_steps():
    # The step does not wait for the device at its end: its metrics do, when first read. The
    # executor records into two sets of events, so a step's metrics last until two more steps.
    stages = [torch.nn.Sequential(b) for b in build_blocks("transformer", 2)]
    pipe = ppfast.Pipe(stages, ["cuda"] * 2, chunks=4, schedule="1f1b", loss_fn=mse_loss)
    kept = []
    for k in range(3):
        (x,), y = batch("transformer", 4, k)
        pipe.step(x.cuda(), target=y.cuda())
        kept.append(pipe.last_metrics)
    for metrics in kept[1]:  # one step old: still there
        assert type(metrics).__name__ == "DeferredStepMetrics"
        assert metrics.wall > 0 and all(s <= e for _, s, e in metrics.actions)
    for metrics in kept[0]:  # recorded over by the third step
        with pytest.raises(RuntimeError, match="recorded over by later steps"):
            _ = metrics.wall
