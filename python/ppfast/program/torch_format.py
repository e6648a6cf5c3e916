"""Programs to and from torch.distributed.pipelining's CSV and pipeline_order forms."""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Mapping, Sequence

from .ir import IGNORED_TORCH_KINDS, Action, Program, format_action, parse_action

_KIND_RE = re.compile(r"\d+(SEND_F|RECV_F|SEND_B|RECV_B|BW|F|I|W|B)\d*")


def detect_naming(cells: Sequence[str]) -> str:
    """'legacy' when the cells use torch's older naming (B = input grad, BW = full), else 'current'.

    A ``BW`` cell is only legacy; an ``I`` cell is only current. With neither, ``W`` beside ``B``
    means B is the input-gradient half, which is the legacy naming.
    """
    kinds = {k for c in cells for k in _KIND_RE.findall(c)}
    has_bw, has_i = "BW" in kinds, "I" in kinds
    if has_bw and has_i:
        raise ValueError("the program mixes I (current naming) and BW (legacy naming)")
    if has_bw:
        return "legacy"
    if has_i:
        return "current"
    return "legacy" if ("W" in kinds and "B" in kinds) else "current"


def _cells_to_program(
    rows: Sequence[Sequence[str]], naming: str, stage_to_rank: Sequence[int] | None, name: str
) -> Program:
    flat = [c for row in rows for c in row]
    if naming == "auto":
        naming = detect_naming(flat)
    ranks: list[list[Action]] = []
    for row in rows:
        acts = []
        for cell in row:
            cell = cell.strip()
            if not cell or cell == "None" or any(cell.endswith(k) for k in IGNORED_TORCH_KINDS):
                continue
            acts.append(parse_action(cell, naming))
        ranks.append(acts)
    program = Program.from_rows(ranks, stage_to_rank, name=name)
    program.meta["naming"] = naming
    return program


def read_csv(
    source: str | os.PathLike | io.TextIOBase,
    naming: str = "auto",
    stage_to_rank: Sequence[int] | None = None,
) -> Program:
    """Read torch's CSV (one row per rank; compute-only or with communication).

    ``naming`` is 'current', 'legacy' or 'auto'. Empty cells and FSDP bookkeeping actions
    (UNSHARD, RESHARD, REDUCE_GRAD) are skipped.
    """
    if naming not in ("auto", "current", "legacy"):
        raise ValueError(f"naming must be 'auto', 'current' or 'legacy', not {naming!r}")
    if isinstance(source, io.TextIOBase):
        rows = list(csv.reader(source))
        name = ""
    else:
        with open(source, newline="") as f:
            rows = list(csv.reader(f))
        name = os.path.basename(os.fspath(source))
    return _cells_to_program(rows, naming, stage_to_rank, name)


def write_csv(
    program: Program,
    dest: str | os.PathLike | io.TextIOBase,
    naming: str = "current",
    compute_only: bool = False,
) -> None:
    """Write torch's CSV: one row per rank, one action per cell."""
    if naming not in ("current", "legacy"):
        raise ValueError(f"naming must be 'current' or 'legacy', not {naming!r}")
    if naming == "legacy" and any(x.sub is not None for acts in program.ranks for x in acts):
        raise ValueError("torch's legacy naming has no OVERLAP_F_B; export with naming='current'")
    prog = program.compute_only() if compute_only else program

    def emit(f):
        w = csv.writer(f, lineterminator="\n")
        for acts in prog.ranks:
            w.writerow([format_action(a, naming) for a in acts])

    if isinstance(dest, io.TextIOBase):
        emit(dest)
    else:
        with open(dest, "w", newline="") as f:
            emit(f)


def from_pipeline_order(
    order: Mapping[int, Sequence[object | None]] | Sequence[Sequence[object | None]],
    naming: str = "auto",
    stage_to_rank: Sequence[int] | None = None,
    name: str = "",
) -> Program:
    """Convert torch's ``pipeline_order`` (rank -> list of ``_Action`` or None) to a Program.

    Only the text form of torch's actions is used, so this needs no torch import.
    """
    rows_src = [order[r] for r in sorted(order)] if isinstance(order, Mapping) else list(order)
    rows = [["" if a is None else str(a) for a in row] for row in rows_src]
    return _cells_to_program(rows, naming, stage_to_rank, name)
