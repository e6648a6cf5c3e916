"""The demo's model: a small GPT-style decoder, whole or cut into pipeline stages."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ... import nn as ppnn


@dataclass(frozen=True)
class ModelSize:
    """How big the decoder is: vocabulary, width, attention heads, blocks, sequence length."""

    vocab: int
    width: int
    heads: int
    layers: int
    seq: int

    def check(self) -> None:
        for name in ("vocab", "width", "heads", "layers", "seq"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(
                f"--width {self.width} does not split into {self.heads} heads; use a "
                f"multiple of --heads, e.g. --width {self.heads * max(1, self.width // self.heads)}"
            )

    def params(self) -> int:
        """Parameters, counting the tied embedding once."""
        d = self.width
        block = 12 * d * d + 13 * d  # qkv, proj, fc1, fc2 with biases, two LayerNorms
        return self.vocab * d + self.seq * d + self.layers * block + 2 * d


class Embedding(nn.Module):
    """Token embedding plus a learned position embedding."""

    def __init__(self, size: ModelSize):
        super().__init__()
        self.tok = nn.Embedding(size.vocab, size.width)
        self.pos = nn.Parameter(torch.zeros(size.seq, size.width))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok(idx) + self.pos[: idx.shape[1]]


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, size: ModelSize):
        super().__init__()
        d = size.width
        self.heads = size.heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Head(nn.Module):
    """Final LayerNorm and the output projection, whose weight is the token embedding's."""

    def __init__(self, size: ModelSize):
        super().__init__()
        self.ln = nn.LayerNorm(size.width)
        self.out = nn.Linear(size.width, size.vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


class Stage(nn.Module):
    """A contiguous piece of the decoder: the embedding (first stage only), some blocks, and
    the head (last stage only)."""

    def __init__(self, embed: Embedding | None, blocks: list[Block], head: Head | None):
        super().__init__()
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        if self.head is not None:
            x = self.head(x)
        return x


class GPT(nn.Module):
    """The whole decoder. ``stages(n)`` cuts it into n stage modules that share its layers."""

    def __init__(self, size: ModelSize, seed: int):
        super().__init__()
        size.check()
        self.size = size
        # built under its own seed so that every rank, and the one-device run, start equal
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = Embedding(size)
            self.blocks = nn.ModuleList(Block(size) for _ in range(size.layers))
            self.head = Head(size)
            self._init_weights()
        self.head.out.weight = self.embed.tok.weight  # tied, as in GPT-2
        # ppfast's split Linear: the weight-gradient half waits for the schedule's W actions
        ppnn.convert(self)

    def _init_weights(self) -> None:
        # GPT-2's: N(0, 0.02), residual projections scaled down by the depth
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "fc2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.size.layers))
            elif p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        nn.init.normal_(self.embed.pos, std=0.01)

    @property
    def tied_weight(self) -> nn.Parameter:
        return self.embed.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def stages(self, n: int) -> list[Stage]:
        """n stage modules over this model's own layers (nothing is copied)."""
        counts = blocks_per_stage(self.size.layers, n)
        out, at = [], 0
        for s, c in enumerate(counts):
            embed = self.embed if s == 0 else None
            head = self.head if s == n - 1 else None
            out.append(Stage(embed, list(self.blocks[at : at + c]), head))
            at += c
        return out


def blocks_per_stage(layers: int, n: int) -> list[int]:
    """Blocks of each of n stages: equal shares, any extra going to the middle stages first
    (the first stage also embeds and the last also runs the head), then the first."""
    if layers < n:
        raise ValueError(
            f"{layers} blocks cannot fill {n} pipeline stages (each stage needs at least one); "
            f"use --layers {n} or more, or fewer --ranks"
        )
    counts = [layers // n] * n
    order = list(range(1, n - 1)) + [0, n - 1]
    for k in range(layers % n):
        counts[order[k]] += 1
    return counts


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, averaged over the microbatch's tokens."""
    # the target may sit on another device than the last stage (Pipe over several GPUs)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten().to(logits.device))
