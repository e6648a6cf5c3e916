"""Measured costs of the demo's stages: F, I and W per microbatch, and one activation's transfer."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from ...training.stage import PipelineStage
from .model import GPT, loss_fn


def timer(device: torch.device) -> Callable[[], float]:
    """A clock that first waits for the device's queued work (a GPU runs asynchronously)."""
    if device.type == "cuda":

        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return now
    return time.perf_counter


class StageTimer:
    """Times F, I and W of each of ``n`` stages of ``model`` for one microbatch (x, y).

    Each stage runs through a PipelineStage, as in training: F, then I with the split layers'
    weight gradients deferred, then W. A stage is timed on its own, from the inputs and
    output gradients one pass through the whole model gave it, so that it frees what it
    allocated before the next one runs, as in a pipeline's steady state (timing all forwards
    before all backwards makes the later stages look slower, by the fresh memory they touch).
    """

    def __init__(self, model: GPT, n: int, x: torch.Tensor, y: torch.Tensor, device):
        self.model, self.x, self.y = model, x, y
        self.now = timer(device)
        self.stages = [PipelineStage(mod, s, n, device) for s, mod in enumerate(model.stages(n))]
        for st in self.stages:
            st.weight_store.enabled = True
            self._prepare(st)
        self.inputs: list = [None]
        for st in self.stages:
            self.inputs.append(st.forward(0, self.inputs[-1])[0])
        self.grads: list = [None] * n
        for s in reversed(range(n)):
            out = self.stages[s].backward(0, self.grads[s], full=False)
            self.stages[s].weight(0)
            if s:
                self.grads[s - 1] = out
        self.samples: list[list[list[float]]] = [[[], [], []] for _ in range(n)]

    def _prepare(self, st: PipelineStage) -> None:
        st.prepare(1, [(self.x,)], [{}], [self.y], loss_fn, 1.0)

    def round(self, keep: bool = True) -> None:
        """Time every stage once."""
        now = self.now
        for s, st in enumerate(self.stages):
            self._prepare(st)
            t0 = now()
            st.forward(0, self.inputs[s])
            t1 = now()
            st.backward(0, self.grads[s], full=False)
            t2 = now()
            st.weight(0)
            t3 = now()
            if keep:
                for k, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
                    self.samples[s][k].append(dt)

    def costs(self) -> list[tuple[float, float, float]]:
        """Medians of the rounds kept, per stage."""
        return [tuple(statistics.median(k) for k in per) for per in self.samples]


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
    make_model: Callable[[], GPT],
    counts: list[int],
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    reps: int = 5,
) -> dict[int, list[tuple[float, float, float]]]:
    """(F, I, W) in seconds per stage for every stage count in ``counts`` (one stage per rank,
    two per rank...): medians of ``reps`` rounds after one to warm up.

    Each count cuts a model of its own (a layer serves one stage's weight-gradient store at
    a time), and rounds go over the counts in turn, so that a burst of other work on the
    machine lands on every candidate alike, not on one partition of the model.
    """
    timers = [StageTimer(make_model(), n, x, y, device) for n in sorted(set(counts))]
    for rep in range(reps + 1):
        for t in timers:
            t.round(keep=rep > 0)
    return {len(t.stages): t.costs() for t in timers}


def merge(per_rank: list[dict[int, list[tuple[float, float, float]]]]) -> dict:
    """Ranks that profiled at the same time, each on its own core, averaged."""
    out = {}
    for n in per_rank[0]:
        out[n] = [
            tuple(statistics.fmean(r[n][s][k] for r in per_rank) for k in range(3))
            for s in range(n)
        ]
    return out
