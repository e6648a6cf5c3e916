"""ppfast.build_stage on models split by torch.distributed.pipelining.pipeline().

Stages built from the traced pipe and trained on two gloo ranks match the same model, not
traced, trained on one device with the same microbatches: per-microbatch losses, every
parameter's gradient at every step (by its name in the model) and the parameters after the
last step, fp32, rtol=1e-5 and atol=1e-6 (torch.testing.assert_close). Three models:

- "mlp": a chain of layers, which pipeline() already splits into a chain, so the stages run
  the traced modules as they are;
- "lm": an embedding whose weight the head shares, blocks that each take the attention mask
  and the (integer) positions, keyword arguments of the model, and the embedding output, so
  model inputs and stage 0's output reach every later stage, and the pipe holds a copy of the
  shared weight in the first and the last stage;
- "two-inputs": a model that uses its second argument before its first (torch's own first
  stage takes them in that order, not the model's).

One process group runs every configuration in turn, three SGD (momentum) steps each, with the
Pipe form and torch's (stage module, pipe_info) form. Each rank traces the model itself, as
each process of a torchrun job does, once per model and number of stages, and puts the initial
parameter values back before each configuration. What build_stage refuses, it refuses
before anything runs: those cases are checked in this process.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from ranks import run_once, run_ranks
from torch import fx, nn
from torch.distributed.pipelining import SplitPoint, pipeline
from toy_models import SCHEDULE_CLASSES, make_optimizer, num_stages_of, placement

from ppfast.training.traced import _Plan, build_stage

# torch's pipeline() deep-copies pytree specs, which warns in torch 2.13
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")

RTOL, ATOL = 1e-5, 1e-6
DIM, SEQ, VOCAB, MICROBATCH, M, STEPS = 16, 6, 11, 2, 4, 3


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = F.gelu(layer(x))
        return x


class Block(nn.Module):
    """Position embedding, masked single-head attention and an MLP, plus a learned share of
    the token embedding."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(SEQ, DIM)
        self.ln = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.fc = nn.Linear(DIM, DIM)
        self.lam = nn.Parameter(torch.tensor(0.5))

    def forward(self, h, h0, mask, positions):
        h = h + self.pos(positions)
        q, k, v = self.qkv(self.ln(h)).chunk(3, dim=-1)
        att = (q @ k.transpose(-1, -2) / DIM**0.5 + mask).softmax(-1)
        h = h + self.proj(att @ v) + self.lam * h0
        return h + self.fc(F.gelu(h))


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(4))
        self.ln = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids, mask, positions):
        h0 = h = self.emb(ids)
        for block in self.blocks:
            h = block(h, h0, mask, positions)
        return self.head(self.ln(h))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(DIM, DIM)
        self.b = nn.Linear(DIM, DIM)

    def forward(self, x, y):
        return self.b(F.gelu(self.a(y)) + 2 * x)


MODELS = {"mlp": (MLP, "layers"), "lm": (LM, "blocks"), "two-inputs": (TwoInputs, None)}


def make(model: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[model][0]()


def batch(model: str, step: int, m: int = M) -> tuple[tuple, dict, torch.Tensor]:
    """(args, kwargs, target) of one step of m microbatches."""
    g = torch.Generator().manual_seed(100 + step)
    n = m * MICROBATCH
    if model == "lm":
        ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        mask = torch.triu(torch.full((SEQ, SEQ), -1e9), 1).expand(n, SEQ, SEQ).contiguous()
        positions = torch.arange(SEQ).expand(n, SEQ).contiguous()
        kwargs = {"mask": mask, "positions": positions}
        return (ids,), kwargs, torch.randint(0, VOCAB, (n, SEQ), generator=g)
    x = torch.randn(n, DIM, generator=g)
    if model == "two-inputs":
        return (x, torch.randn(n, DIM, generator=g)), {}, torch.randn(n, DIM, generator=g)
    return (x,), {}, torch.randn(n, DIM, generator=g)


def loss_fn(out, target):
    if target.dtype == torch.long:
        return F.cross_entropy(out.reshape(-1, VOCAB), target.reshape(-1))
    return F.mse_loss(out, target)


def trace(model: str, num_stages: int):
    """pipeline() of a fresh model, one microbatch as the example, split evenly."""
    net = make(model)
    blocks = MODELS[model][1]
    if blocks is None:
        assert num_stages == 2
        spec = {"b": SplitPoint.BEGINNING}
    else:
        per = 4 // num_stages
        spec = {f"{blocks}.{k}": SplitPoint.BEGINNING for k in range(per, 4, per)}
    args, kwargs, _ = batch(model, 0, m=1)
    return pipeline(net, mb_args=args, mb_kwargs=kwargs, split_spec=spec)


# ---------------------------------------------------------------------------- on gloo ranks

# (model, schedule, form): GPipe, 1F1B and two zero-bubble schedules with two stages per rank
# (ZB-V holds the first and the last stage, and so both copies of the LM's shared weight, on
# one rank; interleaved ZB holds them on different ranks)
CONFIGS = [
    ("mlp", "gpipe", "pipe"),
    ("mlp", "1f1b", "torch"),
    ("mlp", "zb-v", "pipe"),
    ("lm", "gpipe", "pipe"),
    ("lm", "1f1b", "torch"),
    ("lm", "interleaved-zb", "pipe"),
    ("lm", "zb-v", "pipe"),
    ("two-inputs", "1f1b", "pipe"),
]
P = 2


def state(modules: dict[int, nn.Module], what: str) -> dict[int, dict[str, torch.Tensor | None]]:
    out = {}
    for s, mod in modules.items():
        out[s] = {}
        for name, p in mod.named_parameters():
            t = p.grad if what == "grad" else p
            out[s][name] = None if t is None else t.detach().clone()
    return out


def train_rank(rank: int, p: int, model: str, schedule: str, form: str, traced: dict) -> dict:
    """This rank's stages of ``model`` under ``schedule``, built from a traced pipe."""
    import torch.distributed as dist

    n = num_stages_of(schedule, p)
    pipe, init = traced[(model, n)]
    with torch.no_grad():
        for q, value in init.items():
            q.copy_(value)
            q.grad = None
    mine = [s for s, r in enumerate(placement(schedule, p)) if r == rank]
    if form == "pipe":
        stages = [build_stage(pipe, s, "cpu") for s in mine]
    else:
        # torch's form does not know which parameters the pipe copied into several stages:
        # the LM's shared weight is declared here, as a user of that form would. On the first
        # stage that is emb.weight: its module also holds the model's own head.weight, which
        # its graph never reads (pipeline() leaves it there).
        shared = {0: "emb.weight", n - 1: "head.weight"} if model == "lm" else {}
        stages = []
        for s in mine:
            mod = pipe.get_stage_module(s)
            tied = {"wte": mod.get_parameter(shared[s])} if s in shared else None
            stages.append(build_stage(mod, s, pipe.info(), "cpu", dist.group.WORLD, tied=tied))
    sched = SCHEDULE_CLASSES[schedule](stages if len(stages) > 1 else stages[0], M, loss_fn)
    modules = {st.stage_index: st.submod for st in stages}
    opt = make_optimizer([q for mod in modules.values() for q in mod.parameters()])
    out = {"losses": [], "grads": []}
    for step in range(STEPS):
        args, kwargs, target = batch(model, step)
        opt.zero_grad()
        losses: list = []
        sched.step(
            *(args if 0 in mine else ()),
            **(kwargs if 0 in mine else {}),
            target=target if n - 1 in mine else None,
            losses=losses,
        )
        out["losses"].append([float(x) for x in losses])
        out["grads"].append(state(modules, "grad"))
        opt.step()
    out["params"] = state(modules, "param")
    return out


def train_all(rank: int, p: int, todo: list) -> dict:
    traced = {}
    for model, schedule, _ in todo:
        key = (model, num_stages_of(schedule, p))
        if key not in traced:
            pipe = trace(*key)
            params = {q for i in range(key[1]) for q in pipe.get_stage_module(i).parameters()}
            traced[key] = (pipe, {q: q.detach().clone() for q in params})
    results = {}
    for cfg in todo:
        try:
            results[cfg] = train_rank(rank, p, *cfg, traced)
        except Exception as e:
            raise RuntimeError(f"rank {rank}, (model, schedule, form) = {cfg}") from e
    return results


@functools.cache
def reference(model: str) -> dict:
    """The model, not traced, on one device: per microbatch loss_fn(model(mb), target_mb),
    (loss / M).backward(), then an optimizer step; gradients under every name a parameter has
    (the LM's head.weight is its emb.weight)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = make(model)
        opt = make_optimizer(net.parameters())
        out = {"losses": [], "grads": []}
        for step in range(STEPS):
            args, kwargs, target = batch(model, step)
            opt.zero_grad()
            losses = []
            for k in range(M):
                mb_args = [a.chunk(M)[k] for a in args]
                mb_kwargs = {key: v.chunk(M)[k] for key, v in kwargs.items()}
                loss = loss_fn(net(*mb_args, **mb_kwargs), target.chunk(M)[k])
                (loss / M).backward()
                losses.append(loss.item())
            out["losses"].append(losses)
            named = net.named_parameters(remove_duplicate=False)
            out["grads"].append({name: q.grad.clone() for name, q in named})
            opt.step()
        named = net.named_parameters(remove_duplicate=False)
        out["params"] = {name: q.detach().clone() for name, q in named}
        return out
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def group_run():
    return run_once(lambda: run_ranks(train_all, P, CONFIGS, timeout=150.0))


def assert_close_by_name(got: dict, want: dict, what: str) -> set[str]:
    """Every tensor a stage holds matches the one-device model's of that name; returns the
    names seen (a stage may hold a copy its graph never reads, with no gradient)."""
    seen = set()
    for s, tensors in got.items():
        for name, t in tensors.items():
            if t is None:
                continue
            torch.testing.assert_close(
                t,
                want[name],
                rtol=RTOL,
                atol=ATOL,
                msg=lambda e, s=s, n=name: f"{what} {s}.{n}: {e}",
            )
            seen.add(name)
    return seen


@pytest.mark.parametrize("cfg", CONFIGS, ids=["-".join(c) for c in CONFIGS])
def test_matches_one_device(group_run, cfg):
    per_rank = [r[cfg] for r in group_run()]
    want = reference(cfg[0])
    holder = next(r for r in per_rank if r["losses"][0])
    for k in range(STEPS):
        torch.testing.assert_close(
            torch.tensor(holder["losses"][k]),
            torch.tensor(want["losses"][k]),
            rtol=RTOL,
            atol=ATOL,
        )
        grads = {s: g for r in per_rank for s, g in r["grads"][k].items()}
        seen = assert_close_by_name(grads, want["grads"][k], f"step {k} grad of stage")
        assert seen == set(want["grads"][k]), f"step {k}: gradients of {sorted(seen)}"
    # a copy its stage never reads keeps its initial value: only trained ones are compared
    last = {s: g for r in per_rank for s, g in r["grads"][-1].items()}
    params = {
        s: {name: t for name, t in tensors.items() if last[s][name] is not None}
        for r in per_rank
        for s, tensors in r["params"].items()
    }
    assert assert_close_by_name(params, want["params"], "params of stage") == set(want["params"])


# ---------------------------------------------------------------------------- in this process


@functools.cache
def traced(model: str, num_stages: int):
    return trace(model, num_stages)


def test_stages_hand_on_what_later_stages_use(one_thread):
    """Stages 1 and 2 of the LM pass the mask and the embedding output on to the stages after
    them; run one after another, the stages compute the model."""
    pipe = traced("lm", 4)
    stages = [build_stage(pipe, i, "cpu") for i in range(4)]
    assert [len(_inputs(st.submod)) for st in stages] == [3, 4, 4, 4]
    assert stages[3].submod is pipe.get_stage_module(3)  # takes stage 2's outputs in order
    args, kwargs, _ = batch("lm", 0, m=1)
    out = stages[0].submod(*args, **kwargs)
    for st in stages[1:]:
        out = st.submod(*out)
    torch.testing.assert_close(out, make("lm")(*args, **kwargs), rtol=0, atol=0)
    # the pipe's copies of the shared weight, on the first and the last stage
    assert {s: list(st.tied) for s, st in enumerate(stages) if st.tied} == {
        0: ["emb.weight"],
        3: ["emb.weight"],
    }
    assert stages[3].tied["emb.weight"] is stages[3].submod.get_parameter("head.weight")


def test_a_chain_keeps_the_traced_modules(one_thread):
    pipe = traced("mlp", 2)
    for i in range(2):
        assert build_stage(pipe, i, "cpu").submod is pipe.get_stage_module(i)
        assert build_stage(pipe.get_stage_module(i), i, pipe.info()).submod is (
            pipe.get_stage_module(i)
        )


def test_first_stage_takes_the_model_arguments_in_order(one_thread):
    pipe = traced("two-inputs", 2)
    stage = build_stage(pipe, 0, "cpu")
    (x, y), _, _ = batch("two-inputs", 0, m=1)
    net = make("two-inputs")
    want = F.gelu(net.a(y)) + 2 * x
    torch.testing.assert_close(stage.submod(x, y), want, rtol=0, atol=0)
    torch.testing.assert_close(stage.submod(y=y, x=x), want, rtol=0, atol=0)


def _inputs(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


# ---------------------------------------------------------------------------- refused


class Detached(nn.Module):
    """The second half uses only parameters: nothing flows from the first half into it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(DIM, DIM)
        self.b = nn.Linear(DIM, DIM)
        self.c = nn.Parameter(torch.randn(DIM))

    def forward(self, x):
        return self.a(x), self.b(self.c)


def test_stage_that_takes_nothing_from_the_ones_before(one_thread):
    net = Detached()
    pipe = pipeline(net, mb_args=(torch.randn(2, DIM),), split_spec={"b": SplitPoint.BEGINNING})
    with pytest.raises(ValueError, match="stage 1 uses nothing .* stage 0 compute"):
        build_stage(pipe, 0, "cpu")


def test_non_tensor_crossing_stages():
    # pipeline() specializes Python numbers away; a graph that hands one on is built here
    g = fx.Graph()
    x, n = g.placeholder("x"), g.placeholder("n")
    n.meta["val"] = 3
    s0 = g.call_module("submod_0", (x,))
    g.output(g.call_module("submod_1", (s0, n)))
    with pytest.raises(ValueError, match=r"model input 'n' \(int\) .* stage 0 to stage 1"):
        _Plan(g, 2)


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda p: build_stage(p, 0, p.info(), "cpu"), TypeError, "takes the device after"),
        (lambda p: build_stage(p, 4, "cpu"), ValueError, r"stage_index 4 is outside \[0, 4\)"),
        (lambda p: build_stage(p), TypeError, r"missing .*build_stage\(pipe, stage_index"),
        (
            lambda p: build_stage(p.get_stage_module(1), 0, p.info(), "cpu"),
            ValueError,
            "takes 4 inputs but stage 0 of pipe_info takes 3",
        ),
        (
            lambda p: build_stage(nn.Linear(2, 2), 0, p.info(), "cpu"),
            TypeError,
            "traced stage module",
        ),
        (
            lambda p: build_stage(p.get_stage_module(0), 0, "cpu"),
            TypeError,
            r"pipe_info must be pipe.info\(\)",
        ),
        (
            lambda p: build_stage(
                p,
                0,
                "cpu",
                tied={"emb.weight": p.get_stage_module(0).get_parameter("blocks.0.ln.weight")},
            ),
            ValueError,
            "already ties another parameter under that key",
        ),
        (
            lambda p: build_stage(p, 0, "cpu", tied={"wte": p.get_stage_module(0).emb.weight}),
            ValueError,
            "already ties as 'emb.weight'",
        ),
    ],
    ids=[
        "pipe-with-info",
        "index",
        "no-index",
        "wrong-module",
        "not-traced",
        "no-info",
        "key",
        "tied-twice",
    ],
)
def test_refused(one_thread, call, error, words):
    with pytest.raises(error, match=words):
        call(traced("lm", 4))
