"""Schedule classes with torch.distributed.pipelining's names and ``step`` behaviour."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .ir import Kind, Program
from .nn.grad_hooks import HookRouter
from .runtime import RankRunner, StepMetrics
from .schedules import generate, lookup
from .stage import PipelineStage
from .tied import C10dTies, TiedParameters
from .transports import check_kind, transport_for


def split_microbatches(args: tuple, kwargs: dict, m: int) -> tuple[list[tuple], list[dict]]:
    """Split tensor arguments along dim 0 into m equal microbatches; other values are
    given unchanged to every microbatch."""

    def split(value, where: str):
        if not isinstance(value, torch.Tensor):
            return [value] * m
        if value.dim() == 0 or value.shape[0] % m:
            size = value.shape[0] if value.dim() else "a scalar"
            raise ValueError(
                f"{where}: a batch of {size} does not split into {m} microbatches; use a batch "
                f"size divisible by n_microbatches={m}"
            )
        return list(value.chunk(m, dim=0))

    cols = [split(a, f"argument {i}") for i, a in enumerate(args)]
    kcols = {k: split(v, f"argument {k!r}") for k, v in kwargs.items()}
    return (
        [tuple(c[i] for c in cols) for i in range(m)],
        [{k: v[i] for k, v in kcols.items()} for i in range(m)],
    )


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
    ``"shm"`` or ``"c10d"`` force one (see :mod:`ppfast.transports`). A transport object (for
    example an in-process one) is used as given. ``program`` replaces the
    generated schedule with any validated Program. ``timeout`` (seconds) bounds every wait.

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
        self.scale_grads = scale_grads
        self.timeout = timeout
        self._options = schedule_options
        self._program = program
        self._transport = (
            check_kind(transport) if transport is None or isinstance(transport, str) else transport
        )
        self._tie_group = tie_group
        self._ties: TiedParameters | None = None
        self._runner: RankRunner | None = None
        self._first_shapes: list | None = None
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
        transport, rank, size = self._group_rank_size()
        num_stages = self.stages[0].num_stages
        if any(s.num_stages != num_stages for s in self.stages):
            raise ValueError("all stages of a rank must agree on num_stages")
        if self._program is not None:
            program = self._program
        else:
            v = num_stages // size
            if v * size != num_stages:
                raise ValueError(
                    f"{num_stages} stages do not fit a group of {size} ranks: "
                    f"{self.schedule_name} needs num_stages = ranks x stages per rank"
                )
            spec = lookup(self.schedule_name)
            if not spec.v_free and v != spec.default_v:
                raise ValueError(
                    f"{spec.name} runs {spec.default_v} stage(s) per rank, but {num_stages} stages "
                    f"on {size} ranks is {v} per rank; use {spec.default_v * size} stages"
                )
            program = generate(spec.name, size, self.n_microbatches, v, **self._options)
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
        # after every check that can refuse the schedule, before any compute
        self._ties = self._setup_ties(rank, size)
        self._runner = runner

    def _setup_ties(self, rank: int, size: int) -> TiedParameters | None:
        declared = any(s.tied for s in self.stages)
        if size == 1:
            comm = None
        elif self._tie_group is not None:
            comm = self._tie_group.bind(rank)
        elif self._transport_from_group():
            import torch.distributed as dist

            group = self.stages[0].group or dist.group.WORLD
            comm = C10dTies(group, rank, size, self.timeout)
        elif declared:
            raise ValueError(
                "tied parameters across ranks that are threads of one process need tie_group; "
                "use ppfast.Pipe(..., tied=...), which provides it"
            )
        else:
            return None  # ranks of this transport cannot be reached; none of ours is tied
        ties = TiedParameters(self.stages, rank, comm)
        ties.setup()
        return ties if ties.plans else None

    @property
    def program(self) -> Program | None:
        """The lowered program this rank runs (after the first step)."""
        return self._runner.program if self._runner else None

    # ------------------------------------------------------------------ step

    def step(self, *args, target=None, losses: list | None = None, **kwargs):
        """One training step over ``n_microbatches`` microbatches of the batch.

        Inputs go to the rank holding the first stage, ``target`` to the one holding the last;
        ``losses`` (a list) receives each microbatch's loss there. Gradients accumulate into
        ``.grad``, scaled for a mean over microbatches when ``scale_grads``. Returns the last
        stage's outputs, concatenated, on that rank, else None.
        """
        m = self.n_microbatches
        by_index = {s.stage_index: s for s in self.stages}
        first, last = by_index.get(0), by_index.get(self.stages[0].num_stages - 1)
        mb_args, mb_kwargs = [()] * m, [{}] * m
        if first is not None:
            if not args and not kwargs:
                raise ValueError("the rank holding stage 0 needs the batch: step(inputs, ...)")
            mb_args, mb_kwargs = split_microbatches(args, kwargs, m)
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            dynamic = any(s.dynamic_shapes for s in self.stages)
            if self._first_shapes is not None and shapes != self._first_shapes and not dynamic:
                raise ValueError(
                    f"input shapes changed from {self._first_shapes} to {shapes}; build the "
                    "stages with dynamic_shapes=True for inputs whose shape varies"
                )
            self._first_shapes = shapes
        targets = None
        if last is not None and target is not None:
            targets = split_microbatches((target,), {}, m)[0]
            targets = [t[0] for t in targets]
        if self._runner is None:
            self._setup()
        scale = 1.0 / m if self.scale_grads else 1.0
        for s in self.stages:
            s.prepare(m, mb_args, mb_kwargs, targets, self.loss_fn, scale)
        if self._ties is not None:
            self._ties.begin_step()
        self.last_metrics = self._runner.step()
        for s in self.stages:
            s.check_clean()
            s.finish_step()
        if self._ties is not None:
            self._ties.reduce()  # after the last W: every owner gets the summed gradient
        if last is None:
            return None
        if losses is not None:
            losses.extend(last.losses())
        chunks = [last.output_chunks[i] for i in range(m)]
        if chunks and len(chunks[0]) == 1:
            return torch.cat([c[0] for c in chunks])
        return None

    def timeline(self):
        """This rank's last step as (rank, action, start, end) on the shared steady clock."""
        return self._runner.timeline() if self._runner else []

    def gather_timeline(self, group=None):
        """Every rank's last step (a collective over the stages' group; c10d only)."""
        import torch.distributed as dist

        group = group or self.stages[0].group or dist.group.WORLD
        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, self.timeline(), group=group)
        return [x for part in parts for x in part]

    def write_timeline(self, timeline, png=None, trace=None, title=""):
        """Draw ``timeline`` (from :meth:`gather_timeline`) as the simulator draws a program."""
        from .runtime import write_timeline

        write_timeline(timeline, self.program, png, trace, title or self.schedule_name)


def _schedule(cls_name: str, name: str, doc: str) -> type[PipelineSchedule]:
    return type(cls_name, (PipelineSchedule,), {"schedule_name": name, "__doc__": doc})


ScheduleGPipe = _schedule("ScheduleGPipe", "gpipe", "GPipe: all forwards, then all backwards.")
Schedule1F1B = _schedule("Schedule1F1B", "1f1b", "1F1B: one forward, one backward.")
ScheduleInterleaved1F1B = _schedule(
    "ScheduleInterleaved1F1B", "interleaved-1f1b", "Interleaved 1F1B: several stages per rank."
)
ScheduleInterleavedZeroBubble = _schedule(
    "ScheduleInterleavedZeroBubble", "interleaved-zb", "Interleaved zero bubble (I/W split)."
)
ScheduleZBVZeroBubble = _schedule(
    "ScheduleZBVZeroBubble", "zb-v", "ZB-V: V placement, two stages per rank."
)
ScheduleDualPipeV = _schedule("ScheduleDualPipeV", "dualpipev", "DeepSeek's DualPipeV.")
ScheduleZBH1 = _schedule("ScheduleZBH1", "zb-h1", "Zero bubble H1 (1F1B memory).")
ScheduleZBH2 = _schedule("ScheduleZBH2", "zb-h2", "Zero bubble H2 (2p-1 in flight).")
ScheduleAuto = _schedule(
    "ScheduleAuto", "auto", "Searched from costs (costs=, mem_cap= keyword options)."
)
