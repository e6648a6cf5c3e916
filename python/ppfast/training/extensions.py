"""What model tools plug into the stage and the schedules, so that neither imports them.

The training API knows nothing of split layers, data-parallel wrappers or tied weights. Each
of those tools registers an :class:`Extension` when its module is imported (``import ppfast``
imports every one that ppfast ships), and the stage and the schedules call what is registered:

``split_layers(module, store)``
    at a stage's construction: gives the layers of ``module`` that defer their weight
    gradients the stage's :class:`~ppfast.training.weight_store.WeightGradStore`, and returns
    their parameters (``ppfast.nn``).
``driver(module, stage_index, split)``
    at a stage's construction: a :class:`Driver` that takes ``module`` through a step, or
    None when this extension does not know the module (``split``: the stage holds split
    layers). DDP and FSDP modules, in ``ppfast.parallel``.
``rank_hooks(context)``
    at a schedule's first step: :class:`StepHooks` around each step of one rank, or None when
    it has nothing to do there. Tied weights' gradient sums, in ``ppfast.model``.

A framework adds its own the same way, with :func:`register`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import nn


class Driver:
    """How a stage takes its module through one step; this base does nothing, as a plain
    module needs."""

    def begin_step(self, m: int) -> None:
        """Before a training step of ``m`` microbatches."""

    def forward(self):
        """Context for each forward of the step."""
        return contextlib.nullcontext()

    def backward(self, outputs):
        """Context for the next backward of this step, from its outputs."""
        return contextlib.nullcontext()

    def end_step(self) -> None:
        """After the stage's last action of the step."""


class StepHooks(Protocol):
    def begin_step(self) -> None: ...

    def end_step(self) -> None: ...


@dataclass(frozen=True)
class RankContext:
    """One rank of a schedule, as its first step sets it up.

    ``group`` is the stages' c10d process group when the transport was built from it (None
    when a transport object was handed in); ``thread_group`` is the
    :class:`~ppfast.runtime.threads.ThreadGroup` of ranks that are threads of one process
    (``ppfast.Pipe``), else None.
    """

    stages: Sequence
    rank: int
    size: int
    group: object | None
    thread_group: object | None
    timeout: float


@dataclass(frozen=True)
class Extension:
    name: str
    split_layers: Callable[[nn.Module, object], list[nn.Parameter]] | None = None
    driver: Callable[[nn.Module, int, bool], Driver | None] | None = None
    rank_hooks: Callable[[RankContext], StepHooks | None] | None = None


# The one registry of the package, filled as the tools' modules are imported. Registration
# replaces an extension of the same name, so importing a module twice changes nothing.
_REGISTERED: dict[str, Extension] = {}


def register(extension: Extension) -> Extension:
    """Make ``extension`` part of every stage and schedule built from now on."""
    if not isinstance(extension, Extension):
        raise TypeError(f"register takes an Extension, got {type(extension).__name__}")
    _REGISTERED[extension.name] = extension
    return extension


def unregister(name: str) -> None:
    """Take the extension ``name`` out again (stages already built keep what it gave them)."""
    _REGISTERED.pop(name, None)


def registered() -> tuple[Extension, ...]:
    return tuple(_REGISTERED.values())


def split_layers(module: nn.Module, store: object) -> list[nn.Parameter]:
    """The parameters of ``module``'s split layers, each once, now attached to ``store``."""
    out: dict[int, nn.Parameter] = {}
    for ext in registered():
        if ext.split_layers is not None:
            for p in ext.split_layers(module, store):
                out.setdefault(id(p), p)
    return list(out.values())


def driver(module: nn.Module, stage_index: int, split: bool) -> Driver:
    """The first registered driver that knows ``module``; the plain one otherwise."""
    for ext in registered():
        if ext.driver is not None:
            d = ext.driver(module, stage_index, split)
            if d is not None:
                return d
    return Driver()


def rank_hooks(context: RankContext) -> list[StepHooks]:
    hooks = (ext.rank_hooks(context) for ext in registered() if ext.rank_hooks is not None)
    return [h for h in hooks if h is not None]
