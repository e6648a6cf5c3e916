"""bench/soak.py: 200 steps of PP x DP over shared memory leave resident memory, file
descriptors, threads and shared-memory names flat after warm-up; and its detector fires on
leaks put in on purpose, so that this test can fail."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_soak(out: Path, *args: str, timeout: float) -> tuple[int, dict | None, str]:
    """Runs bench/soak.py in a subprocess; its exit code, its JSON (None if it wrote none)
    and its output. The subprocess gets ``timeout`` seconds and soak.py its own hard
    deadline a little before that, so that a hung run kills its ranks and fails."""
    cmd = [sys.executable, str(BENCH), *args, "--json", str(out)]
    cmd += ["--timeout", str(timeout - 10), "--step-timeout", "30"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    record = json.loads(out.read_text()) if out.exists() else None
    return res.returncode, record, res.stdout + res.stderr


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    # half of it warm-up: glibc's heap still settles in steps up to ~2 MiB in the first ~100
    # steps (fragmentation: RSS rises while the bytes in use do not); one activation leaked
    # per step would still add 3.1 MiB over the other 100
    args = ["--steps", "200", "--sample-every", "5", "--warmup", "0.5", "--rss-tol-mib", "1.5"]
    return run_soak(out, *args, timeout=85)


@pytest.mark.timeout(100)
def test_200_steps_stay_flat(clean_run):
    rc, record, output = clean_run
    assert record is not None, output[-4000:]
    assert rc == 0 and record["grew"] == [], output[-4000:]
    assert record["setup"]["schedules"] == "1f1b,zb-h1,zb-v,interleaved-1f1b"
    assert record["setup"]["transport"] == "shm"
    assert len(record["ranks"]) == 4
    for r in record["ranks"]:
        steps = [s["step"] for s in r["samples"]]
        assert steps == list(range(0, 201, 5))
        assert record["setup"]["warmup_steps"] == 100
        # the pipeline really ran over shared memory: its segments are mapped
        assert r["samples"][-1]["shm_maps"] > 0
    for key in ("cores", "torch", "cpu"):
        assert record["machine"][key]
    assert record["date"] and record["command"].startswith("python bench/soak.py")
    assert not any(str(Path.home()) in json.dumps(v) for v in record["setup"].values())


def test_a_leak_of_one_activation_per_step_is_caught_on_this_runs_noise(clean_run):
    """The clean run's own resident-memory curves, plus what keeping one activation per step
    would have added: the same verdict must say growth on every rank."""
    _, record, output = clean_run
    assert record is not None, output[-4000:]
    soak = load_soak()
    setup = record["setup"]
    per_step = setup["leak_per_step_kib"] * 1024
    for r in record["ranks"]:
        steps = [s["step"] for s in r["samples"]]
        rss = [s["rss"] for s in r["samples"]]
        leaky = [x + per_step * k for k, x in zip(steps, rss, strict=True)]
        clean = soak.judge_rss(steps, rss, setup["warmup_steps"], setup["rss_tol_mib"])
        caught = soak.judge_rss(steps, leaky, setup["warmup_steps"], setup["rss_tol_mib"])
        assert not clean["grew"], clean
        assert caught["grew"], (r["rank"], caught)


def test_counts_must_not_grow_at_all():
    soak = load_soak()
    steps = list(range(0, 101, 10))
    flat = [30, 31, 33, 33, 33, 34, 33, 33, 33, 33, 33]  # warm-up to step 20, a blip at 50
    assert not soak.judge_count(steps, flat, 20)["grew"]
    late = [30, 31, 33, 33, 33, 33, 33, 33, 33, 34, 34]  # one more that stays
    assert soak.judge_count(steps, late, 20)["grew"]


@pytest.mark.timeout(80)
def test_injected_leaks_are_reported(tmp_path):
    """Every rank keeps one tensor, one fd and one thread per step, and rank 0 one
    /dev/shm/ppfast-* name: the run must exit 1 naming each of them, and clean up."""
    # one schedule, and one sequence length: a short run with little allocator noise, whose
    # 128 KiB activations leak 5.6 MiB over the 45 measured steps
    args = ["--steps", "60", "--sample-every", "5", "--schedules", "1f1b"]
    args += ["--seq-min", "256", "--seq-max", "256", "--leak", "tensor,fd,thread,shm"]
    rc, record, output = run_soak(tmp_path / "leak.json", *args, timeout=70)
    assert record is not None, output[-4000:]
    assert rc == 1, output[-4000:]
    want = {f"{m} on rank {r}" for m in ("rss", "fds", "threads") for r in range(4)}
    want.add("shm_names on rank 0")
    assert want <= set(record["grew"]), record["grew"]
    window = 60 - record["setup"]["warmup_steps"]
    for r in range(4):
        v = record["verdict"]
        assert v["fds"][str(r)]["end"] - v["fds"][str(r)]["start"] == window
        assert v["threads"][str(r)]["end"] - v["threads"][str(r)]["start"] == window
        assert v["rss"][str(r)]["trend_mib"] >= 0.8 * record["setup"]["one_leak_over_window_mib"]
    assert not [n for n in os.listdir("/dev/shm") if "soakleak" in n]
