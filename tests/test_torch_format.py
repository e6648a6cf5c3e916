"""Programs cross to and from torch.distributed.pipelining's CSV and pipeline_order forms."""

import csv
import io

import pytest
from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
from torch.distributed.pipelining.schedules import _Action

from ppfast.program.ir import Action, Kind, Program
from ppfast.program.lowering import lower
from ppfast.program.schedules import generate, schedule_names
from ppfast.program.simulator import simulate
from ppfast.program.torch_format import (
    detect_naming,
    from_pipeline_order,
    read_csv,
    write_csv,
)
from ppfast.program.validate import validate
from ppfast.training.torch_order import to_pipeline_order


def _csv_text(program, **kw):
    buf = io.StringIO()
    write_csv(program, buf, **kw)
    return buf.getvalue()


def _read_text(text, **kw):
    return read_csv(io.StringIO(text), **kw)


def _all_programs():
    for name in schedule_names():
        for p, m in [(2, 4), (3, 6), (4, 8)]:
            v = 2 if name.startswith("interleaved") else None
            yield generate(name, p, m, v)


@pytest.mark.parametrize("lowered", [False, True], ids=["compute-only", "with-comms"])
def test_every_ppfast_program_exports_and_reads_back_identical(lowered):
    for prog in _all_programs():
        if lowered:
            prog = lower(prog)
        for naming in ("current", "legacy"):
            if naming == "legacy" and any(a.sub for acts in prog.ranks for a in acts):
                with pytest.raises(ValueError, match="legacy naming has no OVERLAP_F_B"):
                    _csv_text(prog, naming=naming)
                continue
            text = _csv_text(prog, naming=naming)
            back = _read_text(text)  # the naming is detected
            assert back.meta["naming"] == naming or not any(
                a.kind in (Kind.I, Kind.W, Kind.B) for acts in prog.ranks for a in acts
            )
            assert back.ranks == prog.ranks, (prog.name, naming)
            assert back.stage_to_rank == prog.stage_to_rank
            # torch parses every cell of the current naming
            if naming == "current":
                for row in csv.reader(io.StringIO(text)):
                    for cell in row:
                        assert str(_Action.from_str(cell)) == cell


def test_naming_detection_and_explicit_choice():
    assert detect_naming(["0F0", "0B0"]) == "current"
    assert detect_naming(["0F0", "0I0", "0W0"]) == "current"
    assert detect_naming(["0F0", "0B0", "0W0"]) == "legacy"
    assert detect_naming(["0F0", "0BW0"]) == "legacy"
    with pytest.raises(ValueError, match="mixes"):
        detect_naming(["0I0", "0BW0"])
    legacy = "0F0,0F1,0B0,0W0,0B1,0W1\n1F0,1BW0,1F1,1BW1\n"
    prog = _read_text(legacy)
    assert str(prog).splitlines() == [
        "rank 0: 0F0 0F1 0I0 0W0 0I1 0W1",
        "rank 1: 1F0 1B0 1F1 1B1",
    ]
    # the same cells read with the current naming mean something else (and are invalid)
    forced = _read_text("0F0,0B0,0W0\n", naming="current")
    assert forced.ranks[0][1] == Action(0, Kind.B, 0)


def test_reader_skips_spacing_and_fsdp_bookkeeping():
    text = "0UNSHARD,0F0,,0SEND_F0,0RECV_B0,0B0,0REDUCE_GRAD\n,1RECV_F0,1F0,1B0,1SEND_B0\n"
    prog = _read_text(text)
    assert str(prog) == ("rank 0: 0F0 0SEND_F0 0RECV_B0 0B0\nrank 1: 1RECV_F0 1F0 1B0 1SEND_B0")
    validate(prog)


def test_csv_files_on_disk(tmp_path):
    prog = generate("zb-v", 2, 4)
    path = tmp_path / "zbv.csv"
    write_csv(prog, path)
    back = read_csv(path)
    assert back.ranks == prog.ranks and back.name == "zbv.csv"


TORCH_SCHEDULES = [
    # torch's visualizer mocks a stage; its single-stage 1F1B comes out garbled that way,
    # so single-stage coverage is GPipe's compute-only form
    ("GPipe", False),
    ("Interleaved1F1B", True),
    ("LoopedBFS", True),
    ("InterleavedZeroBubble", True),
    ("ZBVZeroBubble", True),
    ("DualPipeV", True),
]


@pytest.mark.parametrize("name, comms_too", TORCH_SCHEDULES)
@pytest.mark.parametrize("p, m", [(2, 4), (3, 6), (4, 8), (4, 12)])
def test_torch_generated_programs_import_validate_and_simulate(name, comms_too, p, m):
    forms = [False, True] if comms_too else [False]
    bubbles = []
    for with_comms in forms:
        ops = get_schedule_ops(name, p, m, with_comms=with_comms)
        prog = from_pipeline_order(ops, name=name)
        assert prog.is_lowered == with_comms
        assert prog.num_microbatches == m
        validate(prog)  # structure, then the dry run (lowered by ppfast if compute-only)
        sim = simulate(prog)
        assert 0 <= sim.bubble < 1
        bubbles.append(sim.bubble)
        # and back to torch's objects, unchanged
        order = to_pipeline_order(prog)
        assert [[str(a) for a in order[r]] for r in range(p)] == [
            [
                str(a)
                for a in row
                if a is not None
                and "UNSHARD" not in str(a)
                and "RESHARD" not in str(a)
                and "REDUCE_GRAD" not in str(a)
            ]
            for row in ops
        ]
    # communication does not change the simulated step
    assert len(set(bubbles)) == 1


@pytest.mark.parametrize("p, v, m", [(2, 2, 3), (2, 2, 1), (3, 2, 6), (4, 3, 5), (4, 2, 9)])
def test_looped_bfs_is_torch_schedule_looped_bfs_action_for_action(p, v, m):
    # torch pads its rows with None for the warmup: the compute order is what must agree
    ops = get_schedule_ops("LoopedBFS", p, m, v)
    ours = generate("looped-bfs", p, m, v)
    assert ours.stage_to_rank == from_pipeline_order(ops).stage_to_rank
    assert to_pipeline_order(ours) == {
        r: [a for a in row if a is not None] for r, row in enumerate(ops)
    }


def test_torch_and_ppfast_agree_on_zbv_bubble_shape():
    # torch's ZBV and ppfast's ZB-V are both zero-bubble V schedules: both well under 1F1B
    p, m = 4, 8
    torch_zbv = simulate(from_pipeline_order(get_schedule_ops("ZBVZeroBubble", p, m)))
    ours = simulate(generate("zb-v", p, m))
    one_f_one_b = simulate(generate("1f1b", p, m))
    assert ours.bubble < one_f_one_b.bubble / 2
    assert torch_zbv.bubble < one_f_one_b.bubble / 2
    assert ours.makespan <= torch_zbv.makespan


def test_program_from_pipeline_order_accepts_lists_and_dicts():
    rows = [
        [_Action.from_str("0F0"), None, _Action.from_str("0B0")],
        [_Action.from_str("1F0"), _Action.from_str("1B0")],
    ]
    a = from_pipeline_order(rows)
    b = from_pipeline_order({1: rows[1], 0: rows[0]})
    assert a.ranks == b.ranks == Program.from_text("rank 0: 0F0 0B0\nrank 1: 1F0 1B0").ranks
