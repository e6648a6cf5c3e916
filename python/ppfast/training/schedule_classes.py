"""torch.distributed.pipelining's schedule classes (and ppfast's own) by name, as subclasses
of :class:`~ppfast.training.pipeline.PipelineSchedule` that only fix the schedule."""

from __future__ import annotations

from ..program.schedules import lookup
from .pipeline import PipelineSchedule


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
ScheduleLoopedBFS = _schedule(
    "ScheduleLoopedBFS", "looped-bfs", "Looped BFS: several stages per rank, breadth first."
)
ScheduleZBH1 = _schedule("ScheduleZBH1", "zb-h1", "Zero bubble H1 (1F1B memory).")
ScheduleZBH2 = _schedule("ScheduleZBH2", "zb-h2", "Zero bubble H2 (2p-1 in flight).")
ScheduleAuto = _schedule(
    "ScheduleAuto", "auto", "Searched from costs (costs=, mem_cap= keyword options)."
)


def get_schedule_class(name: str) -> type[PipelineSchedule]:
    """The schedule class for ``name``, like torch's ``get_schedule_class``: torch's names
    ("1F1B", "Interleaved1F1B", "ZBVZeroBubble", ...) and ppfast's ("zb-h1", "auto", ...),
    without regard to case, '-' or '_'."""
    spec = lookup(name)  # an unknown name fails here, listing the known ones
    for cls in (
        ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B, ScheduleLoopedBFS,
        ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble, ScheduleDualPipeV, ScheduleZBH1,
        ScheduleZBH2, ScheduleAuto,
    ):  # fmt: skip
        if cls.schedule_name == spec.name:
            return cls
    return _schedule(f"Schedule_{spec.name}", spec.name, spec.summary)
