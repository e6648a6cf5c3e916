"""Tied weights across stages: one value to start from, one summed gradient after every step.

A stage declares what it shares with ``PipelineStage(..., tied={"wte": embed.weight})``; the
stage holding the model's head declares ``tied={"wte": head.weight}``. At its first step a
schedule finds every owner of every key (one gather over the ranks), refuses keys whose
owners disagree on shape or dtype, and copies the value of the lowest-index owning stage into
the other owners. After every step it sums each key's gradients over all owners (``main_grad``
where the parameter has one, else ``.grad``) and gives every owner the same sum, before the
optimizer runs. So owners stay equal as long as they take the same optimizer steps.

Owners on one rank are summed in place; a parameter declared by two stages of a rank that is
one object is counted once. Between ranks only the owners talk, point to point (the lowest
owning stage's rank sums and sends back), over the stages' process group; ranks that are
threads of one process (ppfast.Pipe) meet at a barrier instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..runtime.collectives import gather_objects, wait
from ..runtime.errors import PipelineCommError
from ..runtime.threads import ThreadGroup
from ..training.extensions import Extension, RankContext, register

# p2p tag of tie traffic: far above what the executor uses for a step's messages
_TAG = 0x7EEE0000


@dataclass(frozen=True)
class _Plan:
    """One key as every rank sees it after the gather."""

    key: str
    root: int  # rank of the lowest owning stage: its value wins, it sums for the others
    ranks: tuple[int, ...]  # owning ranks, root first, then ascending


def _local(t: torch.Tensor) -> torch.Tensor:
    """What a tie's owners exchange: the tensor, or an FSDP-sharded parameter's (a DTensor's)
    local shard, a view; owners of one data-parallel index hold the same shard."""
    return t.to_local() if _is_dtensor(t) else t


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without torch.distributed
        return False
    return isinstance(t, DTensor)


def grad_buffer(p: nn.Parameter) -> torch.Tensor | None:
    main = getattr(p, "main_grad", None)
    return main if main is not None else p.grad


class TiedParameters:
    """This rank's tied parameters under one schedule; ``comm`` reaches the other ranks (None
    when the schedule runs on one rank)."""

    def __init__(self, stages: Sequence, rank: int, comm: object | None):
        self.rank = rank
        self.comm = comm
        # key -> [(stage, param)], lowest stage first (a stage pair may hold one object)
        self.local: dict[str, list[tuple[int, nn.Parameter]]] = {}
        for s in sorted(stages, key=lambda s: s.stage_index):
            for key, p in s.tied.items():
                self.local.setdefault(key, []).append((s.stage_index, p))
        self.plans: dict[str, _Plan] = {}
        self._remote = False  # some key has owners on several ranks

    def setup(self) -> None:
        """Find every key's owners, check they agree, and start them from one value."""
        mine = {
            key: {
                "shape": tuple(held[0][1].shape),
                "dtype": str(held[0][1].dtype),
                "stages": [s for s, _ in held],
                "ids": [id(p) for p in _distinct(held)],
                "shapes": {s: tuple(p.shape) for s, p in held},
                "dtypes": {s: str(p.dtype) for s, p in held},
            }
            for key, held in self.local.items()
        }
        everyone = self.comm.gather(mine) if self.comm is not None else [mine]
        if self.comm is None and len(everyone) != 1:
            raise AssertionError("a schedule on several ranks needs a way to reach them")
        self.plans = _plan(everyone, same_process=getattr(self.comm, "same_process", False))
        self._remote = any(len(plan.ranks) > 1 for plan in self.plans.values())
        with torch.no_grad():
            self._start_equal()

    def _start_equal(self) -> None:
        values = {}
        for key, held in self.local.items():
            params = _distinct(held)
            if self.plans[key].root == self.rank:
                for p in params[1:]:
                    _local(p).copy_(_local(params[0]))
            # the root's value to send, or on another owner the parameter to receive like
            values[key] = _local(params[0]).detach()
        received = self.comm.broadcast(values, self.plans) if self._remote else {}
        for key, value in received.items():
            for p in _distinct(self.local[key]):
                _local(p).copy_(value)

    def begin_step(self) -> None:
        """Before a step every owner holds the same gradient (the earlier steps' sum, when steps
        accumulate): keep it on the root's first owner only, so that reduce() counts it once."""
        for key, held in self.local.items():
            first = 1 if self.plans[key].root == self.rank else 0
            for p in _distinct(held)[first:]:
                buf = grad_buffer(p)
                if buf is not None:
                    buf.zero_()

    def end_step(self) -> None:
        self.reduce()

    def reduce(self) -> None:
        """Every owner of every key gets the sum of all owners' gradients."""
        if not self.plans:
            return
        partials = {key: _local_sum(_distinct(held)) for key, held in self.local.items()}
        totals = dict(partials)
        if self._remote:
            remote = {k: t for k, t in partials.items() if len(self.plans[k].ranks) > 1}
            totals.update(self.comm.sum(remote, self.plans))
        for key, total in totals.items():
            for p in _distinct(self.local[key]):
                if not p.requires_grad:
                    continue
                buf = grad_buffer(p)
                if buf is None:
                    p.grad = total.to(p.dtype, copy=True)
                elif buf is not total:
                    _local(buf).copy_(total)


def _distinct(held: list[tuple[int, nn.Parameter]]) -> list[nn.Parameter]:
    out: list[nn.Parameter] = []
    for _, p in held:
        if all(q is not p for q in out):
            out.append(p)
    return out


def _local_sum(params: list[nn.Parameter]) -> torch.Tensor:
    """This rank's share of a key's gradient, in the dtype sums are made in."""
    bufs = [_local(b) for b in map(grad_buffer, params) if b is not None]
    p0 = _local(params[0])
    wire = torch.promote_types(p0.dtype, torch.float32)  # 16-bit gradients are summed in fp32
    if not bufs:
        return torch.zeros(p0.shape, dtype=wire, device=p0.device)
    if len(bufs) == 1 and bufs[0].dtype == wire:
        return bufs[0]  # nothing to add here: the buffer itself is this rank's share
    total = bufs[0].to(wire, copy=True)
    for b in bufs[1:]:
        total.add_(b.to(device=total.device))
    return total


def _plan(everyone: list[dict], same_process: bool) -> dict[str, _Plan]:
    """Each key's plan from every rank's declarations; the same ValueError on every rank."""
    owners: dict[str, list[tuple[int, int, tuple, str]]] = {}  # key -> (stage, rank, shape, dtype)
    ids: dict[int, tuple[str, int, int]] = {}
    for rank, decl in enumerate(everyone):
        for key, d in sorted(decl.items()):
            for s in d["stages"]:
                owners.setdefault(key, []).append((s, rank, d["shapes"][s], d["dtypes"][s]))
            if same_process:
                for i in d["ids"]:
                    other = ids.setdefault(i, (key, rank, d["stages"][0]))
                    if other[1] != rank:
                        raise ValueError(
                            f"tied[{key!r}]: stages {other[2]} and {d['stages'][0]} are on "
                            f"different ranks (threads) but hold one Parameter object, so both "
                            "would write its gradient at once; give one of them its own copy "
                            "(nn.Parameter(w.detach().clone())) and keep the tie: the copies "
                            "start equal and get the same summed gradient"
                        )
    plans = {}
    for key, own in sorted(owners.items()):
        own.sort()
        stages = [s for s, *_ in own]
        if len(own) < 2:
            raise ValueError(
                f"tied key {key!r} is declared only by stage {stages[0]}; declare it on every "
                "stage that shares the parameter (the same key on each), or drop it"
            )
        if len({(shape, dtype) for *_, shape, dtype in own}) > 1:
            seen = ", ".join(f"stage {s}: {list(shape)} {dtype}" for s, _, shape, dtype in own)
            raise ValueError(
                f"tied key {key!r} joins parameters of different shapes or dtypes ({seen}); a "
                "tie needs one shape and dtype on every stage"
            )
        root = own[0][1]
        ranks = (root, *sorted({r for _, r, *_ in own} - {root}))
        plans[key] = _Plan(key, root, ranks)
    return plans


# ---------------------------------------------------------------------------- c10d


class C10dTies:
    """Tie traffic between processes over a c10d group; every wait bounded by ``timeout``."""

    same_process = False

    def __init__(self, group, rank: int, size: int, timeout: float):
        self.group, self.rank, self.size = group, rank, size
        self.timeout = timeout

    def _wait(self, work, what: str, peer: int) -> None:
        wait(work, self.timeout, lambda why, timed_out: self._error(why, peer, timed_out), what)

    def _error(self, why: str, peer: int, timed_out: bool) -> PipelineCommError:
        where = f"from rank {peer}" if peer >= 0 else "from the group"
        return PipelineCommError(
            f"rank {self.rank}: {why} ({where}, waited up to {self.timeout:g} s for tied "
            "parameters)",
            self.rank,
            "tied parameters",
            peer,
            timed_out,
        )

    def gather(self, obj) -> list:
        fail = lambda why, timed_out: self._error(why, -1, timed_out)  # noqa: E731
        return gather_objects(obj, self.group, self.timeout, fail, "gathering tied keys")

    def _send(self, t: torch.Tensor, peer: int):
        import torch.distributed as dist

        return dist.isend(t, group=self.group, group_dst=peer, tag=_TAG)

    def _recv(self, t: torch.Tensor, peer: int, what: str) -> torch.Tensor:
        import torch.distributed as dist

        self._wait(dist.irecv(t, group=self.group, group_src=peer, tag=_TAG), what, peer)
        return t

    def broadcast(self, values: dict, plans: dict[str, _Plan]) -> dict:
        """Each key's root sends its value (``values[key]``) to the other owning ranks, which
        receive into tensors like their own ``values[key]``; returns what was received."""
        got, sends = {}, []
        for key, plan in sorted(plans.items()):
            if self.rank == plan.root:
                value = values[key].contiguous()
                sends += [(self._send(value, r), r) for r in plan.ranks[1:]]
            elif self.rank in plan.ranks:
                buf = torch.empty_like(values[key], memory_format=torch.contiguous_format)
                got[key] = self._recv(buf, plan.root, f"value of tied[{key!r}]")
        for work, r in sends:
            self._wait(work, "sending tied values", r)
        return got

    def sum(self, partials: dict[str, torch.Tensor], plans: dict[str, _Plan]) -> dict:
        """Each key's sum over its owning ranks, root's partial first, the same on all."""
        totals, sends = {}, []
        for key in sorted(partials):
            plan, mine = plans[key], partials[key]
            what = f"gradient of tied[{key!r}]"
            if self.rank == plan.root:
                total = mine.contiguous()
                buf = torch.empty_like(total)
                for r in plan.ranks[1:]:
                    total = total.add(self._recv(buf, r, what))
                sends += [(self._send(total, r), r) for r in plan.ranks[1:]]
                totals[key] = total
            else:
                sends.append((self._send(mine.contiguous(), plan.root), plan.root))
                buf = torch.empty_like(mine, memory_format=torch.contiguous_format)
                totals[key] = self._recv(buf, plan.root, what)
        for work, r in sends:
            self._wait(work, "sending tied gradients", r)
        return totals


# ---------------------------------------------------------------------------- threads


class ThreadTies:
    """Tie traffic between ranks that are threads of one process (ppfast.Pipe), over a
    :class:`~ppfast.runtime.threads.ThreadGroup` (a new one of ``size`` ranks, or ``group``).

    Every rank's schedule holds the same group. Ranks publish what they have, meet, read
    (never write) what the others published, meet again, and only then write their own
    tensors: two threads never touch one tensor at the same time, and all owners add in the
    same order, so they hold bit-identical sums.
    """

    same_process = True

    def __init__(self, size: int = 0, timeout: float = 300.0, group: ThreadGroup | None = None):
        self.group = group if group is not None else ThreadGroup(size, timeout)

    def bind(self, rank: int) -> _BoundThreadTies:
        return _BoundThreadTies(self.group, rank)

    def abort(self) -> None:
        """Wake every rank waiting here (a rank failed); they raise PipelineCommError."""
        self.group.abort()


_WHAT = "making tied parameters equal"


class _BoundThreadTies:
    same_process = True

    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank = group, rank

    def gather(self, obj) -> list:
        out = self.group.publish(self.rank, obj, _WHAT)
        self.group.meet(self.rank, _WHAT)  # all have read before a slot is reused
        return out

    def broadcast(self, values: dict, plans: dict[str, _Plan]) -> dict:
        everyone = self.group.publish(self.rank, values, _WHAT)
        got = {
            key: everyone[plan.root][key].clone()
            for key, plan in plans.items()
            if self.rank in plan.ranks[1:]
        }
        self.group.meet(self.rank, _WHAT)
        return got

    def sum(self, partials: dict[str, torch.Tensor], plans: dict[str, _Plan]) -> dict:
        everyone = self.group.publish(self.rank, partials, _WHAT)
        totals = {}
        for key, mine in partials.items():
            parts = [everyone[r][key] for r in plans[key].ranks]
            total = parts[0].to(mine.device, copy=True)
            for t in parts[1:]:
                total.add_(t.to(mine.device))
            totals[key] = total
        # nobody writes a buffer another rank may still be reading
        self.group.meet(self.rank, _WHAT)
        return totals


# ---------------------------------------------------------------------------- the schedule's part


def _rank_hooks(ctx: RankContext) -> TiedParameters | None:
    """At a schedule's first step: this rank's ties, set up (None when it holds none)."""
    declared = any(s.tied for s in ctx.stages)
    if ctx.size == 1:
        comm = None
    elif ctx.thread_group is not None:
        comm = _BoundThreadTies(ctx.thread_group, ctx.rank)
    elif ctx.group is not None:
        comm = C10dTies(ctx.group, ctx.rank, ctx.size, ctx.timeout)
    elif declared:
        raise ValueError(
            "tied parameters across ranks that are threads of one process need tie_group; "
            "use ppfast.Pipe(..., tied=...), which provides it"
        )
    else:
        return None  # ranks of this transport cannot be reached; none of ours is tied
    ties = TiedParameters(ctx.stages, ctx.rank, comm)
    ties.setup()
    return ties if ties.plans else None


register(Extension("ppfast.model.ties", rank_hooks=_rank_hooks))
