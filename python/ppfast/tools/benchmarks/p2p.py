"""Point-to-point benchmark: send/recv latency, bandwidth and compute overlap between two ranks.

Modes (``--mode``; ``auto`` takes nccl or gloo under torchrun, else local with a GPU, else gloo):

  gloo    CPU tensors over gloo: two ranks launched by torchrun or, without it, two local
          processes started here on a free port.
  shm     the same two CPU ranks, but the messages go through ppfast's shared-memory
          transport (what schedules use between CPU ranks of one host); gloo only times.
  nccl    GPU tensors over NCCL, one GPU per rank, two ranks launched by torchrun.
  local   one process, one GPU, the two ranks as threads. ppfast's in-process transport is
          reachable only from the executor and copies on the current stream of the thread that
          posts second, so this mode uses plain CUDA streams and events: each rank has a
          compute stream and a send stream; a send waits (on the GPU) for the sender's compute
          and the receiver's buffer, copies device to device on the send stream and hands its
          completion event to the receiver, whose compute stream waits on it. ``--device
          cpu`` runs the same hand-off with plain copies, to check it without a GPU.

What is timed (host clock; on a GPU after synchronising the rank's streams):

  latency   one-way time = half a ping-pong round trip; p50 and p99 over the repetitions;
            GB/s = bytes / p50. On CPU, ``p50/p99 load`` repeat it while a second thread of
            each rank runs the matmul loop, as a pipeline stage computes while it talks.
  overlap   rank 0 sends one message to rank 1, whose receive is posted before the clock
            starts (as the executor posts receives early). Both ranks run the same loop of
            ``--matmul``-sized fp32 matmuls, sized to take about as long as the transfer, on
            the thread (or compute stream) that posts, with one intra-op thread per rank on
            CPU, while gloo's threads (NCCL, the send stream) move the bytes. T_compute (the
            loop alone), T_comm (the transfer alone) and T_both (post, loop, wait) are each
            the slower rank's time from a barrier, medians of repetitions taken in turn;
                overlap = (T_compute + T_comm - T_both) / min(T_compute, T_comm)
            (1: the shorter one is hidden entirely; 0: nothing is). comm CPU (CPU modes) is
            the CPU time the slower rank's process spent during T_comm, all threads, user and
            system: the part of a transfer that needs a core, which a busy core cannot hide.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from .p2p_endpoints import DistEndpoint, LocalEndpoint, LocalHub, ShmEndpoint
from .p2p_measure import measure

DEFAULT_JSON = Path("bench") / "results" / "p2p.json"
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes from '4096', '4K', '4KiB', '256M' or '1G' (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in UNITS else ""
    try:
        n = int(t[: len(t) - len(unit)]) * UNITS[unit]
    except ValueError:
        raise ValueError(f"size {text!r}: write a whole number of bytes, like 4K or 256M") from None
    if n <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return n


def sizes_between(lo: int, hi: int, factor: int) -> list[int]:
    if lo > hi:
        raise ValueError(f"--min-size {lo} is above --max-size {hi}; swap them")
    out = [lo]
    while out[-1] * factor <= hi:
        out.append(out[-1] * factor)
    return out


def run_launched(opts: dict, backend: str) -> list[dict] | None:
    """This process is one of two ranks (torchrun's or ours); rank 0's rows, None elsewhere."""
    if (world := int(os.environ["WORLD_SIZE"])) != 2:
        raise ValueError(f"WORLD_SIZE is {world}; p2p needs 2 (torchrun --nproc-per-node 2)")
    device, extra = torch.device("cpu"), {}
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        extra["device_id"] = device
    timeout = datetime.timedelta(seconds=opts["timeout"])
    dist.init_process_group(backend, timeout=timeout, **extra)
    try:
        endpoint = ShmEndpoint if opts.get("transport") == "shm" else DistEndpoint
        return measure(endpoint(device, opts["post"] == "thread"), opts)
    finally:
        dist.destroy_process_group()


def _spawned_rank(rank: int, port: int, opts: dict, results) -> None:
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank)}
    os.environ.update(env, WORLD_SIZE="2")
    rows = run_launched(opts, "gloo")
    if rank == 0:
        results.put(rows)


def run_spawned(opts: dict) -> list[dict]:
    """Two local gloo processes; rank 0's rows. A rank's error is raised with its traceback."""
    results = torch.multiprocessing.get_context("spawn").SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = torch.multiprocessing.spawn(
        _spawned_rank, (port, opts, results), nprocs=2, join=False, daemon=True
    )
    deadline, rows = time.monotonic() + opts["timeout"], None
    while not procs.join(timeout=0.5):
        if rows is None and not results.empty():
            rows = results.get()  # read as it comes, so rank 0 never blocks writing it
        if time.monotonic() > deadline:
            for proc in procs.processes:
                proc.kill()
            raise RuntimeError(f"the gloo ranks ran past --timeout {opts['timeout']:g} s")
    return results.get() if rows is None else rows


def run_local(opts: dict, device: torch.device) -> list[dict]:
    """Two thread ranks in this process; rank 0's rows."""
    hub, out, errors = LocalHub(), [None, None], []

    def body(rank: int) -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            out[rank] = measure(LocalEndpoint(hub, rank, device), opts)
        except BaseException:  # noqa: BLE001 - reported below, with the other rank's
            errors.append(f"rank {rank}:\n{traceback.format_exc()}")
            hub.gate.abort()  # the other rank stops at its next barrier instead of waiting

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(opts["timeout"])
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError("\n".join(errors) or f"ran past --timeout {opts['timeout']:g} s")
    return out[0]


# ---------------------------------------------------------------- the command

OPTIONS = [  # flag, default, type or choices, help (which gets the default added)
    ("--mode", "auto", ("auto", "gloo", "shm", "nccl", "local"), "see above"),
    ("--device", "cuda", str, "local mode: cuda[:N] or cpu"),
    ("--min-size", "4K", str, "smallest message"),
    ("--max-size", "256M", str, "largest message"),
    ("--factor", 4, (2, 4), "step between sizes"),
    ("--reps", 200, int, "ping-pongs per size, at most"),
    ("--seconds", 2.0, float, "ping-pong time per size, about (5 ping-pongs at least)"),
    ("--warmup", 5, int, "ping-pongs before timing"),
    ("--overlap-min", "1M", str, "smallest size for overlap; loaded latency is taken up to it"),
    ("--overlap-reps", 15, int, "repetitions of each overlap time"),
    ("--matmul", 256, int, "side of the square fp32 matmul"),
    ("--threads", 1, int, "intra-op threads per rank on CPU"),
    ("--post", "caller", ("caller", "thread"), "who posts: the computing thread, as ppfast's "
     "executor does, or a thread of its own (gloo, NCCL)"),
    ("--compute-nice", 0, int, "CPU: the computing thread's nice (0..19), below gloo's threads"),
    ("--timeout", 1800.0, float, "seconds before giving up"),
]  # fmt: skip


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ppfast bench p2p",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, default, kind, text in OPTIONS:
        how = (
            {"choices": kind, "type": type(default)} if isinstance(kind, tuple) else {"type": kind}
        )
        ap.add_argument(flag, default=default, help=f"{text} (default {default})", **how)
    ap.add_argument(
        "--loaded",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CPU: also time ping-pongs while each rank computes (default on)",
    )
    ap.add_argument(
        "--json",
        nargs="?",
        const=str(DEFAULT_JSON),
        metavar="PATH",
        help=f"write the results as JSON (PATH defaults to {DEFAULT_JSON})",
    )
    return ap


def resolve(args) -> tuple[str, torch.device | None, str | None]:
    """(mode, the local mode's device, why it cannot run here or None)."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    mode, gpu = args.mode, torch.cuda.is_available()
    if mode == "auto":
        mode = ("nccl" if gpu else "gloo") if launched else ("local" if gpu else "gloo")
    if mode == "local" and launched:
        raise ValueError("mode local runs its two ranks in one process; start it without torchrun")
    device = None
    if mode == "local":
        try:
            device = torch.device(args.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cuda", "cpu"):
            raise ValueError(f"--device {args.device!r}: give cuda, cuda:N or cpu")
    if not gpu and (mode == "nccl" or (device is not None and device.type == "cuda")):
        return mode, device, f"mode {mode} needs a CUDA device; torch {torch.__version__} sees none"
    if mode == "nccl" and not launched:
        raise ValueError(
            "mode nccl runs under torchrun: torchrun --nproc-per-node 2 -m ppfast "
            "bench p2p --mode nccl"
        )
    if device is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return mode, device, None


def table(rows: list[dict]) -> str:
    def fmt(s: float | None) -> str:
        return "-" if s is None else f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"

    cols = ["size", "p50", "p99", "GB/s", "p50 load", "p99 load", "T_compute", "T_comm"]
    lines = ["".join(f"{c:>11s}" for c in [*cols, "T_both", "overlap", "comm CPU"])]
    for r in rows:
        n, eff = r["bytes"], r.get("overlap_efficiency")
        units = ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"), (1, "B"))
        size = next(f"{n / u:.3g} {name}" for u, name in units if n >= u)
        cells = [size, fmt(r["p50_s"]), fmt(r["p99_s"]), f"{r['gbps']:.2f}"]
        keys = ("loaded_p50_s", "loaded_p99_s", "t_compute_s", "t_comm_s", "t_both_s")
        cells += [fmt(r.get(k)) for k in keys]
        cells += ["-" if eff is None else f"{eff:.2f}", fmt(r.get("comm_cpu_s"))]
        lines.append("".join(f"{c:>11s}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    for name in ("reps", "overlap_reps", "matmul", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.compute_nice <= 19:
        raise ValueError("--compute-nice must be between 0 and 19 (a lower priority)")
    keys = ("reps", "seconds", "warmup", "overlap_reps", "matmul", "threads", "loaded")
    opts = {k: getattr(args, k) for k in (*keys, "timeout", "post", "compute_nice")}
    opts["sizes"] = sizes_between(parse_size(args.min_size), parse_size(args.max_size), args.factor)
    opts["overlap_min"] = parse_size(args.overlap_min)
    mode, device, why_not = resolve(args)
    opts["transport"] = "shm" if mode == "shm" else "c10d"
    if why_not:
        print(f"ppfast bench p2p: skipped: {why_not}", file=sys.stderr)
        return 0
    load = os.getloadavg()[0]
    if mode == "local":
        launch, rows = "two threads of one process", run_local(opts, device)
    elif "RANK" in os.environ:
        launch, rows = "torchrun", run_launched(opts, "gloo" if mode == "shm" else mode)
    else:
        launch, rows = "two local processes", run_spawned(opts)
    if rows is None:  # not rank 0 of a torchrun launch
        return 0
    from . import write_results
    from .machine import describe

    shown = [a for a in argv if not a.startswith("--json") and a != args.json]  # no paths
    res = {
        "benchmark": "p2p",
        "mode": mode,
        "launch": launch,
        "command": " ".join(["ppfast bench p2p", *shown]),
        "machine": describe(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # other work on the machine slows transfers down; the load at the end includes ours
        "load_average_1min": {"start": load, "end": os.getloadavg()[0]},
        "latency": "one-way = half a ping-pong round trip, host clock",
        "overlap": "rank 0 -> rank 1, receive posted first; both ranks run the matmul loop; "
        "times are the slower rank's, medians; overlap = (Tc + Tm - Tb) / min(Tc, Tm)",
        "options": {k: v for k, v in opts.items() if k not in ("sizes", "timeout")},
        "rows": rows,
    }
    print(f"p2p, {mode} ({launch}, posted by the {args.post}), {res['machine']}")
    print(f"load average (1 min) at the start: {load:.2f} (other work slows transfers down)")
    print(f"latency: {res['latency']}\noverlap: {res['overlap']}\n{table(rows)}")
    if args.json:
        print(f"wrote {write_results(args.json, res)}")
    return 0
