"""ppfast: a pipeline-parallel training runtime for PyTorch."""

from . import checkpoint, nn, parallel, recompute
from ._native import C as _C  # noqa: F401  (raises with build instructions when missing)
from .errors import PipelineCommError
from .ir import Action, Kind, Program, loop_placement, parse_action, v_placement
from .lowering import lower
from .partition import Split, split
from .pipe import Pipe
from .pipeline import (
    PipelineSchedule,
    Schedule1F1B,
    ScheduleAuto,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBH1,
    ScheduleZBH2,
    ScheduleZBVZeroBubble,
    get_schedule_class,
)
from .runtime import RankRunner, StepMetrics
from .schedules import generate, schedule_names
from .simulator import Costs, simulate
from .stage import PipelineStage
from .torch_format import from_pipeline_order, read_csv, to_pipeline_order, write_csv
from .traced import build_stage
from .validate import ProgramError, validate

__all__ = [
    "Action",
    "Costs",
    "Kind",
    "Pipe",
    "PipelineCommError",
    "PipelineSchedule",
    "PipelineStage",
    "Program",
    "ProgramError",
    "RankRunner",
    "Schedule1F1B",
    "ScheduleAuto",
    "ScheduleDualPipeV",
    "ScheduleGPipe",
    "ScheduleInterleaved1F1B",
    "ScheduleInterleavedZeroBubble",
    "ScheduleLoopedBFS",
    "ScheduleZBH1",
    "ScheduleZBH2",
    "ScheduleZBVZeroBubble",
    "Split",
    "StepMetrics",
    "build_stage",
    "checkpoint",
    "from_pipeline_order",
    "generate",
    "get_schedule_class",
    "loop_placement",
    "nn",
    "parallel",
    "lower",
    "parse_action",
    "read_csv",
    "recompute",
    "schedule_names",
    "simulate",
    "split",
    "to_pipeline_order",
    "v_placement",
    "validate",
    "write_csv",
]
__version__ = "0.1.0"
