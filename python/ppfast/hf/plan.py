"""Where a transformers causal LM may be cut: its pipeline plan, read and checked.

A causal LM is a head model (``LlamaForCausalLM``) around a base model (``LlamaModel``, the
head's ``base_model_prefix`` attribute). The base model's config says in what order its
children run (``config.base_model_pp_plan``: ``embed_tokens``, then the ``layers``
ModuleList, then ``norm``), and the head model's ``_pp_plan`` names what runs after the base
model (``lm_head``). So the base model's children before the layers belong to the first
stage, the layers are cut between stages, and what follows them, head included, belongs to
the last stage. Children without parameters (a rotary embedding, a dropout) are shared by
every stage.

Models whose config carries no plan but whose structure is well known are described here
(GPT-2: ``wte``, ``wpe``, ``drop``, ``h``, ``ln_f``). Anything else is refused with a message
that says what is missing.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

# Base-model plans for architectures whose config declares none, in base_model_pp_plan's
# form: child name -> (inputs, outputs), in the order the base model's forward runs them.
KNOWN_PLANS: Mapping[str, Mapping[str, tuple[list[str], list[str]]]] = {
    "gpt2": {
        "wte": (["input_ids"], ["inputs_embeds"]),
        "wpe": (["position_ids"], ["position_embeds"]),
        "drop": (["hidden_states"], ["hidden_states"]),
        "h": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "ln_f": (["hidden_states"], ["hidden_states"]),
    },
}


@dataclass(frozen=True)
class Plan:
    """A causal LM's cut plan: the children of its base and head models, by role.

    ``base_attr`` is the head model's attribute holding the base model; ``pre`` the base
    model's children run before the layers (stage 0 holds them), ``layers`` the name of its
    ModuleList of layers, ``post`` its children run after the layers and ``head`` the head
    model's children run after the base model (the last stage holds both). ``source`` says
    where the plan came from, for messages.
    """

    base_attr: str
    pre: tuple[str, ...]
    layers: str
    post: tuple[str, ...]
    head: tuple[str, ...]
    source: str

    def num_layers(self, model: nn.Module) -> int:
        return len(getattr(getattr(model, self.base_attr), self.layers))


def _has_state(module: nn.Module | None) -> bool:
    if module is None:
        return False
    if next(module.parameters(), None) is not None:
        return True
    return any(
        name not in m._non_persistent_buffers_set
        for m in module.modules()
        for name, b in m._buffers.items()
        if b is not None
    )


def _own_state(module: nn.Module) -> list[str]:
    """Parameters and persistent buffers held by ``module`` itself, not by a child."""
    params = [n for n, p in module._parameters.items() if p is not None]
    bufs = [
        n
        for n, b in module._buffers.items()
        if b is not None and n not in module._non_persistent_buffers_set
    ]
    return params + bufs


def read_plan(model: nn.Module) -> Plan:
    """The cut plan of ``model``, a transformers ``PreTrainedModel`` for causal LM; a
    ValueError (TypeError for what is not such a model) that says what is missing."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"ppfast.hf.split takes a transformers PreTrainedModel (e.g. LlamaForCausalLM), got "
            f"{type(model).__name__}; for other models use ppfast.split"
        )
    name = type(model).__name__
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{name} is an encoder-decoder model; ppfast.hf.split cuts decoder-only causal LMs"
        )
    base_attr = getattr(model, "base_model_prefix", "")
    base = getattr(model, base_attr, None) if base_attr else None
    if not isinstance(base, nn.Module) or base is model:
        # a prefix that names no child (Llama 4's text model keeps its base model under
        # `model`, its prefix says `language_model`): the one child that is a model
        inner = [(k, c) for k, c in model.named_children() if isinstance(c, PreTrainedModel)]
        if len(inner) == 1:
            base_attr, base = inner[0]
    if not isinstance(base, nn.Module) or base is model:
        raise ValueError(
            f"{name} has no base model under a head (its base_model_prefix {base_attr!r} names "
            "no child module): pass the causal LM (e.g. LlamaForCausalLM, not LlamaModel), "
            "whose head turns hidden states into logits"
        )
    base_plan, source = _base_plan(model, base)
    layers = [k for k in base_plan if isinstance(getattr(base, k, None), nn.ModuleList)]
    if len(layers) != 1:
        raise ValueError(
            f"{name}: {source} should name exactly one nn.ModuleList of layers to cut between "
            f"stages, but names {layers or 'none'} among {list(base_plan)}"
        )
    at = list(base_plan).index(layers[0])
    pre, post = tuple(list(base_plan)[:at]), tuple(list(base_plan)[at + 1 :])
    missing = [k for k in base_plan if not hasattr(base, k)]
    if missing:
        raise ValueError(f"{name}: {source} names {missing}, which {type(base).__name__} lacks")
    head = _head_names(model, base_attr, name)
    plan = Plan(base_attr, pre, layers[0], post, head, source)
    _check_covered(model, base, plan, name)
    _check_layers(base, plan, name)
    return plan


def _base_plan(model: nn.Module, base: nn.Module) -> tuple[dict, str]:
    config = model.config
    plan = getattr(config, "base_model_pp_plan", None) or getattr(base, "_pp_plan", None)
    if plan:
        return dict(plan), f"{type(config).__name__}.base_model_pp_plan"
    known = KNOWN_PLANS.get(getattr(config, "model_type", ""))
    if known is not None:
        return dict(known), f"ppfast's plan for model_type {config.model_type!r}"
    raise ValueError(
        f"{type(model).__name__} cannot be cut: its config ({type(config).__name__}) has no "
        "base_model_pp_plan, which says in what order the base model runs its embedding, its "
        f"list of layers and its final norm, and ppfast knows no plan for model_type "
        f"{getattr(config, 'model_type', None)!r}. Known without a config plan: "
        f"{sorted(KNOWN_PLANS)}. Cut it by hand with ppfast.split(layers, n, pre=..., post=...)"
    )


def _head_names(model: nn.Module, base_attr: str, name: str) -> tuple[str, ...]:
    """The head model's children that run after the base model: its ``_pp_plan`` entries
    (transformers merges the base model's into it under the base prefix; those are left out),
    else the child holding the output embeddings."""
    plan = getattr(model, "_pp_plan", None) or {}
    head = tuple(k for k in plan if k != base_attr and not k.startswith(base_attr + "."))
    if head:
        bad = [k for k in head if "." in k or not isinstance(getattr(model, k, None), nn.Module)]
        if bad:
            raise ValueError(f"{name}._pp_plan names {bad}, which are not children of {name}")
        return head
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for k, child in model.named_children():
        if out is not None and child is out:
            return (k,)
    raise ValueError(
        f"{name} has no head to put on the last stage: no _pp_plan naming it (e.g. "
        "{'lm_head': (['hidden_states'], ['logits'])}) and no output embeddings; ppfast.hf.split "
        "cuts causal LMs, whose head turns hidden states into logits"
    )


def _check_covered(model: nn.Module, base: nn.Module, plan: Plan, name: str) -> None:
    """Every child with parameters or persistent buffers has a place in the plan."""
    placed = {
        "base": set(plan.pre) | {plan.layers} | set(plan.post),
        "head": set(plan.head) | {plan.base_attr},
    }
    for where, mod in (("head", model), ("base", base)):
        loose = [k for k, c in mod.named_children() if k not in placed[where] and _has_state(c)]
        own = _own_state(mod)
        if loose or own:
            what = type(mod).__name__
            raise ValueError(
                f"{name} cannot be cut: {what} holds "
                + ", ".join(
                    x
                    for x in (
                        f"children {loose} with parameters" if loose else "",
                        f"its own parameters or buffers {own}" if own else "",
                    )
                    if x
                )
                + f" that {plan.source} does not place on a stage (it places "
                f"{sorted(placed[where])})"
            )


def _check_layers(base: nn.Module, plan: Plan, name: str) -> None:
    """The base model's forward can start from hidden states. (That its layers hand each other
    hidden states alone, not tuples, the stages check as they first run them: type
    annotations say tuple where the layers return a tensor.)"""
    params = inspect.signature(type(base).forward).parameters
    if "inputs_embeds" not in params:
        raise ValueError(
            f"{name} cannot be cut: {type(base).__name__}.forward takes no inputs_embeds, which "
            "stages after the first need to start from the hidden states they receive"
        )
    if len(getattr(base, plan.layers)) == 0:
        raise ValueError(f"{name} has no layers to cut")
