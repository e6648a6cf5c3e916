"""A rank that stalls (computes on, alive) is noticed: at once when it gives up, within the
timeout when it does not, over gloo and over nccl_emu (the c10d transport on both).

Three ranks run 1F1B on the toy MLP. In the chosen step, rank 1's forward of microbatch 1
stops (it waits on an event instead of computing). With ``abort``, a watchdog thread on rank 1
calls ``schedule.abort("stalled")`` a second later; ranks 0 and 2, blocked on rank 1, must
raise PipelineCommError naming rank 1 within 2 s of that call. Without it, they must raise by
their timeout (3 s): the first to time out says so, and the other may go on that notice.
Step 0 agrees shapes (on gloo beside nccl_emu); step 1 runs on the backend itself.
"""

from __future__ import annotations

import threading
import time

import pytest
from ranks import run_ranks
from torch import nn
from toy_models import batch, build_blocks, loss_fn_of, split_stages

import ppfast

TIMEOUT = 3.0


class Stalls(nn.Module):
    """Runs ``inner``, except at the chosen forward, where it waits for ``release``."""

    def __init__(self, inner: nn.Module, at: int, release: threading.Event, stalled):
        super().__init__()
        self.inner, self.at, self.release, self.stalled = inner, at, release, stalled
        self.calls = 0

    def forward(self, *args):
        self.calls += 1
        if self.calls == self.at:
            self.stalled.set()
            self.release.wait(60)
            raise RuntimeError("released after the stall")
        return self.inner(*args)


def stall(rank: int, p: int, step: int, abort: bool) -> dict:
    chains = split_stages(build_blocks("mlp", p), p)
    release, stalled = threading.Event(), threading.Event()
    m = 3
    module = Stalls(chains[1], step * m + 2, release, stalled) if rank == 1 else chains[rank]
    sched = ppfast.Schedule1F1B(
        ppfast.PipelineStage(module, rank, p, "cpu"), m, loss_fn_of("mlp"), timeout=TIMEOUT,
        transport="c10d",
    )  # fmt: skip
    aborted_at: list[float] = []

    def watchdog():
        stalled.wait(60)
        time.sleep(1.0)
        aborted_at.append(time.time())
        sched.abort("stalled")
        release.set()

    if rank == 1 and abort:
        threading.Thread(target=watchdog, daemon=True).start()
    elif rank == 1:
        threading.Timer(TIMEOUT + 5, release.set).start()
    out: dict = {}
    for k in range(step + 1):
        inputs, target = batch("mlp", m, k)
        started = time.time()
        try:
            sched.step(*(inputs if rank == 0 else ()), target=target if rank == p - 1 else None)
        except Exception as e:  # noqa: BLE001 - what it raised is the point
            out = {"raised_at": time.time(), "type": type(e).__name__, "text": str(e),
                   "peer": getattr(e, "peer", None), "timed_out": getattr(e, "timed_out", None),
                   "step": k, "started": started}  # fmt: skip
            break
    out["aborted_at"] = aborted_at[0] if aborted_at else None
    out["start"] = time.time()
    return out


BACKENDS = {"gloo": {}, "nccl_emu": {"backend": "nccl_emu"}}


CASES = [(b, step) for b in BACKENDS for step in (0, 1)]


@pytest.mark.parametrize(("backend", "step"), CASES)
def test_peers_raise_within_2_s_of_a_stalled_rank_giving_up(backend, step):
    res = run_ranks(stall, 3, step, True, timeout=90, **BACKENDS[backend])
    aborted = res[1]["aborted_at"]
    assert aborted is not None
    for rank in (0, 2):
        got = res[rank]
        assert got.get("type") == "PipelineCommError", got
        assert got["step"] == step and got["peer"] == 1 and not got["timed_out"], got
        assert "rank 1 gave up: stalled" in got["text"], got
        assert "this rank gave up" not in got["text"], got  # a peer did, not this one
        assert got["raised_at"] - aborted < 2.0, (rank, got["raised_at"] - aborted)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_peers_raise_at_the_timeout_when_nobody_gives_up(backend):
    res = run_ranks(stall, 3, 1, False, timeout=90, **BACKENDS[backend])
    peers = [res[0], res[2]]
    for got in peers:
        assert got.get("type") == "PipelineCommError", got
        # a rank that times out tells the others, so one may fail on that notice, earlier
        assert got["raised_at"] - got["started"] < TIMEOUT + 2.0, got
    assert any(got["timed_out"] and got["peer"] == 1 for got in peers), peers
