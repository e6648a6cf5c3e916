"""Pipelined training speed against torch.distributed.pipelining (``ppfast bench schedules``).

Writes bench/results/schedules.json unless --json says otherwise; see ``--help``.

    python bench/bench_schedules.py [--rounds 15] [--ranks 2] [--microbatches 8]
"""

import sys
from pathlib import Path

from ppfast.tools.benchmarks.schedules import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--json" not in argv:
        argv += ["--json", str(Path(__file__).parent / "results" / "schedules.json")]
    sys.exit(main(argv))
