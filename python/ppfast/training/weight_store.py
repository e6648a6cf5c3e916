"""A stage's queue of weight-gradient work: filled by its I actions, emptied by its W actions."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .grad_hooks import HookRouter


class WeightGradStore:
    """Weight-gradient work of one stage, keyed by microbatch.

    The stage opens a backward with :meth:`backward` (``defer=True`` for an I, False for a
    full B); split layers hand their weight-gradient work to :meth:`put`, which runs it at once
    unless it is deferred, in which case the stage's W action runs it with :meth:`flush`. Every
    stage has its own store; nothing here is shared between stages or processes.

    Within a step (:meth:`begin_step`, with the number of microbatches) the store also counts
    the microbatches whose weight gradients are complete (at their B, or at their W) and tells
    its ``router`` when the last one is, so that parameters with hooks see their gradient once
    per step (see :class:`~ppfast.training.grad_hooks.HookRouter`).
    """

    def __init__(self, name: str = "stage", enabled: bool = True):
        self.name = name
        # False when the stage's schedule has no W: split layers then run as plain nn.Linear
        self.enabled = enabled
        self.router: HookRouter | None = None
        self.stage: int = 0
        self._pending: dict[int, list[tuple[str, Callable[[], None]]]] = {}
        self._opened: set[int] = set()  # microbatches whose I deferred work to a W
        self._mb: int | None = None
        self._defer = False
        self._left: int | None = None  # microbatches of this step whose weight grads are due

    def begin_step(self, m: int) -> None:
        """A step of ``m`` microbatches starts: each will finish its weight gradients once."""
        self._left = m

    def backward(self, mb: int, defer: bool) -> _Open:
        """Context for the backward of microbatch ``mb``."""
        return _Open(self, mb, defer)

    def put(self, layer: str, work: Callable[[], None]) -> None:
        """Run ``work`` now, or keep it for this microbatch's W when the backward defers."""
        if self._defer and self._mb is not None:
            self._pending.setdefault(self._mb, []).append((layer, work))
        else:
            work()

    @property
    def deferring(self) -> bool:
        return self._defer and self._mb is not None

    @property
    def in_step(self) -> bool:
        """Between :meth:`begin_step` and the end-of-step check."""
        return self._left is not None

    @property
    def routing(self) -> HookRouter | None:
        """The router while a step is under way and some split parameter of this rank has
        hooks, else None (outside a step, split layers leave gradients to autograd)."""
        router = self.router
        if router is None or not self._left or not router.active:
            return None
        return router

    def flush(self, mb: int) -> None:
        """Run the deferred weight-gradient work of microbatch ``mb`` (the W action)."""
        if mb not in self._opened:
            raise RuntimeError(
                f"{self.name}: W of microbatch {mb} comes without its I (or after a full "
                "backward B, which already computed the weight gradients)"
            )
        self._opened.discard(mb)
        for _, fn in self._pending.pop(mb, []):
            fn()
        self._complete()

    def _complete(self) -> None:
        if self._left is None:
            return
        self._left -= 1
        if self._left == 0 and self.router is not None:
            self.router.stage_done(self.stage)

    def pending(self) -> dict[int, list[str]]:
        return {mb: [layer for layer, _ in work] for mb, work in self._pending.items()}

    def check_empty(self) -> None:
        """At the end of a step: every I's weight gradients must have been taken by a W."""
        self._left = None
        if self._pending or self._opened:
            mb = min(set(self._pending) | self._opened)
            work = self._pending.get(mb, [])
            layers = ", ".join(sorted({layer for layer, _ in work})) or "no split layer ran"
            self._pending.clear()
            self._opened.clear()
            raise RuntimeError(
                f"{self.name}: the weight gradients of microbatch {mb} ({layers}) were never "
                "computed: the schedule has an I without its W"
            )
        if self.router is not None:
            self.router.check_empty()


class _Open:
    def __init__(self, store: WeightGradStore, mb: int, defer: bool):
        self.store, self.mb, self.defer = store, mb, defer

    def __enter__(self) -> WeightGradStore:
        self.store._mb, self.store._defer = self.mb, self.defer
        if self.defer:
            self.store._opened.add(self.mb)
        return self.store

    def __exit__(self, exc_type, *exc) -> None:
        self.store._mb, self.store._defer = None, False
        if exc_type is None and not self.defer:
            self.store._complete()  # a full backward finished this microbatch's weights
