"""Faults injected into a running pipeline, on every transport: every surviving rank must raise
PipelineCommError naming itself, the action and the peer, promptly, and no step may return
gradients that differ from a clean run's.

Three ranks train the toy MLP (stage r on rank r). Rank 1 is the faulty one:

- **killed** at a chosen action: F, I, W (ZB-H1), B (1F1B), a SEND, a RECV (through
  ppfast.testing's FaultyTransport), or its first send of the first step, the one that agrees
  shapes. Both survivors border it; they must name it, without waiting out their timeout
  (``timed_out`` is False with a 60 s timeout), and where the death's moment is known (the
  compute kills write it down) within 2 s of it.
- **frozen** (SIGSTOP) in its first send or in a forward: alive, silent, its connections open.
  Over c10d the survivors name it within 2 s by its silent heartbeat; where only the timeout
  can tell (shared memory, or rank 0 frozen: it hosts the store the heartbeat goes through),
  within the timeout and the notice after it.
- **its messages** delayed, stalled, dropped, duplicated, reordered or corrupted, with the
  payload checksum on (PPFAST_CHECKSUM=1), and a shape header corrupted with it off. Each
  fault runs on a fresh process group and transport of one spawn per transport.

Transports: shared memory, gloo (c10d) and nccl_emu (c10d with NCCL's matching by order).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from ranks import run_ranks
from toy_models import batch, build_blocks, mse_loss, split_stages

import ppfast
from ppfast._native import C
from ppfast.runtime.transports import transport_for

P, M = 3, 4
TRANSPORTS = {
    "shm": ({}, "shm"),
    "gloo": ({}, "c10d"),
    "nccl_emu": ({"backend": "nccl_emu"}, "c10d"),
}
KILL_TIMEOUT = 60.0  # long: a survivor that waited it out would say timed_out
TIMEOUT = 3.0  # for the message faults, some of which can only end at a timeout
NOTICE = 2.0  # a death or a peer's giving up is noticed within this


def schedule_for(rank: int, name: str, timeout: float, transport, wrap=None):
    chains = split_stages(build_blocks("mlp", P), P)
    stage = ppfast.PipelineStage(chains[rank], rank, P, "cpu")
    cls = ppfast.Schedule1F1B if name == "1f1b" else ppfast.ScheduleZBH1
    return cls(stage, M, mse_loss, timeout=timeout, transport=transport)


def faulty_transport(kind: str, timeout: float):
    group = dist.new_group(list(range(P)))
    return C.FaultyTransport(transport_for(group, "cpu", kind, timeout))


def step(sched, rank: int, k: int):
    (x,), y = batch("mlp", M, k)
    sched.step(x if rank == 0 else None, target=y if rank == P - 1 else None)


def outcome(e: BaseException | None, started: float) -> dict:
    if e is None:
        return {"type": None}
    return {
        "type": type(e).__name__,
        "text": str(e),
        "rank": getattr(e, "rank", None),
        "action": getattr(e, "action", None),
        "peer": getattr(e, "peer", None),
        "timed_out": getattr(e, "timed_out", None),
        "raised_at": time.time(),
        "waited": time.time() - started,
    }


# ---------------------------------------------------------------------------- kills

KILLS = ["F", "I", "W", "B", "SEND", "RECV", "first step"]


def kill_rank(rank: int, p: int, at: str, kind: str, marks: str) -> dict:
    """Rank 1 dies at `at` in step 1 (step 0 for "first step"); the others report what they
    raised, in that step or the next."""
    from ppfast.training import pipeline

    name = "1f1b" if at == "B" else "zb-h1"
    state = {"step": 0}
    if rank == 1 and at in ("F", "I", "W", "B"):

        def die(method, hit):
            def wrapped(self, stage, mb, *args):
                if state["step"] == 1 and mb == 1 and hit(args):
                    with open(os.path.join(marks, "died"), "w") as f:
                        f.write(repr(time.time()))
                    os._exit(1)
                return method(self, stage, mb, *args)

            return wrapped

        if at == "F":
            pipeline._RankCompute.forward = die(pipeline._RankCompute.forward, lambda a: True)
        elif at == "W":
            pipeline._RankCompute.weight = die(pipeline._RankCompute.weight, lambda a: True)
        else:  # I or B: backward(stage, mb, grads, full)
            full = at == "B"
            pipeline._RankCompute.backward = die(
                pipeline._RankCompute.backward, lambda a: a[1] == full
            )
    transport = faulty_transport(kind, KILL_TIMEOUT)
    sched = schedule_for(rank, name, KILL_TIMEOUT, transport)
    if rank == 1 and at == "first step":
        transport.arm("kill", "send", 0)
    for k in range(3):
        state["step"] = k
        if rank == 1 and k == 1 and at in ("SEND", "RECV"):
            transport.arm("kill", at.lower(), 1)
        started = time.time()
        try:
            step(sched, rank, k)
        except Exception as e:  # noqa: BLE001 - what it raised is the point
            return outcome(e, started) | {"step": k}
    return {"type": None}


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("at", KILLS)
def test_a_killed_rank_is_named_by_every_survivor(at, transport, tmp_path):
    kw, kind = TRANSPORTS[transport]
    res = run_ranks(kill_rank, P, at, kind, str(tmp_path), timeout=120, may_exit={1}, **kw)
    assert res[1] is None, f"rank 1 was meant to die: {res[1]}"
    died = tmp_path / "died"
    for rank in (0, 2):
        got = res[rank]
        assert got["type"] == "PipelineCommError", (rank, got)
        # in the step of the death, or in the next one for a rank that needed nothing more
        # from the dead one in its step (rank 2 may be done when rank 1 dies in a late W)
        died_in = 0 if at == "first step" else 1
        assert got["step"] in (died_in, died_in + 1), got
        assert (got["rank"], got["peer"]) == (rank, 1), got
        assert got["action"] and f"rank {rank}, action " in got["text"], got
        # noticed, not waited out: a 60 s timeout would have said so
        assert got["timed_out"] is False, got
        if died.exists():
            assert got["raised_at"] - float(died.read_text()) < NOTICE, got


# ---------------------------------------------------------------------------- frozen ranks

# (where it stops, which rank): rank 0 hosts the group's store, through which the c10d
# transport's heartbeat and notices go
FREEZES = [("first step", 1), ("F", 1), ("F", 0)]


def frozen_timeout(transport: str, frozen: int) -> float:
    """Over c10d the heartbeat names a frozen rank long before a 60 s timeout, unless the frozen
    one holds the store: then, as over shared memory (where its lock stays), only the timeout
    can end the wait."""
    return TIMEOUT if transport == "shm" or frozen == 0 else KILL_TIMEOUT


def freeze_rank(rank: int, p: int, at: str, frozen: int, transport: str, marks: str) -> dict:
    """Rank ``frozen`` stops (SIGSTOP) at its first send of step 0 (just after its transport
    came up), or in its forward of microbatch 1 in step 1: alive, its connections and locks
    held, silent. The survivors report what they raised; the first then ends the frozen one,
    once the other has reported."""
    import signal

    from ppfast.training import pipeline

    kind, timeout = TRANSPORTS[transport][1], frozen_timeout(transport, frozen)
    state = {"step": 0}
    if rank == frozen and at == "F":
        forward = pipeline._RankCompute.forward

        def stop_in_forward(self, stage, mb, *args):
            if state["step"] == 1 and mb == 1:
                with open(os.path.join(marks, "froze"), "w") as f:
                    f.write(repr(time.time()))
                os.kill(os.getpid(), signal.SIGSTOP)
            return forward(self, stage, mb, *args)

        pipeline._RankCompute.forward = stop_in_forward
    wire = faulty_transport(kind, timeout)
    sched = schedule_for(rank, "1f1b", timeout, wire)
    if rank == frozen:
        with open(os.path.join(marks, "pid"), "w") as f:
            f.write(str(os.getpid()))
        if at == "first step":
            with open(os.path.join(marks, "froze"), "w") as f:
                f.write(repr(time.time()))  # a bound: it stops a moment later, in its first send
            wire.arm("freeze", "send", 0)
    got = {"type": None}
    for k in range(3):
        state["step"] = k
        started = time.time()
        try:
            step(sched, rank, k)
        except Exception as e:  # noqa: BLE001 - what it raised is the point
            got = outcome(e, started) | {"step": k}
            break
    with open(os.path.join(marks, f"reported-{rank}"), "w"):
        pass
    first, other = (r for r in range(P) if r != frozen)
    if rank == first:  # a stopped process would outlive the group: end it once both reported
        deadline = time.time() + 30
        while not os.path.exists(os.path.join(marks, f"reported-{other}")):
            if time.time() > deadline:
                break
            time.sleep(0.05)
        with open(os.path.join(marks, "pid")) as f:
            os.kill(int(f.read()), signal.SIGKILL)
    return got


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize(("at", "frozen"), FREEZES)
def test_a_frozen_rank_is_named_by_every_survivor(at, frozen, transport, tmp_path):
    """Over c10d, the frozen rank's heartbeat falls silent: survivors name it within 2 s, long
    before their 60 s timeout. Over shared memory it still holds the lock that says it lives,
    and a frozen store host (rank 0) silences the heartbeat itself: there a frozen rank is a
    stalled one, and the survivors raise at their (3 s) timeout, none held up by the store."""
    kw = TRANSPORTS[transport][0]
    args = (at, frozen, transport, str(tmp_path))
    res = run_ranks(freeze_rank, P, *args, timeout=120, may_exit={frozen}, **kw)
    assert res[frozen] is None, f"rank {frozen} was meant to stop: {res[frozen]}"
    froze = float((tmp_path / "froze").read_text())
    by_timeout = frozen_timeout(transport, frozen) == TIMEOUT
    survivors = [r for r in range(P) if r != frozen]
    for rank in survivors:
        got = res[rank]
        assert got["type"] == "PipelineCommError", (rank, got)
        assert got["step"] == (0 if at == "first step" else 1), got
        assert got["action"] and f"rank {rank}, action " in got["text"], got
        # its neighbour names it; a rank further down names the one it waited on
        neighbour = abs(rank - frozen) == 1
        assert got["rank"] == rank and got["peer"] in ((frozen,) if neighbour else (1,)), got
        if by_timeout:  # the first to time out tells the other, if it can, which raises then
            assert got["raised_at"] - froze < TIMEOUT + NOTICE, got
        else:
            assert got["timed_out"] is False and "froze" in got["text"], got
            assert got["raised_at"] - froze < NOTICE, got
    if by_timeout:
        assert any(res[r]["timed_out"] for r in survivors), res


# ---------------------------------------------------------------------------- message faults

# (fault, arm arguments on rank 1 before step 1 (or 0), checksum on?)
FAULTS = {
    "delay": ("delay", 1, 0, 0.3, True),
    "stall": ("delay", 1, 0, 3 * TIMEOUT, False),
    "drop": ("drop", 1, 0, 0.0, True),
    "duplicate": ("duplicate", 1, 0, 0.0, True),
    "reorder": ("reorder", 1, 0, 0.0, True),
    "corrupt": ("corrupt", 1, 0, 0.0, True),
    "corrupt header": ("corrupt", 0, 0, 0.0, False),
}
STEPS = 3


def grads(sched) -> list[torch.Tensor]:
    return [p.grad.clone() for s in sched.stages for p in s.submod.parameters()]


def run_faults(rank: int, p: int, kind: str, names: list[str]) -> dict:
    """A clean run, then each fault on a fresh group: per fault and step, what happened, and
    whether a step that returned gave the clean run's gradients."""
    out: dict = {}
    clean = []
    os.environ["PPFAST_CHECKSUM"] = "1"
    sched = schedule_for(rank, "1f1b", TIMEOUT, faulty_transport(kind, TIMEOUT))
    for k in range(STEPS):
        step(sched, rank, k)
        clean.append(grads(sched))
    for name in names:
        fault, at_step, nth, seconds, checksum = FAULTS[name]
        os.environ["PPFAST_CHECKSUM"] = "1" if checksum else "0"
        transport = faulty_transport(kind, TIMEOUT)
        sched = schedule_for(rank, "1f1b", TIMEOUT, transport)
        steps = []
        for k in range(STEPS):
            if rank == 1 and k == at_step:
                transport.arm(fault, "send", nth, -1, seconds)
            started = time.time()
            try:
                step(sched, rank, k)
            except Exception as e:  # noqa: BLE001 - what it raised is the point
                steps.append(outcome(e, started))
                break
            same = all(torch.equal(a, b) for a, b in zip(grads(sched), clean[k], strict=True))
            steps.append({"type": None, "same": same})
        out[name] = {"steps": steps, "fired": transport.fired if rank == 1 else None}
    return out


# Over nccl_emu, messages pair by order, so after a dropped, duplicated or reordered message
# the next ones land in receives of other sizes, which its inner gloo answers by aborting the
# receiving process (NCCL's own behaviour is undefined there): those run in spawns of their
# own, where a rank may die.
BY_ORDER = ("drop", "duplicate", "reorder")


def fault_names(transport: str) -> list[str]:
    return [n for n in FAULTS if transport != "nccl_emu" or n not in BY_ORDER]


@pytest.fixture(scope="module", params=list(TRANSPORTS))
def faults(request):
    kw, kind = TRANSPORTS[request.param]
    names = fault_names(request.param)
    return request.param, run_ranks(run_faults, P, kind, names, timeout=240, **kw)


def failed_step(steps: list[dict]) -> dict | None:
    return next((s for s in steps if s["type"] is not None), None)


@pytest.mark.parametrize("name", list(FAULTS))
def test_no_fault_returns_wrong_gradients(faults, name):
    transport, res = faults
    if name not in res[0]:
        pytest.skip(f"{name} on {transport} runs in a spawn of its own")
    assert res[1][name]["fired"], f"{name} on {transport}: the fault never fired"
    for rank in range(P):
        for k, got in enumerate(res[rank][name]["steps"]):
            if got["type"] is None:
                assert got["same"], (transport, name, rank, k)
            else:
                assert got["type"] == "PipelineCommError" and got["rank"] == rank, got


def test_a_short_delay_only_delays(faults):
    _, res = faults
    for rank in range(P):
        assert all(s["type"] is None for s in res[rank]["delay"]["steps"]), res[rank]["delay"]


@pytest.mark.parametrize("name", ["stall", "drop"])
def test_a_stall_or_a_lost_message_ends_at_the_timeout(faults, name):
    transport, res = faults
    if name not in res[0]:
        pytest.skip(f"{name} on {transport} runs in a spawn of its own")
    errors = [failed_step(res[rank][name]["steps"]) for rank in range(P)]
    assert all(e is not None for e in errors), (transport, errors)
    # only a timeout tells a lost or stalled message from a slow one: the first rank to time
    # out (the one waiting on rank 1's message, or one that waits on a rank held up by it, as
    # rank 1 waits on the receiver's reply) gives up and says so; the others hear it from that
    # rank (or wait out their own timeout)
    assert any(e["timed_out"] for e in errors), errors
    assert all(e["peer"] in range(P) and e["peer"] != r for r, e in enumerate(errors)), errors
    # the stalled rank itself is held up by its stall; every other rank ends in time
    for rank, e in enumerate(errors):
        if name == "drop" or rank != 1:
            assert e["waited"] < TIMEOUT + NOTICE, (transport, name, e)


def test_a_corrupted_payload_is_caught_by_its_checksum(faults):
    transport, res = faults
    errors = [failed_step(res[rank]["corrupt"]["steps"]) for rank in range(P)]
    assert all(e is not None for e in errors), (transport, errors)
    # the receiver of the corrupted message names its sender; the others may repeat its words
    # in the notice they got
    assert any(
        e["text"].startswith(f"rank {r}, action")
        and "does not match its checksum" in e["text"]
        and e["peer"] == 1
        for r, e in enumerate(errors)
        if r != 1
    ), errors


def test_a_corrupted_shape_header_is_caught_without_checksums(faults):
    transport, res = faults
    errors = [failed_step(res[rank]["corrupt header"]["steps"]) for rank in range(P)]
    assert all(e is not None for e in errors), (transport, errors)
    assert any("shape header" in e["text"] and e["peer"] == 1 for e in errors), errors


@pytest.mark.parametrize("name", ["duplicate", "reorder"])
def test_duplicated_or_reordered_messages_fail_or_change_nothing(faults, name):
    transport, res = faults
    if transport == "nccl_emu":
        pytest.skip("by order: test_lost_duplicated_or_reordered_messages_paired_by_order")
    # where messages pair by tag (shm, gloo) a reordered one still meets its receive; where
    # they pair by order (nccl_emu) it cannot. Either the steps are exact (checked above) or
    # every rank fails in the same step.
    failed = [failed_step(res[rank][name]["steps"]) for rank in range(P)]
    if any(failed):
        assert all(failed), (transport, name, failed)


@pytest.mark.parametrize("name", BY_ORDER)
def test_lost_duplicated_or_reordered_messages_paired_by_order(name):
    kw, kind = TRANSPORTS["nccl_emu"]
    res = run_ranks(run_faults, P, kind, [name], timeout=120, may_exit={0, 1, 2}, **kw)
    alive = [r for r in res if r is not None]
    assert alive, "every rank died"
    for r in alive:
        steps = r[name]["steps"]
        # a step that returned was exact; the step that did not raised PipelineCommError
        assert all(s["same"] for s in steps if s["type"] is None), steps
        failed = failed_step(steps)
        assert failed is not None and failed["type"] == "PipelineCommError", steps
