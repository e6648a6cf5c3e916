"""Benchmarks that ship with ppfast and run as ``ppfast bench NAME``."""

from __future__ import annotations

import json
from pathlib import Path

BENCHMARKS = {
    "p2p": "send/recv latency, bandwidth and compute overlap between two ranks",
    "schedules": "pipelined training speed, ppfast against torch.distributed.pipelining",
}


def write_results(path: str | Path, results: dict) -> Path:
    """Writes a benchmark's results as indented JSON, creating the folder; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return out
