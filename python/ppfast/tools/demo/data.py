"""The demo's data: token sequences from a seeded, sparse order-2 Markov chain, made on the fly."""

from __future__ import annotations

import math

import torch

# The next token depends on the previous token and on the one before it through one of
# CONTEXTS buckets, and only FANOUT tokens can follow each context. Followers are drawn with
# Zipf weights, so some tokens are common: a model first learns which (its loss falls from
# ln(vocab) within a few steps), then the bigram table, then what the token two back adds,
# down to the chain's own entropy.
CONTEXTS = 2
FANOUT = 3
ZIPF = 1.0


class MarkovData:
    """Batches of ``seq`` tokens (and their next tokens) drawn from a random sparse chain.

    The chain and every batch are functions of ``seed`` and the step number only, so every
    rank, and the one-device run, draw the same batches without sending them to each other.
    """

    def __init__(self, vocab: int, seq: int, seed: int):
        if vocab < FANOUT:
            raise ValueError(f"--vocab must be at least {FANOUT}, got {vocab}")
        self.vocab, self.seq, self.seed = vocab, seq, seed
        g = torch.Generator().manual_seed(seed)
        n = vocab * CONTEXTS
        weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** ZIPF
        self.next_tokens = torch.stack(
            [torch.multinomial(weights, FANOUT, generator=g) for _ in range(n)]
        )
        # peaked but not deterministic: a context's likeliest follower has about 60-90%
        self.probs = torch.softmax(2.0 * torch.randn(n, FANOUT, generator=g), dim=-1)

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of step ``step``: two (size, seq) int64 tensors, targets shifted
        by one."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        tok = torch.empty(size, self.seq + 1, dtype=torch.long)
        tok[:, :2] = torch.randint(self.vocab, (size, 2), generator=g)
        for t in range(2, self.seq + 1):
            ctx = self._context(tok[:, t - 1], tok[:, t - 2])
            pick = torch.multinomial(self.probs[ctx], 1, generator=g).squeeze(1)
            tok[:, t] = self.next_tokens[ctx, pick]
        return tok[:, :-1].contiguous(), tok[:, 1:].contiguous()

    def _context(self, prev: torch.Tensor, prev2: torch.Tensor) -> torch.Tensor:
        return prev * CONTEXTS + prev2 % CONTEXTS

    def entropy(self) -> float:
        """The lowest mean loss a model can reach on these batches (nats per token): the
        chain's entropy at every position but the first, which is uniform."""
        h = -(self.probs * self.probs.log()).sum(-1).mean().item()
        return (math.log(self.vocab) + (self.seq - 1) * h) / self.seq
