"""Every schedule trains equal to one device through the c10d transport on nccl_emu.

nccl_emu (ppfast.testing) has NCCL's point-to-point semantics on CPU tensors: no tags, a
pair's messages matched in issue order, coalesced groups completing as one and running one
after another as on one stream. What passes here holds on NCCL by construction; what gloo's
tags and independent operations would hide fails here (docs/nccl.md).

One group per p runs every (schedule, model, m) for m in {p, 2p + 1}, three optimizer steps
and an eval each, with the c10d transport; then, at p = 2, shapes that change every step
(dynamic_shapes). The parent compares with one-device training at rtol 1e-5, atol 1e-6.
Tied weights and PP x DP over nccl_emu are in test_split_backward.py and test_pp_dp.py.
"""

from __future__ import annotations

import functools

import pytest
import torch
from ranks import run_once, run_ranks
from toy_models import (
    MODELS,
    SCHEDULE_CLASSES,
    SEQ,
    STEPS,
    assert_matches,
    merge_ranks,
    num_stages_of,
    reference,
    train_rank,
)

RTOL, ATOL = 1e-5, 1e-6
PS = (2, 3, 4)
M_CASES = {"m=p": lambda p: p, "m=2p+1": lambda p: 2 * p + 1}
DYNAMIC_SEQS = (SEQ, 4, 8)
# the c10d transport over the group's backend: nccl_emu, with gloo beside it for the steps
# that agree shapes
NCCL = {"backend": "nccl_emu", "env": {"PPFAST_TRANSPORT": "c10d"}}


def configs(p: int) -> list[tuple[str, str, int]]:
    return [
        (s, model, f(p)) for s in SCHEDULE_CLASSES for model in MODELS for f in M_CASES.values()
    ]


def train_all(rank: int, p: int, todo: list, dynamic: bool) -> dict:
    results = {}
    for schedule, model, m in todo:
        kw = {"seqs": DYNAMIC_SEQS, "dynamic_shapes": True} if dynamic else {}
        try:
            results[(schedule, model, m)] = train_rank(rank, p, schedule, model, m, **kw)
        except Exception as e:
            raise RuntimeError(f"rank {rank}, (schedule, model, m) = {schedule, model, m}") from e
    return results


@functools.cache
def reference_of(model: str, p: int, m: int, stages: int, dynamic: bool) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seqs = DYNAMIC_SEQS if dynamic else (SEQ,) * STEPS
        return reference(model, 2 * p, m, stages, seqs=seqs)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def group_run():
    def build(p: int, dynamic: bool) -> dict:
        todo = DYNAMIC_CONFIGS if dynamic else configs(p)
        per_rank = run_ranks(train_all, p, todo, dynamic, timeout=240.0, **NCCL)
        return {
            cfg: merge_ranks([r[cfg] for r in per_rank], num_stages_of(cfg[0], p) - 1)
            for cfg in todo
        }

    return run_once(build)


def _check(got: dict, schedule: str, model: str, p: int, m: int, dynamic: bool) -> None:
    if schedule == "dualpipev" and m < 2 * p:
        assert got.get("rejected"), "dualpipev ran with m < 2p"
        pytest.skip("dualpipev needs m >= 2p; it was rejected before any communication")
    want = reference_of(model, p, m, num_stages_of(schedule, p), dynamic)
    assert_matches(got, want, RTOL, ATOL)


@pytest.mark.parametrize("m_case", list(M_CASES))
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("schedule", list(SCHEDULE_CLASSES))
@pytest.mark.parametrize("p", PS)
def test_matches_one_device_over_nccl_emu(group_run, p, schedule, model, m_case):
    m = M_CASES[m_case](p)
    _check(group_run(p, False)[(schedule, model, m)], schedule, model, p, m, False)


DYNAMIC_MODELS = ("transformer", "two-stream")
DYNAMIC_CONFIGS = [(s, model, 5) for s in SCHEDULE_CLASSES for model in DYNAMIC_MODELS]


@pytest.mark.parametrize("model", DYNAMIC_MODELS)
@pytest.mark.parametrize("schedule", list(SCHEDULE_CLASSES))
def test_dynamic_shapes_over_nccl_emu(group_run, schedule, model):
    """Every step agrees shapes anew, over the tag-matched channel beside nccl_emu."""
    _check(group_run(2, True)[(schedule, model, 5)], schedule, model, 2, 5, True)
