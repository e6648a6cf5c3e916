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
behind is removed then too: names that no process holds a lock on, a minute old or more.
Every rank locks its inbox, and every sender a data segment while its name exists, with an
open-file-description lock that the kernel drops when the process dies, so ranks in other
PID namespaces (containers sharing /dev/shm) are judged alive or dead alike; the pid in a
name is not used for that. Only segments of this user, closed to group and others, are mapped
(``csrc/runtime/shm_transport.h`` says more).
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import socket
import stat
import struct
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
_OURS = re.compile(r"ppfast-\d+-")
# The lock kind the transport takes (shm_transport.cpp): OFD locks, which conflict with it
# whichever process, namespace or descriptor holds it; flock() would not see it at all.
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)  # Linux's number where Python lacks the name
# struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)
_WHOLE_FILE = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)


def _remove_if_unlocked(path: str, min_age: float, now: float) -> bool:
    """Unlink ``path`` if it is a regular file at least ``min_age`` seconds old that no
    process holds a lock on; the lock taken to find out is held until the name is gone."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # gone already, or not ours to open (and so not ours to judge)
        return False
    try:
        st = os.fstat(fd)
        # young: its creator may not have locked it yet
        if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < min_age:
            return False
        try:
            fcntl.fcntl(fd, _F_OFD_SETLK, _WHOLE_FILE)
        except OSError:  # locked: its run is alive
            return False
        try:
            if os.stat(path, follow_symlinks=False).st_ino != st.st_ino:
                return False  # replaced since we opened it
            os.unlink(path)
        except OSError:  # another process swept it first
            return False
        return True
    finally:
        os.close(fd)  # and the lock with it


def sweep(min_age: float = 60.0, where: str = SHM_DIR) -> list[str]:
    """Remove this transport's shared-memory names (starting "ppfast-<pid>-") that no process
    holds a lock on and that are at least ``min_age`` seconds old; returns them. The pid in a
    name is not consulted: in another PID namespace it names another process."""
    try:
        names = os.listdir(where)
    except OSError:
        return []
    now = time.time()
    return [
        name
        for name in sorted(names)
        if _OURS.match(name) and _remove_if_unlocked(os.path.join(where, name), min_age, now)
    ]


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
