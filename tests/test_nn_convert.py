"""ppfast.nn.convert beyond nn.Linear: transformers' Conv1D (GPT-2) and registered layers.

A converted layer keeps its class name, parameters, state_dict and isinstance; its backward
gives the input gradient at once and the weight gradients at W, equal to the unconverted
layer's (fp32, rtol 1e-5), whether its weight is stored (out, in) or (in, out).
"""

import copy

import pytest
import torch
from torch import nn

import ppfast
from ppfast.nn import SplitLayer, WeightGradStore, convert, register_linear
from ppfast.nn.linear import attach_store


class Projection(nn.Module):
    """A user's linear-like layer, weight stored (in, out)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


def _split_run(model, ref, x):
    """I then W through a stage's store, against plain autograd on ``ref``."""
    store = WeightGradStore("stage 0")
    assert attach_store(model, store) > 0
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    with store.backward(0, defer=True):
        model(xs).square().sum().backward()
    deferred = [p for p in model.parameters() if p.grad is None]
    assert deferred, "no weight gradient waited for W"
    ref(xr).square().sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-5, atol=1e-6)
    store.flush(0)
    for (name, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    store.check_empty()


def test_a_registered_transposed_layer_splits_and_matches():
    torch.manual_seed(0)
    register_linear(Projection, transposed_weight=True)
    model = nn.Sequential(Projection(6, 5), nn.GELU(), Projection(5, 3))
    ref = copy.deepcopy(model)
    convert(model)
    assert all(isinstance(m, (SplitLayer, Projection)) for m in (model[0], model[2]))
    assert type(model[0]).__name__ == "Projection" and model[0].label == "Projection 0"
    assert model.state_dict().keys() == ref.state_dict().keys()
    _split_run(model, ref, torch.randn(4, 6))


def test_register_refuses_what_is_not_a_layer_class():
    with pytest.raises(TypeError, match="nn.Module class"):
        register_linear(torch.matmul)
    with pytest.raises(TypeError, match="already a split layer"):
        register_linear(ppfast.nn.Linear)


def _gpt2(layers: int = 4):
    transformers = pytest.importorskip("transformers")  # an optional dependency
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=layers, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_every_linear_like_layer_of_gpt2_is_converted():
    model = _gpt2(4)
    from transformers.pytorch_utils import Conv1D

    before = model.state_dict()
    convert(model)
    split = [n for n, m in model.named_modules() if isinstance(m, SplitLayer)]
    # per block c_attn, attn.c_proj, c_fc, mlp.c_proj, and the head: 17 of 17
    assert len(split) == 4 * 4 + 1, split
    assert all(isinstance(model.get_submodule(n), (Conv1D, nn.Linear)) for n in split)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_converted_gpt2_gives_the_same_loss_and_gradients():
    model = _gpt2(2)
    ref = copy.deepcopy(model)
    convert(model)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    store = WeightGradStore("stage 0")
    attach_store(model, store)
    with store.backward(0, defer=True):
        loss = model(ids, labels=ids).loss
        loss.backward()
    want = ref(ids, labels=ids).loss
    want.backward()
    torch.testing.assert_close(loss, want)
    store.flush(0)
    for (name, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
