"""Tiny transformers causal LMs built from configs (random weights, fp32), and their batches.

Every architecture ppfast.hf is tested on, at test widths: 4 layers, hidden 64, 4 heads of
which 2 key/value heads, a 128-token vocabulary, sequences of 16. Sliding windows are 4
tokens, so they mask something at that length, and the layers mix attention types where the
architecture has them (Qwen2's window layers, Gemma's alternating sliding and full layers).
Dropout is off, so one device and a pipeline compute the same thing.
"""

from __future__ import annotations

import torch

VOCAB, SEQ, LAYERS, HIDDEN = 128, 16, 4, 64
_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 2 * HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_MIXED = ["sliding_attention", "full_attention"] * (LAYERS // 2)


def _config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**_COMMON)
    if arch == "llama-tied":
        return tf.LlamaConfig(**_COMMON, tie_word_embeddings=True)
    if arch == "olmo":  # its final norm has no parameters
        return tf.OlmoConfig(**_COMMON)
    if arch == "mistral":
        return tf.MistralConfig(**_COMMON, sliding_window=4)
    if arch == "qwen2":
        return tf.Qwen2Config(
            **_COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=2
        )
    if arch == "gemma2":
        return tf.Gemma2Config(**_COMMON, head_dim=16, sliding_window=4, layer_types=_MIXED)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=4, layer_types=_MIXED)
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
        )
    raise ValueError(f"unknown architecture {arch!r}")


# the architectures trained on ranks; the single-process tests also take llama-tied and olmo
ARCHS = ("llama", "mistral", "qwen2", "gemma2", "gemma3", "gpt2")
ALL_ARCHS = ("llama", "llama-tied", "olmo", "mistral", "qwen2", "gemma2", "gemma3", "gpt2")


def build(arch: str, seed: int = 0):
    """The model, with the same weights for the same seed in every process."""
    import transformers as tf

    config = _config(arch)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    return model.float().train()


def batch(n: int, step: int, padded: bool, seq: int = SEQ) -> dict:
    """``input_ids``, ``labels`` (-100 on padding) and, when ``padded``, an
    ``attention_mask`` with left padding of a different length in each sample (some with
    none), so that microbatches count different numbers of tokens."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(3, VOCAB, (n, seq), generator=g)
    out = {"input_ids": ids, "labels": ids.clone()}
    if padded:
        mask = torch.ones(n, seq, dtype=torch.long)
        for i in range(n):
            pad = (3 * i + step) % (seq // 2)
            mask[i, :pad] = 0
        ids[mask == 0] = 0
        out["labels"] = ids.masked_fill(mask == 0, -100)
        out["attention_mask"] = mask
    return out
