"""Point-to-point latency, bandwidth and overlap between two ranks, into bench/results/p2p.json.

The same as ``ppfast bench p2p`` (``-h`` lists the options), except that the JSON is written
unless ``--json PATH`` says where:

    python bench/bench_p2p.py                       # gloo, two local processes
    torchrun --nproc-per-node 2 bench/bench_p2p.py  # gloo or NCCL (with GPUs)
"""

from __future__ import annotations

import sys
from pathlib import Path

from ppfast.tools.benchmarks.p2p import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--json" or a.startswith("--json=") for a in argv):
        argv += ["--json", str(Path(__file__).resolve().parent / "results" / "p2p.json")]
    try:
        sys.exit(main(argv))
    except ValueError as e:
        print(f"bench_p2p: {e}", file=sys.stderr)
        sys.exit(2)
