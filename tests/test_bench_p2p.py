"""`ppfast bench p2p`: runs on tiny sizes, writes complete JSON, refuses bad arguments."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ppfast.tools.benchmarks import p2p
from ppfast.tools.cli import main as cli_main

HAS_CUDA = torch.cuda.is_available()
TINY = ["--min-size", "256K", "--max-size", "1M", "--reps", "8", "--warmup", "1"]
TINY += ["--seconds", "0.2", "--overlap-reps", "2", "--matmul", "64"]


def check_rows(res: dict, cpu: bool) -> None:
    assert [r["bytes"] for r in res["rows"]] == [256 << 10, 1 << 20]
    for r in res["rows"]:
        assert r["reps"] >= 5
        assert 0 < r["p50_s"] <= r["p99_s"] < 60
        assert math.isfinite(r["gbps"]) and r["gbps"] > 0
        if cpu:  # loaded latency up to --overlap-min
            assert 0 < r["loaded_p50_s"] <= r["loaded_p99_s"]
    big = res["rows"][-1]
    assert big["matmuls"] >= 1
    assert min(big["t_compute_s"], big["t_comm_s"], big["t_both_s"]) > 0
    assert math.isfinite(big["overlap_efficiency"])
    assert (big["comm_cpu_s"] >= 0) if cpu else big["comm_cpu_s"] is None
    assert "overlap_efficiency" not in res["rows"][0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mode", "post"), [("gloo", "caller"), ("gloo", "thread"), ("shm", "caller")]
)
def test_two_local_processes_write_json(tmp_path, monkeypatch, mode, post):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "p2p.json"
    assert p2p.main(["--mode", mode, *TINY, "--post", post, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["options"]["post"] == post
    assert res["options"]["transport"] == ("shm" if mode == "shm" else "c10d")
    for key in ("machine", "torch", "date", "latency", "overlap", "command", "load_average_1min"):
        assert res[key]
    assert res["mode"] == mode and res["launch"] == "two local processes"
    assert res["torch"] == torch.__version__
    assert str(tmp_path) not in res["command"]  # where the JSON went is not recorded
    check_rows(res, cpu=True)


@pytest.mark.timeout(60)
def test_local_mode_hand_off_on_cpu_threads(tmp_path, monkeypatch, capsys):
    # the GPU mode's thread hand-off, with plain copies; no JSON unless asked for
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.chdir(tmp_path)
    assert p2p.main(["--mode", "local", "--device", "cpu", *TINY]) == 0
    assert "T_compute" in capsys.readouterr().out
    assert not (tmp_path / "bench").exists()


def test_help_through_the_cli(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["bench", "p2p", "-h"])
    assert e.value.code == 0
    assert "overlap" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--min-size", "4X"], "like 4K"),
        (["--min-size", "1M", "--max-size", "4K"], "swap"),
        (["--reps", "0"], "--reps"),
        (["--mode", "local", "--device", "tpu"], "or cpu"),
    ],
)
def test_mistakes_say_what_to_change(argv, message):
    with pytest.raises(ValueError, match=message):
        p2p.main(argv)


def test_sizes():
    assert p2p.parse_size("4KiB") == 4096 and p2p.parse_size("256M") == 256 << 20
    assert p2p.sizes_between(4 << 10, 256 << 20, 4)[-1] == 256 << 20
    assert len(p2p.sizes_between(1 << 20, 8 << 20, 2)) == 4


@pytest.mark.skipif(HAS_CUDA, reason="checks the message given where there is no GPU")
def test_gpu_modes_skip_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert p2p.main(["--mode", "nccl"]) == 0
    monkeypatch.delenv("RANK")
    assert p2p.main(["--mode", "local"]) == 0
    assert capsys.readouterr().err.count("needs a CUDA device") == 2


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.timeout(120)
def test_local_mode_on_one_gpu(tmp_path):
    out = tmp_path / "p2p.json"
    assert p2p.main(["--mode", "local", *TINY, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["mode"] == "local"
    check_rows(res, cpu=False)
