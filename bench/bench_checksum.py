"""What PPFAST_CHECKSUM costs: pipelined training with the payload checksum on and off.

    python bench/bench_checksum.py [--transports shm,c10d] [--rounds 7] [--width 512]

The demo's GPT-style decoder trained with 1F1B on 2 gloo ranks (one torch thread each), over
shared memory and over gloo, each with the checksum off and on, in the same processes,
alternating by round. With it on, every message is followed by a trailer holding a 64-bit
hash of its bytes, which the receiver recomputes before using the data (RankRunner). Prints
the median step of each and the ratio, and the bytes hashed per step; results go to
bench/results/checksum.json.
"""

from __future__ import annotations

import argparse
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

VARIANTS = ("off", "on")


def rank_main(rank: int, p: int, port: int, args, queue) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=p)
    work = make_workload(args)
    x, y = work.batch()
    base = work.split(p)
    runs = {}
    for transport in args.transports.split(","):
        for variant in VARIANTS:
            # the runner reads the variable when the schedule builds it, at its first step
            os.environ["PPFAST_CHECKSUM"] = "1" if variant == "on" else "0"
            stage = ppfast.PipelineStage(ppfast.nn.convert(base[rank]), rank, p, "cpu")
            sched = ppfast.Schedule1F1B(stage, args.microbatches, work.loss_fn, transport=transport)
            sched.step(*((x,) if rank == 0 else ()), target=y if rank == p - 1 else None)
            runs[(transport, variant)] = (sched, list(stage.submod.parameters()))

    def step(key) -> float:
        sched, params = runs[key]
        dist.barrier()
        t = time.perf_counter()
        sched.step(*((x,) if rank == 0 else ()), target=y if rank == p - 1 else None)
        dist.barrier()
        for q in params:
            q.grad = None
        return time.perf_counter() - t

    times: dict[str, list[float]] = {f"{k[0]}:{k[1]}": [] for k in runs}
    keys = list(runs)
    for r in range(args.rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            times[f"{k[0]}:{k[1]}"].append(step(k))
    # what crosses between the two ranks per step: each microbatch's activation and gradient
    act = work.split(p)[0](x[: x.shape[0] // args.microbatches])
    moved = 2 * args.microbatches * act.numel() * act.element_size()
    if rank == 0:
        queue.put({"times": times, "bytes": moved})
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transports", default="shm,c10d")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "checksum.json"))
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
        f"{describe()}; 2 gloo ranks x {args.threads} thread; 1F1B on the demo's decoder, "
        f"{args.depth} blocks of width {args.width}, seq 64, batch {args.batch}, "
        f"m = {args.microbatches}; {got['bytes'] / 2**20:.1f} MiB hashed per step and rank; "
        f"medians of {args.rounds} rounds"
    )
    print(f"{'transport':10s} {'off ms':>8s} {'on ms':>8s} {'cost':>7s}")
    rows = []
    for transport in args.transports.split(","):
        off, on = med[f"{transport}:off"], med[f"{transport}:on"]
        print(f"{transport:10s} {off * 1e3:8.1f} {on * 1e3:8.1f} {on / off - 1:+7.1%}")
        rows.append(
            {
                "transport": transport,
                "off_s": off,
                "on_s": on,
                "cost": on / off - 1,
                "raw": {v: got["times"][f"{transport}:{v}"] for v in VARIANTS},
            }
        )
    record = {
        **header("bench/bench_checksum.py", argv),
        "setup": {k: v for k, v in vars(args).items() if k != "json"},
        "bytes_per_step": got["bytes"],
        "rows": rows,
    }
    write_record(args.json, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
