"""auto: never slower in simulation than any fixed schedule that fits the same memory cap."""

import pytest

from ppfast.program.schedules import SCHEDULES, generate
from ppfast.program.simulator import Costs, simulate
from ppfast.program.validate import validate

COSTS = {
    "equal": Costs(),
    "I-heavy 1:2:1": Costs(1, 2, 1),
    "F-heavy 2:1:1": Costs(2, 1, 1),
    "1:2:1 + comm 0.2": Costs(1, 2, 1, 0.2),
    "2:1:1 + comm 0.3": Costs(2, 1, 1, 0.3),
}


def _fixed(p, m):
    for name, spec in SCHEDULES.items():
        if spec.options or m < spec.min_m(p):
            continue
        yield generate(name, p, m, 2 if spec.v_free else None)


@pytest.mark.parametrize("costs_name", list(COSTS))
@pytest.mark.parametrize(("p", "m"), [(2, 4), (4, 8), (4, 13), (8, 16)])
def test_auto_beats_or_ties_every_fixed_schedule_under_its_cap(costs_name, p, m, capsys):
    costs = COSTS[costs_name]
    for cap in (p, 1.5 * p, 2 * p - 1):
        prog = generate("auto", p, m, costs=costs, mem_cap=cap)
        validate(prog)
        sim = simulate(prog, costs)
        assert max(sim.peak_activations) <= cap + 1e-9
        assert sim.makespan == pytest.approx(prog.meta["makespan"])
        margins = []
        for fixed in _fixed(p, m):
            fs = simulate(fixed, costs)
            if max(fs.peak_activations) > cap + 1e-9:
                continue
            assert sim.makespan <= fs.makespan + 1e-9, (fixed.name, cap)
            margins.append((fs.makespan - sim.makespan, fixed.name))
        assert margins, "some fixed schedule fits every cap tested"
        gain, name = min(margins)
        with capsys.disabled():
            print(
                f"\n  auto {costs_name:18s} p={p} m={m:2d} cap={cap:4g}: step {sim.makespan:7.2f} "
                f"({prog.meta['chosen']}); best fixed {name} is {gain:+.2f} slower"
            )


def test_auto_is_strictly_faster_where_costs_are_skewed():
    # with I twice F and a cap of 1.5p, no hand-made shape fits; the greedy V beats them all
    costs = Costs(1, 2, 1)
    prog = generate("auto", 4, 8, costs=costs, mem_cap=6)
    fixed = [simulate(f, costs) for f in _fixed(4, 8)]
    best = min(s.makespan for s in fixed if max(s.peak_activations) <= 6)
    assert simulate(prog, costs).makespan < best - 1.0


def test_auto_defaults_to_1f1b_memory_and_rejects_impossible_caps():
    prog = generate("auto", 4, 8)
    assert prog.meta["mem_cap"] == 4
    assert max(simulate(prog).peak_activations) <= 4
    with pytest.raises(ValueError, match="below one microbatch"):
        generate("auto", 4, 8, mem_cap=0.5)
    with pytest.raises(ValueError, match="per-pass costs"):
        generate("auto", 2, 4, costs=Costs(per_stage=((1, 1, 1), (1, 1, 1))))


def test_a_small_cap_still_gives_a_runnable_schedule():
    prog = generate("auto", 4, 8, mem_cap=1)
    validate(prog)
    assert max(simulate(prog).peak_activations) <= 1
