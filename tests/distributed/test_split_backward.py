"""Split backward with tied weights and fp32 main grads, trained on gloo ranks, matches the
unconverted model trained on one device.

The model: a token embedding and an input projection on the first stage, transformer blocks
(one per stage), and an output projection and a head on the last stage. The head shares the
embedding's weight (key "wte") and the output projection shares the input projection's
weight (key "proj"), so one tie joins two layers autograd handles (an nn.Embedding with a
split head) and the other two split layers. The pipeline converts every stage
(ppfast.nn.convert) and gives each owner its own copy of a tied weight, started from a
different value (the tie must replace it with the first stage's). Every parameter has an
fp32 ``main_grad`` that the optimizer step uses (Megatron style):

- "hooks": every parameter has a post-accumulate hook that moves ``.grad`` into
  ``main_grad``, so split layers hand their weight gradients to autograd after their last W;
- "direct": only parameters autograd handles have that hook; split layers write
  ``main_grad`` themselves at W;
- "one-object": as "direct", with the tied weights one Parameter object on the rank that
  holds both the first and the last stage (V placement).

Each schedule runs at p = 2 and p = 4 with m = 2p, three SGD (momentum) steps, each step's
gradients clipped by ``ppfast.clip_grad_norm_`` to a norm the model's exceeds (the tied
weights counted once, the main grads scaled); per-microbatch losses, every rank's norm, every
parameter's gradient at every step and the parameters after the last step must match the
one-device model clipped by ``torch.nn.utils.clip_grad_norm_``, where each tie is one
Parameter: fp32, rtol=1e-5, atol=1e-6 (torch.testing.assert_close). One process group per p
runs every configuration in turn; before them, a tie whose owners disagree on shape is
refused with a ValueError on every rank before anything is sent (the configurations after
it would break otherwise).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
import toy_models
from ranks import run_once, run_ranks
from torch import nn
from toy_models import (
    SCHEDULE_CLASSES,
    V_PLACED,
    TransformerBlock,
    assert_matches,
    merge_ranks,
)

import ppfast

RTOL, ATOL = 1e-5, 1e-6
VOCAB, DIM, SEQ, MICROBATCH, STEPS, LR = 24, 16, 5, 2, 3, 0.05
PS = (2, 4)
MAX_NORM = 0.5  # below the gradients' norm at every step (checked): every step is clipped
# 1F1B beside every schedule with W actions (auto runs interleaved, two stages per rank)
SCHEDULES = {
    name: SCHEDULE_CLASSES[name]
    for name in ("1f1b", "zb-h1", "zb-h2", "interleaved-zb", "zb-v", "dualpipev")
} | {"auto": ppfast.ScheduleAuto}
CHUNKED = (toy_models.CHUNKED & set(SCHEDULES)) | {"auto"}


class First(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.proj_in = nn.Linear(DIM, DIM)
        self.block = TransformerBlock(DIM)

    def forward(self, ids):
        x = self.embed(ids)
        return self.block(x + torch.tanh(self.proj_in(x)))


class Middle(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = TransformerBlock(DIM)

    def forward(self, x):
        return self.block(x)


class Last(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = TransformerBlock(DIM)
        self.norm = nn.LayerNorm(DIM)
        self.proj_out = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, x):
        x = self.norm(self.block(x))
        return self.head(x + torch.tanh(self.proj_out(x)))


def build(num_stages: int) -> list[nn.Module]:
    """The stage modules of the one-device model: each tie is one shared Parameter."""
    torch.manual_seed(0)
    stages = [First(), *(Middle() for _ in range(num_stages - 2)), Last()]
    stages[-1].head.weight = stages[0].embed.weight
    stages[-1].proj_out.weight = stages[0].proj_in.weight
    return stages


TIES = {"wte": ("embed.weight", "head.weight"), "proj": ("proj_in.weight", "proj_out.weight")}


def untie(stages: list[nn.Module], seed: int = 1) -> None:
    """Give the last stage its own copies of the tied weights, with other values."""
    g = torch.Generator().manual_seed(seed)
    last = stages[-1]
    for name in ("head", "proj_out"):
        layer = getattr(last, name)
        layer.weight = nn.Parameter(torch.randn(layer.weight.shape, generator=g))


def loss_fn(logits, target):
    return F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))


def batch(m: int, step: int):
    g = torch.Generator().manual_seed(100 * step + m)
    n = m * MICROBATCH
    return (
        torch.randint(0, VOCAB, (n, SEQ), generator=g),
        torch.randint(0, VOCAB, (n, SEQ), generator=g),
    )


def optimizer(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def grads_of(stages: dict[int, nn.Module], main: bool) -> dict:
    return {
        s: {
            n: (p.main_grad if main else p.grad).detach().clone() for n, p in mod.named_parameters()
        }
        for s, mod in stages.items()
    }


def main_grad_step(opt, params) -> None:
    """The optimizer step of mixed-precision training: it reads the fp32 main grads."""
    for q in params:
        assert q.grad is None, "every gradient should have reached main_grad"
        q.grad = q.main_grad
    opt.step()
    for q in params:
        q.grad = None
        q.main_grad.zero_()


def params_of(stages: dict[int, nn.Module]) -> dict:
    return {s: {n: p.detach().clone() for n, p in m.named_parameters()} for s, m in stages.items()}


@functools.cache
def reference(num_stages: int, m: int, max_norm: float | None = None) -> dict:
    # tiny ops: with more than one thread the hand-offs cost more than the math
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference(num_stages, m, max_norm)
    finally:
        torch.set_num_threads(threads)


def _reference(num_stages: int, m: int, max_norm: float | None) -> dict:
    """Per step the losses and {stage: grads}, then {stage: params}, on one device; with
    ``max_norm`` the gradients are clipped to it (and the norms kept) before the optimizer."""
    stages = build(num_stages)
    model = nn.Sequential(*stages)
    opt = optimizer(model.parameters())
    out = {"losses": [], "grads": [], "outputs": []}
    if max_norm is not None:
        out["norms"] = []
    for step in range(STEPS):
        ids, target = batch(m, step)
        opt.zero_grad()
        losses = []
        for x, y in zip(ids.chunk(m), target.chunk(m), strict=True):
            loss = loss_fn(model(x), y)
            (loss / m).backward()
            losses.append(loss.item())
        if max_norm is not None:  # the tied weights are one Parameter here: counted once
            out["norms"].append(float(nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        out["losses"].append(losses)
        out["outputs"].append(None)
        out["grads"].append(grads_of(dict(enumerate(stages)), main=False))
        opt.step()
    out["params"] = params_of(dict(enumerate(stages)))
    return out


# ---------------------------------------------------------------------------- one rank


def placement(schedule: str, p: int, m: int) -> tuple[int, ...]:
    if schedule == "auto":
        return ppfast.generate("auto", p, m).stage_to_rank
    if schedule in V_PLACED:
        return ppfast.v_placement(p)
    return ppfast.loop_placement(p, 2 if schedule in CHUNKED else 1)


def megatron_hook(p: nn.Parameter) -> None:
    p.main_grad.add_(p.grad)
    p.grad = None


def train_rank(rank: int, p: int, schedule: str, variant: str, m: int) -> dict:
    n = 2 * p if schedule in CHUNKED else p
    stages = build(n)
    if variant != "one-object":
        untie(stages)
    where = placement(schedule, p, m)
    mine = [s for s, r in enumerate(where) if r == rank]
    held = {s: ppfast.nn.convert(stages[s]) for s in mine}
    # parameters some layer other than a split one uses: autograd writes their .grad
    by_autograd = {
        id(q)
        for mod in held.values()
        for layer in mod.modules()
        if not isinstance(layer, ppfast.nn.Linear)
        for q in layer.parameters(recurse=False)
    }
    params = list({id(q): q for mod in held.values() for q in mod.parameters()}.values())
    for q in params:
        q.main_grad = torch.zeros_like(q, dtype=torch.float32)
        if variant == "hooks" or id(q) in by_autograd:
            q.register_post_accumulate_grad_hook(megatron_hook)
    tied = {s: {} for s in mine}
    for key, (a, b) in TIES.items():
        if 0 in mine:
            tied[0][key] = stages[0].get_parameter(a)
        if n - 1 in mine:
            tied[n - 1][key] = stages[n - 1].get_parameter(b)
    pstages = [ppfast.PipelineStage(held[s], s, n, "cpu", tied=tied[s]) for s in mine]
    sched = SCHEDULES[schedule](pstages if len(pstages) > 1 else pstages[0], m, loss_fn, timeout=60)
    opt = optimizer(params)
    out = {"losses": [], "outputs": [], "grads": [], "stages": mine, "norms": [], "step_losses": []}
    for step in range(STEPS):
        ids, target = batch(m, step)
        losses: list = []
        sched.step(
            *((ids,) if 0 in mine else ()),
            target=target if n - 1 in mine else None,
            losses=losses,
            share_loss=True,
        )
        out["step_losses"].append(sched.last_metrics.loss)  # on every rank
        # clipped by the norm of the whole model, the tied weights counted once (main grads);
        # given the stages rather than the schedule, the ranks agree on the tied owners first
        clipped = pstages if variant == "hooks" else sched
        out["norms"].append(float(ppfast.clip_grad_norm_(clipped, MAX_NORM)))
        out["losses"].append([float(x) for x in losses])
        out["outputs"].append(None)
        out["grads"].append(grads_of(held, main=True))
        main_grad_step(opt, params)
    out["params"] = params_of(held)
    return out


def refused(rank: int, p: int) -> str:
    """A tie whose owners disagree on shape: every rank refuses it at its first step."""
    stages = build(p)
    untie(stages)
    mine = [rank]
    tied = {0: {"wte": stages[0].embed.weight}, p - 1: {"wte": stages[-1].proj_out.weight}}
    stage = ppfast.PipelineStage(stages[rank], rank, p, "cpu", tied=tied.get(rank))
    sched = ppfast.ScheduleZBH1(stage, p, loss_fn, timeout=20)
    ids, target = batch(p, 0)
    try:
        sched.step(*((ids,) if 0 in mine else ()), target=target if p - 1 in mine else None)
    except ValueError as e:
        return str(e)
    return "accepted"


def configs(p: int) -> list[tuple[str, str, int]]:
    out = [(s, "hooks", 2 * p) for s in SCHEDULES]
    out += [(s, "direct", 2 * p) for s in SCHEDULES if s != "1f1b"]
    out += [(s, "one-object", 2 * p) for s in sorted(V_PLACED)]
    return out


def train_all(rank: int, p: int, todo: list) -> dict:
    results = {"refused": refused(rank, p)}
    for cfg in todo:
        try:
            results[cfg] = train_rank(rank, p, *cfg)
        except Exception as e:
            raise RuntimeError(f"rank {rank}, (schedule, variant, m) = {cfg}") from e
    return results


@pytest.fixture(scope="module")
def group_run():
    def build(p: int, backend: str = "gloo") -> dict:
        todo = configs(p)
        # nccl_emu: the c10d transport (and the tie sums) over NCCL's semantics
        env = {"PPFAST_TRANSPORT": "c10d"} if backend == "nccl_emu" else {}
        # generous: p = 4 puts four ranks on what may be two busy cores
        per_rank = run_ranks(train_all, p, todo, timeout=240.0, backend=backend, env=env)
        got = {"refused": [r["refused"] for r in per_rank]}
        for cfg in todo:
            n = 2 * p if cfg[0] in CHUNKED else p
            got[cfg] = merge_ranks([r[cfg] for r in per_rank], n - 1)
        return got

    return run_once(build)


def test_every_reference_step_is_clipped():
    for n in (2, 4, 8):
        assert all(x > MAX_NORM for x in reference(n, n, MAX_NORM)["norms"]), n


@pytest.mark.parametrize("p", PS)
def test_mismatched_tie_is_refused_on_every_rank_before_compute(group_run, p):
    for rank, text in enumerate(group_run(p)["refused"]):
        assert "'wte'" in text and "different shapes" in text, (rank, text)


@pytest.mark.parametrize(("schedule", "variant"), [c[:2] for c in configs(2)])
@pytest.mark.parametrize("p", PS)
def test_tied_split_backward_matches_one_device(group_run, p, schedule, variant):
    n = 2 * p if schedule in CHUNKED else p
    got = group_run(p)[(schedule, variant, 2 * p)]
    assert_matches(got, reference(n, 2 * p, MAX_NORM), RTOL, ATOL, outputs=False)


@pytest.mark.parametrize(("schedule", "variant"), [c[:2] for c in configs(2)])
def test_tied_split_backward_over_nccl_emu(group_run, schedule, variant):
    """The same at p = 2 through the c10d transport on nccl_emu (NCCL's matching)."""
    p = 2
    n = 2 * p if schedule in CHUNKED else p
    got = group_run(p, "nccl_emu")[(schedule, variant, 2 * p)]
    assert_matches(got, reference(n, 2 * p, MAX_NORM), RTOL, ATOL, outputs=False)
