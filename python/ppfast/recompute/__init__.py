"""Activation checkpointing per stage: chosen blocks drop their activations in forward and
recompute them in backward, under any schedule.

``checkpoint_blocks`` wraps each chosen block's ``forward`` (an instance attribute, no
wrapper module), so parameter names, ``state_dict`` keys, optimizers, hooks registered on the
block and ``ppfast.nn.convert`` all keep working. Recomputation is torch's non-reentrant
``torch.utils.checkpoint`` with the RNG state restored, so dropout draws the same masks again.

How it meets the split backward of ``ppfast.nn.Linear`` (zero-bubble schedules)::

    F  block forward: only the block's inputs are saved (checkpoint's own saved tensors)
    I  autograd reaches the block: the block runs again (once) and its nodes' backward runs;
       each split Linear computes dX and queues dW = dYᵀX with the recomputed X and its dY
       on the stage's weight-grad store
    W  the store runs the queued work: no autograd, so nothing is recomputed again

So a block is recomputed once per microbatch, in its I (or its B), never in W. Between I and W
the store holds each split Linear's recomputed input and output gradient, as it would hold the
original ones without checkpointing: checkpointing shrinks what is held from F to I.

``ActivationMeter`` measures what that buys: the bytes autograd keeps for backward from
some modules' forwards, live and at their peak, also inside a ``PipelineStage``.
"""

from .blocks import BlockSpec, checkpoint_blocks, checkpointed, uncheckpoint_blocks
from .meter import ActivationMeter

__all__ = [
    "ActivationMeter",
    "BlockSpec",
    "checkpoint_blocks",
    "checkpointed",
    "uncheckpoint_blocks",
]
