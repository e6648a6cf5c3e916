"""PipelineStage: one stage's module and its forward, backward and weight-gradient compute."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map_only

from . import extensions
from .grad_hooks import HookRouter
from .stage_args import check_tied, describe, meta_of, module_device
from .weight_store import WeightGradStore


def _as_tensor_tuple(out: object, stage: int) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
        return tuple(out)
    raise TypeError(
        f"stage {stage} returned {type(out).__name__}; a stage that feeds another must return a "
        "tensor or a tuple of tensors (pass other values as constructor or step arguments)"
    )


class PipelineStage:
    """One pipeline stage: a module, its index, and how many stages there are.

    Mirrors ``torch.distributed.pipelining.PipelineStage(submodule, stage_index, num_stages,
    device, group=None)``. Shapes and dtypes of what stages pass each other are agreed between
    neighbours at the first step and cached; with ``dynamic_shapes=True`` they are agreed every
    step (variable sequence lengths). A stage may pass several tensors (a tuple); non-tensor
    arguments are given to ``step`` (first stage) and replicated to every microbatch.

    ``tied`` declares parameters this stage shares with other stages, by a key every sharing
    stage uses: ``{"wte": embed.weight}`` on the first stage and ``{"wte": head.weight}`` on
    the last. The schedule starts every owner from the value of the lowest-index owning stage
    at its first step, and after every step gives each owner the sum of all owners' gradients
    (in ``main_grad`` where the parameter has one, else ``.grad``), before the optimizer runs.
    Owners may sit on any ranks, or on one (V placement), and may be one Parameter object.

    ``module`` may be wrapped in ``DistributedDataParallel`` or FSDP's ``fully_shard`` over a
    data-parallel group, as torch's PipelineStage allows: the stage makes it reduce the whole
    step's gradients once (see :mod:`ppfast.parallel.dp_wrappers`).
    ``ppfast.parallel.DataParallelGrads`` does the same for plain modules and overlaps the
    pipeline's tail.

    torch's other arguments are taken too. ``input_args`` and ``output_args`` (one
    microbatch's example input and output) are not needed to agree shapes, which ppfast does at
    the first step; when given, that step checks the stage's real inputs and outputs against
    them and names the difference. ``dw_builder`` is torch's hook for layers that defer their
    own weight gradients: I runs the whole autograd backward and keeps ``dw_builder()``, W
    calls what it returned, and B calls it at once.
    """

    def __init__(
        self,
        module: nn.Module,
        stage_index: int,
        num_stages: int,
        device: torch.device | str | None = None,
        group: object | None = None,
        input_args: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
        output_args: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
        output_grads: object = None,
        input_grads: object = None,
        dw_builder: Callable[[], Callable[[], None]] | None = None,
        get_mesh: object = None,
        *,
        dynamic_shapes: bool = False,
        tied: dict[str, nn.Parameter] | None = None,
    ):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if get_mesh is not None:
            raise TypeError(
                "get_mesh: ppfast stages pass plain tensors between ranks, not DTensors; give "
                "the stage module plain-tensor inputs and outputs (shard inside the module)"
            )
        if dw_builder is not None and not callable(dw_builder):
            raise TypeError("dw_builder must be a callable that returns the W function")
        if not 0 <= stage_index < num_stages:
            raise ValueError(
                f"stage_index {stage_index} is outside [0, {num_stages}); stages are numbered "
                "from 0 to num_stages - 1"
            )
        self.submod = module
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.device = torch.device(device) if device is not None else module_device(module)
        self.group = group
        self.dynamic_shapes = dynamic_shapes
        self.tied = check_tied(tied, module, stage_index)
        # split layers (ppfast.nn.Linear) queue their weight gradients here for the W actions
        self.weight_store = WeightGradStore(f"stage {stage_index}")
        self.weight_store.stage = stage_index
        # a schedule gives all stages of a rank one router, so a parameter two of them use
        # fires its hooks once
        self.weight_store.router = HookRouter()
        # layers that defer their weight gradients (ppfast.nn), found by the extensions
        self.split_params = extensions.split_layers(module, self.weight_store)
        # a DDP or FSDP module is driven so that it reduces once per step (ppfast.parallel)
        self._dp = extensions.driver(module, stage_index, bool(self.split_params))
        self.dw_builder = dw_builder
        # torch's shape hints, checked against the first step's real tensors
        self._expected = {"input": meta_of(input_args), "output": meta_of(output_args)}
        self._reset(0)
        self.loss_fn: Callable | None = None
        self.loss_kwargs: dict = {}
        self.scale = 1.0
        self.training = True
        self._saves_unseen = False  # compiled code may save tensors its hooks do not see
        self.keep_outputs = True
        self.want_loss = True

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    # ------------------------------------------------------------------ per step

    def _reset(self, m: int) -> None:
        self._args: list[tuple] = [()] * m
        self._kwargs: list[dict] = [{}] * m
        self._targets: list[object] = [None] * m
        self._inputs: dict[int, tuple[torch.Tensor, ...]] = {}
        self._outputs: dict[int, tuple[torch.Tensor, ...]] = {}
        self._losses: dict[int, torch.Tensor] = {}
        self._dw: dict[int, Callable[[], None]] = {}
        # the last stage's outputs by microbatch, as the module returned them (detached)
        self.output_chunks: dict[int, object] = {}

    def prepare(
        self,
        m: int,
        args,
        kwargs,
        targets,
        loss_fn,
        scale: float,
        *,
        training: bool = True,
        keep_outputs: bool = True,
        loss_kwargs: dict | None = None,
        want_loss: bool = True,
    ) -> None:
        """Microbatch inputs (first stage) and targets (last stage) for the next step.

        ``training`` False prepares a forward-only pass (``eval``): no autograd graph, nothing
        kept for a backward, and the loss computed only when ``want_loss``. ``keep_outputs``
        keeps the last stage's outputs for ``output_chunks``.
        """
        self._reset(m)
        self.training = training
        self.keep_outputs = keep_outputs
        self.want_loss = want_loss
        if self.is_first:
            self._args, self._kwargs = args, kwargs
        if self.is_last:
            self._targets = targets if targets is not None else [None] * m
        self.loss_fn = loss_fn
        self.loss_kwargs = loss_kwargs or {}
        self.scale = scale
        if not training:
            return
        # once a step, not per forward (it walks the module tree)
        self._saves_unseen = _HOOKS_MISS_COMPILED and _runs_compiled(self.submod)
        self._dp.begin_step(m)
        store = self.weight_store
        if store.enabled:
            store.begin_step(m)
            if store.router is not None:
                store.router.join(self.stage_index, self.split_params)

    def losses(self) -> list[torch.Tensor]:
        return [self._losses[i] for i in sorted(self._losses)]

    def finish_step(self) -> None:
        """After the step's last action on this rank: a DDP or FSDP module's reduction."""
        if self.training:
            self._dp.end_step()

    def check_clean(self) -> None:
        """Every microbatch's tensors were dropped by its last backward, and every deferred
        weight gradient was computed."""
        left = sorted(set(self._inputs) | set(self._outputs) | set(self._dw))
        assert not left, f"stage {self.stage_index} still holds microbatches {left} after the step"
        self.weight_store.check_empty()

    # ------------------------------------------------------------------ compute

    def forward(self, mb: int, inputs: Sequence[torch.Tensor] | None):
        if self._expected["input"] is not None and inputs is not None:
            self._check_meta("input", inputs)
        if not self.training:
            return self._forward_only(mb, inputs)
        if self.is_first:
            args, kwargs = self._args[mb], self._kwargs[mb]
            leaves: tuple[torch.Tensor, ...] = ()
        else:
            leaves = tuple(
                t.detach().requires_grad_(t.is_floating_point() or t.is_complex()) for t in inputs
            )
            args, kwargs = leaves, {}
        saved: set[int] = set()
        pack = _recorder(saved)
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack), self._dp.forward():
            out = self.submod(*args, **kwargs)
        if self.is_last:
            self._finish_last(mb, out, leaves)
            return [], False
        outs = _as_tensor_tuple(out, self.stage_index)
        if self._expected["output"] is not None:
            self._check_meta("output", outs)
        self._inputs[mb] = leaves
        self._outputs[mb] = outs
        if self._saves_unseen:
            return [o.detach() for o in outs], False  # what compiled code saved is unknown
        return [o.detach() for o in outs], _releasable(outs, saved | _storages((args, kwargs)))

    def _forward_only(self, mb: int, inputs: Sequence[torch.Tensor] | None):
        """F of an evaluation pass: no graph, and nothing kept but the last stage's results."""
        args, kwargs = (self._args[mb], self._kwargs[mb]) if self.is_first else (tuple(inputs), {})
        with torch.no_grad():
            out = self.submod(*args, **kwargs)
            if self.is_last:
                if self.want_loss and self.loss_fn is not None:
                    self._losses[mb] = self._loss(mb, out).detach()
                if self.keep_outputs:
                    # the executor reuses the received buffers once this F is done
                    self.output_chunks[mb] = tree_map_only(
                        torch.Tensor, lambda t: _unshared(t, inputs), out
                    )
                return [], False
        outs = tuple(_unshared(o, inputs) for o in _as_tensor_tuple(out, self.stage_index))
        if self._expected["output"] is not None:
            self._check_meta("output", outs)
        return list(outs), _releasable(outs, _storages((args, kwargs)))

    def _loss(self, mb: int, out: object) -> torch.Tensor:
        target = self._targets[mb]
        kw = self.loss_kwargs
        loss = self.loss_fn(out, target, **kw) if target is not None else self.loss_fn(out, **kw)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a scalar tensor, got {shape}; reduce it (e.g. .mean())"
            )
        return loss

    def _finish_last(self, mb: int, out: object, leaves: tuple[torch.Tensor, ...]) -> None:
        self._inputs[mb] = leaves
        if self.loss_fn is None:
            raise ValueError(
                "the last stage needs a loss_fn to start the backward; pass loss_fn to the schedule"
            )
        loss = self._loss(mb, out)
        self._losses[mb] = loss.detach()
        if self.keep_outputs:
            # an output may be a received input, whose buffer is reused after its backward
            self.output_chunks[mb] = tree_map_only(
                torch.Tensor, lambda t: _unshared(t.detach(), leaves), out
            )
        self._outputs[mb] = (loss * self.scale,)

    def _check_meta(self, what: str, tensors: Sequence[torch.Tensor]) -> None:
        """The first step's real inputs or outputs against torch's ``input_args`` /
        ``output_args`` hints (checked once: later steps are held to the agreed shapes)."""
        want = self._expected[what]
        self._expected[what] = None
        got = meta_of(tuple(tensors))
        if got != want:
            raise ValueError(
                f"stage {self.stage_index}: its {what}s are {describe(got)} but {what}_args "
                f"says {describe(want)}; give {what}_args one microbatch's {what}s (or leave "
                "it out: ppfast agrees shapes between stages at the first step)"
            )

    def backward(self, mb: int, grads: Sequence[torch.Tensor] | None, full: bool):
        """Input gradients now. For an I (``full`` False) split layers leave their weight
        gradients to this microbatch's W; every other layer computes them here."""
        outs = self._outputs.pop(mb)
        with self.weight_store.backward(mb, defer=not full), self._dp.backward(outs):
            out = self._backward(mb, outs, grads)
        if self.dw_builder is not None:  # as torch: B runs the W function at once
            dw = self.dw_builder()
            if full:
                dw()
            else:
                self._dw[mb] = dw
        return out

    def _backward(self, mb: int, outs, grads: Sequence[torch.Tensor] | None):
        if self.is_last:
            torch.autograd.backward(outs[0])
        else:
            roots = [o for o in outs if o.requires_grad]
            floats = [o for o in outs if o.is_floating_point() or o.is_complex()]
            if len(grads) != len(floats):
                raise RuntimeError(
                    f"stage {self.stage_index} got {len(grads)} gradients for {len(floats)} "
                    "floating-point outputs"
                )
            pairs = [(o, g) for o, g in zip(floats, grads, strict=True) if o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            del roots
        leaves = self._inputs.pop(mb)
        if self.is_first:
            return []
        return [
            t.grad if t.grad is not None else torch.zeros_like(t)
            for t in leaves
            if t.is_floating_point() or t.is_complex()
        ]

    def weight(self, mb: int) -> None:
        """The W action: the weight gradients this microbatch's I deferred."""
        self.weight_store.flush(mb)
        dw = self._dw.pop(mb, None)
        if dw is not None:
            dw()


# Before torch 2.8, compiled code (torch.compile) saves tensors for its backward without
# calling the saved-tensors hooks, so the stage cannot see whether an output is among them.
_HOOKS_MISS_COMPILED = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 8)


def _runs_compiled(module: nn.Module) -> bool:
    """Does ``module`` hold a compiled module (``torch.compile(m)`` or ``m.compile()``)?"""
    return any(
        getattr(m, "_compiled_call_impl", None) is not None or hasattr(m, "_orig_mod")
        for m in module.modules()
    )


def _recorder(saved: set[int]):
    """A saved-tensors pack hook that notes where each saved tensor keeps its memory. Compiled
    code (torch.compile) calls it at run time for what its graph saves: it must not be traced
    itself, or it would be compiled again for every shape it sees."""

    @torch.compiler.disable
    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            saved.add(t.untyped_storage().data_ptr())
        return t

    return pack


@torch.compiler.disable
def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _storages(tree) -> set[int]:
    """Where the tensors in ``tree`` (arguments, nested or not) keep their memory."""
    return {
        t.untyped_storage().data_ptr()
        for t in tree_flatten(tree)[0]
        if isinstance(t, torch.Tensor) and t.device.type != "meta"
    }


def _releasable(outs: Sequence[torch.Tensor], kept: set[int]) -> bool:
    """May the outputs' memory go once sent? Only if each is a tensor of its own: no view,
    nothing autograd saved, and no argument of the stage (a stage may return one unchanged,
    and the first stage's arguments are the caller's)."""
    return all(
        o.is_contiguous() and o._base is None and o.untyped_storage().data_ptr() not in kept
        for o in outs
    )


def _unshared(t: torch.Tensor, inputs: Sequence[torch.Tensor] | None) -> torch.Tensor:
    """``t``, copied if it shares memory with a received input (whose buffer is reused)."""
    if inputs and any(
        t.untyped_storage().data_ptr() == i.untyped_storage().data_ptr() for i in inputs
    ):
        return t.clone()
    return t
