"""What goes wrong in a program: ProgramError, and the engine's findings told as one."""

from __future__ import annotations

from . import engine as _engine
from .ir import Program, format_action


class ProgramError(ValueError):
    """A program that cannot run as written; ``rank`` and ``action`` say where."""

    def __init__(self, message: str, rank: int | None = None, action: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.action = action


def fail(rank: int, action: str, reason: str) -> ProgramError:
    return ProgramError(f"rank {rank}, action {action}: {reason}", rank, action)


_WAIT_TEXT = {
    _engine.WAIT_FORWARD_DONE: "it needs the forward {s}F{mb}",
    _engine.WAIT_GRAD_DONE: "it needs the input gradient from {s}I{mb}/{s}B{mb}",
    _engine.WAIT_RECV_F_POSTED: "its send waits for rank {peer} to post {s}RECV_F{mb}",
    _engine.WAIT_SEND_F_POSTED: "its receive waits for rank {peer} to post {s}SEND_F{mb}",
    _engine.WAIT_RECV_B_POSTED: "its send waits for rank {peer} to post {s}RECV_B{mb}",
    _engine.WAIT_SEND_B_POSTED: "its receive waits for rank {peer} to post {s}SEND_B{mb}",
    _engine.WAIT_RECV_F_DONE: "it needs {s}RECV_F{mb} first, which this rank posts later or never",
    _engine.WAIT_RECV_B_DONE: "it needs {s}RECV_B{mb} first, which this rank posts later or never",
}


def describe_stuck(program: Program, stuck: list, strict: bool) -> ProgramError:
    """Turn the engine's stuck ranks into an error about the rank where the hang starts.

    Waits are followed from peer to peer: the error names the rank that waits on itself (a
    receive it posts too late, an action it runs too late), or the first rank of a cycle, and
    says who is waiting on it.
    """
    by_rank = {w.rank: w for w in stuck}
    chain = [stuck[0]]
    while True:
        w = chain[-1]
        nxt = by_rank.get(w.peer)
        if nxt is None or w.peer == w.rank or nxt in chain:
            break
        chain.append(nxt)
    w = chain[-1]
    if w.peer in by_rank and by_rank[w.peer] in chain[:-1]:
        w = by_rank[w.peer]  # a cycle: start the story at the first rank on it
    label = lambda x: f"{format_action(program.ranks[x.rank][x.action])} (#{x.action})"  # noqa: E731
    what = _WAIT_TEXT[w.what].format(s=w.stage, mb=w.mb, peer=w.peer)
    if w.what in (_engine.WAIT_FORWARD_DONE, _engine.WAIT_GRAD_DONE):
        what += (
            ", which this rank runs only later or never"
            if w.peer == w.rank
            else f" on rank {w.peer}"
        )
    if w.peer != w.rank:
        other = by_rank.get(w.peer)
        if other is not None:
            what += f"; rank {w.peer} is itself stuck at {label(other)}"
        else:
            what += f"; rank {w.peer} finishes without it"
    waiting = sorted({x.rank for x in stuck} - {w.rank, w.peer})
    if waiting:
        what += f" (stuck as well: {', '.join(f'rank {x}' for x in waiting)})"
    mode = "dry run (blocking receives, rendezvous sends)" if strict else "dependency walk"
    return fail(w.rank, label(w), f"waits forever in the {mode}: {what}")


def engine_error(program: Program, res: dict) -> ProgramError:
    """The engine's own complaint (e.g. a send before its compute) as a ProgramError."""
    r, k = res["error_rank"], res["error_action"]
    action = f"{format_action(program.ranks[r][k])} (#{k})" if r >= 0 and k >= 0 else None
    return ProgramError(res["error"], r if r >= 0 else None, action)
