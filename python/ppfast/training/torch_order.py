"""A Program as torch.distributed.pipelining's own ``pipeline_order`` (torch's action objects)."""

from __future__ import annotations

from ..program.ir import Program, format_action


def to_pipeline_order(program: Program) -> dict[int, list[object]]:
    """Torch's ``pipeline_order`` form: rank -> list of torch ``_Action``."""
    from torch.distributed.pipelining.schedules import _Action

    return {
        r: [_Action.from_str(format_action(a)) for a in acts]
        for r, acts in enumerate(program.ranks)
    }
