"""DualPipeV (DeepSeek-V3's DualPipe folded onto a V placement): overlapped F and B of two chunks.

Rank r holds chunk 0 = stage r (the way down the V) and chunk 1 = stage 2p-1-r (the way
back up). In the steady state every action is a compound OVERLAP_F_B that runs the forward of
one chunk beside the full backward of the other, so one's communication hides behind the
other's compute. Eight phases per rank, following DeepSeek's reference implementation:

    1  F0 x 2(p-r-1)                      fill the way down
    2  (F0 F1) x (r+1)                    first microbatches turn round at the V's tip
    3  (I1 W F1) x (p-r-1)                zero-bubble backwards while the rest arrives
    4  ((F0;B1) (F1;B0)) x (m-2p+r+1)     steady state, all overlapped
    5  (B1 (F1;B0)) x (p-r-1)             forwards run out
    6  (B1 B0) x (r+1)                    from half way on, I instead of B ...
    7  (W I0) x (p-r-1)                   ... so the deferred Ws fill the drain
    8  W x (r+1)

Phase 4's first step on the last rank is not overlapped: its F0 can run at once while its
B1 still waits for the gradient from rank p-2, and pairing them would hold the F0 back.

DualPipeV needs m >= 2p, as DeepSeek's code and torch's ScheduleDualPipeV require: phase 4
must run at least once on rank 0.
"""

from __future__ import annotations

from collections import deque

from ..ir import Action, Kind, Program, v_placement
from ._args import check_m, check_p


def dualpipe_v(p: int, m: int) -> Program:
    """DualPipeV on p ranks (2p stages, V placement) for m >= 2p microbatches."""
    check_p("dualpipev", p)
    check_m(
        "dualpipev",
        m,
        2 * p,
        "DualPipeV needs at least 2p microbatches (one per stage) for its steady state",
    )
    ranks = [_rank_actions(r, p, m) for r in range(p)]
    return Program(ranks, v_placement(p), m, "dualpipev")


def _rank_actions(rank: int, p: int, m: int) -> list[Action]:
    stage = (rank, 2 * p - 1 - rank)
    next_f = [0, 0]
    # I and B of a chunk share one counter: each microbatch gets exactly one of them
    next_b = [0, 0]
    pending_w: deque[Action] = deque()
    acts: list[Action] = []

    def fwd(c: int) -> Action:
        a = Action(stage[c], Kind.F, next_f[c])
        next_f[c] += 1
        return a

    def bwd(c: int, split: bool) -> Action:
        a = Action(stage[c], Kind.I if split else Kind.B, next_b[c])
        next_b[c] += 1
        if split:
            pending_w.append(Action(a.stage, Kind.W, a.mb))
        return a

    def overlap(f_chunk: int, b_chunk: int) -> Action:
        return Action(-1, Kind.OVERLAP_F_B, -1, (fwd(f_chunk), bwd(b_chunk, split=False)))

    def weight() -> None:
        if pending_w:
            acts.append(pending_w.popleft())

    last = rank == p - 1
    # 1, 2
    acts += [fwd(0) for _ in range(2 * (p - rank - 1))]
    for _ in range(rank + 1):
        acts += [fwd(0), fwd(1)]
    # 3
    for _ in range(p - rank - 1):
        acts.append(bwd(1, split=True))
        weight()
        acts.append(fwd(1))
    # 4
    for k in range(m - 2 * p + rank + 1):
        if k == 0 and last:
            acts += [fwd(0), bwd(1, split=False)]
        else:
            acts.append(overlap(0, 1))
        acts.append(overlap(1, 0))
    # 5
    for _ in range(p - rank - 1):
        acts.append(bwd(1, split=False))
        acts.append(overlap(1, 0))
    # 6: the parity rule splits exactly the later r+1 of these 2(r+1) backwards, which leaves
    # phase 8 its r+1 Ws to fill the drain
    split = False
    half = (rank + 1) // 2
    for k in range(rank + 1):
        if k == half and rank % 2 == 1:
            split = True
        acts.append(bwd(1, split))
        if k == half and rank % 2 == 0:
            split = True
        acts.append(bwd(0, split))
    # 7, 8
    for _ in range(p - rank - 1):
        weight()
        acts.append(bwd(0, split))
    for _ in range(rank + 1):
        weight()
    assert next_f == [m, m] and next_b == [m, m] and not pending_w
    return acts
