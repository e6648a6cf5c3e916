"""ppfast: a pipeline-parallel training runtime for PyTorch."""

from ._native import C as _C  # noqa: F401  (raises with build instructions when missing)
from .ir import Action, Kind, Program, loop_placement, parse_action, v_placement
from .torch_format import from_pipeline_order, read_csv, to_pipeline_order, write_csv

__all__ = [
    "Action",
    "Kind",
    "Program",
    "from_pipeline_order",
    "loop_placement",
    "parse_action",
    "read_csv",
    "to_pipeline_order",
    "v_placement",
    "write_csv",
]
__version__ = "0.1.0"
