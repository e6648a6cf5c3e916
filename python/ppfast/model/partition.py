"""Splits a model into pipeline stages balanced by layers, parameters, type or measured time.

The :class:`Split` object and :func:`split`; what each layer weighs under a method is
in ``_layer_costs`` (its timing in ``_profile_units``), the cut itself in ``_balance``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..program.simulator import Costs
from .balance import balance
from .layer_costs import parse_method, weigh
from .profile_units import Times


@dataclass(frozen=True, eq=False, repr=False)
class Split:
    """A model cut into pipeline stages, made by :func:`split`.

    ``stages[s]`` is an ``nn.Sequential`` of the model's own layer objects (nothing is
    copied): the ``pre`` modules then stage 0's layers, ..., the last stage's layers then the
    ``post`` modules. ``counts`` holds each stage's number of layers (pre and post not
    counted) and ``stage_costs`` what the method balanced, per stage, in ``unit``: layers,
    parameters, matching layers, or seconds (F + I + W of one microbatch) under ``profile``,
    whose measured (F, I, W) are also kept per stage (``stage_times``) and per layer.
    """

    stages: tuple[nn.Sequential, ...]
    counts: tuple[int, ...]
    stage_costs: tuple[float, ...]
    method: str
    unit: str
    layers: tuple[nn.Module, ...]
    names: tuple[str, ...]  # each layer's name inside its stage module
    pre: tuple[nn.Module, ...]
    post: tuple[nn.Module, ...]
    layer_costs: tuple[float, ...]
    pre_cost: float
    post_cost: float
    stage_times: tuple[Times, ...] | None = None
    layer_times: tuple[Times, ...] | None = None
    pre_times: Times | None = None
    post_times: Times | None = None  # the post modules and the loss

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        """(first, past-last) layer index of every stage."""
        out, at = [], 0
        for c in self.counts:
            out.append((at, at + c))
            at += c
        return tuple(out)

    @property
    def tied(self) -> tuple[dict[str, nn.Parameter], ...]:
        """Per stage, its parameters that other stages hold too (an embedding tied to the head),
        under one key on every holder: ``PipelineStage(split.stages[s], s, n, tied=split.tied[s])``
        keeps them equal and sums their gradients."""
        holders: dict[int, list[tuple[int, str, nn.Parameter]]] = {}
        for s, stage in enumerate(self.stages):
            for name, p in stage.named_parameters():
                holders.setdefault(id(p), []).append((s, name, p))
        out: list[dict[str, nn.Parameter]] = [{} for _ in self.stages]
        for held in holders.values():
            if len({s for s, _, _ in held}) > 1:
                key = held[0][1]  # its name in the lowest stage: layer names are unique
                for s, _, p in held:
                    out[s][key] = p
        return tuple(out)

    def costs(
        self,
        *,
        comm: float = 0.0,
        f: float | None = None,
        i: float | None = None,
        w: float | None = None,
    ) -> Costs:
        """Per-stage costs for :func:`ppfast.simulate`, to time this split under a schedule.

        Under ``profile`` they are the measured (F, I, W) seconds of each stage. Otherwise each
        stage costs (f, i, w) (1, 1, 1 unless given) times its share of the balanced quantity
        against the mean stage, so a stage twice as heavy as the mean costs twice as much.
        ``comm`` is the transfer time between stages on different ranks::

            prog = ppfast.generate("1f1b", 4, 8)
            ppfast.simulate(prog, s.costs()).makespan
        """
        if self.stage_times is not None:
            if (f, i, w) != (None, None, None):
                raise ValueError(
                    "this split was profiled: its costs are the measured F, I, W of each stage; "
                    "leave f, i and w out (they scale the splits made without timing)"
                )
            return Costs(comm=comm, per_stage=self.stage_times)
        mean = sum(self.stage_costs) / len(self.stage_costs)
        shares = [c / mean if mean > 0 else 1.0 for c in self.stage_costs]
        f, i, w = (1.0 if x is None else x for x in (f, i, w))
        return Costs(comm=comm, per_stage=tuple((f * x, i * x, w * x) for x in shares))

    def with_counts(self, counts: Sequence[int]) -> Split:
        """The same layers cut with other ``counts``, costed with this split's per-layer costs
        (measured ones are not measured again): how would another partition fare?"""
        counts = _check_counts(counts, len(counts), len(self.layers))
        return _assemble(self, counts)

    def describe(self) -> str:
        """A table: each stage's layers, count and cost, and how uneven the stages are."""
        n = len(self.layers)
        timed = self.stage_times is not None
        head = f"split of {n} layers into {self.num_stages} stages by {self.method!r}; cost: " + (
            "F + I + W of one microbatch, ms" if timed else self.unit
        )
        cols = ["stage", "layers", "count", "cost", "share"]
        if timed:
            cols += ["F ms", "I ms", "W ms"]
        total = sum(self.stage_costs)
        rows = []
        for s, (a, b) in enumerate(self.ranges):
            where = f"{a}" if b - a == 1 else f"{a}-{b - 1}"
            if s == 0 and self.pre:
                where = "pre, " + where
            if s == self.num_stages - 1 and self.post:
                where += ", post"
            cost = self.stage_costs[s]
            row = [str(s), where, str(b - a), _fmt(cost * 1e3 if timed else cost)]
            row.append(f"{cost / total:.1%}" if total > 0 else "-")
            if timed:
                row += [f"{x * 1e3:.3f}" for x in self.stage_times[s]]
            rows.append(row)
        widths = [max(len(r[k]) for r in [cols, *rows]) for k in range(len(cols))]
        lines = [head]
        for r in [cols, *rows]:
            cells = [r[0].rjust(widths[0]), r[1].ljust(widths[1])]
            cells += [c.rjust(wd) for c, wd in zip(r[2:], widths[2:], strict=True)]
            lines.append("  ".join(cells).rstrip())
        mean = total / self.num_stages
        if mean > 0:
            worst = max(range(self.num_stages), key=lambda s: self.stage_costs[s])
            lines.append(
                f"heaviest: stage {worst}, {self.stage_costs[worst] / mean:.2f}x the mean stage"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()

    def __repr__(self) -> str:
        return f"Split(method={self.method!r}, counts={self.counts}, unit={self.unit!r})"


def split(
    model_or_blocks: nn.Module | Sequence[nn.Module],
    num_stages: int | None = None,
    method: str = "uniform",
    *,
    pre: nn.Module | Sequence[nn.Module] | None = None,
    post: nn.Module | Sequence[nn.Module] | None = None,
    counts: Sequence[int] | None = None,
    sample: torch.Tensor | Sequence[torch.Tensor] | None = None,
    target: object | None = None,
    loss_fn: Callable | None = None,
    warmup: int = 2,
    repeats: int = 5,
) -> Split:
    """Cut a model into ``num_stages`` pipeline stages of contiguous layers.

    The layers are the children of an ``nn.Sequential``, or the blocks of a list /
    ``nn.ModuleList``; ``pre`` modules (an embedding) run before them on stage 0 and ``post``
    modules (final norm, head) after them on the last stage. Methods:

    - ``"uniform"``: equal numbers of layers, larger stages first (30 on 4: 8, 8, 7, 7);
    - ``"parameters"``: balanced parameter counts, pre and post included;
    - ``"type:REGEX"``: balanced numbers of layers whose class name matches REGEX
      (searched, case-insensitive, as DeepSpeed's ``type:``; anchor it, ``^Block$``, for an
      exact name); the other layers ride with the matching layer before them;
    - ``"profile"``: balanced time. Every layer runs forward and backward (F, I, W, as a
      pipeline stage runs them) on ``sample``, one microbatch as stage 0 receives it, fed
      through the layers in order; ``warmup`` rounds, then the median of ``repeats``. The
      post modules are timed with ``loss_fn(output, target)`` (``loss_fn(output)`` without a
      target; the output's mean without a loss_fn). Gradients, buffers and the random state
      are restored afterwards; gradient hooks on the parameters do fire.

    The cut minimises the heaviest stage exactly; among equally heavy cuts it takes the one
    with the most even stages, then the one with longer stages first. ``counts`` gives the
    layers per stage instead; the method then only says what ``stage_costs`` report. For an
    interleaved or V schedule ask for ranks x stages per rank stages.

    Example::

        s = ppfast.split(model.blocks, 4, "parameters", pre=model.embed,
                         post=[model.norm, model.head])
        print(s)                       # the table of stages
        stage = ppfast.PipelineStage(s.stages[rank], rank, 4, tied=s.tied[rank])
        ppfast.simulate(ppfast.generate("1f1b", 4, 8), s.costs())
    """
    layers, names = _layers(model_or_blocks)
    pre_mods, post_mods = _modules(pre, "pre"), _modules(post, "post")
    _check_distinct(layers, pre_mods, post_mods)
    n = len(layers)
    num_stages = _check_num_stages(num_stages, counts, n)
    profile = {
        "sample": sample,
        "target": target,
        "loss_fn": loss_fn,
        "warmup": warmup,
        "repeats": repeats,
    }
    kind, pattern = parse_method(method, **profile)
    if counts is not None:
        counts = _check_counts(counts, num_stages, n)
    weights = weigh(kind, pattern, layers, pre_mods, post_mods, **profile)
    if counts is None:
        folded = list(weights["layer_costs"])
        # stage 0 always holds layer 0 and the last stage layer n-1: their pre/post go with them
        folded[0] += weights["pre_cost"]
        folded[-1] += weights["post_cost"]
        if sum(folded) <= 0:  # e.g. no parameters at all: nothing to weigh, so even counts
            folded = [1.0] * n
        counts = balance(folded, num_stages)
    base = Split(
        stages=(),
        counts=(),
        stage_costs=(),
        method=method,
        layers=tuple(layers),
        names=tuple(names),
        pre=tuple(pre_mods),
        post=tuple(post_mods),
        **weights,
    )
    return _assemble(base, counts)


# ---------------------------------------------------------------------- building the stages


def _assemble(base: Split, counts: Sequence[int]) -> Split:
    k = len(counts)
    stages, costs, times = [], [], []
    named_pre = _named(base.pre, "pre", base.names)
    named_post = _named(base.post, "post", base.names)
    at = 0
    for s, c in enumerate(counts):
        mods = list(zip(base.names[at : at + c], base.layers[at : at + c], strict=True))
        cost = sum(base.layer_costs[at : at + c])
        parts = list(base.layer_times[at : at + c]) if base.layer_times is not None else []
        if s == 0:
            mods = named_pre + mods
            cost += base.pre_cost
            parts += [base.pre_times] if base.pre_times else []
        if s == k - 1:
            mods = mods + named_post
            cost += base.post_cost
            parts += [base.post_times] if base.post_times else []
        stages.append(nn.Sequential(OrderedDict(mods)))
        costs.append(cost)
        times.append(tuple(sum(t[j] for t in parts) for j in range(3)))
        at += c
    assert at == len(base.layers), "every layer must land in exactly one stage"
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    fields.update(stages=tuple(stages), counts=tuple(counts), stage_costs=tuple(costs))
    fields["stage_times"] = tuple(times) if base.layer_times is not None else None
    return Split(**fields)


def _named(mods: Sequence[nn.Module], word: str, taken: Sequence[str]) -> list:
    names = [word] if len(mods) == 1 else [f"{word}{k}" for k in range(len(mods))]
    used = set(taken)
    out = []
    for name, m in zip(names, mods, strict=True):
        while name in used:  # a layer of the model may already be called "pre"
            name = "_" + name
        used.add(name)
        out.append((name, m))
    return out


def _layers(obj: object) -> tuple[list[nn.Module], list[str]]:
    if isinstance(obj, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        named = list(obj.named_children())
    elif isinstance(obj, nn.Module):
        raise TypeError(
            f"split needs the model's layers in order, and a {type(obj).__name__} does not say "
            "how its forward runs them: pass an nn.Sequential, or a list / nn.ModuleList of "
            "blocks with pre= and post= for what runs before and after them, e.g. "
            "split(model.blocks, 4, pre=model.embed, post=[model.norm, model.head])"
        )
    elif isinstance(obj, (list, tuple)):
        named = [(str(k), m) for k, m in enumerate(obj)]
    else:
        raise TypeError(
            f"split takes an nn.Sequential or a list of nn.Module blocks, got {type(obj).__name__}"
        )
    for name, m in named:
        if not isinstance(m, nn.Module):
            raise TypeError(f"layer {name} is a {type(m).__name__}, not an nn.Module")
    if not named:
        raise ValueError("the model has no layers to split")
    return [m for _, m in named], [name for name, _ in named]


def _modules(obj: object, word: str) -> list[nn.Module]:
    if obj is None:
        return []
    mods = [obj] if isinstance(obj, nn.Module) else list(obj)
    for m in mods:
        if not isinstance(m, nn.Module):
            raise TypeError(
                f"{word} takes an nn.Module or a list of them, got a {type(m).__name__}"
            )
    return mods


def _check_distinct(layers: list, pre: list, post: list) -> None:
    seen: dict[int, str] = {}
    parts = [("layer", layers), ("pre module", pre), ("post module", post)]
    for word, mods in parts:
        for k, m in enumerate(mods):
            where = f"{word} {k}"
            if id(m) in seen:
                raise ValueError(
                    f"{where} is the same module object as {seen[id(m)]}; the stages would run "
                    "it twice. Give each place its own module (to share weights between "
                    "stages, declare them with PipelineStage(tied=...))"
                )
            seen[id(m)] = where


def _check_num_stages(num_stages: object, counts: Sequence[int] | None, n: int) -> int:
    if num_stages is None:
        if counts is None:
            raise TypeError("split needs num_stages (or counts, one layer count per stage)")
        num_stages = len(counts)
    if isinstance(num_stages, bool) or not isinstance(num_stages, int):
        raise TypeError(f"num_stages must be an int, got {type(num_stages).__name__}")
    if num_stages < 1:
        raise ValueError(f"num_stages must be at least 1, got {num_stages}")
    if num_stages > n:
        raise ValueError(
            f"{n} layers cannot fill {num_stages} stages: every stage needs at least one layer. "
            f"Use at most {n} stages, or give the model as finer layers (a block's children)"
        )
    return num_stages


def _check_counts(counts: Sequence[int], k: int, n: int) -> list[int]:
    counts = list(counts)
    if any(isinstance(c, bool) or not isinstance(c, int) for c in counts):
        raise TypeError(f"counts must be whole numbers of layers, got {counts}")
    if len(counts) != k:
        raise ValueError(f"counts gives {len(counts)} stages but num_stages is {k}")
    for s, c in enumerate(counts):
        if c < 1:
            raise ValueError(
                f"counts {counts} gives stage {s} {c} layers; every stage needs at least one"
            )
    if sum(counts) != n:
        raise ValueError(
            f"counts {counts} add up to {sum(counts)} layers but the model has {n}; each layer "
            "must be in exactly one stage, so the counts must add up to the number of layers"
        )
    return counts


def _fmt(x: float) -> str:
    if float(x).is_integer():
        return f"{int(x):,}"
    return f"{x:.3f}"
