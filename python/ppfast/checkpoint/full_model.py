"""The full model's state from a checkpoint's shards, and split again over any stage count."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from . import files
from .held import Held, held, spread
from .layout import StageLayout, check_fit, fill, layouts_of, meta
from .optimizer import load_optimizer, merge_optimizer, same


def gather(path) -> dict[str, torch.Tensor]:
    """The full model's state_dict from every shard of the checkpoint in ``path`` (reads files
    only, on any process). It loads with ``model.load_state_dict(full, strict=True)`` into the
    unsplit model. A name several stages hold (a tied weight) appears once; its copies must
    be equal.

    >>> model.load_state_dict(gather("ckpt/step-100"))  # doctest: +SKIP
    """
    path = os.fspath(path)
    manifest = files.read_manifest(path)
    full: dict[str, torch.Tensor] = {}
    held_by: dict[str, int] = {}
    for rec in manifest["stages"]:
        shard = files.read_shard(path, manifest, rec)
        for name in rec["tensors"]:
            v = shard["model"][name]
            if name in full and not same(full[name], v):
                raise ValueError(
                    f"'{name}' differs between stages {held_by[name]} and {rec['index']} in "
                    f"{path}; copies of a tied weight must be equal (declare them with "
                    "PipelineStage(tied=...)), or map them to different names"
                )
            full.setdefault(name, v)
            held_by.setdefault(name, rec["index"])
    return full


def gather_optimizer(path) -> dict:
    """The optimizer state of every stage, by full-model parameter name: ``{"state": {name:
    per-parameter state}, "param_groups": [settings + "params": [names]]}``, for
    :func:`load_full`. Stages' parameter groups with equal settings are merged."""
    path = os.fspath(path)
    manifest = files.read_manifest(path)
    recs = manifest["stages"]
    files.require_optimizer(path, recs, "gather(path) reads the model alone")
    return merge_optimizer(
        {r["index"]: files.read_shard(path, manifest, r)["optimizer"] for r in recs}
    )


def shard(full_state_dict: Mapping, stages, *, names=None, group=None) -> dict[int, dict]:
    """The given stages' shares of a full state_dict: ``{stage_index: state_dict}`` with the
    stage modules' own keys, ready for ``load_state_dict(strict=True)``. ``stages`` are stage
    modules as elsewhere (collective when they sit on several ranks: automatic names need every
    stage's size), or :class:`StageLayout` objects (from :func:`layouts`), used as they are.

    >>> parts = shard(model.state_dict(), [model[0:4], model[4:6], model[6:8]])  # doctest: +SKIP
    """
    if isinstance(stages, StageLayout) or (
        isinstance(stages, (list, tuple)) and stages and isinstance(stages[0], StageLayout)
    ):
        lays = [stages] if isinstance(stages, StageLayout) else list(stages)
        missing = sorted({f for lay in lays for f in lay.names.values()} - set(full_state_dict))
        if missing:
            raise ValueError(f"the full state_dict lacks {missing[:5]} that the layouts name")
    else:
        _, lays = _fitted(full_state_dict, stages, names, group)
    return {lay.stage_index: {k: full_state_dict[f] for k, f in lay.names.items()} for lay in lays}


def load_full(
    full_state_dict: Mapping,
    stages,
    optimizer=None,
    optimizer_state=None,
    *,
    names=None,
    group=None,
) -> None:
    """Load the given stages from a full state_dict (e.g. :func:`gather`'s) and their
    ``optimizer`` from ``optimizer_state`` (:func:`gather_optimizer`'s), on any stage count.
    Collective when the stages sit on several ranks. See :func:`layouts` for ``names``.

    >>> full = gather("ckpt/step-100")  # saved on 2 stages, resumed on 3  # doctest: +SKIP
    >>> load_full(full, sched, optimizer, gather_optimizer("ckpt/step-100"))  # doctest: +SKIP
    """
    if (optimizer is None) != (optimizer_state is None):
        raise ValueError(
            "pass optimizer and optimizer_state together (optimizer_state from "
            "gather_optimizer(path)), or neither"
        )
    mine, lays = _fitted(full_state_dict, stages, names, group)
    for h, lay in zip(mine, lays, strict=True):
        fill(h, lay, full_state_dict)
    if optimizer is not None:
        load_optimizer(optimizer, optimizer_state, mine, lays, "optimizer_state")


def _fitted(full: Mapping, stages, names, group) -> tuple[list[Held], list[StageLayout]]:
    """The given stages and their layouts, checked against the full state_dict: each stage's
    names, shapes and dtypes are there, and, when every stage is given, nothing else is."""
    mine = held(stages)
    lays = layouts_of(mine, names, group)
    tensors = {k: meta(v) for k, v in full.items()}
    for h, lay in zip(mine, lays, strict=True):
        sub = {n: tensors[n] for n in set(lay.names.values()) if n in tensors}
        missing = sorted(set(lay.names.values()) - set(sub))
        if missing:
            raise ValueError(
                f"the full state_dict lacks stage {h.index}'s {missing[:5]}; it is not this "
                "model's, or names= maps the stage elsewhere"
            )
        check_fit(h, lay, sub, "the full state_dict")
    if not spread(mine):
        used = {n for lay in lays for n in lay.names.values()}
        unused = [k for k in full if k not in used]
        if unused:
            raise ValueError(
                f"no stage holds {unused[:5]} of the full state_dict; the stages do not cover "
                "the model, or names= maps them elsewhere"
            )
    return mine, lays
