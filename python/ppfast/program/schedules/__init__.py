"""Pipeline schedule generators and their registry: a name and (p, m, v) make a Program.

Every generator is a pure function returning a compute-only Program (F, B, I, W and
OVERLAP_F_B actions; lowering adds the communication). ``SCHEDULES`` maps each canonical name
to a :class:`ScheduleSpec` saying how the schedule places stages, whether it splits the
backward into I and W, and what it needs of m and v. Names are matched without regard to
case, '-', '_' or a leading 'Schedule', so torch's class names (``Interleaved1F1B``,
``ScheduleZBVZeroBubble``, ...) work too.

A schedule that needs more than (p, m, v), such as one searched from measured costs, lists
the keyword options its builder takes in ``ScheduleSpec.options``; ``generate`` passes them
on (``generate("auto", p, m, costs=..., mem_cap=...)`` once such an entry is registered) and
refuses options a schedule does not take. The fixed schedules take none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..ir import Program, gc_paused, loop_placement, v_placement
from ._args import check_p
from .classic import gpipe, interleaved_1f1b, looped_bfs, one_f_one_b
from .dualpipe import dualpipe_v
from .zero_bubble import interleaved_zero_bubble, zb_h1, zb_h2, zb_v

__all__ = [
    "SCHEDULES",
    "ScheduleSpec",
    "dualpipe_v",
    "generate",
    "gpipe",
    "interleaved_1f1b",
    "interleaved_zero_bubble",
    "lookup",
    "looped_bfs",
    "one_f_one_b",
    "schedule_names",
    "zb_h1",
    "zb_h2",
    "zb_v",
]


@dataclass(frozen=True)
class ScheduleSpec:
    """What the registry knows about one schedule.

    ``build(p, m, v, **options)`` makes the Program. ``placement`` is "loop" (stage s on rank
    s mod p) or "v" (rank r holds stages r and 2p-1-r). ``default_v`` is the number of stages
    per rank used when v is not given; ``v_free`` says whether another v may be asked for.
    ``min_m(p)`` is the fewest microbatches the schedule accepts, explained by ``min_m_text``.
    ``options`` names the keyword options ``build`` takes beyond (p, m, v).
    """

    name: str
    build: Callable[..., Program]
    placement: str
    default_v: int
    v_free: bool
    split_backward: bool
    min_m: Callable[[int], int]
    min_m_text: str
    summary: str
    aliases: tuple[str, ...] = field(default=())
    options: tuple[str, ...] = field(default=())

    def resolve_v(self, v: int | None) -> int:
        if v is None:
            return self.default_v
        if self.v_free:
            return v
        if v != self.default_v:
            raise ValueError(
                f"{self.name} runs {self.default_v} stage(s) per rank, so v={v} has no meaning "
                f"here; leave v out, or pick {_v_alternative(self)}"
            )
        return v

    def layout(self, ranks: int, num_stages: int) -> tuple[int, tuple[int, ...] | None]:
        """Stages per rank, and the stage -> rank placement (None when the schedule searches
        its own), for ``num_stages`` stages on ``ranks`` ranks; a ValueError saying what to
        change when they do not fit this schedule."""
        v, extra = divmod(num_stages, ranks)
        if extra or not v:
            raise ValueError(
                f"{num_stages} stages do not fit a group of {ranks} ranks: {self.name} needs "
                "num_stages = ranks x stages per rank"
            )
        if not self.v_free and v != self.default_v:
            raise ValueError(
                f"{self.name} runs {self.default_v} stage(s) per rank, but {num_stages} stages "
                f"on {ranks} ranks is {v} per rank; use {self.default_v * ranks} stages"
            )
        if self.placement == "searched":
            return v, None
        return v, v_placement(ranks) if self.placement == "v" else loop_placement(ranks, v)


def _fixed(fn: Callable[[int, int], Program]) -> Callable[..., Program]:
    def build(p: int, m: int, v: int) -> Program:
        return fn(p, m)

    return build


def _with_v(fn: Callable[[int, int, int], Program]) -> Callable[..., Program]:
    def build(p: int, m: int, v: int) -> Program:
        return fn(p, m, v)

    return build


def _auto(p: int, m: int, v: int, **options: object) -> Program:
    # imported when called: auto times its candidates with the simulator
    from .auto import auto

    fixed = [spec for spec in SCHEDULES.values() if spec.name != "auto"]
    return auto(p, m, v, fixed=fixed, **options)


def _v_alternative(spec: ScheduleSpec) -> str:
    if spec.split_backward:
        return "'interleaved-zb' for several stages per rank"
    return "'interleaved-1f1b' for several stages per rank"


def _normalize(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "").replace(" ", "")
    return key.removeprefix("schedule") or key


_SPECS = (
    ScheduleSpec(
        "gpipe", _fixed(gpipe), "loop", 1, False, False, lambda p: 1, "1",
        "all forwards then all backwards; holds m microbatches", ("GPipe",),
    ),
    ScheduleSpec(
        "1f1b", _fixed(one_f_one_b), "loop", 1, False, False, lambda p: 1, "1",
        "one forward one backward; holds p microbatches", ("1F1B",),
    ),
    ScheduleSpec(
        "interleaved-1f1b", _with_v(interleaved_1f1b), "loop", 2, True, False, lambda p: p, "p",
        "Megatron's interleaved 1F1B, v stages per rank", ("Interleaved1F1B",),
    ),
    ScheduleSpec(
        "looped-bfs", _with_v(looped_bfs), "loop", 2, True, False, lambda p: 1, "1",
        "breadth first (torch's LoopedBFS), v stages per rank; holds m microbatches",
        ("LoopedBFS",),
    ),
    ScheduleSpec(
        "interleaved-zb", _with_v(interleaved_zero_bubble), "loop", 2, True, True,
        lambda p: p, "p", "interleaved zero bubble (torch's ZB1P), v stages per rank",
        ("InterleavedZeroBubble",),
    ),
    ScheduleSpec(
        "zb-h1", _fixed(zb_h1), "loop", 1, False, True, lambda p: 1, "1",
        "zero bubble H1: a third of 1F1B's bubble at 1F1B's memory", (),
    ),
    ScheduleSpec(
        "zb-h2", _fixed(zb_h2), "loop", 1, False, True, lambda p: 1, "1",
        "zero bubble H2: no idle time inside the step, up to 2p-1 microbatches held", (),
    ),
    ScheduleSpec(
        "zb-v", _fixed(zb_v), "v", 2, False, True, lambda p: 1, "1",
        "zero bubble V: V placement, near-zero bubble at p microbatches held",
        ("ZBVZeroBubble",),
    ),
    ScheduleSpec(
        "dualpipev", _fixed(dualpipe_v), "v", 2, False, True, lambda p: 2 * p, "2p",
        "DeepSeek's DualPipeV: overlapped F and B of the two chunks", ("DualPipeV",),
    ),
    ScheduleSpec(
        "auto", _auto, "searched", 2, True, True, lambda p: 1, "1",
        "fastest program found for given F,I,W,comm costs under a memory cap (default p)",
        options=("costs", "mem_cap"),
    ),
)  # fmt: skip

SCHEDULES: Mapping[str, ScheduleSpec] = MappingProxyType({s.name: s for s in _SPECS})

_BY_KEY: Mapping[str, str] = MappingProxyType(
    {_normalize(alias): s.name for s in _SPECS for alias in (s.name, *s.aliases)}
)


def schedule_names() -> list[str]:
    """Canonical schedule names, in registry order."""
    return list(SCHEDULES)


def lookup(name: str) -> ScheduleSpec:
    """The spec for ``name`` (any accepted spelling); ValueError listing the known names."""
    if not isinstance(name, str):
        raise ValueError(f"a schedule name must be a string, got {name!r}")
    key = _BY_KEY.get(_normalize(name))
    if key is None:
        known = ", ".join(schedule_names())
        raise ValueError(f"unknown schedule {name!r}; known schedules: {known}")
    return SCHEDULES[key]


def generate(name: str, p: int, m: int, v: int | None = None, **options: object) -> Program:
    """The compute-only Program of schedule ``name`` for p ranks, m microbatches, v per rank."""
    spec = lookup(name)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        takes = f"it takes {list(spec.options)}" if spec.options else "it takes none"
        raise ValueError(f"schedule {spec.name} got unknown options {unknown}; {takes}")
    check_p(spec.name, p)
    with gc_paused():
        return spec.build(p, m, spec.resolve_v(v), **options)
