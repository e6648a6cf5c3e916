"""Pictures of a step: Chrome-trace JSON (Perfetto) and a PNG, from simulated or measured times."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .ir import Action, Kind


@dataclass(frozen=True)
class Span:
    """One compute action as it ran (or would run): times in the caller's unit."""

    rank: int
    action: Action
    start: float
    end: float


# colour per kind; later chunks of a rank get a lighter shade of the same colour
COLOURS = {
    Kind.F: "#3b75af",
    Kind.I: "#ef8636",
    Kind.B: "#c53a32",
    Kind.W: "#519e3e",
    Kind.OVERLAP_F_B: "#8d69b8",
}


def spans_from(timeline: Iterable[tuple[int, Action, float, float]]) -> list[Span]:
    return [Span(r, a, s, e) for r, a, s, e in timeline]


def _label(a: Action) -> str:
    if a.sub is not None:
        return "/".join(str(x.mb) for x in a.sub)
    return str(a.mb)


def chrome_trace(
    spans: Sequence[Span], *, us_per_unit: float = 1000.0, title: str = "", meta: dict | None = None
) -> dict:
    """A Chrome trace: one track per rank, one complete event ("X") per action."""
    events: list[dict] = []
    ranks = sorted({s.rank for s in spans})
    for r in ranks:
        events.append(
            {"ph": "M", "pid": 0, "tid": r, "name": "thread_name", "args": {"name": f"rank {r}"}}
        )
        events.append(
            {"ph": "M", "pid": 0, "tid": r, "name": "thread_sort_index", "args": {"sort_index": r}}
        )
    events.append(
        {"ph": "M", "pid": 0, "name": "process_name", "args": {"name": title or "ppfast"}}
    )
    for s in spans:
        a = s.action
        events.append(
            {
                "name": str(a),
                "cat": a.kind.value,
                "ph": "X",
                "pid": 0,
                "tid": s.rank,
                "ts": s.start * us_per_unit,
                "dur": max(s.end - s.start, 0.0) * us_per_unit,
                "args": {"stage": a.stage, "microbatch": a.mb, "kind": a.kind.value},
            }
        )
    out = {"traceEvents": events, "displayTimeUnit": "ms"}
    if meta:
        out["otherData"] = meta
    return out


def write_trace(spans: Sequence[Span], path: str | os.PathLike, **kwargs) -> None:
    with open(path, "w") as f:
        json.dump(chrome_trace(spans, **kwargs), f)


def _shade(hex_colour: str, chunk: int) -> str:
    if chunk == 0:
        return hex_colour
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    t = min(0.25 * chunk, 0.6)  # lighten toward white for later chunks
    r, g, b = (int(c + (255 - c) * t) for c in (r, g, b))
    return f"#{r:02x}{g:02x}{b:02x}"


def draw_png(
    spans: Sequence[Span],
    path: str | os.PathLike,
    *,
    num_ranks: int | None = None,
    stage_chunk: Sequence[int] | None = None,
    title: str = "",
    unit: str = "",
) -> None:
    """One row per rank (rank 0 on top), a colour per kind, microbatch numbers in the boxes.

    ``stage_chunk[s]`` is the chunk index of stage s on its rank; later chunks are drawn
    lighter so interleaved and V schedules read at a glance.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    p = num_ranks if num_ranks is not None else (max(s.rank for s in spans) + 1 if spans else 1)
    t_end = max((s.end for s in spans), default=1.0) or 1.0
    width = min(max(8.0, len(spans) / max(p, 1) * 0.28), 28.0)
    fig, ax = plt.subplots(figsize=(width, 0.5 * p + 1.3))
    min_label = t_end / (width * 9)  # roughly one character's width in data units
    for s in spans:
        a = s.action
        first = a.sub[0] if a.sub else a
        chunk = stage_chunk[first.stage] if stage_chunk is not None and first.stage >= 0 else 0
        colour = _shade(COLOURS.get(a.kind, "#777777"), chunk)
        y = p - 1 - s.rank
        ax.broken_barh(
            [(s.start, s.end - s.start)], (y + 0.08, 0.84), facecolors=colour, edgecolor="white"
        )
        text = _label(a)
        if s.end - s.start >= min_label * len(text):
            ax.text(
                (s.start + s.end) / 2,
                y + 0.5,
                text,
                ha="center",
                va="center",
                fontsize=7,
                color="white",
            )
    ax.set_yticks([p - 1 - r + 0.5 for r in range(p)], [f"rank {r}" for r in range(p)])
    ax.set_ylim(0, p)
    ax.set_xlim(0, t_end)
    ax.set_xlabel(f"time{f' ({unit})' if unit else ''}")
    kinds = sorted({s.action.kind for s in spans}, key=lambda k: list(COLOURS).index(k))
    ax.legend(
        handles=[Patch(color=COLOURS[k], label=k.value) for k in kinds],
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        ncol=len(kinds),
        frameon=False,
        fontsize=8,
    )
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def stage_chunks(stage_to_rank: Sequence[int]) -> list[int]:
    """Chunk index of each stage on its rank (0 for the rank's first stage, 1 for the next...)."""
    count: dict[int, int] = {}
    out = []
    for r in stage_to_rank:
        out.append(count.get(r, 0))
        count[r] = count.get(r, 0) + 1
    return out
