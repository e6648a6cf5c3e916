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

``checksum`` (default: the environment variable ``PPFAST_CHECKSUM``, 0 or 1) follows every
message with a hash of its bytes, its tag and the step, which the receiver checks before the
data is used: a payload corrupted, duplicated, dropped or swapped in transit then fails the
step with PipelineCommError naming the peer instead of training on. Every rank must agree.
"""

from __future__ import annotations

import os

from .._native import C
from ..program.engine import encode_rank
from ..program.ir import Program, format_action
from ..program.validate import validate
from .metrics import DeferredStepMetrics, StepMetrics


def checksum_from_env() -> bool:
    """PPFAST_CHECKSUM=1: every message carries a hash its receiver checks (every rank must
    set it alike; the first step's headers compare)."""
    value = os.environ.get("PPFAST_CHECKSUM", "0").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"PPFAST_CHECKSUM is 0 or 1, not {value!r}")
    return value == "1"


# transports (by name) that pair a send with its receive by tag; any other pairs by order
TAG_MATCHED = ("shm", "in-process", "c10d:gloo")


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
        checksum: bool | None = None,
    ):
        if not 0 <= rank < program.p:
            raise ValueError(f"rank {rank} is outside the program's {program.p} ranks")
        size = getattr(transport, "size", program.p)
        if size != program.p:
            raise ValueError(
                f"the program has {program.p} ranks but the transport connects {size}; build "
                "the program for the group's size"
            )
        # checked before anything is sent; lowered here if it has no communication yet. Only
        # transports known to match by tag may run a program whose pairs post out of order.
        name = getattr(transport, "name", "")
        matching = "tag" if name in TAG_MATCHED else "order"
        self.program = validate(program, matching=matching)
        self.rank = rank
        self.transport = transport
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
            checksum_from_env() if checksum is None else checksum,
        )
        self.last: dict | None = None

    def abort(self, why: str) -> None:
        """Give up, from any thread: this rank's waits fail, and so do its peers' (at once over
        shared memory, in-process, and c10d with a store; else when their wait times out)."""
        self.transport.abort(why)

    def set_timeout(self, seconds: float) -> None:
        self._executor.set_timeout_ms(int(seconds * 1000))

    def step(self) -> StepMetrics:
        """Run the program once. On a device with streams this returns before the device has
        finished: the metrics wait for it when first read (read them before two more steps)."""
        res = self._executor.step()
        self.last = res
        if not res["on_device"]:
            return self._metrics(res)
        return DeferredStepMetrics(self.rank, lambda: self._metrics(self._device_times(res)))

    def _device_times(self, res: dict) -> dict:
        if "device" not in res:  # the device's times of compute; the host's of transfers
            dev = self._executor.device_times(res["index"])
            res["device"] = {**res, "start": dev["start"], "end": dev["end"], "wall": dev["wall"]}
        return res["device"]

    def _metrics(self, times: dict) -> StepMetrics:
        acts = self.program.ranks[self.rank]
        compute = [k for k, a in enumerate(acts) if a.is_compute]
        return StepMetrics.from_times(self.rank, times, self.names, compute)

    def timeline(self) -> list[tuple[int, object, float, float]]:
        """The last step's compute actions as (rank, action, start, end), for ppfast.program.draw.

        Times are seconds on the machine's steady clock, which every process of one machine
        shares, so timelines of several ranks line up.
        """
        if self.last is None:
            return []
        times = self._device_times(self.last) if self.last["on_device"] else self.last
        acts = self.program.ranks[self.rank]
        t0 = times["epoch"]
        return [
            (self.rank, a, t0 + times["start"][k], t0 + times["end"][k])
            for k, a in enumerate(acts)
            if a.is_compute
        ]
