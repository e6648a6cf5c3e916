"""The checkpoint folder: manifest, stage shards and ``extra`` files, each written atomically.

::

    manifest.json                   written last: a checkpoint without it is incomplete
    stage-00000-of-00002.pt         stage 0's state_dict and optimizer state, by full-model name
    stage-00001-of-00002.pt
    stage-00001-of-00002.extra.pt   ``extra`` of the rank holding stage 1, when one was given

Shards hold tensors, containers, numbers and strings only, and are read with
``torch.load(weights_only=True)``. So is ``extra`` unless the caller trusts the file and asks
for full unpickling, which can run any code the file names.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .layout import StageLayout, meta

if TYPE_CHECKING:
    from .held import Held

FORMAT = "ppfast-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"


def stage_file(s: int, n: int, suffix: str = ".pt") -> str:
    return f"stage-{s:05d}-of-{n:05d}{suffix}"


def atomic(path: str, write: Callable) -> None:
    """Write through a temporary file and a rename, so a crash never leaves half a file."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _kinds(module: nn.Module) -> dict[str, str]:
    kinds = {k: "parameter" for k, _ in module.named_parameters(remove_duplicate=False)}
    kinds.update({k: "buffer" for k, _ in module.named_buffers(remove_duplicate=False)})
    return kinds


def _record(h: Held, lay: StageLayout, has_optimizer: bool, has_extra: bool) -> dict:
    sd, kinds = h.module.state_dict(), _kinds(h.module)
    local_of = {id(p): k for k, p in h.module.named_parameters(remove_duplicate=False)}
    n = h.num_stages
    return {
        "index": h.index,
        "file": stage_file(h.index, n),
        "extra_file": stage_file(h.index, n, ".extra.pt") if has_extra else None,
        "optimizer": has_optimizer,
        "names": lay.names,
        "tensors": {
            lay.names[k]: {**meta(v), "kind": kinds.get(k, "extra_state")} for k, v in sd.items()
        },
        "tied": {key: lay.names[local_of[id(p)]] for key, p in sorted(h.tied.items())},
    }


# ---------------------------------------------------------------------------- writing


def write_stage(path: str, h: Held, lay: StageLayout, save_id: str, optimizer, extra) -> dict:
    """Write stage ``h``'s shard (its state by full-model name, and ``optimizer``, its part of
    the optimizer state, or None) and, unless None, ``extra``; returns its manifest record."""
    rec = _record(h, lay, optimizer is not None, extra is not None)
    shard = {
        "format": FORMAT,
        "version": VERSION,
        "save_id": save_id,
        "stage": h.index,
        "num_stages": h.num_stages,
        "model": {
            lay.names[k]: v.detach() if torch.is_tensor(v) else v
            for k, v in h.module.state_dict().items()
        },
        "optimizer": optimizer,
    }
    atomic(os.path.join(path, rec["file"]), lambda f: torch.save(shard, f))
    if extra is not None:
        saved = {"save_id": save_id, "extra": extra}
        atomic(os.path.join(path, rec["extra_file"]), lambda f: torch.save(saved, f))
    return rec


def remove_manifest(path: str) -> None:
    """Mark the folder's checkpoint unfinished, before any of its shards is replaced."""
    if os.path.exists(os.path.join(path, MANIFEST)):
        os.remove(os.path.join(path, MANIFEST))


def write_manifest(path: str, save_id: str, step: int | None, records: list[dict]) -> None:
    """The last file of a save: its presence says every shard is written."""
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "save_id": save_id,
        "num_stages": len(records),
        "step": step,
        "torch_version": torch.__version__,
        "stages": records,
    }
    text = json.dumps(manifest, indent=1).encode()
    atomic(os.path.join(path, MANIFEST), lambda f: f.write(text))


# ---------------------------------------------------------------------------- reading


def read_manifest(path) -> dict:
    """The checkpoint's manifest (num_stages, step, and each stage's names, shapes, dtypes)."""
    path = os.fspath(path)
    file = os.path.join(path, MANIFEST)
    if not os.path.exists(file):
        has_shards = os.path.isdir(path) and any(f.startswith("stage-") for f in os.listdir(path))
        raise FileNotFoundError(
            f"{file} is missing: "
            + (
                "the folder holds stage shards but its save did not finish (the manifest is "
                "written last); use an earlier checkpoint"
                if has_shards
                else "this is not a ppfast checkpoint folder"
            )
        )
    with open(file) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT or manifest.get("version", 0) > VERSION:
        raise ValueError(
            f"{file}: format {manifest.get('format')!r} version {manifest.get('version')} is not "
            f"one this ppfast reads ({FORMAT!r} up to version {VERSION})"
        )
    for rec in manifest.get("stages", []):
        for key in ("file", "extra_file"):
            if rec.get(key) is not None:
                _confined(file, rec[key])
    return manifest


def _confined(manifest_file: str, name: object) -> None:
    """A file the manifest names must be a plain file name in the checkpoint's own folder: a
    manifest from elsewhere must not make a load read (or a later save overwrite) a file
    outside it."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or os.path.basename(name) != name
        or "/" in name
        or "\\" in name
        or "\0" in name
    ):
        raise ValueError(
            f"{manifest_file} names the file {name!r}, which is not a plain file name in the "
            "checkpoint's folder; the manifest is corrupt or was not written by ppfast"
        )


def require_optimizer(path: str, records: list[dict], hint: str) -> None:
    """Raise unless every one of ``records`` was saved with its optimizer state."""
    lacking = [r["index"] for r in records if not r["optimizer"]]
    if lacking:
        raise ValueError(
            f"{path} holds no optimizer state for stages {lacking} (saved without "
            f"optimizer=); {hint}"
        )


def _read(path: str, manifest: dict, rec: dict, key: str, what: str, **load) -> dict:
    file = os.path.join(path, rec[key])
    if not os.path.exists(file):
        raise FileNotFoundError(
            f"{file} is missing: stage {rec['index']}'s {what} of the checkpoint in {path}; copy "
            "every stage-*.pt file of the checkpoint along with manifest.json"
        )
    saved = torch.load(file, map_location="cpu", **load)
    stage = saved.get("stage", rec["index"])  # an extra file names no stage
    if saved.get("save_id") != manifest["save_id"] or stage != rec["index"]:
        raise ValueError(
            f"{file} belongs to another save than {os.path.join(path, MANIFEST)} (a stale or "
            "mixed-in file); the checkpoint is inconsistent, use another one"
        )
    return saved


def read_shard(path: str, manifest: dict, rec: dict) -> dict:
    """Stage ``rec``'s shard, checked against the manifest."""
    try:
        shard = _read(path, manifest, rec, "file", "shard", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{os.path.join(path, rec['file'])} holds an object that a safe load "
            "(torch.load(weights_only=True)) refuses; shards hold tensors only, apart from a "
            "module's get_extra_state(), which must then return tensors, containers, numbers "
            "and strings (or allow its classes with torch.serialization.add_safe_globals)"
        ) from e
    for name, m in rec["tensors"].items():
        v = shard["model"].get(name)
        if v is None or meta(v)["shape"] != m["shape"]:
            raise ValueError(
                f"{os.path.join(path, rec['file'])}: '{name}' does not match the manifest; the "
                "file is damaged"
            )
    return shard


def read_extra(path: str, manifest: dict, rec: dict, weights_only: bool):
    """The ``extra`` saved with stage ``rec``. Unpickled in full only with ``weights_only``
    False: a file from elsewhere could name any function to call while it loads."""
    try:
        saved = _read(path, manifest, rec, "extra_file", "extra", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if not weights_only:
            raise
        found = re.search(r"GLOBAL (\S+)", str(e))
        named, listed = (f" ({found[1]})", f"[{found[1]}]") if found else ("", "[...]")
        raise ValueError(
            f"{os.path.join(path, rec['extra_file'])}: the extra saved with stage {rec['index']} "
            f"holds an object of a class{named} that a safe load (torch.load(weights_only=True)) "
            "refuses, since unpickling it can run code. If you trust this checkpoint, pass "
            "weights_only=False: ppfast.checkpoint.load(path, stages, optimizer, "
            f"weights_only=False); or allow the class with torch.serialization.add_safe_globals("
            f"{listed}); or save an extra of tensors, dicts, lists, numbers and strings only"
        ) from e
    return saved["extra"]
