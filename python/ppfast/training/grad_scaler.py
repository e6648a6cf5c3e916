"""Loss scaling for fp16 across a pipeline: torch's GradScaler, with one found-inf decision.

With fp16 a gradient can overflow on one stage and not on another. torch's GradScaler
decides per process whether to skip the optimizer step and how to change the scale, so the
stages of one pipeline would drift apart: one skips, the others step, and their scales
differ from then on. ``ppfast.GradScaler`` is torch's, used the same way, except that:

- the schedule scales its own loss (the loss lives on the last stage, inside the step), so
  there is no ``scaler.scale(loss).backward()`` to write;
- ``unscale_`` (which ``step`` runs when it was not called) makes every rank's found-inf the
  maximum over the pipeline's ranks, and over ``dp_group`` when given, before anything is
  decided. Every rank then skips the same steps, and ``update`` moves every rank's scale alike.

Usage (every rank)::

    scaler = ppfast.GradScaler(schedule, dp_group=mesh.dp_group)  # torch's arguments after
    with torch.autocast("cuda", dtype=torch.float16):
        schedule.step(x, target=y)
    scaler.unscale_(optimizer)            # optional, for clipping in true units
    ppfast.clip_grad_norm_(schedule, 1.0)
    scaler.step(optimizer)                # skipped on every rank if any rank found an inf
    scaler.update()

It unscales and checks ``.grad`` of the optimizer's parameters, as torch's does. With
``ppfast.Pipe`` every rank is a thread of this process and one optimizer usually holds all
parameters, so torch's own decision is already the pipeline's; the schedules scale their
losses all the same.
"""

from __future__ import annotations

import torch

from ..runtime.collectives import all_reduce
from .pipe import Pipe
from .pipeline import PipelineSchedule


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` for a pipelined model (see the module's text)."""

    def __init__(
        self,
        pipeline: PipelineSchedule | Pipe,
        device: str | None = None,
        *,
        dp_group=None,
        timeout: float | None = None,
        **kwargs,
    ):
        if isinstance(pipeline, Pipe):
            schedules, self._group = list(pipeline.schedules), None
        elif isinstance(pipeline, PipelineSchedule):
            schedules = [pipeline]
            self._group = pipeline._group() if pipeline._transport_from_group() else None
            if self._group is None:
                raise ValueError(
                    "this schedule's transport was handed in, so its ranks cannot agree on "
                    "skipping a step; pass the ppfast.Pipe it belongs to, or a schedule over a "
                    "process group"
                )
        else:
            name = type(pipeline).__name__
            raise TypeError(f"GradScaler takes a PipelineSchedule or a ppfast.Pipe, got {name}")
        stage_device = schedules[0].stages[0].device
        super().__init__(device or stage_device.type, **kwargs)
        self._dp_group = dp_group
        self._timeout = timeout if timeout is not None else schedules[0].timeout
        self._stage_device = stage_device
        for sched in schedules:
            sched._loss_scaler = self
        if self.is_enabled():
            # every rank keeps the scale, also those whose stages compute no loss (torch's
            # scaler makes it at the first scale(), which only the last stage's rank calls)
            self._lazy_init_scale_growth_tracker(stage_device)

    def loss_scale(self, scale: float, device: torch.device) -> torch.Tensor | float:
        """What the schedule multiplies each microbatch's loss by: its own factor (1/m for a
        mean), times the current scale (a tensor on the device: no host sync)."""
        if not self.is_enabled():
            return scale
        return self.scale(torch.tensor(scale, dtype=torch.float32, device=device))

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        if not self.is_enabled() or self._group is None and self._dp_group is None:
            return
        found = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        if not found:
            raise RuntimeError(
                "no parameter of this optimizer has a gradient on this rank, so it cannot say "
                "whether it found an inf; give every rank's optimizer its stages' parameters"
            )
        values = list(found.values())
        agreed = torch.stack([v.to(self._stage_device).reshape(()) for v in values]).amax()
        agreed = agreed.reshape(1).clone()
        for group, what in ((self._group, "stages"), (self._dp_group, "replicas")):
            if group is not None:
                all_reduce(
                    agreed,
                    group,
                    self._timeout,
                    "GradScaler",
                    f"agreeing on found-inf over the {what}",
                    "max",
                )
        for v in values:
            v.copy_(agreed.to(v.device).reshape(v.shape))
