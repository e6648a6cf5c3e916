"""Gradient hooks on split layers' parameters: fired once per step, after the last W."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

_PROBE = "ppfast.probe"


class _Probe(torch.autograd.Function):
    """Reaches every given leaf's AccumulateGrad node with one autograd call."""

    @staticmethod
    def forward(ctx, *params):
        return params[0].new_empty(0)

    @staticmethod
    def backward(ctx, grad):  # never run: the probe's graph is dropped unused
        return (None,) * len(ctx.needs_input_grad)


def _grad_accumulators(params: Sequence[torch.Tensor]) -> list:
    with torch.enable_grad():
        out = _Probe.apply(*params)
    return [node for node, _ in out.grad_fn.next_functions]


def hooked(params: Sequence[nn.Parameter]) -> list[bool]:
    """For each parameter: does anything wait on its gradient through autograd?

    Tensor hooks (``register_hook``) and post-accumulate hooks live on the tensor and can be
    read. Hooks on the AccumulateGrad node (DDP's reducer, Megatron's grad_accs) cannot: the
    node hides them. But a node only keeps its hooks while someone holds it (autograd holds it
    weakly and makes a fresh one when it is gone), so a node that outlives our own reference to
    it, with no graph alive, is held, and taken as hooked. Call with no graph of these
    parameters alive (between steps); a held node without hooks only costs the slower path.
    Asked once per step for the split parameters of a rank: a few microseconds each.
    """
    out = [bool(p._backward_hooks) or bool(p._post_accumulate_grad_hooks) for p in params]
    rest = [p for p, h in zip(params, out, strict=True) if not h]
    if not rest:
        return out
    _mark(rest)  # a node nobody else holds dies on return; asking again makes a fresh one
    held = iter([node.metadata.pop(_PROBE, False) for node in _grad_accumulators(rest)])
    return [h or next(held) for h in out]


def _mark(params: Sequence[torch.Tensor]) -> None:
    # no reference to a node may outlive this call, or its parameter would look held
    for node in _grad_accumulators(params):
        node.metadata[_PROBE] = True


class HookRouter:
    """One rank's split-layer parameters that have hooks, and their gradients for the step.

    A split layer hands the weight gradient of such a parameter to :meth:`buffer` (summed in
    fp32 over the step's microbatches) instead of ``main_grad``/``.grad``. Each stage reports
    when its last weight gradient of the step is done (:meth:`stage_done`); once every stage of
    this rank that uses a parameter has, the sum goes through the parameter's AccumulateGrad
    node in one autograd call: tensor hooks see it (and may change it), it is added to
    ``.grad``, then post-accumulate hooks and node hooks run, as autograd would have done,
    once for the step. A parameter with hooks therefore takes autograd's path even when it has
    a ``main_grad`` (hooks that move ``.grad`` into ``main_grad``, as Megatron's do, keep
    working). Parameters without hooks never come here.
    """

    def __init__(self):
        self._joined: set[int] = set()
        self._done: set[int] = set()
        self._owners: dict[int, set[int]] = {}  # id(param) -> stages of this rank using it
        self._params: dict[int, nn.Parameter] = {}
        self._known: dict[int, bool] = {}  # this step's answer of hooked(), by id(param)
        self._sums: dict[int, torch.Tensor] = {}

    def join(self, stage: int, params: Iterable[nn.Parameter]) -> None:
        """A stage starts a step whose backward splits, with these split-layer parameters.

        Called for every stage of the rank before any compute of the step; a stage joining
        again starts a new step (whatever a failed step left is dropped).
        """
        if stage in self._joined:
            self.__init__()
        self._joined.add(stage)
        params = [p for p in params if p.requires_grad]
        ask = [p for p in params if id(p) not in self._known]
        for p, h in zip(ask, hooked(ask) if ask else [], strict=True):
            self._known[id(p)] = h
        for p in params:
            if self._known[id(p)]:
                self._owners.setdefault(id(p), set()).add(stage)
                self._params[id(p)] = p

    def routes(self, param: torch.Tensor | None) -> bool:
        return param is not None and id(param) in self._owners

    @property
    def active(self) -> bool:
        return bool(self._owners)

    def buffer(self, param: nn.Parameter) -> torch.Tensor:
        """Where this step's gradient of a hooked parameter is summed (fp32, zeros at first)."""
        buf = self._sums.get(id(param))
        if buf is None:
            buf = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
            self._sums[id(param)] = buf
        return buf

    def stage_done(self, stage: int) -> None:
        """Every weight gradient of ``stage`` for this step is computed: fire what is due."""
        self._done.add(stage)
        due = [k for k in self._sums if self._owners[k] <= self._done]
        if not due:
            return
        params = [self._params[k] for k in due]
        grads = [self._sums.pop(k).to(p.dtype) for k, p in zip(due, params, strict=True)]
        # one autograd call from the parameters themselves: their AccumulateGrad nodes are the
        # roots, so hooks run exactly as in an ordinary backward
        torch.autograd.backward(params, grads)

    def check_empty(self) -> None:
        if self._sums:
            left = sorted({s for k in self._sums for s in self._owners[k] - self._done})
            self._sums.clear()
            raise RuntimeError(
                f"gradients of hooked parameters were never handed to autograd: stages {left} "
                "did not finish their weight gradients this step"
            )
