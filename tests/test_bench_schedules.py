"""``ppfast bench schedules`` runs end to end on a tiny model and writes its JSON."""

import json
import subprocess
import sys

import pytest


@pytest.mark.timeout(120)
def test_bench_schedules_tiny(tmp_path):
    out = tmp_path / "s.json"
    cmd = [sys.executable, "-m", "ppfast", "bench", "schedules", "--rounds", "1"]
    cmd += ["--schedules", "1f1b,zb-h1", "--width", "32", "--batch", "16", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=110)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {(r["runtime"], r["schedule"]): r for r in data["rows"]}
    assert set(rows) == {("ppfast", "1f1b"), ("torch", "1f1b"), ("ppfast", "zb-h1")}
    zb = rows["ppfast", "zb-h1"]
    assert 0 <= zb["bubble"] < 1 and 0 <= zb["simulated_bubble"] < 1
    # the profiled costs name every stage and the passes a zero-bubble schedule runs
    assert set(zb["costs_ms"]) == {"0", "1"} and {"F", "I", "W"} <= set(zb["costs_ms"]["1"])
    assert data["T_limit_s"] > 0 and rows["ppfast", "1f1b"]["eta"] > 0
    assert "1f1b" in res.stdout and "vs torch" in res.stdout


def test_bench_schedules_rejects_bad_split():
    from ppfast.tools.benchmarks.schedules import main

    with pytest.raises(ValueError, match="multiple of 4"):
        main(["--depth", "6"])


@pytest.mark.timeout(120)
def test_bench_schedules_on_the_demo_model(tmp_path):
    out = tmp_path / "g.json"
    cmd = [sys.executable, "-m", "ppfast", "bench", "schedules", "--model", "gpt"]
    cmd += ["--rounds", "1", "--schedules", "zb-v", "--width", "32", "--depth", "4"]
    cmd += ["--batch", "8", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=110)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert {(r["runtime"], r["schedule"]) for r in data["rows"]} == {
        ("ppfast", "zb-v"),
        ("torch", "zb-v"),
    }
    assert "GPT decoder" in res.stdout
