"""torch.compile'd stages (inductor, on CPU) train like eager ones, under every schedule.

The toy transformer (tests/distributed/toy_models.py, 2p blocks, Linear layers converted by
ppfast.nn.convert: split backward under the zero-bubble schedules) on 2 gloo ranks (and four
cases on 4 ranks, and three schedules in ppfast.Pipe, ranks as threads), three
ways: each block compiled (``block.compile()``), each block compiled and checkpointed
(``ppfast.recompute.checkpoint_blocks``), and each stage module compiled whole
(``torch.compile(stage)``). Every schedule takes two steps of m = 2p microbatches; the losses
and every gradient must equal the eager model on one device within fp32 rounding (inductor
fuses and reorders: rtol 1e-4, atol 1e-5). The split layers run eagerly inside compiled code
(see ppfast.nn.SplitLayer), the rest compiles.

torch.distributed.pipelining refuses compiled stages under its zero-bubble and DualPipeV
schedules; ppfast runs them.
"""

from __future__ import annotations

import functools

import pytest
import torch
import toy_models as tm
from ranks import run_once, run_ranks

import ppfast

pytest.importorskip("torch._inductor")

MODEL, P, STEPS = "transformer", 2, 2
RTOL, ATOL = 1e-4, 1e-5
VARIANTS = ("blocks", "blocks+checkpoint", "stage")


def _compiled(chain: torch.nn.Module, variant: str) -> torch.nn.Module:
    ppfast.nn.convert(chain)
    if "checkpoint" in variant:
        ppfast.recompute.checkpoint_blocks(chain, tm.TransformerBlock)
    if variant.startswith("blocks"):
        for block in chain.blocks:
            block.compile()
        return chain
    return torch.compile(chain)


def train_all(rank: int, p: int, todo: list) -> dict:
    out = {}
    for schedule, variant in todo:
        n = tm.num_stages_of(schedule, p)
        chains = tm.split_stages(tm.build_blocks(MODEL, 2 * p), n)
        mine = [s for s, r in enumerate(tm.placement(schedule, p)) if r == rank]
        held = {s: _compiled(chains[s], variant) for s in mine}
        stages = [ppfast.PipelineStage(held[s], s, n, "cpu") for s in mine]
        sched = tm.SCHEDULE_CLASSES[schedule](
            stages[0] if len(stages) == 1 else stages, 2 * p, tm.loss_fn_of(MODEL), timeout=120
        )
        got = {"losses": [], "grads": []}
        for step in range(STEPS):
            inputs, target = tm.batch(MODEL, 2 * p, step)
            losses: list = []
            sched.step(
                *(inputs if 0 in mine else ()),
                target=target if n - 1 in mine else None,
                losses=losses,
            )
            got["losses"].append([float(x) for x in losses])
            got["grads"].append(tm.stage_state({s: chains[s] for s in mine}, "grad"))
            for s in mine:
                chains[s].zero_grad(set_to_none=True)
        out[(schedule, variant)] = got
    from torch._dynamo.utils import counters

    out["graphs"] = counters["stats"]["unique_graphs"]  # dynamo did compile something
    return out


@functools.cache
def reference(schedule: str, p: int = P) -> dict:
    """Eager, one device, the same steps (gradients cleared between them, no optimizer)."""
    n = tm.num_stages_of(schedule, p)
    chains = tm.split_stages(tm.build_blocks(MODEL, 2 * p), n)
    model = torch.nn.Sequential(*chains)
    out = {"losses": [], "grads": []}
    for step in range(STEPS):
        inputs, target = tm.batch(MODEL, 2 * p, step)
        losses = []
        for x, y in zip(inputs[0].chunk(2 * p), target.chunk(2 * p), strict=True):
            loss = tm.loss_fn_of(MODEL)(model(x), y)
            (loss / (2 * p)).backward()
            losses.append(loss.item())
        out["losses"].append(losses)
        out["grads"].append(tm.stage_state(dict(enumerate(chains)), "grad"))
        model.zero_grad(set_to_none=True)
    return out


CASES = [(s, v) for s in tm.SCHEDULE_CLASSES for v in VARIANTS]
CASES_4 = [
    ("1f1b", "blocks"),
    ("zb-h1", "blocks+checkpoint"),
    ("zb-v", "stage"),
    ("interleaved-zb", "blocks"),
]


@pytest.fixture(scope="module")
def group_run():
    # compiling on two busy cores takes a while: one group runs every case in turn
    return run_once(lambda p=P: run_ranks(train_all, p, CASES if p == P else CASES_4, timeout=900))


def test_the_stages_did_compile(group_run):
    assert all(r["graphs"] > 0 for r in group_run())


@pytest.mark.parametrize(
    ("p", "schedule", "variant"), [(P, *c) for c in CASES] + [(4, *c) for c in CASES_4]
)
def test_compiled_stages_match_eager_one_device(group_run, p, schedule, variant):
    want = reference(schedule, p)
    per_rank = group_run(p)
    for step in range(STEPS):
        losses = next(
            r[(schedule, variant)]["losses"][step]
            for r in per_rank
            if r[(schedule, variant)]["losses"][step]
        )
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(want["losses"][step]), rtol=RTOL, atol=ATOL
        )
        for r in per_rank:
            for s, grads in r[(schedule, variant)]["grads"][step].items():
                for name, g in grads.items():
                    torch.testing.assert_close(
                        g,
                        want["grads"][step][s][name],
                        rtol=RTOL,
                        atol=ATOL,
                        msg=lambda e, s=s, n=name, k=step: f"step {k}, stage {s}, {n}: {e}",
                    )


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1", "zb-v"])
def test_compiled_blocks_in_pipe_match_eager(schedule):
    """ppfast.Pipe: the ranks are threads of this process, compiling and running side by side."""
    n = tm.num_stages_of(schedule, 2)
    chains = [_compiled(c, "blocks") for c in tm.split_stages(tm.build_blocks(MODEL, 4), n)]
    pipe = ppfast.Pipe(
        chains, ["cpu"] * 2, chunks=4, schedule=schedule, loss_fn=tm.loss_fn_of(MODEL), timeout=300
    )
    want = reference(schedule)
    for step in range(STEPS):
        inputs, target = tm.batch(MODEL, 4, step)
        losses: list = []
        pipe.step(*inputs, target=target, losses=losses)
        torch.testing.assert_close(
            torch.tensor([float(x) for x in losses]),
            torch.tensor(want["losses"][step]),
            rtol=RTOL,
            atol=ATOL,
        )
        for s, chain in enumerate(chains):
            for name, q in chain.named_parameters():
                torch.testing.assert_close(
                    q.grad, want["grads"][step][s][name], rtol=RTOL, atol=ATOL
                )
            chain.zero_grad(set_to_none=True)
