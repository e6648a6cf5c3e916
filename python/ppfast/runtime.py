"""Runs one rank of a validated Program on the native executor: the low-level entry point.

Frameworks that build their own programs use this directly::

    runner = RankRunner(program, rank, transport, compute, timeout=60)
    for batch in data:
        ...                      # give `compute` this step's microbatches
        metrics = runner.step()  # StepMetrics

``program`` is any validated :class:`~ppfast.Program` (generated, imported from torch's CSV,
or built by hand); it is lowered here if it holds no communication yet. ``transport`` is a
``ppfast._C.C10dTransport`` (any ProcessGroup) or ``InProcessTransport`` (ranks as threads).
``compute`` has ``forward(stage, mb, inputs) -> (outputs, free_after_send)``,
``backward(stage, mb, grads, full) -> input_grads`` and ``weight(stage, mb)``, and optionally
a ``device``. Received tensors stay valid until the last backward action of their
(stage, microbatch), or in a forward-only program (``Program.forward_only()``, for
evaluation) until their forward; keep no reference to them after it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from ._engine import encode_rank
from ._native import C
from .ir import Program, format_action, parse_action
from .validate import validate


@dataclass
class StepMetrics:
    """What one step of one rank measured, in seconds (host clock; CUDA events on a GPU).

    ``as_dict()`` is one flat, JSON-ready record per rank and step, for a logger::

        metrics = schedule.last_metrics.as_dict()
        # {"rank": 0, "step_time": 0.152, "busy_time": 0.131, "bubble": 0.138,
        #  "busy_per_stage": {"0": 0.131}, "p2p_p50": 0.0004, "p2p_p99": 0.0021,
        #  "num_actions": 16}

    ``bubble`` is 1 - busy / step: the share of the step this rank computed nothing.
    ``actions`` holds every compute action as (text, start, end) from the step's start, and
    ``p2p_latencies`` each transfer's time from posting to being usable. With
    ``torch.profiler`` running, every action is also a range named "ppfast:" + its text
    ("ppfast:1F3").
    """

    rank: int
    wall: float
    busy: float
    bubble: float
    actions: list[tuple[str, float, float]] = field(default_factory=list)
    p2p_latencies: list[float] = field(default_factory=list)

    @property
    def p2p_p50(self) -> float:
        return statistics.median(self.p2p_latencies) if self.p2p_latencies else 0.0

    @property
    def p2p_p99(self) -> float:
        lat = sorted(self.p2p_latencies)
        return lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))] if lat else 0.0

    @property
    def busy_per_stage(self) -> dict[int, float]:
        """Compute time of each stage this rank holds (a compound action splits evenly)."""
        out: dict[int, float] = {}
        for text, start, end in self.actions:
            parts = parse_action(text).parts()
            for part in parts:
                out[part.stage] = out.get(part.stage, 0.0) + (end - start) / len(parts)
        return dict(sorted(out.items()))

    def as_dict(self) -> dict:
        return {
            "rank": self.rank,
            "step_time": self.wall,
            "busy_time": self.busy,
            "bubble": self.bubble,
            "busy_per_stage": {str(s): t for s, t in self.busy_per_stage.items()},
            "p2p_p50": self.p2p_p50,
            "p2p_p99": self.p2p_p99,
            "num_actions": len(self.actions),
        }


class RankRunner:
    """Owns the executor of one rank of ``program``."""

    def __init__(
        self,
        program: Program,
        rank: int,
        transport: object,
        compute: object,
        *,
        timeout: float = 300.0,
        dynamic_shapes: bool = False,
    ):
        if not 0 <= rank < program.p:
            raise ValueError(f"rank {rank} is outside the program's {program.p} ranks")
        size = getattr(transport, "size", program.p)
        if size != program.p:
            raise ValueError(
                f"the program has {program.p} ranks but the transport connects {size}; build "
                "the program for the group's size"
            )
        # checked before anything is sent; lowered here if it has no communication yet
        self.program = validate(program)
        self.rank = rank
        acts = self.program.ranks[rank]
        self.names = [format_action(a) for a in acts]
        self._compute = compute
        self._executor = C.Executor(
            rank,
            list(self.program.stage_to_rank),
            self.program.num_microbatches,
            encode_rank(acts),
            self.names,
            transport,
            compute,
            int(timeout * 1000),
            dynamic_shapes,
        )
        self.last: dict | None = None

    def set_timeout(self, seconds: float) -> None:
        self._executor.set_timeout_ms(int(seconds * 1000))

    def step(self) -> StepMetrics:
        res = self._executor.step()
        self.last = res
        acts = self.program.ranks[self.rank]
        spans = [
            (self.names[k], res["start"][k], res["end"][k])
            for k, a in enumerate(acts)
            if a.is_compute
        ]
        busy = sum(e - s for _, s, e in spans)
        wall = res["wall"]
        lat = [done - posted for _, posted, done in res["comm"] if done == done]
        return StepMetrics(self.rank, wall, busy, 1.0 - busy / wall if wall else 0.0, spans, lat)

    def timeline(self) -> list[tuple[int, object, float, float]]:
        """The last step's compute actions as (rank, action, start, end), for ppfast.draw.

        Times are seconds on the machine's steady clock, which every process of one machine
        shares, so timelines of several ranks line up.
        """
        if self.last is None:
            return []
        acts = self.program.ranks[self.rank]
        t0 = self.last["epoch"]
        return [
            (self.rank, a, t0 + self.last["start"][k], t0 + self.last["end"][k])
            for k, a in enumerate(acts)
            if a.is_compute
        ]


def write_timeline(
    timeline, program: Program, png: str | None = None, trace: str | None = None, title: str = ""
) -> None:
    """Draw a measured step like the simulator's: times from the earliest start, in ms."""
    from .draw import draw_png, spans_from, stage_chunks, write_trace

    if not timeline:
        return
    t0 = min(s for _, _, s, _ in timeline)
    spans = spans_from((r, a, (s - t0) * 1e3, (e - t0) * 1e3) for r, a, s, e in timeline)
    if png:
        draw_png(
            spans,
            png,
            num_ranks=program.p,
            stage_chunk=stage_chunks(program.stage_to_rank),
            title=title,
            unit="ms",
        )
    if trace:
        write_trace(spans, trace, us_per_unit=1e3, title=title)
