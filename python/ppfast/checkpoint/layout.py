"""Where each stage module's state sits in the full model: its keys under full-model names."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .held import Held, all_gather, group_of, held, spread

_CONTAINERS = (nn.Sequential, nn.ModuleList)


def meta(v) -> dict:
    """How the manifest describes a value of a state_dict: shape and dtype."""
    if isinstance(v, torch.Tensor):
        return {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
    return {"shape": None, "dtype": type(v).__name__}


@dataclass(frozen=True)
class StageLayout:
    """Where one stage module's state sits in the full model: ``names`` maps each key of the
    stage module's ``state_dict()`` to the key of the same tensor in the full model's."""

    stage_index: int
    num_stages: int
    names: dict[str, str]


def layouts(stages, names=None, *, group=None) -> list[StageLayout]:
    """Each given stage's :class:`StageLayout` (collective when stages sit on several ranks).

    ``names`` says where each stage's state sits in the full model; one spec, or
    ``{stage_index: spec}`` when several stages are given:

    - the full model (an ``nn.Module``), when the stages hold its own layer objects
      (``ppfast.split``'s stages, ``model[4:8]``): found by module identity;
    - ``None`` (default): automatic. With one stage, or a stage module whose
      ``full_model_names`` is true (``ppfast.hf``'s), the keys are the full model's. Otherwise the
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
    return layouts_of(held(stages), names, group)


def layouts_of(held: list[Held], names, group) -> list[StageLayout]:
    """:func:`layouts` of stages already gathered; exchanges the stages' sizes when spread."""
    indexed = local_runs(held)
    if spread(held):
        for part in all_gather(dict(indexed), group_of(held, group)):
            indexed.update(part)
    return resolve(held, names, indexed)


def local_runs(held: list[Held]) -> dict[int, tuple | None]:
    """Per given stage, its run of numbered children (see :func:`_indexed`), which automatic
    names of the later stages need from every rank."""
    return {h.index: _indexed(h.module) for h in held}


def resolve(held: list[Held], names, indexed: dict[int, tuple | None] | None) -> list:
    """The given stages' layouts under ``names``, with every stage's run when automatic."""
    return [_resolve(h, _spec_for(names, h, held), indexed) for h in held]


def saved_layout(h: Held, names, held: list[Held], rec: dict) -> StageLayout:
    """Stage ``h``'s layout for loading the manifest record ``rec``: the saved names, unless
    ``names`` gives others."""
    spec = _spec_for(names, h, held)
    if spec is not None:
        return _resolve(h, spec, None)
    local = list(h.module.state_dict())
    if sorted(local) != sorted(rec["names"]):
        raise ValueError(
            f"stage {h.index}'s module has other keys than when saved (new: "
            f"{sorted(set(local) - set(rec['names']))[:5]}, gone: "
            f"{sorted(set(rec['names']) - set(local))[:5]}); build the stage as saved, or pass "
            "names= mapping its keys to the full-model names in the manifest"
        )
    return StageLayout(h.index, h.num_stages, dict(rec["names"]))


def check_fit(h: Held, lay: StageLayout, tensors: dict[str, dict], what: str) -> None:
    """The stage module's names, shapes and dtypes are those ``tensors`` describes."""
    sd = h.module.state_dict()
    mine = {lay.names[k]: meta(v) for k, v in sd.items()}
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


def fill(h: Held, lay: StageLayout, values: Mapping) -> None:
    """Copy ``values`` (by full-model name) into the stage module's own tensors."""
    with torch.no_grad():
        h.module.load_state_dict({k: values[full] for k, full in lay.names.items()}, strict=True)


# ---------------------------------------------------------------------------- specs


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


def _spec_for(names, h: Held, held: list[Held]):
    if isinstance(names, Mapping) and all(isinstance(k, int) for k in names):
        return names.get(h.index)  # {stage_index: spec}; {} is "all automatic"
    if len(held) > 1 and isinstance(names, (int, Mapping)):
        raise ValueError(
            f"names= gives one stage's names, but stages {[x.index for x in held]} are given "
            "here; pass {stage_index: spec} with a spec per stage"
        )
    return names


def _automatic(h: Held, keys: list[str], indexed: dict[int, tuple | None]) -> dict[str, str]:
    # a stage module whose keys are the full model's already (ppfast.hf's stages) says so
    if h.num_stages == 1 or getattr(h.module, "full_model_names", False):
        return {k: k for k in keys}
    bad = next((s for s in range(h.num_stages) if indexed.get(s) is None), None)
    prefixes = {indexed[s][0] for s in range(h.num_stages)} if bad is None else set()
    if bad is not None or len(prefixes) != 1:
        raise ValueError(
            f"cannot tell where stage {h.index}'s state sits in the full model: "
            + (
                f"stage {bad}'s module is not a run of numbered children of one "
                "nn.Sequential/ModuleList"
                if bad is not None
                else f"the stages' numbered children sit under different paths {sorted(prefixes)}"
            )
            + "; pass names= for each stage: an int (full-model index of its first numbered "
            "child), a str prefix, a dict {stage key: full-model key} or a callable"
        )
    prefix, first, _ = indexed[h.index]
    start = sum(indexed[s][2] for s in range(h.index))
    return _offset(keys, prefix, first, start)


def _resolve(h: Held, spec, indexed: dict[int, tuple | None] | None) -> StageLayout:
    keys = list(h.module.state_dict())
    where = f"stage {h.index}"
    if spec is None:
        assert indexed is not None or h.num_stages == 1
        names = _automatic(h, keys, indexed or {})
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


def _by_identity(h: Held, model: nn.Module) -> dict[str, str]:
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


def _check_unique(h: Held, names: dict[str, str]) -> None:
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
