"""A stage whose module the user wrapped for data parallelism: DDP or FSDP (``fully_shard``).

Both reduce gradients from autograd hooks, timed for one forward and one backward per step.
A pipeline step runs several forwards before their backwards, so left alone they would reduce
partial gradients. The stage drives them as torch's PipelineStage does:

- DistributedDataParallel: every forward and every backward but the stage's last of the step
  run under ``no_sync()``; before the last one, DDP's reducer is prepared as its forward would
  have, so that backward reduces the step's whole gradient. A step run inside the caller's own
  ``ddp.no_sync()`` reduces nothing (gradient accumulation).
- FSDP (``fully_shard``): during the step gradients are neither reduced nor resharded; after
  the stage's last action (its last W, under zero-bubble schedules) FSDP's post-backward runs
  once per parameter group, reduce-scattering the step's gradient, and FSDP finishes its
  backward. ``module.set_requires_gradient_sync(False)`` before a step keeps the gradients
  unreduced, for accumulation, as without a pipeline.

Only gradients that autograd accumulates are seen by DDP, so a DDP-wrapped module may not
hold ``ppfast.nn.Linear`` layers (their weight gradients are computed outside autograd, in W).
"""

from __future__ import annotations

import contextlib

from torch import nn

from ..training.extensions import Driver, Extension, register


class DDP(Driver):
    def __init__(self, module: nn.parallel.DistributedDataParallel, stage: int, split: bool):
        if split:
            raise TypeError(
                f"stage {stage}: DistributedDataParallel reduces the gradients autograd "
                "accumulates, and ppfast.nn.Linear layers compute theirs outside autograd (in "
                "W); wrap the unconverted module in DDP or FSDP, or give the stage the plain "
                "module (ddp.module) and reduce with ppfast.parallel.DataParallelGrads"
            )
        self.module = module
        self.left = 0

    def begin_step(self, m: int) -> None:
        # inside the caller's ddp.no_sync() the step reduces nothing
        self.left = m if self.module.require_backward_grad_sync else 0

    def forward(self):
        return self.module.no_sync()

    def backward(self, outputs):
        if self.left:
            self.left -= 1
            if self.left == 0:
                # what DDP's forward does outside no_sync(): from here on its hooks reduce
                # every gradient as it becomes final
                from torch.nn.parallel.distributed import _find_tensors

                unused = self.module.find_unused_parameters
                roots = list(_find_tensors(outputs)) if unused else []
                self.module.reducer.prepare_for_backward(roots)
                return contextlib.nullcontext()
        return self.module.no_sync()


class FSDP(Driver):
    def __init__(self, module: nn.Module):
        self.module = module
        self.sync = True

    def _states(self):
        from torch.distributed.fsdp import fully_shard

        return fully_shard.state(self.module)._state_ctx.all_states

    @staticmethod
    def _groups(state) -> list:
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch before 2.8: one group per state
            group = getattr(state, "_fsdp_param_group", None)
            groups = [group] if group is not None else []
        return groups

    def begin_step(self, m: int) -> None:
        # what the caller set with set_requires_gradient_sync, kept for the step's end
        groups = [g for s in self._states() for g in self._groups(s)]
        self.sync = all(g.reduce_grads for g in groups) if groups else True
        self.module.set_is_last_backward(False)
        self.module.set_reshard_after_backward(False)
        self.module.set_requires_gradient_sync(False)

    def end_step(self) -> None:
        from torch.distributed.fsdp import fully_shard

        self.module.set_is_last_backward(True)
        self.module.set_reshard_after_backward(True)
        self.module.set_requires_gradient_sync(self.sync)
        for state in self._states():
            for group in self._groups(state):
                group.post_backward()
        fully_shard.state(self.module)._root_post_backward_final_callback()


def wrapper_of(module: nn.Module, stage: int, split: bool) -> Driver | None:
    """How the stage drives ``module`` through a step (``split``: it holds layers that defer
    their weight gradients); None for a module that is neither DDP nor FSDP."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return DDP(module, stage, split)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return None
    if isinstance(module, FSDPModule):
        return FSDP(module)
    return None


register(Extension("ppfast.parallel", driver=wrapper_of))
