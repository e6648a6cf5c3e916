"""The shared-memory transport between gloo ranks of one host, and how a schedule picks one.

The executor's view is covered by the equivalence and error tests (they run over it by
default); here the transport is driven directly: sizes from empty to several MiB, receives
taken in any order, more messages in flight than a lane has slots, a peer that gives up, a
peer that dies, and nothing left behind in /dev/shm. Last, the c10d transport's heartbeat: a
peer that closed its transport is not taken for dead, nor does its silence break the group.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from ranks import dead_pid, run_ranks

WAIT = 20.0
SLOTS = 64  # a lane's slots (shm_transport.cpp)


def _shm(rank: int, world: int, kind: str = "shm"):
    import torch.distributed as dist

    from ppfast.runtime.transports import transport_for

    return transport_for(dist.group.WORLD, "cpu", kind)


def _ours() -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("ppfast-"))


def exchange(rank: int, world: int) -> dict:
    t = _shm(rank, world)
    peer = 1 - rank
    out = {"name": t.name, "sizes": []}
    # empty, odd, one page, and growing sizes: every slot's segment is replaced as it grows
    for n in (0, 1, 1023, 4096, 300_000, 1 << 20, 3 << 20):
        for dtype in (torch.float32, torch.int64, torch.bfloat16):
            x = (torch.arange(n) * (rank + 1)).to(dtype)
            y = torch.empty(n, dtype=dtype)
            hs = [t.send(x, peer, 5), t.recv(y, peer, 5)]
            for h in hs:
                h.wait(WAIT)
            want = (torch.arange(n) * (peer + 1)).to(dtype)
            out["sizes"].append((n, str(dtype), bool(torch.equal(y, want))))
    # a non-contiguous tensor is sent as its contiguous copy
    x = torch.arange(12.0).reshape(3, 4).t() + rank
    y = torch.empty(4, 3)
    for h in (t.send(x, peer, 6), t.recv(y, peer, 6)):
        h.wait(WAIT)
    out["strided"] = bool(torch.equal(y, torch.arange(12.0).reshape(3, 4).t() + peer))
    return out


def test_messages_of_every_size_arrive_intact():
    for rank, res in enumerate(run_ranks(exchange, 2, timeout=60.0)):
        assert res["name"] == "shm", res["name"]
        bad = [s for s in res["sizes"] if not s[2]]
        assert not bad, f"rank {rank} received wrong bytes for {bad}"
        assert res["strided"]


def many_in_flight(rank: int, world: int) -> dict:
    """Rank 0 sends 3 lanes' worth of messages with distinct tags and looks which are done
    before rank 1 touches the transport; rank 1 then posts every receive, and waits for them
    newest first."""
    import torch.distributed as dist

    t = _shm(rank, world)
    n = 3 * SLOTS
    if rank == 0:
        hs = [t.send(torch.full((100 + i,), float(i)), 1, 1000 + i) for i in range(n)]
        # A send is done once its message is copied into a free slot of the lane; the rest
        # queue, in order, until the receiver takes messages out. Nothing has been taken yet.
        done_before_drain = [h.done() for h in hs]
        dist.barrier()  # only now may rank 1 post receives (each drains the lane)
        for h in hs:
            h.wait(WAIT)
        # two messages with one tag arrive in the order they were sent
        for k in range(3):
            t.send(torch.full((8,), float(k)), 1, 77).wait(WAIT)
        return {"done_before_drain": done_before_drain}
    dist.barrier()
    bufs = [torch.empty(100 + i) for i in range(n)]
    hs = [t.recv(b, 0, 1000 + i) for i, b in enumerate(bufs)]
    for h in reversed(hs):
        h.wait(WAIT)
    same_tag = [torch.empty(8) for _ in range(3)]
    for b in same_tag:
        t.recv(b, 0, 77).wait(WAIT)
    return {
        "ok": all(bool((b == i).all()) for i, b in enumerate(bufs)),
        "order": [b[0].item() for b in same_tag],
    }


def test_receives_taken_in_any_order_with_more_messages_than_slots():
    sender, receiver = run_ranks(many_in_flight, 2, timeout=60.0)
    # before the receiver drained the lane, exactly a lane's worth of sends were done, the
    # first ones: a later send never takes a slot ahead of one queued before it
    done = sender["done_before_drain"]
    assert done == [True] * SLOTS + [False] * (2 * SLOTS), f"{sum(done)} of {len(done)} done"
    assert receiver["ok"]
    assert receiver["order"] == [0.0, 1.0, 2.0]


def wrong_size(rank: int, world: int) -> str:
    t = _shm(rank, world)
    if rank == 0:
        t.send(torch.zeros(10), 1, 3).wait(WAIT)
        return ""
    try:
        t.recv(torch.empty(12), 0, 3).wait(WAIT)
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_a_message_that_does_not_fit_its_buffer_is_an_error():
    _, msg = run_ranks(wrong_size, 2, timeout=60.0)
    assert "40 bytes from rank 0" in msg and "48-byte receive buffer" in msg, msg


# A wait that must end because the peer gave up or died, not at its timeout: so long that a
# wait which ran into it ("timed out") would have the test fail, at run_ranks' limit above it.
LONG_WAIT = 120.0


def fail_rank_0(rank: int, world: int, how: str) -> dict:
    """Rank 0 gives up (abort) or exits 0.3 s in; rank 1 waits for a message from it."""
    t = _shm(rank, world)
    if rank == 0:
        time.sleep(0.3)
        if how == "abort":
            t.abort("rank 0 raised: out of memory")
            return {}
        os._exit(1)
    try:
        t.recv(torch.empty(4), 0, 1).wait(LONG_WAIT)
    except RuntimeError as e:
        return {"message": str(e)}
    return {"message": "no error"}


def test_a_peer_that_gives_up_fails_the_wait_at_once():
    _, got = run_ranks(fail_rank_0, 2, "abort", timeout=LONG_WAIT + 60.0)
    assert "rank 0 gave up: rank 0 raised: out of memory" in got["message"], got


def test_a_peer_that_dies_fails_the_wait_without_its_timeout():
    got = run_ranks(fail_rank_0, 2, "exit", timeout=LONG_WAIT + 60.0, may_exit={0})[1]
    assert "rank 0 (pid" in got["message"] and "has exited" in got["message"], got


def fork_then_die(rank: int, world: int, marks: str, child_drops: bool) -> dict:
    """Rank 0 forks a child, as a DataLoader with workers does, which sleeps, holding its copy
    of the transport or having dropped it; rank 0 then exchanges a message with rank 1 and
    exits. Rank 1 waits for one more message from it: the child, alive, must not keep rank 0
    looking alive, nor its dropping a copy break rank 0's transport."""
    import gc

    t = _shm(rank, world)
    child_ended = os.path.join(marks, "child-ended")
    if rank == 0:
        child = os.fork()
        if child == 0:
            if child_drops:
                del t
                gc.collect()
            else:  # its copy is not for use: the mappings stayed with the parent
                try:
                    t.send(torch.ones(4), 1, 9)
                    said = "no error"
                except RuntimeError as e:
                    said = str(e)
                with open(os.path.join(marks, "child-send"), "w") as f:
                    f.write(said)
            with open(os.path.join(marks, "child-dropped"), "w"):
                pass
            time.sleep(LONG_WAIT / 2)
            with open(child_ended, "w"):
                pass
            os._exit(0)
        with open(os.path.join(marks, "child"), "w") as f:
            f.write(str(child))
        while not os.path.exists(os.path.join(marks, "child-dropped")):
            time.sleep(0.01)
        t.send(torch.full((4,), 7.0), 1, 1).wait(WAIT)
        os._exit(1)
    y = torch.empty(4)
    t.recv(y, 0, 1).wait(WAIT)
    try:
        t.recv(torch.empty(4), 0, 2).wait(LONG_WAIT)
        message = "no error"
    except RuntimeError as e:
        message = str(e)
    out = {"got": y.tolist(), "message": message, "child_ended": os.path.exists(child_ended)}
    with open(os.path.join(marks, "child")) as f:
        os.kill(int(f.read()), signal.SIGKILL)
    return out


@pytest.mark.parametrize("child_drops", [False, True], ids=["child-keeps", "child-drops"])
def test_a_forked_child_does_not_keep_a_dead_rank_alive(tmp_path, child_drops):
    args = (str(tmp_path), child_drops)
    got = run_ranks(fork_then_die, 2, *args, timeout=LONG_WAIT + 60.0, may_exit={0})[1]
    assert got["got"] == [7.0] * 4, got
    assert "rank 0 (pid" in got["message"] and "has exited" in got["message"], got
    assert not got["child_ended"], "the wait ended only when the child did"
    if not child_drops:
        said = (tmp_path / "child-send").read_text()
        assert "a forked child cannot send" in said, said


def leaves_nothing(rank: int, world: int) -> dict:
    import gc

    import torch.distributed as dist

    before = _ours()
    t = _shm(rank, world)
    dist.barrier()  # each rank removes its own inbox name once all have connected
    after_setup = _ours()
    dist.barrier()  # both have looked before either sends
    peer = 1 - rank
    # the second message grows the slot's segment; rank 1 keeps one message it never takes
    for n in (1000, 100_000):
        t.send(torch.ones(n), peer, n).wait(WAIT)
        t.recv(torch.empty(n), peer, n).wait(WAIT)
    if rank == 0:
        t.send(torch.ones(5000), 1, 9).wait(WAIT)
    dist.barrier()
    del t
    gc.collect()
    dist.barrier()
    return {"before": before, "after_setup": after_setup, "after": _ours()}


def test_no_names_are_left_in_dev_shm():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    for res in run_ranks(leaves_nothing, 2, timeout=60.0):
        new = set(res["after"]) - set(res["before"])
        assert not new, f"left behind: {sorted(new)}"
        assert not set(res["after_setup"]) - set(res["before"]), res


def kinds(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from ppfast.runtime.transports import transport_for

    out = {
        "auto": transport_for(dist.group.WORLD, "cpu", "auto").name,
        "c10d": transport_for(dist.group.WORLD, "cpu", "c10d").name,
    }
    os.environ["PPFAST_TRANSPORT"] = "c10d"
    out["env"] = transport_for(dist.group.WORLD, "cpu", None).name
    # a /dev/shm with less room than auto asks for (one rank's view is enough)
    import ppfast.runtime.transports

    if rank == 1:
        ppfast.runtime.transports.AUTO_MIN_FREE = 1 << 62
    out["small"] = transport_for(dist.group.WORLD, "cpu", "auto").name
    out["small-forced"] = transport_for(dist.group.WORLD, "cpu", "shm").name
    return out


def test_auto_picks_shared_memory_for_cpu_ranks_of_one_host_with_room():
    for res in run_ranks(kinds, 2, timeout=60.0):
        assert res["auto"] == "shm", res
        assert res["c10d"].startswith("c10d"), res
        assert res["env"].startswith("c10d"), res
        assert res["small"].startswith("c10d") and res["small-forced"] == "shm", res


def test_an_unknown_transport_is_refused_before_any_communication(monkeypatch):
    import ppfast
    from ppfast.runtime.transports import check_kind

    with pytest.raises(ValueError, match="not one of auto, c10d, shm"):
        check_kind("tcp")
    monkeypatch.setenv("PPFAST_TRANSPORT", "nccl")
    with pytest.raises(ValueError, match="PPFAST_TRANSPORT"):
        stage = ppfast.PipelineStage(torch.nn.Linear(2, 2), 0, 2, "cpu")
        ppfast.Schedule1F1B(stage, 2, lambda y, t: y.sum())


def test_names_a_crashed_run_left_are_swept(tmp_path):
    import fcntl
    import struct

    from ppfast.runtime.transports import sweep

    pid = dead_pid()
    old, young, live = (
        tmp_path / f"ppfast-{pid}-0123456789abcdef-1-0-1",
        tmp_path / f"ppfast-{pid}-0123456789abcdef-1-1-1",
        tmp_path / f"ppfast-{os.getpid()}-0123456789abcdef-1-0-1",
    )
    for path in (old, young, live):
        path.write_bytes(b"x")
    an_hour_ago = time.time() - 3600
    for path in (old, live):
        os.utime(path, (an_hour_ago, an_hour_ago))
    (tmp_path / "other-1-2").write_bytes(b"x")
    # a name is in use while a process holds a lock on it (as each rank does on its inbox),
    # whatever pid its name carries
    fd = os.open(live, os.O_RDWR)
    try:
        lock = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0)
        fcntl.fcntl(fd, getattr(fcntl, "F_OFD_SETLK", 37), lock)
        assert sweep(where=str(tmp_path)) == [old.name]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [young.name, live.name, "other-1-2"]
        )
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- c10d heartbeat

SILENT = 1.2  # a peer's beats silent this long (transport.cpp) and it is taken for dead


def transport_closed_early(rank: int, world: int) -> dict:
    """Both ranks exchange a message over a c10d transport of the world group; rank 1 then
    drops its transport and lives on. Rank 0 keeps its own, idle, for well past the silence
    limit: nothing of its may fail for it, and the group (whose backend the transport aborts
    on a failure) must still work. Then rank 0 waits a moment for a message rank 1 never
    sends: a peer that closed its transport left on purpose, so that wait runs to its
    timeout; it is not failed as if rank 1 had died."""
    import gc

    import torch.distributed as dist

    from ppfast.runtime.transports import transport_for

    t = transport_for(dist.group.WORLD, "cpu", "c10d", LONG_WAIT)
    peer = 1 - rank
    x, y = torch.full((4,), float(rank)), torch.empty(4)
    # one at a time, in an order both agree on: NCCL pairs a send with its receive by order
    for sending in (rank == 0, rank == 1):
        (t.send(x, peer, 1) if sending else t.recv(y, peer, 1)).wait(WAIT)
    if rank == 1:
        del t
        gc.collect()
    time.sleep(3 * SILENT)  # rank 1's transport says nothing all this time
    total = torch.ones(1)
    dist.all_reduce(total, group=dist.group.WORLD)
    out = {"sum": total.item(), "got": y.tolist()}
    if rank == 0:
        try:
            t.recv(torch.empty(4), 1, 2).wait(3 * SILENT)
            out["wait"] = "no error"
        except RuntimeError as e:
            out["wait"] = str(e)
    # (over NCCL that receive stays posted, and the communicator can only be aborted: the
    # group is done)
    return out


@pytest.mark.parametrize("backend", ["gloo", "nccl_emu"])
def test_a_peer_that_closed_its_transport_is_not_taken_for_dead(backend):
    got = run_ranks(transport_closed_early, 2, backend=backend, timeout=LONG_WAIT + 60.0)
    assert [g["sum"] for g in got] == [2.0, 2.0], got
    assert got[0]["got"] == [1.0] * 4 and got[1]["got"] == [0.0] * 4, got
    wait = got[0]["wait"].lower()  # the backend's words: gloo's "Timed out", NCCL's "timeout"
    assert ("timed out" in wait or "timeout" in wait) and "heard from" not in wait, got[0]
