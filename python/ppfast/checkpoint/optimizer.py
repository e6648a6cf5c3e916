"""Optimizer state by full-model parameter name: split by stage, merged, loaded again."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .held import Held
    from .layout import StageLayout


def _param_names(held: list[Held], lays: list[StageLayout]) -> dict[int, list[tuple]]:
    """id(parameter) -> [(stage, full-model name)], one name per stage holding it."""
    out: dict[int, list[tuple]] = {}
    for h, lay in zip(held, lays, strict=True):
        for local, p in h.module.named_parameters():
            out.setdefault(id(p), []).append((h.index, lay.names[local]))
    return out


def _hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", "param_names")}


def split_optimizer(opt, held: list[Held], lays: list[StageLayout]) -> dict[int, dict]:
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


def same(a, b) -> bool:
    """Equal through dicts, lists and tuples; tensors of one dtype with equal elements."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def merge_optimizer(parts: dict[int, dict]) -> dict:
    """Stages' optimizer parts as one, by full-model name; parameter groups with equal
    settings become one."""
    state: dict[str, dict] = {}
    groups: list[dict] = []
    for s in sorted(parts):
        for name, st in parts[s]["state"].items():
            if name in state and not same(state[name], st):
                raise ValueError(
                    f"optimizer state of '{name}' differs between stages holding it; tied "
                    "copies must take the same steps (declare them with PipelineStage(tied=...))"
                )
            state.setdefault(name, st)
        for g in parts[s]["param_groups"]:
            hyper = _hyper(g)
            into = next((x for x in groups if same(_hyper(x), hyper)), None)
            if into is None:
                groups.append({**hyper, "params": []})
                into = groups[-1]
            into["params"] += [n for n in g["params"] if n not in into["params"]]
    return {"state": state, "param_groups": groups}


def load_optimizer(opt, full: dict, held: list[Held], lays: list[StageLayout], what: str) -> None:
    """Give ``opt`` the state ``full`` holds for its parameters' full-model names."""
    where = _param_names(held, lays)
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
            elif not same(hyper, h):
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
