"""ppfast.recompute in one process: checkpointed blocks compute what the plain ones do, keep
only their inputs for backward, recompute once per backward (in I under a split backward,
never in W), and are chosen, refused and undone as documented.

Equal here means bitwise: the recomputation replays the same CPU ops on the same inputs in
the same process. Pipeline runs compare with the one-device model at fp32, rtol=1e-5,
atol=1e-6, as the other pipeline tests do.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ppfast
from ppfast.recompute import (
    ActivationMeter,
    checkpoint_blocks,
    checkpointed,
    uncheckpoint_blocks,
)

DIM, SEQ, BATCH = 32, 8, 4

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """Pre-norm MLP block with dropout and an optional tensor keyword."""

    def __init__(self, dim: int = DIM, p: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(p)

    def forward(self, x, scale=None):
        h = self.fc2(self.drop(F.gelu(self.fc1(self.norm(x)))))
        if scale is not None:
            h = h * scale
        return x + h


class Tower(nn.Module):
    """Blocks in a ModuleList under a name, with a head: blocks are found by name or class."""

    def __init__(self, n: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(n))
        self.head = nn.Linear(DIM, DIM)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def make(n: int = 4, p: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(Block(p=p) for _ in range(n)))


def data(seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, SEQ, DIM, generator=torch.Generator().manual_seed(seed))


def train_once(model: nn.Module, x: torch.Tensor, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(x, **kwargs)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def count_runs(block: Block) -> list:
    """One entry each time the block's body starts: its forward, and each recomputation."""
    runs: list = []
    block.norm.register_forward_pre_hook(lambda *_: runs.append(1))
    return runs


# ---------------------------------------------------------------------------- equal results


def test_checkpointed_blocks_give_the_same_outputs_gradients_and_state_dict():
    plain = make()
    ckpt = copy.deepcopy(plain)
    assert checkpoint_blocks(ckpt) is ckpt
    assert checkpointed(ckpt) == ["0", "1", "2", "3"]
    # the forward is replaced on the instance: no wrapper module, no renamed parameter
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in ckpt.named_modules()] == [n for n, _ in plain.named_modules()]
    x = data()
    out, grads = train_once(ckpt, x)
    want_out, want_grads = train_once(plain, x)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    assert_same(grads, want_grads)
    # a state_dict saved from one loads into the other, both ways
    plain.load_state_dict(ckpt.state_dict())
    ckpt.load_state_dict(plain.state_dict())


def test_dropout_draws_the_same_masks_when_recomputed():
    plain = make(p=0.5)
    ckpt = checkpoint_blocks(copy.deepcopy(plain))
    x = data()
    torch.manual_seed(7)
    out, grads = train_once(ckpt, x)
    after_ckpt = torch.get_rng_state()
    torch.manual_seed(7)
    want_out, want_grads = train_once(plain, x)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    assert_same(grads, want_grads)
    # recomputation restores the RNG it borrowed: later draws are the plain model's
    assert torch.equal(after_ckpt, torch.get_rng_state())

    # without the RNG state restored the recomputation draws new masks: the check has teeth
    fresh = checkpoint_blocks(copy.deepcopy(plain), preserve_rng_state=False)
    torch.manual_seed(7)
    _, other = train_once(fresh, x)
    assert not torch.equal(other["0.fc1.weight"], want_grads["0.fc1.weight"])


def test_tensor_keywords_get_their_gradients():
    plain = make(n=1)[0]
    ckpt = checkpoint_blocks(copy.deepcopy(plain), Block)
    assert checkpointed(ckpt) == [""]
    x = data()
    got, want = [], []
    for model, into in ((ckpt, got), (plain, want)):
        scale = torch.full((DIM,), 0.5, requires_grad=True)
        out, grads = train_once(model, x, scale=scale)
        into += [out, scale.grad, grads]
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    assert_same(got[2], want[2])


# ---------------------------------------------------------------------------- memory


def peak_saved(model: nn.Module, x: torch.Tensor) -> int:
    with ActivationMeter(model) as meter:
        model(x).square().mean().backward()
        assert meter.live == 0, "backward let go of everything"
    return meter.peak


def test_checkpointed_blocks_keep_only_their_inputs_for_backward(capsys):
    x = data()
    plain = peak_saved(make(), x)
    every = peak_saved(checkpoint_blocks(make()), x)
    half = peak_saved(checkpoint_blocks(make(), every=2), x)
    # each block keeps the tensor it was called with; nothing of what it computes
    assert every == 4 * x.nbytes
    # with every=2, blocks 1 and 3 keep what they save, as in the plain model
    assert every < half < plain
    assert half - every == (plain - every) // 2
    with capsys.disabled():
        print(
            f"\n  4 blocks, batch {BATCH}x{SEQ}x{DIM}: peak bytes saved for backward "
            f"{plain:,} plain, {half:,} with every=2, {every:,} with every block checkpointed",
            end="",
        )


def test_meter_hands_saved_tensors_on_to_the_hooks_around_it():
    """A PipelineStage frees a sent activation only if its own saved-tensor hook never saw it;
    the meter must not hide tensors from the hooks around it."""
    x = data()

    def packs_seen(model, meter: bool) -> tuple[int, dict]:
        seen = []

        def pack(t):
            seen.append(t.untyped_storage().data_ptr())
            return t

        watch = ActivationMeter(model) if meter else None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, grads = train_once(model, x)
        if watch is not None:
            assert watch.peak > 0
            watch.remove()
        return len(seen), grads

    model = checkpoint_blocks(make())
    without, want = packs_seen(model, meter=False)
    with_meter, grads = packs_seen(model, meter=True)
    # the four blocks' inputs (checkpoint saves them under the hooks around it), and the
    # model's output, which the loss's square() saves
    assert with_meter == without == 5
    assert_same(grads, want)


# ---------------------------------------------------------------------------- recomputing


def test_a_block_is_recomputed_once_per_backward_and_not_without_grad():
    model = checkpoint_blocks(make(n=2))
    runs = [count_runs(b) for b in model]
    x = data()
    model(x).sum().backward()
    assert [len(r) for r in runs] == [2, 2]  # forward, then once more in backward
    with torch.no_grad():
        model(x)
    assert [len(r) for r in runs] == [3, 3]  # no grad, nothing saved, nothing to recompute


def test_hooks_on_a_checkpointed_block_run_once_per_call():
    model = checkpoint_blocks(make(n=2))
    calls = []
    model[0].register_forward_pre_hook(lambda *_: calls.append("pre"))
    model[0].register_forward_hook(lambda *_: calls.append("post"))
    model(data()).sum().backward()
    assert calls == ["pre", "post"]


@pytest.mark.parametrize("order", ["checkpoint, then convert", "convert, then checkpoint"])
@pytest.mark.parametrize("full", [False, True], ids=["I then W", "B"])
def test_split_backward_recomputes_in_i_and_w_uses_the_recomputed_inputs(order, full):
    """A one-stage pipeline driven by hand: F for every microbatch, then I (or B) for each,
    then W for each; against plain autograd on the unconverted, uncheckpointed model."""
    m = 2
    plain = make(n=2)
    model = copy.deepcopy(plain)
    if order.startswith("checkpoint"):
        ppfast.nn.convert(checkpoint_blocks(model))
    else:
        checkpoint_blocks(ppfast.nn.convert(model))
    assert all(isinstance(layer, ppfast.nn.Linear) for b in model for layer in (b.fc1, b.fc2))
    runs = [count_runs(b) for b in model]
    stage = ppfast.PipelineStage(model, 0, 1, "cpu")
    x, target = data(1), data(2)
    xs, ts = x.chunk(m), target.chunk(m)
    stage.prepare(m, [(c,) for c in xs], [{}] * m, list(ts), F.mse_loss, 1.0 / m)
    for mb in range(m):
        stage.forward(mb, None)
    assert [len(r) for r in runs] == [m, m]
    for mb in range(m):
        stage.backward(mb, None, full=full)
    assert [len(r) for r in runs] == [2 * m, 2 * m], "each block recomputed once, in I or B"
    split = [p for b in model for layer in (b.fc1, b.fc2) for p in layer.parameters()]
    if full:
        assert stage.weight_store.pending() == {}
        assert all(p.grad is not None for p in split)
    else:
        labels = sorted(f"Linear {i}.{fc}" for i in range(2) for fc in ("fc1", "fc2"))
        assert {mb: sorted(w) for mb, w in stage.weight_store.pending().items()} == {
            mb: labels for mb in range(m)
        }
        assert all(p.grad is None for p in split), "W's work ran before the W"
        for mb in range(m):
            stage.weight(mb)
        assert [len(r) for r in runs] == [2 * m, 2 * m], "W recomputed a block"
    stage.check_clean()  # every microbatch dropped, the weight-grad store empty
    for c, t in zip(xs, ts, strict=True):
        (F.mse_loss(plain(c), t) / m).backward()
    for (name, got), (_, want) in zip(
        model.named_parameters(), plain.named_parameters(), strict=True
    ):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6, msg=name)


class Fork(nn.Module):
    """Returns h and block(h): h is a stage output and a checkpointed block's input, so the
    executor must not free it after sending it (the recomputation reads it)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)
        self.block = Block()
        self.sent: list[torch.Tensor] = []

    def forward(self, x):
        h = self.lin(x) * 2  # not a view, and nothing outside the block saves it
        self.sent.append(h)
        return h, self.block(h)


class Join(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, h, y):
        return self.block(h * y)


def test_pipe_keeps_a_sent_activation_that_a_checkpointed_block_recomputes_from():
    torch.manual_seed(0)
    plain = [Fork(), Join()]
    stages = copy.deepcopy(plain)
    m = 4
    pipe = ppfast.Pipe(stages, chunks=m, loss_fn=lambda y: y.square().mean())
    # after the stages are built: the pipeline calls the modules it was given, as they are then
    checkpoint_blocks(stages[0], ["block"])
    checkpoint_blocks(stages[1], Block)
    x = data()
    pipe.step(x)
    assert all(h.untyped_storage().nbytes() == h.nbytes for h in stages[0].sent)
    for c in x.chunk(m):
        (plain[1](*plain[0](c)).square().mean() / m).backward()
    for got, want in zip(stages, plain, strict=True):
        for (name, a), (_, b) in zip(got.named_parameters(), want.named_parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------- choosing


def test_every_k_checkpoints_one_block_in_k_from_the_first():
    assert checkpointed(checkpoint_blocks(make(n=7), every=3)) == ["0", "3", "6"]
    assert checkpointed(checkpoint_blocks(make(n=7), every=7)) == ["0"]
    assert checkpointed(checkpoint_blocks(make(n=7), every=9)) == ["0"]
    tower = checkpoint_blocks(Tower(n=5), Block, every=2)
    assert checkpointed(tower) == ["layers.0", "layers.2", "layers.4"]


def test_blocks_by_position_name_class_and_predicate():
    assert checkpointed(checkpoint_blocks(make(), [1, -1])) == ["1", "3"]
    assert checkpointed(checkpoint_blocks(make(), 2)) == ["2"]
    assert checkpointed(checkpoint_blocks(Tower(), ["layers.2", "head"])) == ["layers.2", "head"]
    assert checkpointed(checkpoint_blocks(Tower(), "layers.1")) == ["layers.1"]
    # a class or predicate takes the outermost match: the Blocks, not the Linears in them
    both = checkpoint_blocks(Tower(), (Block, nn.Linear))
    assert checkpointed(both) == ["layers.0", "layers.1", "layers.2", "head"]
    assert checkpointed(checkpoint_blocks(Tower().layers)) == ["0", "1", "2"]
    chosen = checkpoint_blocks(Tower(), lambda name, m: name.startswith("layers."))
    assert checkpointed(chosen) == ["layers.0", "layers.1", "layers.2"]


def test_uncheckpoint_blocks_restores_the_forward():
    model = make(n=2)
    custom = Block.forward.__get__(model[1])
    model[1].forward = custom  # someone else's instance forward, kept underneath
    checkpoint_blocks(model)
    assert uncheckpoint_blocks(model) == ["0", "1"]
    assert "forward" not in model[0].__dict__
    assert model[1].forward is custom
    assert checkpointed(model) == []
    assert peak_saved(model, data()) == peak_saved(make(n=2), data())
    checkpoint_blocks(model)  # and it can be checkpointed again
    assert checkpointed(model) == ["0", "1"]


def test_copies_and_pickles_recompute_their_own_blocks():
    model = checkpoint_blocks(make(n=2))
    x = data()
    copied = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    _, want = train_once(model, x)
    for other in (copied, loaded):
        assert checkpointed(other) == ["0", "1"]
        assert other[0].forward.block is other[0]
        _, grads = train_once(other, x)
        assert_same(grads, want)
        assert all(
            p.grad is not q.grad
            for p, q in zip(other.parameters(), model.parameters(), strict=True)
        )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: checkpoint_blocks(Tower()), "not an nn.Sequential or nn.ModuleList"),
        (lambda: checkpoint_blocks(make(), every=0), "every must be a positive int"),
        (lambda: checkpoint_blocks(make(), every=1.5), "every must be a positive int"),
        (lambda: checkpoint_blocks(make(), every=True), "every must be a positive int"),
        (lambda: checkpoint_blocks(make(), [4]), r"outside the 4 blocks .* \(0 to 3"),
        (lambda: checkpoint_blocks(Tower(), [0]), "name the blocks instead"),
        (lambda: checkpoint_blocks(Tower(), ["layer.1"]), "did you mean 'layers.1'"),
        (lambda: checkpoint_blocks(make(), [0, -4]), "choose the same block"),
        (lambda: checkpoint_blocks(Tower(), ["layers.0", "layers.0.fc1"]), "lies inside"),
        (lambda: checkpoint_blocks(Tower(), ["layers"]), "no forward of its own"),
        (lambda: checkpoint_blocks(make(), nn.Conv1d), "no submodule of Sequential is a Conv1d"),
        (lambda: checkpoint_blocks(make(), lambda n, m: False), "the predicate chose no"),
        (lambda: checkpoint_blocks(make(), [0.5]), "positions \\(int\\) and qualified names"),
        (lambda: checkpoint_blocks(nn.Sequential()), "is empty"),
        (lambda: checkpoint_blocks("model"), "must be an nn.Module"),
    ],
)
def test_mistakes_say_what_to_change(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_checkpointing_twice_or_nested_is_refused_and_changes_nothing():
    model = checkpoint_blocks(Tower(), ["layers.1"])
    with pytest.raises(ValueError, match="'layers.1' is already checkpointed.*uncheckpoint"):
        checkpoint_blocks(model, Block)
    with pytest.raises(ValueError, match="'layers.1.fc1' lies inside block 'layers.1'"):
        checkpoint_blocks(model, ["layers.1.fc1"])
    with pytest.raises(ValueError, match="'layers.1' lies inside the module itself"):
        checkpoint_blocks(model, Tower)
    with pytest.raises(ValueError, match="did you mean"):
        checkpoint_blocks(model, ["layers.0", "layers.9"])
    assert checkpointed(model) == ["layers.1"]  # a refused call wraps nothing
