"""The stages one process holds, and the process group that reaches the other stages' ranks."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..training.stage import PipelineStage


@dataclass(frozen=True)
class Held:
    """One stage this process holds: its index, its module, its tied parameters, its group."""

    index: int
    num_stages: int
    module: nn.Module
    tied: dict
    group: object | None


def held(stages) -> list[Held]:
    """This process's stages, by index: PipelineStage(s), a schedule or Pipe holding them, or
    plain modules (a list of them is the whole model's stages, in order)."""
    if not isinstance(stages, nn.Module) and hasattr(stages, "schedules"):  # ppfast.Pipe
        stages = [s for sched in stages.schedules for s in sched.stages]
    elif not isinstance(stages, nn.Module) and hasattr(stages, "stages"):  # a schedule
        stages = stages.stages
    if isinstance(stages, (PipelineStage, nn.Module)):
        stages = [stages]
    stages = list(stages)
    if stages and all(isinstance(s, PipelineStage) for s in stages):
        out = [Held(s.stage_index, s.num_stages, s.submod, s.tied, s.group) for s in stages]
    elif stages and all(isinstance(s, nn.Module) for s in stages):
        out = [Held(i, len(stages), m, {}, None) for i, m in enumerate(stages)]
    else:
        raise TypeError(
            "stages must be a PipelineStage, a list of them, a schedule or ppfast.Pipe holding "
            "them, or a list of every stage's nn.Module in order"
        )
    out.sort(key=lambda h: h.index)
    if len({h.index for h in out}) != len(out):
        raise ValueError(f"stage indices repeat: {[h.index for h in out]}; pass each once")
    if len({h.num_stages for h in out}) != 1:
        raise ValueError("the stages disagree on num_stages; pass stages of one pipeline")
    return out


def spread(held: list[Held]) -> bool:
    """Whether other processes hold some of the pipeline's stages."""
    return len(held) < held[0].num_stages


def group_of(held: list[Held], group):
    """The process group to reach the other stages' ranks."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            f"this process holds stages {[h.index for h in held]} of {held[0].num_stages} and "
            "torch.distributed is not initialized, so the others cannot be reached: call this "
            "on every rank after dist.init_process_group, or pass every stage (e.g. a Pipe)"
        )
    return group or held[0].group or dist.group.WORLD


def all_gather(obj, group) -> list:
    """Every rank's ``obj``, in rank order."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
