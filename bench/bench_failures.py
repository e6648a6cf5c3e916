"""How fast ppfast's ranks notice a failure: a rank killed, a rank that stalls, a corrupted
payload, on each transport.

    python bench/bench_failures.py [--transports shm,gloo,nccl_emu] [--repeats 3]

Three ranks train an MLP with 1F1B (stage r on rank r). In the second step rank 1 fails:

- ``kill``: it exits inside its forward of microbatch 1 (os._exit, after writing down when);
  each survivor's delay is from that moment to its PipelineCommError.
- ``freeze``: it stops there (SIGSTOP): its process lives and its connections stay open, as a
  dead GPU peer looks to NCCL. Over c10d only the transport's beats through the store tell
  (a peer silent for 1.2 s); over shared memory its lock stays, so it counts as a stall.
- ``stall``: it sleeps in that forward for 3 x the timeout (alive, silent); delays are from
  the stall's start, and the first survivor can only give up at its timeout (5 s here).
- ``corrupt``: with PPFAST_CHECKSUM=1 its first send of the step has one bit flipped
  (ppfast.testing's FaultyTransport); delays are from the send.

Transports: shared memory, gloo, and nccl_emu (the c10d transport with NCCL's matching, where
a dead peer is seen through the store's heartbeats, as on NCCL). Prints per case the slowest
survivor's delay (median over repeats) and what the survivors raised; results go to
bench/results/failures.json.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ppfast
from ppfast._native import C
from ppfast.runtime.transports import transport_for
from ppfast.tools.benchmarks.machine import describe, free_port, header, write_record

P, M, WIDTH, TIMEOUT = 3, 4, 256, 5.0
CASES = ("kill", "freeze", "stall", "corrupt")
TRANSPORTS = {"shm": ("gloo", "shm"), "gloo": ("gloo", "c10d"), "nccl_emu": ("nccl_emu", "c10d")}


class Faulty(nn.Module):
    """The stage's layer, which fails in the second step's forward of microbatch 1."""

    def __init__(self, case: str, mark):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU())
        self.case, self.mark, self.calls = case, mark, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == M + 2 and self.case in ("kill", "freeze", "stall"):
            self.mark.value = time.time()
            if self.case == "kill":
                os._exit(1)
            if self.case == "freeze":
                os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(3 * TIMEOUT)
        return self.inner(x)


def rank_main(rank, port, transport, case, mark, queue) -> None:
    backend, kind = TRANSPORTS[transport]
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    os.environ["PPFAST_CHECKSUM"] = "1" if case == "corrupt" else "0"
    torch.set_num_threads(1)
    if backend == "nccl_emu":
        importlib.import_module("ppfast.testing")  # registers the backend
    dist.init_process_group(backend, rank=rank, world_size=P, timeout=timedelta(seconds=60))
    torch.manual_seed(rank)
    module = Faulty(case, mark) if rank == 1 else nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU())
    wire = C.FaultyTransport(transport_for(dist.group.WORLD, "cpu", kind, TIMEOUT))
    stage = ppfast.PipelineStage(module, rank, P, "cpu")
    sched = ppfast.Schedule1F1B(
        stage, M, lambda o, t: ((o - t) ** 2).mean(), timeout=TIMEOUT, transport=wire
    )
    x, y = torch.randn(8 * M, WIDTH), torch.randn(8 * M, WIDTH)
    out = {"rank": rank}
    for k in range(3):
        if rank == 1 and k == 1 and case == "corrupt":
            mark.value = time.time()  # the fault fires at this step's first send
            wire.arm("corrupt", "send", 0)
        try:
            sched.step(x if rank == 0 else None, target=y if rank == P - 1 else None)
        except Exception as e:  # noqa: BLE001 - what it raised is the point
            # the first line: c10's errors go on with a C++ backtrace naming this machine's files
            out.update(at=time.time(), step=k, type=type(e).__name__, text=str(e).splitlines()[0])
            out.update(peer=getattr(e, "peer", None), timed_out=getattr(e, "timed_out", None))
            break
    queue.put(out)
    time.sleep(1.0 if rank != 1 else 4 * TIMEOUT)  # let peers finish before connections close
    os._exit(0)


def run_case(transport: str, case: str) -> dict:
    ctx = mp.get_context("spawn")
    queue, mark = ctx.Queue(), ctx.Value("d", 0.0)
    port = free_port()
    procs = [
        ctx.Process(target=rank_main, args=(r, port, transport, case, mark, queue))
        for r in range(P)
    ]
    for proc in procs:
        proc.start()
    got = {}
    deadline = time.time() + 120
    while len(got) < (2 if case in ("kill", "freeze") else P) and time.time() < deadline:
        try:
            r = queue.get(timeout=1.0)
        except Exception:  # noqa: BLE001 - queue.Empty
            continue
        got[r["rank"]] = r
    for proc in procs:
        proc.join(15)
        if proc.is_alive():
            proc.kill()
    survivors = [got[r] for r in (0, 2) if r in got]
    return {
        "delays": [s["at"] - mark.value if "at" in s else None for s in survivors],
        "raised": [
            {k: s.get(k) for k in ("type", "step", "peer", "timed_out", "text")} for s in survivors
        ],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transports", default=",".join(TRANSPORTS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "failures.json"))
    args = ap.parse_args(argv)
    print(f"{describe()}; 3 ranks, 1F1B, m = {M}, executor timeout {TIMEOUT:g} s; rank 1 fails")
    print(f"{'transport':10s} {'case':8s} {'slowest survivor (median, max)':>32s}  raised")
    rows = []
    for transport in args.transports.split(","):
        for case in CASES:
            runs = [run_case(transport, case) for _ in range(args.repeats)]
            worst = [max(d for d in r["delays"] if d is not None) for r in runs if any(r["delays"])]
            raised = runs[-1]["raised"]
            what = "; ".join(
                f"{r['type']} peer {r['peer']} timed_out {r['timed_out']}" for r in raised
            )
            med = statistics.median(worst) if worst else float("nan")
            top = max(worst) if worst else float("nan")
            print(f"{transport:10s} {case:8s} {med:17.2f} s, {top:5.2f} s max      {what}")
            rows.append({"transport": transport, "case": case, "slowest_s": worst,
                         "median_s": med, "raised": raised})  # fmt: skip
    record = {
        **header("bench/bench_failures.py", argv),
        "setup": {"ranks": P, "microbatches": M, "timeout_s": TIMEOUT, "repeats": args.repeats},
        "rows": rows,
    }
    write_record(args.json, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
