"""Pipe: every stage in this process, ranks as threads over the in-process transport."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .._native import C
from ..program.ir import Program
from ..program.schedules import lookup
from ..runtime.errors import PipelineCommError
from ..runtime.metrics import write_timeline
from ..runtime.threads import ThreadGroup
from .microbatch import split_batch, split_target
from .pipeline import PipelineSchedule
from .stage import PipelineStage
from .step_loss import step_loss


class Pipe:
    """Like torch's former ``Pipe``: ``Pipe(modules, devices=[...], chunks=m, schedule=...)``.

    ``modules`` is an ``nn.Sequential`` or a list of stage modules; there are
    ``len(devices)`` ranks (default: one per module), each holding ``len(modules) /
    len(devices)`` stages in the schedule's placement. Each rank runs in its own thread; the
    executor releases the GIL while it waits and torch ops release it while they compute.

    ``tied`` lists groups of parameters that are one weight in the model, each named
    ``"<stage>.<parameter name in that stage's module>"``, for example
    ``tied=[("0.embed.weight", "3.head.weight")]``. Tied parameters on different ranks must be
    different Parameter objects (ranks are threads; one object would have its gradient written
    by two at once): they start from the value of the lowest stage's, and after every step each
    holds the sum of their gradients (``main_grad`` where there is one, else ``.grad``). On one
    rank they may be one object.
    """

    def __init__(
        self,
        modules: nn.Sequential | Sequence[nn.Module],
        devices: Sequence[torch.device | str] | None = None,
        chunks: int = 1,
        schedule: str = "1f1b",
        loss_fn: Callable | None = None,
        *,
        program: Program | None = None,
        timeout: float = 300.0,
        dynamic_shapes: bool = False,
        tied: Sequence[Sequence[str]] = (),
        **schedule_options,
    ):
        modules = list(modules)
        if not modules:
            raise ValueError("Pipe needs at least one stage module")
        devices = [torch.device(d) for d in (devices or ["cpu"] * len(modules))]
        p = len(devices)
        if len(modules) % p:
            raise ValueError(f"{len(modules)} stage modules do not share out over {p} devices")
        name = lookup(schedule).name if program is None else "program"
        self.hub = C.Hub(p)
        self.chunks = chunks
        self.modules = modules
        self.schedules: list[PipelineSchedule] = []
        placement = self._placement(name, p, len(modules), program)
        for s, m in enumerate(modules):
            m.to(devices[placement[s]])
        ties = _resolve_ties(modules, tied)
        _refuse_shared_across_ranks(modules, placement)
        self.tie_group = ThreadGroup(p, timeout)
        # On a GPU every rank computes on a stream of its own, so ranks sharing one device
        # overlap their compute as ranks on separate devices would.
        self.devices = devices
        self.streams = [torch.cuda.Stream(d) if d.type == "cuda" else None for d in devices]
        cls = type("PipeSchedule", (PipelineSchedule,), {"schedule_name": name})
        for r in range(p):
            stages = [
                PipelineStage(
                    modules[s], s, len(modules), devices[r],
                    dynamic_shapes=dynamic_shapes, tied=ties.get(s),
                )
                for s in range(len(modules))
                if placement[s] == r
            ]  # fmt: skip
            self.schedules.append(
                cls(
                    stages,
                    chunks,
                    loss_fn,
                    program=program,
                    transport=C.InProcessTransport(self.hub, r),
                    timeout=timeout,
                    tie_group=self.tie_group,
                    **schedule_options,
                )
            )

    @staticmethod
    def _placement(name: str, p: int, n: int, program: Program | None) -> tuple[int, ...]:
        if program is not None:
            return program.stage_to_rank
        _, placement = lookup(name).layout(p, n)
        if placement is None:
            raise ValueError(
                f"{name} chooses its own placement; build it with generate() and pass program="
            )
        return placement

    def _fresh_transport(self) -> None:
        """A failed step leaves the hub aborted and the executors broken: start both anew (the
        next step agrees shapes again)."""
        self.hub = C.Hub(len(self.schedules))
        self.tie_group = ThreadGroup(len(self.schedules), self.tie_group.timeout)
        for r, sched in enumerate(self.schedules):
            sched._transport = C.InProcessTransport(self.hub, r)
            sched._tie_group = self.tie_group
            sched._runner = sched._eval_runner = None
            sched._broken = None

    def step(
        self,
        *args,
        target=None,
        losses: list | None = None,
        return_outputs: bool = True,
        loss_kwargs: dict | None = None,
        share_loss: bool = False,
        **kwargs,
    ):
        """One training step; returns the last stage's outputs merged (see
        ``PipelineSchedule.step``). ``share_loss=True`` puts the step's loss into every
        rank's ``last_metrics`` (``pipe.last_metrics[r].loss``); the ranks are threads of
        this process, so nothing is sent."""
        extra = {"return_outputs": return_outputs, "loss_kwargs": loss_kwargs}
        out = self._run("step", args, kwargs, target, losses, extra)
        if share_loss:
            holder = next(s for s in self.schedules if any(st.is_last for st in s.stages))
            loss = float(step_loss(holder))
            for sched in self.schedules:
                sched.last_metrics.loss = loss
        return out

    def eval(self, *args, target=None, losses: list | None = None, **kwargs):
        """A forward-only pass (see ``PipelineSchedule.eval``); returns the outputs."""
        return self._run("eval", args, kwargs, target, losses, {})

    def _run(self, method: str, args: tuple, kwargs: dict, target, losses, extra: dict):
        training = method == "step"
        if training and not torch.is_grad_enabled():
            raise RuntimeError(
                "step() trains, and gradients are disabled here (torch.no_grad()); use "
                "pipe.eval(...) for a forward-only pass"
            )
        if not args and not kwargs:
            raise ValueError(f"the rank holding stage 0 needs the batch: {method}(inputs, ...)")
        # the batch is split once, here, before any rank starts: a bad one is refused at once
        scheds = self.schedules
        first = next(s for s in scheds if any(st.is_first for st in s.stages))
        equal = training and not any(st.dynamic_shapes for s in scheds for st in s.stages)
        mb_args, mb_kwargs = split_batch(
            args, kwargs, self.chunks, first.args_chunk_spec, first.kwargs_chunk_spec, equal=equal
        )
        targets = split_target(target, self.chunks, equal=equal) if target is not None else None
        if training:
            first._check_same_shapes(args)
        want_loss = training or target is not None or losses is not None
        call = (
            training, mb_args, mb_kwargs, targets, losses, extra.get("return_outputs", True),
            extra.get("loss_kwargs"), want_loss,
        )  # fmt: skip
        results: list = [None] * len(self.schedules)
        errors: list[BaseException | None] = [None] * len(self.schedules)
        # autocast is a thread's state: each rank's thread computes under the caller's
        autocast = _caller_autocast({d.type for d in self.devices})

        # rank streams start after the caller's queued work (its inputs, its optimizer step)
        callers = [_current_stream(d) for d in self.devices]
        for stream, caller in zip(self.streams, callers, strict=True):
            if stream is not None:
                stream.wait_stream(caller)

        def run(r: int) -> None:
            sched = self.schedules[r]
            on_stream = torch.cuda.stream(self.streams[r]) if self.streams[r] else None
            try:
                with on_stream or contextlib.nullcontext(), _autocast(autocast):
                    results[r] = sched._run_microbatches(*call)
            except BaseException as e:  # noqa: BLE001 - reported below, root cause first
                errors[r] = e
                self.hub.abort(r, f"{type(e).__name__}: {e}")
                self.tie_group.abort()  # ranks waiting to sum tied gradients give up too

        threads = [
            threading.Thread(target=run, args=(r,), daemon=True) for r in range(len(self.schedules))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # the caller's stream sees every rank's gradients, outputs and losses
        for stream, caller in zip(self.streams, callers, strict=True):
            if stream is not None:
                caller.wait_stream(stream)
        failed = [e for e in errors if e is not None]
        if failed:
            self._fresh_transport()
            # a rank that failed on its own explains the others, which only saw it go
            root = [e for e in failed if not isinstance(e, PipelineCommError)] or failed
            raise root[0]
        return next((r for r in results if r is not None), None)

    @property
    def last_metrics(self):
        return [s.last_metrics for s in self.schedules]

    def timeline(self):
        """Every rank's last step as (rank, action, start, end) on one clock."""
        return [x for s in self.schedules for x in s.timeline()]

    def write_timeline(self, png=None, trace=None, title=""):
        """Draw the last step as the simulator draws a program (PNG and/or Chrome trace)."""
        write_timeline(self.timeline(), self.schedules[0].program, png, trace, title)


def _caller_autocast(device_types: set[str]) -> list[tuple[str, torch.dtype, bool]]:
    """The autocast regions the calling thread is in, for the devices the ranks compute on."""
    return [
        (d, torch.get_autocast_dtype(d), torch.is_autocast_cache_enabled())
        for d in sorted(device_types)
        if torch.is_autocast_enabled(d)
    ]


def _autocast(regions: list[tuple[str, torch.dtype, bool]]) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for device_type, dtype, cache in regions:
        stack.enter_context(torch.autocast(device_type, dtype=dtype, cache_enabled=cache))
    return stack


def _resolve_ties(modules: list[nn.Module], tied) -> dict[int, dict[str, nn.Parameter]]:
    """``tied`` (groups of "<stage>.<name>") as each stage's ``{key: parameter}``."""
    if isinstance(tied, str) or not all(
        isinstance(g, (list, tuple)) and all(isinstance(n, str) for n in g) for g in tied
    ):
        raise TypeError(
            'tied must be a list of groups of names, e.g. [("0.embed.weight", "3.head.weight")]'
        )
    out: dict[int, dict[str, nn.Parameter]] = {}
    for group in tied:
        if len(group) < 2:
            raise ValueError(f"tied group {tuple(group)} names one parameter; a tie needs two")
        key = group[0]
        for full in group:
            head, _, name = full.partition(".")
            if not head.isdigit() or not name or int(head) >= len(modules):
                raise ValueError(
                    f"tied name {full!r} must be '<stage>.<parameter name>' with a stage below "
                    f"{len(modules)}, e.g. '0.embed.weight'"
                )
            s = int(head)
            try:
                param = modules[s].get_parameter(name)
            except AttributeError:
                names = ", ".join(n for n, _ in modules[s].named_parameters())
                raise ValueError(
                    f"tied name {full!r}: stage {s} has no parameter {name!r}; it has {names}"
                ) from None
            mine = out.setdefault(s, {})
            if key in mine and mine[key] is not param:
                raise ValueError(
                    f"tied group {tuple(group)} names two parameters of stage {s}; within a "
                    "stage, tie them by making them one Parameter"
                )
            mine[key] = param
    return out


def _refuse_shared_across_ranks(modules: list[nn.Module], placement) -> None:
    seen: dict[int, tuple[int, str]] = {}
    for s, m in enumerate(modules):
        for name, p in m.named_parameters():
            if not p.requires_grad:
                continue
            first = seen.setdefault(id(p), (s, name))
            if placement[first[0]] != placement[s]:
                raise ValueError(
                    f"stages {first[0]} ({first[1]}) and {s} ({name}) share one Parameter but run "
                    "on different ranks, whose threads would write its gradient at once; give "
                    f"stage {s} its own copy (nn.Parameter(w.detach().clone())) and pass "
                    f'tied=[("{first[0]}.{first[1]}", "{s}.{name}")] to keep the two equal'
                )


def _current_stream(device: torch.device):
    return torch.cuda.current_stream(device) if device.type == "cuda" else None
