"""What the P2P benchmark times at each end: ping-pong latency, and a transfer's overlap with
compute (see ppfast.tools.benchmarks.p2p for the definitions)."""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time

import torch


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# ---------------------------------------------------------------- what one rank needs


def pingpong(ep, buf, reps: int) -> list[float]:
    """One-way times: half of each round trip, on this rank's clock."""
    out = []
    for _ in range(reps):
        ep.sync()
        t = time.perf_counter()
        if ep.rank == 0:
            ep.send(buf).wait()
            ep.recv(buf).wait()
        else:
            ep.recv(buf).wait()
            ep.send(buf).wait()
        ep.sync()
        out.append((time.perf_counter() - t) / 2)
    return out


@contextlib.contextmanager
def busy(compute):
    """A second thread runs the matmul loop until the block ends (mm releases the GIL)."""
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            compute(1)

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()


def timed(ep, fn) -> tuple[float, float]:
    """fn's wall time from a barrier and this process's CPU time in it, each the ranks' max."""
    ep.barrier()
    ep.sync()
    cpu, t = time.process_time(), time.perf_counter()
    fn()
    ep.sync()
    wall, cpu = ep.max([time.perf_counter() - t, time.process_time() - cpu])
    return wall, cpu


def overlap(ep, buf, compute, reps: int) -> dict:
    sender = ep.rank == 0

    def run(k: int) -> tuple[float, float]:
        """Rank 0 sends buf to rank 1 while both run k matmuls (k = 0: the transfer alone)."""
        early = ep.recv(buf) if ep.prepost and not sender else None

        def body():
            work = ep.send(buf) if sender else early if early is not None else ep.recv(buf)
            compute(k)
            work.wait()

        return timed(ep, body)

    t_comm = statistics.median(run(0)[0] for _ in range(3))
    t_mm = statistics.median(timed(ep, lambda: compute(1))[0] for _ in range(3))
    k = max(1, round(t_comm / t_mm))  # both ranks see the same maxima, so the same k
    got: dict[str, list] = {"c": [], "m": [], "b": []}
    take = {"c": lambda: timed(ep, lambda: compute(k)), "m": lambda: run(0), "b": lambda: run(k)}
    for i in range(reps):
        for which in ("cmb", "mbc", "bcm")[i % 3]:  # in turn, so drift hits all three alike
            got[which].append(take[which]())
    tc, tm, tb = (statistics.median(w for w, _ in got[x]) for x in "cmb")
    return {
        "matmuls": k,
        "t_compute_s": tc,
        "t_comm_s": tm,
        "t_both_s": tb,
        "overlap_efficiency": (tc + tm - tb) / min(tc, tm),
        "comm_cpu_s": None if ep.cuda else statistics.median(c for _, c in got["m"]),
    }


def measure(ep, opts: dict) -> list[dict] | None:
    """Every measurement on one rank; rank 0 returns the rows."""
    torch.set_num_threads(opts["threads"])
    if opts["compute_nice"] and not ep.cuda:
        # this thread and those it starts yield to gloo's threads, which init_process_group
        # started and which keep their priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), opts["compute_nice"])
    n = opts["matmul"]
    gen = torch.Generator().manual_seed(0)
    with ep.computing():  # made on the stream that uses them
        a, b = (torch.randn(n, n, generator=gen).to(ep.device) for _ in range(2))
        c = torch.empty_like(a)

    def compute(k: int) -> None:
        with ep.computing():
            for _ in range(k):
                torch.mm(a, b, out=c)

    rows = []
    for size in opts["sizes"]:
        with ep.computing():
            buf = torch.zeros(size, dtype=torch.uint8, device=ep.device)
        warm = pingpong(ep, buf, opts["warmup"])  # the first one may set up a connection
        (typical,) = ep.max([statistics.median(warm) if warm else 0.0])
        # as many repetitions as fit the time given to each size (both ranks agree)
        reps = int(min(opts["reps"], max(5, opts["seconds"] / max(2 * typical, 1e-9))))
        lat = pingpong(ep, buf, reps)
        row = {"bytes": size, "reps": reps, "p50_s": statistics.median(lat)}
        row |= {"p99_s": percentile(lat, 0.99), "gbps": size / row["p50_s"] / 1e9}
        if opts["loaded"] and not ep.cuda and size <= opts["overlap_min"]:
            ep.barrier()
            with busy(compute):
                pingpong(ep, buf, opts["warmup"])
                lat = pingpong(ep, buf, reps)
            row |= {"loaded_p50_s": statistics.median(lat), "loaded_p99_s": percentile(lat, 0.99)}
        if size >= opts["overlap_min"]:
            row |= overlap(ep, buf, compute, opts["overlap_reps"])
        ep.sync()
        rows.append(row)
    return rows if ep.rank == 0 else None


# ---------------------------------------------------------------- launching the ranks
