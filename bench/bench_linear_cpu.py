"""Split backward of ppfast.nn.Linear against nn.Linear's backward, on CPU.

For Y = X·Wᵀ + b in fp32 with X requiring grad (a layer inside a model), per (tokens, in,
out) shape:
  torch    nn.Linear: y.backward(dY) computes dX, dW and db together; autograd then adds
           dW and db into .grad (which holds the gradients of earlier microbatches)
  ppfast   ppfast.nn.Linear in a stage whose schedule splits the backward: I = y.backward(dY)
           computes dX and defers the weight work; W = the stage's W action then adds
           dYᵀX and ΣdY into .grad in place. Reported as I, W and I+W.
The forward is not timed. Each round times one backward of each contender, the order
alternating from round to round, so a load that comes and goes (other processes on the
machine) falls on both alike; the table gives the medians over rounds and the ratio
ppfast (I+W) / torch (the JSON also has the fastest round of each). Threads: as many as
torch uses by default here (the machine's cores), or --threads. Writes
bench/results/linear_cpu.json.

    python bench/bench_linear_cpu.py [--rounds 31] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import ppfast
from ppfast.nn import WeightGradStore
from ppfast.nn.linear import attach_store
from ppfast.tools.benchmarks.machine import describe

SHAPES = [(2048, 1024, 1024), (2048, 1024, 4096), (2048, 4096, 1024), (4096, 2048, 2048)]


def setup(tokens: int, k: int, n: int):
    torch.manual_seed(0)
    ref = nn.Linear(k, n)
    ours = ppfast.nn.convert(nn.Sequential(nn.Linear(k, n)))
    ours[0].load_state_dict(ref.state_dict())
    store = WeightGradStore("bench")
    attach_store(ours, store)
    store.begin_step(1 << 62)  # as inside a pipeline step whose schedule has W actions
    x = torch.randn(tokens, k, requires_grad=True)
    dy = torch.randn(tokens, n)
    return ref, ours, store, x, dy


def time_torch(ref, x, dy) -> float:
    x.grad = None
    y = ref(x)
    t = time.perf_counter()
    y.backward(dy)
    return time.perf_counter() - t


def time_ppfast(ours, store, x, dy) -> tuple[float, float]:
    x.grad = None
    y = ours(x)
    t0 = time.perf_counter()
    with store.backward(0, defer=True):
        y.backward(dy)
    t1 = time.perf_counter()
    store.flush(0)
    return t1 - t0, time.perf_counter() - t1


def check(ref, ours, store, x, dy) -> float:
    """Largest relative difference of ppfast's gradients from torch's, from zero grads."""
    for m in (ref, ours):
        m.zero_grad(set_to_none=True)
    x.grad = None
    ref(x).backward(dy)
    want = [x.grad.clone(), ref.weight.grad, ref.bias.grad]
    x.grad = None
    with store.backward(0, defer=True):
        ours(x).backward(dy)
    store.flush(0)
    got = [x.grad, ours[0].weight.grad, ours[0].bias.grad]
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "linear_cpu.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    machine = describe()
    print(f"{machine}; {threads} threads; fp32; medians of {args.rounds} rounds")
    head = f"{'tokens x in x out':>20} {'torch ms':>9} {'I ms':>8} {'W ms':>8} {'I+W ms':>8}"
    print(f"{head} {'ratio':>6} {'max rel diff':>12}")
    rows = []
    for tokens, k, n in SHAPES:
        ref, ours, store, x, dy = setup(tokens, k, n)
        diff = check(ref, ours, store, x, dy)
        for _ in range(2):  # warm up both (and give both a .grad to add into)
            time_torch(ref, x, dy)
            time_ppfast(ours, store, x, dy)
        t_torch, t_i, t_w = [], [], []
        for r in range(args.rounds):
            for who in ("torch", "ppfast") if r % 2 == 0 else ("ppfast", "torch"):
                if who == "torch":
                    t_torch.append(time_torch(ref, x, dy))
                else:
                    i, w = time_ppfast(ours, store, x, dy)
                    t_i.append(i)
                    t_w.append(w)
        iw = [i + w for i, w in zip(t_i, t_w, strict=True)]
        row = {
            "tokens": tokens,
            "in": k,
            "out": n,
            "torch_ms": statistics.median(t_torch) * 1e3,
            "ppfast_i_ms": statistics.median(t_i) * 1e3,
            "ppfast_w_ms": statistics.median(t_w) * 1e3,
            "ppfast_iw_ms": statistics.median(iw) * 1e3,
            "torch_fastest_ms": min(t_torch) * 1e3,
            "ppfast_iw_fastest_ms": min(iw) * 1e3,
            "max_rel_diff": diff,
        }
        row["ratio"] = row["ppfast_iw_ms"] / row["torch_ms"]
        rows.append(row)
        print(
            f"{f'{tokens} x {k} x {n}':>20} {row['torch_ms']:9.2f} {row['ppfast_i_ms']:8.2f} "
            f"{row['ppfast_w_ms']:8.2f} {row['ppfast_iw_ms']:8.2f} {row['ratio']:6.3f} "
            f"{diff:12.1e}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": machine,
        "threads": threads,
        "dtype": "float32",
        "rounds": args.rounds,
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
