"""Soak run: thousands of PP x DP steps over shared memory, and nothing may grow.

    python bench/soak.py [--steps 2000] [--schedules 1f1b,zb-h1,zb-v,interleaved-1f1b]
                         [--sample-every 10] [--warmup 0.25] [--json bench/results/soak.json]

Four spawned processes (``--pp 2 --dp 2``): two data-parallel replicas of a two-rank pipeline.
gloo carries the mesh's groups (the replicas' gradient all-reduce in
``ppfast.parallel.DataParallelGrads``, clipping, barriers) and ppfast's shared-memory
transport the pipeline. Each schedule of ``--schedules`` has its own model (4 pre-norm
attention blocks, their Linear layers split by ``ppfast.nn.convert`` so zero-bubble
schedules defer weight gradients), stages built with ``dynamic_shapes=True``, schedule,
reducer and SGD optimizer, all built once; step k runs schedule k mod len(schedules) on a
batch whose sequence length is drawn per step from ``--seq-min``, ``--seq-min`` +
``--seq-step``, ... ``--seq-max`` (the same draw on every rank; the first round of the schedules
at ``--seq-max``). In every ``--eval-every``-th round of the schedules, the first round
included, each schedule also runs ``eval`` after its step.

Every ``--sample-every`` steps the ranks meet at a barrier (no message in flight) and each
reads its resident memory (VmRSS, with RssAnon and RssShmem beside it), open file
descriptors (/proc/self/fd), threads (/proc/self/task) and its mappings of ppfast shared
memory (/proc/self/maps); rank 0 also counts the /dev/shm/ppfast-* names, host-wide and
those created by this run's processes.

What "flat" means. The first ``--warmup`` share of the steps is warm-up (glibc's heap, the
executor's buffer pools and the transport's segments grow to the largest sequence seen);
the rest is the measured window, and each rank is judged on it:

- resident memory: the least-squares slope of RSS over the window times the window's
  length (the trend), and the median of the window's last quarter minus that of its first
  quarter (a step up that stays), must both be at most ``--rss-tol-mib``. The run also
  states what a leak of one activation per step (one microbatch at the longest sequence,
  ``mb x seq_max x dim`` fp32) would add over the window, and refuses to judge when that is
  less than twice the tolerance;
- file descriptors, threads and this run's /dev/shm/ppfast-* names: must not grow at all:
  the smallest value over the window's last quarter may not exceed the value at the
  window's first sample (a transient one, gone by the last quarter, passes; one that stays
  fails). The host-wide /dev/shm count is reported, not judged: other processes on the
  host may be running pipelines;
- mappings of ppfast shared memory: at most the transport's bound (64 message slots per
  peer and direction, per schedule). A slot's data segment is mapped the first time all
  mapped slots are busy at once, so the count follows the deepest backlog of messages seen,
  which depends on timing and may rise by a few late in a run; an old segment that is
  never unmapped would pass the bound.

It prints a per-metric summary with the verdict, writes the curves, the setup and the
machine to ``--json`` (default bench/results/soak.json), and exits 1 on growth (2 when the
run itself fails). ``--leak tensor,fd,thread,shm`` makes every rank keep one activation-sized
tensor, one open file, one sleeping thread per step (and rank 0 one /dev/shm/ppfast-* name),
to show that the detector fires; tests/test_soak.py uses it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import multiprocessing as mp
import os
import queue as queue_mod
import re
import statistics
import sys
import threading
import time
import traceback
from array import array
from datetime import timedelta
from pathlib import Path

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "soak.json"
SHM_DIR = "/dev/shm"
LEAKS = ("tensor", "fd", "thread", "shm")
# metrics that must not grow at all after warm-up (counts); "rss" is judged by its tolerance,
# "shm_maps" by its bound
COUNTS = ("fds", "threads")
# data segments one shm transport maps per peer and direction at most (kSlots in
# csrc/runtime/shm_transport.cpp): one per message slot, created the first time every
# mapped slot is full or too small at once, so their number follows the deepest backlog
# seen, which depends on timing, and may still rise late in a run
SHM_SLOTS = 64
MiB = 1 << 20


# ---------------------------------------------------------------------------- sampling


def _mallinfo():
    """glibc's mallinfo2 (all arenas), or None off glibc 2.33+."""
    import ctypes

    class Info(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t)
            for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks")
            + ("uordblks", "fordblks", "keepcost")
        ]

    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = Info
    return fn


def read_process() -> dict:
    """This process's resident memory (bytes) and its counts of fds, threads and mappings of
    ppfast shared memory."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    maps = 0
    with open("/proc/self/maps") as f:
        for line in f:
            if "/ppfast-" in line:
                maps += 1
    heap = {}
    if _MALLINFO is not None:
        info = _MALLINFO()
        # in use: what malloc handed out and has not had back (not what it keeps for reuse)
        heap = {"heap_used": info.uordblks + info.hblkhd, "heap_free": info.fordblks}
    return {
        **heap,
        "rss": out["VmRSS"],
        "rss_anon": out.get("RssAnon", 0),
        "rss_shmem": out.get("RssShmem", 0),
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": len(os.listdir("/proc/self/task")),
        "shm_maps": maps,
    }


_MALLINFO = _mallinfo()
_SHM_NAME = re.compile(r"ppfast-(\d+)-")


def object_census() -> dict[str, int]:
    """Live objects the garbage collector tracks, counted by type."""
    from collections import Counter

    return dict(Counter(type(o).__qualname__ for o in gc.get_objects()))


def census_growth(before: dict, after: dict, top: int = 10) -> dict[str, int]:
    grown = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
    return dict(sorted(grown.items(), key=lambda kv: -kv[1])[:top])


def shm_names(pids=None, where: str = SHM_DIR) -> int:
    """How many ppfast-* names /dev/shm holds: all of them, or those created by ``pids``."""
    try:
        names = os.listdir(where)
    except OSError:
        return 0
    n = 0
    for name in names:
        m = _SHM_NAME.match(name)
        if m is not None and (pids is None or int(m.group(1)) in pids):
            n += 1
    return n


# ---------------------------------------------------------------------------- the model


def make_block(dim: int, heads: int):
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        """Pre-norm causal self-attention and MLP; any sequence length."""

        def __init__(self):
            super().__init__()
            self.heads = heads
            self.ln1 = nn.LayerNorm(dim)
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
            self.ln2 = nn.LayerNorm(dim)
            self.fc1 = nn.Linear(dim, 2 * dim)
            self.fc2 = nn.Linear(2 * dim, dim)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
            a = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            )
            x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    return Block()


def seq_of(step: int, args) -> int:
    """The sequence length of a step: the same on every rank, varying from step to step. The
    first round of the schedules runs at the longest, so that each reaches its peak memory
    early in warm-up rather than whenever the draw first gives it."""
    import random

    if step < len(args.schedules.split(",")):
        return args.seq_max
    draw = random.Random(step * 7919 + 17)
    return draw.randrange(args.seq_min, args.seq_max + 1, args.seq_step)


def leak_bytes(args) -> int:
    """One activation: a microbatch at the longest sequence, fp32."""
    return args.microbatch * args.seq_max * args.dim * 4


# ---------------------------------------------------------------------------- one rank


class _Schedule:
    def __init__(self, name: str, mesh, args):
        import torch

        import ppfast
        import ppfast.parallel

        program = ppfast.generate(name, mesh.pp_size, args.microbatches)
        n = program.num_stages
        mine = program.stages_of(mesh.pp_rank)
        torch.manual_seed(0)
        blocks = [make_block(args.dim, args.heads) for _ in range(args.blocks)]
        if args.blocks % n:
            raise ValueError(f"--blocks {args.blocks} does not split into {n} stages ({name})")
        per = args.blocks // n
        mods = {
            s: ppfast.nn.convert(torch.nn.Sequential(*blocks[s * per : (s + 1) * per]))
            for s in mine
        }
        stages = [
            ppfast.PipelineStage(mods[s], s, n, "cpu", group=mesh.pp_group, dynamic_shapes=True)
            for s in mine
        ]
        self.name = name
        self.first, self.last = 0 in mine, n - 1 in mine
        self.sched = ppfast.get_schedule_class(name)(
            stages if len(stages) > 1 else stages[0],
            args.microbatches,
            torch.nn.functional.mse_loss,
            transport="shm",
            timeout=args.step_timeout,
        )
        self.reducer = ppfast.parallel.DataParallelGrads(
            self.sched, mesh.dp_group, timeout=args.step_timeout
        )
        self.params = [q for mod in mods.values() for q in mod.parameters()]
        self.opt = torch.optim.SGD(self.params, lr=1e-3, momentum=0.9)


def _batch(step: int, args, mesh):
    import torch

    seq = seq_of(step, args)
    g = torch.Generator().manual_seed(step)
    n = mesh.dp_size * args.microbatches * args.microbatch
    x = torch.randn(n, seq, args.dim, generator=g)
    y = torch.randn(n, seq, args.dim, generator=g)
    return mesh.shard(x, y)


class _Leaks:
    """What ``--leak`` keeps, one of each per step, and its release at the end."""

    def __init__(self, kinds: list[str], rank: int, nbytes: int):
        self.kinds, self.rank, self.nbytes = kinds, rank, nbytes
        self.tensors, self.fds, self.names = [], [], []
        self.stop = threading.Event()
        self.threads = []

    def step(self, step: int) -> None:
        import torch

        if "tensor" in self.kinds:
            self.tensors.append(torch.ones(self.nbytes // 4))  # written: resident
        if "fd" in self.kinds:
            self.fds.append(os.open(os.devnull, os.O_RDONLY))
        if "thread" in self.kinds:
            t = threading.Thread(target=self.stop.wait, daemon=True)
            t.start()
            self.threads.append(t)
        if "shm" in self.kinds and self.rank == 0:
            name = os.path.join(SHM_DIR, f"ppfast-{os.getpid()}-soakleak{step}")
            with open(name, "wb"):
                pass
            self.names.append(name)

    def release(self) -> None:
        self.stop.set()
        for fd in self.fds:
            os.close(fd)
        for name in self.names:
            with contextlib.suppress(OSError):
                os.unlink(name)
        for t in self.threads:
            t.join(5)
        self.tensors.clear()


def rank_main(rank: int, world: int, port: int, args, results) -> None:
    import faulthandler

    faulthandler.enable()  # a crash in native code prints where it was
    try:
        out = _rank_run(rank, world, port, args)
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, "error", traceback.format_exc()))
    results.close()
    results.join_thread()


def _rank_run(rank: int, world: int, port: int, args) -> dict:
    import torch
    import torch.distributed as dist

    import ppfast
    import ppfast.parallel

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    timeout = timedelta(seconds=args.step_timeout)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    mesh = ppfast.parallel.pipeline_mesh(pp=args.pp, dp=args.dp, device_type="cpu")
    pids = [None] * world
    dist.all_gather_object(pids, os.getpid())
    pids = set(pids)
    names = args.schedules.split(",")
    runs = [_Schedule(name, mesh, args) for name in names]
    leaks = _Leaks(args.leak, rank, leak_bytes(args))
    samples = []
    # preallocated: the harness itself must not grow during the window
    step_times = {name: array("d", [0.0]) * (args.steps // len(names) + 1) for name in names}

    census = {}

    def sample(step: int) -> None:
        dist.barrier()  # every rank between steps: no message, no segment in flight
        gc.collect()
        s = {"step": step, "time": time.monotonic(), **read_process()}
        if rank == 0:
            s["shm_names"] = shm_names(pids)
            s["shm_names_host"] = shm_names()
        samples.append(s)
        if step == args.warmup_step or step == args.steps:
            census[step] = object_census()
        dist.barrier()

    sample(0)
    t_start = time.monotonic()
    for step in range(args.steps):
        run = runs[step % len(runs)]
        x, y = _batch(step, args, mesh)
        t = time.perf_counter()
        run.opt.zero_grad()
        run.sched.step(*((x,) if run.first else ()), target=y if run.last else None)
        run.reducer.reduce()
        ppfast.clip_grad_norm_(run.sched, 1.0)
        run.opt.step()
        if args.eval_every and (step // len(runs)) % args.eval_every == 0:
            with torch.no_grad():
                run.sched.eval(*((x,) if run.first else ()), target=y if run.last else None)
        step_times[run.name][step // len(runs)] = time.perf_counter() - t
        leaks.step(step)
        if (step + 1) % args.sample_every == 0 or step + 1 == args.steps:
            sample(step + 1)
    wall = time.monotonic() - t_start
    leaks.release()
    dist.barrier()
    return {
        "rank": rank,
        "pp_rank": mesh.pp_rank,
        "dp_rank": mesh.dp_rank,
        "pid": os.getpid(),
        "samples": samples,
        # Python objects by type that grew over the measured window (most first)
        "objects_grown": census_growth(census.get(args.warmup_step, {}), census[args.steps]),
        "wall_s": wall,
        "step_ms_median": {
            name: 1e3 * statistics.median(step_times[name][: len(range(k, args.steps, len(names)))])
            for k, name in enumerate(names)
            if k < args.steps
        },
    }


# ---------------------------------------------------------------------------- the verdict


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def _quarters(window: list) -> tuple[list, list]:
    q = max(1, len(window) // 4)
    return window[:q], window[-q:]


def judge_rss(steps: list[int], rss: list[float], warmup_step: int, tol_mib: float) -> dict:
    """RSS (bytes) sampled at ``steps``: its growth over the samples from ``warmup_step`` on,
    as a least-squares trend over the window and as last-quarter median minus first-quarter
    median; growth when either exceeds ``tol_mib``."""
    pts = [(s, r) for s, r in zip(steps, rss, strict=True) if s >= warmup_step]
    if len(pts) < 4:
        raise ValueError(f"{len(pts)} samples after warm-up; sample more often or run longer")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    span = xs[-1] - xs[0]
    trend = _slope(xs, ys) * span / MiB
    first, last = _quarters(ys)
    step_up = (statistics.median(last) - statistics.median(first)) / MiB
    return {
        "window": [xs[0], xs[-1]],
        "start_mib": ys[0] / MiB,
        "end_mib": ys[-1] / MiB,
        "min_mib": min(ys) / MiB,
        "max_mib": max(ys) / MiB,
        "trend_mib": trend,
        "quarter_step_mib": step_up,
        "tol_mib": tol_mib,
        "grew": trend > tol_mib or step_up > tol_mib,
    }


def judge_count(steps: list[int], values: list[int], warmup_step: int) -> dict:
    """A count (fds, threads, mappings, names) sampled at ``steps``: growth when the smallest
    value of the window's last quarter exceeds the value at the window's first sample."""
    window = [v for s, v in zip(steps, values, strict=True) if s >= warmup_step]
    if len(window) < 4:
        raise ValueError(f"{len(window)} samples after warm-up; sample more often or run longer")
    _, last = _quarters(window)
    return {
        "start": window[0],
        "end": window[-1],
        "max": max(window),
        "growth": min(last) - window[0],
        "grew": min(last) > window[0],
    }


def judge_bounded(steps: list[int], values: list[int], warmup_step: int, bound: int) -> dict:
    """A count that may rise to ``bound`` (shm mappings): growth when it passes it."""
    window = [v for s, v in zip(steps, values, strict=True) if s >= warmup_step]
    return {
        "start": window[0],
        "end": window[-1],
        "max": max(values),
        "growth": window[-1] - window[0],
        "bound": bound,
        "grew": max(values) > bound,
    }


def maps_bound(args) -> int:
    """The most shm data segments a rank can map: per schedule (one transport each), one per
    slot, per pipeline peer and direction."""
    return len(args.schedules.split(",")) * SHM_SLOTS * 2 * (args.pp - 1)


def judge(per_rank: list[dict], warmup_step: int, tol_mib: float, bound: int) -> dict:
    """Per metric, per rank: the verdict on the samples of every rank (rank 0's for names)."""
    out: dict = {"rss": {}, **{k: {} for k in COUNTS}, "shm_names": {}, "shm_maps": {}}
    for r in per_rank:
        steps = [s["step"] for s in r["samples"]]
        out["rss"][r["rank"]] = judge_rss(
            steps, [s["rss"] for s in r["samples"]], warmup_step, tol_mib
        )
        for k in COUNTS:
            out[k][r["rank"]] = judge_count(steps, [s[k] for s in r["samples"]], warmup_step)
        out["shm_maps"][r["rank"]] = judge_bounded(
            steps, [s["shm_maps"] for s in r["samples"]], warmup_step, bound
        )
        if "shm_names" in r["samples"][0]:
            out["shm_names"][r["rank"]] = judge_count(
                steps, [s["shm_names"] for s in r["samples"]], warmup_step
            )
    return out


def any_growth(verdict: dict) -> list[str]:
    """The metrics that grew, as 'metric on rank r'."""
    return [
        f"{metric} on rank {rank}"
        for metric, ranks in verdict.items()
        for rank, v in ranks.items()
        if v["grew"]
    ]


# ---------------------------------------------------------------------------- the run


def spawn(args) -> list[dict]:
    """Run the ranks; their results by rank. Raises RuntimeError naming the rank that failed,
    or when the run is past ``--timeout`` (every process is killed then)."""
    world = args.pp * args.dp
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    from ppfast.tools.benchmarks.machine import free_port

    port = free_port()
    procs = [
        ctx.Process(target=rank_main, args=(r, world, port, args, results), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    done: dict[int, dict] = {}
    deadline = time.monotonic() + args.timeout
    try:
        while len(done) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world)) - set(done))
                raise RuntimeError(f"ran past --timeout {args.timeout:.0f} s; ranks {missing}")
            try:
                rank, status, payload = results.get(timeout=min(1.0, left))
            except queue_mod.Empty:
                dead = {
                    r: p.exitcode
                    for r, p in enumerate(procs)
                    if r not in done and p.exitcode is not None
                }
                if dead:
                    time.sleep(1.0)  # its result may still be in the pipe
                    if results.empty():
                        raise RuntimeError(
                            f"ranks exited without a result (rank: exit code): {dead}"
                        ) from None
                continue
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            done[rank] = payload
    finally:
        for p in procs:
            p.join(max(0.0, 10.0 if len(done) == world else 0.0))
            if p.is_alive():
                p.kill()
                p.join(5)
        results.close()
    return [done[r] for r in range(world)]


def parse_args(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--schedules", default="1f1b,zb-h1,zb-v,interleaved-1f1b")
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=4, help="per replica and step")
    ap.add_argument("--microbatch", type=int, default=2, help="samples per microbatch")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--seq-min", type=int, default=8)
    ap.add_argument("--seq-max", type=int, default=64)
    ap.add_argument("--seq-step", type=int, default=8, help="lengths seq-min + k * seq-step")
    ap.add_argument("--eval-every", type=int, default=5, help="rounds of schedules; 0: never")
    ap.add_argument("--sample-every", type=int, default=10)
    ap.add_argument("--warmup", type=float, default=0.25, help="share of the steps")
    ap.add_argument("--rss-tol-mib", type=float, default=2.0)
    ap.add_argument("--leak", default="", help=f"comma-separated, of {','.join(LEAKS)}")
    ap.add_argument("--step-timeout", type=float, default=60.0, help="seconds, every wait")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds, the whole run")
    ap.add_argument("--json", default=str(DEFAULT_JSON), help="'' writes none")
    args = ap.parse_args(argv)
    args.leak = [k for k in args.leak.split(",") if k]
    bad = [k for k in args.leak if k not in LEAKS]
    if bad:
        ap.error(f"--leak {','.join(bad)}: not one of {','.join(LEAKS)}")
    if not 0 <= args.warmup < 1:
        ap.error("--warmup is a share of the steps, in [0, 1)")
    if args.seq_min < 1 or args.seq_max < args.seq_min:
        ap.error("need 1 <= --seq-min <= --seq-max")
    return args


def run(args, argv: list[str] | None = None) -> dict:
    """The soak run and its verdict, as written to the JSON."""
    from ppfast.tools.benchmarks.machine import facts, header

    warmup_step = math.ceil(args.warmup * args.steps / args.sample_every) * args.sample_every
    args.warmup_step = warmup_step = min(warmup_step, args.steps)
    window = args.steps - warmup_step
    one_leak = leak_bytes(args) * window / MiB
    if one_leak < 2 * args.rss_tol_mib:
        raise ValueError(
            f"a leak of one activation ({leak_bytes(args) >> 10} KiB) per step adds "
            f"{one_leak:.1f} MiB over the {window} measured steps, less than twice "
            f"--rss-tol-mib {args.rss_tol_mib}: run more steps or lower the tolerance"
        )
    t = time.monotonic()
    per_rank = spawn(args)
    wall = time.monotonic() - t
    verdict = judge(per_rank, warmup_step, args.rss_tol_mib, maps_bound(args))
    setup = {
        k: v
        for k, v in vars(args).items()
        if k not in ("json", "timeout", "step_timeout", "warmup_step")
    }
    return {
        **header("bench/soak.py", argv, machine=facts()),
        "setup": {
            **setup,
            "ranks": f"{args.pp} pipeline ranks x {args.dp} replicas, spawned processes",
            "groups": "gloo",
            "transport": "shm",
            "model": f"{args.blocks} pre-norm attention blocks, width {args.dim}, "
            f"{args.heads} heads, Linear layers split (ppfast.nn.convert)",
            "warmup_steps": warmup_step,
            "leak_per_step_kib": leak_bytes(args) / 1024,
            "one_leak_over_window_mib": one_leak,
        },
        "wall_s": wall,
        "loop_s": max(r["wall_s"] for r in per_rank),
        "step_ms_median": {f"rank{r['rank']}": r["step_ms_median"] for r in per_rank},
        "objects_grown": {f"rank{r['rank']}": r["objects_grown"] for r in per_rank},
        "verdict": verdict,
        "grew": any_growth(verdict),
        "ranks": [
            {
                "rank": r["rank"],
                "pp_rank": r["pp_rank"],
                "dp_rank": r["dp_rank"],
                "samples": [{k: v for k, v in s.items() if k != "time"} for s in r["samples"]],
            }
            for r in per_rank
        ],
    }


def summary(record: dict) -> str:
    s = record["setup"]
    lines = [
        f"{record['machine']['cpu']}, {record['machine']['cores']} cores, torch "
        f"{record['machine']['torch']}",
        f"{s['steps']} steps over {s['schedules']}; {s['ranks']}, {s['transport']} pipeline, "
        f"seq {s['seq_min']}..{s['seq_max']}; warm-up {s['warmup_steps']} steps; "
        f"wall {record['wall_s']:.0f} s",
        f"one activation ({s['leak_per_step_kib']:.0f} KiB) leaked per step would add "
        f"{s['one_leak_over_window_mib']:.1f} MiB over the window; RSS tolerance "
        f"{s['rss_tol_mib']} MiB",
        f"{'metric':12s} {'rank':>4s} {'start':>9s} {'end':>9s} {'max':>9s} {'growth':>17s}  "
        "verdict",
    ]
    for metric, ranks in record["verdict"].items():
        for rank, v in sorted(ranks.items()):
            if metric == "rss":
                vals = (f"{v['start_mib']:.1f}M", f"{v['end_mib']:.1f}M", f"{v['max_mib']:.1f}M")
                growth = f"{v['trend_mib']:+.2f}/{v['quarter_step_mib']:+.2f} M"
            else:
                vals = (str(v["start"]), str(v["end"]), str(v["max"]))
                growth = f"{v['growth']:+d}" + (f" (<={v['bound']})" if "bound" in v else "")
            verdict = "GREW" if v["grew"] else "flat"
            lines.append(
                f"{metric:12s} {rank:>4} {vals[0]:>9s} {vals[1]:>9s} {vals[2]:>9s} "
                f"{growth:>17s}  {verdict}"
            )
    lines.append("rss growth: least-squares trend over the window / last-quarter minus first")
    lines.append("verdict: " + ("GREW: " + ", ".join(record["grew"]) if record["grew"] else "flat"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        record = run(args, argv)
    except (RuntimeError, ValueError) as e:
        print(f"soak run failed: {e}", file=sys.stderr)
        return 2
    print(summary(record))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        from ppfast.tools.benchmarks.machine import write_record

        write_record(args.json, record)
    return 1 if record["grew"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
