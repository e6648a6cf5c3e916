"""Pipeline x data parallel: a GPT-2-small-shaped decoder on gloo ranks matches one device.

The model (tests/distributed/gpt2.py): 12 blocks, 32 wide, 2 heads, vocabulary 96, 16
positions, the head tied to the token embedding. Every run trains it for three SGD (momentum)
steps on a global batch of 8 microbatches of 2 sequences; the one-device reference trains
the whole model on the same 8 microbatches, each loss divided by 8. Before each optimizer step
the gradients are clipped by their global norm (``ppfast.clip_grad_norm_`` over the stages and,
for FSDP's shards, the replicas; torch's ``clip_grad_norm_`` on one device), in order 2, 1 or
inf by variant, to a limit below the norm. Per-microbatch losses, every rank's norm and the
parameters after the last step must match: fp32, rtol=1e-5, atol=1e-6.

- PP=2 x DP=2 on 4 ranks (``ppfast.parallel.pipeline_mesh``): each replica runs 4
  microbatches, its share of the global batch; ``DataParallelGrads`` averages over the two
  replicas. Under 1F1B (2 stages) and ZB-V (4 stages, two per rank, V placement): gradients
  posted while the pipeline still runs (overlap) and all at the end; Linear layers converted to
  ``ppfast.nn.Linear`` (split backward) with fp32 main grads; torch's ZeroRedundancyOptimizer
  over the data-parallel group; gradients accumulated over two steps with ``no_sync``; and,
  instead of ``DataParallelGrads``, each stage module wrapped in DistributedDataParallel
  (with and without accumulation in ``ddp.no_sync()``) or sharded with FSDP's
  ``fully_shard`` (1F1B, and ZB-H1 with split layers). Both replicas must end bit-identical.
- PP=2 on 2 ranks, 8 microbatches, under 1F1B and ZB-V (converted).

The head's weight is the embedding's: where the first and last stage are on different ranks
each holds a copy, declared tied; under ZB-V rank 0 holds both as one Parameter. Tied
gradients are summed over owners by the schedule, then averaged over replicas.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import gpt2
import pytest
import torch
import torch.nn.functional as F
from ranks import run_once, run_ranks
from test_split_backward import main_grad_step, megatron_hook

import ppfast
import ppfast.parallel

RTOL, ATOL = 1e-5, 1e-6
CFG = gpt2.GPT2Config()
# clip_grad_norm_'s limit per order: below the gradients' norm at every step (checked)
MAX_NORMS = {1.0: 50.0, 2.0: 0.5, math.inf: 0.03}
# clip_grad_norm_'s order per variant (2 elsewhere)
NORM_TYPES = {"zero-1": math.inf, "ddp": 1.0, "fsdp": math.inf}
MICROBATCH, GLOBAL_MB, STEPS, LR = 2, 8, 3, 0.05
BUCKET_MB = 0.02  # a few blocks per bucket, so that several are posted during the step
SCHEDULES = {
    "1f1b": ppfast.Schedule1F1B,
    "zb-h1": ppfast.ScheduleZBH1,
    "zb-v": ppfast.ScheduleZBVZeroBubble,
}

# (schedule, variant); variants: "plain" (DataParallelGrads, overlap), "no-overlap",
# "split" (converted Linear layers), "split+main-grad" (and fp32 main grads),
# "zero-1" (ZeroRedundancyOptimizer over the data-parallel group), "no-sync" (two steps of
# half the microbatches per optimizer step, the first inside DataParallelGrads.no_sync())
PP_DP = [
    ("1f1b", "plain"),
    ("1f1b", "zero-1"),
    # accumulating over two steps: under 1F1B the tie's owners are on two ranks, under ZB-V
    # one Parameter on one rank
    ("1f1b", "no-sync"),
    # each stage module wrapped in DistributedDataParallel over the data-parallel group,
    # without DataParallelGrads; with and without accumulation in ddp.no_sync()
    ("1f1b", "ddp"),
    ("1f1b", "ddp+no-sync"),
    # each block and each stage module sharded with FSDP's fully_shard over the data-parallel
    # group; under ZB-H1 with split Linear layers (weight gradients in W, before FSDP reduces)
    ("1f1b", "fsdp"),
    ("zb-h1", "fsdp+split"),
    ("zb-v", "no-sync"),
    ("zb-v", "split"),
    ("zb-v", "split+main-grad"),
    ("zb-v", "split+no-overlap"),
    # the loss is the global batch's token mean: padding (-100) falls unevenly between the
    # replicas, and the count of tokens is summed over them (BatchLoss with dp_group)
    ("1f1b", "tokens"),
    ("zb-v", "tokens+split"),
]
PP_ONLY = [("1f1b", "plain"), ("zb-v", "split")]


def optimizer(params, dp_group, zero: bool):
    if zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(
            params, torch.optim.SGD, process_group=dp_group, lr=LR, momentum=0.9
        )
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def train_rank(mesh, schedule: str, variant: str) -> dict:
    """One configuration on this rank: per step its losses and the buckets posted before
    reduce(), and its parameters (by name in the whole model) after the last step."""
    n = 4 if schedule == "zb-v" else 2
    m = GLOBAL_MB // mesh.dp_size
    where = ppfast.v_placement(2) if schedule == "zb-v" else ppfast.loop_placement(2, 1)
    mine = [s for s, r in enumerate(where) if r == mesh.pp_rank]
    model = gpt2.GPT2(CFG)
    ddp, fsdp = "ddp" in variant, "fsdp" in variant
    wrap = None
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        def wrap(mod):
            return DistributedDataParallel(mod, process_group=mesh.dp_group)

    if fsdp:
        from torch.distributed.fsdp import fully_shard

        def wrap(mod):
            for block in mod.blocks:
                fully_shard(block, mesh=mesh.device_mesh["dp"])
            return fully_shard(mod, mesh=mesh.device_mesh["dp"])

    stages = gpt2.pipeline_stages(
        model, n, mine, mesh.pp_group, convert="split" in variant, wrap=wrap
    )
    params = list({id(q): q for s in stages for q in s.submod.parameters()}.values())
    main = "main-grad" in variant
    if main:
        by_autograd = {
            id(q)
            for s in stages
            for layer in s.submod.modules()
            if not isinstance(layer, ppfast.nn.Linear)
            for q in layer.parameters(recurse=False)
        }
        for q in params:
            q.main_grad = torch.zeros_like(q)
            if id(q) in by_autograd:  # before the reducer's hooks, so that these run first
                q.register_post_accumulate_grad_hook(megatron_hook)
    # "no-sync": each optimizer step accumulates two steps of half the microbatches
    parts = 2 if "no-sync" in variant else 1
    loss_fn = gpt2.loss_fn
    if "tokens" in variant:
        loss_fn = ppfast.BatchLoss(token_share, count_tokens, dp_group=mesh.dp_group)
    sched = SCHEDULES[schedule](stages if len(stages) > 1 else stages[0], m // parts, loss_fn)
    if ddp or fsdp:
        reducer = None
    else:
        reducer = ppfast.parallel.DataParallelGrads(
            sched, mesh.dp_group, bucket_mb=BUCKET_MB, overlap="no-overlap" not in variant
        )

    def no_sync():
        if reducer is not None:
            return reducer.no_sync()
        stack = contextlib.ExitStack()
        for s in stages:
            stack.enter_context(s.submod.no_sync())
        return stack

    opt = optimizer(params, mesh.dp_group, variant == "zero-1")
    out = {"losses": [], "posted": [], "norms": [], "step_losses": []}
    for step in range(STEPS):
        ids, target = mesh.shard(*step_batch(step, "tokens" in variant))
        if not main:
            opt.zero_grad()
        losses: list = []
        for part, (x, y) in enumerate(zip(ids.chunk(parts), target.chunk(parts), strict=True)):
            with no_sync() if part < parts - 1 else contextlib.nullcontext():
                sched.step(
                    *((x,) if 0 in mine else ()), target=y if n - 1 in mine else None,
                    losses=losses, share_loss=True, loss_dp_group=mesh.dp_group,
                )  # fmt: skip
                out["step_losses"].append(sched.last_metrics.loss)
        if reducer is not None:
            reducer.reduce()
        if parts > 1:  # each step took the mean over its own microbatches
            for q in params:
                q.grad.div_(parts)
        # the norm of the whole model: every stage, FSDP's shards summed over the replicas
        order = NORM_TYPES.get(variant, 2.0)
        norm = ppfast.clip_grad_norm_(sched, MAX_NORMS[order], order, dp_group=mesh.dp_group)
        out["norms"].append(float(norm))
        out["losses"].append([float(x) for x in losses])
        out["posted"].append(reducer.posted_before_reduce if reducer else None)
        if main:
            main_grad_step(opt, params)
        else:
            opt.step()
    out["buckets"] = len(reducer.buckets) if reducer else None
    out["params"] = {
        name: t.full_tensor() if fsdp else t for name, t in gpt2.named_params(model, params).items()
    }
    return out


def run_group(rank: int, world: int, dp: int, todo: list) -> dict:
    """Every configuration in turn on one mesh (pp=2 x dp); all ranks walk the same list."""
    results = {}
    if dp > 1:
        try:
            ppfast.parallel.pipeline_mesh(pp=3, dp=dp, device_type="cpu")
            results["refused"] = "accepted"
        except ValueError as e:
            results["refused"] = str(e)
    mesh = ppfast.parallel.pipeline_mesh(pp=2, dp=dp, device_type="cpu")
    import torch.distributed as dist

    results["layout"] = (
        mesh.pp_rank,
        mesh.dp_rank,
        dist.get_process_group_ranks(mesh.pp_group),
        dist.get_process_group_ranks(mesh.dp_group),
    )
    for cfg in todo:
        try:
            results[cfg] = train_rank(mesh, *cfg)
        except Exception as e:
            raise RuntimeError(f"rank {rank}, (schedule, variant) = {cfg}") from e
    results["ddp"] = refuse_ddp(mesh)
    return results


def refuse_ddp(mesh) -> str:
    from torch.nn.parallel import DistributedDataParallel

    split = DistributedDataParallel(ppfast.nn.Linear(2, 2), process_group=mesh.dp_group)
    try:
        ppfast.PipelineStage(split, 0, 2, "cpu", group=mesh.pp_group)
        return "a DDP module with split layers was accepted"
    except TypeError as e:
        if "ddp.module" not in str(e):
            return f"stage: {e}"
    ddp = DistributedDataParallel(torch.nn.Linear(2, 2), process_group=mesh.dp_group)
    try:
        ppfast.parallel.DataParallelGrads(ddp, mesh.dp_group)
    except ValueError as e:
        return str(e)
    return "accepted"


def step_batch(step: int, padded: bool):
    """The global batch; ``padded``: the first half of the sequences (the first replica's)
    count only their first quarter of tokens, the rest are -100."""
    ids, target = gpt2.batch(CFG, GLOBAL_MB * MICROBATCH, step)
    if padded:
        target = target.clone()
        target[: len(target) // 2, CFG.seq // 4 :] = -100
    return ids, target


def count_tokens(targets) -> dict:
    return {"num_items_in_batch": sum(int((t != -100).sum()) for t in targets)}


def token_share(logits, target, num_items_in_batch):
    """This microbatch's share of the batch's token mean."""
    flat = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, target.reshape(-1), reduction="sum") / num_items_in_batch


@functools.cache
def reference(norm_type: float = 2.0, tokens: bool = False) -> dict:
    """The whole model on one device, on the global batch's 8 microbatches, its gradients
    clipped to its MAX_NORMS in ``norm_type`` before each step. ``tokens``: padded, and the
    loss is the global batch's token mean (each microbatch's loss: its share of it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = gpt2.GPT2(CFG)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        losses, norms = [], []
        for step in range(STEPS):
            ids, target = step_batch(step, tokens)
            total = count_tokens([target])["num_items_in_batch"]
            opt.zero_grad()
            step_losses = []
            for x, y in zip(ids.chunk(GLOBAL_MB), target.chunk(GLOBAL_MB), strict=True):
                if tokens:
                    loss = token_share(model(x), y, total)
                    loss.backward()
                else:
                    loss = gpt2.loss_fn(model(x), y)
                    (loss / GLOBAL_MB).backward()
                step_losses.append(loss.item())
            losses.append(step_losses)
            norms.append(
                float(
                    torch.nn.utils.clip_grad_norm_(
                        model.parameters(), MAX_NORMS[norm_type], norm_type
                    )
                )
            )
            opt.step()
        return {"losses": losses, "norms": norms, "params": gpt2.named_params(model)}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def group_run():
    """Each mesh's results, run once on first use; a failure is kept and raised again."""

    def build(dp: int, backend: str = "gloo") -> list:
        todo = PP_DP if dp > 1 else PP_ONLY
        # nccl_emu: the pipeline's c10d transport and the DP reductions with NCCL's semantics
        env = {"PPFAST_TRANSPORT": "c10d"} if backend == "nccl_emu" else {}
        # generous: four ranks on what may be two busy cores
        return run_ranks(run_group, 2 * dp, dp, todo, timeout=240.0, backend=backend, env=env)

    return run_once(build)


def merge(per_rank: list[dict], cfg, dp: int) -> list[dict]:
    """Per replica: its losses (from the rank holding the last stage) and all its parameters;
    a name two ranks hold (a tied copy) must have one value."""
    replicas = []
    for d in range(dp):
        ranks = [r for r in per_rank if r["layout"][1] == d]
        got = {"losses": [[] for _ in range(STEPS)], "params": {}}
        for r in ranks:
            res = r[cfg]
            for k in range(STEPS):
                got["losses"][k] += res["losses"][k]
            for name, t in res["params"].items():
                if name in got["params"]:
                    torch.testing.assert_close(t, got["params"][name], rtol=0, atol=0)
                got["params"][name] = t
        replicas.append(got)
    return replicas


def check(per_rank: list[dict], cfg, dp: int) -> None:
    tokens = "tokens" in cfg[1]
    want = reference(NORM_TYPES.get(cfg[1], 2.0), tokens)
    # every rank was told each step's mean loss over all replicas (share_loss, loss_dp_group)
    reps = merge(per_rank, cfg, dp)
    parts = 2 if "no-sync" in cfg[1] else 1
    per = GLOBAL_MB // dp // parts
    means = [
        sum(sum(rep["losses"][k][j * per : (j + 1) * per]) / per for rep in reps) / dp
        for k in range(STEPS)
        for j in range(parts)
    ]
    if tokens:  # the replicas' losses are shares of one global token mean: summed
        means = [sum(sum(rep["losses"][k]) for rep in reps) for k in range(STEPS)]
    for rank, r in enumerate(per_rank):
        torch.testing.assert_close(
            torch.tensor(r[cfg]["step_losses"]), torch.tensor(means), rtol=RTOL, atol=ATOL,
            msg=lambda e, rank=rank: f"rank {rank}'s step losses: {e}",
        )  # fmt: skip
    for rank, r in enumerate(per_rank):  # every rank has the one norm of the whole model
        torch.testing.assert_close(
            torch.tensor(r[cfg]["norms"]), torch.tensor(want["norms"]), rtol=RTOL, atol=ATOL,
            msg=lambda e, rank=rank: f"rank {rank}'s gradient norms: {e}",
        )  # fmt: skip
    replicas = merge(per_rank, cfg, dp)
    losses = [sum((rep["losses"][k] for rep in replicas), []) for k in range(STEPS)]
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(want["losses"]), rtol=RTOL, atol=ATOL
    )
    for d, rep in enumerate(replicas):
        assert sorted(rep["params"]) == sorted(want["params"]), f"replica {d}: parameter names"
        for name, t in want["params"].items():
            torch.testing.assert_close(
                rep["params"][name],
                t,
                rtol=RTOL,
                atol=ATOL,
                msg=lambda e, d=d, name=name: f"replica {d}, {name} after {STEPS} steps: {e}",
            )
        if d:  # every replica takes the same all-reduced gradients: no drift at all
            for name, t in rep["params"].items():
                assert torch.equal(t, replicas[0]["params"][name]), f"replicas differ at {name}"


@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("norm_type", sorted(set(NORM_TYPES.values()) | {2.0}))
def test_every_reference_step_is_clipped(norm_type, tokens):
    assert all(x > MAX_NORMS[norm_type] for x in reference(norm_type, tokens)["norms"])


@pytest.mark.parametrize(("schedule", "variant"), PP_DP)
def test_pp2_dp2_matches_one_device(group_run, schedule, variant):
    per_rank = group_run(2)
    check(per_rank, (schedule, variant), dp=2)
    for r in per_rank:
        res = r[(schedule, variant)]
        if variant.split("+")[0] in ("ddp", "fsdp"):
            continue  # DDP or FSDP reduced: nothing of DataParallelGrads to check
        assert res["posted"][0] == 0, "the first step is measured, not overlapped"
        if "no-overlap" in variant:
            assert res["posted"] == [0] * STEPS
        else:
            # tied weights leave in reduce(), after the schedule summed them; the rest may not
            assert all(0 < k <= res["buckets"] for k in res["posted"][1:]), res


@pytest.mark.parametrize(("schedule", "variant"), PP_ONLY)
def test_pp2_matches_one_device(group_run, schedule, variant):
    check(group_run(1), (schedule, variant), dp=1)


def test_mesh_layout_is_pipeline_major(group_run):
    per_rank = group_run(2)
    for rank, r in enumerate(per_rank):
        pp_rank, dp_rank, pp_ranks, dp_ranks = r["layout"]
        assert (pp_rank, dp_rank) == (rank // 2, rank % 2)
        assert pp_ranks == [dp_rank, dp_rank + 2]
        assert dp_ranks == [2 * pp_rank, 2 * pp_rank + 1]
        assert "pp=3 x dp=2 = 6 ranks, but the job has 4" in r["refused"], r["refused"]
        assert "DistributedDataParallel" in r["ddp"] and "unwrap" in r["ddp"], r["ddp"]


def test_mesh_needs_an_initialized_job(monkeypatch):
    if torch.distributed.is_initialized():
        pytest.skip("this process already belongs to a group")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        ppfast.parallel.pipeline_mesh(pp=2, dp=2)
    with pytest.raises(ValueError, match="dp must be a positive int"):
        ppfast.parallel.pipeline_mesh(pp=2, dp=0)
    monkeypatch.setitem(os.environ, "WORLD_SIZE", "8")
    with pytest.raises(ValueError, match="pp=2 x dp=3 = 6 ranks, but the job has 8"):
        ppfast.parallel.pipeline_mesh(pp=2, dp=3)


@pytest.mark.parametrize(("schedule", "variant"), PP_DP)
def test_pp2_dp2_over_nccl_emu(group_run, schedule, variant):
    """The same on nccl_emu: pipeline and data-parallel groups with NCCL's semantics."""
    check(group_run(2, "nccl_emu"), (schedule, variant), dp=2)
