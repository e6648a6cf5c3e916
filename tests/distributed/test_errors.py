"""Bad input fails with a clear error, before any communication where it can be known there;
a rank that fails or dies makes every other rank raise PipelineCommError, never hang.

Three process groups: one for the errors every rank can see before sending anything (after
which the same group must still train correctly, so nothing was sent), one for a shape
change only the first stage's rank can see, and one where a rank dies in the middle of a
step. Nothing here measures time. A rank that can learn of a failure is given a timeout far
longer than the test takes (LONG), and its error must say it was told (``timed_out`` False,
the message naming the rank that gave up or died): had it only given up at its timeout, the
flag would say so. A rank that cannot learn of it must time out (``timed_out`` True) naming
the peer it waited for.
"""

from __future__ import annotations

import os
import re

import pytest
from ranks import run_ranks
from toy_models import (
    SEQ,
    assert_matches,
    batch,
    build_blocks,
    merge_ranks,
    mse_loss,
    reference,
    split_stages,
    train_rank,
)

import ppfast

RTOL, ATOL = 1e-5, 1e-6
# the timeout of a rank that must hear of a failure rather than wait it out: far beyond how long
# the test takes, so a rank that waited it out would fail the test (run_ranks allows RUN_LIMIT)
LONG = 120
RUN_LIMIT = LONG + 90.0
DYNAMIC_SEQS = (SEQ, 4, 8)
DYNAMIC_CASES = (("1f1b", "transformer", 2), ("zb-v", "two-stream", 4))


def attempt(fn) -> dict:
    """What fn raised, as plain values the parent can check."""
    try:
        fn()
    except Exception as e:
        return {
            "type": type(e).__name__,
            "message": str(e),
            "comm": isinstance(e, ppfast.PipelineCommError),
            "program_error": isinstance(e, ppfast.ProgramError),
            "value_error": isinstance(e, ValueError),
            "rank": getattr(e, "rank", None),
            "action": getattr(e, "action", None),
            "peer": getattr(e, "peer", None),
            "timed_out": getattr(e, "timed_out", None),
        }
    return {"type": None}


def one_step(sched, rank: int, stages: list[int], num_stages: int, inputs, target):
    return lambda: sched.step(
        *(inputs if 0 in stages else ()), target=target if num_stages - 1 in stages else None
    )


def mlp_stages(num_stages: int, held: list[int], **kw) -> list[ppfast.PipelineStage]:
    chains = split_stages(build_blocks("mlp", num_stages), num_stages)
    return [ppfast.PipelineStage(chains[s], s, num_stages, "cpu", **kw) for s in held]


# ---------------------------------------------------------------------------- group A: 2 ranks


def early_errors(rank: int, p: int) -> dict:
    assert p == 2
    out = {}
    (x,), y = batch("mlp", 3, 0)  # 6 samples: not 4 microbatches
    sched = ppfast.Schedule1F1B(mlp_stages(2, [rank])[0], 4, mse_loss, timeout=5)
    out["indivisible"] = attempt(one_step(sched, rank, [rank], 2, (x,), y))
    # the same schedule then takes a batch that does split
    (x,), y = batch("mlp", 4, 0)
    out["retry"] = attempt(one_step(sched, rank, [rank], 2, (x,), y))

    (x,), y = batch("mlp", 2, 0)
    # 3 stages on 2 ranks, one each: stage 2 has no rank
    sched = ppfast.Schedule1F1B(mlp_stages(3, [rank])[0], 2, mse_loss, timeout=5)
    out["stages-do-not-fit"] = attempt(one_step(sched, rank, [rank], 3, (x,), y))
    # 1F1B runs one stage per rank, not two
    held = [rank, rank + 2]
    sched = ppfast.Schedule1F1B(mlp_stages(4, held), 2, mse_loss, timeout=5)
    out["two-stages-for-1f1b"] = attempt(one_step(sched, rank, held, 4, (x,), y))
    # zb-v places rank r's stages at r and 2p-1-r, not in a loop
    sched = ppfast.ScheduleZBVZeroBubble(mlp_stages(4, held), 4, mse_loss, timeout=5)
    (x4,), y4 = batch("mlp", 4, 0)
    out["loop-stages-for-zb-v"] = attempt(one_step(sched, rank, held, 4, (x4,), y4))

    held = [rank, 3 - rank]
    sched = ppfast.ScheduleDualPipeV(mlp_stages(4, held), 3, mse_loss, timeout=5)
    (x3,), y3 = batch("mlp", 3, 0)
    out["too-few-microbatches"] = attempt(one_step(sched, rank, held, 4, (x3,), y3))

    good = ppfast.generate("1f1b", 2, 2)
    rows = [list(acts) for acts in good.ranks]
    dropped = rows[1].pop()  # rank 1 loses its last backward
    bad = ppfast.Program(rows, good.stage_to_rank, good.num_microbatches)
    sched = ppfast.PipelineSchedule(mlp_stages(2, [rank])[0], 2, mse_loss, program=bad)
    out["bad-program"] = attempt(one_step(sched, rank, [rank], 2, (x,), y))
    out["dropped"] = str(dropped)

    # had any of the above sent something, this would receive it and go wrong
    out["healthy-after"] = train_rank(rank, p, "1f1b", "mlp", 2)
    for schedule, model, m in DYNAMIC_CASES:
        out[f"dynamic-{schedule}"] = train_rank(
            rank, p, schedule, model, m, seqs=DYNAMIC_SEQS, dynamic_shapes=True
        )

    # last: this one leaves a receive posted on rank 0 that nothing will complete
    sched = ppfast.Schedule1F1B(
        mlp_stages(2, [rank])[0], 2, lambda o, t: (o - t) ** 2, timeout=LONG
    )
    out["non-scalar-loss"] = attempt(one_step(sched, rank, [rank], 2, (x,), y))
    return out


@pytest.fixture(scope="module")
def early():
    return run_ranks(early_errors, 2, timeout=RUN_LIMIT)


def test_batch_that_does_not_split_into_microbatches(early):
    for rank, res in enumerate(early):
        got = res["indivisible"]
        # the first stage's rank sees the inputs, the last stage's rank the target
        assert got["value_error"] and not got["comm"], (rank, got)
        assert "n_microbatches=4" in got["message"], got["message"]
        assert res["retry"]["type"] is None, (rank, res["retry"])


@pytest.mark.parametrize(
    "case, words",
    [
        ("stages-do-not-fit", "3 stages do not fit a group of 2 ranks"),
        ("two-stages-for-1f1b", "1f1b runs 1 stage(s) per rank"),
        ("loop-stages-for-zb-v", "holds stages"),
    ],
)
def test_stages_that_do_not_fit_the_group(early, case, words):
    for rank, res in enumerate(early):
        got = res[case]
        assert got["type"] == "ValueError", (rank, got)
        assert words in got["message"], got["message"]


def test_fewer_microbatches_than_the_schedule_needs(early):
    for rank, res in enumerate(early):
        got = res["too-few-microbatches"]
        assert got["type"] == "ValueError", (rank, got)
        assert "at least 4" in got["message"], got["message"]


def test_invalid_program(early):
    for rank, res in enumerate(early):
        got = res["bad-program"]
        assert got["program_error"], (rank, got)
        assert "rank 1" in got["message"], got["message"]
        assert res["dropped"] in got["message"], got["message"]


def test_early_errors_sent_nothing(early):
    got = merge_ranks([r["healthy-after"] for r in early], 1)
    assert_matches(got, reference("mlp", 4, 2, 2), RTOL, ATOL)


@pytest.mark.parametrize("schedule, model, m", DYNAMIC_CASES)
def test_dynamic_shapes_follow_the_sequence_length(early, schedule, model, m):
    n = 4 if schedule == "zb-v" else 2
    got = merge_ranks([r[f"dynamic-{schedule}"] for r in early], n - 1)
    want = reference(model, 4, m, n, seqs=DYNAMIC_SEQS)
    assert_matches(got, want, RTOL, ATOL)


def test_loss_must_be_scalar(early):
    last = early[1]["non-scalar-loss"]
    assert last["type"] == "ValueError" and "scalar" in last["message"], last
    # rank 0, waiting for the gradient, is told at once why rank 1 gave up: not its timeout
    first = early[0]["non-scalar-loss"]
    assert first["comm"], first
    assert (first["rank"], first["peer"]) == (0, 1), first
    assert first["action"], first
    assert first["timed_out"] is False, first
    assert "rank 1 gave up" in first["message"] and "scalar" in first["message"], first


# ---------------------------------------------------------------------------- group B: 3 ranks


SHORT = 3  # rank 1's timeout: it cannot learn of rank 0's error and must wait it out


def shape_change(rank: int, p: int) -> list[dict]:
    chains = split_stages(build_blocks("transformer", p), p)
    stage = ppfast.PipelineStage(chains[rank], rank, p, "cpu")
    # rank 2 waits for rank 1, which gives up at its short timeout and tells rank 2 so
    sched = ppfast.Schedule1F1B(stage, 3, mse_loss, timeout=SHORT if rank == 1 else LONG)
    outs = []
    for k, seq in enumerate((SEQ, SEQ - 2)):
        (x,), y = batch("transformer", 3, k, seq=seq)
        outs.append(attempt(one_step(sched, rank, [rank], p, (x,), y)))
    # Rank 0's transport must outlive this function: a closed one is a peer gone, which its
    # peers are told of at once (over shared memory its lock goes), and this test is of the
    # case where nothing tells rank 1.
    _KEEP.append(sched)
    return outs


_KEEP: list = []


def test_shape_change_without_dynamic_shapes():
    results = run_ranks(shape_change, 3, timeout=RUN_LIMIT)
    assert all(r[0]["type"] is None for r in results), [r[0] for r in results]
    first = results[0][1]
    assert first["type"] == "ValueError", first
    assert "dynamic_shapes=True" in first["message"], first["message"]
    for rank in (1, 2):
        got = results[rank][1]
        assert got["comm"], (rank, got)
        assert (got["rank"], got["peer"]) == (rank, rank - 1), got
        assert got["action"], got
    # rank 0 raised before its step began, so nothing tells rank 1: it waits out its timeout
    got = results[1][1]
    assert got["timed_out"] is True, got
    assert f"timed out after {SHORT}" in got["message"] and "(peer: rank 0)" in got["message"], got
    # rank 2 is told by rank 1 when it gives up, long before its own timeout
    got = results[2][1]
    assert got["timed_out"] is False, got
    assert "rank 1 gave up: rank 1, action" in got["message"], got


# ---------------------------------------------------------------------------- group C: 3 ranks

# How a survivor learns that rank 1 died: the shared-memory transport checks the lock each
# peer holds on its inbox; over c10d, gloo's connection to it breaks, or its beats stop.
DEATH = {
    "shm": r"rank 1 \(pid \d+ in its own PID namespace\) has exited",
    "c10d": r"Connection (reset|closed) by peer|Broken pipe|rank 1 has not been heard from",
}


def die_mid_step(rank: int, p: int, schedule: str, transport: str) -> list[dict]:
    """Rank 1 exits inside its first stage's forward of the second microbatch of step 2."""
    v = 2 if schedule == "interleaved-1f1b" else 1
    n = v * p
    chains = split_stages(build_blocks("mlp", n), n)
    held = [s for s, r in enumerate(ppfast.loop_placement(p, v)) if r == rank]
    state = {"step": 0, "calls": 0}

    def exit_on_second_microbatch(module, args):
        if state["step"] == 1:
            state["calls"] += 1
            if state["calls"] == 2:
                os._exit(1)

    if rank == 1:
        chains[1].register_forward_pre_hook(exit_on_second_microbatch)
    stages = [ppfast.PipelineStage(chains[s], s, n, "cpu") for s in held]
    cls = ppfast.Schedule1F1B if schedule == "1f1b" else ppfast.ScheduleInterleaved1F1B
    sched = cls(stages if v > 1 else stages[0], 6, mse_loss, timeout=LONG, transport=transport)
    outs = []
    for k in range(2):
        state["step"] = k
        (x,), y = batch("mlp", 6, k)
        outs.append(attempt(one_step(sched, rank, held, n, (x,), y)))
    return outs


@pytest.mark.parametrize("transport", ["shm", "c10d"])
@pytest.mark.parametrize("schedule", ["1f1b", "interleaved-1f1b"])
def test_a_rank_that_dies_mid_step(schedule, transport):
    results = run_ranks(die_mid_step, 3, schedule, transport, timeout=RUN_LIMIT, may_exit={1})
    assert results[1] is None, f"rank 1 was meant to exit during step 2: {results[1]}"
    for rank in (0, 2):
        first, second = results[rank]
        assert first["type"] is None, first
        assert second["comm"], (rank, second)
        assert second["rank"] == rank, second
        assert second["action"], second
        if schedule == "1f1b":
            # the dead rank is the only one these two exchange anything with
            assert second["peer"] == 1, second
        else:
            assert second["peer"] in {0, 1, 2} - {rank}, second
        assert f"rank {rank}" in second["message"], second["message"]
        # told of the death (directly, or by the other survivor giving up), long before LONG
        assert second["timed_out"] is False, second
        assert re.search(DEATH[transport], second["message"]), second["message"]
