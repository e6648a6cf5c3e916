"""A meeting point for ranks that are threads of one process (ppfast.Pipe).

Ranks publish a Python object each, meet at a barrier, and then read (never write) what the
others published; a second meeting tells a rank that everyone has read, so its slot may be
reused. Work between ranks that are threads (tied weights' sums) goes through here; a failing
rank aborts it and wakes every waiting rank with a :class:`PipelineCommError`.
"""

from __future__ import annotations

import threading

from .errors import PipelineCommError


class ThreadGroup:
    """``size`` thread ranks; every wait ends after ``timeout`` seconds."""

    def __init__(self, size: int, timeout: float = 300.0):
        self.size = size
        self.timeout = timeout
        self._barrier = threading.Barrier(size)
        self._slots: list = [None] * size

    def abort(self) -> None:
        """Wake every rank waiting here (a rank failed); they raise PipelineCommError."""
        self._barrier.abort()

    def meet(self, rank: int, what: str) -> None:
        """Wait until every rank is here."""
        try:
            self._barrier.wait(self.timeout)
        except threading.BrokenBarrierError:
            raise PipelineCommError(
                f"rank {rank}: another rank failed or did not arrive within {self.timeout:g} s "
                f"while {what}",
                rank,
                what,
                -1,
                False,
            ) from None

    def publish(self, rank: int, obj: object, what: str) -> list:
        """Every rank's ``obj``, by rank; valid until this rank's next :meth:`meet`, which every
        rank must call once it has read what it needs."""
        self._slots[rank] = obj
        self.meet(rank, what)
        return list(self._slots)
