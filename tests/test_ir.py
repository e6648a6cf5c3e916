"""The IR's text forms and placements."""

import pytest

from ppfast.program.ir import (
    Action,
    Kind,
    Program,
    infer_placement,
    loop_placement,
    parse_action,
    v_placement,
)

SIMPLE = ["2F0", "1I3", "1W3", "0B5", "3SEND_F1", "2RECV_B4", "12F105", "0RECV_F0", "7SEND_B2"]


@pytest.mark.parametrize("text", SIMPLE)
def test_simple_actions_round_trip(text):
    a = parse_action(text)
    assert str(a) == text
    assert Action.parse(text) == a


def test_fields_of_a_parsed_action():
    assert parse_action("3SEND_F1") == Action(3, Kind.SEND_F, 1)
    assert parse_action(" 1I3 ") == Action(1, Kind.I, 3)
    assert parse_action("1I3").is_compute and not parse_action("1I3").is_comm
    assert parse_action("2RECV_B4").is_comm


def test_compound_action_round_trips():
    a = parse_action("(0F7;7B3)OVERLAP_F_B")
    assert a.kind is Kind.OVERLAP_F_B
    assert a.sub == (Action(0, Kind.F, 7), Action(7, Kind.B, 3))
    assert str(a) == "(0F7;7B3)OVERLAP_F_B"
    assert a.parts() == a.sub
    assert a.is_compute


def test_legacy_naming_maps_b_to_input_grad_and_bw_to_full():
    assert parse_action("1B3", "legacy") == Action(1, Kind.I, 3)
    assert parse_action("1BW3", "legacy") == Action(1, Kind.B, 3)
    assert parse_action("1W3", "legacy") == Action(1, Kind.W, 3)
    from ppfast.program.ir import format_action

    assert format_action(Action(1, Kind.I, 3), "legacy") == "1B3"
    assert format_action(Action(1, Kind.B, 3), "legacy") == "1BW3"


@pytest.mark.parametrize(
    "bad", ["", "F0", "2X0", "2F", "(0F1)OVERLAP_F_B", "(0F1;1F2", "2F0x", "1BW3"]
)
def test_bad_action_text_says_what_to_write(bad):
    with pytest.raises(ValueError, match="action"):
        parse_action(bad)


def test_placements():
    assert loop_placement(2, 2) == (0, 1, 0, 1)
    assert v_placement(3) == (0, 1, 2, 2, 1, 0)


def test_program_text_round_trip_and_properties():
    text = "rank 0: 0F0 2F0 2B0 0B0\nrank 1: 1F0 3F0 3B0 1B0"
    prog = Program.from_text(text)
    assert prog.to_text() == text
    assert prog.stage_to_rank == (0, 1, 0, 1)
    assert (prog.p, prog.v, prog.num_stages, prog.num_microbatches) == (2, 2, 4, 1)
    assert prog.stages_of(1) == [1, 3]
    assert not prog.is_lowered
    low = Program.from_text("rank 0: 0F0 0SEND_F0 0RECV_B0 0B0\nrank 1: 1RECV_F0 1F0 1B0 1SEND_B0")
    assert low.is_lowered
    assert low.compute_only().to_text() == "rank 0: 0F0 0B0\nrank 1: 1F0 1B0"


def test_placement_inference_rejects_a_stage_on_two_ranks_and_gaps():
    with pytest.raises(ValueError, match="stage 0 has compute actions on rank 0 and rank 1"):
        infer_placement([[parse_action("0F0")], [parse_action("0B0")]])
    with pytest.raises(ValueError, match=r"stages \[1\] have no compute actions"):
        infer_placement([[parse_action("0F0"), parse_action("2F0")]])


def test_program_rejects_placement_outside_its_ranks():
    with pytest.raises(ValueError, match="stage 1 is placed on rank 3"):
        Program([[], []], (0, 3), 1)
