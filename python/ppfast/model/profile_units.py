"""Timing of a model's units (pre modules, each layer, post modules and loss) as pipeline stages.

Each unit's forward (F), input backward (I) and weight backward (W) are measured on one
microbatch, as ppfast.split's ``profile`` method balances them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..nn.linear import SplitLayer
from ..training.stage import PipelineStage

Times = tuple[float, float, float]  # (F, I, W) seconds of one microbatch


class _Outputs(nn.Module):
    """The last profiled unit when there are no post modules: it passes the output on, so the
    loss is timed apart from the last layer."""

    def forward(self, *args):
        return args[0] if len(args) == 1 else args


def _mean_loss(out: object) -> torch.Tensor:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    floats = [
        t.float().mean() for t in outs if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]
    if not floats:
        raise ValueError(
            "profile needs a loss to run the backward and the model's output has no floating-"
            "point tensor; pass loss_fn= (and target=)"
        )
    return sum(floats)


def profile_units(
    pre: Sequence[nn.Module],
    layers: Sequence[nn.Module],
    post: Sequence[nn.Module],
    sample,
    target,
    loss_fn: Callable | None,
    warmup: int,
    repeats: int,
) -> tuple[Times | None, list[Times], Times]:
    """(F, I, W) medians of the pre modules (None without), every layer, and post + loss."""
    units: list[tuple[str, nn.Module]] = []
    if pre:
        units.append(("the pre modules", pre[0] if len(pre) == 1 else nn.Sequential(*pre)))
    units += [(f"layer {k} ({type(m).__name__})", m) for k, m in enumerate(layers)]
    tail = nn.Sequential(*post) if len(post) > 1 else (post[0] if post else _Outputs())
    units.append(("the post modules and the loss", tail))
    args = tuple(sample) if isinstance(sample, (tuple, list)) else (sample,)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    loss = loss_fn or _mean_loss
    with _state_kept([m for _, m in units], args):
        samples = _time_units(units, args, target, loss, warmup, repeats)
    med = [tuple(statistics.median(x) for x in per) for per in samples]
    return (med[0] if pre else None), med[1 if pre else 0 : -1], med[-1]


def _time_units(units, args, target, loss, warmup: int, repeats: int) -> list:
    """Each unit as its own PipelineStage, from the inputs and output gradients one pass
    through the whole model gave it, so that it frees what it allocated before the next one
    runs, as in a pipeline's steady state. Rounds go over all units in turn, so a burst of
    other work on the machine spreads over every layer alike."""
    n = len(units)
    stages = [PipelineStage(m, s, n) for s, (_, m) in enumerate(units)]

    def prepare(st: PipelineStage) -> None:
        st.weight_store.enabled = True
        st.prepare(1, [args], [{}], [target], loss, 1.0)

    def noted(what: str, fn: Callable, *a):
        try:
            return fn(*a)
        except Exception as e:
            e.add_note(f"(while ppfast.split profiled {what})")
            raise

    inputs: list = [None]
    for (what, _), st in zip(units, stages, strict=True):
        prepare(st)
        inputs.append(noted(what, st.forward, 0, inputs[-1])[0])
    grads: list = [None] * n
    for s in reversed(range(n)):
        out = noted(units[s][0], stages[s].backward, 0, grads[s], False)
        stages[s].weight(0)
        if s:
            grads[s - 1] = out
    now = _clock([m for _, m in units], args)
    samples: list[list[list[float]]] = [[[], [], []] for _ in range(n)]
    for rep in range(warmup + repeats):
        for s, st in enumerate(stages):
            prepare(st)
            t0 = now()
            st.forward(0, inputs[s])
            t1 = now()
            st.backward(0, grads[s], full=False)
            t2 = now()
            st.weight(0)
            t3 = now()
            if rep >= warmup:
                for k, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
                    samples[s][k].append(dt)
    return samples


def _devices(modules: Sequence[nn.Module], args: tuple) -> set[torch.device]:
    out = {t.device for m in modules for t in [*m.parameters(), *m.buffers()]}
    return out | {a.device for a in args if isinstance(a, torch.Tensor)}


def _clock(modules: Sequence[nn.Module], args: tuple) -> Callable[[], float]:
    """A clock that first waits for the queued work of every GPU involved."""
    gpus = [d for d in _devices(modules, args) if d.type == "cuda"]
    if not gpus:
        return time.perf_counter

    def now() -> float:
        for d in gpus:
            torch.cuda.synchronize(d)
        return time.perf_counter()

    return now


@contextmanager
def _state_kept(modules: Sequence[nn.Module], args: tuple) -> Iterator[None]:
    """Profile without a trace: gradients (``.grad`` and ``main_grad``), buffers (a batch
    norm's statistics), split layers' weight-gradient stores and the random state are put
    back as they were."""
    params = list({id(p): p for m in modules for p in m.parameters()}.values())
    buffers = list({id(b): b for m in modules for b in m.buffers()}.values())
    grads = [p.grad for p in params]
    mains = [getattr(p, "main_grad", None) for p in params]
    kept = [b.detach().clone() for b in buffers]
    stores = [
        (m, m.weight_store) for mod in modules for m in mod.modules() if isinstance(m, SplitLayer)
    ]
    gpus = sorted({d.index or 0 for d in _devices(modules, args) if d.type == "cuda"})
    for p, main in zip(params, mains, strict=True):
        p.grad = None
        if main is not None:
            p.main_grad = torch.zeros_like(main)
    try:
        with torch.random.fork_rng(devices=gpus), torch.enable_grad():
            yield
    finally:
        with torch.no_grad():
            for b, v in zip(buffers, kept, strict=True):
                b.copy_(v)
        for p, grad, main in zip(params, grads, mains, strict=True):
            p.grad = grad
            if main is not None:
                p.main_grad = main
        for m, store in stores:
            m.weight_store = store
