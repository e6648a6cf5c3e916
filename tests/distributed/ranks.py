"""Run a function on N ranks (spawned processes, gloo or nccl_emu) with a hard timeout; and
record what each rank of a ppfast.Pipe (ranks as threads) raised."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import timedelta


class RanksFailed(AssertionError):
    """A rank raised, died, or the group ran past its time; the message says which and why."""


def dead_pid() -> int:
    """A pid that no process here has now: that of a child that has already exited."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world_size, port, results, stop, args, backend, env) -> None:
    # Results are pickled here, by value: torch's multiprocessing reductions would hand the
    # parent shared-memory file descriptors, one per tensor, and thousands of them run out.
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        os.environ.update(env)
        if backend == "nccl_emu":
            import ppfast.testing  # noqa: F401  (registers the backend)
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
        )
        out = fn(rank, world_size, *args)
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - the parent reports it with the other ranks
        results.put((rank, "error", traceback.format_exc()))
    results.close()
    results.join_thread()
    # Stay alive until every rank has reported, so a rank that is done does not close its
    # connections under a peer still waiting on it (that peer would see a closed connection
    # instead of the failure the test sets up). No destroy_process_group: after a failed step
    # it can block on operations that will never complete; the parent ends the process.
    parent = os.getppid()
    while not stop.wait(1.0) and os.getppid() == parent:
        pass
    os._exit(0)


def run_ranks(
    fn: Callable,
    world_size: int,
    *args,
    timeout: float = 120.0,
    may_exit: Iterable[int] = (),
    grace: float = 5.0,
    backend: str = "gloo",
    env: dict[str, str] | None = None,
) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks of a ``backend`` group (gloo,
    or ppfast.testing's nccl_emu), with ``env`` set in each rank; return each rank's result.

    ``fn`` must be a module-level function and its arguments and result picklable. Each rank
    runs with one intra-op thread. A rank that raises fails the call with its traceback (the
    others get ``grace`` seconds to report too, for context); so does one that exits without a
    result, unless it is in ``may_exit``, whose result is then None. Past ``timeout`` seconds
    every process is killed and the call fails naming the ranks that had not finished: a hung
    pipeline fails the test, it never hangs it.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    stop = ctx.Event()
    port = free_port()
    may_exit = set(may_exit)
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, r, world_size, port, results, stop, args, backend, env or {}),
            name=f"rank{r}",
            daemon=True,
        )
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    done: dict[int, object] = {}
    errors: dict[int, str] = {}
    dead_since: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        while len(done) + len(errors) < world_size:
            now = time.monotonic()
            if now >= deadline:
                timed_out = not errors
                break
            try:
                rank, status, payload = results.get(timeout=min(0.2, deadline - now))
            except queue.Empty:
                pass
            else:
                if status == "ok":
                    done[rank] = pickle.loads(payload)
                else:
                    errors[rank] = payload
                    deadline = min(deadline, time.monotonic() + grace)
                continue
            for r, proc in enumerate(procs):
                if r in done or r in errors or proc.exitcode is None:
                    continue
                # its result may still be in the pipe: give it a moment to arrive
                first = dead_since.setdefault(r, time.monotonic())
                if time.monotonic() - first < 1.0:
                    continue
                if r in may_exit:
                    done[r] = None
                else:
                    errors[r] = f"exited with code {proc.exitcode} before returning a result"
                    deadline = min(deadline, time.monotonic() + grace)
    finally:
        stop.set()
        end = time.monotonic() + (0 if timed_out or errors else 5.0)
        for proc in procs:
            proc.join(max(0.0, end - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        results.close()
    if timed_out:
        missing = [r for r in range(world_size) if r not in done]
        raise RanksFailed(
            f"{fn.__name__} on {world_size} ranks ran past {timeout:.0f} s; ranks {missing} had "
            "not finished (all processes killed)"
        )
    if errors:
        missing = [r for r in range(world_size) if r not in done and r not in errors]
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        more = f"\nranks {missing} had not finished when they were killed" if missing else ""
        raise RanksFailed(f"{fn.__name__} failed on ranks {sorted(errors)}:\n{text}{more}")
    return [done[r] for r in range(world_size)]


def run_once(build: Callable) -> Callable:
    """``get(*key)``: ``build(*key)`` run on first use and kept; a failure (``RanksFailed`` or
    any AssertionError) is kept too and raised again for every later caller of that key, so one
    broken group fails each of its tests without running again."""
    cache: dict[tuple, object] = {}

    def get(*key):
        if key not in cache:
            try:
                cache[key] = build(*key)
            except AssertionError as e:
                cache[key] = e
        if isinstance(cache[key], BaseException):
            raise cache[key]
        return cache[key]

    return get


def record_ranks(pipe) -> dict:
    """What each rank's thread of ``pipe`` (a ppfast.Pipe) raised in the steps that follow
    (None: it returned); a rank whose thread never ran its step is absent."""
    seen: dict = {}
    for r, sched in enumerate(pipe.schedules):
        run = sched._run_microbatches

        def recorded(*args, _run=run, _r=r, **kwargs):
            seen[_r] = None
            try:
                return _run(*args, **kwargs)
            except BaseException as e:
                seen[_r] = e
                raise

        sched._run_microbatches = recorded
    return seen
