"""Batches into microbatches and outputs back, with torch.distributed.pipelining's chunk specs.

The splitting and merging are torch's own (``split_args_kwargs_into_chunks``, ``merge_chunks``
in ``torch.distributed.pipelining.microbatch``), so ``args_chunk_spec``, ``kwargs_chunk_spec``
and ``output_merge_spec`` mean what they mean there: tensors anywhere in the arguments
(nested in tuples, lists or dicts too) are split along dim 0 unless a ``TensorChunkSpec``
names another dim, ``_Replicate`` (and every non-tensor) is given whole to every microbatch.

Two things torch lets pass are refused here, before any communication: a tensor too short
for ``m`` microbatches (torch would quietly run fewer), and microbatches of unequal size
when the stages agree shapes once (torch would fail later, on some rank, in a transfer).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.pipelining.microbatch import (
    TensorChunkSpec,
    merge_chunks,
    split_args_kwargs_into_chunks,
)
from torch.utils._pytree import tree_flatten


def _check_splits(value: Any, spec: Any, m: int, where: str, equal: bool) -> None:
    """Refuse a tensor the spec splits that does not give m (equal) microbatches."""
    values, _ = tree_flatten(value)
    specs, _ = tree_flatten(spec) if spec is not None else ([None] * len(values), None)
    if len(specs) != len(values):
        raise ValueError(
            f"{where}: the chunk spec has {len(specs)} entries for {len(values)} values; give one "
            "per tensor (TensorChunkSpec(dim) to split, _Replicate() to give it whole)"
        )
    for v, s in zip(values, specs, strict=True):
        if not isinstance(v, torch.Tensor):
            continue
        if s is None:
            dim = 0
        elif isinstance(s, TensorChunkSpec):
            dim = s.split_dim
        else:
            continue  # replicated
        if v.dim() == 0:
            raise ValueError(
                f"{where}: a scalar tensor cannot be split into {m} microbatches; pass it as a "
                "plain number or replicate it with _Replicate() in the chunk spec"
            )
        size = v.shape[dim]
        if size < m or (equal and size % m):
            raise ValueError(
                f"{where}: a batch of {size} along dim {dim} does not split into {m} "
                f"{'equal ' if equal else ''}microbatches; use a batch size divisible by "
                f"n_microbatches={m}"
                + ("" if size < m else ", or build the stages with dynamic_shapes=True")
            )


def split_batch(
    args: tuple,
    kwargs: dict,
    m: int,
    args_spec: tuple | None = None,
    kwargs_spec: dict | None = None,
    *,
    equal: bool = True,
) -> tuple[list[tuple], list[dict]]:
    """``m`` microbatches of ``(args, kwargs)``: torch's split after ppfast's checks.

    ``equal`` (stages that agree shapes once) also requires every split tensor to divide
    evenly; otherwise the first microbatches are one larger, as ``torch.tensor_split`` cuts.
    """
    kwargs = kwargs or {}
    if args_spec is not None and len(args_spec) != len(args):
        raise ValueError(
            f"args_chunk_spec has {len(args_spec)} entries for {len(args)} positional "
            "arguments; give one per argument"
        )
    if kwargs_spec is not None and set(kwargs_spec) != set(kwargs):
        raise ValueError(
            f"kwargs_chunk_spec names {sorted(kwargs_spec)} but step got keyword arguments "
            f"{sorted(kwargs)}; give one entry per keyword argument"
        )
    for i, a in enumerate(args):
        _check_splits(a, None if args_spec is None else args_spec[i], m, f"argument {i}", equal)
    for k, v in kwargs.items():
        spec = None if kwargs_spec is None else kwargs_spec[k]
        _check_splits(v, spec, m, f"argument {k!r}", equal)
    if not args and not kwargs:
        return [()] * m, [{}] * m
    return split_args_kwargs_into_chunks(args, kwargs, m, args_spec, kwargs_spec)


def split_target(target: Any, m: int, *, equal: bool = True) -> list:
    """The loss target's ``m`` microbatches, split like an argument along dim 0."""
    return [a[0] for a in split_batch((target,), {}, m, equal=equal)[0]]


def merge_outputs(chunks: list, spec: Any = None) -> Any:
    """The last stage's per-microbatch outputs as one batch (torch's ``merge_chunks``)."""
    return merge_chunks(chunks, spec)
