"""ActivationMeter: the bytes autograd keeps for backward from some modules' forwards."""

from __future__ import annotations

import threading

import torch
from torch import nn


class ActivationMeter:
    """Bytes autograd keeps for backward from the forwards of ``modules``: ``live`` now, and
    ``peak`` since construction or :meth:`reset_peak`.

    Every tensor a forward of these modules saves for backward (through the saved-tensor
    hooks: ``save_for_backward`` and every built-in op) is counted until autograd lets it go,
    by storage: a storage several saved tensors share counts once, at its whole size, for as
    long as any of them is held. The storages of the modules' own parameters and buffers are
    not counted. A checkpointed block counts its inputs only: what it saves inside runs under
    checkpoint's own hooks and is dropped, and what its recomputation saves in backward lives
    only during that block's backward. Work that a split backward defers to W (the inputs and
    output gradients a ``ppfast.nn.Linear`` queues) is held by the weight-grad store, not by
    autograd, and is not counted either. The count is exact and deterministic, on any device.
    It is what the modules save, before the hooks around them act on it: watch modules outside
    checkpointed blocks, not inside them, and count offloaded bytes (``save_on_cpu``) apart.

    The meter sits innermost while a module's forward runs and hands every saved tensor on to
    the saved-tensor hooks around it, so a ``PipelineStage`` still sees what its stage saves
    (it frees a sent activation only when nothing saved it).

    Example, on one rank of a pipeline::

        meter = ActivationMeter(*[s.submod for s in my_stages])
        schedule.step(...)
        print(f"peak {meter.peak / 2**20:.1f} MiB held for backward")
        meter.remove()

    or around plain training, ``with ActivationMeter(model) as meter: ...``.
    """

    def __init__(self, *modules: nn.Module):
        if not modules or not all(isinstance(m, nn.Module) for m in modules):
            raise TypeError("ActivationMeter takes one or more nn.Modules to watch")
        if not hasattr(torch._C._autograd, "_top_saved_tensors_default_hooks"):
            raise RuntimeError(
                "this torch build does not expose its saved-tensor hook stack "
                "(torch._C._autograd._top_saved_tensors_default_hooks), which ActivationMeter "
                "needs to pass saved tensors on to the hooks around it"
            )
        self.modules = modules
        self.live = 0
        self.peak = 0
        self._held: dict[int, list[int]] = {}  # storage pointer -> [holders, bytes]
        self._lock = threading.RLock()  # holders die on whichever thread frees a graph
        self._local = threading.local()
        self._handles = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._enter))
            self._handles.append(m.register_forward_hook(self._exit, always_call=True))

    def reset_peak(self) -> None:
        """Start a new peak from what is live now."""
        with self._lock:
            self.peak = self.live

    def remove(self) -> None:
        """Stop watching (what is already counted keeps being released as autograd drops it)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> ActivationMeter:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -------------------------------------------------------------- hooks

    def _enter(self, module, args) -> None:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        exclude = {
            t.untyped_storage().data_ptr()
            for m in self.modules
            for t in (*m.parameters(), *m.buffers())
            if t.device.type != "meta"
        }
        hooks = torch.autograd.graph.saved_tensors_hooks(
            lambda t: self._pack(t, outer, exclude), lambda h: h.unpack()
        )
        hooks.__enter__()
        stack.append((module, hooks))

    def _exit(self, module, args, output) -> None:
        # runs even when the forward raised; a pre-hook before ours may have raised first
        stack = getattr(self._local, "stack", None)
        if stack and stack[-1][0] is module:
            stack.pop()[1].__exit__(None, None, None)

    def _pack(self, t: torch.Tensor, outer, exclude: set[int]) -> _Held:
        packed = outer[0](t) if outer is not None else t
        unpack = outer[1] if outer is not None else None
        if t.device.type == "meta" or t.layout != torch.strided:
            return _Held(None, packed, unpack, 0)
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in exclude:
            return _Held(None, packed, unpack, 0)
        with self._lock:
            entry = self._held.get(key)
            if entry is None:
                entry = self._held[key] = [0, storage.nbytes()]
                self.live += entry[1]
                self.peak = max(self.peak, self.live)
            entry[0] += 1
        return _Held(self, packed, unpack, key)

    def _drop(self, key: int) -> None:
        with self._lock:
            entry = self._held[key]
            entry[0] -= 1
            if entry[0] == 0:
                del self._held[key]
                self.live -= entry[1]


class _Held:
    """What autograd keeps for one saved tensor while a meter watches: the tensor (or what the
    hooks around the meter made of it), counted until autograd drops it."""

    __slots__ = ("meter", "packed", "outer_unpack", "key")

    def __init__(self, meter, packed, outer_unpack, key: int):
        self.meter, self.packed, self.outer_unpack, self.key = meter, packed, outer_unpack, key

    def unpack(self) -> torch.Tensor:
        return self.outer_unpack(self.packed) if self.outer_unpack is not None else self.packed

    def __del__(self) -> None:
        if self.meter is not None:
            self.meter._drop(self.key)
