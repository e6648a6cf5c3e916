"""Input-grad kernel against torch.mm, plain and with a fused GELU backward (GPU only).

For Y = X·Wᵀ + b in bf16, per (tokens, in, out) shape, dX = dY·W of shape (tokens, in):
  fused        ppfast.kernels.input_grad(dy, w)
  mm           torch.mm(dy, w)
  fused+gelu   input_grad(dy, w, act="gelu_tanh", preact=z): dX ⊙ gelu'(z) in the epilogue
  mm+gelu      torch.mm then aten.gelu_backward(approximate="tanh"), as autograd runs them
Each round times every contender once (triton.testing.do_bench, median of its repetitions);
rounds alternate the contenders and the medians over rounds are reported, with TFLOP/s
(2·tokens·in·out) and ratios. Writes bench/results/kernel_input_grad.json.

    python bench/bench_kernel_input_grad.py [--rounds 7] [--rep 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

SHAPES = [(4096, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096), (2048, 8192, 8192)]
NAMES = ("fused", "mm", "fused+gelu", "mm+gelu")


def contenders(dy, w, z):
    from ppfast.kernels.input_grad import input_grad

    return {
        "fused": lambda: input_grad(dy, w),
        "mm": lambda: torch.mm(dy, w),
        "fused+gelu": lambda: input_grad(dy, w, act="gelu_tanh", preact=z),
        "mm+gelu": lambda: torch.ops.aten.gelu_backward(torch.mm(dy, w), z, approximate="tanh"),
    }


def check(dy, w, z) -> float:
    """Largest difference of the fused GELU result from an fp32 computation, relative to it."""
    from ppfast.kernels.input_grad import input_grad, input_grad_reference

    ours = input_grad(dy, w, act="gelu_tanh", preact=z).float()
    ref = input_grad_reference(dy.float(), w.float(), act="gelu_tanh", preact=z.float())
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rep", type=int, default=100, help="milliseconds of repetitions per timing")
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "kernel_input_grad.json")
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernel_input_grad needs a CUDA GPU; none here, nothing measured")
        sys.exit(0)
    import triton
    from triton.testing import do_bench

    device = torch.cuda.get_device_name()
    print(f"{device}, bf16; median over {args.rounds} alternating rounds")
    head = f"{'tokens':>6} {'in':>6} {'out':>6} | " + " ".join(
        f"{n + ' ms':>13} {'TF/s':>5}" for n in NAMES
    )
    print(head + " | mm/fused  (mm+gelu)/(fused+gelu)  rel.diff")
    rows = []
    for m, k, n in SHAPES:
        torch.manual_seed(0)
        dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / n**0.5
        z = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        fns = contenders(dy, w, z)
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
        diff = check(dy, w, z)
        print(
            f"{m:>6} {k:>6} {n:>6} | "
            + " ".join(f"{ms[c]:>13.3f} {tflops[c]:>5.0f}" for c in NAMES)
            + f" | {ms['mm'] / ms['fused']:>8.2f} {ms['mm+gelu'] / ms['fused+gelu']:>24.2f}"
            + f" {diff:>9.1e}"
        )
        rows.append(
            {
                "tokens": m, "in": k, "out": n,
                "ms": ms, "ms_all_rounds": times, "tflops": tflops,
                "speedup_vs_mm": ms["mm"] / ms["fused"],
                "speedup_vs_mm_gelu": ms["mm+gelu"] / ms["fused+gelu"],
                "max_rel_diff_gelu_vs_fp32": diff,
            }
        )  # fmt: skip
        del dy, w, z, fns
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
