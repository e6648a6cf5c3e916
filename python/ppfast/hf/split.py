"""ppfast.hf.split: a transformers causal LM cut into pipeline stages by its own plan.

Where the cuts fall is :func:`ppfast.split`'s business (its methods balance layers,
parameters or measured time); what each stage runs is :class:`~ppfast.hf.stage.HFStage`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..model.partition import Split
from ..model.partition import split as split_layers
from .loss import causal_lm_loss
from .plan import Plan, read_plan
from .stage import HFStage


@dataclass(frozen=True, eq=False, repr=False)
class HFSplit(Split):
    """A :class:`ppfast.Split` of a transformers causal LM: ``stages[s]`` is an
    :class:`~ppfast.hf.stage.HFStage` holding the model's own modules under the model's
    names; ``tied`` declares the embedding the head shares (``tie_word_embeddings``)."""

    model: nn.Module | None = None
    plan: Plan | None = None

    def with_counts(self, counts: Sequence[int]) -> HFSplit:
        """The same model cut with other ``counts`` (layers per stage), costed as this one."""
        return _stages_of(self.model, self.plan, _plain(self).with_counts(counts))


def split(model: nn.Module, num_stages: int | None = None, method: str = "parameters", **options):
    """Cut a transformers causal LM (any ``PreTrainedModel`` whose config has
    ``base_model_pp_plan``, and GPT-2) into ``num_stages`` pipeline stages.

    ``method`` and ``options`` are :func:`ppfast.split`'s (``"uniform"``, ``"parameters"``,
    ``"type:REGEX"``, ``"profile"``; ``counts=``, and for ``"profile"`` ``sample=``, one
    microbatch of ``input_ids``, with ``target=`` its labels, timed with
    :data:`ppfast.hf.causal_lm_loss` unless ``loss_fn=`` says otherwise). Stage 0 takes
    ``input_ids`` and optional ``attention_mask=`` (padding) and ``position_ids=``; the last
    stage returns the logits. Each stage runs its layers through the model's own forward:
    position ids, rotary embeddings, the causal mask with padding and per-layer attention
    types (sliding windows) are made on each stage as the whole model makes them; the padding
    mask and position ids travel with the hidden states.

    Parameters keep the model's names, so ``ppfast.checkpoint.gather`` gives a state_dict
    that ``model.load_state_dict`` (and ``save_pretrained``) takes. Nothing is copied: the
    stages hold the model's own layers. Example::

        import ppfast, ppfast.hf

        s = ppfast.hf.split(model, 4)                       # 4 stages by parameters
        stage = ppfast.PipelineStage(s.stages[rank], rank, 4, tied=s.tied[rank])
        sched = ppfast.Schedule1F1B(stage, 8, loss_fn=ppfast.hf.causal_lm_loss)
        sched.step(input_ids, attention_mask=mask, target=labels)  # labels as for HF

    A model it cannot cut is refused with a ValueError that says what is missing.
    """
    plan = read_plan(model)
    for word in ("pre", "post"):
        if word in options:
            raise TypeError(
                f"ppfast.hf.split places the model's {word} modules itself (from its plan); "
                f"leave {word}= out"
            )
    base = getattr(model, plan.base_attr)
    layers = list(getattr(base, plan.layers))
    if method == "profile":
        n = len(layers)
        units = [HFStage(model, plan, i, i + 1, False, False) for i in range(n)]
        if options.get("target") is not None and options.get("loss_fn") is None:
            options["loss_fn"] = causal_lm_loss
        cut = split_layers(
            units,
            num_stages,
            method,
            pre=HFStage(model, plan, 0, 0, True, False),
            post=HFStage(model, plan, n, n, False, True),
            **options,
        )
    else:
        cut = split_layers(layers, num_stages, method, pre=_pre(model, plan),
                           post=_post(model, plan), **options)  # fmt: skip
    return _stages_of(model, plan, cut)


def _pre(model: nn.Module, plan: Plan) -> list[nn.Module]:
    base = getattr(model, plan.base_attr)
    return [base._modules[k] for k in plan.pre]


def _post(model: nn.Module, plan: Plan) -> list[nn.Module]:
    base = getattr(model, plan.base_attr)
    return [base._modules[k] for k in plan.post] + [model._modules[k] for k in plan.head]


def _plain(s: Split) -> Split:
    """``s`` as a plain Split over the model's own layers and modules (named as in a list)."""
    fields = {f: getattr(s, f) for f in Split.__dataclass_fields__}
    fields["names"] = tuple(str(i) for i in range(len(s.layers)))
    return Split(**fields)


def _stages_of(model: nn.Module, plan: Plan, cut: Split) -> HFSplit:
    """``cut``'s counts and costs, with HFStage stages and the model's own modules."""
    n = cut.num_stages
    stages = tuple(
        HFStage(model, plan, a, b, with_pre=s == 0, with_post=s == n - 1)
        for s, (a, b) in enumerate(cut.ranges)
    )
    layers = getattr(getattr(model, plan.base_attr), plan.layers)
    fields = {f: getattr(cut, f) for f in Split.__dataclass_fields__}
    fields.update(
        stages=stages,
        layers=tuple(layers),
        names=tuple(f"{plan.base_attr}.{plan.layers}.{i}" for i in range(len(layers))),
        pre=tuple(_pre(model, plan)),
        post=tuple(_post(model, plan)),
    )
    return HFSplit(**fields, model=model, plan=plan)
