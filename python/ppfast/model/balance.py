"""Exact balancing of contiguous stages: the least heaviest stage, then the most even cut."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence


def balance(costs: Sequence[float], k: int) -> list[int]:
    """Layer counts of k contiguous non-empty stages: the least heaviest stage, then the least
    sum of squared stage costs (the most even), then the longest stages first."""
    n = len(costs)
    s = [0.0]
    for c in costs:
        s.append(s[-1] + c)
    limit = _bottleneck(s, k)
    limit += 1e-9 * abs(limit)
    # g[j][i]: least sum of squares of stages j..k-1 holding layers i..n-1, none over limit
    g = [[math.inf] * (n + 1) for _ in range(k + 1)]
    g[k][n] = 0.0

    def ends(j: int, i: int) -> Iterator[tuple[int, float]]:
        for e in range(i + 1, n - (k - 1 - j) + 1):
            c = s[e] - s[i]
            if c > limit:
                return
            yield e, c * c + g[j + 1][e]

    for j in range(k - 1, -1, -1):
        for i in range(j, n - (k - j) + 1):
            g[j][i] = min((v for _, v in ends(j, i)), default=math.inf)
    counts, i = [], 0
    for j in range(k):
        best = g[j][i]
        e = max(e for e, v in ends(j, i) if v <= best + 1e-9 * abs(best))
        counts.append(e - i)
        i = e
    return counts


def _bottleneck(s: Sequence[float], k: int) -> float:
    """The least possible heaviest stage over prefix sums ``s``: h_j[i] = min over t of
    max(h_{j-1}[t], s[i] - s[t]); h_{j-1} grows with t and s[i] - s[t] shrinks, so the best t
    sits where they cross, found by bisection."""
    n = len(s) - 1
    h = list(s)
    for j in range(2, k + 1):
        nh = [math.inf] * (n + 1)
        for i in range(j, n + 1):
            lo, hi = j - 1, i - 1
            while lo < hi:
                mid = (lo + hi) // 2
                if h[mid] >= s[i] - s[mid]:
                    hi = mid
                else:
                    lo = mid + 1
            best = max(h[lo], s[i] - s[lo])
            if lo > j - 1:
                best = min(best, max(h[lo - 1], s[i] - s[lo - 1]))
            nh[i] = best
        h = nh
    return h[n]
