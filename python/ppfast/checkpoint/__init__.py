"""Stage checkpoints: each stage saves and loads its own shard, named as in the full model.

A checkpoint is a folder::

    manifest.json                   written last: a checkpoint without it is incomplete
    stage-00000-of-00002.pt         stage 0's state_dict and optimizer state, by full-model name
    stage-00001-of-00002.pt
    stage-00001-of-00002.extra.pt   ``extra`` of the rank holding stage 1, when one was given

Every name in the shards is the parameter's or buffer's name in the unsplit model, so a
checkpoint is independent of how ranks held the stages, and :func:`gather` turns it into one
state_dict for the unsplit model, which :func:`load_full` splits again over any number of
stages. Where a stage's names sit in the full model comes from ``names=`` (see
:func:`layouts`); stages cut from one ``nn.Sequential`` (or ``ModuleList``) need none.

Usage, on every rank::

    import ppfast.checkpoint as ckpt

    ckpt.save("ckpt/step-100", sched, optimizer, step=100)  # sched: PipelineSchedule
    info = ckpt.load("ckpt/step-100", sched, optimizer)  # same stage count; info.step == 100

    # on 3 stages what was saved on 2: every rank reads the full state and keeps its share
    full = ckpt.gather("ckpt/step-100")
    ckpt.load_full(full, sched3, optimizer3, ckpt.gather_optimizer("ckpt/step-100"))

``save``, ``load_full``, ``shard`` and ``layouts`` are collective over the stages' process
group when the stages sit on several ranks (every rank calls them); ``load``, ``gather`` and
``gather_optimizer`` read files only. docs/checkpoints.md has the details.
"""

from __future__ import annotations

import copy
import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..stage import PipelineStage

FORMAT = "ppfast-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
_CONTAINERS = (nn.Sequential, nn.ModuleList)


@dataclass(frozen=True)
class StageLayout:
    """Where one stage module's state sits in the full model: ``names`` maps each key of the
    stage module's ``state_dict()`` to the key of the same tensor in the full model's."""

    stage_index: int
    num_stages: int
    names: dict[str, str]


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`load` read besides the tensors."""

    step: int | None
    extra: object
    manifest: dict


@dataclass(frozen=True)
class _Held:
    index: int
    num_stages: int
    module: nn.Module
    tied: dict
    group: object | None


# ---------------------------------------------------------------------------- stages


def _held(stages) -> list[_Held]:
    """This process's stages, by index: PipelineStage(s), a schedule or Pipe holding them, or
    plain modules (a list of them is the whole model's stages, in order)."""
    if not isinstance(stages, nn.Module) and hasattr(stages, "schedules"):  # ppfast.Pipe
        stages = [s for sched in stages.schedules for s in sched.stages]
    elif not isinstance(stages, nn.Module) and hasattr(stages, "stages"):  # a schedule
        stages = stages.stages
    if isinstance(stages, (PipelineStage, nn.Module)):
        stages = [stages]
    stages = list(stages)
    if stages and all(isinstance(s, PipelineStage) for s in stages):
        held = [_Held(s.stage_index, s.num_stages, s.submod, s.tied, s.group) for s in stages]
    elif stages and all(isinstance(s, nn.Module) for s in stages):
        held = [_Held(i, len(stages), m, {}, None) for i, m in enumerate(stages)]
    else:
        raise TypeError(
            "stages must be a PipelineStage, a list of them, a schedule or ppfast.Pipe holding "
            "them, or a list of every stage's nn.Module in order"
        )
    held.sort(key=lambda h: h.index)
    if len({h.index for h in held}) != len(held):
        raise ValueError(f"stage indices repeat: {[h.index for h in held]}; pass each once")
    if len({h.num_stages for h in held}) != 1:
        raise ValueError("the stages disagree on num_stages; pass stages of one pipeline")
    return held


def _spread(held: list[_Held]) -> bool:
    return len(held) < held[0].num_stages


def _group(held: list[_Held], group):
    """The process group to reach the other stages' ranks."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            f"this process holds stages {[h.index for h in held]} of {held[0].num_stages} and "
            "torch.distributed is not initialized, so the others cannot be reached: call this "
            "on every rank after dist.init_process_group, or pass every stage (e.g. a Pipe)"
        )
    return group or held[0].group or dist.group.WORLD


def _all_gather(obj, group) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


# ---------------------------------------------------------------------------- names


def _indexed(module: nn.Module) -> tuple[str, int, int] | None:
    """(prefix, first index, length) when all of the module's state sits under the numbered
    children of one nn.Sequential/ModuleList reached through single children (``"blocks."``
    for a module whose only child is ``blocks``); else None."""
    keys = list(module.state_dict())
    prefix, mod = "", module
    while not isinstance(mod, _CONTAINERS):
        children = list(mod.named_children())
        if len(children) != 1 or any(not k.startswith(f"{prefix}{children[0][0]}.") for k in keys):
            return None
        prefix, mod = f"{prefix}{children[0][0]}.", children[0][1]
    if not mod._modules or not all(k.isdigit() for k in mod._modules):
        return None
    idx = sorted(int(k) for k in mod._modules)
    if idx[-1] - idx[0] + 1 != len(idx):
        return None
    return prefix, idx[0], len(idx)


def _offset(keys, prefix: str, first: int, start: int) -> dict[str, str]:
    out = {}
    for k in keys:
        i, _, tail = k[len(prefix) :].partition(".")
        out[k] = f"{prefix}{start + int(i) - first}.{tail}"
    return out


def _spec_for(names, h: _Held, held: list[_Held]):
    if isinstance(names, Mapping) and all(isinstance(k, int) for k in names):
        return names.get(h.index)  # {stage_index: spec}; {} is "all automatic"
    if len(held) > 1 and isinstance(names, (int, Mapping)):
        raise ValueError(
            f"names= gives one stage's names, but stages {[x.index for x in held]} are given "
            "here; pass {stage_index: spec} with a spec per stage"
        )
    return names


def _resolve(h: _Held, spec, indexed: dict[int, tuple | None] | None) -> StageLayout:
    keys = list(h.module.state_dict())
    where = f"stage {h.index}"
    if spec is None:
        if h.num_stages == 1:
            names = {k: k for k in keys}
        else:
            assert indexed is not None
            bad = next((s for s in range(h.num_stages) if indexed.get(s) is None), None)
            prefixes = {indexed[s][0] for s in range(h.num_stages)} if bad is None else set()
            if bad is not None or len(prefixes) != 1:
                raise ValueError(
                    f"cannot tell where {where}'s state sits in the full model: "
                    + (
                        f"stage {bad}'s module is not a run of numbered children of one "
                        "nn.Sequential/ModuleList"
                        if bad is not None
                        else f"the stages' numbered children sit under different paths "
                        f"{sorted(prefixes)}"
                    )
                    + "; pass names= for each stage: an int (full-model index of its first "
                    "numbered child), a str prefix, a dict {stage key: full-model key} or a "
                    "callable"
                )
            prefix, first, _ = indexed[h.index]
            start = sum(indexed[s][2] for s in range(h.index))
            names = _offset(keys, prefix, first, start)
    elif isinstance(spec, nn.Module):
        names = _by_identity(h, spec)
    elif isinstance(spec, bool) or not isinstance(spec, (int, str, Mapping, Callable)):
        raise TypeError(
            f"{where}: names must be None, the full model, an int offset, a str prefix, a dict "
            f"or a callable, got {type(spec).__name__}"
        )
    elif isinstance(spec, int):
        info = _indexed(h.module)
        if info is None:
            raise ValueError(
                f"{where}: names={spec} (an offset) needs a module whose state sits under the "
                "numbered children of one nn.Sequential/ModuleList; pass a dict or a prefix"
            )
        names = _offset(keys, info[0], info[1], spec)
    elif isinstance(spec, str):
        names = {k: spec + k for k in keys}
    elif isinstance(spec, Mapping):
        missing = [k for k in keys if k not in spec]
        unknown = [k for k in spec if k not in set(keys)]
        if missing or unknown:
            raise ValueError(
                f"{where}: names must map every key of the stage module's state_dict: missing "
                f"{missing[:5]}, not in the module {unknown[:5]}"
            )
        names = {k: spec[k] for k in keys}
    else:
        names = {k: spec(k) for k in keys}
        if not all(isinstance(v, str) for v in names.values()):
            raise TypeError(f"{where}: the names callable must return str full-model keys")
    _check_unique(h, names)
    return StageLayout(h.index, h.num_stages, names)


def _by_identity(h: _Held, model: nn.Module) -> dict[str, str]:
    """Names of a stage that holds the model's own layer objects: each key is the full-model
    key of the same attribute of the same module object (so a tied weight keeps the name of
    the layer that holds it on this stage)."""
    full_keys = set(model.state_dict())
    owners: dict[tuple[int, str], str] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        for attr in (*mod._parameters, *mod._buffers, "_extra_state"):
            key = f"{path}.{attr}" if path else attr
            if key in full_keys:
                owners.setdefault((id(mod), attr), key)
    names = {}
    for k in h.module.state_dict():
        path, _, attr = k.rpartition(".")
        full = owners.get((id(h.module.get_submodule(path)), attr))
        if full is None:
            raise ValueError(
                f"stage {h.index}: the module holding '{k}' is not one of the given model's own "
                "modules; pass the model the stages were cut from (holding its layer objects, "
                "as ppfast.split's stages do), or another names= spec"
            )
        names[k] = full
    return names


def _check_unique(h: _Held, names: dict[str, str]) -> None:
    """Two keys of a stage may share a full-model name only when they are one tensor."""
    sd = h.module.state_dict(keep_vars=True)
    seen: dict[str, str] = {}
    for k, full in names.items():
        other = seen.setdefault(full, k)
        if other != k and sd[other] is not sd[k]:
            raise ValueError(
                f"stage {h.index}: '{other}' and '{k}' both map to full-model name '{full}' but "
                "are different tensors; give each its own name"
            )


def layouts(stages, names=None, *, group=None) -> list[StageLayout]:
    """Each given stage's :class:`StageLayout` (collective when stages sit on several ranks).

    ``names`` says where each stage's state sits in the full model; one spec, or
    ``{stage_index: spec}`` when several stages are given:

    - the full model (an ``nn.Module``), when the stages hold its own layer objects
      (``ppfast.split``'s stages, ``model[4:8]``): found by module identity;
    - ``None`` (default): automatic. With one stage, the stage is the model. Otherwise the
      stages are consecutive runs of one ``nn.Sequential``/``ModuleList``, in stage order:
      slices that keep the full model's indices (``model[4:8]``) or re-numbered ones
      (``nn.Sequential(*layers[4:8])``); each stage's first child takes the index after the
      previous stages' children. Such a run may sit under one child path (``blocks.0...``).
    - an int: the full-model index of the stage's first numbered child (``4``: ``0.weight``
      becomes ``4.weight``);
    - a str: a prefix (``"decoder."``; ``""`` keeps the names);
    - a dict ``{stage key: full-model key}`` covering every key of the module's state_dict;
    - a callable ``stage key -> full-model key``.

    >>> stages = [nn.Sequential(nn.Linear(4, 4), nn.GELU()), nn.Sequential(nn.Linear(4, 4))]
    >>> [lay.names for lay in layouts(stages)]  # doctest: +NORMALIZE_WHITESPACE
    [{'0.weight': '0.weight', '0.bias': '0.bias'}, {'0.weight': '2.weight', '0.bias': '2.bias'}]
    """
    held = _held(stages)
    return _layouts(held, names, group)


def _layouts(held: list[_Held], names, group) -> list[StageLayout]:
    mine = {h.index: _indexed(h.module) for h in held}
    if _spread(held):
        indexed: dict = {}
        for part in _all_gather(mine, _group(held, group)):
            indexed.update(part)
    else:
        indexed = mine
    return [_resolve(h, _spec_for(names, h, held), indexed) for h in held]


# ---------------------------------------------------------------------------- optimizer


def _param_names(held: list[_Held], lays: list[StageLayout]) -> dict[int, list[tuple]]:
    """id(parameter) -> [(stage, full-model name)], one name per stage holding it."""
    out: dict[int, list[tuple]] = {}
    for h, lay in zip(held, lays, strict=True):
        for local, p in h.module.named_parameters():
            out.setdefault(id(p), []).append((h.index, lay.names[local]))
    return out


def _hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", "param_names")}


def _split_optimizer(opt, held, lays) -> dict[int, dict]:
    """The optimizer's state by stage, each parameter's state under its full-model name."""
    where = _param_names(held, lays)
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        if id(p) not in where:
            raise ValueError(
                f"the optimizer holds a parameter of shape {list(p.shape)} that none of stages "
                f"{[h.index for h in held]} holds; save the optimizer of these stages' "
                "parameters (pass every stage this rank holds)"
            )
    sd = opt.state_dict()
    parts = {h.index: {"state": {}, "param_groups": []} for h in held}
    for g in sd["param_groups"]:
        for s, part in parts.items():
            names = [n for i in g["params"] for t, n in where[id(params[i])] if t == s]
            if names:
                part["param_groups"].append({**_hyper(g), "params": names})
    for i, state in sd["state"].items():
        for s, name in where[id(params[i])]:
            parts[s]["state"][name] = state
    return parts


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _merge_optimizer(parts: dict[int, dict]) -> dict:
    """Stages' optimizer parts as one, by full-model name; parameter groups with equal
    settings become one."""
    state: dict[str, dict] = {}
    groups: list[dict] = []
    for s in sorted(parts):
        for name, st in parts[s]["state"].items():
            if name in state and not _same(state[name], st):
                raise ValueError(
                    f"optimizer state of '{name}' differs between stages holding it; tied "
                    "copies must take the same steps (declare them with PipelineStage(tied=...))"
                )
            state.setdefault(name, st)
        for g in parts[s]["param_groups"]:
            hyper = _hyper(g)
            same = next((x for x in groups if _same(_hyper(x), hyper)), None)
            if same is None:
                groups.append({**hyper, "params": []})
                same = groups[-1]
            same["params"] += [n for n in g["params"] if n not in same["params"]]
    return {"state": state, "param_groups": groups}


def _load_optimizer(opt, full: dict, where: dict[int, list[tuple]], what: str) -> None:
    """Give ``opt`` the state ``full`` holds for its parameters' full-model names."""
    group_of = {n: g for g in full["param_groups"] for n in g["params"]}
    state, groups, i = {}, [], 0
    for g in opt.param_groups:
        hyper, ids = None, []
        for p in g["params"]:
            names = [n for _, n in where.get(id(p), ())]
            if not names:
                raise ValueError(
                    f"the optimizer holds a parameter of shape {list(p.shape)} that none of the "
                    "given stages holds; load the optimizer of these stages' parameters"
                )
            known = [n for n in names if n in group_of]
            if not known:
                raise ValueError(f"{what} has no optimizer entry for '{names[0]}'")
            h = _hyper(group_of[known[0]])
            if hyper is None:
                hyper = h
            elif not _same(hyper, h):
                raise ValueError(
                    f"'{known[0]}' was in a parameter group with other settings than the rest "
                    "of its group here when saved; build the optimizer's groups as saved"
                )
            st = next((full["state"][n] for n in names if n in full["state"]), None)
            if st is not None:
                state[i] = copy.deepcopy(st)  # the optimizer updates it in place
            ids.append(i)
            i += 1
        groups.append({**_hyper(g), **(hyper or {}), "params": ids})
    opt.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------- files


def _stage_file(s: int, n: int, suffix: str = ".pt") -> str:
    return f"stage-{s:05d}-of-{n:05d}{suffix}"


def _atomic(path: str, write: Callable) -> None:
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


def _meta(v) -> dict:
    if isinstance(v, torch.Tensor):
        return {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
    return {"shape": None, "dtype": type(v).__name__}


def _record(h: _Held, lay: StageLayout, has_opt: bool, has_extra: bool) -> dict:
    sd, kinds = h.module.state_dict(), _kinds(h.module)
    local_of = {id(p): k for k, p in h.module.named_parameters(remove_duplicate=False)}
    n = h.num_stages
    return {
        "index": h.index,
        "file": _stage_file(h.index, n),
        "extra_file": _stage_file(h.index, n, ".extra.pt") if has_extra else None,
        "optimizer": has_opt,
        "names": lay.names,
        "tensors": {
            lay.names[k]: {**_meta(v), "kind": kinds.get(k, "extra_state")} for k, v in sd.items()
        },
        "tied": {key: lay.names[local_of[id(p)]] for key, p in sorted(h.tied.items())},
    }


def save(path, stages, optimizer=None, *, step=None, extra=None, names=None, group=None):
    """Save the given stages' shards to the folder ``path``; collective when stages are spread.

    Every rank calls it with its own stages (PipelineStage(s), or the schedule holding them)
    and their optimizer; each rank writes only its stages' files, and the rank holding stage
    0 writes ``manifest.json`` once all shards are written, so a folder without a manifest is
    an unfinished save. ``step`` goes into the manifest; ``extra`` (any picklable object, e.g.
    an LR scheduler's state_dict) into this rank's files, returned by :func:`load`. See
    :func:`layouts` for ``names``. Saving into a folder replaces the checkpoint there.

    >>> save("ckpt/step-100", sched, optimizer, step=100)  # doctest: +SKIP
    """
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise TypeError(f"step must be an int or None, got {type(step).__name__}")
    held = _held(stages)
    n, path = held[0].num_stages, os.fspath(path)
    os.makedirs(path, exist_ok=True)
    comm = _group(held, group) if _spread(held) else None
    first = held[0].index == 0
    if first and os.path.exists(os.path.join(path, MANIFEST)):
        os.remove(os.path.join(path, MANIFEST))  # before any shard is replaced
    mine = {
        "stages": [h.index for h in held],
        "indexed": {h.index: _indexed(h.module) for h in held},
        "save_id": uuid.uuid4().hex if first else None,
    }
    everyone = _all_gather(mine, comm) if comm else [mine]
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
        lays = [_resolve(h, _spec_for(names, h, held), indexed) for h in held]
        parts = _split_optimizer(optimizer, held, lays) if optimizer is not None else {}
        for h, lay in zip(held, lays, strict=True):
            sd = h.module.state_dict()
            shard = {
                "format": FORMAT,
                "version": VERSION,
                "save_id": save_id,
                "stage": h.index,
                "num_stages": n,
                "model": {
                    lay.names[k]: v.detach() if torch.is_tensor(v) else v for k, v in sd.items()
                },
                "optimizer": parts.get(h.index),
            }
            records[h.index] = _record(h, lay, optimizer is not None, extra is not None)
            _atomic(
                os.path.join(path, records[h.index]["file"]), lambda f, x=shard: torch.save(x, f)
            )
            if extra is not None:
                extra_file = os.path.join(path, records[h.index]["extra_file"])
                _atomic(extra_file, lambda f: torch.save({"save_id": save_id, "extra": extra}, f))
    except Exception as e:  # every rank must hear of it, or the others wait forever
        failure = e
    gathered = _agree(comm, failure, "writing its shards", records)
    failure = None
    if first:
        by_stage = {s: r for part in gathered for s, r in part.items()}
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "save_id": save_id,
            "num_stages": n,
            "step": step,
            "torch_version": torch.__version__,
            "stages": [by_stage[s] for s in range(n)],
        }
        try:
            text = json.dumps(manifest, indent=1).encode()
            _atomic(os.path.join(path, MANIFEST), lambda f: f.write(text))
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
    everyone = _all_gather((error, payload), comm)
    if failure is not None:
        raise failure
    bad = {r: e for r, (e, _) in enumerate(everyone) if e}
    if bad:
        raise RuntimeError(
            f"rank {dist.get_rank(comm)}: the checkpoint was not saved; rank(s) {sorted(bad)} "
            f"failed {what}: " + "; ".join(f"rank {r}: {e}" for r, e in sorted(bad.items()))
        )
    return [p for _, p in everyone]


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
    return manifest


def _read_shard(path: str, manifest: dict, rec: dict) -> dict:
    file = os.path.join(path, rec["file"])
    if not os.path.exists(file):
        raise FileNotFoundError(
            f"{file} is missing: stage {rec['index']}'s shard of the checkpoint in {path}; copy "
            "every stage-*.pt file of the checkpoint along with manifest.json"
        )
    shard = torch.load(file, map_location="cpu", weights_only=True)
    if shard.get("save_id") != manifest["save_id"] or shard.get("stage") != rec["index"]:
        raise ValueError(
            f"{file} belongs to another save than {os.path.join(path, MANIFEST)} (a stale or "
            "mixed-in file); the checkpoint is inconsistent, use another one"
        )
    for name, meta in rec["tensors"].items():
        v = shard["model"].get(name)
        if v is None or _meta(v)["shape"] != meta["shape"]:
            raise ValueError(f"{file}: '{name}' does not match the manifest; the file is damaged")
    return shard


# ---------------------------------------------------------------------------- load


def _check_fit(h: _Held, lay: StageLayout, tensors: dict[str, dict], what: str) -> None:
    """The stage module's names, shapes and dtypes are those ``tensors`` describes."""
    sd = h.module.state_dict()
    mine = {lay.names[k]: _meta(v) for k, v in sd.items()}
    missing = [n for n in mine if n not in tensors]
    unexpected = [n for n in tensors if n not in mine]
    wrong = [
        f"'{n}': {tensors[n]['shape']} {tensors[n]['dtype']} there, {m['shape']} {m['dtype']} here"
        for n, m in mine.items()
        if n in tensors and (tensors[n]["shape"], tensors[n]["dtype"]) != (m["shape"], m["dtype"])
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"stage {h.index} does not match {what}: "
            + "; ".join(
                f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}"
                for label, items in (
                    ("not there:", missing),
                    ("there but not in this stage:", unexpected),
                    ("shape/dtype differ:", wrong),
                )
                if items
            )
            + "; build the stage modules as saved, or pass names= mapping them to the saved names"
        )


def _fill(h: _Held, lay: StageLayout, values: Mapping) -> None:
    with torch.no_grad():
        h.module.load_state_dict({k: values[full] for k, full in lay.names.items()}, strict=True)


def load(path, stages, optimizer=None, *, names=None) -> CheckpointInfo:
    """Load the given stages (and their optimizer) from a checkpoint saved on as many stages.

    Each rank reads the manifest and its own stages' shards; nothing is exchanged. Tensors are
    copied into the existing parameters, so schedules and optimizers built on them stay valid,
    and training resumes with the losses it would have had. Each stage's names default to the
    ones it was saved with; see :func:`layouts` for ``names``. Returns the saved step and the
    ``extra`` the rank holding the lowest given stage saved.

    >>> info = load("ckpt/step-100", sched, optimizer)  # doctest: +SKIP
    """
    path = os.fspath(path)
    manifest = read_manifest(path)
    held = _held(stages)
    n = manifest["num_stages"]
    if held[0].num_stages != n:
        raise ValueError(
            f"{path} was saved on {n} stages; these stages are of {held[0].num_stages}. To change "
            "the stage count, gather it into one state_dict and split that: full = "
            "ppfast.checkpoint.gather(path); ppfast.checkpoint.load_full(full, stages, optimizer, "
            "ppfast.checkpoint.gather_optimizer(path))"
        )
    recs = {r["index"]: r for r in manifest["stages"]}
    lays = []
    for h in held:
        spec = _spec_for(names, h, held)
        rec = recs[h.index]
        if spec is None:
            lay = StageLayout(h.index, n, dict(rec["names"]))
            local = list(h.module.state_dict())
            if sorted(local) != sorted(lay.names):
                extra_keys = sorted(set(local) - set(lay.names))[:5]
                gone = sorted(set(lay.names) - set(local))[:5]
                raise ValueError(
                    f"stage {h.index}'s module has other keys than when saved (new: "
                    f"{extra_keys}, gone: {gone}); build the stage as saved, or pass names= "
                    "mapping its keys to the full-model names in the manifest"
                )
        else:
            lay = _resolve(h, spec, None)
        _check_fit(h, lay, rec["tensors"], f"{path}'s stage {h.index}")
        lays.append(lay)
    if optimizer is not None:
        lacking = [h.index for h in held if not recs[h.index]["optimizer"]]
        if lacking:
            raise ValueError(
                f"{path} holds no optimizer state for stages {lacking} (saved without "
                "optimizer=); pass optimizer=None to load the model only"
            )
    shards = {h.index: _read_shard(path, manifest, recs[h.index]) for h in held}
    for h, lay in zip(held, lays, strict=True):
        _fill(h, lay, shards[h.index]["model"])
    if optimizer is not None:
        full = _merge_optimizer({s: shard["optimizer"] for s, shard in shards.items()})
        _load_optimizer(optimizer, full, _param_names(held, lays), path)
    extra = None
    extra_file = recs[held[0].index].get("extra_file")
    if extra_file:
        # the user's own object: unpickled in full, like any torch.load of a trusted file
        saved = torch.load(os.path.join(path, extra_file), map_location="cpu", weights_only=False)
        extra = saved["extra"]
    return CheckpointInfo(manifest.get("step"), extra, manifest)


# ---------------------------------------------------------------------------- full model


def gather(path) -> dict[str, torch.Tensor]:
    """The full model's state_dict from every shard of the checkpoint in ``path`` (reads files
    only, on any process). It loads with ``model.load_state_dict(full, strict=True)`` into the
    unsplit model. A name several stages hold (a tied weight) appears once; its copies must
    be equal.

    >>> model.load_state_dict(gather("ckpt/step-100"))  # doctest: +SKIP
    """
    path = os.fspath(path)
    manifest = read_manifest(path)
    full: dict[str, torch.Tensor] = {}
    held_by: dict[str, int] = {}
    for rec in manifest["stages"]:
        shard = _read_shard(path, manifest, rec)
        for name in rec["tensors"]:
            v = shard["model"][name]
            if name in full and not _same(full[name], v):
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
    manifest = read_manifest(path)
    lacking = [r["index"] for r in manifest["stages"] if not r["optimizer"]]
    if lacking:
        raise ValueError(f"{path} holds no optimizer state for stages {lacking}")
    return _merge_optimizer(
        {r["index"]: _read_shard(path, manifest, r)["optimizer"] for r in manifest["stages"]}
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
        held = _held(stages)
        lays = _layouts(held, names, group)
        _check_full(full_state_dict, held, lays)
    return {lay.stage_index: {k: full_state_dict[f] for k, f in lay.names.items()} for lay in lays}


def _check_full(full: Mapping, held: list[_Held], lays: list[StageLayout]) -> None:
    tensors = {k: _meta(v) for k, v in full.items()}
    for h, lay in zip(held, lays, strict=True):
        sub = {n: tensors[n] for n in set(lay.names.values()) if n in tensors}
        missing = sorted(set(lay.names.values()) - set(sub))
        if missing:
            raise ValueError(
                f"the full state_dict lacks stage {h.index}'s {missing[:5]}; it is not this "
                "model's, or names= maps the stage elsewhere"
            )
        _check_fit(h, lay, sub, "the full state_dict")
    if not _spread(held):
        used = {n for lay in lays for n in lay.names.values()}
        unused = [k for k in full if k not in used]
        if unused:
            raise ValueError(
                f"no stage holds {unused[:5]} of the full state_dict; the stages do not cover "
                "the model, or names= maps them elsewhere"
            )


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
    held = _held(stages)
    lays = _layouts(held, names, group)
    _check_full(full_state_dict, held, lays)
    for h, lay in zip(held, lays, strict=True):
        _fill(h, lay, full_state_dict)
    if optimizer is not None:
        _load_optimizer(optimizer, optimizer_state, _param_names(held, lays), "optimizer_state")
