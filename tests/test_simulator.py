"""Simulated timing and memory of hand-written programs."""

import pytest

from ppfast.program.ir import Program
from ppfast.program.simulator import Costs, simulate
from ppfast.program.validate import ProgramError

ONE_F_ONE_B_2x2 = "rank 0: 0F0 0F1 0B0 0B1\nrank 1: 1F0 1B0 1F1 1B1"


def test_unit_costs_give_the_textbook_1f1b_step():
    sim = simulate(Program.from_text(ONE_F_ONE_B_2x2))
    # B = I + W = 2; fill and drain of one pass each: (m + p - 1) * 3
    assert sim.makespan == 9
    assert sim.busy == [6, 6]
    assert sim.bubble == pytest.approx(1 / 3)
    assert sim.bubble_per_rank == pytest.approx([1 / 3, 1 / 3])
    assert sim.peak_activations == [2, 1]
    assert sim.start[1] == [1, 2, 4, 5]


def test_comm_cost_delays_only_cross_rank_hand_offs():
    sim = simulate(Program.from_text(ONE_F_ONE_B_2x2), Costs(comm=0.5))
    # rank 1 sees F0 at 1.5 and its gradient leaves at 4.5, so rank 0 starts B0 at 5, not 4
    assert sim.start[1][0] == 1.5
    assert sim.start[0][2] == 5.0
    assert sim.makespan == 10


def test_split_backward_memory_keeps_what_w_needs():
    prog = Program.from_text("rank 0: 0F0 0F1 0I0 0I1 0W0 0W1")
    sim = simulate(prog, w_keep=0.25)
    assert sim.peak_activations == [2.0]
    assert sim.makespan == 6
    sim = simulate(Program.from_text("rank 0: 0F0 0I0 0F1 0W0 0I1 0W1"), w_keep=0.25)
    assert sim.peak_activations == [1.25]


def test_chunked_stages_cost_and_hold_a_share_of_a_pass():
    # v = 2: each stage is half of a rank's model share
    prog = Program.from_text("rank 0: 0F0 1F0 1B0 0B0")
    sim = simulate(prog, Costs(f=2, i=2, w=2))
    assert sim.makespan == 6
    assert sim.peak_activations == [1.0]  # two half-stage F's make one microbatch's worth
    prog2 = Program.from_text("rank 0: 0F0 2F0 2B0 0B0\nrank 1: 1F0 3F0 3B0 1B0")
    sim2 = simulate(prog2)
    assert sim2.peak_activations == [1.0, 1.0]
    assert sim2.end[0][0] == 0.5


def test_compound_action_takes_the_sum_of_its_parts():
    prog = Program.from_text("rank 0: 0F0 0F1 (0F2;0B0)OVERLAP_F_B 0B1 0B2")
    sim = simulate(prog)
    assert sim.start[0][2] == 2 and sim.end[0][2] == 5
    assert sim.makespan == 9


def test_per_stage_costs_and_their_errors():
    prog = Program.from_text(ONE_F_ONE_B_2x2)
    sim = simulate(prog, Costs(per_stage=((1, 1, 1), (2, 2, 2))))
    assert sim.busy == [6, 12]
    with pytest.raises(ValueError, match="per_stage gives costs for 1 stages"):
        simulate(prog, Costs(per_stage=((1, 1, 1),)))
    with pytest.raises(ValueError, match="non-negative"):
        Costs(f=-1)
    with pytest.raises(ValueError, match="F,I,W"):
        Costs.parse("1,2")
    assert Costs.parse("1,2,1,0.1") == Costs(1, 2, 1, 0.1)


def test_a_program_that_cannot_finish_is_an_error_naming_rank_and_action():
    # rank 0 wants the gradient of microbatch 1 before rank 1 can have run F1
    prog = Program.from_text("rank 0: 0F0 0B1 0F1 0B0\nrank 1: 1F0 1B0 1F1 1B1")
    with pytest.raises(ProgramError, match=r"rank 0, action 0B1 \(#1\)") as e:
        simulate(prog)
    assert e.value.rank == 0


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_zb_h2_has_no_idle_inside_any_rank_span_and_zb_h1_does(p):
    from ppfast.program.schedules import generate

    m = 2 * p
    h2 = simulate(generate("zb-h2", p, m))
    assert h2.span_bubble_per_rank() == pytest.approx([0.0] * p)
    h1 = simulate(generate("zb-h1", p, m))
    assert max(h1.span_bubble_per_rank()) > 0
    # the step bubble of both is the v = 1 floor: p - 1 passes of fill
    assert h2.makespan == h1.makespan == 3 * m + p - 1
