"""Executor overhead per action, with empty compute.

The stage compute returns a one-element tensor at once, so a step's wall time is the executor's
own work: walking the program, calling back into Python, posting and completing sends and
receives. Two setups: one rank (compute callbacks only), and p ranks as threads over the
in-process transport (callbacks plus communication; the ranks also hand the GIL to each other
at every callback). Each rank runs the steps back to back in one thread. Prints microseconds
per action (median of 5 runs) and writes bench/results/executor_overhead.json.

    python bench/bench_executor_overhead.py [--steps 50] [-p 2] [-m 64] [--schedule 1f1b]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from ppfast import RankRunner, generate
from ppfast._native import C


class EmptyCompute:
    device = torch.device("cpu")

    def __init__(self):
        self.t = torch.zeros(1)

    def forward(self, stage, mb, inputs):
        return [self.t], False

    def backward(self, stage, mb, grads, full):
        return [self.t]

    def weight(self, stage, mb):
        return None


def per_action_us(name: str, p: int, m: int, steps: int) -> tuple[float, int]:
    prog = generate(name, p, m)
    hub = C.Hub(p)
    runners = [
        RankRunner(prog, r, C.InProcessTransport(hub, r), EmptyCompute(), timeout=30)
        for r in range(p)
    ]
    n_actions = max(len(a) for a in runners[0].program.ranks)

    def run_steps(r: RankRunner, k: int) -> None:
        for _ in range(k):
            r.step()

    def timed(k: int) -> float:
        # each rank runs k steps back to back in its own thread; starting threads is not timed
        # per step, it is spread over k steps
        threads = [threading.Thread(target=run_steps, args=(r, k)) for r in runners]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return time.perf_counter() - t

    timed(3)
    walls = [timed(steps) / steps for _ in range(5)]
    # the ranks run side by side, so a step costs the busiest rank's actions
    return statistics.median(walls) / n_actions * 1e6, n_actions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-p", type=int, default=2)
    ap.add_argument("-m", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "executor_overhead.json")
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    single, n1 = per_action_us(args.schedule, 1, args.m, args.steps)
    multi, n2 = per_action_us(args.schedule, args.p, args.m, args.steps)
    print(f"{args.schedule}, m={args.m}, empty compute, median of 5 runs of {args.steps} steps")
    print(f"  1 rank ({n1} actions):                 {single:6.1f} us per action")
    print(f"  {args.p} ranks in process ({n2} actions each): {multi:6.1f} us per action")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "schedule": args.schedule,
                "m": args.m,
                "p": args.p,
                "us_per_action_1_rank": single,
                "us_per_action_in_process": multi,
            },
            indent=2,
        )  # fmt: skip
        + "\n"
    )


if __name__ == "__main__":
    main()
