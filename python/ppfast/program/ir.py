"""The pipeline IR: actions, per-rank programs and stage placements."""

from __future__ import annotations

import gc
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple


class Kind(StrEnum):
    """What an action does; the value is its text form (torch.distributed.pipelining's)."""

    F = "F"
    I = "I"  # noqa: E741 - the IR's own name for input-gradient backward
    W = "W"
    B = "B"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"
    OVERLAP_F_B = "OVERLAP_F_B"


COMPUTE_KINDS = frozenset({Kind.F, Kind.I, Kind.W, Kind.B, Kind.OVERLAP_F_B})
COMM_KINDS = frozenset({Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B})
SEND_KINDS = frozenset({Kind.SEND_F, Kind.SEND_B})
RECV_KINDS = frozenset({Kind.RECV_F, Kind.RECV_B})

# torch's older naming (before input/weight split was named I/W): B meant the input-gradient
# half and BW the full backward. Only the compute kinds differ.
_LEGACY_TO_CURRENT = {"B": "I", "BW": "B"}
_CURRENT_TO_LEGACY = {"I": "B", "B": "BW"}

_KIND_NAMES = "SEND_F|RECV_F|SEND_B|RECV_B|BW|F|I|W|B"
_SIMPLE_RE = re.compile(rf"^(\d+)({_KIND_NAMES})(\d*)$")
# FSDP bookkeeping actions torch puts in its programs; they carry no pipeline dependency.
IGNORED_TORCH_KINDS = ("UNSHARD", "RESHARD", "REDUCE_GRAD")

# The most stages and microbatches a program may have: the executor packs each into 20 bits of
# a message key (csrc/program/engine.h, kMaxStages and kMaxMicrobatches; ppfast._C has both).
MAX_STAGES = MAX_MICROBATCHES = (1 << 20) - 1


class Action(NamedTuple):
    """One step of a rank's program: ``(stage, kind, microbatch)``, text form ``2F0``.

    A compound action (``kind`` OVERLAP_F_B) runs its ``sub`` actions together; its text form
    is ``(0F7;7B3)OVERLAP_F_B`` and its own stage and microbatch are -1.
    """

    stage: int
    kind: Kind
    mb: int
    sub: tuple[Action, ...] | None = None

    def __str__(self) -> str:
        return format_action(self)

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS

    @property
    def is_comm(self) -> bool:
        return self.kind in COMM_KINDS

    def parts(self) -> tuple[Action, ...]:
        """The simple actions this action performs (itself, or its sub-actions)."""
        return self.sub if self.sub is not None else (self,)

    @classmethod
    def parse(cls, text: str, naming: str = "current") -> Action:
        return parse_action(text, naming)


def format_action(action: Action, naming: str = "current") -> str:
    if action.sub is not None:
        inner = ";".join(format_action(a, naming) for a in action.sub)
        return f"({inner}){action.kind.value}"
    kind = action.kind.value
    if naming == "legacy":
        kind = _CURRENT_TO_LEGACY.get(kind, kind)
    return f"{action.stage}{kind}{action.mb}"


def parse_action(text: str, naming: str = "current") -> Action:
    """Parse ``2F0`` / ``3SEND_F1`` / ``(0F7;7B3)OVERLAP_F_B``; ``naming`` is current or legacy."""
    if naming not in ("current", "legacy"):
        raise ValueError(f"naming must be 'current' or 'legacy', not {naming!r}")
    s = text.strip()
    if s.startswith("("):
        close = s.find(")")
        if close < 0 or s[close + 1 :] != Kind.OVERLAP_F_B.value:
            raise ValueError(
                f"cannot parse action {text!r}: a compound action is written '(0F7;7B3)OVERLAP_F_B'"
            )
        subs = tuple(parse_action(x, naming) for x in s[1:close].split(";") if x.strip())
        if len(subs) < 2 or any(a.kind not in COMPUTE_KINDS or a.sub for a in subs):
            raise ValueError(
                f"cannot parse action {text!r}: OVERLAP_F_B needs two or more simple "
                "compute actions"
            )
        return Action(-1, Kind.OVERLAP_F_B, -1, subs)
    m = _SIMPLE_RE.match(s)
    if m is None:
        raise ValueError(
            f"cannot parse action {text!r}: write [stage][kind][microbatch], e.g. 2F0, 1I3, "
            "0W1, 3SEND_F1, 2RECV_B4"
        )
    stage, kind, mb = m.groups()
    if naming == "legacy":
        kind = _LEGACY_TO_CURRENT.get(kind, kind)
    elif kind == "BW":
        raise ValueError(f"action {text!r} uses torch's legacy naming (BW); pass naming='legacy'")
    if mb == "":
        raise ValueError(f"action {text!r} has no microbatch index")
    if len(stage) > 7 or len(mb) > 7 or int(stage) > MAX_STAGES or int(mb) > MAX_MICROBATCHES:
        raise ValueError(
            f"action {text!r}: stages and microbatches of a program are below {MAX_STAGES + 1}"
        )
    return Action(int(stage), Kind(kind), int(mb))


def loop_placement(p: int, v: int = 1) -> tuple[int, ...]:
    """Stage s on rank s mod p (GPipe, 1F1B, interleaved)."""
    return tuple(s % p for s in range(p * v))


def v_placement(p: int) -> tuple[int, ...]:
    """Rank r holds stages r and 2p-1-r (ZB-V, DualPipeV)."""
    return tuple(s if s < p else 2 * p - 1 - s for s in range(2 * p))


@dataclass
class Program:
    """Each rank's ordered actions plus where every stage lives.

    ``ranks[r]`` is rank r's action list. ``stage_to_rank[s]`` is the rank that runs stage s.
    A program is *lowered* once it holds SEND/RECV actions.
    """

    ranks: list[list[Action]]
    stage_to_rank: tuple[int, ...]
    num_microbatches: int
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stage_to_rank = tuple(self.stage_to_rank)
        p = len(self.ranks)
        if p == 0:
            raise ValueError("a program needs at least one rank")
        if len(self.stage_to_rank) > MAX_STAGES or self.num_microbatches > MAX_MICROBATCHES:
            raise ValueError(
                f"{len(self.stage_to_rank)} stages and {self.num_microbatches} microbatches: a "
                f"program has at most {MAX_STAGES} of each"
            )
        for s, r in enumerate(self.stage_to_rank):
            if not 0 <= r < p:
                raise ValueError(f"stage {s} is placed on rank {r}, but the program has {p} ranks")

    @property
    def p(self) -> int:
        return len(self.ranks)

    @property
    def num_stages(self) -> int:
        return len(self.stage_to_rank)

    @property
    def v(self) -> int:
        """Stages per rank (at least 1: a program may leave ranks without a stage)."""
        return max(1, self.num_stages // self.p)

    def stages_of(self, rank: int) -> list[int]:
        return [s for s, r in enumerate(self.stage_to_rank) if r == rank]

    @property
    def is_lowered(self) -> bool:
        return any(a.kind in COMM_KINDS for acts in self.ranks for a in acts)

    def compute_only(self) -> Program:
        """The same program without its communication actions."""
        return Program(
            [[a for a in acts if a.kind not in COMM_KINDS] for acts in self.ranks],
            self.stage_to_rank,
            self.num_microbatches,
            self.name,
            dict(self.meta),
        )

    def forward_only(self) -> Program:
        """The program's forwards alone, in its order, for evaluation: compound actions keep
        their F, and communication is dropped (lowering adds the forward transfers again)."""
        ranks = [
            [x for a in acts if a.is_compute for x in a.parts() if x.kind is Kind.F]
            for acts in self.ranks
        ]
        name = f"{self.name} (forward only)" if self.name else "forward only"
        return Program(ranks, self.stage_to_rank, self.num_microbatches, name, dict(self.meta))

    def num_actions(self) -> int:
        return sum(len(a) for a in self.ranks)

    def to_text(self, naming: str = "current") -> str:
        return "\n".join(
            f"rank {r}: " + " ".join(format_action(a, naming) for a in acts)
            for r, acts in enumerate(self.ranks)
        )

    def __str__(self) -> str:
        return self.to_text()

    @classmethod
    def from_text(
        cls, text: str, stage_to_rank: Sequence[int] | None = None, naming: str = "current"
    ) -> Program:
        """Inverse of :meth:`to_text` (lines ``rank R: a b c``)."""
        rows = []
        for line in text.strip().splitlines():
            head, _, body = line.partition(":")
            if not head.strip().startswith("rank"):
                raise ValueError(f"expected 'rank R: actions...', got {line!r}")
            rows.append([parse_action(t, naming) for t in body.split()])
        return cls.from_rows(rows, stage_to_rank)

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[Iterable[Action]],
        stage_to_rank: Sequence[int] | None = None,
        num_microbatches: int | None = None,
        name: str = "",
    ) -> Program:
        """Build a program from per-rank action lists, inferring placement and m if absent."""
        ranks = [list(r) for r in rows]
        if stage_to_rank is None:
            stage_to_rank = infer_placement(ranks)
        if num_microbatches is None:
            mbs = [x.mb for acts in ranks for a in acts for x in a.parts()]
            num_microbatches = max(mbs) + 1 if mbs else 0
        return cls(ranks, tuple(stage_to_rank), num_microbatches, name)


def infer_placement(ranks: Sequence[Sequence[Action]]) -> tuple[int, ...]:
    """Where each stage runs, read from the compute actions; every stage on exactly one rank."""
    where: dict[int, int] = {}
    for r, acts in enumerate(ranks):
        for a in acts:
            for x in a.parts():
                if x.kind not in COMPUTE_KINDS:
                    continue
                if x.stage < 0:
                    raise ValueError(f"rank {r}: action {x} has a negative stage")
                prev = where.setdefault(x.stage, r)
                if prev != r:
                    raise ValueError(
                        f"stage {x.stage} has compute actions on rank {prev} and rank {r}; "
                        "a stage must live on one rank"
                    )
    if not where:
        raise ValueError("the program has no compute actions, so its stages cannot be placed")
    n = max(where) + 1
    if n > MAX_STAGES:
        raise ValueError(
            f"stage {n - 1} is past the {MAX_STAGES} stages a program may have; is a stage "
            "number corrupted?"
        )
    if len(where) < n:
        missing = [s for s in range(n) if s not in where]
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(
            f"stages {missing[:8]}{more} have no compute actions; every stage needs its F"
        )
    return tuple(where[s] for s in range(n))


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many actions at once.

    Actions are tuples; building hundreds of thousands of them triggers collections that walk
    the whole heap again and again (4-5x the build time at p = 64, m = 512). None of them can
    form a cycle, so nothing is lost by collecting once afterwards instead.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
