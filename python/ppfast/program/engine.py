"""Hands programs to the native engine (ppfast._C.run_program) and reads its answers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .._native import C
from .ir import Kind, Program, gc_paused

# Must match enum Kind in csrc/engine.h.
KIND_CODE = {
    Kind.F: 0,
    Kind.I: 1,
    Kind.W: 2,
    Kind.B: 3,
    Kind.SEND_F: 4,
    Kind.RECV_F: 5,
    Kind.SEND_B: 6,
    Kind.RECV_B: 7,
}
CODE_KIND = {v: k for k, v in KIND_CODE.items()}

# Must match enum WaitWhat in csrc/engine.h.
WAIT_FORWARD_DONE = 0
WAIT_GRAD_DONE = 1
WAIT_RECV_F_POSTED = 2
WAIT_SEND_F_POSTED = 3
WAIT_RECV_B_POSTED = 4
WAIT_SEND_B_POSTED = 5
WAIT_RECV_F_DONE = 6
WAIT_RECV_B_DONE = 7


@dataclass(frozen=True)
class Stuck:
    """A rank the engine left waiting forever: at ``action`` (index), for ``what`` of
    (``stage``, ``mb``) that ``peer`` would provide."""

    rank: int
    action: int
    part: int
    what: int
    stage: int
    mb: int
    peer: int


def encode(program: Program) -> list[list[int]]:
    """Per rank a flat [kind, stage, mb, action_index, ...] list (compound parts share an index)."""
    with gc_paused():
        return [encode_rank(acts) for acts in program.ranks]


def encode_rank(acts) -> list[int]:
    """One rank's actions as [kind, stage, mb, action_index, ...]."""
    kc = KIND_CODE
    flat: list[int] = []
    ext = flat.extend
    for idx, a in enumerate(acts):
        if a.sub is None:
            ext((kc[a.kind], a.stage, a.mb, idx))
        else:
            for x in a.sub:
                ext((kc[x.kind], x.stage, x.mb, idx))
    return flat


def run(
    program: Program,
    *,
    strict: bool,
    cost: Sequence[float] = (),
    comm: float = 0.0,
    act: Sequence[float] = (),
    w_keep: float = 0.5,
    encoded: list[list[int]] | None = None,
) -> dict:
    """Walk ``program`` in the native engine; see csrc/engine.h for the meaning of each field."""
    res = C.run_program(
        list(program.stage_to_rank),
        program.num_microbatches,
        encoded if encoded is not None else encode(program),
        strict,
        list(cost),
        float(comm),
        list(act),
        float(w_keep),
    )
    res["stuck"] = [Stuck(*t) for t in res["stuck"]]
    return res


def check_structure(
    program: Program, encoded: list[list[int]] | None = None, pair_order: bool = False
):
    """None, or the first fault as (rank, action index, label, reason); with ``pair_order``
    the fault is a pair of ranks whose messages would pair up wrongly without tags."""
    return C.check_structure(
        list(program.stage_to_rank),
        program.num_microbatches,
        encoded if encoded is not None else encode(program),
        pair_order,
    )


def lower(
    program: Program, cost: Sequence[float], encoded: list[list[int]] | None = None
) -> tuple[list[list[int]], list[list[int]], list[list[int]], dict]:
    """Native lowering: (encoded, sources, comms, timing); see csrc/bindings.cpp."""
    enc, src, comm, timing = C.lower_program(
        list(program.stage_to_rank),
        program.num_microbatches,
        encoded if encoded is not None else encode(program),
        list(cost),
    )
    timing["stuck"] = [Stuck(*t) for t in timing["stuck"]]
    return enc, src, comm, timing
