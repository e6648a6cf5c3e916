"""Saving a pipeline's stages, each rank its own shards, and loading them onto as many stages."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

from . import files
from .held import all_gather, group_of, held, spread
from .layout import check_fit, fill, local_runs, resolve, saved_layout
from .optimizer import load_optimizer, merge_optimizer, split_optimizer


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`load` read besides the tensors."""

    step: int | None
    extra: object
    manifest: dict


def save(path, stages, optimizer=None, *, step=None, extra=None, names=None, group=None):
    """Save the given stages' shards to the folder ``path``; collective when stages are spread.

    Every rank calls it with its own stages (PipelineStage(s), or the schedule holding them)
    and their optimizer; each rank writes only its stages' files, and the rank holding stage
    0 writes ``manifest.json`` once all shards are written, so a folder without a manifest is
    an unfinished save. ``step`` goes into the manifest; ``extra`` (e.g. an LR scheduler's
    state_dict) into this rank's files, returned by :func:`load`: tensors, dicts, lists,
    numbers and strings load by default, objects of other classes only when the loader
    trusts the file (``load(..., weights_only=False)``). See :func:`layouts` for ``names``.
    Saving into a folder replaces the checkpoint there.

    >>> save("ckpt/step-100", sched, optimizer, step=100)  # doctest: +SKIP
    """
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise TypeError(f"step must be an int or None, got {type(step).__name__}")
    mine = held(stages)
    n, path = mine[0].num_stages, os.fspath(path)
    os.makedirs(path, exist_ok=True)
    comm = group_of(mine, group) if spread(mine) else None
    first = mine[0].index == 0
    if first:
        files.remove_manifest(path)  # before any shard is replaced
    # one exchange: which stages each rank holds, their runs for automatic names, the save id
    here = {
        "stages": [h.index for h in mine],
        "indexed": local_runs(mine),
        "save_id": uuid.uuid4().hex if first else None,
    }
    everyone = all_gather(here, comm) if comm else [here]
    present = sorted(s for e in everyone for s in e["stages"])
    if present != list(range(n)):
        raise ValueError(
            f"the ranks hold stages {present}, not each of 0..{n - 1} once; every rank of the "
            "pipeline calls save with the stages it holds"
        )
    save_id = next(e["save_id"] for e in everyone if e["save_id"])
    indexed = {s: i for e in everyone for s, i in e["indexed"].items()}
    records, failure = {}, None
    try:
        lays = resolve(mine, names, indexed)
        parts = split_optimizer(optimizer, mine, lays) if optimizer is not None else {}
        for h, lay in zip(mine, lays, strict=True):
            part = parts.get(h.index)
            records[h.index] = files.write_stage(path, h, lay, save_id, part, extra)
    except Exception as e:  # every rank must hear of it, or the others wait forever
        failure = e
    gathered = _agree(comm, failure, "writing its shards", records)
    failure = None
    if first:
        by_stage = {s: r for part in gathered for s, r in part.items()}
        try:
            files.write_manifest(path, save_id, step, [by_stage[s] for s in range(n)])
        except Exception as e:
            failure = e
    _agree(comm, failure, "writing the manifest")


def _agree(comm, failure: Exception | None, what: str, payload=None) -> list:
    """Every rank learns whether any failed (the failing rank raises its own error) and gets
    every rank's ``payload``."""
    if comm is None:
        if failure is not None:
            raise failure
        return [payload]
    import torch.distributed as dist

    error = None if failure is None else f"{type(failure).__name__}: {failure}"
    everyone = all_gather((error, payload), comm)
    if failure is not None:
        raise failure
    bad = {r: e for r, (e, _) in enumerate(everyone) if e}
    if bad:
        raise RuntimeError(
            f"rank {dist.get_rank(comm)}: the checkpoint was not saved; rank(s) {sorted(bad)} "
            f"failed {what}: " + "; ".join(f"rank {r}: {e}" for r, e in sorted(bad.items()))
        )
    return [p for _, p in everyone]


def load(path, stages, optimizer=None, *, names=None, weights_only: bool = True) -> CheckpointInfo:
    """Load the given stages (and their optimizer) from a checkpoint saved on as many stages.

    Each rank reads the manifest and its own stages' shards; nothing is exchanged. Tensors are
    copied into the existing parameters, so schedules and optimizers built on them stay valid,
    and training resumes with the losses it would have had. Each stage's names default to the
    ones it was saved with; see :func:`layouts` for ``names``. Returns the saved step and the
    ``extra`` the rank holding the lowest given stage saved.

    Every file is read with ``torch.load(weights_only=True)``: tensors, dicts, lists, tuples,
    numbers and strings, and nothing that runs code while it loads. An ``extra`` holding
    objects of other classes is refused then; ``weights_only=False`` unpickles it in full,
    which runs whatever code the file names: pass it only for checkpoints you trust.

    >>> info = load("ckpt/step-100", sched, optimizer)  # doctest: +SKIP
    """
    path = os.fspath(path)
    manifest = files.read_manifest(path)
    mine = held(stages)
    n = manifest["num_stages"]
    if mine[0].num_stages != n:
        raise ValueError(
            f"{path} was saved on {n} stages; these stages are of {mine[0].num_stages}. To change "
            "the stage count, gather it into one state_dict and split that: full = "
            "ppfast.checkpoint.gather(path); ppfast.checkpoint.load_full(full, stages, optimizer, "
            "ppfast.checkpoint.gather_optimizer(path))"
        )
    by_index = {r["index"]: r for r in manifest["stages"]}
    recs = [by_index[h.index] for h in mine]
    lays = []
    for h, rec in zip(mine, recs, strict=True):
        lay = saved_layout(h, names, mine, rec)
        check_fit(h, lay, rec["tensors"], f"{path}'s stage {h.index}")
        lays.append(lay)
    if optimizer is not None:
        files.require_optimizer(path, recs, "pass optimizer=None to load the model only")
    shards = [files.read_shard(path, manifest, rec) for rec in recs]
    extra = None
    if recs[0].get("extra_file"):  # read before anything changes: it may be refused
        extra = files.read_extra(path, manifest, recs[0], weights_only)
    for h, lay, shard in zip(mine, lays, shards, strict=True):
        fill(h, lay, shard["model"])
    if optimizer is not None:
        full = merge_optimizer({h.index: s["optimizer"] for h, s in zip(mine, shards, strict=True)})
        load_optimizer(optimizer, full, mine, lays, path)
    return CheckpointInfo(manifest.get("step"), extra, manifest)
