"""Rejects programs that would fail or hang, naming the first rank, action and reason."""

from __future__ import annotations

from . import engine as _engine
from .faults import ProgramError, describe_stuck, engine_error, fail
from .ir import Program
from .lowering import lower_encoded


def check_structure(program: Program, encoded: list[list[int]] | None = None) -> None:
    """Every (stage, mb) has one F and one B or one I then one W, in order on its rank (or,
    in a forward-only program, no backward action at all); every
    action sits on the rank of its stage; and (when lowered) every cross-rank hand-off has its
    send and its receive, once each. Raises ProgramError on the first fault."""
    fault = _engine.check_structure(program, encoded)
    if fault is not None:
        rank, _, label, reason = fault
        raise fail(rank, label, reason)


MATCHING = ("order", "tag")


def validate(program: Program, *, lower: bool = True, matching: str = "order") -> Program:
    """Check ``program`` before anything is sent; raise ProgramError naming rank, action, reason.

    A compute-only program is checked, then (with ``lower``) lowered and dry-run as well.
    ``matching`` is how the transport pairs a send with its receive: ``"order"`` (NCCL: the
    k-th message between two ranks meets the k-th receive; the default, which holds
    everywhere) also checks that every pair of ranks posts its messages in one order;
    ``"tag"`` (gloo, shared memory, in-process) does not need that. Returns the lowered program
    that passed the dry run (or ``program`` itself when it was already lowered, or when
    ``lower`` is False).
    """
    if matching not in MATCHING:
        raise ValueError(f"matching must be one of {MATCHING}, got {matching!r}")
    encoded = _engine.encode(program)
    check_structure(program, encoded)
    if not program.is_lowered:
        if not lower:
            res = _engine.run(program, strict=False, encoded=encoded)
            if res["error"]:
                raise engine_error(program, res)
            if not res["finished"]:
                raise describe_stuck(program, res["stuck"], strict=False)
            return program
        # lowering walks the compute-only program first and reports where it would hang
        program, encoded = lower_encoded(program, encoded=encoded)
        check_structure(program, encoded)
    if matching == "order":
        fault = _engine.check_structure(program, encoded, pair_order=True)
        if fault is not None:
            rank, _, label, reason = fault
            raise fail(rank, label, reason)
    dry_run(program, encoded)
    return program


def dry_run(program: Program, encoded: list[list[int]] | None = None) -> None:
    """Run a lowered program with blocking receives and rendezvous sends; raise if it hangs."""
    res = _engine.run(program, strict=True, encoded=encoded)
    if res["error"]:
        raise engine_error(program, res)
    if not res["finished"]:
        raise describe_stuck(program, res["stuck"], strict=True)


def is_valid(program: Program) -> bool:
    try:
        validate(program)
    except ProgramError:
        return False
    return True
