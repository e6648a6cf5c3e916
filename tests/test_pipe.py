"""ppfast.Pipe (ranks as threads, in-process transport) matches one-device training.

Same check as tests/distributed/test_equivalence.py, in one process: every schedule, 2 to 4
ranks, the three models there, m in {p, 2p, 2p+1}; per-microbatch losses, every gradient at
every step, and the parameters after 3 optimizer steps, fp32 with rtol=1e-5 and atol=1e-6
(torch.testing.assert_close). dualpipev at m = p is not run: it needs m >= 2p and must say
so with a ValueError, which is checked instead. Also: dynamic_shapes lets the sequence
length change between steps, and a failing rank makes step raise its error at once (the
others are told by it, not by their timeout).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

import ppfast

# the models and the reference live beside the multi-process tests, which import them by name
sys.path.insert(0, str(Path(__file__).parent / "distributed"))
from ranks import record_ranks  # noqa: E402
from toy_models import (  # noqa: E402
    CHUNKED,
    MODELS,
    SCHEDULE_CLASSES,
    SEQ,
    STEPS,
    assert_matches,
    assert_states_close,
    batch,
    build_blocks,
    loss_fn_of,
    make_optimizer,
    mse_loss,
    reference,
    split_stages,
    stage_state,
)

RTOL, ATOL = 1e-5, 1e-6
SCHEDULES = tuple(SCHEDULE_CLASSES)  # Pipe takes the names
M_CASES = {"m=p": lambda p: p, "m=2p": lambda p: 2 * p, "m=2p+1": lambda p: 2 * p + 1}


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def reference_of(model: str, p: int, m: int, stages: int) -> dict:
    return reference(model, 2 * p, m, stages)


@pytest.mark.parametrize("m_case", list(M_CASES))
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("p", (2, 3, 4))
def test_pipe_matches_one_device(p, schedule, model, m_case):
    m = M_CASES[m_case](p)
    n = 2 * p if schedule in CHUNKED else p
    chains = split_stages(build_blocks(model, 2 * p), n)
    if schedule == "dualpipev" and m < 2 * p:
        pipe = ppfast.Pipe(chains, ["cpu"] * p, chunks=m, schedule=schedule, loss_fn=mse_loss)
        inputs, target = batch(model, m, 0)
        with pytest.raises(ValueError, match=rf"at least {2 * p}\b"):
            pipe.step(*inputs, target=target, losses=[])
        pytest.skip(f"{schedule} needs m >= 2p; m={m} is rejected with a ValueError")
    pipe = ppfast.Pipe(
        chains, ["cpu"] * p, chunks=m, schedule=schedule, loss_fn=loss_fn_of(model), timeout=30
    )
    opt = make_optimizer([q for c in chains for q in c.parameters()])
    stages = dict(enumerate(chains))
    got = {"losses": [], "outputs": [], "grads": []}
    for k in range(STEPS):
        inputs, target = batch(model, m, k)
        opt.zero_grad()
        losses: list = []
        got["outputs"].append(pipe.step(*inputs, target=target, losses=losses))
        got["losses"].append([float(x) for x in losses])
        got["grads"].append(stage_state(stages, "grad"))
        opt.step()
    got["params"] = stage_state(stages, "param")
    inputs, target = batch(model, m, STEPS)
    losses = []
    got["eval"] = {"outputs": pipe.eval(*inputs, target=target, losses=losses)}
    got["eval"]["losses"] = [float(x) for x in losses]
    # evaluation leaves the gradients of the last step as they were
    assert_states_close(stage_state(stages, "grad"), got["grads"][-1], "grads", 0.0, 0.0)
    assert_matches(got, reference_of(model, p, m, n), RTOL, ATOL)


@pytest.mark.parametrize(
    "schedule, model, m", [("1f1b", "transformer", 3), ("zb-v", "two-stream", 6)]
)
def test_pipe_dynamic_shapes(schedule, model, m):
    p, seqs = 3, (SEQ, 4, 8)
    n = 2 * p if schedule in CHUNKED else p
    chains = split_stages(build_blocks(model, 2 * p), n)
    pipe = ppfast.Pipe(
        chains, ["cpu"] * p, chunks=m, schedule=schedule, loss_fn=loss_fn_of(model),
        timeout=30, dynamic_shapes=True,
    )  # fmt: skip
    opt = make_optimizer([q for c in chains for q in c.parameters()])
    stages = dict(enumerate(chains))
    got = {"losses": [], "outputs": [], "grads": []}
    for k, seq in enumerate(seqs):
        inputs, target = batch(model, m, k, seq=seq)
        opt.zero_grad()
        losses: list = []
        got["outputs"].append(pipe.step(*inputs, target=target, losses=losses))
        got["losses"].append([float(x) for x in losses])
        got["grads"].append(stage_state(stages, "grad"))
        opt.step()
    got["params"] = stage_state(stages, "param")
    # evaluation agrees shapes at every call: a batch of another sequence length is fine
    inputs, target = batch(model, m, len(seqs), seq=seqs[-1])
    losses = []
    got["eval"] = {"outputs": pipe.eval(*inputs, target=target, losses=losses)}
    got["eval"]["losses"] = [float(x) for x in losses]
    want = reference(model, 2 * p, m, n, seqs=seqs)
    assert_matches(got, want, RTOL, ATOL)


class Raises(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("raised by the middle stage on purpose")


def test_pipe_failures_raise_the_cause_at_once():
    # A failing rank aborts the others: each raises a PipelineCommError that says who failed,
    # not one that says it timed out (their timeout is longer than the whole test takes).
    timeout = 120.0
    chains = split_stages(build_blocks("transformer", 3), 3)
    (x,), y = batch("transformer", 3, 0)
    (x4,), y4 = batch("transformer", 3, 1, seq=4)
    pipe = ppfast.Pipe(chains, ["cpu"] * 3, chunks=3, loss_fn=mse_loss, timeout=timeout)
    pipe.step(x, target=y)
    # a shape change without dynamic_shapes is refused before any rank starts
    ranks = record_ranks(pipe)
    with pytest.raises(ValueError, match="dynamic_shapes=True"):
        pipe.step(x4, target=y4)
    assert ranks == {}, ranks
    cases = [
        (
            ppfast.Pipe(chains, ["cpu"] * 3, chunks=3, loss_fn=lambda o, t: o - t, timeout=timeout),
            2,
            ValueError,
            "scalar",
        ),
        (
            ppfast.Pipe([chains[0], Raises(), chains[2]], ["cpu"] * 3, chunks=3,
                        loss_fn=mse_loss, timeout=timeout),
            1,
            RuntimeError,
            "on purpose",
        ),
    ]  # fmt: skip
    for pipe, failing, error, words in cases:
        ranks = record_ranks(pipe)
        with pytest.raises(error, match=words):
            pipe.step(x, target=y)
        assert sorted(ranks) == [0, 1, 2], ranks
        assert isinstance(ranks.pop(failing), error)
        for r, e in ranks.items():
            assert isinstance(e, ppfast.PipelineCommError), (r, e)
            assert e.rank == r and e.timed_out is False, (r, e)
            assert f"rank {failing} failed: rank {failing} raised: " in str(e), (r, e)
            assert words in str(e), (r, e)


def test_pipe_usable_after_a_rejected_batch():
    chains = split_stages(build_blocks("mlp", 2), 2)
    pipe = ppfast.Pipe(chains, ["cpu"] * 2, chunks=4, loss_fn=mse_loss, timeout=10)
    (x,), y = batch("mlp", 3, 0)  # 6 samples do not split into 4 microbatches
    with pytest.raises(ValueError, match="n_microbatches=4"):
        pipe.step(x, target=y)
    (x,), y = batch("mlp", 4, 0)
    losses: list = []
    pipe.step(x, target=y, losses=losses)
    assert len(losses) == 4


def test_pipe_trains_again_after_a_step_failed_midway():
    # a non-scalar loss fails on the last rank after stage 0 has already sent; the next step
    # starts on a fresh hub and matches the one-device reference
    chains = split_stages(build_blocks("mlp", 2), 2)
    state = {"bad": True}

    def loss_fn(out, target):
        loss = (out - target).square()
        return loss if state["bad"] else loss.mean()

    pipe = ppfast.Pipe(chains, ["cpu"] * 2, chunks=2, loss_fn=loss_fn, timeout=10)
    (x,), y = batch("mlp", 2, 0)
    with pytest.raises(ValueError, match="scalar"):
        pipe.step(x, target=y)
    state["bad"] = False
    for c in chains:
        c.zero_grad(set_to_none=True)
    losses: list = []
    pipe.step(x, target=y, losses=losses)
    assert len(losses) == 2 and all(torch.isfinite(v) for v in losses)
