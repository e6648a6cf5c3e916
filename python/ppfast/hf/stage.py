"""One pipeline stage of a transformers causal LM, run by the model's own forward.

A stage holds a run of the model's layers (plus the embeddings on the first stage, the final
norm and head on the last) and runs them by calling the model's own ``forward`` on a shallow
twin of the model in which:

- the layers of other stages are stand-ins without parameters: those before this stage's
  first layer return the hidden states this stage received, those after it return their
  input unchanged. The forward still walks every layer index, so whatever it looks up per
  index (``config.layer_types[i]``: full or sliding-window attention) is what the whole
  model would use for that layer;
- the embeddings of a stage after the first return zeros (the forward is given the received
  hidden states as ``inputs_embeds``, so only position embeddings such as GPT-2's ``wpe`` are
  still called), and the final norm of a stage before the last returns its input.

So each stage computes, as the model does, the position ids, the rotary embeddings, the
causal mask with the padding mask folded in, and the mask of each attention type, and the
last stage applies the head the way the head model's forward does (logit soft-capping
included). Nothing is copied: the twins hold the model's own layer objects, and the stage's
parameters keep the model's names (``model.layers.3.mlp.up_proj.weight``, ``lm_head.weight``).

Between stages travel ``(hidden_states, attention_mask, position_ids)``; the last two as the
caller gave them to the first stage, or as an empty tensor for one not given, so that every
stage calls the forward with exactly the arguments the whole model would get.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .plan import Plan


class _Inbox:
    """The hidden states a stage received, read by its stand-ins during one forward."""

    def __init__(self):
        self.hidden: torch.Tensor | None = None


class _StandIn(nn.Module):
    """Takes the place of a module another stage holds; answers attribute look-ups (a layer's
    ``attention_type``) with the real module's, without holding it as a child."""

    def __init__(self, real: nn.Module):
        super().__init__()
        self.__dict__["_real"] = real  # not a child: its parameters are another stage's

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_real"], name)

    def extra_repr(self) -> str:
        return f"stands for {type(self.__dict__['_real']).__name__}"


class _Received(_StandIn):
    """A layer before the stage's first one: gives the hidden states the stage received."""

    def __init__(self, real: nn.Module, inbox: _Inbox):
        super().__init__(real)
        self.__dict__["_inbox"] = inbox

    def forward(self, *args, **kwargs):
        hidden = self.__dict__["_inbox"].hidden
        assert hidden is not None, "a stand-in ran outside its stage's forward"
        return hidden


class _PassOn(_StandIn):
    """A layer after the stage's last one, or a final norm before the last stage: returns the
    hidden states it is given."""

    def forward(self, *args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]


class _Zeros(_StandIn):
    """An embedding of the first stage, on a later one: zeros of the embedding's shape, which
    the forward adds to the received hidden states (GPT-2's position embedding) or discards."""

    def forward(self, ids, *args, **kwargs):
        real = self.__dict__["_real"]
        dim = getattr(real, "embedding_dim", None)
        weight = getattr(real, "weight", None)
        if dim is None or not isinstance(weight, torch.Tensor):
            raise RuntimeError(
                f"{type(real).__name__} belongs to the first stage but a later stage's forward "
                "called it; ppfast.hf stands in only for embeddings there"
            )
        return torch.zeros(*ids.shape, dim, dtype=weight.dtype, device=ids.device)


def _twin(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` with its own table of children (the children, config and
    everything else are shared)."""
    twin = copy.copy(module)
    twin.__dict__["_modules"] = type(module._modules)(module._modules)
    return twin


def _has_params(module: nn.Module | None) -> bool:
    return module is not None and next(module.parameters(), None) is not None


def _none_if_empty(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None or t.numel() == 0 else t


class HFStage(nn.Module):
    """Layers ``[first, last)`` of a causal LM, with its embeddings when ``with_pre`` and its
    final norm and head when ``with_post``.

    With ``with_pre`` it is called as ``stage(input_ids, attention_mask=None,
    position_ids=None)``, else as ``stage(hidden_states, attention_mask, position_ids)`` with
    what the previous stage returned. It returns the logits with ``with_post``, else
    ``(hidden_states, attention_mask, position_ids)`` for the next stage (an empty tensor for
    an argument the first stage was not given).

    Its children are the model's own, under the model's names; ``full_model_names`` tells
    ``ppfast.checkpoint`` that the state_dict keys are the full model's as they are.
    """

    full_model_names = True

    def __init__(
        self, model: nn.Module, plan: Plan, first: int, last: int, with_pre: bool, with_post: bool
    ):
        super().__init__()
        base = getattr(model, plan.base_attr)
        layers = getattr(base, plan.layers)
        if not 0 <= first <= last <= len(layers):
            raise ValueError(f"layers [{first}, {last}) are not within the model's {len(layers)}")
        self.first, self.last = first, last
        self._layers_name = plan.layers
        self.with_pre, self.with_post = with_pre, with_post
        inbox = _Inbox()
        run = nn.ModuleList()
        for i, layer in enumerate(layers):
            if first <= i < last:
                run._modules[str(i)] = layer
            elif i < first:
                run._modules[str(i)] = _Received(layer, inbox)
            else:
                run._modules[str(i)] = _PassOn(layer)
        base_twin = _twin(base)
        base_twin._modules[plan.layers] = run
        # what the forward does before the first layer a later stage discards, so there a
        # module without parameters (a dropout) may run as it is; after the last layer it
        # may not (OLMo's final norm has no parameters)
        if not with_pre:
            for name in plan.pre:
                if _has_params(base._modules[name]):
                    base_twin._modules[name] = _Zeros(base._modules[name])
        if not with_post:
            for name in plan.post:
                base_twin._modules[name] = _PassOn(base._modules[name])
        head_twin = _twin(model)
        head_twin._modules[plan.base_attr] = base_twin
        for name in plan.head:
            if not with_post:
                del head_twin._modules[name]
        # The stage's children are the head twin's, in the same table: a layer replaced in the
        # stage (by a wrapper) is replaced where the forward looks for it too.
        self.__dict__["_modules"] = head_twin._modules
        self.__dict__["_head"] = head_twin
        self.__dict__["_base"] = base_twin
        self.__dict__["_inbox"] = inbox
        self.train(model.training)

    def train(self, mode: bool = True):
        super().train(mode)
        self.__dict__["_head"].training = mode
        return self

    def forward(self, *args, **kwargs):
        if self.with_pre:
            ids, mask, pos = _first_args(*args, **kwargs)
            call = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
            hidden = None
        else:
            hidden, mask, pos = args
            mask, pos = _none_if_empty(mask), _none_if_empty(pos)
            # the forward's own preparation of its inputs_embeds (GPT-2 adds the position
            # embedding, Gemma scales) is discarded: the first layer stand-in gives `hidden`
            call = {"inputs_embeds": hidden.detach(), "attention_mask": mask, "position_ids": pos}
        inbox = self.__dict__["_inbox"]
        inbox.hidden = hidden
        check = self._check_layer_output() if not self.__dict__.get("_checked") else None
        try:
            if self.with_post:
                out = self.__dict__["_head"].forward(**call, use_cache=False)
                return out.logits if hasattr(out, "logits") else out[0]
            out = self.__dict__["_base"].forward(**call, use_cache=False)
        finally:
            inbox.hidden = None
            if check is not None:
                check.remove()
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        ref = call.get("input_ids") if hidden is None else hidden
        return h, _or_empty(mask, ref), _or_empty(pos, ref)

    def _check_layer_output(self):
        """A hook on this stage's first layer, for its first forward: the stand-ins of the
        other stages' layers hand on a tensor, so the layers must return one (a layer that
        returns a tuple hands the next more than hidden states, which no stage could send)."""
        if self.last == self.first:
            return None
        layer = self.__dict__["_base"]._modules[self._layers_name]._modules[str(self.first)]

        def hook(module, args, output):
            if not isinstance(output, torch.Tensor):
                raise ValueError(
                    f"{type(module).__name__} returns {type(output).__name__}, not the hidden "
                    "states alone: its layers hand each other more than a stage sends, so "
                    "ppfast.hf cannot cut this model between them"
                )
            self.__dict__["_checked"] = True

        return layer.register_forward_hook(hook)

    def extra_repr(self) -> str:
        parts = ["embeddings"] if self.with_pre else []
        if self.last > self.first:
            parts.append(f"layers {self.first}-{self.last - 1}")
        if self.with_post:
            parts.append("norm and head")
        return ", ".join(parts)


def _first_args(input_ids=None, attention_mask=None, position_ids=None):
    if input_ids is None:
        raise TypeError("the first stage takes input_ids: stage(input_ids, attention_mask=...)")
    return input_ids, attention_mask, position_ids


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else torch.empty(0, dtype=torch.long, device=like.device)
