"""What both kernels share: Triton (when installed), its mode, dtypes, and small helpers."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install runs the PyTorch path
    triton = None
    tl = None


def _interpreting() -> bool:
    # Triton makes a kernel interpreted or compiled when `triton.jit` decorates it, which is
    # when the kernel modules are imported; the choice made here must be the one the
    # decorators saw.
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Fixed at import, like the decorated kernels themselves (never reassigned).
INTERPRET = _interpreting()
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the references also take float64, so tests can use them as the exact answer
REFERENCE_DTYPES = (*KERNEL_DTYPES, torch.float64)
SMEM_BYTES = 220 * 1024  # Hopper has 227 KiB of shared memory per block; keep some slack


def fp32_dot_precision() -> str:
    """TF32 or IEEE for fp32 inputs: whatever torch.mm would use on CUDA right now."""
    # torch keeps a new setting (fp32_precision) and a legacy one (allow_tf32); once the new
    # one is set, reading the legacy one raises, and "none" means only the legacy one speaks.
    m = torch.backends.cuda.matmul
    prec = getattr(m, "fp32_precision", "none")
    if prec in ("tf32", "ieee"):
        return prec
    return "tf32" if m.allow_tf32 else "ieee"


def triton_runs_on(device: torch.device) -> bool:
    """Whether the kernels' ``backend="auto"`` runs Triton for tensors on ``device``."""
    if triton is None:
        return False
    return INTERPRET or torch.device(device).type == "cuda"


# Output tiles (rows, cols), reduction step, num_warps, num_stages, tuned for Hopper. Large
# 128×256 tiles with 8 warps keep wgmma busy on the big projection shapes; the 64- and
# 128-wide ones are for layers with fewer output tiles than SMs. 128-wide tiles with 4 warps
# are left out: with an fp32 accumulator seeded from a main grad, or an activation's epilogue,
# they spill registers (ptxas -v, sm_90a).
HOPPER_TILES = (
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 128, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 3),
)


def tile_configs(rows: str, cols: str, step: str, group: str, interpreter_tile: tuple) -> list:
    """Autotuning configs for a kernel whose output tiles are ``rows`` × ``cols`` (the names of
    its block-size arguments) and whose reduction advances by ``step``.

    Under the interpreter (numpy, one program at a time) there is one small tile,
    ``interpreter_tile`` = (rows, cols, step), small enough that the test shapes span several
    tiles on every axis, ragged edges included.
    """
    if INTERPRET:
        r, c, k = interpreter_tile
        return [triton.Config({rows: r, cols: c, step: k, group: 2}, num_warps=4, num_stages=1)]
    return [
        triton.Config({rows: r, cols: c, step: k, group: 8}, num_warps=w, num_stages=st)
        for r, c, k, w, st in HOPPER_TILES
    ]


def prune_tiles(configs, elt: int, rows: str, cols: str, step: str, n_rows: int, n_cols: int):
    """Drop tiles that overflow shared memory (fp32 takes twice bf16's) or dwarf the problem."""
    fits = [
        c
        for c in configs
        if c.num_stages * c.kwargs[step] * (c.kwargs[rows] + c.kwargs[cols]) * elt <= SMEM_BYTES
    ]
    small = [
        c for c in fits if c.kwargs[rows] <= max(64, n_rows) and c.kwargs[cols] <= max(64, n_cols)
    ]
    return small or fits or configs[-1:]


rtne_bf16 = None  # Triton functions where Triton is installed
grouped_tile = None

if triton is not None:

    @triton.jit
    def rtne_bf16(v):
        # fp32 -> the nearest bf16, ties to even, still held in fp32. The interpreter converts
        # fp32 to bf16 by truncation (a GPU rounds to nearest), which would double the
        # rounding error the tests measure; after this the truncation is exact.
        bits = v.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)

    @triton.jit
    def grouped_tile(
        pid, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr
    ):
        # Grouped order: GROUP row-blocks of the output are walked together so the operand
        # columns they share stay in L2 while neighbouring programs run. Returns the program's
        # (row-block, column-block).
        num_r = tl.cdiv(rows, BLOCK_R)
        num_c = tl.cdiv(cols, BLOCK_C)
        in_group = GROUP * num_c
        first = (pid // in_group) * GROUP
        group = tl.minimum(num_r - first, GROUP)
        return first + (pid % in_group) % group, (pid % in_group) // group
