"""Pipelined training with torch.compile'd stages against the same stages eager.

    python bench/bench_compile.py [--schedules 1f1b,zb-h1,zb-v] [--rounds 5] [--depth 8]

The demo's GPT-style decoder (``ppfast.tools.benchmarks.workloads.gpt``), its Linear layers
converted by ``ppfast.nn.convert``, trained on 2 gloo ranks (one torch thread each) under
each schedule, with every block of every stage eager and compiled (``block.compile()``,
inductor), in the same processes, alternating by round. Per schedule it prints the median
step of each and their ratio; the first steps (compilation) are timed apart and left out.
Results go to bench/results/compile.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ppfast
from ppfast.tools.benchmarks.machine import describe, free_port, header, write_record
from ppfast.tools.benchmarks.workloads import make_workload


def _blocks(stage: torch.nn.Module) -> list[torch.nn.Module]:
    """The stage's repeated blocks (its children that hold parameters), to compile each."""
    return [m for m in stage.children() if any(True for _ in m.parameters())]


def rank_main(rank: int, p: int, port: int, args, queue) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=p)
    work = make_workload(args)
    x, y = work.batch()
    runs = {}
    for name in args.schedules.split(","):
        program = ppfast.generate(name, p, args.microbatches)
        n, mine = program.num_stages, program.stages_of(rank)
        base = work.split(n)
        for variant in ("eager", "compiled"):
            mods = {s: ppfast.nn.convert(copy.deepcopy(base[s])) for s in mine}
            if variant == "compiled":
                for mod in mods.values():
                    for block in _blocks(mod):
                        block.compile()
            stages = [ppfast.PipelineStage(mods[s], s, n, "cpu") for s in mine]
            cls = ppfast.get_schedule_class(name)
            sched = cls(stages if len(stages) > 1 else stages[0], args.microbatches, work.loss_fn)
            params = [q for mod in mods.values() for q in mod.parameters()]
            runs[(name, variant)] = (sched, params, 0 in mine, n - 1 in mine)

    def step(key) -> float:
        sched, params, first, last = runs[key]
        dist.barrier()
        t = time.perf_counter()
        sched.step(*((x,) if first else ()), target=y if last else None)
        dist.barrier()
        for q in params:
            q.grad = None
        return time.perf_counter() - t

    first_steps = {f"{k[0]}:{k[1]}": [step(k) for _ in range(args.warmup)] for k in runs}
    times: dict[str, list[float]] = {f"{k[0]}:{k[1]}": [] for k in runs}
    keys = list(runs)
    for r in range(args.rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            times[f"{k[0]}:{k[1]}"].append(step(k))
    if rank == 0:
        queue.put({"times": times, "first_steps": first_steps})
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedules", default="1f1b,zb-h1,zb-v")
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="first steps, timed apart")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "compile.json"))
    args = ap.parse_args(argv)
    args.model = "gpt"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, 2, port, args, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    got = queue.get(timeout=3600)
    for proc in procs:
        proc.join(60)
    med = {k: statistics.median(v) for k, v in got["times"].items()}
    print(
        f"{describe()}; 2 gloo ranks x {args.threads} thread; the demo's decoder, "
        f"{args.depth} blocks of width {args.width}, seq 64, batch {args.batch}, "
        f"m = {args.microbatches}; medians of {args.rounds} rounds"
    )
    print(
        f"{'schedule':10s} {'eager ms':>9s} {'compiled ms':>12s} {'ratio':>6s} {'first steps':>20s}"
    )
    rows = []
    for name in args.schedules.split(","):
        e, c = med[f"{name}:eager"], med[f"{name}:compiled"]
        first = got["first_steps"][f"{name}:compiled"]
        print(
            f"{name:10s} {e * 1e3:9.1f} {c * 1e3:12.1f} {e / c:5.2f}x "
            f"{' '.join(f'{t:.1f}s' for t in first):>20s}"
        )
        rows.append(
            {
                "schedule": name,
                "eager_s": e,
                "compiled_s": c,
                "speedup": e / c,
                "compiled_first_steps_s": first,
                "raw": {k: got["times"][f"{name}:{k}"] for k in ("eager", "compiled")},
            }
        )
    record = {
        **header("bench/bench_compile.py", argv),
        "setup": {k: v for k, v in vars(args).items() if k != "json"},
        "rows": rows,
    }
    write_record(args.json, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
