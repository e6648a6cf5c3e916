"""What each layer weighs under a split method: one, its parameters, a class match, or its time."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .profile_units import profile_units

METHODS = "'uniform', 'parameters', 'type:REGEX' (e.g. 'type:Block') or 'profile'"
_UNITS = {
    "uniform": "layers",
    "parameters": "parameters",
    "type": "matching layers",
    "profile": "seconds",
}


def parse_method(
    method: object, *, sample, target, loss_fn, warmup: int, repeats: int
) -> tuple[str, str]:
    """(kind, pattern) of a split method, checked with the arguments only 'profile' takes."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, one of {METHODS}; got {method!r}")
    if method in ("uniform", "parameters", "profile"):
        kind, pattern = method, ""
    elif method.startswith("type:"):
        kind, pattern = "type", method[len("type:") :]
        if not pattern:
            raise ValueError("'type:' needs a regular expression after it, e.g. 'type:Block'")
    else:
        raise ValueError(f"unknown split method {method!r}; use {METHODS}")
    if kind == "profile":
        if sample is None:
            raise ValueError(
                "method 'profile' times the layers on a sample input: pass sample=... (one "
                "microbatch, as the first stage receives it), or pick another method"
            )
        if warmup < 0 or repeats < 1:
            raise ValueError(f"profile needs warmup >= 0 and repeats >= 1, got {warmup}, {repeats}")
    else:
        extras = (("sample", sample), ("target", target), ("loss_fn", loss_fn))
        given = [k for k, v in extras if v is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} only serve method 'profile', not {method!r}; use "
                "method='profile' to balance measured time, or leave them out"
            )
    return kind, pattern


def weigh(
    kind: str,
    pattern: str,
    layers: Sequence[nn.Module],
    pre: Sequence[nn.Module],
    post: Sequence[nn.Module],
    **profile,
) -> dict:
    """The :class:`~ppfast.Split` fields that say what the layers, the pre modules and the
    post modules weigh: ``unit``, ``layer_costs``, ``pre_cost``, ``post_cost``, and under
    'profile' the measured ``layer_times``, ``pre_times`` and ``post_times``. ``profile``
    holds :func:`profile_units`' sample, target, loss_fn, warmup and repeats."""
    times: dict = {}
    if kind == "uniform":
        layer_costs, pre_cost, post_cost = [1.0] * len(layers), 0.0, 0.0
    elif kind == "parameters":
        layer_costs = [float(_params(m)) for m in layers]
        pre_cost, post_cost = sum(map(_params, pre)), sum(map(_params, post))
    elif kind == "type":
        regex = _compile(pattern)
        layer_costs = [1.0 if regex.search(type(m).__name__) else 0.0 for m in layers]
        if not any(layer_costs):
            classes = ", ".join(dict.fromkeys(type(m).__name__ for m in layers))
            raise ValueError(
                f"'type:{pattern}' matches no layer, so it has nothing to balance; the layers' "
                f"classes are {classes}"
            )
        pre_cost = sum(bool(regex.search(type(m).__name__)) for m in pre)
        post_cost = sum(bool(regex.search(type(m).__name__)) for m in post)
    else:
        pre_t, layer_t, post_t = profile_units(pre, layers, post, **profile)
        layer_costs = [sum(t) for t in layer_t]
        pre_cost, post_cost = sum(pre_t) if pre_t else 0.0, sum(post_t)
        times = {"layer_times": tuple(layer_t), "pre_times": pre_t, "post_times": post_t}
    return {
        "unit": _UNITS[kind],
        "layer_costs": tuple(layer_costs),
        "pre_cost": float(pre_cost),
        "post_cost": float(post_cost),
        **times,
    }


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"'type:{pattern}' is not a valid regular expression: {e}") from None


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
