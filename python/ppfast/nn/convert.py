"""convert: linear-like layers of a model made split layers in place, from a small registry.

``torch.nn.Linear`` becomes :class:`~ppfast.nn.Linear`; transformers' ``Conv1D`` (GPT-2's
layers, weight stored (in, out)) becomes a split ``Conv1D``. Any other layer whose forward is
``x @ Wᵀ + b`` (or ``x @ W + b``) is added with :func:`register_linear`::

    ppfast.nn.register_linear(MyProjection)                    # weight (out, in), as nn.Linear
    ppfast.nn.register_linear(MyConv1D, transposed_weight=True)  # weight (in, out)

The layer keeps its class's name, parameters, state_dict keys, hooks and ``isinstance``: its
class becomes a subclass of the original one with :class:`~ppfast.nn.linear.SplitLayer`
mixed in, whose forward computes the same ``x @ Wᵀ + b`` through the split backward.
"""

from __future__ import annotations

import sys

from torch import nn

from .linear import Linear, SplitLayer

# Registered layer classes and the split class each becomes. Filled by register_linear (and
# once, on first use, with transformers' Conv1D where transformers is already imported).
_SPLIT: dict[type, type] = {nn.Linear: Linear}


def register_linear(cls: type, *, transposed_weight: bool = False) -> type:
    """Let :func:`convert` split layers of class ``cls`` (exactly that class, not its
    subclasses): a module with ``weight`` (out, in), or (in, out) with ``transposed_weight``,
    and an optional ``bias`` of out, whose forward is the linear map. Returns the split class.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_linear takes an nn.Module class, got {cls!r}")
    if issubclass(cls, SplitLayer):
        raise TypeError(f"{cls.__name__} is already a split layer")
    known = _SPLIT.get(cls)
    if known is not None and known.transposed_weight == transposed_weight:
        return known
    split = type(
        cls.__name__,
        (SplitLayer, cls),
        {"transposed_weight": transposed_weight, "__module__": cls.__module__},
    )
    _SPLIT[cls] = split
    return split


def _known_libraries() -> None:
    """transformers' Conv1D, registered when transformers is in use (never imported here)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    if conv1d is not None and conv1d not in _SPLIT:
        register_linear(conv1d, transposed_weight=True)


def convert(module: nn.Module, exclude=()) -> nn.Module:
    """Turn every registered linear-like layer in ``module`` into its split layer, in place:
    ``torch.nn.Linear`` into :class:`Linear`, transformers' ``Conv1D`` into a split Conv1D,
    and whatever :func:`register_linear` added.

    Parameters, device, dtype, hooks and state_dict keys are kept (the layer's class changes,
    nothing is copied). ``exclude`` names layers (qualified names as in ``named_modules``) or
    gives a predicate ``(name, layer) -> bool`` for layers to leave alone. Only layers of
    exactly a registered class are converted: subclasses of nn.Linear that are used through
    their weights rather than their forward (such as MultiheadAttention's ``out_proj``) are
    left alone. Returns ``module``.
    """
    _known_libraries()
    skip = exclude if callable(exclude) else (lambda name, _m, names=set(exclude): name in names)
    for name, m in module.named_modules():
        split = _SPLIT.get(type(m))
        if split is not None and not skip(name, m):
            m.__class__ = split
            kind = "Linear" if split is Linear else type(m).__name__
            m.label = f"{kind} {name}" if name else kind
    return module
