"""The causal LM loss on a pipeline's last stage, from Hugging Face labels.

``labels`` are what a transformers causal LM takes: the input ids, with -100 where a token
must not count (padding, a prompt). The loss shifts them inside (logits at position t
predict the label at t + 1), as ``model(input_ids, labels=labels).loss`` does.

Two ways to weigh microbatches:

- ``causal_lm_loss`` (``weighting="microbatch"``): each microbatch's mean over its counted
  tokens, and the schedule averages those means over the m microbatches. That is the
  batch's loss when every microbatch counts the same number of tokens (no padding, or the
  same amount in each); otherwise a token of a sparse microbatch weighs more.
- ``CausalLMLoss(weighting="tokens")``: every counted token of the batch weighs the same.
  Each microbatch gives its sum divided by the batch's count of tokens, the schedule sums
  them (see :mod:`ppfast.training.batch_loss`), and the step's losses add up to exactly the
  whole batch's token mean, padding or not. Use it for padded batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_WEIGHTINGS = ("microbatch", "tokens")


def count_tokens(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """How many labels the loss counts: those after the first position that are not
    ``ignore_index`` (a 0-dim tensor, on the labels' device)."""
    return (labels[..., 1:] != ignore_index).sum()


class CausalLMLoss:
    """``loss(logits, labels)``: cross entropy of the logits against the labels shifted by
    one, -100 (``ignore_index``) not counted, in fp32 as transformers computes it.

    ``weighting="microbatch"`` (the default) returns the microbatch's mean over its counted
    tokens; ``weighting="tokens"`` makes the schedule pass ``num_items_in_batch`` (the batch's
    count) and returns the microbatch's sum divided by it, so that padded batches give the
    whole batch's token mean. With ``dp_group`` the count is the global batch's, summed over
    the data-parallel replicas (see :mod:`ppfast.training.batch_loss`).
    ``num_items_in_batch`` may also be given by hand (as transformers' Trainer passes it),
    in either weighting.
    """

    def __init__(self, weighting: str = "microbatch", ignore_index: int = -100, dp_group=None):
        if weighting not in _WEIGHTINGS:
            raise ValueError(f"weighting must be one of {_WEIGHTINGS}, got {weighting!r}")
        if dp_group is not None and weighting != "tokens":
            raise ValueError('dp_group counts tokens over the replicas: use weighting="tokens"')
        self.weighting = weighting
        self.ignore_index = ignore_index
        self.dp_group = dp_group  # the count spans these replicas' batches

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        if labels is None:
            raise ValueError(
                "the causal LM loss needs the labels: step(..., target=labels) on the rank "
                "holding the last stage"
            )
        if logits.shape[:-1] != labels.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}: "
                "labels are one token id per input position (the input ids, -100 to skip)"
            )
        logits = logits.float()
        labels = F.pad(labels.to(logits.device), (0, 1), value=self.ignore_index)[..., 1:]
        sum_ = num_items_in_batch is not None
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=self.ignore_index,
            reduction="sum" if sum_ else "mean",
        )
        if sum_:
            if isinstance(num_items_in_batch, torch.Tensor):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss

    def batch_kwargs(self, targets: Sequence[torch.Tensor]) -> dict | None:
        """Under ``weighting="tokens"``: the batch's count of tokens, for every microbatch's
        call (the schedule asks once per step); None otherwise."""
        if self.weighting != "tokens":
            return None
        total = sum(count_tokens(t, self.ignore_index) for t in targets)
        return {"num_items_in_batch": total}

    def __repr__(self) -> str:
        return f"CausalLMLoss(weighting={self.weighting!r})"


causal_lm_loss = CausalLMLoss()
"""Each microbatch's token mean, averaged over the microbatches by the schedule."""
