"""bench/bench_models.py runs end to end on tiny Hugging Face decoders and writes its JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_models.py"


@pytest.mark.timeout(180)
def test_bench_models_tiny(tmp_path):
    out = tmp_path / "models.json"
    cmd = [sys.executable, str(BENCH), "--models", "llama,gpt2", "--widths", "32"]
    cmd += ["--layers", "4", "--seq", "8", "--batch", "4", "-m", "2", "--rounds", "1"]
    cmd += ["--warmup", "1", "--profile-reps", "1", "--profile-warmup", "0"]
    cmd += ["--schedules", "1f1b,zb-h1,zb-v,interleaved-zb,auto", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stderr[-3000:]
    run = json.loads(out.read_text())["runs"][-1]
    assert run["machine"]["cores"] >= 1 and run["machine"]["torch"]
    assert run["command"].startswith("python bench/bench_models.py")
    assert [(r["model"], r["width"]) for r in run["results"]] == [("llama", 32), ("gpt2", 32)]
    for result in run["results"]:
        rows = {(r["runtime"], r["schedule"]): r for r in result["rows"]}
        # every ppfast schedule, and torch's counterpart of each but auto
        want = {"1f1b", "zb-h1", "zb-v", "interleaved-zb"}
        assert {s for rt, s in rows if rt == "torch"} == want
        assert {s for rt, s in rows if rt == "ppfast"} == want | {"auto"}
        assert set(result["T_limit_s"]) == {"loop", "v"}
        assert rows["ppfast", "zb-v"]["limit"] == "v" and rows["ppfast", "1f1b"]["limit"] == "loop"
        for (runtime, name), row in rows.items():
            assert row["eta"] > 0 and row["step_s"] > 0
            assert len(row["ranks"]) == 2
            for rank in row["ranks"]:
                assert rank["compute_ms"] and rank["idle_ms"] is not None
            if runtime == "ppfast":
                assert 0 <= row["simulated_bubble"] < 1
                if name != "auto":
                    assert row["speedup_vs_torch"] > 0
        zbv = rows["ppfast", "zb-v"]["ranks"][0]
        # a split schedule's compute is F, I and W, each set against its profiled cost
        assert set(zbv["compute_ms"]) == {"F", "I", "W"} == set(zbv["run_vs_alone"])
        assert set(rows["ppfast", "1f1b"]["ranks"][0]["compute_ms"]) == {"F", "B"}
        load = result["load"]
        assert {"loadavg_before", "others_cores", "contended"} <= set(load)
    assert "zb-v" in res.stdout and "T_limit loop" in res.stdout


def test_bench_models_rejects_layers_that_do_not_cut_into_four():
    res = subprocess.run(
        [sys.executable, str(BENCH), "--layers", "6"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode != 0 and "multiple of 4" in res.stderr
