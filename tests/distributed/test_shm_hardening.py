"""The shared-memory transport where ranks do not share a PID namespace, where someone else
could write its segments, and where a slot says more than its segment holds.

Liveness is a lock each rank holds on its inbox, not its pid: a peer in another PID namespace
(a container sharing /dev/shm) has a pid that means nothing here. The tests run that peer
under ``unshare --user --map-root-user --pid --fork``, at a pid chosen to be alive here (so
a dead peer looks alive by pid) or dead here (so a live peer looks dead by pid). The peer is
this file run as a script (``python test_shm_hardening.py <mode> ...``), building
``ppfast._C.ShmTransport`` directly with a name shared through its command line and
coordinating over its stdin and stdout.

Slot fields are corrupted by mapping the receiver's inbox from Python before its name is
unlinked: a test rewrites the fields of the slot its message is in, found by the message's
tag, then receives. Those runs are subprocesses too, so that a receiver that reads out of
bounds fails its test by the signal that kills it instead of taking pytest down.
"""

from __future__ import annotations

import fcntl
import glob
import mmap
import os
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch
from ranks import dead_pid

WAIT = 20.0
SHM = "/dev/shm"
HERE = os.path.abspath(__file__)
UNSHARE = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child"]
# A slot (struct Slot in shm_transport.cpp): state, pad, then tag; the message's size, its
# segment's generation and capacity follow the tag 16, 24 and 32 bytes on.
SLOT_ALIGN, STATE_TO_TAG, NBYTES, GEN, CAPACITY = 64, 8, 16, 24, 32
TAG = 0x5EED_0000_0000_0001
OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
WHOLE_FILE = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)


def _group_name() -> str:
    return f"/ppfast-{os.getpid()}-{secrets.token_hex(6)}"


def _unshare_works() -> str:
    """Why cross-namespace tests cannot run here, or "" when they can."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    try:
        r = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare failed: {e}"
    if r.returncode != 0:
        return f"unshare cannot make user and PID namespaces here: {r.stderr.strip()}"
    return ""


needs_unshare = pytest.mark.skipif(bool(_unshare_works()), reason=_unshare_works() or "ok")
needs_shm = pytest.mark.skipif(not os.path.isdir(SHM), reason="no /dev/shm here")


# ---------------------------------------------------------------- the peer, run as a script


def _peer_main(name: str, rank: int, mode: str) -> None:
    """Rank ``rank`` of a 2-rank group. Prints "connected <pid>" once it has mapped both
    inboxes, unlinks its inbox name on a "go" line, prints "ready"; then "idle" waits to be
    killed, "send-late" sends rank 0 a message a second later and waits for stdin to close."""
    from ppfast._native import C

    t = C.ShmTransport(name, rank, 2)
    t.connect(WAIT)
    print("connected", os.getpid(), flush=True)
    assert sys.stdin.readline().strip() == "go"
    t.unlink_names()
    print("ready", flush=True)
    if mode == "send-late":
        time.sleep(1.0)  # ten of the receiver's liveness checks
        t.send(torch.arange(1000.0), 1 - rank, 7).wait(WAIT)
        print("sent", flush=True)
    sys.stdin.read()  # "idle": until killed; "send-late": until the test is done


def _at_pid(target: int, argv: list[str]) -> None:
    """As pid 1 of a new PID namespace: use up pids until the next is ``target``, run
    ``argv`` (a python command line) as that pid and exit with it."""
    while True:
        pid = os.fork()
        if pid == 0:
            if os.getpid() == target:
                os.execv(sys.executable, [sys.executable, *argv])
            os._exit(0)
        if pid == target:
            break
        os.waitpid(pid, 0)
        if pid > target:
            sys.exit(f"pid {target} was taken in the new namespace")
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))


def _lock_main(path: str) -> None:
    """Hold an OFD lock on ``path`` (as the transport does) until stdin closes."""
    fd = os.open(path, os.O_RDWR)
    fcntl.fcntl(fd, OFD_SETLK, WHOLE_FILE)
    print("locked", os.getpid(), flush=True)
    sys.stdin.read()


def _slot_offset(inbox: mmap.mmap, tag: int) -> int:
    """Where the full slot holding the message with ``tag`` starts in a mapped inbox."""
    for off in range(0, len(inbox) - SLOT_ALIGN + 1, SLOT_ALIGN):
        state, got = struct.unpack_from("I4xq", inbox, off)
        if state == 1 and got == tag:
            return off
    raise AssertionError(f"no full slot with tag {tag:#x} in the inbox")


def _corrupt_main(case: str) -> None:
    """Rank 0 sends rank 1 a 4000-byte message (its data segment holds 64 KiB); rank 1's slot
    is rewritten as ``case`` says before rank 1 receives. Prints the receive's error."""
    from ppfast._native import C

    name = _group_name()
    t0, t1 = C.ShmTransport(name, 0, 2), C.ShmTransport(name, 1, 2)
    t0.connect(WAIT)
    t1.connect(WAIT)
    fd = os.open(f"{SHM}{name}-in-1", os.O_RDWR)
    inbox = mmap.mmap(fd, os.fstat(fd).st_size)
    os.close(fd)
    t0.unlink_names()
    t1.unlink_names()
    if case == "abort-by-unknown-rank":
        # the abort word: the header's first 64-byte-aligned word that holds -1 (no abort)
        at = next(o for o in range(64, 1024, 64) if struct.unpack_from("i", inbox, o)[0] == -1)
        inbox[at + 4 : at + 9] = b"bogus"
        struct.pack_into("i", inbox, at, 7)  # a 2-rank group has no rank 7
        try:
            t1.recv(torch.empty(4), 0, TAG).wait(WAIT)
        except RuntimeError as e:
            print("error:", e, flush=True)
        return
    x = torch.arange(1000.0)
    if case == "capacity-of-mapped-segment":  # a first message maps the segment
        t0.send(x, 1, TAG).wait(WAIT)
        t1.recv(torch.empty(1000), 0, TAG).wait(WAIT)
    t0.send(x, 1, TAG).wait(WAIT)
    tag_at = _slot_offset(inbox, TAG) + STATE_TO_TAG
    nbytes, gen, capacity = struct.unpack_from("qqq", inbox, tag_at + NBYTES)
    assert (nbytes, capacity) == (4000, 64 << 10), (nbytes, capacity)
    if case == "size-beyond-capacity":
        nbytes = capacity + 4096
    elif case in ("capacity-beyond-segment", "capacity-of-mapped-segment"):
        nbytes = capacity = 1 << 20
    elif case == "generation-0":
        gen = 0
    else:
        raise AssertionError(case)
    struct.pack_into("qqq", inbox, tag_at + NBYTES, nbytes, gen, capacity)
    try:
        t1.recv(torch.empty(nbytes // 4), 0, TAG).wait(WAIT)
    except RuntimeError as e:
        print("error:", e, flush=True)
    else:
        print("no error", flush=True)


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    if cmd == "peer":
        _peer_main(rest[0], int(rest[1]), rest[2])
    elif cmd == "at-pid":
        _at_pid(int(rest[0]), rest[1:])
    elif cmd == "lock":
        _lock_main(rest[0])
    elif cmd == "corrupt":
        _corrupt_main(rest[0])
    else:
        sys.exit(f"unknown command {cmd}")


# ---------------------------------------------------------------- helpers of the tests


def _start(argv: list[str], unshare: bool = False, at_pid: int = 1) -> subprocess.Popen:
    """This file as a script with ``argv``; under ``unshare`` in new user and PID namespaces,
    as pid ``at_pid`` there."""
    cmd = [sys.executable, HERE, *argv]
    if unshare:
        cmd = [*UNSHARE, *(cmd if at_pid == 1 else cmd[:2] + ["at-pid", str(at_pid), *cmd[1:]])]
    return subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _expect(proc: subprocess.Popen, word: str, timeout: float = WAIT) -> list[str]:
    """The words of ``proc``'s next line, which must start with ``word``."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    ready = sel.select(timeout)
    sel.close()
    line = proc.stdout.readline() if ready else ""
    if not line.startswith(word):
        proc.kill()
        raise AssertionError(
            f"expected {word!r} from the peer, got {line!r}; its stderr:\n{proc.stderr.read()}"
        )
    return line.split()


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(WAIT)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        pipe.close()


def _alive_here(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _pid_dead_here() -> int:
    """A small pid that no process of this PID namespace has now."""
    return next(p for p in range(3, 300) if not _alive_here(p))


def _connect_with(proc: subprocess.Popen, t) -> int:
    """Finish a 2-rank setup with the peer ``proc``; returns the pid it sees itself as."""
    t.connect(WAIT)
    pid = int(_expect(proc, "connected")[1])
    proc.stdin.write("go\n")
    proc.stdin.flush()
    t.unlink_names()
    _expect(proc, "ready")
    return pid


def _cleanup(name: str) -> None:
    for path in glob.glob(f"{SHM}{name}-*"):
        os.unlink(path)


# ---------------------------------------------------------------- liveness across namespaces


@needs_shm
@needs_unshare
def test_a_peer_in_another_pid_namespace_that_is_killed_fails_the_wait_within_2_s():
    """The peer is pid 1 of its namespace, and pid 1 here is alive: by pid it never dies."""
    from ppfast._native import C

    name = _group_name()
    t = C.ShmTransport(name, 0, 2)
    peer = _start(["peer", name, "1", "idle"], unshare=True)
    try:
        assert _connect_with(peer, t) == 1 and _alive_here(1)
        h = t.recv(torch.empty(4), 1, 1)
        killed_at = []

        def kill():
            killed_at.append(time.monotonic())
            peer.kill()  # unshare's --kill-child: SIGKILL to the peer

        threading.Timer(0.3, kill).start()
        with pytest.raises(RuntimeError) as err:
            h.wait(WAIT)
        elapsed = time.monotonic() - killed_at[0]
    finally:
        _stop(peer)
        _cleanup(name)
    assert "rank 1 (pid 1 in its own PID namespace) has exited" in str(err.value), err.value
    assert elapsed < 2.0, f"the wait failed {elapsed:.1f} s after the peer was killed"


@needs_shm
@needs_unshare
def test_a_live_peer_in_another_pid_namespace_is_not_judged_dead():
    """The peer runs as a pid that no process has here, and sends only after a second of
    liveness checks: by pid it would be dead before it sends."""
    from ppfast._native import C

    target = _pid_dead_here()
    name = _group_name()
    t = C.ShmTransport(name, 0, 2)
    peer = _start(["peer", name, "1", "send-late"], unshare=True, at_pid=target)
    try:
        assert _connect_with(peer, t) == target
        y = torch.empty(1000)
        start = time.monotonic()
        t.recv(y, 1, 7).wait(WAIT)
        elapsed = time.monotonic() - start
        _expect(peer, "sent")
        assert not _alive_here(target), "the test needs the peer's pid to be dead here"
    finally:
        _stop(peer)
        _cleanup(name)
    assert torch.equal(y, torch.arange(1000.0))
    assert elapsed > 0.5, elapsed  # the receiver did wait through several checks


# ---------------------------------------------------------------- sweep


def test_sweep_keeps_what_a_process_locks_whatever_pid_its_name_has(tmp_path):
    """A name whose pid is dead here but that a live process locks (a rank in another PID
    namespace) stays; unlocked old names go, young ones stay; once the lock holder dies,
    its name goes too."""
    from ppfast.runtime.transports import sweep

    pid = dead_pid()
    locked, unlocked, young = (
        tmp_path / f"ppfast-{pid}-0123456789ab-in-0",
        tmp_path / f"ppfast-{pid}-0123456789abcdef-1-0-2-3",
        tmp_path / f"ppfast-{pid}-0123456789ab-in-1",
    )
    for path in (locked, unlocked, young):
        path.write_bytes(b"x")
    (tmp_path / "other-1-2").write_bytes(b"x")
    holder = _start(["lock", str(locked)])
    try:
        _expect(holder, "locked")
        an_hour_ago = time.time() - 3600
        for path in (locked, unlocked):
            os.utime(path, (an_hour_ago, an_hour_ago))
        assert sweep(where=str(tmp_path)) == [unlocked.name]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [locked.name, young.name, "other-1-2"]
        )
    finally:
        _stop(holder)
    assert sweep(where=str(tmp_path)) == [locked.name]
    assert sweep(min_age=0, where=str(tmp_path)) == [young.name]


@needs_shm
def test_sweep_sees_the_locks_the_transport_takes():
    """The transport's inbox and an undelivered message's data segment, made old, survive a
    sweep of /dev/shm while their transports live; a killed process's inbox does not."""
    from ppfast._native import C
    from ppfast.runtime.transports import sweep

    name = _group_name()
    t0, t1 = C.ShmTransport(name, 0, 2), C.ShmTransport(name, 1, 2)
    dead = _group_name()
    try:
        t0.connect(WAIT)
        t1.connect(WAIT)
        t0.send(torch.ones(10), 1, 3).wait(WAIT)  # never received
        ours = [n for n in os.listdir(SHM) if n.startswith(f"ppfast-{os.getpid()}-")]
        segment = [n for n in ours if not n.startswith(name[1:])]
        assert len(segment) == 1 and segment[0].endswith("-1-0-1"), ours
        code = (
            "import os, signal, sys; from ppfast._native import C; "
            "t = C.ShmTransport(sys.argv[1], 0, 1); os.kill(os.getpid(), signal.SIGKILL)"
        )
        subprocess.run([sys.executable, "-c", code, dead], check=False, timeout=WAIT)
        left = f"{dead[1:]}-in-0"
        mine = [f"{name[1:]}-in-0", f"{name[1:]}-in-1", segment[0]]
        an_hour_ago = time.time() - 3600
        for n in [*mine, left]:
            os.utime(os.path.join(SHM, n), (an_hour_ago, an_hour_ago))
        gone = sweep()
        assert left in gone and not os.path.exists(os.path.join(SHM, left)), gone
        assert not set(mine) & set(gone), gone
        assert all(os.path.exists(os.path.join(SHM, n)) for n in mine)
    finally:
        del t0, t1
        _cleanup(name)
        _cleanup(dead)


# ---------------------------------------------------------------- owners and modes


def _plant(path: str, bytes_: int, mode: int, uid: int = -1) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, bytes_)
        os.fchmod(fd, mode)
        if uid >= 0:
            os.fchown(fd, uid, -1)
    finally:
        os.close(fd)


@needs_shm
@pytest.mark.parametrize(
    "uid, mode", [(-1, 0o644), (-1, 0o620), (4242, 0o600)], ids=["others", "group", "owner"]
)
def test_an_inbox_others_could_write_or_another_user_owns_is_refused(uid, mode):
    from ppfast._native import C

    if uid >= 0 and os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    name = _group_name()
    t = C.ShmTransport(name, 0, 2)
    planted = f"{name}-in-1"
    _plant(f"{SHM}{planted}", 1 << 20, mode, uid)
    try:
        with pytest.raises(RuntimeError) as err:
            t.connect(WAIT)
    finally:
        del t
        _cleanup(name)
    owner = uid if uid >= 0 else os.geteuid()
    want = f"refusing shared-memory segment {planted}: owned by uid {owner} with mode 0{mode:o}"
    assert want in str(err.value), err.value


@needs_shm
def test_a_data_segment_others_could_write_is_refused():
    """Rank 0's message segment is opened up to group and others before rank 1 maps it."""
    from ppfast._native import C

    name = _group_name()
    t0, t1 = C.ShmTransport(name, 0, 2), C.ShmTransport(name, 1, 2)
    try:
        t0.connect(WAIT)
        t1.connect(WAIT)
        t0.unlink_names()
        t1.unlink_names()
        t0.send(torch.ones(1000), 1, 4).wait(WAIT)
        (segment,) = glob.glob(f"{SHM}/ppfast-{os.getpid()}-*-1-0-1")
        os.chmod(segment, 0o666)
        with pytest.raises(RuntimeError) as err:
            t1.recv(torch.empty(1000), 0, 4).wait(WAIT)
    finally:
        del t0, t1
        for path in glob.glob(f"{SHM}/ppfast-{os.getpid()}-*-1-0-1"):
            os.unlink(path)
    want = f"refusing shared-memory segment {segment[len(SHM) :]}: owned by uid {os.geteuid()}"
    assert want in str(err.value) and "mode 0666" in str(err.value), err.value
    assert "rank 0's message in slot 0" in str(err.value), err.value


# ---------------------------------------------------------------- slots that say too much


def _corrupted(case: str) -> str:
    """What ``python test_shm_hardening.py corrupt <case>`` printed."""
    done = subprocess.run(
        [sys.executable, HERE, "corrupt", case], capture_output=True, text=True, timeout=60
    )
    if done.returncode < 0:
        pytest.fail(
            f"the receiver was killed by {signal.Signals(-done.returncode).name}:\n{done.stderr}"
        )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# what each corruption (_corrupt_main) must be told apart by
CORRUPT = {
    "size-beyond-capacity": "claims 69632 bytes in a 65536-byte data segment",
    "capacity-beyond-segment": "a capacity of 1048576 bytes, but the segment has 65536",
    "capacity-of-mapped-segment": (
        "gives generation 1's data segment a capacity of 1048576 bytes, but it was mapped with "
        "65536"
    ),
    "generation-0": "names data segment generation 0",
}


@needs_shm
@pytest.mark.parametrize("case", list(CORRUPT))
def test_a_corrupt_slot_fails_the_receive_naming_its_source(case):
    """Each case makes the slot claim more than its segment holds (or a segment that cannot
    be its own); without the checks the receiver copies past the end of its mapping."""
    want = CORRUPT[case]
    out = _corrupted(case)
    assert out.startswith("error: rank 0's message in slot 0 (tag"), out
    assert "is corrupt" in out and want in out, out


@needs_shm
def test_an_abort_by_a_rank_outside_the_group_is_not_taken_for_one_of_its_ranks():
    out = _corrupted("abort-by-unknown-rank")
    assert out == "error: an unknown rank (7) gave up: bogus", out
