"""What a transformer stage's split backward costs, against its fused backward, and what the
weight gradients that do not split (norms, embeddings) cost inside I.

One process, one torch thread, thread-CPU time (so another process on the machine shows as
little as it can). Each model of bench_models.py is cut into 4 stages (two layers each, as
ZB-V runs it) and every stage runs m microbatches per step in each of these variants, in
turn, for several steps (medians):

    plain     F, then the fused backward B, of the stage module called directly
    stage     the same through ppfast.PipelineStage without W (as 1F1B runs it)
    split     F, I, W through ppfast.PipelineStage with ppfast.nn.convert (as ZB runs it)
    no-norm   split, with the norms' weights frozen: what their gradients cost in I
    no-embed  split, with the embedding's gradient cut off at its output (stage 0): what the
              embedding's own backward costs in I

and a larger vocabulary shows the embedding's cost where it matters (a dense vocab x width
gradient per microbatch). Gradients are set to None between steps, as a training loop does.

    python bench/bench_split_costs.py [--models llama,qwen2,gpt2] [--widths 512,1024]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_models import cut, loss_fn, machine, make_model, untied_copy  # noqa: E402

from ppfast.tools.benchmarks.machine import header, write_record  # noqa: E402

VARIANTS = ("plain", "stage", "split", "no-norm", "no-embed")


def _norm_weights(module: nn.Module) -> list[nn.Parameter]:
    return [
        p
        for name, m in module.named_modules()
        if "norm" in type(m).__name__.lower() or name.split(".")[-1].startswith(("ln", "norm"))
        for p in m.parameters(recurse=False)
    ]


def _cut_at_embedding(module: nn.Module):
    """Hooks that hand the embeddings' outputs on as new leaves: the backward reaches them and
    stops, so the embeddings' own backward is all that is left out."""
    hooks = []
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            hooks.append(
                m.register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_(True))
            )
    return hooks


def stage_costs(model_name: str, width: int, args) -> list[dict]:
    import ppfast

    base = make_model(model_name, width, args.layers, args.vocab, args.seq)
    n, m, mb = 4, args.microbatches, args.batch // args.microbatches
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (mb, args.seq), generator=gen)
    y = torch.randint(0, args.vocab, (mb, args.seq), generator=gen)
    h, g = torch.randn(mb, args.seq, width, generator=gen), torch.randn(mb, args.seq, width)
    empty = torch.empty(0, dtype=torch.long)
    plain = cut(untied_copy(base), n).stages
    split = cut(copy.deepcopy(base), n).stages
    stages = [ppfast.PipelineStage(ppfast.nn.convert(split[s]), s, n, "cpu") for s in range(n)]

    def run_plain(s: int) -> dict[str, float]:
        out = {"F": 0.0, "B": 0.0}
        for _ in range(m):
            c = time.thread_time()
            res = plain[s](x) if s == 0 else plain[s](h.requires_grad_(True), empty, empty)
            c1 = time.thread_time()
            loss_fn(res, y).backward() if s == n - 1 else res[0].backward(g)
            out["F"] += c1 - c
            out["B"] += time.thread_time() - c1
        for q in plain[s].parameters():
            q.grad = None
        return out

    def run_split(s: int) -> dict[str, float]:
        st, out = stages[s], {"F": 0.0, "I": 0.0, "W": 0.0}
        for _ in range(m):
            st.weight_store.enabled = True
            st.prepare(1, [(x,)], [{}], [y], loss_fn, 1.0)
            c = time.thread_time()
            st.forward(0, None if s == 0 else [h, empty, empty])
            c1 = time.thread_time()
            st.backward(0, None if s == n - 1 else [g], full=False)
            c2 = time.thread_time()
            st.weight(0)
            out["F"] += c1 - c
            out["I"] += c2 - c1
            out["W"] += time.thread_time() - c2
            st.weight_store.check_empty()
        for q in st.submod.parameters():
            q.grad = None
        return out

    def run_stage(s: int) -> dict[str, float]:
        st, out = stages[s], {"F": 0.0, "B": 0.0}
        st.weight_store.enabled = False  # split layers run as nn.Linear: a fused backward
        for _ in range(m):
            st.prepare(1, [(x,)], [{}], [y], loss_fn, 1.0)
            c = time.thread_time()
            st.forward(0, None if s == 0 else [h, empty, empty])
            c1 = time.thread_time()
            st.backward(0, None if s == n - 1 else [g], full=True)
            out["F"] += c1 - c
            out["B"] += time.thread_time() - c1
        for q in st.submod.parameters():
            q.grad = None
        return out

    def run_variant(variant: str, s: int) -> dict[str, float]:
        if variant == "plain":
            return run_plain(s)
        if variant == "stage":
            return run_stage(s)
        mod = stages[s].submod
        frozen = _norm_weights(mod) if variant == "no-norm" else []
        hooks = _cut_at_embedding(mod) if variant == "no-embed" else []
        for q in frozen:
            q.requires_grad_(False)
        try:
            return run_split(s)
        finally:
            for q in frozen:
                q.requires_grad_(True)
            for hk in hooks:
                hk.remove()

    rows = []
    for s in range(n):
        variants = [v for v in VARIANTS if v != "no-embed" or s == 0]
        samples: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
        for rep in range(args.warmup + args.steps):
            for v in variants:
                res = run_variant(v, s)
                if rep >= args.warmup:
                    for kind, t in res.items():
                        samples[v].setdefault(kind, []).append(t)
        med = {
            v: {kind: statistics.median(t) * 1e3 for kind, t in d.items()}
            for v, d in samples.items()
        }
        rows.append({"stage": s, "ms_per_step": med})
    return rows


def embedding_costs(vocabs: list[int], width: int, tokens: int, reps: int) -> list[dict]:
    """An embedding's backward per microbatch (a dense vocab x width gradient, zeroed and
    added) against gathering the same rows into an existing gradient (index_add_)."""
    out = []
    for vocab in vocabs:
        emb = nn.Embedding(vocab, width)
        ids = torch.randint(0, vocab, (tokens,))
        dy = torch.randn(tokens, width)
        grad = torch.zeros(vocab, width)
        dense, rows = [], []
        for _ in range(reps):
            c = time.thread_time()
            emb(ids).backward(dy)
            dense.append(time.thread_time() - c)
            c = time.thread_time()
            grad.index_add_(0, ids, dy)
            rows.append(time.thread_time() - c)
            emb.weight.grad = None
        out.append(
            {
                "vocab": vocab,
                "width": width,
                "tokens": tokens,
                "autograd_backward_ms": statistics.median(dense) * 1e3,
                "index_add_ms": statistics.median(rows) * 1e3,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama,qwen2,gpt2")
    ap.add_argument("--widths", default="512,1024")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--microbatches", "-m", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--embedding-vocabs", default="512,32000,128000")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "split_costs.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    mach = machine()
    print(f"{mach['cpu']}, torch {mach['torch']}, 1 thread; thread-CPU ms per step of "
          f"m = {args.microbatches} microbatches of {args.batch // args.microbatches} x "
          f"{args.seq} tokens, medians of {args.steps}")  # fmt: skip
    results = []
    for model in args.models.split(","):
        for width in (int(w) for w in args.widths.split(",")):
            rows = stage_costs(model, width, args)
            results.append({"model": model, "width": width, "stages": rows})
            print(f"\n{model} width {width}")
            print(
                f"{'stage':>5s} {'F+B':>7s} {'stage':>7s} {'F+I+W':>7s} {'ratio':>6s} "
                f"{'F':>7s} {'Fsplit':>7s} {'B':>7s} {'I':>7s} {'W':>7s} {'I+W-B':>7s} "
                f"{'norm in I':>10s} {'embed in I':>10s}"
            )
            for r in rows:
                d = r["ms_per_step"]
                st, s_ = d["stage"], d["split"]
                fb, fiw = st["F"] + st["B"], s_["F"] + s_["I"] + s_["W"]
                plain = d["plain"]["F"] + d["plain"]["B"]
                norm = s_["I"] - d["no-norm"]["I"]
                emb = s_["I"] - d["no-embed"]["I"] if "no-embed" in d else None
                emb_txt = f"{emb:10.1f}" if emb is not None else f"{'':10s}"
                print(
                    f"{r['stage']:5d} {plain:7.1f} {fb:7.1f} {fiw:7.1f} {fiw / fb:6.3f} "
                    f"{st['F']:7.1f} {s_['F']:7.1f} {st['B']:7.1f} {s_['I']:7.1f} {s_['W']:7.1f} "
                    f"{s_['I'] + s_['W'] - st['B']:+7.1f} {norm:10.1f} {emb_txt}"
                )
    tokens = args.batch // args.microbatches * args.seq
    vocabs = [int(v) for v in args.embedding_vocabs.split(",")]
    emb = embedding_costs(vocabs, 512, tokens, max(5, args.steps * 2))
    print(f"\nembedding backward per microbatch ({tokens} tokens, width 512): autograd's "
          "dense gradient against index_add_ into the gradient")  # fmt: skip
    for e in emb:
        print(f"  vocab {e['vocab']:7d}: {e['autograd_backward_ms']:8.2f} ms  vs  "
              f"{e['index_add_ms']:.2f} ms")  # fmt: skip
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = {k: v for k, v in vars(args).items() if k != "json"}  # no path of this machine
    write_record(out, {**header("bench/bench_split_costs.py", argv, machine=mach),
                       "setup": setup, "models": results, "embedding": emb})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
