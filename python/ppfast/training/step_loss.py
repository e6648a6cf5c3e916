"""The step's loss on every rank of the pipeline, for logging (``step(..., share_loss=True)``).

The loss is computed on the rank holding the last stage. Sharing it costs one broadcast of two
numbers from there over the pipeline's group (the loss, and whether it is a share of a loss
counted over the replicas), and with ``loss_dp_group`` one all-reduce over the replicas:
averaged, or summed where each replica's loss is its share of one global token mean.
"""

from __future__ import annotations

import torch

from ..runtime.collectives import all_reduce, wait
from ..runtime.errors import PipelineCommError


def step_loss(sched) -> torch.Tensor | None:
    """The last step's loss on the rank holding the last stage (None elsewhere): the mean of
    the microbatch losses, or their sum for a loss that weighs microbatches itself."""
    last = next((s for s in sched.stages if s.is_last), None)
    if last is None:
        return None
    total = torch.stack([x.detach().float().reshape(()) for x in last.losses()]).sum()
    return total if sched._weighed_over else total / sched.n_microbatches


def share_step_loss(sched, dp_group) -> None:
    """Put the last step's loss into ``sched.last_metrics.loss`` on every rank (``sched``: a
    PipelineSchedule)."""
    import torch.distributed as dist

    if not sched._transport_from_group():
        raise ValueError(
            "share_loss needs the pipeline's process group; with ppfast.Pipe use "
            "pipe.step(..., share_loss=True)"
        )
    mine = step_loss(sched)
    value = torch.zeros(2, device=sched.stages[0].device)
    if mine is not None:
        value[0] = mine
        value[1] = float(sched._weighed_over > 1)
    holder = sched._runner.program.stage_to_rank[-1]
    rank = sched._runner.rank

    def fail(why: str, timed_out: bool) -> PipelineCommError:
        return PipelineCommError(f"rank {rank}: {why}", rank, "share_loss", holder, timed_out)

    group = sched._group()
    src = dist.get_global_rank(group, holder)
    work = dist.broadcast(value, src, group=group, async_op=True)
    wait(work, sched.timeout, fail, "sharing the step's loss")
    summed = bool(value[1] > 0)
    loss = value[:1].clone()
    if dp_group is not None:
        all_reduce(
            loss,
            dp_group,
            sched.timeout,
            "share_loss",
            "averaging the step's loss over the replicas",
        )
        if not summed:
            loss /= dist.get_world_size(dp_group)
    sched.last_metrics.loss = float(loss)
