"""The examples run as the README shows them: under torchrun, on 2 gloo ranks, small and short.

examples/hf_causal_lm.py trains a tiny Llama and a tiny GPT-2 for a few steps, with the whole
loop on (bf16 autocast, clipping, the shared loss; fp16 with ppfast.GradScaler where CPU
autocast has fp16), saves the stages and gathers them into a save_pretrained folder, which
must load and give a finite loss. Timings are printed, never asserted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--seq", "16",
        "--batch", "8", "--microbatches", "4", "--steps", "3"]  # fmt: skip


def run_example(tmp_path: Path, *args: str) -> str:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "2", str(ROOT / "examples" / "hf_causal_lm.py"), *TINY,
           "--out", str(tmp_path / "out"), *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


@pytest.mark.parametrize(
    "args",
    [("--amp", "bf16"), ("--arch", "gpt2", "--schedule", "zb-v", "--layers", "4", "--clip", "0.5")],
    ids=["llama-zb-h1-bf16", "gpt2-zb-v"],
)  # fmt: skip
def test_hf_causal_lm_trains_and_saves_a_model_that_loads(tmp_path, args):
    out = run_example(tmp_path, *args)
    steps = re.findall(r"step +(\d+) +loss (\S+)", out)
    assert [int(s) for s, _ in steps] == [0, 1, 2], out  # rank 0 logs every step's loss
    assert all(float(loss) == float(loss) for _, loss in steps), out  # not NaN
    assert "grad norm" in out  # clipped by the whole model's norm (default --clip 1.0)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert sum(p.numel() for p in model.parameters()) > 0
