"""Split layers: ppfast.nn.Linear and any linear-like layer whose weight gradients can wait for
the schedule's W."""

from __future__ import annotations

import torch
from torch import nn

from ..training.extensions import Extension, register
from ..training.grad_hooks import HookRouter
from ..training.weight_store import WeightGradStore


def _grad_buffer(param: torch.Tensor, router: HookRouter | None = None) -> torch.Tensor:
    """Where a deferred gradient goes: the step's sum for autograd when the parameter has hooks,
    else the fp32 ``main_grad`` a mixed-precision optimizer keeps, else ``.grad`` (created as
    zeros on first use, since the kernel adds into it)."""
    if router is not None and router.routes(param):
        return router.buffer(param)
    main = getattr(param, "main_grad", None)
    if main is not None:
        return main
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


@torch.no_grad()
def weight_grad_work(
    x: torch.Tensor,
    dy: torch.Tensor,
    weight,
    bias,
    router: HookRouter | None = None,
    transposed: bool = False,
) -> None:
    """dW += dYᵀX and db += Σ dY over all leading dimensions, in one pass over dY, summed in
    fp32 (ppfast.kernels.weight_grad: Triton on a GPU, accumulate-in-place torch ops on CPU).
    ``transposed``: the weight is stored (in, out), as transformers' Conv1D stores it; the
    kernel then writes through a transposed view of its gradient (it takes any strides).

    Without autograd: it runs at the W, in grad mode, and the saved input requires grad; an
    in-place add recorded there would turn ``.grad`` into a graph holding every microbatch's
    input and output gradient until the gradients are cleared."""
    # imported on first use: Triton is heavy to import and settles its mode when it is
    from ppfast.kernels.weight_grad import weight_grad

    dy = dy.to(x.dtype)
    # the kernel on a GPU; on CPU the accumulate-in-place torch ops (never Triton's interpreter,
    # which a test process may have switched on)
    backend = "auto" if x.is_cuda else "torch"
    has_db = bias is not None and bias.requires_grad
    if weight.requires_grad:
        db = _grad_buffer(bias, router) if has_db else None
        dw = _grad_buffer(weight, router)
        dw = dw.t() if transposed else dw
        weight_grad(x, dy, dw, db, accumulate=True, backend=backend)
    elif has_db:
        _grad_buffer(bias, router).add_(dy.reshape(-1, dy.shape[-1]).sum(0, dtype=torch.float32))


class _SplitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, in_step, compute_dtype):
        # the parameter itself is saved, not a cast copy (autocast): I casts it again, so no
        # microbatch holds a second copy of the weight from its F to its backward
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        ctx.in_step = in_step
        if compute_dtype is not None:
            weight = weight.to(compute_dtype)
            bias = bias.to(compute_dtype) if bias is not None else None
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        dx = dy.matmul(weight.to(dy.dtype)) if ctx.needs_input_grad[0] else None
        store: WeightGradStore = layer.weight_store
        bias = layer.bias if ctx.has_bias else None
        if ctx.in_step:
            # The weight gradients are ours alone: at the W, or now for a full B, into
            # main_grad/.grad, or, for parameters with hooks, into the step's sum that goes
            # through autograd after the stage's last W.
            router = store.routing
            t = layer.transposed_weight
            store.put(layer.label, lambda: weight_grad_work(x, dy, layer.weight, bias, router, t))
            return dx, None, None, None, None, None
        if not store.deferring:
            # the store used outside a schedule's step, without W: autograd accumulates now
            dy2 = dy.reshape(-1, dy.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            dw = dy2.t().mm(x2.to(dy2.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
            db = dy2.sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
            return dx, dw, db, None, None, None
        t = layer.transposed_weight
        store.put(layer.label, lambda: weight_grad_work(x, dy, layer.weight, bias, None, t))
        return dx, None, None, None, None, None


class SplitLayer:
    """What makes a layer's backward split: mixed into a linear-like layer class (before it),
    whose ``weight`` (and optional ``bias``) the forward uses as ``x @ Wᵀ + b``, or as
    ``x @ W + b`` where ``transposed_weight`` says the weight is stored (in, out).

    Its backward computes the input gradient at once. Inside a pipeline stage whose schedule
    splits the backward, the weight-gradient work (dW += dYᵀX, db += ΣdY) waits in the stage's
    :class:`WeightGradStore` for the W action; elsewhere (plain training, a schedule without W)
    it runs in the same backward, as the original layer's does. A parameter with a
    ``main_grad`` attribute (an fp32 buffer) receives deferred gradients there instead of in
    ``.grad``.

    Hooks on a parameter (``register_hook``, ``register_post_accumulate_grad_hook``, hooks on
    its AccumulateGrad node such as DDP's) fire once per step in a split schedule, after the
    stage's last W, with the step's whole gradient of that stage, which then goes to ``.grad``
    as autograd would put it (see :class:`~ppfast.training.grad_hooks.HookRouter`).

    Under ``torch.compile`` the layer runs eagerly, a graph break on each side: its backward
    hands the weight-gradient work to the stage's store for a later W, a side effect that
    AOTAutograd cannot put in a compiled backward. The code between split layers (norms,
    attention, activations) compiles; the layer's own matmuls are the same kernels either way.
    """

    weight_store: WeightGradStore | None = None
    label: str = "Linear"
    transposed_weight: bool = False

    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        store = self.weight_store
        if store is None or not store.enabled or not torch.is_grad_enabled():
            return super().forward(x)
        weight, bias = self.weight, self.bias
        in_step = store.in_step
        if in_step:
            # Within a step the graph reaches detached aliases, never the parameters, so
            # autograd never runs their AccumulateGrad nodes (whose hooks would fire at every
            # I with no gradient); the aliases keep the output requiring grad like theirs.
            weight = weight.detach().requires_grad_(weight.requires_grad)
            if bias is not None:
                bias = bias.detach().requires_grad_(bias.requires_grad)
        if self.transposed_weight:
            weight = weight.t()  # a view: the math is x @ W + b, the gradient W's
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            with torch.autocast(x.device.type, enabled=False):
                return _SplitLinear.apply(x.to(dtype), weight, bias, self, in_step, dtype)
        return _SplitLinear.apply(x, weight, bias, self, in_step, None)


class Linear(SplitLayer, nn.Linear):
    """Drop-in for ``torch.nn.Linear`` (same constructor, parameters and state_dict) whose
    backward splits into I and W (see :class:`SplitLayer`)."""


def attach_store(module: nn.Module, store: WeightGradStore) -> int:
    """Give every split layer in ``module`` this stage's store; returns how many there are."""
    return len(_attach(module, store))


def _attach(module: nn.Module, store: WeightGradStore) -> list[nn.Parameter]:
    """The stage's part of the split layers: each gets the store; their parameters come back."""
    params: list[nn.Parameter] = []
    for m in module.modules():
        if isinstance(m, SplitLayer):
            m.weight_store = store
            params += [p for p in (m.weight, m.bias) if p is not None]
    return params


register(Extension("ppfast.nn", split_layers=_attach))
