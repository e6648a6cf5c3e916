"""checkpoint_blocks: chosen blocks of a module recompute their activations in backward."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# what checkpoint_blocks(blocks=...) takes; see its docstring
BlockSpec = (
    type | tuple[type, ...] | Callable[[str, nn.Module], bool] | int | str | Sequence[int | str]
)


class _Recomputed:
    """A block's ``forward`` while it is checkpointed.

    A plain object (not a module, not a closure) in the block's ``__dict__``: module hooks
    still run once per call, outside the checkpoint, and ``copy.deepcopy`` and pickling of
    the block carry it along bound to the copy.
    """

    def __init__(self, block: nn.Module, preserve_rng_state: bool):
        self.block = block
        # a forward someone else set on the instance before us; None: the class's own,
        # looked up at each call (ppfast.nn.convert may change the class afterwards)
        self.inner = block.__dict__.get("forward")
        self.preserve_rng_state = preserve_rng_state

    def __call__(self, *args, **kwargs):
        forward = (
            self.inner if self.inner is not None else type(self.block).forward.__get__(self.block)
        )
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # Keyword tensors go in as positional arguments: checkpoint hands positional tensors
        # to the saved-tensor hooks around it (a PipelineStage's release check among them)
        # and would keep keyword ones out of their sight; it also takes some keywords itself.
        return checkpoint(
            _call,
            forward,
            len(args),
            tuple(kwargs),
            *args,
            *kwargs.values(),
            use_reentrant=False,
            preserve_rng_state=self.preserve_rng_state,
        )


def _call(forward, n_args: int, names: tuple[str, ...], *flat):
    return forward(*flat[:n_args], **dict(zip(names, flat[n_args:], strict=True)))


def checkpoint_blocks(
    module: nn.Module,
    blocks: BlockSpec | None = None,
    *,
    every: int = 1,
    preserve_rng_state: bool = True,
) -> nn.Module:
    """Recompute the activations of chosen blocks of ``module`` in backward instead of
    keeping them from forward; in place, returns ``module``.

    ``blocks`` chooses the candidate blocks, in this order:

    - ``None``: the members of ``module`` itself, which must be an ``nn.Sequential`` or
      ``nn.ModuleList``;
    - a class or tuple of classes: every submodule of that class (``module`` included);
    - a predicate ``(qualified_name, submodule) -> bool``, asked for every submodule in
      ``named_modules`` order (``module`` itself has the name ``""``);
    - an int, a str, or a list of them: positions in ``module`` (an ``nn.Sequential`` or
      ``nn.ModuleList``; negative ones count from the end) or qualified names as
      ``named_modules`` gives them (``"layers.3"``, ``"block"``).

    A class or predicate that matches a block and something inside it chooses the outer one
    only; an explicit list that names both is refused.

    ``every=k`` then checkpoints one candidate in every k, each block on its own: the 1st,
    the (k+1)-th, the (2k+1)-th, ... in the order above (candidates 0, k, 2k, ...). ``every=1``
    checkpoints them all; ``every=2`` on 8 like layers checkpoints layers 0, 2, 4 and 6, which
    saves about half of what checkpointing all 8 saves, for half the recomputation.

    What each checkpointed block keeps from forward to backward is its inputs; in backward it
    runs again, once, with torch's non-reentrant ``torch.utils.checkpoint``
    (``use_reentrant=False``), the RNG state of its forward restored when
    ``preserve_rng_state`` (dropout masks come out the same). Without grad (``torch.no_grad``,
    evaluation) a block runs as usual. Under a schedule that splits the backward (I now, W
    later), the block is recomputed in I and the split layers' deferred W uses the recomputed
    inputs; W never recomputes (see the module's docstring).

    Parameter names, ``state_dict`` keys and the module tree do not change: the block's
    ``forward`` is replaced on the instance. Hooks registered on a chosen block run once per
    call; hooks of modules inside it run again when it is recomputed. Checkpointing a block
    that already is, or one inside or around a checkpointed block, raises ValueError; undo it
    with :func:`uncheckpoint_blocks`. Call it before or after ``ppfast.nn.convert`` and
    before or after building the ``PipelineStage``; both orders work.

    Example, in a pipeline (each rank checkpoints the stages it holds)::

        import ppfast
        from ppfast.recompute import checkpoint_blocks

        stage_mod = nn.Sequential(*layers[lo:hi])
        checkpoint_blocks(stage_mod)  # every layer of this stage
        # or: checkpoint_blocks(stage_mod, every=2)
        # or: checkpoint_blocks(gpt_stage, TransformerBlock)
        # or: checkpoint_blocks(gpt_stage, ["blocks.0", "blocks.2"])
        stage = ppfast.PipelineStage(ppfast.nn.convert(stage_mod), rank, world_size)
        sched = ppfast.ScheduleZBH1(stage, n_microbatches=8, loss_fn=loss_fn)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(
            f"every must be a positive int (1 checkpoints every chosen block, k one in every "
            f"k), got {every!r}"
        )
    chosen = _resolve(module, blocks)[::every]
    _check_free(module, chosen)
    for name, block in chosen:
        if block.__dict__.get("forward") is None and type(block).forward is nn.Module.forward:
            raise ValueError(
                f"{_label(name)} ({type(block).__name__}) has no forward of its own to "
                "recompute; choose the blocks inside it"
            )
    for _, block in chosen:
        block.forward = _Recomputed(block, preserve_rng_state)
    return module


def checkpointed(module: nn.Module) -> list[str]:
    """Qualified names (as in ``named_modules``; ``""`` is ``module``) of the checkpointed
    blocks in ``module``."""
    return [name for name, m in module.named_modules() if _is_wrapped(m)]


def uncheckpoint_blocks(module: nn.Module) -> list[str]:
    """Undo :func:`checkpoint_blocks` for every checkpointed block in ``module`` (and
    ``module`` itself); returns their qualified names."""
    names = []
    for name, m in module.named_modules():
        wrapper = m.__dict__.get("forward")
        if isinstance(wrapper, _Recomputed):
            if wrapper.inner is None:
                del m.forward
            else:
                m.forward = wrapper.inner
            names.append(name)
    return names


# ---------------------------------------------------------------------------- choosing


def _is_wrapped(m: nn.Module) -> bool:
    return isinstance(m.__dict__.get("forward"), _Recomputed)


def _label(name: str) -> str:
    return f"block {name!r}" if name else "the module itself"


def _resolve(module: nn.Module, blocks) -> list[tuple[str, nn.Module]]:
    """The candidate blocks as (qualified name, module), in order."""
    if blocks is None:
        if not isinstance(module, (nn.Sequential, nn.ModuleList)):
            raise ValueError(
                f"{type(module).__name__} is not an nn.Sequential or nn.ModuleList, so its "
                "blocks must be named: pass blocks= a class (e.g. TransformerBlock), qualified "
                "names (e.g. ['layers.0', 'layers.1']) or a predicate (name, module) -> bool"
            )
        found = list(module.named_children())
        if not found:
            raise ValueError(f"{type(module).__name__} is empty: there is no block to checkpoint")
        return found
    if isinstance(blocks, type) or (
        isinstance(blocks, tuple) and blocks and all(isinstance(b, type) for b in blocks)
    ):
        classes = blocks
        found = _outermost(module, lambda _n, m: isinstance(m, classes))
        if not found:
            want = getattr(classes, "__name__", None) or ", ".join(c.__name__ for c in classes)
            raise ValueError(f"no submodule of {type(module).__name__} is a {want}")
        return found
    if callable(blocks):
        found = _outermost(module, blocks)
        if not found:
            raise ValueError(f"the predicate chose no submodule of {type(module).__name__}")
        return found
    if isinstance(blocks, (int, str)):
        blocks = [blocks]
    if not isinstance(blocks, Sequence) or not blocks:
        raise TypeError(
            "blocks must be a class, a tuple of classes, a predicate (name, module) -> bool, or "
            f"a non-empty list of positions (int) and qualified names (str); got {blocks!r}"
        )
    found = [_lookup(module, key) for key in blocks]
    for i, (name, block) in enumerate(found):
        for other_key, (other, other_block) in zip(blocks[:i], found[:i], strict=True):
            if other_block is block:
                raise ValueError(f"{blocks[i]!r} and {other_key!r} choose the same block")
            if _inside(name, other) or _inside(other, name):
                outer, inner = (other, name) if _inside(name, other) else (name, other)
                raise ValueError(
                    f"{_label(inner)} lies inside {_label(outer)}; choose one of them (a "
                    "block inside a checkpointed one is recomputed with it already)"
                )
    return found


def _outermost(module: nn.Module, pred) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for name, m in module.named_modules():
        if any(_inside(name, outer) for outer, _ in found):
            continue
        if pred(name, m):
            found.append((name, m))
    return found


def _lookup(module: nn.Module, key) -> tuple[str, nn.Module]:
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(
            f"blocks lists positions (int) and qualified names (str); got {type(key).__name__} "
            f"{key!r}"
        )
    if isinstance(key, int):
        if not isinstance(module, (nn.Sequential, nn.ModuleList)):
            raise ValueError(
                f"position {key} needs an nn.Sequential or nn.ModuleList; {type(module).__name__} "
                "has no positions: name the blocks instead (e.g. 'layers.0')"
            )
        children = list(module.named_children())
        if not -len(children) <= key < len(children):
            raise ValueError(
                f"position {key} is outside the {len(children)} blocks of "
                f"{type(module).__name__} (0 to {len(children) - 1}, or negative from the end)"
            )
        return children[key]
    named = dict(module.named_modules())
    if key not in named:
        close = difflib.get_close_matches(key, [n for n in named if n], n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"{type(module).__name__} has no submodule named {key!r}{hint}")
    return key, named[key]


def _inside(name: str, outer: str) -> bool:
    """Is the module called ``name`` inside (strictly) the one called ``outer``?"""
    return name != outer and (outer == "" or name.startswith(outer + "."))


def _check_free(module: nn.Module, chosen: list[tuple[str, nn.Module]]) -> None:
    wrapped = checkpointed(module)
    for name, block in chosen:
        if _is_wrapped(block):
            raise ValueError(
                f"{_label(name)} is already checkpointed; call checkpoint_blocks once per block, "
                "or undo it first with ppfast.recompute.uncheckpoint_blocks(module)"
            )
        for w in wrapped:
            if _inside(name, w) or _inside(w, name):
                outer, inner = (w, name) if _inside(name, w) else (name, w)
                raise ValueError(
                    f"{_label(inner)} lies inside {_label(outer)}, and {_label(w)} is already "
                    "checkpointed; choose blocks that do not nest, or undo it first with "
                    "ppfast.recompute.uncheckpoint_blocks(module)"
                )


# ---------------------------------------------------------------------------- measuring
