"""Names the machine a benchmark ran on, for its table and its JSON."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe() -> str:
    """CPU model, core count, Python and torch versions (and the GPU, when there is one)."""
    import torch

    model = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"
    out += f", torch {torch.__version__}"
    if torch.cuda.is_available():
        out += f", {torch.cuda.get_device_name()}"
    return out
