"""Which transport a schedule's ranks talk over, built from their process group.

``transport_for(group, device, kind)``:

- ``"c10d"``: the group's own backend (gloo, NCCL), point to point.
- ``"shm"``: shared memory between processes of one host (CPU tensors). A message costs one
  memcpy on each side instead of a trip through loopback TCP and gloo's I/O threads, which on
  a busy CPU host take a core for the length of every transfer.
- ``"auto"`` (the default; the environment variable ``PPFAST_TRANSPORT`` overrides it):
  ``shm`` when the tensors are on the CPU, every rank of the group runs on this host and
  /dev/shm has at least 1 GiB free (containers often give it 64 MiB), else ``c10d``.

Setting up ``shm`` takes one all-gather and two barriers over the group, at the first step.
Its names in /dev/shm go as soon as both sides have mapped them; what a crashed run left
behind (names whose creating process is gone, a minute old or more) is removed then too.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import time
from datetime import timedelta

from .._native import C
from .collectives import gather_objects, wait
from .errors import PipelineCommError

KINDS = ("auto", "c10d", "shm")


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


SHM_DIR = "/dev/shm"
_OURS = re.compile(r"ppfast-(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def sweep(min_age: float = 60.0, where: str = SHM_DIR) -> list[str]:
    """Remove shared-memory names of this transport whose creating process (the pid after
    "ppfast-") has exited and that are at least ``min_age`` seconds old; returns them."""
    try:
        names = os.listdir(where)
    except OSError:
        return []
    gone, now = [], time.time()
    for name in names:
        m = _OURS.match(name)
        if m is None or _alive(int(m.group(1))):
            continue
        path = os.path.join(where, name)
        try:
            if now - os.stat(path).st_mtime >= min_age:
                os.unlink(path)
                gone.append(name)
        except OSError:  # another process swept it first
            pass
    return gone


AUTO_MIN_FREE = 1 << 30


def _shm_free(where: str = SHM_DIR) -> int:
    try:
        st = os.statvfs(where)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def check_kind(kind: str | None) -> str:
    kind = kind or os.environ.get("PPFAST_TRANSPORT", "auto") or "auto"
    if kind not in KINDS:
        raise ValueError(
            f"transport {kind!r} is not one of {', '.join(KINDS)} (from the transport argument "
            "or PPFAST_TRANSPORT)"
        )
    return kind


def transport_for(group, device_type: str, kind: str | None = None, timeout: float = 60.0):
    """A native transport for ``group`` (a ProcessGroup) moving tensors of ``device_type``."""
    import torch.distributed as dist

    kind = check_kind(kind)
    if kind == "c10d" or (kind == "auto" and device_type != "cpu"):
        return _c10d(group, device_type, timeout)
    if device_type != "cpu":
        raise ValueError(
            f"the shm transport moves CPU tensors; these stages are on {device_type}: use "
            "transport='c10d' (NCCL) or ppfast.Pipe on one device"
        )
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    name = f"/ppfast-{os.getpid()}-{secrets.token_hex(6)}"
    here = (socket.gethostname(), _boot_id(), name, _shm_free() >= AUTO_MIN_FREE)
    # so that all ranks decide alike
    everyone = gather_objects(here, group, timeout, _setup_error(rank), "choosing the transport")
    hosts = {(h, b) for h, b, _, _ in everyone}
    if kind == "auto" and not all(room for *_, room in everyone):
        return _c10d(group, device_type, timeout)
    if len(hosts) > 1:
        if kind == "shm":
            raise ValueError(
                f"the shm transport needs every rank on one host; this group spans "
                f"{len(hosts)} ({', '.join(sorted(h for h, _ in hosts))}): use transport='c10d'"
            )
        return _c10d(group, device_type, timeout)
    name = everyone[0][2]  # the group's first rank's name
    sweep()
    shm = C.ShmTransport(name, rank, size)
    try:
        fail = _setup_error(rank)
        wait(dist.barrier(group=group, async_op=True), timeout, fail, "creating inboxes")
        shm.connect(timeout)
        # every rank has mapped every inbox: the names can go
        wait(dist.barrier(group=group, async_op=True), timeout, fail, "mapping inboxes")
    finally:
        shm.unlink_names()
    return shm


def _c10d(group, device_type: str, timeout: float):
    """The c10d transport; over a backend that matches messages by issue order (NCCL), steps
    that agree shapes go over a gloo group of the same ranks (docs/nccl.md)."""
    import torch
    import torch.distributed as dist

    store, key = _abort_notice(group)
    backend = group._get_backend(torch.device(device_type))
    if not backend.supports_coalescing:
        return C.C10dTransport(group, device_type, None, store, key)
    side = dist.new_group(
        dist.get_process_group_ranks(group),
        timeout=timedelta(seconds=timeout),
        backend="gloo",
        use_local_synchronization=True,
    )
    return C.C10dTransport(group, device_type, C.C10dTransport(side, "cpu"), store, key)


def _abort_notice(group):
    """The group's store, and a key of its own for this transport: a rank that gives up
    writes there and every other rank's transport, watching it, fails at once. Ranks build
    their transports over one group in the same order, so counting them names them alike."""
    import torch.distributed as dist

    store = dist.distributed_c10d._world.pg_map.get(group, (None, None))[1]
    if store is None:
        return None, ""
    name = group.group_name
    count = store.add(f"ppfast/transports/{name}/{dist.get_rank(group)}", 1)
    return store, f"ppfast/abort/{name}/{count}"


def _setup_error(rank: int):
    def fail(why: str, timed_out: bool) -> PipelineCommError:
        return PipelineCommError(
            f"rank {rank}: setting up the transport failed: {why}", rank, "setup", -1, timed_out
        )

    return fail
