"""scripts/gpu_check.sh, the first command on a lent GPU: it parses, and without a GPU it says
so and stops before building anything (the GPU parts themselves run only on a GPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs for real")
def test_without_a_gpu_it_stops_at_once_and_says_why():
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_PARTS": ""}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
