"""Lowers a compute-only program: inserts every SEND and RECV a rank needs.

Sends go right after the compute that produces their tensor. A receive goes in front of the
first action of its rank that starts (in a simulated step) no earlier than its tensor's producer
ends: everything before it started earlier, so it cannot depend on that tensor, and a rank
blocked on the receive waits only for work that needs nothing from what comes after it.
Comm ops between two compute actions are ordered by one global key (producer end time, then
stage, direction, microbatch), so two peers always post their shared messages in the same
order. The work is done natively (csrc/structure.cpp); this module rebuilds the actions.
"""

from __future__ import annotations

from . import engine as _engine
from .faults import describe_stuck, engine_error
from .ir import Action, Program, gc_paused
from .simulator import Costs

_MIN_COST = 1e-3


def lower(program: Program, costs: Costs | None = None) -> Program:
    """Return ``program`` with SEND/RECV actions inserted (unchanged if already lowered).

    ``costs`` only shapes where receives go (as early as the data can exist); any positive
    costs give a program that passes the dry run. Defaults to unit costs.
    """
    return lower_encoded(program, costs)[0]


def lower_encoded(
    program: Program, costs: Costs | None = None, encoded: list[list[int]] | None = None
) -> tuple[Program, list[list[int]] | None]:
    """:func:`lower`, also returning the lowered program's engine encoding (None when the
    program was already lowered), so that checks after lowering need not encode it again."""
    if program.is_lowered:
        return program, None

    # zero-length actions would tie with their producers and blur "started before"
    table = [max(c, _MIN_COST) for c in (costs or Costs()).table(program.num_stages, program.v)]
    encs, sources, comms, timing = _engine.lower(program, table, encoded)
    if timing["error"]:
        raise engine_error(program, timing)
    if not timing["finished"]:
        raise describe_stuck(program, timing["stuck"], strict=False)
    kinds = _engine.CODE_KIND
    make = tuple.__new__
    ranks = []
    with gc_paused():
        for acts, src, c in zip(program.ranks, sources, comms, strict=True):
            triples = zip(c[::3], c[1::3], c[2::3], strict=True)
            new = iter([make(Action, (s, kinds[k], mb, None)) for k, s, mb in triples])
            ranks.append([acts[x] if x >= 0 else next(new) for x in src])
    lowered = Program(ranks, program.stage_to_rank, program.num_microbatches, program.name)
    lowered.meta = dict(program.meta)
    return lowered, encs
