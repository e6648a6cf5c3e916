"""Gradients averaged over data-parallel replicas, in buckets posted while the pipeline runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..model.ties import grad_buffer
from ..runtime.collectives import gather_objects, wait
from ..runtime.errors import PipelineCommError
from ..training.pipeline import PipelineSchedule
from ..training.stage import PipelineStage


@dataclass
class _Bucket:
    """Parameters whose gradients cross the group in one flat all-reduce."""

    params: list[int]  # indices into DataParallelGrads._params, in buffer order
    offsets: list[int]
    numel: int
    dtype: torch.dtype
    device: torch.device
    overlapped: bool
    flat: torch.Tensor | None = None
    work: object | None = None
    pending: int = 0  # overlapped: parameters whose gradient is not final yet this step
    names: list[str] = field(default_factory=list)


class DataParallelGrads:
    """Averages (or sums) this rank's gradients over its data-parallel replicas.

    ``model`` is what this rank trains: its PipelineSchedule, its PipelineStage(s), or plain
    modules (or a list of them). ``dp_group`` joins the ranks holding the same stages in every
    replica (``PipelineMesh.dp_group``; default: the world group, for data parallelism
    alone). After each ``schedule.step(...)``, :meth:`reduce` gives every replica the same
    gradient: the mean over replicas with ``average`` (so the mean over the global batch,
    since the schedule already takes the mean over microbatches), else the sum. Each
    parameter's ``main_grad`` is reduced where it has one, else ``.grad``.

    Gradients travel in flat buffers of about ``bucket_mb`` MiB (one asynchronous all-reduce
    each). With ``overlap`` (the default) a bucket leaves as soon as all its parameters'
    gradients are final, while the pipeline still runs its last backward actions, and
    :meth:`reduce` mostly waits. The first step is measured, not overlapped: how many times
    each parameter's gradient is accumulated in a step, and in which order they finish (the
    first replica's order, so that every replica posts the same all-reduces in the same
    order); from the second step on, a bucket is posted once it and all before it are final.
    Tied parameters (``PipelineStage(tied=...)``), which the schedule sums over their owners
    at the end of its step, and parameters without a gradient in the first step are reduced
    in :meth:`reduce`. With plain modules the ties are unknown: pass the stages or the
    schedule when any parameter is tied. The hooks are post-accumulate-grad hooks: register
    your own gradient hooks before creating this object, so that they run first.
    docs/pp_dp.md has what the hooks do to split ``ppfast.nn.Linear`` layers and their
    ``main_grad`` (use ``overlap=False`` to keep a 16-bit model's gradients in fp32).

    A parameter accumulated more times in a later step than in the first (data-dependent
    use) would already be on its way: :meth:`reduce` raises then, naming it; use
    ``overlap=False`` for such models. Fewer times is fine. For gradient accumulation over
    several steps, run all but the last inside :meth:`no_sync`.

    Every replica must hold the same parameters (same shapes and dtypes, in the same order):
    the constructor checks that over ``dp_group`` (a collective: every rank creates its
    reducer at the same point). Every wait is bounded by ``timeout`` seconds.

    Example (PP=2 x DP=2 on four ranks)::

        mesh = ppfast.parallel.pipeline_mesh(pp=2, dp=2)
        stages = [ppfast.PipelineStage(mod, s, 4, group=mesh.pp_group) for s, mod in mine]
        schedule = ppfast.ScheduleZBVZeroBubble(stages, 8, loss_fn)
        reducer = ppfast.parallel.DataParallelGrads(schedule, mesh.dp_group)
        schedule.step(mesh.shard(ids), target=mesh.shard(target))
        reducer.reduce()
        optimizer.step()
    """

    def __init__(
        self,
        model: PipelineSchedule | PipelineStage | nn.Module | Sequence,
        dp_group=None,
        *,
        average: bool = True,
        bucket_mb: float = 4.0,
        overlap: bool = True,
        timeout: float = 300.0,
    ):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized: call init_process_group (or build a "
                "ppfast.parallel.pipeline_mesh) before DataParallelGrads"
            )
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be positive, got {bucket_mb!r}")
        self.group = dp_group if dp_group is not None else dist.group.WORLD
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.average = average
        self.overlap = overlap
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.timeout = timeout
        self._params, self._names, self._tied, self._stores = _collect(model)
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._check_replicas()
        self._buckets: list[_Bucket] | None = None
        self._bucket_of: dict[int, int] = {}  # param index -> bucket index (overlapped only)
        self._expect: list[int] = []
        self._fired = [0] * len(self._params)
        self._last = [0] * len(self._params)  # sequence number of the latest accumulation
        self._seq = 0
        self._next = 0  # first bucket not yet posted this step
        self._late: list[int] = []  # accumulated after their bucket left
        self._sync = True
        #: buckets posted during the last step, before :meth:`reduce` was called
        self.posted_before_reduce = 0
        self._handles = []
        if overlap and self.size > 1:
            for i, p in enumerate(self._params):
                if not self._tied[i]:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    # ------------------------------------------------------------------ public

    @property
    def buckets(self) -> list[list[str]]:
        """The parameter names of each bucket, in the order they are posted (after the first
        :meth:`reduce`; empty before)."""
        return [list(b.names) for b in self._buckets or []]

    def reduce(self) -> None:
        """Post what is still to post, wait for every bucket, and write the results back.

        Call it once after every ``schedule.step(...)``, before the optimizer step, on every
        rank (it is a collective over ``dp_group``).
        """
        if not self._sync:
            raise RuntimeError(
                "reduce() inside no_sync(): leave the no_sync() block for the step whose "
                "gradients should be reduced, then call reduce()"
            )
        if self.size == 1:
            return
        if self._buckets is None:
            self._build()
            self.posted_before_reduce = 0
        else:
            self.posted_before_reduce = self._next
        try:
            while self._next < len(self._buckets):
                self._post(self._next)
                self._next += 1
            for b in self._buckets:
                self._finish(b)
        finally:
            self._next = 0
            self._fired = [0] * len(self._params)
            self._seq = 0
            for b in self._buckets:
                b.work = None
                if b.overlapped:
                    b.pending = sum(1 for i in b.params if self._expect[i] > 0)
        if self._late:
            names = ", ".join(self._names[i] for i in sorted(set(self._late))[:5])
            self._late = []
            raise RuntimeError(
                f"the gradients of {names} were accumulated more times in this step than in "
                "the first one, after their bucket had already been sent; this step's "
                "gradients of their bucket are not averaged correctly. The model uses them a "
                "varying number of times per step: create DataParallelGrads(..., overlap=False)"
            )

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Steps run inside accumulate gradients locally and post nothing; the first step
        after the block, then :meth:`reduce`, reduce the whole accumulated gradient."""
        before = self._sync
        self._sync = False
        try:
            yield
        finally:
            self._sync = before

    def remove(self) -> None:
        """Remove the gradient hooks; the object reduces nothing afterwards."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.size = 1

    # ------------------------------------------------------------------ setup

    def _check_replicas(self) -> None:

        if self.size == 1:
            return
        mine = [
            (tuple(p.shape), str(p.dtype), t) for p, t in zip(self._params, self._tied, strict=True)
        ]
        everyone = gather_objects(
            mine, self.group, self.timeout, self._error, "checking the replicas' parameters"
        )
        for r, theirs in enumerate(everyone):
            if theirs == everyone[0]:
                continue
            if len(theirs) != len(everyone[0]):
                raise ValueError(
                    f"data-parallel ranks 0 and {r} (of dp_group) hold {len(everyone[0])} and "
                    f"{len(theirs)} parameters; every replica must build the same stages: check "
                    "that dp_group joins ranks with the same pipeline rank (PipelineMesh.dp_group)"
                )
            i = next(i for i, (a, b) in enumerate(zip(everyone[0], theirs, strict=True)) if a != b)
            raise ValueError(
                f"data-parallel ranks 0 and {r} (of dp_group) differ at parameter {i} "
                f"({self._names[i]} here): {_describe(everyone[0][i])} against "
                f"{_describe(theirs[i])}; every replica must build the same stages with the same "
                "ties, in the same order"
            )

    def _build(self) -> None:
        """Buckets, from the step just run: the overlapped ones in the order their gradients
        were final (the first replica's), then the rest in reverse parameter order."""
        import torch.distributed as dist

        n = len(self._params)
        if self.overlap:
            fired = [i for i in range(n) if self._fired[i] > 0 and not self._tied[i]]
            order = sorted(fired, key=lambda i: self._last[i])
            plan = [order, [self._fired[i] for i in range(n)]]
            dist.broadcast_object_list(plan, group=self.group, group_src=0)
            order, self._expect = plan
        else:
            order, self._expect = [], [0] * n
        chosen = set(order)
        rest = [i for i in reversed(range(n)) if i not in chosen]
        self._buckets = self._pack(order, overlapped=True) + self._pack(rest, overlapped=False)
        self._bucket_of = {
            i: k for k, b in enumerate(self._buckets) if b.overlapped for i in b.params
        }

    def _pack(self, order: list[int], overlapped: bool) -> list[_Bucket]:
        out: list[_Bucket] = []
        cur: _Bucket | None = None
        for i in order:
            p = self._params[i]
            buf = grad_buffer(p)
            dtype = buf.dtype if buf is not None else p.dtype
            size = p.numel() * dtype.itemsize
            if (
                cur is None
                or (cur.dtype, cur.device) != (dtype, p.device)
                or (cur.numel * dtype.itemsize + size > self.bucket_bytes and cur.params)
            ):
                cur = _Bucket([], [], 0, dtype, p.device, overlapped)
                out.append(cur)
            cur.params.append(i)
            cur.offsets.append(cur.numel)
            cur.names.append(self._names[i])
            cur.numel += p.numel()
        for b in out:
            b.flat = torch.empty(b.numel, dtype=b.dtype, device=b.device)
        return out

    # ------------------------------------------------------------------ per step

    def _hook(self, p: nn.Parameter) -> None:
        i = self._index[id(p)]
        store = self._stores[i]
        # a split layer's parameter with a hook gets its gradient through autograd, in .grad,
        # when its stage's schedule splits the backward; without the hook it would have gone
        # straight to main_grad
        if store is not None and store.enabled and p.grad is not None:
            main = getattr(p, "main_grad", None)
            if main is not None:
                main.add_(p.grad)
                p.grad = None
        if not self._sync:
            return
        self._fired[i] += 1
        self._seq += 1
        self._last[i] = self._seq
        k = self._bucket_of.get(i)
        if k is None:
            return  # the first step, or a parameter reduced in reduce()
        if k < self._next:
            self._late.append(i)
        elif self._fired[i] == self._expect[i]:
            self._buckets[k].pending -= 1
            while self._next < len(self._buckets):
                b = self._buckets[self._next]
                if not b.overlapped or b.pending > 0:
                    break
                self._post(self._next)
                self._next += 1

    def _post(self, k: int) -> None:
        import torch.distributed as dist

        b = self._buckets[k]
        for i, off in zip(b.params, b.offsets, strict=True):
            p = self._params[i]
            g = grad_buffer(p)
            part = b.flat[off : off + p.numel()]
            if g is None:
                part.zero_()
            elif g.layout != torch.strided:
                raise TypeError(
                    f"{self._names[i]} has a {g.layout} gradient; DataParallelGrads reduces dense "
                    "gradients only (build embeddings with sparse=False)"
                )
            else:
                part.copy_(g.reshape(-1))
        b.work = dist.all_reduce(b.flat, group=self.group, async_op=True)

    def _finish(self, b: _Bucket) -> None:
        work, b.work = b.work, None
        what = f"all-reduce of a gradient bucket ({b.names[0]}, ...)"
        wait(work, self.timeout, self._error, what)
        if self.average:
            b.flat.div_(self.size)
        for i, off in zip(b.params, b.offsets, strict=True):
            p = self._params[i]
            part = b.flat[off : off + p.numel()].view(p.shape)
            g = grad_buffer(p)
            if g is None:
                p.grad = part.to(p.dtype, copy=True)
            else:
                g.copy_(part)

    def _error(self, why: str, timed_out: bool) -> PipelineCommError:
        import torch.distributed as dist

        return PipelineCommError(
            f"rank {dist.get_rank()} (data-parallel rank {self.rank} of {self.size}): {why} "
            f"(waited up to {self.timeout:g} s)",
            dist.get_rank(),
            "data-parallel all-reduce",
            -1,
            timed_out,
        )


def _describe(entry: tuple) -> str:
    shape, dtype, tied = entry
    return f"{list(shape)} {dtype}" + (" tied" if tied else "")


def _collect(model) -> tuple[list[nn.Parameter], list[str], list[bool], list]:
    """Parameters (each once, requiring grad), their names, whether each is tied, and for
    each the weight-gradient store of the stage whose split layer holds it (else None)."""
    items = model if isinstance(model, (list, tuple)) else [model]
    if not items:
        raise TypeError("model must be a schedule, stage or module, or a non-empty list of them")
    stages: list[PipelineStage] = []
    modules: list[tuple[str, nn.Module]] = []
    for item in items:
        if isinstance(item, PipelineSchedule):
            stages += item.stages
        elif isinstance(item, PipelineStage):
            stages.append(item)
        elif isinstance(item, nn.Module):
            modules.append(("", item))
        else:
            raise TypeError(
                "model must be a PipelineSchedule, PipelineStage or nn.Module, or a list of "
                f"them; got {type(item).__name__}"
            )
    modules = [(f"stage {s.stage_index}: ", s.submod) for s in stages] + modules
    for _, mod in modules:
        if isinstance(mod, DistributedDataParallel):
            raise ValueError(
                "a DistributedDataParallel stage module reduces its gradients by itself (the "
                "stage runs it under no_sync() until its last backward of the step); use DDP or "
                "DataParallelGrads, not both: unwrap it (module.module) to reduce here"
            )
    params: list[nn.Parameter] = []
    names: list[str] = []
    seen: set[int] = set()
    for prefix, mod in modules:
        for name, p in mod.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
                names.append(prefix + name)
    tied_ids = {id(p) for s in stages for p in s.tied.values()}
    split = {id(p): s.weight_store for s in stages for p in s.split_params}
    return params, names, [id(p) in tied_ids for p in params], [split.get(id(p)) for p in params]
