"""Hugging Face transformers causal LMs, pipelined: ``import ppfast.hf``.

``ppfast.hf.split(model, n)`` cuts any causal LM whose config carries a pipeline plan
(``base_model_pp_plan``: Llama, Mistral, Qwen2, Gemma, ...) and GPT-2 into stages that run
the model's own layers as its forward does, under the model's own parameter names, with the
tied head declared (:mod:`.split`, :mod:`.stage`, :mod:`.plan`). ``ppfast.hf.causal_lm_loss``
is the loss for the last stage, from HF labels (:mod:`.loss`).

``import ppfast`` does not import transformers; this package needs it
(``pip install ppfast[hf]``).
"""

try:
    import transformers  # noqa: F401
except ImportError as e:
    raise ImportError(
        "ppfast.hf needs Hugging Face transformers, which is not installed: pip install ppfast[hf]"
    ) from e

from .loss import CausalLMLoss, causal_lm_loss, count_tokens
from .plan import KNOWN_PLANS, Plan, read_plan
from .split import HFSplit, split
from .stage import HFStage

__all__ = [
    "KNOWN_PLANS",
    "CausalLMLoss",
    "HFSplit",
    "HFStage",
    "Plan",
    "causal_lm_loss",
    "count_tokens",
    "read_plan",
    "split",
]
