"""The rank launcher fails a test with the rank's traceback, and never hangs it."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
import torch
import torch.distributed as dist
from ranks import RanksFailed, run_ranks


def sum_ranks(rank: int, world: int) -> list:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return [t.item(), torch.get_num_threads(), torch.full((2,), float(rank))]


def raise_or_exit(rank: int, world: int) -> None:
    if rank == 0:
        raise KeyError("boom on purpose")
    if rank == 1:
        os._exit(3)
    time.sleep(600)


def hang_on_rank_1(rank: int, world: int) -> int:
    if rank == 1:
        time.sleep(600)
    return rank


def test_results_come_back_by_rank():
    out = run_ranks(sum_ranks, 2, timeout=60.0)
    assert [o[0] for o in out] == [1.0] * 2
    assert [o[1] for o in out] == [1] * 2
    for rank, o in enumerate(out):
        torch.testing.assert_close(o[2], torch.full((2,), float(rank)))


def ours(before: set) -> list:
    """Child processes started since ``before`` that are still alive."""
    return [p for p in mp.active_children() if p not in before]


def test_failures_come_back_with_their_tracebacks():
    # Rank 2 would sleep for ten minutes: the failures of the others must not wait for it, nor
    # for the group's timeout, which is set past the suite's per-test limit (--timeout 300 in
    # scripts/test.sh), so a launcher that waited for either fails the test there.
    before = set(mp.active_children())
    with pytest.raises(RanksFailed) as info:
        run_ranks(raise_or_exit, 3, timeout=3600.0, grace=3.0)
    text = str(info.value)
    assert "failed on ranks [0, 1]" in text, text
    assert "KeyError: 'boom on purpose'" in text and "raise_or_exit" in text, text
    assert "exited with code 3" in text, text
    assert "ranks [2] had not finished" in text, text
    assert ours(before) == [], "rank 2 was left running"


def test_a_hang_is_killed_at_the_timeout():
    before = set(mp.active_children())
    # rank 0 may not even have started within the timeout on a busy machine
    with pytest.raises(RanksFailed, match=r"ran past 5 s; ranks \[(0, )?1\] had not finished"):
        run_ranks(hang_on_rank_1, 2, timeout=5.0)
    # killed, not left to sleep out its ten minutes (waiting for it would pass the suite's limit)
    assert ours(before) == [], "the hung rank was left running"
