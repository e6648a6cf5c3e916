"""What a rank's step measured (StepMetrics), and a measured step drawn like a simulated one."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from ..program.draw import draw_png, spans_from, stage_chunks, write_trace
from ..program.ir import Program, parse_action


@dataclass
class StepMetrics:
    """What one step of one rank measured, in seconds (host clock; CUDA events on a GPU).

    ``as_dict()`` is one flat, JSON-ready record per rank and step, for a logger::

        metrics = schedule.last_metrics.as_dict()
        # {"rank": 0, "step_time": 0.152, "busy_time": 0.131, "bubble": 0.138,
        #  "busy_per_stage": {"0": 0.131}, "p2p_p50": 0.0004, "p2p_p99": 0.0021,
        #  "num_actions": 16}

    ``bubble`` is 1 - busy / step: the share of the step this rank computed nothing.
    ``loss`` is the step's loss (the mean of its microbatch losses, or their sum for a loss
    that weighs microbatches itself) on every rank of the pipeline, when the step was asked
    for it (``step(..., share_loss=True)``), else None.
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
    loss: float | None = None

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

    @classmethod
    def from_times(cls, rank: int, times: dict, names: list[str], compute: list[int]):
        """From the executor's times of one step: ``compute`` indexes its compute actions."""
        spans = [(names[k], times["start"][k], times["end"][k]) for k in compute]
        busy = sum(e - s for _, s, e in spans)
        wall = times["wall"]
        lat = [done - posted for _, posted, done in times["comm"] if done == done]
        return cls(rank, wall, busy, 1.0 - busy / wall if wall else 0.0, spans, lat)

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
            **({"loss": self.loss} if self.loss is not None else {}),
        }


class DeferredStepMetrics(StepMetrics):
    """StepMetrics of a step that may still be running on a device: nothing waits for it until
    a figure is read, and then ``load()`` (which waits for the device) fills them all in."""

    def __init__(self, rank: int, load):
        self.rank = rank
        self._load = load

    def __getattr__(self, name: str):
        # only reached for the fields not filled in yet
        if name.startswith("_") or self.__dict__.get("_load") is None:
            raise AttributeError(name)
        filled = self._load()
        self._load = None
        # what was set since (the step's loss) stays
        self.__dict__.update(
            {k: getattr(filled, k) for k in self.__dataclass_fields__ if k not in self.__dict__}
        )
        return getattr(self, name)


def write_timeline(
    timeline, program: Program, png: str | None = None, trace: str | None = None, title: str = ""
) -> None:
    """Draw a measured step like the simulator's: times from the earliest start, in ms."""
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
