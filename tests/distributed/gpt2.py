"""A decoder shaped like GPT-2 small (12 blocks, tied head), at test widths, and its stages.

Written with plain torch: token and position embeddings, 12 pre-LayerNorm blocks (causal
multi-head self-attention, an MLP with GELU, residuals), a final LayerNorm and a head that
shares the token embedding's weight. GPT-2 small is 12 x 768 wide with 12 heads, a 50257-token
vocabulary and 1024 positions; here the widths are small so that a test trains it on a few
gloo ranks in seconds, while the structure (what each stage holds, the tie between the
first and the last stage) is GPT-2's.

Usage::

    model = GPT2(GPT2Config())                      # the one-device model
    parts = split_stages(model, 4)                  # stage modules, sharing model's layers
    stages = pipeline_stages(model, 4, [0, 3], group=mesh.pp_group)  # a V-placed rank
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import ppfast


@dataclass(frozen=True)
class GPT2Config:
    vocab: int = 96
    seq: int = 16  # positions
    width: int = 32
    heads: int = 2
    layers: int = 12


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} does not split into {cfg.heads} heads")
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.fc = nn.Linear(cfg.width, 4 * cfg.width)
        self.proj = nn.Linear(4 * cfg.width, cfg.width)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)), as GPT-2's."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.width)
        self.wpe = nn.Embedding(cfg.seq, cfg.width)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.wte(ids) + self.wpe(pos)


class GPT2(nn.Module):
    """The whole decoder; ``head.weight`` is ``embed.wte.weight`` (one Parameter)."""

    def __init__(self, cfg: GPT2Config | None = None, seed: int = 0):
        super().__init__()
        cfg = cfg or GPT2Config()
        self.cfg = cfg
        torch.manual_seed(seed)
        self.embed = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)
        self.head.weight = self.embed.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2's: N(0, 0.02), residual projections scaled down by the depth
        gen = torch.Generator().manual_seed(1234)
        resid = 0.02 / math.sqrt(2 * self.cfg.layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 1:
                    if name.endswith("bias"):
                        p.zero_()
                    else:
                        p.fill_(1.0)  # LayerNorm weights
                else:
                    std = resid if name.endswith("proj.weight") else 0.02
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class Stage(nn.Module):
    """A contiguous part of :class:`GPT2`: optionally the embeddings, some blocks, optionally
    ln_f and the head. Its layers are the model's own (shared, not copied)."""

    def __init__(
        self,
        blocks: Sequence[Block],
        embed: Embeddings | None = None,
        ln_f: nn.LayerNorm | None = None,
        head: nn.Linear | None = None,
    ):
        super().__init__()
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = ln_f
        self.head = head

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        if self.head is not None:
            x = self.head(self.ln_f(x))
        return x


def split_stages(model: GPT2, num_stages: int) -> list[Stage]:
    """``num_stages`` stage modules: stage 0 with the embeddings, the last with ln_f and the
    head, the blocks in equal contiguous shares (12 blocks: 2, 3, 4, 6 or 12 stages)."""
    blocks = list(model.blocks)
    per, left = divmod(len(blocks), num_stages)
    if left or not per:
        raise ValueError(f"{len(blocks)} blocks do not split evenly into {num_stages} stages")
    last = num_stages - 1
    return [
        Stage(
            blocks[s * per : (s + 1) * per],
            embed=model.embed if s == 0 else None,
            ln_f=model.ln_f if s == last else None,
            head=model.head if s == last else None,
        )
        for s in range(num_stages)
    ]


def pipeline_stages(
    model: GPT2,
    num_stages: int,
    mine: Sequence[int],
    group=None,
    *,
    convert: bool = False,
    wrap=None,
) -> list[ppfast.PipelineStage]:
    """This rank's PipelineStages (stage indices ``mine``) of ``model``, with the tie declared.

    Where the first and the last stage sit on different ranks, the head gets its own copy of
    the embedding's weight (set on ``model.head`` too), and both declare ``tied={"wte": ...}``:
    the schedule keeps the copies equal. Where one rank holds both (V placement), they keep
    one Parameter, declared by both stages. ``convert`` turns every Linear of this rank's
    stages into ``ppfast.nn.Linear`` (split backward for the zero-bubble schedules); ``wrap``
    (a module -> module function, e.g. a DistributedDataParallel constructor) is applied to
    each stage's module.
    """
    parts = split_stages(model, num_stages)
    last = num_stages - 1
    if last in mine and 0 not in mine:
        model.head.weight = nn.Parameter(model.head.weight.detach().clone())
    out = []
    for s in mine:
        mod = ppfast.nn.convert(parts[s]) if convert else parts[s]
        if wrap is not None:  # first: FSDP replaces the parameters with sharded ones
            mod = wrap(mod)
        tied = {}
        if s == 0:
            tied["wte"] = model.embed.wte.weight
        if s == last:
            tied["wte"] = model.head.weight
        out.append(ppfast.PipelineStage(mod, s, num_stages, "cpu", group=group, tied=tied))
    return out


def loss_fn(logits, target):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def batch(cfg: GPT2Config, n: int, step: int, seed: int = 0):
    """(ids, targets) of one step: ``n`` sequences of ``cfg.seq`` tokens."""
    g = torch.Generator().manual_seed(1000 * seed + step)
    ids = torch.randint(0, cfg.vocab, (n, cfg.seq + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def named_params(model: GPT2, params: Sequence[nn.Parameter] | None = None) -> dict:
    """{name in the whole model: detached copy}, for ``params`` (default: all). A Parameter
    the model holds under two names (the tied head) is listed under both."""
    want = None if params is None else {id(p) for p in params}
    return {
        name: p.detach().clone()
        for name, p in model.named_parameters(remove_duplicate=False)
        if want is None or id(p) in want
    }
