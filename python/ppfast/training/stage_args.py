"""Checks of what PipelineStage is given: tied parameters, torch's shape hints, the device."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def check_tied(tied: object, module: nn.Module, stage: int) -> dict[str, nn.Parameter]:
    """``PipelineStage``'s ``tied`` argument, checked."""
    if tied is None:
        return {}
    if not isinstance(tied, Mapping):
        raise TypeError(
            f"tied must be a dict of name -> nn.Parameter (e.g. {{'wte': head.weight}}), got "
            f"{type(tied).__name__}"
        )
    own = {id(p) for p in module.parameters()}
    for key, p in tied.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"stage {stage}: tied keys must be non-empty strings, got {key!r}")
        if not isinstance(p, nn.Parameter):
            raise TypeError(
                f"stage {stage}: tied[{key!r}] must be an nn.Parameter of the stage's module, "
                f"got {type(p).__name__}"
            )
        if id(p) not in own:
            raise ValueError(
                f"stage {stage}: tied[{key!r}] is not a parameter of this stage's module; pass "
                "the stage's own parameter (e.g. stage_module.head.weight)"
            )
    return dict(tied)


def meta_of(value) -> tuple | None:
    """(shape, dtype) of each tensor of a hint or of real tensors; None for no hint."""
    if value is None:
        return None
    tensors = (value,) if isinstance(value, torch.Tensor) else tuple(value)
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


def describe(meta: tuple) -> str:
    return ", ".join(f"{str(d).removeprefix('torch.')}{list(s)}" for s, d in meta)


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")
