"""Fused weight-grad kernel against PyTorch's unfused sequence and a bare cuBLAS GEMM (GPU only).

For Y = X·Wᵀ + b in bf16 with an fp32 main grad, per (tokens, in, out) shape:
  fused      ppfast.kernels.weight_grad: dW += dYᵀX and db += Σ dY into the fp32 main grad
  unfused    what a training loop does without it: torch.mm(dYᵀ, X) in bf16, added (and cast)
             into the fp32 main grad, then dY.sum(0) added into the bias main grad
  addmm      the PyTorch reference path: cuBLAS with an fp32 C (addmm out_dtype), bias sum
  gemm       torch.mm(dYᵀ, X) alone, bf16 out: the GEMM the others cannot beat by much
Each round times every contender once (triton.testing.do_bench, median of its repetitions);
rounds alternate the contenders and the medians over rounds are reported, with TFLOP/s
(2·tokens·in·out per weight gradient) and ratios. Writes bench/results/kernel_weight_grad.json.

    python bench/bench_kernel_weight_grad.py [--rounds 7] [--rep 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

SHAPES = [(4096, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096), (2048, 8192, 8192)]


def contenders(x, dy, main_w, main_b):
    from ppfast.kernels.weight_grad import weight_grad

    def fused():
        weight_grad(x, dy, main_w, main_b)

    def unfused():
        main_w.add_(torch.mm(dy.t(), x))
        main_b.add_(dy.sum(0))

    def addmm():
        weight_grad(x, dy, main_w, main_b, backend="torch")

    def gemm():
        torch.mm(dy.t(), x)

    return {"fused": fused, "unfused": unfused, "addmm": addmm, "gemm": gemm}


def check(x, dy) -> float:
    """Largest difference of the fused result from PyTorch's fp32-C GEMM, relative to its size."""
    from ppfast.kernels.weight_grad import weight_grad

    n, k = dy.shape[1], x.shape[1]
    ours = torch.zeros(n, k, device=x.device)
    ref = torch.zeros_like(ours)
    weight_grad(x, dy, ours)
    weight_grad(x, dy, ref, backend="torch")
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rep", type=int, default=100, help="milliseconds of repetitions per timing")
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "kernel_weight_grad.json")
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernel_weight_grad needs a CUDA GPU; none here, nothing measured")
        sys.exit(0)
    import triton
    from triton.testing import do_bench

    device = torch.cuda.get_device_name()
    print(f"{device}, bf16 inputs, fp32 main grad; median over {args.rounds} alternating rounds")
    head = f"{'tokens':>6} {'in':>6} {'out':>6} | " + " ".join(
        f"{n + ' ms':>11} {'TF/s':>5}" for n in ("fused", "unfused", "addmm", "gemm")
    )
    print(head + " | unfused/fused  addmm/fused  gemm/fused  rel.diff")
    rows = []
    for m, k, n in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        main_w = torch.zeros(n, k, device="cuda")
        main_b = torch.zeros(n, device="cuda")
        fns = contenders(x, dy, main_w, main_b)
        for fn in fns.values():  # compile and autotune outside the timings
            fn()
        torch.cuda.synchronize()
        times = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                times[name].append(do_bench(fn, rep=args.rep, return_mode="median"))
        ms = {name: statistics.median(t) for name, t in times.items()}
        flop = 2.0 * m * n * k
        tflops = {name: flop / (t * 1e-3) / 1e12 for name, t in ms.items()}
        diff = check(x, dy)
        print(
            f"{m:>6} {k:>6} {n:>6} | "
            + " ".join(f"{ms[c]:>11.3f} {tflops[c]:>5.0f}" for c in fns)
            + f" | {ms['unfused'] / ms['fused']:>13.2f} {ms['addmm'] / ms['fused']:>12.2f}"
            + f" {ms['gemm'] / ms['fused']:>11.2f} {diff:>9.1e}"
        )
        rows.append(
            {
                "tokens": m, "in": k, "out": n,
                "ms": ms, "ms_all_rounds": times, "tflops": tflops,
                "speedup_vs_unfused": ms["unfused"] / ms["fused"],
                "speedup_vs_addmm": ms["addmm"] / ms["fused"],
                "gemm_time_over_fused": ms["gemm"] / ms["fused"],
                "max_rel_diff_vs_addmm": diff,
            }
        )  # fmt: skip
        del x, dy, main_w, main_b, fns
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "device": device,
                "torch": torch.__version__,
                "triton": triton.__version__,
                "dtype": "bfloat16",
                "main_grad": "float32",
                "rounds": args.rounds,
                "rep_ms": args.rep,
                "shapes": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
