"""ppfast: a pipeline-parallel training runtime for PyTorch."""

# The model tools register their parts of the stage and the schedules as they are imported
# (ppfast.training.extensions), so every one of them is imported here.
from . import checkpoint, nn, parallel, recompute
from ._native import C as _C  # noqa: F401  (raises with build instructions when missing)
from .model import ties as _ties  # noqa: F401
from .model.partition import Split, split
from .parallel.clip import clip_grad_norm_
from .program.ir import Action, Kind, Program, loop_placement, parse_action, v_placement
from .program.lowering import lower
from .program.schedules import generate, schedule_names
from .program.simulator import Costs, simulate
from .program.torch_format import from_pipeline_order, read_csv, write_csv
from .program.validate import ProgramError, validate
from .runtime.errors import PipelineCommError
from .runtime.metrics import StepMetrics
from .runtime.runner import RankRunner
from .training.batch_loss import BatchLoss
from .training.grad_scaler import GradScaler
from .training.pipe import Pipe
from .training.pipeline import PipelineSchedule
from .training.schedule_classes import (
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
from .training.stage import PipelineStage
from .training.torch_order import to_pipeline_order
from .training.traced import build_stage

__all__ = [
    "Action",
    "BatchLoss",
    "GradScaler",
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
    "clip_grad_norm_",
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
