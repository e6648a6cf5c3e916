"""Measured costs of the demo's stages: F, I and W per microbatch, and one activation's transfer."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from ..stage import PipelineStage
from .model import GPT, loss_fn


def timer(device: torch.device) -> Callable[[], float]:
    """A clock that first waits for the device's queued work (a GPU runs asynchronously)."""
    if device.type == "cuda":

        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return now
    return time.perf_counter


def stage_costs(
    model: GPT, n: int, x: torch.Tensor, y: torch.Tensor, device: torch.device, reps: int = 5
) -> list[tuple[float, float, float]]:
    """(F, I, W) in seconds of each of ``n`` stages, for one microbatch (x, y): medians of
    ``reps`` rounds after one to warm up.

    Each stage runs through a PipelineStage, as in training: F, then I with the split layers'
    weight gradients deferred, then W. A stage is timed on its own, from the inputs and
    output gradients one pass through the whole model gave it, so that it frees what it
    allocated before the next one runs, as in a pipeline's steady state (timing all forwards
    before all backwards makes the later stages look slower, by the fresh memory they touch).
    Rounds go over all stages in turn, so that a burst of other work on the machine lands on
    every stage alike.
    """
    now = timer(device)
    stages = [PipelineStage(mod, s, n, device) for s, mod in enumerate(model.stages(n))]
    for st in stages:
        st.weight_store.enabled = True
        st.prepare(1, [(x,)], [{}], [y], loss_fn, 1.0)
    inputs: list = [None]
    for st in stages:
        inputs.append(st.forward(0, inputs[-1])[0])
    grads: list = [None] * n
    for s in reversed(range(n)):
        out = stages[s].backward(0, grads[s], full=False)
        stages[s].weight(0)
        if s:
            grads[s - 1] = out
    samples: list[list[list[float]]] = [[[], [], []] for _ in range(n)]
    for rep in range(reps + 1):
        for s, st in enumerate(stages):
            st.prepare(1, [(x,)], [{}], [y], loss_fn, 1.0)
            t0 = now()
            st.forward(0, inputs[s])
            t1 = now()
            st.backward(0, grads[s], full=False)
            t2 = now()
            st.weight(0)
            t3 = now()
            if rep:
                for k, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
                    samples[s][k].append(dt)
    for p in model.parameters():
        p.grad = None  # profiling must not leak into the first step's gradients
    return [tuple(statistics.median(k) for k in per) for per in samples]


def transfer_time(shape: tuple[int, ...], device: torch.device, reps: int = 20) -> float:
    """One-way time of one activation between ranks 0 and 1 (half the median round trip), on
    the default process group; every rank calls it, ranks past 1 only wait."""
    import torch.distributed as dist

    rank = dist.get_rank()
    buf = torch.zeros(shape, device=device)
    now = timer(device)
    trips = []
    for k in range(reps + 3):
        if rank == 0:
            t = now()
            dist.send(buf, 1)
            dist.recv(buf, 1)
            if k >= 3:
                trips.append(now() - t)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)
    dist.barrier()
    return statistics.median(trips) / 2 if trips else 0.0


def profile(
    model: GPT,
    counts: list[int],
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
) -> dict[int, list[tuple[float, float, float]]]:
    """Stage costs for every stage count in ``counts`` (one stage per rank, two per rank...)."""
    return {n: stage_costs(model, n, x, y, device) for n in sorted(set(counts))}


def merge(per_rank: list[dict[int, list[tuple[float, float, float]]]]) -> dict:
    """Ranks that profiled at the same time, each on its own core, averaged."""
    out = {}
    for n in per_rank[0]:
        out[n] = [
            tuple(statistics.fmean(r[n][s][k] for r in per_rank) for k in range(3))
            for s in range(n)
        ]
    return out
