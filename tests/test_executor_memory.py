"""Executor memory: sent activations free their storage when backward does not need it, and
receive buffers are reused across microbatches and steps."""

import torch
from torch import nn

import ppfast


class Capture(nn.Module):
    """Wraps a stage module and keeps what goes in and out, to look at after the step."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.outputs, self.input_ptrs = [], []

    def forward(self, x):
        self.input_ptrs.append(x.untyped_storage().data_ptr())
        out = self.inner(x)
        self.outputs.append(out)
        return out


def _pipe(first_tail):
    torch.manual_seed(0)
    s0 = Capture(nn.Sequential(nn.Linear(8, 8), first_tail))
    s1 = Capture(nn.Linear(8, 8))
    return s0, s1, ppfast.Pipe([s0, s1], chunks=4, loss_fn=lambda y: y.square().mean())


def test_sent_activation_is_freed_when_backward_does_not_need_it():
    s0, _, pipe = _pipe(nn.Identity())  # a Linear's output: its backward keeps input and weight
    pipe.step(torch.randn(16, 8))
    assert len(s0.outputs) == 4
    assert all(o.untyped_storage().nbytes() == 0 for o in s0.outputs)


def test_sent_activation_is_kept_when_backward_reads_it():
    s0, _, pipe = _pipe(nn.Sigmoid())  # sigmoid's backward reads its own output
    pipe.step(torch.randn(16, 8))
    assert all(o.untyped_storage().nbytes() == 8 * 4 * 4 for o in s0.outputs)


def test_receive_buffers_are_reused_across_microbatches_and_steps():
    _, s1, pipe = _pipe(nn.Identity())
    x = torch.randn(16, 8)
    # the first step agrees shapes; from the second on, receives are posted early, so the last
    # stage holds one buffer in use and one being filled: 2 buffers for 4 microbatches
    pipe.step(x)
    pipe.step(x)
    warm = set(s1.input_ptrs[4:])
    assert len(warm) == 2
    s1.input_ptrs.clear()
    for _ in range(3):
        pipe.step(x)
    assert set(s1.input_ptrs) == warm
