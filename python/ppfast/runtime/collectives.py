"""Waits and object exchanges over a c10d group, bounded by ppfast's timeout.

torch's own ``all_gather_object`` and ``Work.wait()`` without an argument wait as long as the
process group allows (often 30 minutes or more); a rank that is gone must instead fail its
peers within the timeout the user gave ppfast, as a :class:`PipelineCommError`.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from datetime import timedelta

import torch

from .errors import PipelineCommError, is_timeout

# Builds the error for a failed wait from (why, timed_out); each caller names itself in it.
Fail = Callable[[str, bool], PipelineCommError]


def wait(work, timeout: float, fail: Fail, what: str) -> None:
    """Wait for ``work`` at most ``timeout`` seconds; raise ``fail(...)`` if it fails or expires."""
    try:
        ok = work.wait(timedelta(seconds=timeout))
    except RuntimeError as e:
        raise fail(f"{what}: {e}", is_timeout(e)) from e
    if ok is False:
        raise fail(f"{what}: no answer", True)


def gather_objects(obj: object, group, timeout: float, fail: Fail, what: str) -> list:
    """Every rank's ``obj`` (picklable), in group rank order: ``all_gather_object`` whose waits
    end after ``timeout`` seconds."""
    import torch.distributed as dist

    size = dist.get_world_size(group)
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    work = dist.all_gather(sizes, torch.tensor([data.numel()]), group=group, async_op=True)
    wait(work, timeout, fail, what)
    n = max(int(s) for s in sizes)
    padded = torch.zeros(n, dtype=torch.uint8)
    padded[: data.numel()] = data
    parts = [torch.empty(n, dtype=torch.uint8) for _ in range(size)]
    wait(dist.all_gather(parts, padded, group=group, async_op=True), timeout, fail, what)
    return [
        pickle.loads(part[: int(s)].numpy().tobytes()) for part, s in zip(parts, sizes, strict=True)
    ]


def all_reduce(
    value: torch.Tensor, group, timeout: float, action: str, what: str, op: str = "sum"
) -> torch.Tensor:
    """``value`` reduced (``op``: "sum", "max" or "min") in place over ``group``, waiting at
    most ``timeout`` seconds; a failure or a timeout is a PipelineCommError naming this rank
    of the group and ``action``. Nothing is sent over a group of one."""
    import torch.distributed as dist

    if dist.get_world_size(group) == 1:
        return value
    rank = dist.get_rank(group)

    def fail(why: str, timed_out: bool) -> PipelineCommError:
        return PipelineCommError(
            f"rank {rank}: {why} (waited up to {timeout:g} s)", rank, action, -1, timed_out
        )

    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    wait(dist.all_reduce(value, op=ops[op], group=group, async_op=True), timeout, fail, what)
    return value
