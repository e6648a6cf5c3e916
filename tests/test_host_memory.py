"""keep_freed_memory: glibc keeps what a CPU step frees, unless the user or platform says no."""

import os
import platform
import subprocess
import sys

import pytest

from ppfast.training.host_memory import keep_freed_memory


def test_opt_out(monkeypatch):
    monkeypatch.setenv("PPFAST_KEEP_HOST_MEMORY", "0")
    assert keep_freed_memory() is False


@pytest.mark.parametrize(
    "var", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"]
)
def test_the_users_own_malloc_settings_win(monkeypatch, var):
    monkeypatch.delenv("PPFAST_KEEP_HOST_MEMORY", raising=False)
    monkeypatch.setenv(var, "1048576")
    assert keep_freed_memory() is False


def test_another_malloc_is_left_alone(monkeypatch):
    monkeypatch.delenv("PPFAST_KEEP_HOST_MEMORY", raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so")
    assert keep_freed_memory() is False


# A converted pipeline under ZB-H1: each I keeps its layers' inputs and output gradients for
# the W, so the heap's top is freed and grown again every step
_STEPS = """
import resource, torch, ppfast
from torch import nn

torch.set_num_threads(1)
torch.manual_seed(0)


def block():
    return nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512))


stages = [ppfast.nn.convert(nn.Sequential(block(), block())) for _ in range(2)]
pipe = ppfast.Pipe(stages, chunks=4, schedule="zb-h1", loss_fn=nn.MSELoss())
x, y = torch.randn(512, 512), torch.randn(512, 512)


def step():
    pipe.step(x, target=y)
    for s in stages:
        for p in s.parameters():
            p.grad = None


def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


step()
step()
counts = []
for _ in range(4):  # the fewest of several steps: the kernel may reclaim a page now and then
    before = faults()
    step()
    counts.append(faults() - before)
print(min(counts))
"""


def _faults_per_step(keep: bool) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PPFAST_KEEP_HOST_MEMORY"] = "1" if keep else "0"
    res = subprocess.run(
        [sys.executable, "-c", _STEPS], capture_output=True, text=True, timeout=120, env=env
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_a_cpu_schedule_keeps_what_its_steps_free():
    # in fresh processes: mallopt is process-wide. Page faults are counted, not timed.
    off, on = _faults_per_step(False), _faults_per_step(True)
    assert on < off / 4, (off, on)
