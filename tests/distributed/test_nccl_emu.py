"""ppfast.testing's nccl_emu backend behaves as ProcessGroupNCCL does for point to point.

Each test runs two ranks of an ``init_process_group("nccl_emu")`` group and checks one of the
points docs/nccl.md lists, on the backend object itself (what ppfast's C10dTransport calls)
and through torch.distributed. Where gloo would behave otherwise, the test says so: those
are the differences a pipeline tested only on gloo never meets.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
from ranks import RanksFailed, run_ranks


def _backend():
    import torch.distributed as dist

    return dist.group.WORLD._get_backend(torch.device("cpu"))


def _tags_ignored(rank: int, size: int) -> list:
    b = _backend()
    assert b.name() == "nccl_emu" and b.supports_coalescing
    if rank == 0:
        for value, tag in ((1.0, 5), (2.0, 7)):
            b.send([torch.full((4,), value)], 1, tag).wait()
        return []
    first, second = torch.zeros(4), torch.zeros(4)
    # received in the opposite order of the tags: NCCL pairs by order, not by tag
    w1 = b.recv([first], 0, 7)
    w2 = b.recv([second], 0, 5)
    w1.wait()
    w2.wait()
    return [first[0].item(), second[0].item()]


def test_a_pairs_messages_meet_in_issue_order_whatever_their_tags():
    _, got = run_ranks(_tags_ignored, 2, backend="nccl_emu", timeout=60)
    # gloo would give [2.0, 1.0]: the tag-7 receive would take the tag-7 send
    assert got == [1.0, 2.0]


def _coalesced(rank: int, size: int) -> dict:
    b = _backend()
    peer = 1 - rank
    out, back = torch.full((8,), float(rank)), torch.zeros(8)
    b._start_coalescing()
    per_op = [b.send([out], peer, 0), b.recv([back], peer, 0)]
    group = b._end_coalescing()
    group.wait()
    b._start_coalescing()
    empty = b._end_coalescing()
    return {
        "per_op_none": [w is None for w in per_op],
        "group": group is not None,
        "empty_group_none": empty is None,
        "got": back[0].item(),
    }


def test_operations_of_a_group_return_no_work_and_the_group_one():
    for rank, got in enumerate(run_ranks(_coalesced, 2, backend="nccl_emu", timeout=60)):
        assert got["per_op_none"] == [True, True]
        assert got["group"] and got["empty_group_none"]
        # both ranks sent and received in one group each: a symmetric exchange completes
        assert got["got"] == float(1 - rank)


def _rendezvous(rank: int, size: int) -> dict:
    b = _backend()
    if rank == 0:
        w = b.send([torch.ones(16)], 1, 0)
        time.sleep(0.5)
        early = w.is_completed()
        w.wait()
        return {"completed_before_receive": early}
    time.sleep(1.5)
    b.recv([torch.zeros(16)], 0, 0).wait()
    return {}


def test_a_send_completes_only_once_its_receive_runs():
    got, _ = run_ranks(_rendezvous, 2, backend="nccl_emu", timeout=60)
    assert got["completed_before_receive"] is False


def _stream_order(rank: int, size: int) -> dict:
    """Each rank receives first, then sends, in two separate groups: on NCCL's one stream the
    receive holds the send behind it, and neither rank's send ever starts."""
    b = _backend()
    peer = 1 - rank
    recv = b.recv([torch.zeros(4)], peer, 0)
    send = b.send([torch.ones(4)], peer, 0)
    t0 = time.monotonic()
    try:
        send.wait(timedelta(seconds=2))
    except Exception as e:  # noqa: BLE001 - what it raises is the point
        return {"error": type(e).__name__, "text": str(e), "after": time.monotonic() - t0}
    finally:
        del recv
    return {"error": None}


def test_a_group_that_cannot_finish_holds_every_later_one():
    for got in run_ranks(_stream_order, 2, backend="nccl_emu", timeout=60):
        # gloo runs both at once and this exchange completes
        assert got["error"] == "DistBackendError", got
        assert "Watchdog caught collective operation timeout" in got["text"]
        assert 1.5 < got["after"] < 10


def _collectives(rank: int, size: int) -> dict:
    import torch.distributed as dist

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    parts = [None] * size
    dist.all_gather_object(parts, {"rank": rank})
    dist.barrier()
    return {"sum": t.item(), "parts": parts}


def test_collectives_run_on_the_inner_backend():
    for got in run_ranks(_collectives, 2, backend="nccl_emu", timeout=60):
        assert got["sum"] == 3.0
        assert got["parts"] == [{"rank": 0}, {"rank": 1}]


def _torch_batch(rank: int, size: int) -> float:
    import torch.distributed as dist

    peer = 1 - rank
    back = torch.zeros(4)
    ops = [dist.P2POp(dist.isend, torch.full((4,), rank + 1.0), peer),
           dist.P2POp(dist.irecv, back, peer)]  # fmt: skip
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    return back[0].item()


def test_torch_batch_isend_irecv_is_one_coalesced_group():
    assert run_ranks(_torch_batch, 2, backend="nccl_emu", timeout=60) == [2.0, 1.0]


def _fails(rank: int, size: int) -> None:
    raise ValueError("on purpose")


def test_a_failing_rank_is_reported():
    with pytest.raises(RanksFailed, match="on purpose"):
        run_ranks(_fails, 2, backend="nccl_emu", timeout=60)


def _out_of_order(rank: int, size: int, program_text: str) -> dict:
    """Train one step with a program whose rank 0 sends microbatch 1 before microbatch 0."""
    from toy_models import batch, build_blocks, loss_fn_of, split_stages

    import ppfast

    rows = [[ppfast.parse_action(t) for t in line.split()] for line in program_text.split("|")]
    program = ppfast.Program(rows, (0, 1), 2)
    chains = split_stages(build_blocks("mlp", 2), 2)
    stage = ppfast.PipelineStage(chains[rank], rank, 2, "cpu")
    sched = ppfast.PipelineSchedule(
        stage, 2, loss_fn_of("mlp"), program=program, transport="c10d", timeout=20
    )
    inputs, target = batch("mlp", 2, 0)
    losses: list = []
    try:
        sched.step(*(inputs if rank == 0 else ()), target=target if rank == 1 else None,
                   losses=losses)  # fmt: skip
    except ValueError as e:
        return {"refused": str(e)}
    return {"losses": [float(x) for x in losses]}


OUT_OF_ORDER = (
    "0F0 0F1 0SEND_F1 0SEND_F0 0RECV_B0 0B0 0RECV_B1 0B1"
    "|1RECV_F0 1F0 1RECV_F1 1F1 1B0 1SEND_B0 1B1 1SEND_B1"
)
IN_ORDER = OUT_OF_ORDER.replace("0SEND_F1 0SEND_F0", "0SEND_F0 0SEND_F1")


def test_a_program_only_order_matching_breaks_runs_on_gloo_and_is_refused_on_nccl_emu():
    gloo = run_ranks(_out_of_order, 2, OUT_OF_ORDER, timeout=60)
    good = run_ranks(_out_of_order, 2, IN_ORDER, timeout=60)
    assert gloo[1]["losses"] == good[1]["losses"] and len(good[1]["losses"]) == 2
    emu = run_ranks(_out_of_order, 2, OUT_OF_ORDER, backend="nccl_emu", timeout=60)
    for got in emu:  # every rank refuses it before anything is sent
        assert "rank 1, action 1RECV_F0 (#0)" in got["refused"], got
        assert "matched by order" in got["refused"]
