"""Tied weights across stages under ppfast.Pipe (ranks as threads), and the mistakes refused.

The model and the one-device reference are those of tests/distributed/test_split_backward.py
(an embedding tied to the head, an input projection tied to an output projection, every
stage converted, fp32 main grads used by the optimizer); here the ranks are threads and the
tied gradients are summed under a barrier. fp32, rtol=1e-5, atol=1e-6, 3 optimizer steps.
"""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import ppfast

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import test_split_backward as tsb  # noqa: E402
from ranks import record_ranks  # noqa: E402
from toy_models import assert_matches  # noqa: E402

from ppfast.model.ties import ThreadTies  # noqa: E402
from ppfast.runtime.errors import PipelineCommError  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
TIED = [("0.embed.weight", "{last}.head.weight"), ("0.proj_in.weight", "{last}.proj_out.weight")]


pytestmark = pytest.mark.usefixtures("one_thread")


def tied_names(n: int) -> list[tuple[str, str]]:
    return [tuple(name.format(last=n - 1) for name in group) for group in TIED]


def train_pipe(schedule: str, p: int, variant: str, m: int) -> dict:
    n = 2 * p if schedule in tsb.CHUNKED else p
    stages = tsb.build(n)
    if variant != "one-object":
        tsb.untie(stages)
    held = [ppfast.nn.convert(s) for s in stages]
    by_autograd = {
        id(q)
        for mod in held
        for layer in mod.modules()
        if not isinstance(layer, ppfast.nn.Linear)
        for q in layer.parameters(recurse=False)
    }
    params = list({id(q): q for mod in held for q in mod.parameters()}.values())
    for q in params:
        q.main_grad = torch.zeros_like(q)
        if variant == "hooks" or id(q) in by_autograd:
            q.register_post_accumulate_grad_hook(tsb.megatron_hook)
    options = {}
    if schedule == "auto":
        options["program"] = ppfast.generate("auto", p, m)
    pipe = ppfast.Pipe(
        held, ["cpu"] * p, chunks=m, schedule=schedule, loss_fn=tsb.loss_fn, timeout=30,
        tied=tied_names(n), **options,
    )  # fmt: skip
    opt = tsb.optimizer(params)
    got = {"losses": [], "outputs": [], "grads": [], "norms": [[]], "step_losses": [[]] * p}
    for step in range(tsb.STEPS):
        ids, target = tsb.batch(m, step)
        losses: list = []
        pipe.step(ids, target=target, losses=losses, share_loss=True)
        for r, metrics in enumerate(pipe.last_metrics):  # every rank has the step's loss
            got["step_losses"][r] = [*got["step_losses"][r], metrics.loss]
        got["norms"][0].append(float(ppfast.clip_grad_norm_(pipe, tsb.MAX_NORM)))
        got["losses"].append([float(x) for x in losses])
        got["outputs"].append(None)
        got["grads"].append(tsb.grads_of(dict(enumerate(held)), main=True))
        tsb.main_grad_step(opt, params)
    got["params"] = tsb.params_of(dict(enumerate(held)))
    return got


@pytest.mark.parametrize(
    ("schedule", "p", "variant"),
    [("1f1b", 2, "hooks"), ("zb-h1", 2, "direct"), ("zb-h1", 4, "hooks"), ("zb-h2", 2, "direct"),
     ("interleaved-zb", 2, "hooks"), ("zb-v", 2, "direct"), ("zb-v", 2, "one-object"),
     ("dualpipev", 2, "hooks"), ("dualpipev", 2, "one-object"), ("auto", 2, "direct")],
)  # fmt: skip
def test_pipe_with_tied_weights_matches_one_device(schedule, p, variant):
    m = 2 * p
    n = 2 * p if schedule in tsb.CHUNKED else p
    got = train_pipe(schedule, p, variant, m)
    assert_matches(got, tsb.reference(n, m, tsb.MAX_NORM), RTOL, ATOL, outputs=False)


def test_tied_copies_start_from_the_first_stage_and_end_equal():
    stages = [ppfast.nn.convert(s) for s in tsb.build(2)]
    tsb.untie(stages)
    first, last = stages[0].embed.weight, stages[1].head.weight
    start = first.detach().clone()
    assert not torch.equal(first, last)
    pipe = ppfast.Pipe(stages, ["cpu"] * 2, chunks=2, schedule="zb-h1", loss_fn=tsb.loss_fn,
                       tied=tied_names(2))  # fmt: skip
    pipe.step(*tsb.batch(2, 0)[:1], target=tsb.batch(2, 0)[1])
    torch.testing.assert_close(first, start, rtol=0, atol=0)
    torch.testing.assert_close(last, start, rtol=0, atol=0)
    assert torch.equal(first.grad, last.grad)  # one sum, bit for bit, on both owners


def test_pipe_refuses_one_parameter_on_two_ranks():
    stages = tsb.build(2)  # head.weight is embed.weight: one object, two threads
    with pytest.raises(ValueError, match=r"stages 0 \(\w+.weight\) and 1 .* share one Param"):
        ppfast.Pipe(stages, ["cpu"] * 2, chunks=2, loss_fn=tsb.loss_fn)


@pytest.mark.parametrize(
    ("tied", "error", "words"),
    [
        ("0.embed.weight", TypeError, "groups of names"),
        ([("0.embed.weight",)], ValueError, "a tie needs two"),
        ([("0.embed.weight", "x.head.weight")], ValueError, "'<stage>.<parameter name>'"),
        ([("0.embed.weight", "1.nope")], ValueError, "stage 1 has no parameter 'nope'"),
        ([("0.embed.weight", "0.proj_in.weight")], ValueError, "one Parameter"),
    ],
)
def test_pipe_refuses_bad_tie_names(tied, error, words):
    stages = tsb.build(2)
    tsb.untie(stages)
    with pytest.raises(error, match=words):
        ppfast.Pipe(stages, ["cpu"] * 2, chunks=2, loss_fn=tsb.loss_fn, tied=tied)


# The waits below could only end by a failing rank waking them: their timeout is NEVER.
NEVER = 1e6
# Not a timing: only what keeps a broken abort (a wait that never ends) from hanging the suite.
HANG_GUARD = 60.0


def in_thread(fn) -> BaseException | None:
    """What ``fn()`` raised (None if it returned), run in a thread that must end."""
    out: list = [None]

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out[0] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(HANG_GUARD)
    assert not t.is_alive(), "still waiting: nothing woke it"
    return out[0]


def test_mismatched_tie_is_refused_at_the_first_step_before_any_compute():
    stages = [ppfast.nn.convert(s) for s in tsb.build(2)]
    tsb.untie(stages)
    before = [q.detach().clone() for s in stages for q in s.parameters()]
    pipe = ppfast.Pipe(stages, ["cpu"] * 2, chunks=2, schedule="zb-h1", loss_fn=tsb.loss_fn,
                       tied=[("0.embed.weight", "1.proj_out.weight")], timeout=NEVER)  # fmt: skip
    calls = []  # every module's forward, on either rank
    for m in (m for s in stages for m in s.modules()):
        m.register_forward_pre_hook(lambda mod, args: calls.append(mod))
    ranks = record_ranks(pipe)
    ids, target = tsb.batch(2, 0)
    err = in_thread(lambda: pipe.step(ids, target=target))
    assert isinstance(err, ValueError), err
    assert re.search(r"'0.embed.weight'.*stage 0: \[24, 16\].*stage 1: \[16", str(err)), err
    assert calls == []
    # both ranks compare the same declarations; the first to raise aborts the group, so the
    # other raises the same ValueError or, woken by that abort, names the failure of another
    assert any(isinstance(e, ValueError) for e in ranks.values()), ranks
    for e in ranks.values():
        assert (
            isinstance(e, ValueError)
            and str(e) == str(err)
            or (isinstance(e, PipelineCommError) and "another rank failed" in str(e))
        ), ranks
    after = [q.detach() for s in stages for q in s.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(q.grad is None for s in stages for q in s.parameters())


def test_stage_checks_its_tied_argument():
    stages = tsb.build(2)
    with pytest.raises(TypeError, match="dict of name"):
        ppfast.PipelineStage(stages[0], 0, 2, tied=[stages[0].embed.weight])
    with pytest.raises(TypeError, match="must be an nn.Parameter"):
        ppfast.PipelineStage(stages[0], 0, 2, tied={"wte": stages[0].embed.weight.detach()})
    with pytest.raises(ValueError, match="not a parameter of this stage's module"):
        ppfast.PipelineStage(stages[0], 0, 2, tied={"wte": nn.Parameter(torch.zeros(1))})


def test_a_key_only_one_stage_declares_is_refused():
    stages = [ppfast.nn.convert(s) for s in tsb.build(2)]
    tsb.untie(stages)
    hub = ppfast._C.Hub(1)
    stage = ppfast.PipelineStage(stages[0], 0, 1, tied={"wte": stages[0].embed.weight})
    sched = ppfast.ScheduleGPipe(
        stage, 2, lambda out, target: out.float().mean(),
        transport=ppfast._C.InProcessTransport(hub, 0),
    )  # fmt: skip
    with pytest.raises(ValueError, match="'wte' is declared only by stage 0"):
        sched.step(tsb.batch(2, 0)[0])


def test_ranks_waiting_to_sum_give_up_when_one_fails():
    group = ThreadTies(2, timeout=NEVER)
    barrier = group.group._barrier

    def wait():
        group.bind(0).gather({})

    def abort_once_waiting():
        while barrier.n_waiting == 0:  # rank 0 is inside the wait when the abort comes
            threading.Event().wait(0.001)
        group.abort()

    aborter = threading.Thread(target=abort_once_waiting, daemon=True)
    aborter.start()
    err = in_thread(wait)
    assert isinstance(err, PipelineCommError), err
    assert err.rank == 0 and "another rank failed" in str(err)


def test_pipe_with_ties_trains_again_after_a_failed_step():
    stages = [ppfast.nn.convert(s) for s in tsb.build(2)]
    tsb.untie(stages)
    state = {"bad": True}

    def loss_fn(out, target):
        if state["bad"]:
            raise RuntimeError("raised on purpose")
        return tsb.loss_fn(out, target)

    pipe = ppfast.Pipe(stages, ["cpu"] * 2, chunks=2, schedule="zb-h1", loss_fn=loss_fn,
                       tied=tied_names(2), timeout=10)  # fmt: skip
    ids, target = tsb.batch(2, 0)
    with pytest.raises(RuntimeError, match="on purpose"):
        pipe.step(ids, target=target)
    state["bad"] = False
    for s in stages:
        s.zero_grad(set_to_none=True)
    pipe.step(ids, target=target)
    assert torch.equal(stages[0].embed.weight.grad, stages[1].head.weight.grad)
