"""Names the machine a benchmark ran on, and where its figures came from, for its table and its
JSON record."""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (the architecture where /proc/cpuinfo does not say)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def facts(**extra) -> dict:
    """The machine as a record's fields: CPU, cores, Python, torch, kernel, the GPU when there is
    one, and ``extra`` (such as the transformers version)."""
    import torch

    out = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "kernel": platform.release(),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out | extra


def describe() -> str:
    """CPU model, core count, Python and torch versions (and the GPU, when there is one)."""
    f = facts()
    out = f"{f['cpu']}, {f['cores']} cores, Python {f['python']}, torch {f['torch']}"
    return out + (f", {f['gpu']}" if "gpu" in f else "")


def header(script: str, argv: list[str] | None, machine: str | dict | None = None) -> dict:
    """What a record starts with: the machine (``describe()`` unless given), the date, and the
    command that reproduces it (``script`` with ``argv``, or this process's arguments)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    return {
        "machine": describe() if machine is None else machine,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([f"python {script}", *args]),
    }


def write_record(path: str | Path, record: dict) -> None:
    """Writes ``record`` as indented JSON to ``path`` and says so."""
    Path(path).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


def free_port() -> int:
    """A TCP port free on this host now, for a group of local ranks to meet on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
