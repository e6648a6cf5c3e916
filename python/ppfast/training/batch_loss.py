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

Data-parallel replicas each count their own batch: their gradients are averaged as they are,
so across replicas the weighting is per replica, not per token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class BatchLoss:
    """``loss_fn`` whose microbatches are weighed by ``batch_kwargs(targets) -> dict``: what
    it returns goes to every ``loss_fn(output, target, **kwargs)`` call of the step, and the
    schedule sums the microbatch losses instead of averaging them (see the module's text)."""

    def __init__(self, loss_fn: Callable, batch_kwargs: Callable[[Sequence], dict]):
        if not callable(loss_fn) or not callable(batch_kwargs):
            raise TypeError("BatchLoss takes a loss function and a batch_kwargs function")
        self.loss_fn = loss_fn
        self._batch_kwargs = batch_kwargs

    def batch_kwargs(self, targets: Sequence) -> dict:
        return self._batch_kwargs(targets)

    def __call__(self, *args, **kwargs):
        return self.loss_fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"BatchLoss({self.loss_fn!r})"


def batch_kwargs_of(loss_fn: Callable | None, targets: Sequence | None) -> dict | None:
    """What ``loss_fn`` asks every microbatch's call to get this step, or None for a loss
    averaged over the microbatches (no ``batch_kwargs``, it returned None, or no targets
    here: a rank without the last stage)."""
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
    return got
