"""Pipelined training speed: ppfast against torch.distributed.pipelining, same run, alternating.

Two gloo ranks on this machine (one thread each) train an MLP of 8 blocks of
Linear(1024, 1024) + GELU, batch 128 in m = 8 microbatches, under each schedule both runtimes
have. Ranks that share a machine slow each other down, and by an amount that drifts, so every
pipeline is measured against the machine's own limit taken in the same run:

    T_limit    every rank runs forward and backward of its own stages for all microbatches
               at the same time, with no transfers and no waiting
    eta        T_limit / T_pipeline      (1.0 = the limit; 1F1B's own bound at p=2, m=8 is 8/9)
    E          T_one_device / (p * T_pipeline)

Each round times the limit and every (runtime, schedule) once, in turn; the table gives
medians over rounds, and ppfast / torch ratios of speed. Writes bench/results/schedules.json.

    python bench/bench_schedules.py [--rounds 15] [--ranks 2] [--microbatches 8] [--width 1024]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ppfast.benchmarks.machine import describe

# ppfast schedule name -> torch class name (None: torch has no such schedule)
PAIRS = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved-1f1b": "ScheduleInterleaved1F1B",
    "interleaved-zb": "ScheduleInterleavedZeroBubble",
    "zb-v": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
    "zb-h1": None,
    "zb-h2": None,
}


def make_blocks(width: int, depth: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth)]


def split(blocks: list[nn.Module], n: int) -> list[nn.Module]:
    per = len(blocks) // n
    return [nn.Sequential(*blocks[i * per : (i + 1) * per]) for i in range(n)]


def stages_for(name: str, p: int, m: int, rank: int) -> tuple[list[int], int]:
    import ppfast

    spec = ppfast.schedules.lookup(name)
    v = spec.default_v
    prog = ppfast.generate(name, p, m, v if spec.v_free else None)
    return prog.stages_of(rank), prog.num_stages


def build(runtime: str, name: str, blocks, p, m, rank, loss_fn, convert=True):
    mine, n = stages_for(name, p, m, rank)
    mods = split([copy.deepcopy(b) for b in blocks], n)
    if runtime == "ppfast":
        import ppfast

        if convert:
            # ppfast's split layers: weight gradients wait for the schedule's W
            mods = [ppfast.nn.convert(md) for md in mods]
        stages = [ppfast.PipelineStage(mods[s], s, n, "cpu") for s in mine]
        cls = {
            "gpipe": ppfast.ScheduleGPipe,
            "1f1b": ppfast.Schedule1F1B,
            "interleaved-1f1b": ppfast.ScheduleInterleaved1F1B,
            "interleaved-zb": ppfast.ScheduleInterleavedZeroBubble,
            "zb-v": ppfast.ScheduleZBVZeroBubble,
            "dualpipev": ppfast.ScheduleDualPipeV,
            "zb-h1": ppfast.ScheduleZBH1,
            "zb-h2": ppfast.ScheduleZBH2,
        }[name]
        sched = cls(stages if len(stages) > 1 else stages[0], m, loss_fn, timeout=120)
    else:
        import torch.distributed.pipelining as tp

        stages = [tp.PipelineStage(mods[s], s, n, torch.device("cpu")) for s in mine]
        cls = getattr(tp, PAIRS[name])
        sched = cls(stages if len(stages) > 1 else stages[0], m, loss_fn=loss_fn)
    params = [q for s in mine for q in mods[s].parameters()]
    return sched, stages, params, mine, n


def rank_main(rank: int, p: int, port: int, args, queue) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=p)
    m, width, batch = args.microbatches, args.width, args.batch
    blocks = make_blocks(width, args.depth)
    loss_fn = nn.MSELoss()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, width, generator=gen)
    y = torch.randn(batch, width, generator=gen)
    names = [n for n in args.schedules.split(",") if n in PAIRS]
    configs = []
    for name in names:
        for runtime in ("ppfast", "torch"):
            if runtime == "torch" and PAIRS[name] is None:
                continue
            try:
                configs.append(
                    (
                        runtime,
                        name,
                        *build(runtime, name, blocks, p, m, rank, loss_fn, args.convert),
                    )
                )
            except Exception as e:  # noqa: BLE001 - a schedule a runtime cannot build is skipped
                if rank == 0:
                    print(f"skipping {runtime} {name}: {type(e).__name__}: {e}", flush=True)
    # the limit: this rank's share (one stage's worth of blocks per rank) with local data
    own = split([copy.deepcopy(b) for b in blocks], p)[rank]
    xm = list(x.chunk(m))

    def limit():
        for xb in xm:
            # every rank but the first also computes the gradient of its input, as in a pipeline
            out = own(xb.requires_grad_(rank > 0))
            out.square().mean().backward()

    whole = nn.Sequential(*[copy.deepcopy(b) for b in blocks])

    def one_device():
        for xb, yb in zip(xm, y.chunk(m), strict=True):
            (loss_fn(whole(xb), yb) / m).backward()

    def run(cfg):
        runtime, name, sched, stages, params, mine, n = cfg
        has_first, has_last = 0 in mine, n - 1 in mine
        if has_first:
            sched.step(x, target=y if has_last else None)
        elif has_last:
            sched.step(target=y)
        else:
            sched.step()
        for q in params:
            q.grad = None

    def timed(fn) -> float:
        dist.barrier()
        t = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t

    for cfg in configs:  # warm up (shape agreement, allocator)
        for _ in range(2):
            timed(lambda cfg=cfg: run(cfg))
    timed(limit)
    times: dict[str, list[float]] = {"limit": [], "one_device": []}
    for _ in range(args.rounds):
        times["limit"].append(timed(limit))
        for cfg in configs:
            times.setdefault(f"{cfg[0]}:{cfg[1]}", []).append(timed(lambda cfg=cfg: run(cfg)))
        # one device: rank 0 alone, the others idle at the barrier
        dist.barrier()
        if rank == 0:
            t = time.perf_counter()
            one_device()
            times["one_device"].append(time.perf_counter() - t)
            for q in whole.parameters():
                q.grad = None
        dist.barrier()
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--schedules", default=",".join(PAIRS))
    ap.add_argument(
        "--no-convert",
        dest="convert",
        action="store_false",
        help="keep nn.Linear on ppfast's side (no deferred weight gradients)",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "schedules.json"))
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [
        ctx.Process(target=rank_main, args=(r, args.ranks, port, args, queue))
        for r in range(args.ranks)
    ]
    for pr in procs:
        pr.start()
    times = queue.get()
    for pr in procs:
        pr.join()
    med = {k: statistics.median(v) for k, v in times.items()}
    p = args.ranks
    rows = []
    print(f"\n{describe()}; {p} gloo ranks x 1 thread; {args.depth} x [Linear({args.width}, "
          f"{args.width}) + GELU], batch {args.batch}, m = {args.microbatches}; medians of "
          f"{args.rounds} rounds; ppfast.nn.Linear: {'yes' if args.convert else 'no'}")  # fmt: skip
    print(f"T_limit {med['limit'] * 1e3:.1f} ms, T_one_device {med['one_device'] * 1e3:.1f} ms\n")
    print(f"{'schedule':18s} {'runtime':8s} {'step ms':>8s} {'eta':>6s} {'E':>6s} {'vs torch':>9s}")
    for name in PAIRS:
        for runtime in ("ppfast", "torch"):
            k = f"{runtime}:{name}"
            if k not in med:
                continue
            t = med[k]
            peer = med.get(f"torch:{name}")
            ratio = peer / t if (runtime == "ppfast" and peer) else None
            row = {
                "schedule": name,
                "runtime": runtime,
                "step_s": t,
                "eta": med["limit"] / t,
                "E": med["one_device"] / (p * t),
                "speedup_vs_torch": ratio,
            }
            rows.append(row)
            rs = f"{ratio:8.2f}x" if ratio else ""
            print(
                f"{name:18s} {runtime:8s} {t * 1e3:8.1f} {row['eta']:6.3f} {row['E']:6.3f} {rs:>9s}"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": describe(),
                "setup": {k: v for k, v in vars(args).items() if k != "out"},
                "T_limit_s": med["limit"],
                "T_one_device_s": med["one_device"],
                "rows": rows,
                "raw": times,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
