"""Schedule classes with torch.distributed.pipelining's names and ``step`` behaviour."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..program.ir import Kind, Program
from ..program.schedules import generate, lookup
from ..runtime.errors import PipelineCommError
from ..runtime.metrics import StepMetrics, write_timeline
from ..runtime.runner import RankRunner
from ..runtime.transports import check_kind, transport_for
from . import extensions
from .batch_loss import batch_kwargs_of
from .grad_hooks import HookRouter
from .host_memory import keep_freed_memory
from .microbatch import merge_outputs, split_batch, split_target
from .stage import PipelineStage
from .step_loss import share_step_loss


class _RankCompute:
    """The executor's view of this rank's stages: compute by stage index."""

    def __init__(self, stages: Sequence[PipelineStage]):
        self.stages = {s.stage_index: s for s in stages}
        self.device = stages[0].device

    def forward(self, stage: int, mb: int, inputs):
        return self.stages[stage].forward(mb, inputs)

    def backward(self, stage: int, mb: int, grads, full: bool):
        return self.stages[stage].backward(mb, grads, full)

    def weight(self, stage: int, mb: int):
        return self.stages[stage].weight(mb)


class PipelineSchedule:
    """Runs this rank's stages under a schedule; ``step`` as in torch.distributed.pipelining.

    ``stages`` is this rank's stage (or list of stages, for schedules with several per rank).
    Communication goes over the stages' process group (default: the world group): with
    ``transport="auto"`` (the default, or ``PPFAST_TRANSPORT``) through shared memory when the
    stages are on the CPU and every rank runs on this host, else through the group's backend;
    ``"shm"`` or ``"c10d"`` force one (see :mod:`ppfast.runtime.transports`). A transport
    object (for example an in-process one) is used as given. ``program`` replaces the
    generated schedule with any validated Program. ``timeout`` (seconds) bounds every wait.

    ``args_chunk_spec``, ``kwargs_chunk_spec`` and ``output_merge_spec`` are torch's: how
    ``step`` splits its arguments into microbatches and merges the last stage's outputs (see
    :mod:`ppfast.training.microbatch`; by default tensors split and merge along dim 0).

    Parameters the stages declare as tied (``PipelineStage(..., tied=...)``) start from the
    lowest owning stage's value at the first step and hold the sum of all owners' gradients
    after every step. Between processes that goes over the stages' group; ranks that are
    threads of one process need ``tie_group``, which ``ppfast.Pipe`` provides.
    """

    schedule_name = ""

    def __init__(
        self,
        stages: PipelineStage | Sequence[PipelineStage],
        n_microbatches: int,
        loss_fn: Callable | None = None,
        args_chunk_spec: tuple | None = None,
        kwargs_chunk_spec: dict | None = None,
        output_merge_spec: object = None,
        *,
        scale_grads: bool = True,
        program: Program | None = None,
        transport: object | str | None = None,
        timeout: float = 300.0,
        tie_group: object | None = None,
        **schedule_options,
    ):
        self.stages = [stages] if isinstance(stages, PipelineStage) else list(stages)
        if not self.stages or not all(isinstance(s, PipelineStage) for s in self.stages):
            raise TypeError("stages must be a PipelineStage or a non-empty list of them")
        if n_microbatches < 1:
            raise ValueError(f"n_microbatches must be at least 1, got {n_microbatches}")
        self.n_microbatches = n_microbatches
        self.loss_fn = loss_fn
        self.args_chunk_spec = args_chunk_spec
        self.kwargs_chunk_spec = kwargs_chunk_spec
        self.output_merge_spec = output_merge_spec
        self.scale_grads = scale_grads
        self.timeout = timeout
        self._options = schedule_options
        self._program = program
        self._transport = (
            check_kind(transport) if transport is None or isinstance(transport, str) else transport
        )
        self._tie_group = tie_group
        self._hooks: list[extensions.StepHooks] = []
        self._rank_transport = None
        self._runner: RankRunner | None = None
        self._eval_runner: RankRunner | None = None
        self._first_shapes: list | None = None
        # how the last step's loss weighed its microbatches: 0 averaged them; n > 0 the loss
        # weighed them itself, by counts summed over n data-parallel replicas
        self._weighed_over = 0
        self._loss_scaler = None  # a ppfast.GradScaler that scales this schedule's loss
        self._broken: str | None = None  # why a step failed, after which none may run
        self.last_metrics: StepMetrics | None = None
        if program is None:
            lookup(self.schedule_name)  # a bad name fails here, not at the first step

    # ------------------------------------------------------------------ setup

    def _group_rank_size(self) -> tuple[object, int, int]:
        if not self._transport_from_group():
            return self._transport, self._transport.rank, self._transport.size
        import torch.distributed as dist

        group = self.stages[0].group
        if group is None:
            if not dist.is_initialized():
                raise RuntimeError(
                    "torch.distributed is not initialized: call dist.init_process_group (or "
                    "launch with torchrun), pass group= to the stage, or use ppfast.Pipe to run "
                    "all stages in one process"
                )
            group = dist.group.WORLD
        transport = transport_for(group, self.stages[0].device.type, self._transport, self.timeout)
        return transport, transport.rank, transport.size

    def _transport_from_group(self) -> bool:
        """Is the transport built here from the stages' process group (not handed in)?"""
        return self._transport is None or isinstance(self._transport, str)

    def _setup(self) -> None:
        if all(s.device.type == "cpu" for s in self.stages):
            keep_freed_memory()  # a CPU step reuses the last one's pages (see host_memory)
        transport, rank, size = self._group_rank_size()
        self._rank_transport = transport
        num_stages = self.stages[0].num_stages
        if any(s.num_stages != num_stages for s in self.stages):
            raise ValueError("all stages of a rank must agree on num_stages")
        if self._program is not None:
            program = self._program
        else:
            v, _ = lookup(self.schedule_name).layout(size, num_stages)
            program = generate(self.schedule_name, size, self.n_microbatches, v, **self._options)
        if program.p != size:
            raise ValueError(f"the program has {program.p} ranks; the group has {size}")
        if program.num_microbatches != self.n_microbatches:
            raise ValueError(
                f"the program is for {program.num_microbatches} microbatches, not "
                f"{self.n_microbatches}"
            )
        mine = sorted(s.stage_index for s in self.stages)
        want = program.stages_of(rank)
        if mine != want:
            raise ValueError(
                f"rank {rank} holds stages {want} in this schedule's placement, but was given "
                f"stages {mine}; build the stages that rank {rank} runs"
            )
        split = {
            x.stage for acts in program.ranks for a in acts for x in a.parts() if x.kind is Kind.W
        }
        router = HookRouter()
        for s in self.stages:
            # a schedule without W for this stage gains nothing from deferring: plain autograd
            s.weight_store.enabled = s.stage_index in split
            s.weight_store.router = router
        runner = RankRunner(
            program,
            rank,
            transport,
            _RankCompute(self.stages),
            timeout=self.timeout,
            dynamic_shapes=any(s.dynamic_shapes for s in self.stages),
        )
        self._forwards = program.forward_only()
        # after every check that can refuse the schedule, before any compute
        self._hooks = extensions.rank_hooks(
            extensions.RankContext(
                self.stages,
                rank,
                size,
                self._group() if self._transport_from_group() else None,
                self._tie_group,
                self.timeout,
            )
        )
        self._runner = runner

    def _group(self):
        import torch.distributed as dist

        return self.stages[0].group or dist.group.WORLD

    def abort(self, why: str = "aborted by the caller") -> None:
        """Give up the step in flight, from any thread (a watchdog that sees this rank stall):
        this rank's waits fail, and every other rank raises PipelineCommError naming this one
        at once rather than at its timeout. The schedule cannot step again afterwards."""
        if self._rank_transport is not None:
            self._rank_transport.abort(why)

    @property
    def program(self) -> Program | None:
        """The lowered program this rank runs (after the first step)."""
        return self._runner.program if self._runner else None

    # ------------------------------------------------------------------ step

    def step(
        self,
        *args,
        target=None,
        losses: list | None = None,
        return_outputs: bool = True,
        loss_kwargs: dict | None = None,
        share_loss: bool = False,
        loss_dp_group=None,
        **kwargs,
    ):
        """One training step over ``n_microbatches`` microbatches of the batch.

        Inputs go to the rank holding the first stage, ``target`` to the one holding the last;
        ``losses`` (a list) receives each microbatch's loss there, and ``loss_kwargs`` go to
        every ``loss_fn`` call. Gradients accumulate into ``.grad``, scaled for a mean over
        microbatches when ``scale_grads``, unless ``loss_fn`` weighs the microbatches itself
        (a :class:`~ppfast.training.batch_loss.BatchLoss`, or ``ppfast.hf.CausalLMLoss(
        weighting="tokens")``): its losses are then shares of the batch's, and are summed.
        Returns the last stage's outputs merged into one batch on that rank (None elsewhere,
        or with ``return_outputs=False``, which also keeps no outputs during the step).

        ``share_loss=True`` puts the step's loss (the mean of the microbatch losses; their sum
        for a loss that weighs microbatches) into ``last_metrics.loss`` on every rank of the
        pipeline, averaged over the data-parallel replicas of ``loss_dp_group`` when given:
        one broadcast of one number (and one all-reduce), so it is off by default.
        """
        if not torch.is_grad_enabled():
            raise RuntimeError(
                "step() trains, and gradients are disabled here (torch.no_grad()); use "
                "schedule.eval(...) for a forward-only pass"
            )
        out = self._run(True, args, kwargs, target, losses, return_outputs, loss_kwargs)
        if share_loss:
            share_step_loss(self, loss_dp_group)
        elif loss_dp_group is not None:
            raise ValueError("loss_dp_group averages the shared loss: pass share_loss=True too")
        return out

    def eval(self, *args, target=None, losses: list | None = None, **kwargs):
        """A forward-only pass over the batch, pipelined like ``step`` (for validation).

        Runs the schedule's forwards in its order, without autograd and without backward;
        nothing changes in the model or its gradients. With a ``target`` (or a ``losses``
        list) and a ``loss_fn``, the last stage computes each microbatch's loss into
        ``losses``. Returns the last stage's outputs merged, on the rank holding it. Shapes
        are agreed at every call, so evaluation batches may differ in size from training ones
        and from each other.
        """
        return self._run(False, args, kwargs, target, losses, True, None)

    def _run(self, training, args, kwargs, target, losses, return_outputs, loss_kwargs):
        m = self.n_microbatches
        by_index = {s.stage_index: s for s in self.stages}
        first, last = by_index.get(0), by_index.get(self.stages[0].num_stages - 1)
        # ranks agree shapes once in training unless the stages say otherwise; eval always
        equal = training and not any(s.dynamic_shapes for s in self.stages)
        mb_args, mb_kwargs = [()] * m, [{}] * m
        if first is not None:
            if not args and not kwargs:
                what = "step" if training else "eval"
                raise ValueError(f"the rank holding stage 0 needs the batch: {what}(inputs, ...)")
            mb_args, mb_kwargs = split_batch(
                args, kwargs, m, self.args_chunk_spec, self.kwargs_chunk_spec, equal=equal
            )
            if training:
                self._check_same_shapes(args)
        targets = None
        if last is not None and target is not None:
            targets = split_target(target, m, equal=equal)
        want_loss = training or target is not None or losses is not None
        return self._run_microbatches(
            training, mb_args, mb_kwargs, targets, losses, return_outputs, loss_kwargs, want_loss
        )

    def _run_microbatches(
        self, training, mb_args, mb_kwargs, targets, losses, return_outputs, loss_kwargs, want_loss
    ):
        """A step (or an eval pass) over a batch already split into microbatches."""
        m = self.n_microbatches
        last = next((s for s in self.stages if s.is_last), None)
        if self._broken is not None:
            raise PipelineCommError(
                f"an earlier step of this schedule failed ({self._broken}); its ranks may have "
                "stopped anywhere in that step, so this schedule cannot step again: end the "
                "process group on every rank, start it again and build the schedule anew (or "
                "resume from a checkpoint)",
                self._runner.rank if self._runner else -1,
                "step",
                -1,
                False,
            )
        if self._runner is None:
            self._setup()
        runner = self._runner if training else self._forward_runner()
        scale = 1.0 / m if self.scale_grads else 1.0
        if last is not None:
            # a loss that weighs microbatches by their share of the batch (token counts) says
            # so here; its microbatch losses are then summed, not averaged
            weighed = batch_kwargs_of(self.loss_fn, targets, self.timeout)
            self._weighed_over = weighed[1] if weighed is not None else 0
            if weighed is not None:
                # counted over the replicas too: their gradient averaging divides this out
                loss_kwargs, scale = {**(loss_kwargs or {}), **weighed[0]}, float(weighed[1])
            if training and self._loss_scaler is not None:  # fp16: ppfast.GradScaler
                scale = self._loss_scaler.loss_scale(scale, last.device)
        for s in self.stages:
            s.prepare(
                m,
                mb_args,
                mb_kwargs,
                targets if s.is_last else None,
                self.loss_fn,
                scale,
                training=training,
                keep_outputs=return_outputs,
                loss_kwargs=loss_kwargs,
                want_loss=want_loss,
            )
        if training:
            for hooks in self._hooks:
                hooks.begin_step()
        try:
            self.last_metrics = runner.step()
        except BaseException as e:
            # peers may be anywhere in the step: what the transport holds cannot be trusted
            self._broken = f"{type(e).__name__}: {e}"
            raise
        for s in self.stages:
            s.check_clean()
            s.finish_step()
        if training:
            for hooks in self._hooks:
                hooks.end_step()  # after the last W: tied weights get their summed gradient
        if last is None:
            return None
        if losses is not None:
            losses.extend(last.losses())
        if not return_outputs:
            return None
        return merge_outputs([last.output_chunks[i] for i in range(m)], self.output_merge_spec)

    def _check_same_shapes(self, args: tuple) -> None:
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        dynamic = any(s.dynamic_shapes for s in self.stages)
        if self._first_shapes is not None and shapes != self._first_shapes and not dynamic:
            raise ValueError(
                f"input shapes changed from {self._first_shapes} to {shapes}; build the "
                "stages with dynamic_shapes=True for inputs whose shape varies"
            )
        self._first_shapes = shapes

    def _forward_runner(self) -> RankRunner:
        """The executor of the schedule's forwards alone, built at the first ``eval``."""
        if self._eval_runner is None:
            self._eval_runner = RankRunner(
                self._forwards,
                self._runner.rank,
                self._rank_transport,
                _RankCompute(self.stages),
                timeout=self.timeout,
                dynamic_shapes=True,
            )
        return self._eval_runner

    def timeline(self):
        """This rank's last step as (rank, action, start, end) on the shared steady clock."""
        return self._runner.timeline() if self._runner else []

    def gather_timeline(self, group=None):
        """Every rank's last step (a collective over the stages' group; c10d only)."""
        import torch.distributed as dist

        group = group or self._group()
        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, self.timeline(), group=group)
        return [x for part in parts for x in part]

    def write_timeline(self, timeline, png=None, trace=None, title=""):
        """Draw ``timeline`` (from :meth:`gather_timeline`) as the simulator draws a program."""
        write_timeline(timeline, self.program, png, trace, title or self.schedule_name)
