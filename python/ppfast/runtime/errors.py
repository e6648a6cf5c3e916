"""Errors the runtime raises when a peer fails or a wait times out."""

from __future__ import annotations


class PipelineCommError(RuntimeError):
    """A send or receive failed or timed out.

    ``rank`` is the rank that raised, ``action`` the action it was running (e.g. ``"1F3 (#12)"``),
    ``peer`` the rank it was waiting on (-1 when none), ``timed_out`` whether the wait expired
    rather than the peer failing.
    """

    def __init__(self, message: str, rank: int, action: str, peer: int, timed_out: bool):
        super().__init__(message)
        self.rank = rank
        self.action = action
        self.peer = peer
        self.timed_out = timed_out

    def __reduce__(self):
        return (type(self), (str(self), self.rank, self.action, self.peer, self.timed_out))


def is_timeout(error: BaseException) -> bool:
    """Did a c10d wait fail because its time ran out, not because its peer failed?

    Backends say so only in the text: gloo's "Timed out waiting ... for recv", NCCL's watchdog
    "... collective operation timeout" and the store's "timed out".
    """
    text = str(error).lower()
    return "timed out" in text or "timeout" in text
