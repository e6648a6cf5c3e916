"""``ppfast bench schedules``: pipelined training speed against torch.distributed.pipelining.

Local gloo ranks (``--ranks``, one thread each unless ``--threads``) train the same model under
every schedule both runtimes have, in the same run and alternating. Ranks that share a machine
slow each other down, by an amount that drifts, so every pipeline is measured against the
machine's own limit taken in the same round:

    T_limit    every rank runs forward and backward of its own stages for all microbatches
               at the same time, with no transfers and no waiting
    eta        T_limit / T_pipeline      (1.0 = the limit; 1F1B's own bound at p=2, m=8 is 8/9)
    E          T_one_device / (p * T_pipeline)

For ppfast it also reports the measured bubble (1 - busy / step, averaged over ranks) and the
bubble the simulator predicts for the same program at the F, I, W costs measured in that run
(medians per stage) and the measured transfer time; the gap between the two is what the
runtime itself costs. The table gives medians over rounds, and ppfast / torch speed ratios.

    ppfast bench schedules [--rounds 15] [--ranks 2] [--microbatches 8] [--model mlp|gpt]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
import warnings
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import write_results
from .machine import describe
from .workloads import WORKLOADS, Workload, make_workload

# ppfast schedule name -> torch class name (None: torch has no such schedule)
PAIRS = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved-1f1b": "ScheduleInterleaved1F1B",
    "looped-bfs": "ScheduleLoopedBFS",
    "interleaved-zb": "ScheduleInterleavedZeroBubble",
    "zb-v": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
    "zb-h1": None,
    "zb-h2": None,
}


def _program(name: str, p: int, m: int):
    import ppfast

    spec = ppfast.program.schedules.lookup(name)
    return ppfast.generate(name, p, m, spec.default_v if spec.v_free else None)


def build(runtime: str, name: str, work: Workload, p: int, m: int, rank: int, convert: bool):
    """This rank's stages and schedule under ``runtime``, from fresh copies of the workload."""
    prog = _program(name, p, m)
    n, mine = prog.num_stages, prog.stages_of(rank)
    mods = work.split(n)
    if runtime == "ppfast":
        import ppfast

        if convert:
            # ppfast's split layers: weight gradients wait for the schedule's W
            mods = [ppfast.nn.convert(md) for md in mods]
        stages = [ppfast.PipelineStage(mods[s], s, n, "cpu") for s in mine]
        cls = getattr(ppfast, _ppfast_class(name))
        sched = cls(stages if len(stages) > 1 else stages[0], m, work.loss_fn, timeout=120)
    else:
        import torch.distributed.pipelining as tp

        stages = [tp.PipelineStage(mods[s], s, n, torch.device("cpu")) for s in mine]
        cls = getattr(tp, PAIRS[name])
        sched = cls(stages if len(stages) > 1 else stages[0], m, loss_fn=work.loss_fn)
    params = [q for s in mine for q in mods[s].parameters()]
    return sched, params, mine, n, prog


def _ppfast_class(name: str) -> str:
    return PAIRS.get(name) or {"zb-h1": "ScheduleZBH1", "zb-h2": "ScheduleZBH2"}[name]


def _stage_costs(metrics, num_stages: int) -> dict[int, dict[str, list[float]]]:
    """Durations of this rank's F, I, W and B actions, by stage."""
    from ppfast.program.ir import parse_action

    out: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for text, start, end in metrics.actions:
        a = parse_action(text)
        for part in a.parts():
            out[part.stage][str(part.kind)].append((end - start) / len(a.parts()))
    return out


def _transfer_time(rank: int, p: int, shape: tuple[int, ...], reps: int = 20) -> float:
    """Half a round trip of one activation between neighbouring ranks (median)."""
    t = torch.zeros(shape)
    times = []
    for _ in range(reps):
        dist.barrier()
        if rank == 0:
            start = time.perf_counter()
            dist.send(t, 1)
            dist.recv(t, 1)
            times.append((time.perf_counter() - start) / 2)
        elif rank == 1:
            dist.recv(t, 0)
            dist.send(t, 0)
    out = [statistics.median(times) if times else 0.0]
    dist.broadcast_object_list(out, src=0)
    return out[0]


def rank_main(rank: int, p: int, port: int, args, queue) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=p)
    m = args.microbatches
    work = make_workload(args)
    x, y = work.batch()
    names = [n for n in args.schedules.split(",") if n in PAIRS]
    configs = []
    for name in names:
        for runtime in ("ppfast", "torch"):
            if runtime == "torch" and PAIRS[name] is None:
                continue
            try:
                configs.append(
                    (runtime, name, *build(runtime, name, work, p, m, rank, args.convert))
                )
            except Exception as e:  # noqa: BLE001 - a schedule a runtime cannot build is skipped
                if rank == 0:
                    print(f"skipping {runtime} {name}: {type(e).__name__}: {e}", flush=True)
    # the limit: this rank's share (one stage's worth of the model per rank) with local data
    own = work.split(p)[rank]
    xm, ym = list(x.chunk(m)), list(y.chunk(m))
    last = rank == p - 1

    def limit():
        for xb, yb in zip(xm, ym, strict=True):
            inp = xb if rank == 0 else work.hidden(xb).requires_grad_(True)
            out = own(inp)
            (work.loss_fn(out, yb) if last else out.float().square().mean()).backward()

    whole = work.make_whole()

    def one_device():
        for xb, yb in zip(xm, ym, strict=True):
            (work.loss_fn(whole(xb), yb) / m).backward()

    def run(cfg):
        runtime, name, sched, params, mine, n, _ = cfg
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
    transfer = _transfer_time(rank, p, tuple(work.hidden(xm[0]).shape))
    times: dict[str, list[float]] = {"limit": [], "one_device": []}
    bubbles: dict[str, list[float]] = defaultdict(list)
    costs: dict[str, dict] = {}
    for _ in range(args.rounds):
        times["limit"].append(timed(limit))
        for cfg in configs:
            key = f"{cfg[0]}:{cfg[1]}"
            times.setdefault(key, []).append(timed(lambda cfg=cfg: run(cfg)))
            if cfg[0] == "ppfast":
                met = cfg[2].last_metrics
                bubbles[key].append(met.bubble)
                merged = costs.setdefault(key, defaultdict(lambda: defaultdict(list)))
                for stage, kinds in _stage_costs(met, cfg[5]).items():
                    for kind, vals in kinds.items():
                        merged[stage][kind] += vals
        # one device: rank 0 alone, the others idle at the barrier
        dist.barrier()
        if rank == 0:
            t = time.perf_counter()
            one_device()
            times["one_device"].append(time.perf_counter() - t)
            for q in whole.parameters():
                q.grad = None
        dist.barrier()
    gathered = [None] * p
    mine = {k: {s: {kd: statistics.median(v) for kd, v in d.items()} for s, d in c.items()}
            for k, c in costs.items()}  # fmt: skip
    dist.all_gather_object(gathered, (dict(bubbles), mine))
    if rank == 0:
        queue.put((times, gathered, transfer))
    dist.destroy_process_group()


def simulated_bubble(name: str, p: int, m: int, per_stage: dict, transfer: float) -> float | None:
    """The simulator's bubble for ``name`` at the measured per-stage costs."""
    from ppfast.program.simulator import Costs, simulate

    prog = _program(name, p, m)
    table = []
    for s in range(prog.num_stages):
        c = per_stage.get(s)
        if not c:
            return None
        f, i, w = c.get("F", 0.0), c.get("I", 0.0), c.get("W", 0.0)
        if "B" in c and "I" not in c:
            i, w = c["B"], 0.0  # no W in this schedule: a B is all of the backward
        table.append((f, i, w))
    return simulate(prog, Costs(comm=transfer, per_stage=tuple(table))).bubble


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ppfast bench schedules",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    ap.add_argument("--ranks", type=int, default=2, help="local gloo ranks (default 2)")
    ap.add_argument("--microbatches", "-m", type=int, default=8)
    ap.add_argument("--model", choices=sorted(WORKLOADS), default="mlp")
    ap.add_argument("--width", type=int, help="mlp: 1024 (default), gpt: 192")
    ap.add_argument("--depth", type=int, default=8, help="blocks in the model")
    ap.add_argument("--batch", type=int, help="mlp: 128 (default), gpt: 32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--schedules", default=",".join(PAIRS), help="comma-separated names")
    ap.add_argument(
        "--no-convert",
        dest="convert",
        action="store_false",
        help="keep nn.Linear on ppfast's side (no deferred weight gradients)",
    )
    ap.add_argument("--json", metavar="PATH", help="write the results here")
    return ap


DEFAULTS = {"mlp": {"width": 1024, "batch": 128}, "gpt": {"width": 192, "batch": 32}}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = [n for n in args.schedules.split(",") if n not in PAIRS]
    if unknown:
        raise ValueError(f"unknown schedules {unknown}; choose from {', '.join(PAIRS)}")
    if args.ranks < 2:
        raise ValueError("a pipeline needs --ranks 2 or more")
    make_workload(args).check(args.ranks, args.microbatches)
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
    try:
        times, gathered, transfer = queue.get()
    finally:
        for pr in procs:
            pr.join(timeout=60)
            if pr.is_alive():
                pr.terminate()
    result = summarize(args, times, gathered, transfer)
    if args.json:
        print(f"\nwrote {write_results(args.json, result)}")
    return 0


def summarize(args, times, gathered, transfer) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    p, m = args.ranks, args.microbatches
    work = make_workload(args)
    rows = []
    print(f"\n{describe()}; {p} gloo ranks x {args.threads} thread(s); {work.describe()}, "
          f"m = {m}; medians of {args.rounds} rounds; ppfast.nn.Linear: "
          f"{'yes' if args.convert else 'no'}")  # fmt: skip
    print(
        f"T_limit {med['limit'] * 1e3:.1f} ms, T_one_device {med['one_device'] * 1e3:.1f} ms, "
        f"transfer {transfer * 1e3:.2f} ms\n"
    )
    head = f"{'schedule':17s} {'runtime':7s} {'step ms':>8s} {'eta':>6s} {'E':>6s}"
    print(head + f" {'vs torch':>9s} {'bubble':>7s} {'sim':>7s}")
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
            if runtime == "ppfast":
                per_rank = [g[0].get(k) for g in gathered]
                if all(per_rank):
                    row["bubble"] = statistics.mean(statistics.median(b) for b in per_rank)
                per_stage = {s: c for g in gathered for s, c in g[1].get(k, {}).items()}
                row["simulated_bubble"] = simulated_bubble(name, p, m, per_stage, transfer)
                row["costs_ms"] = {
                    s: {kd: v * 1e3 for kd, v in c.items()} for s, c in sorted(per_stage.items())
                }
            rows.append(row)
            cells = [
                f"{ratio:8.2f}x" if ratio else "",
                f"{row['bubble']:7.1%}" if "bubble" in row else "",
                f"{row['simulated_bubble']:7.1%}"
                if row.get("simulated_bubble") is not None
                else "",
            ]
            print(
                f"{name:17s} {runtime:7s} {t * 1e3:8.1f} {row['eta']:6.3f} {row['E']:6.3f} "
                f"{cells[0]:>9s} {cells[1]:>7s} {cells[2]:>7s}"
            )
    setup = {k: v for k, v in vars(args).items() if k != "json"}
    return {
        "machine": describe(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "setup": setup,
        "T_limit_s": med["limit"],
        "T_one_device_s": med["one_device"],
        "transfer_s": transfer,
        "rows": rows,
        "raw": times,
    }


if __name__ == "__main__":
    sys.exit(main())
