"""Microbatch groups: the order in which interleaved schedules visit (chunk, microbatch) pairs.

Megatron's interleaved schedule runs microbatches in groups of p: the forwards of a group go
through chunk 0, then chunk 1, ..., then the next group; the backwards visit the chunks in
reverse. A group must hold at least p microbatches, or rank 0 finishes chunk c of the group
before the group's first microbatch has come back round the ring for chunk c+1 and idles.
Groups larger than p are harmless in steady state; they only cost warmup memory. So for m not
a multiple of p we use m // p groups whose sizes differ by at most one, the larger ones first
(only the first group's size sets the warmup depth, and putting the spare microbatches early
keeps later groups at the minimum). With m a multiple of p this is Megatron's and torch's order.
"""

from __future__ import annotations


def group_sizes(p: int, m: int) -> list[int]:
    """Sizes of the microbatch groups for m >= p: m // p groups, each p or more, larger first."""
    assert m >= p >= 1
    q = m // p
    base, extra = divmod(m, q)
    return [base + 1] * extra + [base] * (q - extra)


def chunk_orders(p: int, m: int, v: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Forward and backward visiting orders of (chunk, microbatch), the same on every rank."""
    fwd: list[tuple[int, int]] = []
    bwd: list[tuple[int, int]] = []
    start = 0
    for size in group_sizes(p, m):
        mbs = range(start, start + size)
        for c in range(v):
            fwd += [(c, i) for i in mbs]
            bwd += [(v - 1 - c, i) for i in mbs]
        start += size
    return fwd, bwd
