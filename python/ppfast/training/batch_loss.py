"""Losses that weigh each microbatch by its share of the batch instead of equally.

By default a schedule scales each microbatch's loss by 1/m: the step's gradient is that of
the mean of the microbatch losses. That is the batch's loss only when every microbatch
counts the same (as many tokens, as many samples). A loss that averages over what it counts
(tokens that are not padding, say) wants the batch's mean instead: each microbatch's sum
divided by the whole batch's count.

A ``loss_fn`` asks for that by having a ``batch_kwargs(targets)`` method. At every step the
schedule calls it once on the rank holding the last stage, with the list of every
microbatch's target, and gives what it returns (a dict) to every ``loss_fn`` call of that
step as keyword arguments (``num_items_in_batch``: the batch's count). The loss then
returns its microbatch's share of the batch's loss, which the schedule sums without
dividing by m, and the values in ``step(losses=...)`` add up to the batch's loss.
``batch_kwargs`` returning None means an ordinary loss (1/m each). :class:`BatchLoss` wraps
any loss function this way::

    def token_sum(logits, labels, num_items_in_batch):
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum",
                               ignore_index=-100) / num_items_in_batch

    count = lambda targets: {"num_items_in_batch": sum(int((t != -100).sum()) for t in targets)}
    sched = ppfast.Schedule1F1B(stage, 4, loss_fn=ppfast.BatchLoss(token_sum, count))

Across data-parallel replicas the same holds once the count is the global batch's: give the
loss a ``dp_group`` (``BatchLoss(..., dp_group=mesh.dp_group)``, or any loss_fn with a
``dp_group`` attribute, as ``ppfast.hf.CausalLMLoss(weighting="tokens", dp_group=...)``).
The schedule then sums every number ``batch_kwargs`` returned over the replicas (one
all-reduce on the last stage's rank, before the step), and scales the gradients by the
number of replicas, which the replicas' gradient averaging divides out again. Every token of
the global batch then weighs alike, however the padding falls between replicas. Without a
``dp_group`` each replica counts its own batch, and their means are averaged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class BatchLoss:
    """``loss_fn`` whose microbatches are weighed by ``batch_kwargs(targets) -> dict``: what
    it returns goes to every ``loss_fn(output, target, **kwargs)`` call of the step, and the
    schedule sums the microbatch losses instead of averaging them (see the module's text)."""

    def __init__(self, loss_fn: Callable, batch_kwargs: Callable[[Sequence], dict], dp_group=None):
        if not callable(loss_fn) or not callable(batch_kwargs):
            raise TypeError("BatchLoss takes a loss function and a batch_kwargs function")
        self.loss_fn = loss_fn
        self._batch_kwargs = batch_kwargs
        self.dp_group = dp_group

    def batch_kwargs(self, targets: Sequence) -> dict:
        return self._batch_kwargs(targets)

    def __call__(self, *args, **kwargs):
        return self.loss_fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"BatchLoss({self.loss_fn!r})"


def batch_kwargs_of(
    loss_fn: Callable | None, targets: Sequence | None, timeout: float = 300.0
) -> tuple[dict, int] | None:
    """What ``loss_fn`` asks every microbatch's call to get this step, summed over its
    ``dp_group``'s replicas when it has one, and the number of those replicas; None for a
    loss averaged over the microbatches (no ``batch_kwargs``, it returned None, or no
    targets here: a rank without the last stage)."""
    ask = getattr(loss_fn, "batch_kwargs", None)
    if ask is None or targets is None:
        return None
    got = ask(list(targets))
    if got is None:
        return None
    if not isinstance(got, dict):
        raise TypeError(
            f"{type(loss_fn).__name__}.batch_kwargs must return a dict of keyword arguments "
            f"for the loss (or None), got {type(got).__name__}"
        )
    group = getattr(loss_fn, "dp_group", None)
    if group is None:
        return got, 1
    return _summed_over(got, group, timeout)


def _summed_over(kwargs: dict, group, timeout: float) -> tuple[dict, int]:
    """Every number in ``kwargs`` summed over ``group`` (one all-reduce, in fp64)."""
    import torch
    import torch.distributed as dist

    from ..runtime.collectives import all_reduce

    keys = [k for k, v in kwargs.items() if isinstance(v, (int, float, torch.Tensor))]
    if any(isinstance(kwargs[k], torch.Tensor) and kwargs[k].numel() != 1 for k in keys):
        raise ValueError("batch_kwargs summed over a dp_group must be numbers or 1-element tensors")
    size = dist.get_world_size(group)
    if not keys or size == 1:
        return kwargs, size
    values = torch.tensor([float(kwargs[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        values = values.cuda()
    all_reduce(
        values,
        group,
        timeout,
        "batch_kwargs",
        "summing the batch's counts over the data-parallel replicas",
    )
    out = dict(kwargs)
    for k, v in zip(keys, values.tolist(), strict=True):
        out[k] = int(v) if isinstance(kwargs[k], int) else v
    return out, size
