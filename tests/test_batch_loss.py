"""A loss that weighs microbatches by their share of the batch (ppfast.BatchLoss): the step's
losses add up to the whole batch's loss and the gradients are the whole batch's, though the
microbatches count different numbers of items; a plain loss is still averaged over m."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ppfast

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, CLASSES, M, PER = 8, 5, 4, 3


def token_sum(logits, labels, num_items_in_batch):
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / num_items_in_batch


def count(targets):
    return {"num_items_in_batch": sum(int((t != -100).sum()) for t in targets)}


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, CLASSES))


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M * PER, DIM, generator=g)
    y = torch.randint(0, CLASSES, (M * PER,), generator=g)
    y[[0, 1, 3, 4, 5, 9]] = -100  # the microbatches count 1, 0, 3 and 2 items
    return x, y


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_batch_loss_gives_the_whole_batch_mean(schedule):
    x, y = data()
    ref = model()
    want = F.cross_entropy(ref(x), y, ignore_index=-100)
    want.backward()

    net = model()
    ppfast.nn.convert(net)
    pipe = ppfast.Pipe(
        [net[:2], net[2:]], chunks=M, schedule=schedule, loss_fn=ppfast.BatchLoss(token_sum, count)
    )
    losses: list = []
    pipe.step(x, target=y, losses=losses)
    torch.testing.assert_close(sum(losses), want.detach(), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_batch_kwargs_none_is_a_plain_mean():
    x, y = data()
    y[y == -100] = 0
    ref = model()
    want = (
        sum(F.cross_entropy(ref(xm), ym) for xm, ym in zip(x.chunk(M), y.chunk(M), strict=True)) / M
    )
    want.backward()
    net = model()
    plain = ppfast.BatchLoss(F.cross_entropy, lambda targets: None)
    pipe = ppfast.Pipe([net[:2], net[2:]], chunks=M, loss_fn=plain)
    losses: list = []
    pipe.step(x, target=y, losses=losses)
    torch.testing.assert_close(sum(losses) / M, want.detach(), rtol=1e-5, atol=1e-6)
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_batch_kwargs_must_be_a_dict():
    x, y = data()
    net = model()
    bad = ppfast.BatchLoss(token_sum, lambda targets: 3)
    pipe = ppfast.Pipe([net[:2], net[2:]], chunks=M, loss_fn=bad)
    with pytest.raises(TypeError, match="must return a dict"):
        pipe.step(x, target=y)
