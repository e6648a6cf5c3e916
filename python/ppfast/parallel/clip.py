"""Gradient clipping by the global norm of a pipelined model, across stages and replicas.

``ppfast.clip_grad_norm_(schedule, max_norm)`` is ``torch.nn.utils.clip_grad_norm_`` of the
unsplit model: the norm spans every stage of the pipeline (and, with ``dp_group``, the shards
of every replica), each weight counted once, and every rank scales its gradients by the same
factor. Call it where torch's would go: after the step and after the data-parallel reduction,
before the optimizer. Every rank of the pipeline (and of ``dp_group``) must call it.

- A tied weight (``PipelineStage(..., tied=...)``) has a copy on each owning stage, and after
  the step every copy holds the summed gradient; only the lowest owning stage's copy counts.
  A Parameter that two stages of one rank hold as one object counts once.
- The gradient of a parameter is its ``main_grad`` where it has one (an fp32 buffer kept by a
  mixed-precision optimizer), else its ``.grad``; that buffer is counted and scaled.
- Replicated gradients (DataParallelGrads, DDP, ZeroRedundancyOptimizer) are the same on
  every replica and count once. Gradients sharded over ``dp_group`` (FSDP's ``fully_shard``:
  DTensors with a Shard placement) are summed over it. Sharded gradients without
  ``dp_group`` are refused.
- It costs one all-reduce of one number over the pipeline group, and one over ``dp_group``
  when given: nothing is gathered. On ``ppfast.Pipe`` (ranks as threads) nothing is sent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..model.ties import TiedParameters, grad_buffer
from ..runtime.collectives import all_reduce, gather_objects
from ..runtime.errors import PipelineCommError
from ..training.pipe import Pipe
from ..training.pipeline import PipelineSchedule
from ..training.stage import PipelineStage

__all__ = ["clip_grad_norm_"]


@torch.no_grad()
def clip_grad_norm_(
    pipeline: PipelineSchedule | Pipe | PipelineStage | Sequence[PipelineStage],
    max_norm: float,
    norm_type: float = 2.0,
    dp_group=None,
    *,
    error_if_nonfinite: bool = False,
    timeout: float | None = None,
) -> torch.Tensor:
    """Scale the gradients of the whole pipelined model in place so that their global norm is
    at most ``max_norm``; return that norm (before scaling), the same on every rank.

    ``pipeline`` is this rank's schedule (after at least one step), a :class:`ppfast.Pipe`,
    or this rank's stage(s) (then the ranks first agree which of them owns each tied key,
    one small gather per call). ``norm_type`` is any p > 0, ``inf`` or ``-inf``.
    ``dp_group`` is the data-parallel group of the replicas when gradients are sharded over
    it. ``timeout`` (seconds) bounds every wait; the schedule's by default.
    """
    p = float(norm_type)
    if not (p > 0 or p == -math.inf):
        raise ValueError(f"norm_type must be a number > 0, inf or -inf; got {norm_type}")
    if isinstance(pipeline, Pipe):
        if dp_group is not None:
            raise ValueError("a ppfast.Pipe has no data-parallel replicas: drop dp_group")
        ranks = [_rank_grads(s, timeout, in_pipe=True) for s in pipeline.schedules]
        total = _combine([r.partial(p, dp=None) for r in ranks], p)
    else:
        ranks = [_rank_grads(pipeline, timeout)]
        # the replicas' shards of this rank's stages first, then over the pipeline's stages
        total = ranks[0].all_reduce(ranks[0].partial(p, dp=dp_group), p, ranks[0].group)
    norm = _finish(total, p).to(ranks[0].device)
    if error_if_nonfinite and not torch.isfinite(norm):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the pipeline's gradients is non-finite, so "
            "it cannot be clipped; pass error_if_nonfinite=False to scale them anyway (as "
            "torch.nn.utils.clip_grad_norm_ does)"
        )
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for r in ranks:
        r.scale(coef)
    return norm


class _RankGrads:
    """One rank's gradient buffers: which count toward the norm, which are sharded."""

    def __init__(self, buffers, counted, device, group, rank: int, timeout: float):
        self.buffers = buffers  # every distinct buffer, each scaled once
        self.counted = counted  # (local tensor, sharded) of the buffers the norm counts
        self.device = device
        self.group = group  # the pipeline's c10d group; None on one rank or in Pipe
        self.rank = rank
        self.timeout = timeout
        self.sharded = any(sharded for _, sharded in counted)

    def partial(self, p: float, dp) -> torch.Tensor:
        """This rank's share: sum of |g|^p (max or min of |g| for +-inf) over
        its counted gradients, the sharded ones first summed over ``dp``."""
        if self.sharded and dp is None:
            raise ValueError(
                "some gradients are sharded over data-parallel replicas (FSDP DTensors): pass "
                "dp_group= (the group they are sharded over) so that every shard counts"
            )
        repl = [t for t, sharded in self.counted if not sharded]
        shard = [t for t, sharded in self.counted if sharded]
        mine = _reduce_local(repl, p, self.device)
        if dp is None:
            return mine
        theirs = self.all_reduce(_reduce_local(shard, p, self.device), p, dp, what="replicas")
        return _combine([mine, theirs], p)

    def all_reduce(self, value: torch.Tensor, p: float, group, what: str = "stages"):
        if group is None:
            return value
        op = {math.inf: "max", -math.inf: "min"}.get(p, "sum")
        return all_reduce(
            value.clone(),
            group,
            self.timeout,
            "clip_grad_norm_",
            f"reducing the gradient norm over the {what}",
            op,
        )

    def scale(self, coef: torch.Tensor) -> None:
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in self.buffers:
            by_device.setdefault(t.device, []).append(t)
        for device, ts in by_device.items():
            torch._foreach_mul_(ts, coef.to(device))


def _rank_grads(pipeline, timeout: float | None, in_pipe: bool = False) -> _RankGrads:
    """This rank's buffers, and which count, from a schedule or from stages."""
    if isinstance(pipeline, PipelineSchedule):
        sched = pipeline
        if sched._runner is None:
            raise ValueError(
                "clip_grad_norm_ needs the schedule after a step (its gradients, and which "
                "rank owns each tied weight, are known from the first step on)"
            )
        stages = sched.stages
        rank = sched._runner.rank
        ties = next((h for h in sched._hooks if isinstance(h, TiedParameters)), None)
        owned = _owned_from_plans(ties, rank)
        group = sched._group() if sched._transport_from_group() else None
        if group is None and sched._rank_transport.size > 1 and not in_pipe:
            raise ValueError(
                "this schedule's transport was handed in, so its ranks cannot be reached for "
                "the norm; pass the ppfast.Pipe it belongs to, or a schedule over a process group"
            )
        timeout = sched.timeout if timeout is None else timeout
    else:
        stages = [pipeline] if isinstance(pipeline, PipelineStage) else list(pipeline)
        if not stages or not all(isinstance(s, PipelineStage) for s in stages):
            raise TypeError(
                "clip_grad_norm_ takes a PipelineSchedule, a ppfast.Pipe, or this rank's "
                f"PipelineStage(s); got {type(pipeline).__name__}"
            )
        import torch.distributed as dist

        group = stages[0].group or (dist.group.WORLD if dist.is_initialized() else None)
        rank = dist.get_rank(group) if group is not None else 0
        timeout = 300.0 if timeout is None else timeout
        owned = _owned_by_gather(stages, group, rank, timeout)
    seen: set[int] = set()
    buffers, counted = [], []
    for s in sorted(stages, key=lambda s: s.stage_index):
        for param in s.submod.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            buf = grad_buffer(param)
            if buf is None:
                continue
            local, sharded = _local_and_sharded(buf)
            buffers.append(local)
            if owned.get(id(param), True):
                counted.append((local, sharded))
    device = stages[0].device
    return _RankGrads(buffers, counted, device, group, rank, timeout)


def _owned_from_plans(ties: TiedParameters | None, rank: int) -> dict[int, bool]:
    """id(param) -> does this copy count: only the lowest owning stage's copy of a key."""
    owned: dict[int, bool] = {}
    if ties is None:
        return owned
    for key, held in ties.local.items():
        root_here = ties.plans[key].root == rank
        for i, (_, param) in enumerate(held):  # lowest stage first
            owned[id(param)] = owned.get(id(param), False) or (root_here and i == 0)
    return owned


def _owned_by_gather(stages, group, rank: int, timeout: float) -> dict[int, bool]:
    """The same as _owned_from_plans, for stages without their schedule: every rank of the
    group says which tied keys its stages hold (every rank gathers, holding some or not)."""
    lowest: dict[str, int] = {}
    for s in stages:
        for key in s.tied:
            lowest[key] = min(lowest.get(key, s.stage_index), s.stage_index)
    import torch.distributed as dist

    if group is not None and dist.get_world_size(group) > 1:

        def fail(why: str, timed_out: bool) -> PipelineCommError:
            return PipelineCommError(f"rank {rank}: {why}", rank, "clip_grad_norm_", -1, timed_out)

        for theirs in gather_objects(lowest, group, timeout, fail, "finding tied owners"):
            for key, stage in theirs.items():
                lowest[key] = min(lowest.get(key, stage), stage)
    owned: dict[int, bool] = {}
    for s in stages:
        for key, param in s.tied.items():
            owned[id(param)] = owned.get(id(param), False) or s.stage_index == lowest[key]
    return owned


def _local_and_sharded(buf: torch.Tensor) -> tuple[torch.Tensor, bool]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return buf, False
    if isinstance(buf, DTensor):
        return buf.to_local(), any(pl.is_shard() for pl in buf.placements)
    return buf, False


def _reduce_local(ts: list[torch.Tensor], p: float, device) -> torch.Tensor:
    """sum |t|^p (or max or min |t| for +-inf) over ``ts``, in fp32."""
    if not ts:
        empty = {math.inf: 0.0, -math.inf: math.inf}.get(p, 0.0)
        return torch.tensor(empty, dtype=torch.float32, device=device)
    norms = torch.stack(
        [torch.linalg.vector_norm(t, p, dtype=torch.float32).to(device) for t in ts]
    )
    if p == math.inf:
        return norms.max()
    if p == -math.inf:
        return norms.min()
    return norms.pow(p).sum()


def _combine(parts: list[torch.Tensor], p: float) -> torch.Tensor:
    parts = [t.to(parts[0].device) for t in parts]
    if p == math.inf:
        return torch.stack(parts).max()
    if p == -math.inf:
        return torch.stack(parts).min()
    return torch.stack(parts).sum()


def _finish(total: torch.Tensor, p: float) -> torch.Tensor:
    if p in (math.inf, -math.inf):
        return total
    return total.pow(1.0 / p)
