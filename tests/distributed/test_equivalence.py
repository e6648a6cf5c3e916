"""Every schedule, trained on gloo ranks, matches the same model trained on one device.

One process group per p runs every (schedule, model, m) in turn, three optimizer steps each,
and sends back per-microbatch losses, the last stage's outputs, every parameter's gradient at
every step and the parameters after the last step, by stage. The parent trains the same
model on one device with the same microbatches and compares: fp32, rtol=1e-5 and atol=1e-6
(torch.testing.assert_close).

The whole matrix runs over the default transport (shared memory between these CPU ranks);
every schedule and model also runs once over gloo's own point to point (c10d).

Skipped: dualpipev at m = p, which it rejects (it needs m >= 2p); that the rejection is a
ValueError raised on every rank before anything is sent is checked there instead (the
configurations after it in the same group would break if anything had been sent). Every
other combination runs; the interleaved schedules need m >= p, which all three m satisfy.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from ranks import run_once, run_ranks
from toy_models import (
    MODELS,
    SCHEDULE_CLASSES,
    assert_matches,
    merge_ranks,
    num_stages_of,
    reference,
    train_rank,
)

RTOL, ATOL = 1e-5, 1e-6
PS = (2, 3, 4)
M_CASES = {"m=p": lambda p: p, "m=2p": lambda p: 2 * p, "m=2p+1": lambda p: 2 * p + 1}


def configs(p: int) -> list[tuple[str, str, int]]:
    return [
        (s, model, f(p)) for s in SCHEDULE_CLASSES for model in MODELS for f in M_CASES.values()
    ]


def train_all(rank: int, p: int, todo: list, transport: str | None) -> dict:
    """Every configuration in turn on this rank; all ranks walk the same list."""
    results = {}
    for cfg in todo:
        try:
            results[cfg] = train_rank(rank, p, *cfg, transport=transport)
        except Exception as e:
            raise RuntimeError(f"rank {rank}, (schedule, model, m) = {cfg}") from e
    return results


@functools.cache
def reference_of(model: str, p: int, m: int, stages: int) -> dict:
    # tiny ops: with more than one thread the hand-offs cost more than the math (10x here)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reference(model, 2 * p, m, stages)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def group_run():
    """Results of the whole group for p (and transport), run once on first use; a failure is
    kept and raised for every configuration of that p."""

    def build(p: int, transport: str | None = None) -> dict:
        todo = configs(p) if transport is None else C10D_CONFIGS(p)
        # generous: p = 4 puts four ranks on what may be two busy cores
        per_rank = run_ranks(train_all, p, todo, transport, timeout=240.0)
        return {
            cfg: merge_ranks([r[cfg] for r in per_rank], num_stages_of(cfg[0], p) - 1)
            for cfg in todo
        }

    return run_once(build)


@pytest.mark.parametrize("m_case", list(M_CASES))
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("schedule", list(SCHEDULE_CLASSES))
@pytest.mark.parametrize("p", PS)
def test_matches_one_device(group_run, p, schedule, model, m_case):
    m = M_CASES[m_case](p)
    got = group_run(p)[(schedule, model, m)]
    if schedule == "dualpipev" and m < 2 * p:
        for text in got.get("rejected") or ["accepted"]:
            assert re.search(rf"at least {2 * p}\b", text), text
        pytest.skip(f"{schedule} needs m >= 2p; m={m} was rejected before any communication")
    want = reference_of(model, p, m, num_stages_of(schedule, p))
    # a last stage with tuple outputs returns None from step
    assert_matches(got, want, RTOL, ATOL)


# The matrix above runs over the default transport, shared memory between these CPU ranks.
# The c10d one (gloo point to point) carries the same programs; it runs every schedule and
# model once, at an odd m on three ranks.
def C10D_CONFIGS(p: int) -> list[tuple[str, str, int]]:
    return [(s, model, 2 * p + 1) for s in SCHEDULE_CLASSES for model in MODELS]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("schedule", list(SCHEDULE_CLASSES))
def test_matches_one_device_over_gloo(group_run, schedule, model):
    p, m = 3, 7
    got = group_run(p, "c10d")[(schedule, model, m)]
    want = reference_of(model, p, m, num_stages_of(schedule, p))
    assert_matches(got, want, RTOL, ATOL)
