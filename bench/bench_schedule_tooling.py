"""How fast schedules are made ready to run: generate, lower, validate and simulate.

ppfast and torch.distributed.pipelining are timed in the same run, alternating, on the same
(p, m, v). torch's side is its own generation (``get_schedule_ops``, no processes) and its own
lowering to SEND/RECV (``with_comms=True``); it has no validator or simulator to time, so its
figure is a lower bound on the same work. Prints medians and ratios and writes
bench/results/schedule_tooling.json.

    python bench/bench_schedule_tooling.py                 # p=64, m=512, v=2 for ppfast
    python bench/bench_schedule_tooling.py --torch-sizes 16x64,32x128
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

from ppfast.program.ir import gc_paused
from ppfast.program.schedules import generate, lookup
from ppfast.program.simulator import simulate
from ppfast.program.validate import validate
from ppfast.tools.benchmarks.machine import describe

# ppfast name -> torch class name (same shape of schedule)
PAIRS = {
    "interleaved-1f1b": "Interleaved1F1B",
    "looped-bfs": "LoopedBFS",
    "interleaved-zb": "InterleavedZeroBubble",
    "zb-v": "ZBVZeroBubble",
    "dualpipev": "DualPipeV",
}


def time_ppfast(name: str, p: int, m: int, v: int) -> dict:
    t0 = time.perf_counter()
    prog = generate(name, p, m, v if lookup(name).v_free else None)
    t1 = time.perf_counter()
    lowered = validate(prog)  # structure, lowering, structure again, dry run
    t2 = time.perf_counter()
    sim = simulate(prog)
    t3 = time.perf_counter()
    return {
        "generate_s": t1 - t0,
        "lower_validate_s": t2 - t1,
        "simulate_s": t3 - t2,
        "total_s": t3 - t0,
        "actions": prog.num_actions(),
        "actions_lowered": lowered.num_actions(),
        "bubble": sim.bubble,
    }


def time_torch(name: str, p: int, m: int, v: int) -> dict:
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

    stages = v if name != "DualPipeV" and name != "ZBVZeroBubble" else 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        get_schedule_ops(name, p, m, stages)
        t1 = time.perf_counter()
        get_schedule_ops(name, p, m, stages, with_comms=True)
        t2 = time.perf_counter()
    # with_comms regenerates the compute program, so lowering alone is the difference
    return {"generate_s": t1 - t0, "lower_s": (t2 - t1) - (t1 - t0), "total_s": t2 - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-p", type=int, default=64)
    ap.add_argument("-m", type=int, default=512)
    ap.add_argument("-v", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--torch-sizes",
        default="16x64,32x128",
        help="PxM sizes at which both are timed side by side (torch's lowering grows fast)",
    )
    ap.add_argument("--schedules", default=",".join(PAIRS))
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "schedule_tooling.json")
    )
    args = ap.parse_args()
    names = args.schedules.split(",")
    results: dict = {
        "machine": describe(),
        "repeats": args.repeats,
        "large": {},
        "side_by_side": [],
    }

    print(f"ppfast: generate + lower + validate + simulate, p={args.p} m={args.m} v={args.v}")
    print(f"{'schedule':18s} {'generate':>9s} {'lower+val':>10s} {'simulate':>9s} {'total':>8s}"
          f" {'actions':>9s} {'lowered':>9s}")  # fmt: skip
    for name in names:
        runs = []
        for _ in range(args.repeats):
            with gc_paused():
                runs.append(time_ppfast(name, args.p, args.m, args.v))
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        results["large"][name] = med
        print(
            f"{name:18s} {med['generate_s']:8.3f}s {med['lower_validate_s']:9.3f}s "
            f"{med['simulate_s']:8.3f}s {med['total_s']:7.3f}s {int(med['actions']):9d} "
            f"{int(med['actions_lowered']):9d}"
        )

    sizes = [tuple(int(x) for x in s.split("x")) for s in args.torch_sizes.split(",") if s]
    if sizes:
        print("\nside by side (alternating): ppfast generate+lower+validate+simulate vs torch "
              "generate+lower")  # fmt: skip
        print(f"{'schedule':18s} {'p':>3s} {'m':>4s} {'ppfast':>9s} {'torch':>9s} {'ratio':>7s}")
    for p, m in sizes:
        for name in names:
            ours, theirs = [], []
            for _ in range(args.repeats):
                with gc_paused():
                    ours.append(time_ppfast(name, p, m, args.v)["total_s"])
                theirs.append(time_torch(PAIRS[name], p, m, args.v)["total_s"])
            a, b = statistics.median(ours), statistics.median(theirs)
            results["side_by_side"].append(
                {"schedule": name, "torch": PAIRS[name], "p": p, "m": m, "v": args.v,
                 "ppfast_s": a, "torch_s": b, "speedup": b / a}
            )  # fmt: skip
            print(f"{name:18s} {p:3d} {m:4d} {a:8.3f}s {b:8.3f}s {b / a:6.1f}x")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
