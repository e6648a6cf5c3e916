"""Bad bytes at every boundary where ppfast reads what it did not write: random and mutated
programs into the native engine and the executor, mutated shape headers into the executor's
decoder, corrupted CSV through ``ppfast validate`` and garbage through the action parser.

Every case must end in acceptance or a clean ValueError (for the CLI: exit status 0, 1 or 2
and a one-line message), never a crash, a hang or another exception. The C++ side of the same
inputs runs under AddressSanitizer and UBSan in ctest (csrc/fuzz/fuzz_core.cpp). Seeds are fixed,
so a failure reproduces; PPFAST_FUZZ_SEED picks another.
"""

from __future__ import annotations

import contextlib
import io
import os
import random

import pytest
import torch

import ppfast
from ppfast._native import C
from ppfast.program.engine import encode, encode_rank
from ppfast.program.ir import format_action, parse_action
from ppfast.program.lowering import lower
from ppfast.program.torch_format import write_csv
from ppfast.tools.cli import main as cli

SEED = int(os.environ.get("PPFAST_FUZZ_SEED", "1"))
INT32 = (-(2**31), 2**31 - 1)
SCHEDULES = [
    ("gpipe", 2, 3),
    ("1f1b", 3, 4),
    ("interleaved-1f1b", 2, 4),
    ("zb-h1", 3, 4),
    ("zb-v", 2, 4),
    ("dualpipev", 2, 4),
    ("interleaved-zb", 2, 4),
]


def bases() -> list[ppfast.Program]:
    out = []
    for name, p, m in SCHEDULES:
        prog = ppfast.generate(name, p, m)
        out += [prog, lower(prog)]
    return out


def odd(rng: random.Random, top: int) -> int:
    """A value a corrupted field might hold: in range, at an edge, or far out (int32)."""
    top = min(max(top, 0), 1000)
    return rng.choice(
        [-1, 0, top, top + 1, INT32[0], INT32[1], rng.randint(-3, 300), rng.randint(0, top)]
    )


def mutate(rng: random.Random, stage_to_rank: list[int], m: int, ranks: list[list[int]]):
    """One to three random edits of an encoded program (flat [kind, stage, mb, action] rows)."""
    s2r, rows = list(stage_to_rank), [list(r) for r in ranks]
    for _ in range(rng.randint(1, 3)):
        row = rows[rng.randrange(len(rows))] if rows else []
        n = len(row) // 4
        i = rng.randrange(n) * 4 if n else 0
        what = rng.randrange(11)
        if what < 4 and n:  # one field: kind, stage, mb or action index
            top = (7, len(s2r) - 1, m - 1, n)[what]
            row[i + what] = odd(rng, top)
        elif what == 4 and n:
            del row[i : i + 4]
        elif what == 5 and n:
            row[i:i] = row[i : i + 4]
        elif what == 6 and n > 1:
            j = rng.randrange(n) * 4
            row[i : i + 4], row[j : j + 4] = row[j : j + 4], row[i : i + 4]
        elif what == 7:
            m = odd(rng, m)
        elif what == 8 and s2r:
            s2r[rng.randrange(len(s2r))] = odd(rng, len(rows))
        elif what == 9:
            if rows and rng.random() < 0.5:
                rows.pop()
            else:
                rows.append([])
        elif n:
            del row[rng.randrange(n) * 4 :]
    return s2r, m, rows


class NoCompute:
    """The executor's compute, never called: these programs are only constructed."""

    def forward(self, stage, mb, inputs):
        raise AssertionError("a fuzzed program ran")

    backward = weight = forward


def test_programs_into_the_engine_and_the_executor():
    rng = random.Random(SEED)
    programs = [(list(p.stage_to_rank), p.num_microbatches, encode(p)) for p in bases()]
    cases = faults = taken = 0
    for k in range(10_000):
        s2r, m, rows = programs[k % len(programs)]
        if rng.random() < 0.9:
            s2r, m, rows = mutate(rng, s2r, m, rows)
        cases += 1
        fault = C.check_structure(s2r, m, rows)
        order = C.check_structure(s2r, m, rows, pair_order=True)
        strict = C.run_program(s2r, m, rows, True, [], 0.0, [], 0.5)
        C.run_program(s2r, m, rows, False, [1.0] * (4 * len(s2r)), 0.1, [], 0.5)
        timing = C.lower_program(s2r, m, rows, [])[3]
        for f in (fault, order):
            assert f is None or (len(f) == 4 and f[3]), f
        faults += fault is not None
        # the walks end with a verdict: finished, an error, or the ranks left waiting
        for res in (strict, timing):
            assert res["finished"] or res["error"] or res["stuck"] or not any(rows), res
        # the executor takes one rank's row and must check it alone, with no peer to ask
        for rank, row in enumerate(rows[:2]):
            last = row[-1] if row else -1
            names = [f"a{i}" for i in range(last + 1 if 0 <= last < 10_000 else rng.randrange(9))]
            transport = C.InProcessTransport(C.Hub(max(1, len(rows))), min(rank, len(rows) - 1))
            try:
                C.Executor(rank, s2r, m, row, names, transport, NoCompute(), 1000, False)
            except ValueError as e:
                assert str(e).startswith(f"rank {rank}: cannot run this program: "), e
                # a row the engine found nothing wrong with runs (ranks that hold no stage
                # may not exist on this transport)
                assert fault is not None or not row, (e, s2r, m, row)
            else:
                taken += 1
    assert cases >= 10_000 and 0 < faults < cases and taken > 0, (cases, faults, taken)


@pytest.mark.parametrize(
    "case, words",
    [
        # (stage_to_rank, num_mb, rows) -> what the refusal says
        (([0, 5], 2, [[0, 0, 0, 0], [0, 1, 0, 0]]), "not one of the program's 2 ranks"),
        (([0, 1], 0, [[0, 0, 0, 0], []]), "1 to 1048575 microbatches"),
        (([0, 1], 2**20, [[0, 0, 0, 0], []]), "1 to 1048575 microbatches"),
        (([0], 2, [[0, 0, 0, 1]]), "count up from 0"),
        (([0], 2, [[0, 0, 0, 0, 9, 0, 1, 1]]), "its kind is none of"),
        (([0], 2, [[0, 0, 0, 0, 4, 0, 1, 0]]), "compute parts only"),
        (([0] * 3000, 3000, [[0, 0, 0, 0]]), "pairs a program may hold"),
    ],
)
def test_the_engine_says_what_is_wrong(case, words):
    s2r, m, rows = case
    fault = C.check_structure(s2r, m, rows)
    assert fault is not None and words in fault[3], fault
    res = C.run_program(s2r, m, rows, True, [], 0.0, [], 0.5)
    assert words in res["error"], res["error"]


def executor(rank: int, s2r, m: int, rows, names=None, size: int = 2):
    row = rows[rank]
    names = names if names is not None else [f"a{i}" for i in range(row[-1] + 1 if row else 0)]
    transport = C.InProcessTransport(C.Hub(size), rank)
    return C.Executor(rank, s2r, m, row, names, transport, NoCompute(), 1000, False)


@pytest.mark.parametrize(
    "rows, rank, words",
    [
        ([[0, 1, 0, 0]], 0, "stage 1 is placed on rank 1"),
        # RECV_F of stage 0: there is no stage -1 to send it
        ([[5, 0, 0, 0]], 0, "stage -1 does not exist"),
        ([[0, 0, 0, 0, 0, 0, 0, 1]], 0, "appears twice"),
        ([[0, 0, 0, 0]], 5, "not one of the transport's 2"),
        ([[0, 0, 2**20 - 1, 0]], 0, "microbatch in [0, 2)"),
    ],
)
def test_the_executor_checks_its_row(rows, rank, words):
    rows = rows + [[]] * (2 - len(rows))
    with pytest.raises(ValueError, match="cannot run this program") as e:
        executor(rank, [0, 1], 2, rows if rank < 2 else rows + [[0, 0, 0, 0]] * 4)
    assert words in str(e.value), e.value


def test_the_executor_wants_one_name_per_action():
    with pytest.raises(ValueError, match="1 names for 2 actions"):
        executor(0, [0, 1], 2, [[0, 0, 0, 0, 0, 0, 1, 1], []], names=["a0"])


def test_a_program_beyond_the_message_keys_is_refused():
    # 20 bits each for stage and microbatch in the executor's message keys
    with pytest.raises(ValueError, match="microbatches"):
        executor(0, [0, 1], 2**20, [[0, 0, 0, 0], []])


# ---------------------------------------------------------------------------- shape headers


def headers(rng: random.Random) -> list[torch.Tensor]:
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.uint8]
    out = []
    for _ in range(64):
        shapes = [[rng.randint(0, 5) for _ in range(rng.randint(0, 8))] for _ in range(16)]
        tensors = [torch.empty(s, dtype=rng.choice(dtypes)) for s in shapes[: rng.randint(0, 16)]]
        out.append(C.encode_meta(tensors, rng.randint(0, 1)))
    return out


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_shape_headers_into_the_decoder():
    rng = random.Random(SEED)
    good = headers(rng)
    accepted = 0
    for k in range(10_000):
        h = good[k % len(good)].clone()
        for _ in range(rng.randint(0, 3)):
            i = rng.randrange(h.numel())
            w = h[i].item()
            edits = [-w - 1, w ^ (1 << rng.randrange(63)), 2**63 - 1, rng.randint(-2, 60)]
            h[i] = rng.choice(edits + [rng.getrandbits(63)])
        if rng.random() < 0.5:  # as a sender that wrote these words would have sealed them
            C.seal_meta(h)
        if rng.random() < 0.05:
            h = h[: rng.randrange(h.numel())]
        if rng.random() < 0.02:
            h = h.to(rng.choice([torch.int32, torch.float64]))
        try:
            got, flags = C.decode_meta(h)
        except ValueError:
            continue
        accepted += 1
        # what the decoder took is exactly what an encoder would send
        tensors = [torch.empty(s, dtype=dtype, device="meta") for dtype, s in got]
        again = C.encode_meta(tensors, flags)
        assert torch.equal(again, h), (got, h)
    assert 0 < accepted < 10_000


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda h: h.__setitem__(0, 12345), "mark"),
        (lambda h: h.__setitem__(1, 17), "at most 16"),
        (lambda h: h.__setitem__(1, 1 | 2 << 32), "holds flags 2"),
        (lambda h: h.__setitem__(2, 999), "dtype code 999"),
        (lambda h: h.__setitem__(3, 9), "9 dimensions"),
        (lambda h: h.__setitem__(4, -2), "dimension 0 has size -2"),
        (lambda h: h.__setitem__(4, 2**40), "more than 70368744177664 bytes"),
        (lambda h: h.__setitem__(h.numel() - 2, 1), "is not 0"),
    ],
)
def test_a_malformed_header_says_what_is_wrong(edit, words):
    h = C.encode_meta([torch.empty(3, 2**20, device="meta")])
    edit(h)
    C.seal_meta(h)
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        C.decode_meta(h)


def test_a_header_corrupted_in_transit_fails_its_check_word():
    h = C.encode_meta([torch.empty(3, 5)])
    h[4] = 6  # 3 x 6 is a shape as good as 3 x 5: only the check word tells
    with pytest.raises(ValueError, match="check word does not match"):
        C.decode_meta(h)


# ---------------------------------------------------------------------------- CSV and text


def csv_texts() -> list[str]:
    texts = []
    for name, p, m in SCHEDULES[:4]:
        prog = ppfast.generate(name, p, m)
        for x in (prog, lower(prog)):
            buf = io.StringIO()
            write_csv(x, buf)
            texts.append(buf.getvalue())
    return texts


JUNK = ["", "None", "0F", "F0", "-1F0", "0F-1", "99999999999F0", "0X0", "(0F0)OVERLAP_F_B",
        "(0F0;;)OVERLAP_F_B", "0SEND_F", "\x00", "é", "0F0,0F0", '"', "0RECV_B99",
        "1e9F0"]  # fmt: skip


def corrupt(rng: random.Random, text: str) -> str:
    lines = text.split("\n")
    what = rng.randrange(8)
    if what == 0:  # flip bytes
        chars = list(text)
        for _ in range(rng.randint(1, 4)):
            if chars:
                chars[rng.randrange(len(chars))] = chr(rng.randrange(1, 256))
        return "".join(chars)
    if what == 1:
        return text[: rng.randrange(len(text) + 1)]
    if what == 2 and lines:
        lines.pop(rng.randrange(len(lines)))
    elif what == 3 and lines:
        lines.insert(rng.randrange(len(lines)), rng.choice(lines))
    elif what == 4 and lines:  # a cell replaced by junk
        k = rng.randrange(len(lines))
        cells = lines[k].split(",")
        cells[rng.randrange(len(cells))] = rng.choice(JUNK)
        lines[k] = ",".join(cells)
    elif what == 5 and lines:  # two cells of a row swapped
        k = rng.randrange(len(lines))
        cells = lines[k].split(",")
        i, j = rng.randrange(len(cells)), rng.randrange(len(cells))
        cells[i], cells[j] = cells[j], cells[i]
        lines[k] = ",".join(cells)
    elif what == 6:  # numbers out of range
        return text.replace(str(rng.randrange(4)), str(rng.choice([99, 2**31, -1, 2**70])), 1)
    else:
        return "".join(chr(rng.randrange(0, 0x250)) for _ in range(rng.randrange(200)))
    return "\n".join(lines)


def test_corrupted_csv_through_ppfast_validate(tmp_path):
    rng = random.Random(SEED)
    texts = csv_texts()
    path = tmp_path / "program.csv"
    verdicts = {0: 0, 1: 0, 2: 0}
    for k in range(600):
        text = corrupt(rng, texts[k % len(texts)])
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = cli(["validate", str(path)])
        assert code in verdicts, (code, text)
        verdicts[code] += 1
        if code:
            message = err.getvalue().strip()
            assert message and "Traceback" not in message, (text, message)
    assert verdicts[1] > 0 and verdicts[0] > 0, verdicts


def test_the_limits_agree_with_the_engine():
    from ppfast.program.ir import MAX_MICROBATCHES, MAX_STAGES

    assert (MAX_STAGES, MAX_MICROBATCHES) == (C.MAX_STAGES, C.MAX_MICROBATCHES)


def test_garbage_into_the_action_parser():
    rng = random.Random(SEED)
    alphabet = "0123456789FIWBSENDRCV_()OVERLAP;- é\x00"
    valid = [format_action(a) for p in bases() for acts in p.ranks for a in acts]
    for k in range(5_000):
        if k % 2:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(16)))
        else:
            text = list(valid[k % len(valid)])
            text[rng.randrange(len(text))] = rng.choice(alphabet)
            text = "".join(text)
        try:
            action = parse_action(text)
        except ValueError:
            continue
        # what it took must say the same when written back and encode for the engine
        assert parse_action(format_action(action)) == action
        encode_rank([action])
