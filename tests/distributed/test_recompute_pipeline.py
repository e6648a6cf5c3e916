"""Activation checkpointing on every stage, under every schedule, on gloo ranks.

The model: toy_models' transformer stack (4 pre-norm blocks of width 16), cut into the
schedule's stages (2 blocks per stage with one stage per rank, 1 with two). Every schedule
of ``ppfast.schedule_names()`` runs at p = 2, m = 4, two SGD (momentum) steps, in three
configurations, all in one process group:

- "ckpt": every block of every stage checkpointed (``checkpoint_blocks(stage, TransformerBlock)``);
- "ckpt+split": the same, converted to ``ppfast.nn.Linear``, so the schedules with W defer
  the weight gradients of the recomputed Linears to W;
- "split": converted, not checkpointed (the memory baseline).

Checked against the one-device model, unconverted and not checkpointed, with the same
microbatches: per-microbatch losses, the last stage's outputs, every gradient at every step
and the parameters after the last step, fp32, rtol=1e-5, atol=1e-6. Also: each checkpointed
block runs twice per microbatch (forward, and one recomputation in its I or B; W recomputes
nothing), split layers' W ran deferred work from the recomputation and every stage's
weight-grad store ends each step empty, and the peak bytes each rank keeps for backward
(``ActivationMeter`` over the rank's stage modules) are lower with checkpointing (the numbers
are printed).
"""

from __future__ import annotations

import functools

import pytest
import torch
from ranks import run_ranks
from toy_models import (
    SEQ,
    TransformerBlock,
    assert_matches,
    batch,
    build_blocks,
    loss_fn_of,
    make_optimizer,
    merge_ranks,
    reference,
    split_stages,
    stage_state,
)

import ppfast
from ppfast.recompute import ActivationMeter, checkpoint_blocks, checkpointed

RTOL, ATOL = 1e-5, 1e-6
P, M, STEPS, BLOCKS = 2, 4, 2, 4
MODEL = "transformer"
SCHEDULES = ppfast.schedule_names()
CONFIGS = {"ckpt": (True, False), "ckpt+split": (True, True), "split": (False, True)}


def schedule_class(name: str) -> type[ppfast.PipelineSchedule]:
    classes = {c.schedule_name: c for c in ppfast.PipelineSchedule.__subclasses__()}
    assert name in classes, f"no PipelineSchedule class runs {name!r}"
    return classes[name]


def layout(name: str) -> tuple[int, tuple[int, ...], bool]:
    """Number of stages, stage -> rank, and whether the program has W actions."""
    prog = ppfast.generate(name, P, M)
    has_w = any(x.kind is ppfast.Kind.W for acts in prog.ranks for a in acts for x in a.parts())
    return prog.num_stages, prog.stage_to_rank, has_w


def train_rank(rank: int, schedule: str, config: str) -> dict:
    ckpt, split = CONFIGS[config]
    n, where, _ = layout(schedule)
    chains = split_stages(build_blocks(MODEL, BLOCKS), n)
    mine = [s for s, r in enumerate(where) if r == rank]
    runs = {"blocks": 0}
    for s in mine:
        if ckpt:
            checkpoint_blocks(chains[s], TransformerBlock)
            assert checkpointed(chains[s]) == [f"blocks.{i}" for i in range(len(chains[s].blocks))]
        if split:
            ppfast.nn.convert(chains[s])
        for block in chains[s].blocks:
            # the first thing a block runs, in forward and again when it is recomputed
            block.ln1.register_forward_pre_hook(
                lambda *_: runs.__setitem__("blocks", runs["blocks"] + 1)
            )
    stages = [ppfast.PipelineStage(chains[s], s, n, "cpu") for s in mine]
    deferred = {"work": 0}
    for st in stages:
        flush = st.weight_store.flush

        def counted(mb, store=st.weight_store, flush=flush):
            deferred["work"] += len(store.pending().get(mb, []))
            flush(mb)

        st.weight_store.flush = counted
    sched = schedule_class(schedule)(
        stages if len(stages) > 1 else stages[0], M, loss_fn_of(MODEL), timeout=60
    )
    meter = ActivationMeter(*(chains[s] for s in mine))
    opt = make_optimizer([q for s in mine for q in chains[s].parameters()])
    out = {"losses": [], "outputs": [], "grads": [], "stages": mine}
    for step in range(STEPS):
        inputs, target = batch(MODEL, M, step)
        opt.zero_grad()
        losses: list = []
        result = sched.step(
            *(inputs if 0 in mine else ()),
            target=target if n - 1 in mine else None,
            losses=losses,
        )
        for st in stages:
            assert st.weight_store.pending() == {}, (schedule, config, st.weight_store.pending())
        assert meter.live == 0, f"{meter.live} bytes still held for backward after the step"
        out["losses"].append([float(x) for x in losses])
        out["outputs"].append(result)
        out["grads"].append(stage_state({s: chains[s] for s in mine}, "grad"))
        opt.step()
    meter.remove()
    out["params"] = stage_state({s: chains[s] for s in mine}, "param")
    out["peak"] = meter.peak
    out["block_runs"] = runs["blocks"]
    out["blocks"] = sum(len(chains[s].blocks) for s in mine)
    out["deferred"] = deferred["work"]
    out["w_actions"] = sum(
        x.kind is ppfast.Kind.W for a in sched.program.ranks[rank] for x in a.parts()
    )
    return out


def train_all(rank: int, world_size: int) -> dict:
    results = {}
    for schedule in SCHEDULES:
        for config in CONFIGS:
            try:
                results[(schedule, config)] = train_rank(rank, schedule, config)
            except Exception as e:
                raise RuntimeError(f"rank {rank}, schedule {schedule}, {config}") from e
    return results


@pytest.fixture(scope="module")
def group_run():
    """Every rank's results, from one process group (pytest keeps a failure for every test)."""
    return run_ranks(train_all, P, timeout=240.0)


@functools.cache
def reference_of(num_stages: int) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reference(MODEL, BLOCKS, M, num_stages, seqs=(SEQ,) * STEPS)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("config", ["ckpt", "ckpt+split"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_checkpointed_stages_match_one_device(group_run, schedule, config):
    n, _, _ = layout(schedule)
    got = merge_ranks([r[(schedule, config)] for r in group_run], n - 1)
    assert_matches(got, reference_of(n), RTOL, ATOL)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_each_block_is_recomputed_once_per_backward(group_run, schedule):
    n, _, has_w = layout(schedule)
    for rank, per_rank in enumerate(group_run):
        for config, (ckpt, split) in CONFIGS.items():
            r = per_rank[(schedule, config)]
            # forward once per microbatch, recomputed once more in its I or B (never in W)
            want = r["blocks"] * M * STEPS * (2 if ckpt else 1)
            assert r["block_runs"] == want, (rank, config, r["block_runs"], want)
            if split and has_w:
                # every W ran the work its I queued: 2 Linears for each block of the stage
                want = r["w_actions"] * (BLOCKS // n) * 2 * STEPS
                assert r["w_actions"] and r["deferred"] == want, (rank, config, r["deferred"], want)
            else:
                assert r["deferred"] == 0, (rank, config, r["deferred"])


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_checkpointing_lowers_saved_activation_bytes(group_run, schedule, capsys):
    line = []
    for rank, per_rank in enumerate(group_run):
        with_ckpt = per_rank[(schedule, "ckpt+split")]["peak"]
        without = per_rank[(schedule, "split")]["peak"]
        assert per_rank[(schedule, "ckpt")]["peak"] == with_ckpt, "nn.Linear and split differ"
        line.append(f"rank {rank} {without:,} -> {with_ckpt:,} B ({with_ckpt / without:.0%})")
        assert 0 < with_ckpt < without, (rank, with_ckpt, without)
    with capsys.disabled():
        print(f"\n  {schedule}: peak bytes saved for backward, " + "; ".join(line), end="")
