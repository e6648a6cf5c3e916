"""Validation names the first rank, action and reason; the fuzz corrupts valid programs."""

import random

import pytest

from ppfast.program.ir import Action, Kind, Program
from ppfast.program.lowering import lower
from ppfast.program.validate import ProgramError, check_structure, dry_run, is_valid, validate

GOOD = "rank 0: 0F0 0F1 0I0 0W0 0I1 0W1\nrank 1: 1F0 1I0 1F1 1I1 1W0 1W1"


def good():
    return Program.from_text(GOOD)


def with_rank(prog, r, text):
    rows = [list(a) for a in prog.ranks]
    rows[r] = [Action.parse(t) for t in text.split()]
    return Program(rows, prog.stage_to_rank, prog.num_microbatches)


@pytest.mark.parametrize(
    "rank0, match",
    [
        ("0F0 0I0 0W0 0I1 0W1", r"rank 0, action 0F1: missing"),
        ("0F0 0F1 0F1 0I0 0W0 0I1 0W1", r"rank 0, action 0F1 \(#2\): duplicate"),
        ("0F0 0F1 0I0 0W0 0I1", r"rank 0, action 0W1: missing: 0I1 \(#4\) has no W"),
        ("0F0 0F1 0I0 0W0 0W1 0I1", r"rank 0, action 0W1 \(#4\): runs before its I"),
        ("0F0 0I1 0F1 0I0 0W0 0W1", r"rank 0, action 0I1 \(#1\): runs before its forward"),
        ("0F0 0F1 0I0 0W0 0B1 0I1 0W1", r"runs both B and the split I/W"),
        ("0F0 0F1 0I0 0W0 0I1 0W1 0F2", r"rank 0, action 0F2 \(#6\): stage must be in"),
        ("0F0 0F1 0I0 0W0 0I1 0W1 1F1", r"stage 1 is placed on rank 1"),
    ],
)
def test_structural_faults(rank0, match):
    with pytest.raises(ProgramError, match=match) as e:
        validate(with_rank(good(), 0, rank0))
    assert e.value.rank == 0 and e.value.action


def test_missing_backward_names_the_rank_of_the_stage():
    prog = Program.from_text("rank 0: 0F0 0B0\nrank 1: 1F0")
    with pytest.raises(ProgramError, match=r"rank 1, action 1B0: missing") as e:
        validate(prog)
    assert e.value.rank == 1


def test_compute_only_deadlock_names_who_waits_for_what():
    # rank 0 runs I1 before F1, but I1 needs rank 1's gradient for microbatch 1, which needs F1
    prog = Program.from_text("rank 0: 0F0 0I0 0W0 0I1 0F1 0W1\nrank 1: 1F0 1I0 1F1 1I1 1W0 1W1")
    # the structure check already sees I1 before F1 on rank 0
    with pytest.raises(ProgramError, match=r"rank 0, action 0I1 \(#3\): runs before its forward"):
        validate(prog)
    # a cross-rank cycle passes the structure check and is caught by the walk
    # rank 0 wants B0 before F1; rank 1 wants F1 before B0
    prog = Program.from_text("rank 0: 0F0 0B0 0F1 0B1\nrank 1: 1F1 1B1 1F0 1B0")
    check_structure(prog)
    with pytest.raises(ProgramError) as e:
        validate(prog)
    msg = str(e.value)
    assert "rank 0, action 0B0 (#1): waits forever" in msg
    assert "input gradient from 1I0/1B0 on rank 1" in msg
    assert "rank 1 is itself stuck at 1F1 (#0)" in msg


def test_lowering_gives_a_program_that_passes_the_dry_run():
    lowered = validate(good())
    assert lowered.is_lowered
    assert lowered.to_text().splitlines()[0].startswith("rank 0: 0F0 0SEND_F0")
    assert lowered.compute_only().to_text() == GOOD
    dry_run(lowered)
    assert validate(lowered) is lowered


def lowered_good():
    return lower(good())


def test_send_without_receive():
    prog = lowered_good()
    rows = [list(a) for a in prog.ranks]
    rows[1] = [a for a in rows[1] if str(a) != "1RECV_F1"]
    with pytest.raises(
        ProgramError, match=r"rank 1, action 1RECV_F1: missing: rank 0 sends 0SEND_F1"
    ):
        validate(Program(rows, prog.stage_to_rank, prog.num_microbatches))


def test_receive_after_its_consumer_waits_forever():
    prog = lowered_good()
    rows = [list(a) for a in prog.ranks]
    r1 = rows[1]
    i = next(k for k, a in enumerate(r1) if str(a) == "1RECV_F1")
    recv = r1.pop(i)
    r1.append(recv)
    with pytest.raises(
        ProgramError, match=r"rank 1, action 1F1 \(#\d+\): waits forever .* needs 1RECV_F1 first"
    ):
        validate(Program(rows, prog.stage_to_rank, prog.num_microbatches))


def test_send_before_its_compute_is_rejected():
    prog = lowered_good()
    rows = [list(a) for a in prog.ranks]
    rows[0].insert(0, rows[0].pop(rows[0].index(Action(0, Kind.SEND_F, 0))))
    with pytest.raises(
        ProgramError, match=r"rank 0, action 0SEND_F0 \(#0\): sends the result of 0F0 before"
    ):
        validate(Program(rows, prog.stage_to_rank, prog.num_microbatches))


def test_rendezvous_pair_posted_apart_deadlocks_but_coalesced_does_not():
    # both ranks first send, then receive: with rendezvous sends in separate groups that hangs
    rows = [
        "0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1",
        "1RECV_F0 1F0 1B0 1SEND_B0 1RECV_F1 1F1 1B1 1SEND_B1",
    ]
    prog = Program.from_text("\n".join(f"rank {r}: {t}" for r, t in enumerate(rows)))
    dry_run(prog)
    hang = Program.from_text(
        "rank 0: 0F0 0F1 0SEND_F1 0SEND_F0 0RECV_B0 0B0 0RECV_B1 0B1\n"
        "rank 1: 1RECV_F0 1F0 1B0 1SEND_B0 1RECV_F1 1F1 1B1 1SEND_B1"
    )
    # rank 0's group {SEND_F1, SEND_F0} is posted together, so it still completes
    dry_run(hang)
    split = Program.from_text(
        "rank 0: 0F0 0F1 0SEND_F1 0B0 0SEND_F0 0RECV_B0 0RECV_B1 0B1\n"
        "rank 1: 1RECV_F0 1F0 1B0 1SEND_B0 1RECV_F1 1F1 1B1 1SEND_B1"
    )
    # (its rank 0 also sends out of order, which matching by order refuses first: the dry run
    # is what is checked here, as a transport matching by tag would run it)
    with pytest.raises(ProgramError, match=r"rank \d, action .*waits forever in the dry run"):
        validate(split, matching="tag")


# ----------------------------------------------------------------------------- fuzz


def _programs():
    from ppfast.program.schedules import generate

    out = []
    for name, p, m, v in [
        ("gpipe", 2, 3, None),
        ("1f1b", 3, 6, None),
        ("interleaved-1f1b", 2, 4, 2),
        ("zb-h1", 3, 5, None),
        ("zb-h2", 2, 4, None),
        ("zb-v", 3, 6, None),
        ("dualpipev", 2, 4, None),
    ]:
        prog = generate(name, p, m, v)
        out += [prog, lower(prog)]
    return out


def _deps_on_rank(acts):
    """(i, j) with j depending on i, both on this rank: F->I/B, I->W, producer->SEND,
    RECV->consumer."""
    pos = {}
    for k, a in enumerate(acts):
        for x in a.parts():
            pos[(x.kind, x.stage, x.mb)] = k
    pairs = []
    for (kind, s, mb), k in pos.items():
        needs = []
        if kind in (Kind.I, Kind.B):
            needs.append((Kind.F, s, mb))
            needs.append((Kind.RECV_B, s, mb))
        elif kind is Kind.W:
            needs.append((Kind.I, s, mb))
        elif kind is Kind.F:
            needs.append((Kind.RECV_F, s, mb))
        elif kind is Kind.SEND_F:
            needs.append((Kind.F, s, mb))
        elif kind is Kind.SEND_B:
            needs += [(Kind.I, s, mb), (Kind.B, s, mb)]
        for n in needs:
            if n in pos and pos[n] != k:
                pairs.append((pos[n], k))
    return pairs


def _corrupt(prog, rng):
    rows = [list(a) for a in prog.ranks]
    r = rng.randrange(prog.p)
    acts = rows[r]
    how = rng.choice(["drop", "duplicate", "reorder", "cut_send"])
    if how == "drop":
        acts.pop(rng.randrange(len(acts)))
    elif how == "duplicate":
        a = acts[rng.randrange(len(acts))]
        acts.insert(rng.randrange(len(acts) + 1), a)
    elif how == "reorder":
        pairs = _deps_on_rank(acts)
        i, j = rng.choice(pairs)
        # move the dependent action j to just before (or anywhere before) its dependency i
        a = acts.pop(j)
        acts.insert(rng.randint(0, i), a)
    else:
        sends = [k for k, a in enumerate(acts) if a.kind in (Kind.SEND_F, Kind.SEND_B)]
        if not sends:
            acts.pop(rng.randrange(len(acts)))
        else:
            acts.pop(rng.choice(sends))
    return Program(rows, prog.stage_to_rank, prog.num_microbatches), how


def test_fuzz_every_corruption_is_rejected_with_rank_and_action():
    rng = random.Random(1234)
    programs = _programs()
    for prog in programs:
        validate(prog)  # no valid program is rejected
    hows = {}
    for _ in range(3000):
        prog = programs[rng.randrange(len(programs))]
        bad, how = _corrupt(prog, rng)
        with pytest.raises(ProgramError) as e:
            validate(bad)
        assert isinstance(e.value.rank, int) and 0 <= e.value.rank < prog.p, (how, str(e.value))
        assert e.value.action, (how, str(e.value))
        hows[how] = hows.get(how, 0) + 1
    assert set(hows) == {"drop", "duplicate", "reorder", "cut_send"}
    assert not is_valid(bad)


def out_of_order():
    """GPipe on 2 ranks, lowered, with rank 0 sending microbatch 1's activation before
    microbatch 0's while rank 1 receives 0 first: sound where messages carry tags."""
    lowered = lower(Program.from_text("rank 0: 0F0 0F1 0B0 0B1\nrank 1: 1F0 1F1 1B0 1B1"))
    return with_rank(lowered, 0, "0F0 0F1 0SEND_F1 0SEND_F0 0RECV_B0 0B0 0RECV_B1 0B1")


def test_a_pair_posting_out_of_order_is_refused_where_matching_is_by_order():
    prog = out_of_order()
    check_structure(prog)
    dry_run(prog)  # every message has its peer and nothing waits forever
    assert validate(prog, matching="tag") is prog
    with pytest.raises(ProgramError, match=r"rank 1, action 1RECV_F0 \(#0\): receives") as e:
        validate(prog)  # matching="order" by default: NCCL would pair 1RECV_F0 with 0SEND_F1
    assert e.value.rank == 1
    assert "rank 0 sends the activation of stage 0 for microbatch 1" in str(e.value)
    with pytest.raises(ValueError, match="matching must be one of"):
        validate(prog, matching="tags")
