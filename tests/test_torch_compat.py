"""What torch.distributed.pipelining code calls works the same on ppfast.

In one process (ranks as threads, ppfast.Pipe): chunk specs and nested arguments,
``return_outputs``, ``loss_kwargs``, merged tuple outputs, ``eval`` leaving the model alone,
``step`` refused under no_grad, the stage's ``input_args``/``output_args`` hints, torch's
``dw_builder`` hook for layers that defer their own weight gradients, ``get_schedule_class``
and forward-only programs. Every result is compared with the same model on one device.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.distributed.pipelining.microbatch import TensorChunkSpec, _Replicate

import ppfast
from ppfast.training.microbatch import split_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def mse(out, target):
    return ((out - target) ** 2).mean()


def blocks(n: int = 4, dim: int = 8, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(n)]


# ---------------------------------------------------------------------------- splitting


def test_split_follows_torch_specs():
    x, y = torch.arange(24.0).view(4, 6), torch.arange(8.0).view(4, 2)
    args, kwargs = split_batch(((x, [y]),), {"k": 3, "z": y}, 2)
    assert torch.equal(args[1][0][0], x[2:]) and torch.equal(args[1][0][1][0], y[2:])
    assert kwargs[0]["k"] == 3 and torch.equal(kwargs[1]["z"], y[2:])
    args, kwargs = split_batch(
        (x, y), {"z": y}, 3, (TensorChunkSpec(1), _Replicate()), {"z": _Replicate()}
    )
    assert [a[0].shape for a in args] == [(4, 2)] * 3
    assert all(a[1] is y and k["z"] is y for a, k in zip(args, kwargs, strict=True))


@pytest.mark.parametrize(
    "args, kwargs, spec, match",
    [
        ((torch.zeros(6, 2),), {}, None, r"batch of 6 along dim 0 does not split into 4 equal"),
        ((torch.zeros(3, 2),), {}, None, r"batch of 3 .* into 4 .*divisible"),
        ((torch.tensor(1.0),), {}, None, r"scalar tensor cannot be split"),
        ((torch.zeros(8, 2),), {}, (None, None), r"args_chunk_spec has 2 entries for 1"),
        ((), {"x": torch.zeros(8)}, {"y": None}, r"kwargs_chunk_spec names \['y'\]"),
    ],
)
def test_split_refuses_what_would_fail_later(args, kwargs, spec, match):
    specs = (spec, None) if args else (None, spec)
    with pytest.raises(ValueError, match=match):
        split_batch(args, kwargs, 4, *specs)


def test_uneven_microbatches_with_dynamic_shapes():
    args, _ = split_batch((torch.zeros(10, 2),), {}, 4, equal=False)
    assert [a[0].shape[0] for a in args] == [3, 3, 2, 2]


def test_pipe_splits_along_another_dim():
    """args_chunk_spec: the batch is dim 1 (sequence-first layout); a scale is replicated."""

    class First(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x, scale):
            return self.lin(x.transpose(0, 1)) * scale

    mods = blocks(2)
    ref = copy.deepcopy(mods)
    pipe = ppfast.Pipe(
        [First(mods[0]), mods[1]], chunks=2, schedule="1f1b", loss_fn=mse,
        args_chunk_spec=(TensorChunkSpec(1), _Replicate()),
    )  # fmt: skip
    x, y = torch.randn(3, 4, 8), torch.randn(4, 3, 8)
    out = pipe.step(x, 2.0, target=y)
    want = ref[1](ref[0](x.transpose(0, 1)) * 2.0)
    torch.testing.assert_close(out, want)


# ---------------------------------------------------------------------------- step and eval


def test_return_outputs_false_keeps_nothing():
    pipe = ppfast.Pipe(blocks(), chunks=4, schedule="1f1b", loss_fn=mse)
    x, y = torch.randn(8, 8), torch.randn(8, 8)
    assert pipe.step(x, target=y, return_outputs=False) is None
    assert all(not st.output_chunks for s in pipe.schedules for st in s.stages)
    assert pipe.step(x, target=y).shape == (8, 8)


def test_loss_kwargs_reach_every_loss():
    seen = []

    def loss(out, target, weight=1.0):
        seen.append(weight)
        return weight * mse(out, target)

    mods = blocks()
    ref = nn.Sequential(*copy.deepcopy(mods))
    pipe = ppfast.Pipe(mods, chunks=4, schedule="zb-h1", loss_fn=loss)
    x, y = torch.randn(8, 8), torch.randn(8, 8)
    losses = []
    pipe.step(x, target=y, losses=losses, loss_kwargs={"weight": 3.0})
    assert seen == [3.0] * 4
    want = [3.0 * mse(o, t) for o, t in zip(ref(x).chunk(4), y.chunk(4), strict=True)]
    torch.testing.assert_close(torch.stack(losses), torch.stack(want).detach())


def test_eval_runs_forwards_only():
    """Outputs and losses of the one-device forward; parameters, gradients and the step's
    program untouched; batches of any size."""
    mods = blocks()
    ref = nn.Sequential(*copy.deepcopy(mods))
    pipe = ppfast.Pipe(mods, ["cpu"] * 2, chunks=4, schedule="zb-v", loss_fn=mse)
    x, y = torch.randn(8, 8), torch.randn(8, 8)
    pipe.step(x, target=y)
    grads = [q.grad.clone() for m in mods for q in m.parameters()]
    params = [q.detach().clone() for m in mods for q in m.parameters()]
    ref_params = dict(zip([id(q) for m in mods for q in m.parameters()], params, strict=True))
    with torch.no_grad():
        for m_ref, m in zip(ref, mods, strict=True):
            for q_ref, q in zip(m_ref.parameters(), m.parameters(), strict=True):
                q_ref.copy_(ref_params[id(q)])
    for n in (8, 12):
        xe, ye = torch.randn(n, 8), torch.randn(n, 8)
        losses = []
        out = pipe.eval(xe, target=ye, losses=losses)
        with torch.no_grad():
            want = ref(xe)
        torch.testing.assert_close(out, want)
        want_losses = [mse(o, t) for o, t in zip(want.chunk(4), ye.chunk(4), strict=True)]
        torch.testing.assert_close(torch.stack(losses), torch.stack(want_losses))
    assert not out.requires_grad
    for before, q in zip(grads, [q for m in mods for q in m.parameters()], strict=True):
        assert torch.equal(before, q.grad)
    assert [f for f in pipe.schedules[0].program.ranks[0] if f.kind is ppfast.Kind.W]
    pipe.step(x, target=y)  # training goes on after evaluating


def test_eval_without_target_skips_the_loss():
    called = []
    pipe = ppfast.Pipe(blocks(), chunks=2, loss_fn=lambda o, t: called.append(1) or mse(o, t))
    assert pipe.eval(torch.randn(4, 8)).shape == (4, 8)
    assert not called


def test_step_refused_without_gradients():
    pipe = ppfast.Pipe(blocks(), chunks=2, loss_fn=mse)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"use pipe.eval"):
        pipe.step(torch.randn(4, 8), target=torch.randn(4, 8))


# ---------------------------------------------------------------------------- stages


def test_shape_hints_are_checked_at_the_first_step():
    transport = ppfast._C.InProcessTransport(ppfast._C.Hub(1), 0)
    good = ppfast.PipelineStage(
        nn.Linear(8, 8), 0, 1, "cpu", input_args=torch.zeros(2, 8), output_args=torch.zeros(2, 8)
    )
    sched = ppfast.ScheduleGPipe(good, 2, mse, transport=transport)
    sched.step(torch.randn(4, 8), target=torch.randn(4, 8))
    stage = ppfast.PipelineStage(nn.Linear(8, 8), 0, 2, "cpu", output_args=(torch.zeros(2, 4),))
    stage.prepare(1, [(torch.randn(2, 8),)], [{}], None, None, 1.0)
    with pytest.raises(ValueError, match=r"outputs are float32\[2, 8\] but output_args says"):
        stage.forward(0, None)


def test_get_mesh_is_refused():
    with pytest.raises(TypeError, match="plain tensors"):
        ppfast.PipelineStage(nn.Linear(2, 2), 0, 2, "cpu", get_mesh=lambda *a: None)


class DeferredLinear(nn.Module):
    """A layer that computes its weight gradient itself, later: what torch's dw_builder is
    for. Its backward gives the input gradient and keeps (input, output gradient)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.weight, self.bias = lin.weight, lin.bias
        self.pending: list = []

    def forward(self, x):
        layer = self

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, w, b):
                ctx.save_for_backward(x, w)
                return x @ w.t() + b

            @staticmethod
            def backward(ctx, g):
                x, w = ctx.saved_tensors
                layer.pending.append((x, g))
                return g @ w, None, None

        return Fn.apply(x, self.weight, self.bias)

    def dw(self):
        x, g = self.pending.pop(0)
        for p, grad in ((self.weight, g.t() @ x), (self.bias, g.sum(0))):
            p.grad = grad if p.grad is None else p.grad + grad


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_dw_builder_runs_in_w(schedule):
    torch.manual_seed(0)
    lins = [nn.Linear(8, 8) for _ in range(2)]
    ref = nn.Sequential(*copy.deepcopy(lins))
    layers = [DeferredLinear(lin) for lin in lins]
    hub = ppfast._C.Hub(2)
    scheds = [
        ppfast.get_schedule_class(schedule)(
            ppfast.PipelineStage(layers[r], r, 2, "cpu", dw_builder=lambda r=r: layers[r].dw),
            4,
            mse,
            transport=ppfast._C.InProcessTransport(hub, r),
            tie_group=None,
        )
        for r in range(2)
    ]
    x, y = torch.randn(8, 8), torch.randn(8, 8)
    import threading

    threads = [
        threading.Thread(target=scheds[0].step, args=(x,)),
        threading.Thread(target=lambda: scheds[1].step(target=y)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for chunk_x, chunk_y in zip(x.chunk(4), y.chunk(4), strict=True):
        (mse(ref(chunk_x), chunk_y) / 4).backward()
    for layer, lin in zip(layers, ref, strict=True):
        assert not layer.pending
        torch.testing.assert_close(layer.weight.grad, lin.weight.grad)
        torch.testing.assert_close(layer.bias.grad, lin.bias.grad)


# ---------------------------------------------------------------------------- names, programs


@pytest.mark.parametrize(
    "name, cls",
    [
        ("1F1B", "Schedule1F1B"),
        ("Interleaved1F1B", "ScheduleInterleaved1F1B"),
        ("LoopedBFS", "ScheduleLoopedBFS"),
        ("ZBVZeroBubble", "ScheduleZBVZeroBubble"),
        ("DualPipeV", "ScheduleDualPipeV"),
        ("zb-h2", "ScheduleZBH2"),
    ],
)
def test_get_schedule_class(name, cls):
    assert ppfast.get_schedule_class(name) is getattr(ppfast, cls)


def test_forward_only_programs():
    prog = ppfast.generate("dualpipev", 2, 4)
    fwd = prog.forward_only()
    assert {a.kind for acts in fwd.ranks for a in acts} == {ppfast.Kind.F}
    assert sum(len(a) for a in fwd.ranks) == prog.num_stages * 4
    lowered = ppfast.validate(fwd)
    kinds = {a.kind for acts in lowered.ranks for a in acts}
    assert kinds == {ppfast.Kind.F, ppfast.Kind.SEND_F, ppfast.Kind.RECV_F}
    # one backward missing is still an error: only a program without any is forward-only
    broken = ppfast.generate("1f1b", 2, 2)
    broken.ranks[1] = [a for a in broken.ranks[1] if not (a.kind is ppfast.Kind.B and a.mb == 1)]
    with pytest.raises(ppfast.ProgramError, match=r"needs a B, or an I and a W"):
        ppfast.validate(broken)
