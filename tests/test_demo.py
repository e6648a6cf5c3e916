"""`ppfast demo`: a short run writes its files and matches one device; Ctrl-C leaves nothing behind.

The demo runs as a user runs it, in a subprocess (`python -m ppfast demo ...`), on a tiny
model so that two gloo ranks finish in seconds. Every wait has a hard timeout. Timings are
printed by the demo but never asserted.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = ["--layers", "4", "--width", "32", "--heads", "2", "--seq", "16", "--batch", "8"]
TINY += ["--microbatches", "4", "--vocab", "64", "--check-steps", "2"]


def demo_env() -> dict:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # not under torchrun, whatever runs pytest
        env.pop(key, None)
    return env


def demo(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ppfast", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=demo_env(),
        **kwargs,
    )


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is ``pgid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float) -> list[str]:
    """Lines of stdout until one starts with ``prefix``; fails after ``timeout`` seconds."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if not ready:
            assert proc.poll() is None, f"demo exited early: {proc.stderr.read()}"
            continue
        line = proc.stdout.readline()
        assert line, f"demo closed its output: {proc.stderr.read()}"
        lines.append(line)
        if line.startswith(prefix):
            return lines
    pytest.fail(f"no line starting with {prefix!r} within {timeout} s; got {lines}")


@pytest.mark.timeout(90)
def test_short_demo_writes_files_and_matches_one_device(tmp_path):
    out = tmp_path / "demo-out"
    proc = demo("--steps", "3", "--out", str(out), *TINY)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    for name in ("timeline.png", "timeline_simulated.png", "trace.json", "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    assert "step   3/3" in stdout and "summary" in stdout

    m = json.loads((out / "metrics.json").read_text())
    for key in ("config", "launch", "machine", "schedule", "profile", "steps", "summary"):
        assert key in m, key
    assert m["config"]["steps"] == 3 and m["launch"]["ranks"] == 2
    assert m["launch"]["mode"] == "processes" and m["launch"]["backend"] == "gloo"
    assert len(m["steps"]) == 3
    for step in m["steps"]:
        assert len(step["losses"]) == 4  # one per microbatch
        assert step["tokens_per_s"] > 0
        assert len(step["bubble_per_rank"]) == 2 and len(step["busy_s_per_rank"]) == 2
    s = m["summary"]
    for key in (
        "tokens_per_s",
        "bubble_measured",
        "bubble_measured_per_rank",
        "busy_s_per_rank",
        "bubble_simulated",
        "p2p_p50_s",
        "p2p_p99_s",
        "drawn_step",
    ):
        assert key in s, key
    assert 0.0 <= s["bubble_simulated"] < 1.0
    assert m["schedule"]["schedule"] and m["schedule"]["candidates"]
    one = m["one_device"]
    assert one["tokens_per_s"] > 0 and one["speedup"] > 0 and len(one["losses"]) == 2
    assert one["steps_timed"] >= 2
    check = m["loss_check"]
    assert check["passed"] is True, check
    assert check["steps"] == 2 and check["rtol"] == 1e-5
    assert check["max_rel_diff"] <= 1e-5

    trace = json.loads((out / "trace.json").read_text())
    ranks = {e["tid"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert ranks == {0, 1}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("target", ["group", "parent"])
def test_ctrl_c_stops_every_rank(tmp_path, target):
    """SIGINT to the whole process group (what a terminal's Ctrl-C does) or to the parent
    alone: the demo exits with 130, without tracebacks, and no process of its group lives on."""
    # as a terminal starts it: with SIGINT handled, even when this test runs where SIGINT is
    # ignored (a background job of a non-interactive shell), which Python would inherit
    proc = demo("--steps", "100000", "--out", str(tmp_path / "o"), *TINY, start_new_session=True,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    pgid = proc.pid  # a new session: the demo leads its own process group
    try:
        wait_for_line(proc, "step ", timeout=60)
        assert len(group_members(pgid)) >= 3  # the demo and its two ranks
        if target == "group":
            os.killpg(pgid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
        assert stderr.count("interrupted") == 1, stderr
        deadline = time.monotonic() + 10
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert group_members(pgid) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait(5)


@pytest.mark.timeout(30)
def test_settings_no_schedule_can_run_are_refused_before_any_rank_starts(tmp_path):
    proc = demo("--schedule", "dualpipev", "--microbatches", "2", "--batch", "8",
                "--out", str(tmp_path / "o"))  # fmt: skip
    _, stderr = proc.communicate(timeout=25)
    assert proc.returncode == 2
    assert "dualpipev" in stderr and "at least 4" in stderr
    assert "Traceback" not in stderr


def _fake_rank(conn, rank: int, delay: float, kind: str, text: str = "", peer: bool = False):
    """Stands in for a rank: after ``delay`` s it reports ``kind`` as a real rank would."""
    time.sleep(delay)
    if kind == "die":
        os._exit(3)
    conn.send((kind, rank, {"text": text, "peer": peer} if kind == "error" else None))
    if kind == "error":
        time.sleep(60)  # a failed rank keeps its connections open until it is stopped


def _supervised(*ranks) -> tuple[int, list]:
    import multiprocessing as mp
    from multiprocessing.connection import wait

    from ppfast.tools.demo import launch

    ctx = mp.get_context("fork")
    procs, conns = [], []
    for r, spec in enumerate(ranks):
        recv_end, send_end = ctx.Pipe(duplex=False)
        procs.append(ctx.Process(target=_fake_rank, args=(send_end, r, *spec), daemon=True))
        procs[-1].start()
        send_end.close()
        conns.append(recv_end)
    try:
        return launch._supervise(procs, conns, wait), procs
    finally:
        launch._stop(procs)


@pytest.mark.timeout(30)
def test_a_failing_rank_is_reported_once_root_cause_first(capsys):
    code, procs = _supervised(
        (0.1, "error", "PipelineCommError: rank 0 lost its peer", True),
        (0.4, "error", "ValueError: the actual problem", False),
        (0.0, "done"),
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("failed") == 1 and "rank 1 failed: ValueError: the actual problem" in err
    assert all(not p.is_alive() for p in procs)


@pytest.mark.timeout(30)
def test_a_rank_that_dies_without_a_word_is_reported(capsys):
    code, procs = _supervised((0.2, "die"), (0.0, "done"))
    assert code == 1
    assert "rank 0 failed: exited with code 3" in capsys.readouterr().err
    assert all(not p.is_alive() for p in procs)
