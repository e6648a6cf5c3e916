"""Starting the demo's ranks: CPU processes (a gloo group), torchrun's, or ppfast.Pipe's threads.

Spawned ranks ignore SIGINT (they inherit SIG_IGN from the parent while it starts them, and
set it again themselves), so Ctrl-C reaches the parent alone, which stops every rank and
waits for them. A rank whose parent is gone exits. A failing rank sends its error to the
parent, which prints it once and stops the others.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from ...runtime.transports import check_kind
from .choose import plan, stage_counts
from .options import DemoConfig, parse

# errors a rank raises because another rank failed or went away: they explain nothing
_PEER_WORDS = ("Connection closed by peer", "Connection reset", "Broken pipe", "aborted")


def main(argv: list[str] | None = None) -> int:
    """``ppfast demo ARGS...``; returns the exit status."""
    try:
        cfg = parse(argv)
        cfg, mode = resolve(cfg, os.environ)
        precheck(cfg, mode)
    except SystemExit as e:  # -h, or a flag argparse refused (it has printed why)
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    except ValueError as e:
        print(f"ppfast demo: {e}", file=sys.stderr)
        return 2
    try:
        if mode == "torchrun":
            return _torchrun(cfg)
        if mode == "threads":
            return _threads(cfg)
        return _processes(cfg)
    except KeyboardInterrupt:  # before the ranks started, or after they were stopped
        print("\nppfast demo: interrupted", file=sys.stderr, flush=True)
        return 130


# ---------------------------------------------------------------------- choosing the launch


def resolve(cfg: DemoConfig, env) -> tuple[DemoConfig, str]:
    """The device and how ranks run: "torchrun" (its environment is set), "threads" (one
    process; the default for CUDA without torchrun) or "processes" (gloo ranks on CPU)."""
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: torch sees no CUDA device; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {cfg.device!r}")
    cfg = replace(cfg, device=device)
    if "RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env:
        world = int(env["WORLD_SIZE"])
        if cfg.launch == "threads":
            raise ValueError("--launch threads runs in one process; start it without torchrun")
        return replace(cfg, ranks=world), "torchrun"
    if cfg.launch == "threads" or (cfg.launch == "auto" and device != "cpu"):
        return cfg, "threads"
    if device != "cpu":
        raise ValueError(
            "--launch processes runs gloo ranks on CPU; on GPUs start the demo with "
            "`torchrun --nproc-per-node N -m ppfast demo` (NCCL), or use --launch threads"
        )
    return cfg, "processes"


def precheck(cfg: DemoConfig, mode: str) -> None:
    """Refuse, before any rank starts, settings that no candidate schedule can run."""
    cfg.check()
    counts = stage_counts(cfg.ranks, cfg.schedule)
    unit = {n: [(1.0, 1.0, 1.0)] * n for n in counts}
    plan(cfg.ranks, cfg.microbatches, cfg.layers, unit, 0.0, cfg.schedule)
    try:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {cfg.out}: cannot create the folder ({e.strerror})") from e


# ---------------------------------------------------------------------- gloo processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes(cfg: DemoConfig) -> int:
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    p, port = cfg.ranks, _free_port()
    threads = cfg.threads_per_rank()
    launch = {
        "mode": "processes",
        "backend": "gloo",
        "device": "cpu",
        "ranks": p,
        "threads_per_rank": threads,
        "text": f"{p} processes on CPU (a gloo group; activations through "
        f"{'gloo' if check_kind(None) == 'c10d' else 'shared memory'}), "
        f"{threads} intra-op thread(s) each",
    }
    cores = os.cpu_count() or 1
    if p * threads > cores:
        launch["text"] += (
            f" (more threads than the machine's {cores} cores: ranks take turns on a core, "
            "which shows as bubble)"
        )
    procs, conns = [], []
    # SIG_IGN is inherited by the children (and kept by their interpreters), so a Ctrl-C
    # that reaches the whole process group interrupts only this process
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for r in range(p):
            recv_end, send_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_rank_entry,
                args=(cfg, r, p, port, launch, send_end),
                name=f"ppfast-demo-rank{r}",
                daemon=True,
            )
            proc.start()
            send_end.close()
            procs.append(proc)
            conns.append(recv_end)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        return _supervise(procs, conns, wait)
    except KeyboardInterrupt:
        print("\nppfast demo: interrupted; stopping the ranks", file=sys.stderr, flush=True)
        return 130
    finally:
        # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            _stop(procs)
        finally:
            signal.signal(signal.SIGINT, previous)


def _supervise(procs, conns, wait) -> int:
    """Wait for every rank to finish; on the first error, give the others a moment to report
    theirs (the root cause may come second), print one, and return 1."""
    pending = set(range(len(procs)))
    errors: list[dict] = []
    give_up = None
    by_conn = {id(c): r for r, c in enumerate(conns)}
    by_sentinel = {p.sentinel: r for r, p in enumerate(procs)}
    while pending and (give_up is None or time.monotonic() < give_up):
        live = [c for r, c in enumerate(conns) if r in pending and not c.closed]
        sentinels = [procs[r].sentinel for r in pending]
        for obj in wait(live + sentinels, timeout=0.5):
            r = by_conn.get(id(obj), by_sentinel.get(obj))
            if r not in pending:
                continue
            msg = _receive(conns[r])
            if msg is None and obj in sentinels:
                procs[r].join(1)
                if conns[r].closed or not conns[r].poll(0.2):
                    code = procs[r].exitcode
                    msg = ("error", r, {"text": f"exited with code {code}", "peer": False})
                else:
                    msg = _receive(conns[r])
            if msg is None:
                continue
            pending.discard(r)
            if msg[0] == "error":
                errors.append(msg[2] | {"rank": r})
                if give_up is None:
                    give_up = time.monotonic() + 2.0
    if errors:
        root = next((e for e in errors if not e["peer"]), errors[0])
        print(f"ppfast demo: rank {root['rank']} failed: {root['text']}", file=sys.stderr)
        return 1
    return 0


def _receive(conn):
    try:
        return conn.recv() if conn.poll() else None
    except (EOFError, OSError):
        conn.close()
        return None


def _stop(procs) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    end = time.monotonic() + 5.0
    for proc in procs:
        proc.join(max(0.0, end - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)


def _follow_parent() -> None:
    """End this rank when the process that started it is gone, even if it was killed."""
    parent = os.getppid()
    try:
        import ctypes

        # PR_SET_PDEATHSIG (Linux): the kernel sends SIGKILL when the parent exits
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="follow-parent").start()


def _describe(e: BaseException) -> dict:
    from ...runtime.errors import PipelineCommError

    text = f"{type(e).__name__}: {e}"
    peer = isinstance(e, PipelineCommError) or any(w in text for w in _PEER_WORDS)
    if not isinstance(e, ValueError):  # a user mistake needs no traceback; a bug does
        text = "\n" + "".join(traceback.format_exception(e)).rstrip()
    return {"text": text, "peer": peer}


def _rank_entry(cfg: DemoConfig, rank: int, world: int, port: int, launch: dict, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _follow_parent()
    try:
        import torch
        import torch.distributed as dist

        from .worker import run_rank

        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        torch.set_num_threads(launch["threads_per_rank"])
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=cfg.timeout)
        )
        run_rank(cfg, torch.device("cpu"), launch)
        sys.stdout.flush()
        conn.send(("done", rank, None))
    except BaseException as e:  # noqa: BLE001 - the parent shows it, once for all ranks
        conn.send(("error", rank, _describe(e)))
        # Keep this rank's connections open until the parent stops it: closing them would
        # make the peers fail with "connection closed", which the parent might show instead.
        while True:
            time.sleep(1.0)
    dist.destroy_process_group()
    conn.close()


# ---------------------------------------------------------------------- torchrun, threads


def _torchrun(cfg: DemoConfig) -> int:
    import torch
    import torch.distributed as dist

    from .worker import run_rank

    local = int(os.environ["LOCAL_RANK"])
    rank = int(os.environ["RANK"])
    if cfg.device == "cpu":
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(cfg.threads_per_rank())
    else:
        device, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(device)
    launch = {
        "mode": "torchrun",
        "backend": backend,
        "device": str(device),
        "ranks": cfg.ranks,
        "text": f"{cfg.ranks} torchrun ranks over {backend}, rank 0 on {device}",
    }
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout))
    try:
        run_rank(cfg, device, launch)
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - each rank says what it saw; the root cause once
        info = _describe(e)
        if not info["peer"]:
            print(f"ppfast demo: rank {rank} failed: {info['text']}", file=sys.stderr)
        return 1
    finally:
        dist.destroy_process_group()


def _threads(cfg: DemoConfig) -> int:
    import torch

    from .worker import run_threads

    if cfg.device == "cpu":
        torch.set_num_threads(1)  # the ranks are the parallelism: one core each
        devices = [torch.device("cpu")] * cfg.ranks
        where = "CPU"
    else:
        base = torch.device(cfg.device)
        n = torch.cuda.device_count()
        if base.index is None and n >= cfg.ranks:
            devices = [torch.device("cuda", r) for r in range(cfg.ranks)]
            where = f"cuda:0..{cfg.ranks - 1}"
        else:
            devices = [torch.device("cuda", base.index or 0)] * cfg.ranks
            where = f"{devices[0]}, shared"
    launch = {
        "mode": "threads",
        "backend": "in-process",
        "device": [str(d) for d in devices],
        "ranks": cfg.ranks,
        "text": f"{cfg.ranks} threads in this process (ppfast.Pipe) on {where}",
    }
    try:
        run_threads(cfg, devices, launch)
        return 0
    except KeyboardInterrupt:
        print("\nppfast demo: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # noqa: BLE001 - shown once, as a rank would show it
        print(f"ppfast demo: failed: {_describe(e)['text']}", file=sys.stderr)
        return 1
