"""ppfast.nn.Linear: a drop-in nn.Linear whose weight gradients wait for the schedule's W."""

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import ppfast
from ppfast.nn import Linear, WeightGradStore, convert
from ppfast.nn.linear import attach_store


def test_same_constructor_parameters_and_state_dict_as_nn_linear():
    torch.manual_seed(0)
    ref = nn.Linear(5, 3)
    torch.manual_seed(0)
    ours = Linear(5, 3)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for a, b in zip(ours.state_dict().values(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x = torch.randn(4, 2, 5)
    ours(x).square().sum().backward()
    ref(x).square().sum().backward()
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


def test_convert_swaps_in_place_and_keeps_parameters():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    mha = nn.MultiheadAttention(4, 2)
    holder = nn.ModuleDict({"m": model, "attn": mha})
    params = [id(p) for p in holder.parameters()]
    keys = list(holder.state_dict())
    convert(holder, exclude=["m.2.0"])
    assert type(model[0]) is Linear and type(model[2][0]) is nn.Linear
    assert type(mha.out_proj) is not Linear  # used through its weights, not its forward
    assert [id(p) for p in holder.parameters()] == params
    assert list(holder.state_dict()) == keys
    convert(holder, exclude=lambda name, layer: False)
    assert type(model[2][0]) is Linear


def _one_stage(model):
    store = WeightGradStore("stage 0")
    assert attach_store(model, store) > 0
    return store


def test_input_gradient_now_weight_gradient_at_w():
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 3)))
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, Linear):
            m.__class__ = nn.Linear
    store = _one_stage(model)
    x = torch.randn(5, 6, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    with store.backward(0, defer=True):
        model(x).square().sum().backward()
    assert model[0].weight.grad is None and x.grad is not None  # I: input gradient only
    assert store.pending() == {0: ["Linear 2", "Linear 0"]}
    ref(xr).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    store.flush(0)  # W
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    store.check_empty()


def test_w_without_i_and_i_without_w_are_errors_naming_layer_and_microbatch():
    model = convert(nn.Sequential(nn.Linear(3, 3)))
    store = _one_stage(model)
    with pytest.raises(RuntimeError, match="W of microbatch 2 comes without its I"):
        store.flush(2)
    with store.backward(1, defer=True):
        model(torch.randn(2, 3)).sum().backward()
    with pytest.raises(RuntimeError, match=r"microbatch 1 \(Linear 0\) were never computed"):
        store.check_empty()


def test_full_backward_computes_weights_at_once_and_fires_hooks():
    model = convert(nn.Sequential(nn.Linear(3, 3)))
    store = _one_stage(model)
    fired = []
    model[0].weight.register_hook(lambda g: fired.append(g.shape))
    with store.backward(0, defer=False):
        model(torch.randn(2, 3)).sum().backward()
    assert model[0].weight.grad is not None and fired == [(3, 3)]
    store.check_empty()


def test_deferred_gradients_go_to_an_fp32_main_grad():
    torch.manual_seed(0)
    layer = convert(nn.Sequential(nn.Linear(8, 4))).to(torch.bfloat16)
    w = layer[0].weight
    w.main_grad = torch.zeros(w.shape, dtype=torch.float32)
    layer[0].bias.main_grad = torch.zeros(4, dtype=torch.float32)
    store = _one_stage(layer)
    x = torch.randn(16, 8, dtype=torch.bfloat16)
    dy = torch.randn(16, 4, dtype=torch.bfloat16)
    for mb in range(2):
        with store.backward(mb, defer=True):
            layer(x).backward(dy)
        store.flush(mb)
    assert w.grad is None
    want = 2 * (dy.float().t() @ x.float())
    # the reference runs in fp32; bf16 inputs were exact, so only fp32 rounding remains
    torch.testing.assert_close(w.main_grad, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer[0].bias.main_grad, 2 * dy.float().sum(0), rtol=1e-5, atol=1e-4)


class Tied(nn.Module):
    """One layer used twice: each use must add its own share, once."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class CheckpointedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))

    def forward(self, x):
        return x + checkpoint(self.block, x, use_reentrant=False)


def _stack(kind, n):
    torch.manual_seed(0)
    if kind == "tied":
        return [Tied() for _ in range(n)]
    if kind == "checkpoint":
        return [CheckpointedBlock() for _ in range(n)]
    return [nn.Sequential(nn.Linear(4, 4), nn.GELU()) for _ in range(n)]


@pytest.mark.parametrize("kind", ["mlp", "tied", "checkpoint"])
@pytest.mark.parametrize(
    ("schedule", "p", "per_rank"),
    [("zb-h1", 2, 1), ("zb-h2", 4, 1), ("zb-v", 2, 2), ("interleaved-zb", 2, 2),
     ("dualpipev", 2, 2), ("1f1b", 2, 1)],
)  # fmt: skip
def test_converted_pipelines_match_the_unconverted_model_on_one_device(kind, schedule, p, per_rank):
    m = 4
    blocks = _stack(kind, p * per_rank)
    ref = nn.Sequential(*copy.deepcopy(blocks))
    stages = [convert(copy.deepcopy(b)) for b in blocks]
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    loss_fn = nn.MSELoss()
    pipe = ppfast.Pipe(stages, ["cpu"] * p, chunks=m, schedule=schedule, loss_fn=loss_fn)
    opt = torch.optim.SGD([q for s in stages for q in s.parameters()], lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(3):
        losses: list = []
        pipe.step(x, target=y, losses=losses)
        ref_losses = []
        for xb, yb in zip(x.chunk(m), y.chunk(m), strict=True):
            loss = loss_fn(ref(xb), yb)
            ref_losses.append(loss.detach())
            (loss / m).backward()
        torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses))
        ours = [q.grad for s in stages for q in s.parameters()]
        for a, b in zip(ours, [q.grad for q in ref.parameters()], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            # a gradient, as autograd leaves it: no graph that would hold every microbatch's
            # inputs and output gradients until the gradients are cleared
            assert not a.requires_grad and a.grad_fn is None
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for a, b in zip([q for s in stages for q in s.parameters()], ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_w_actions_carry_the_weight_gradient_work():
    # under ZB-H1 the deferred work runs in W: an I leaves every weight gradient untouched
    blocks = [convert(b) for b in _stack("mlp", 2)]
    seen = []

    class Spy(ppfast.nn.WeightGradStore):
        def flush(self, mb):
            before = blocks[1][0].weight.grad
            seen.append(None if before is None else before.clone())
            super().flush(mb)

    pipe = ppfast.Pipe(blocks, ["cpu"] * 2, chunks=2, schedule="zb-h1", loss_fn=nn.MSELoss())
    last = pipe.schedules[1].stages[0]
    last.weight_store.__class__ = Spy
    pipe.step(torch.randn(4, 4), target=torch.randn(4, 4))
    assert seen[0] is None  # the first W found no weight gradient yet: I had deferred it
    assert blocks[1][0].weight.grad is not None


@pytest.mark.parametrize("in_step", [False, True], ids=["plain", "in a step"])
def test_autocast_saves_the_weight_not_a_cast_copy(in_step):
    """Under autocast the layer computes with a bf16 copy of its weight, but keeps only the
    parameter for its backward: no microbatch holds a second copy from its F to its I."""
    layer = convert(nn.Sequential(nn.Linear(16, 32)))[0]
    store = _one_stage(layer)
    saved: list = []
    with contextlib.ExitStack() as stack:
        if in_step:
            store.begin_step(1)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t))  # fmt: skip
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(torch.randn(4, 16, requires_grad=True))
    assert y.dtype == torch.bfloat16
    big = [t for t in saved if t.shape == layer.weight.shape]
    assert big and all(t.dtype == torch.float32 for t in big), [t.dtype for t in big]


def test_autocast_matches_nn_linear_under_autocast():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 8))
    model = convert(copy.deepcopy(ref))
    store = _one_stage(model)
    x = torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        want = ref(x)
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out, want)
    with store.backward(0, defer=True):
        out.float().square().sum().backward()
    store.flush(0)
    want.float().square().sum().backward()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert a.grad.dtype == b.grad.dtype == torch.float32
        # both take bf16 products; they may round differently, within bf16's precision
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------- hooks


def test_hooked_sees_tensor_hooks_post_accumulate_hooks_and_held_nodes():
    from ppfast.training.grad_hooks import hooked

    ps = [nn.Parameter(torch.zeros(2)) for _ in range(5)]
    ps[1].register_hook(lambda g: None)
    ps[2].register_post_accumulate_grad_hook(lambda p: None)
    node = ps[3].view_as(ps[3]).grad_fn.next_functions[0][0]
    node.register_hook(lambda grad_in, grad_out: None)
    assert hooked(ps) == [False, True, True, True, False]
    assert hooked(ps) == [False, True, True, True, False]  # asking changes nothing
    del node  # its hook goes with it
    assert hooked(ps) == [False, True, True, False, False]


def _watch(pipe, log):
    """Log the start of every action that completes weight gradients: a W, or a full B."""
    for sched in pipe.schedules:
        for st in sched.stages:

            def weight(mb, st=st, f=st.weight):
                log.append(("weights", st.stage_index, mb))
                f(mb)

            def backward(mb, grads, full, st=st, f=st.backward):
                if full:
                    log.append(("weights", st.stage_index, mb))
                return f(mb, grads, full)

            st.weight, st.backward = weight, backward


def _reference_grads(ref, x, y, m):
    ref.zero_grad(set_to_none=True)
    for xb, yb in zip(x.chunk(m), y.chunk(m), strict=True):
        (nn.functional.mse_loss(ref(xb), yb) / m).backward()
    return [q.grad.clone() for q in ref.parameters()]


def _hook(kind, param, name, log):
    """A hook of the given kind on ``param`` that logs what gradient it saw."""
    if kind == "tensor":
        return param.register_hook(lambda g: log.append(("hook", name, g.clone())))
    if kind == "post":
        return param.register_post_accumulate_grad_hook(
            lambda q: log.append(("hook", name, q.grad.clone()))
        )
    node = param.view_as(param).grad_fn.next_functions[0][0]
    node.register_hook(lambda gi, go: log.append(("hook", name, param.grad.clone())))
    return node  # the caller holds it, as DDP's reducer does


@pytest.mark.parametrize("kind", ["tensor", "post", "node"])
@pytest.mark.parametrize(
    ("schedule", "p", "per_rank"), [("zb-h1", 2, 1), ("zb-v", 2, 2), ("dualpipev", 2, 2)]
)
def test_hooks_fire_once_per_step_after_the_last_w_with_the_whole_gradient(
    kind, schedule, p, per_rank
):
    m = 4
    blocks = _stack("mlp", p * per_rank)
    ref = nn.Sequential(*copy.deepcopy(blocks))
    stages = [convert(copy.deepcopy(b)) for b in blocks]
    names = [f"{s}.{n}" for s, st in enumerate(stages) for n, _ in st.named_parameters()]
    params = [q for st in stages for q in st.parameters()]
    log: list = []
    held = [_hook(kind, q, name, log) for q, name in zip(params, names, strict=True)]
    pipe = ppfast.Pipe(stages, ["cpu"] * p, chunks=m, schedule=schedule, loss_fn=nn.MSELoss())
    _watch(pipe, log)
    for step in range(2):
        x, y = torch.randn(8, 4), torch.randn(8, 4)
        log.clear()
        for q in params:
            q.grad = None
        pipe.step(x, target=y)
        want = _reference_grads(ref, x, y, m)
        fired = [e for e in log if e[0] == "hook"]
        assert sorted(e[1] for e in fired) == sorted(names), f"step {step}: once per parameter"
        for name, g in zip(names, want, strict=True):
            at = next(i for i, e in enumerate(log) if e[0] == "hook" and e[1] == name)
            stage = int(name.split(".")[0])
            # inside the stage's last W (or B), not before it
            started = [e for e in log[:at] if e[0] == "weights" and e[1] == stage]
            assert len(started) == m, f"{name} fired in the {len(started)}th of {m} W/B"
            torch.testing.assert_close(log[at][2], g, rtol=1e-5, atol=1e-6)
        for q, g in zip(params, want, strict=True):
            torch.testing.assert_close(q.grad, g, rtol=1e-5, atol=1e-6)
    del held


def test_a_tensor_hook_may_change_the_gradient_as_in_autograd():
    blocks = _stack("mlp", 2)
    ref = nn.Sequential(*copy.deepcopy(blocks))
    stages = [convert(copy.deepcopy(b)) for b in blocks]
    stages[1][0].weight.register_hook(lambda g: 2 * g)
    pipe = ppfast.Pipe(stages, ["cpu"] * 2, chunks=4, schedule="zb-h1", loss_fn=nn.MSELoss())
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    pipe.step(x, target=y)
    want = _reference_grads(ref, x, y, 4)
    torch.testing.assert_close(stages[1][0].weight.grad, 2 * want[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stages[1][0].bias.grad, want[3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("schedule", "converted"), [("zb-h1", False), ("1f1b", True)])
def test_unconverted_layers_and_schedules_without_w_fire_hooks_per_microbatch(schedule, converted):
    m = 4
    blocks = _stack("mlp", 2)
    stages = [convert(b) if converted else b for b in blocks]
    seen = []
    stages[1][0].weight.register_hook(lambda g: seen.append(g.clone()))
    pipe = ppfast.Pipe(stages, ["cpu"] * 2, chunks=m, schedule=schedule, loss_fn=nn.MSELoss())
    pipe.step(torch.randn(8, 4), target=torch.randn(8, 4))
    assert len(seen) == m  # autograd's own behaviour: one call per microbatch's backward


def test_a_parameter_two_stages_of_a_rank_share_fires_once():
    # V placement puts stages 0 and 3 on rank 0; their layers are one Parameter
    m = 4
    blocks = _stack("mlp", 4)
    blocks[3][0].weight = blocks[0][0].weight
    ref = nn.Sequential(*copy.deepcopy(blocks))
    assert ref[3][0].weight is ref[0][0].weight
    stages = [convert(b) for b in copy.deepcopy(blocks)]
    shared = stages[0][0].weight
    assert stages[3][0].weight is shared
    seen = []
    shared.register_post_accumulate_grad_hook(lambda q: seen.append(q.grad.clone()))
    pipe = ppfast.Pipe(stages, ["cpu"] * 2, chunks=m, schedule="zb-v", loss_fn=nn.MSELoss())
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    pipe.step(x, target=y)
    want = _reference_grads(ref, x, y, m)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared.grad, want[0], rtol=1e-5, atol=1e-6)
