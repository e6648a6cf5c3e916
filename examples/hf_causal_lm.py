"""Train a Hugging Face causal LM pipelined by ppfast, one stage or two per rank, under torchrun.

    torchrun --nproc-per-node 2 examples/hf_causal_lm.py             # small Llama, made-up text
    torchrun --nproc-per-node 2 examples/hf_causal_lm.py --arch gpt2 --schedule zb-v
    torchrun --nproc-per-node 2 examples/hf_causal_lm.py --model ./my-llama --data notes.txt

The model is a transformers causal LM: built from a small config of ``--arch`` (random
weights), or loaded from a local checkpoint folder (``--model``; nothing is downloaded). The
text is a local file (``--data``, one sample per line) or made up; it is tokenized by the
folder's tokenizer when there is one, else byte by byte. Samples are padded on the right to
``--seq`` tokens; the loss then weighs every token of the batch alike
(``CausalLMLoss(weighting="tokens")``). ``--pack`` cuts the text into full-length samples
instead, without padding.

Every rank builds the same model, ``ppfast.hf.split`` cuts it into as many stages as the
schedule places (``--schedule``: any of ``ppfast.schedule_names()`` but auto), and each rank
keeps its own stages, with their layers converted by ``ppfast.nn.convert`` (weight gradients
wait for the schedule's W). At the end the stages are saved with ``ppfast.checkpoint`` and
gathered into one ``save_pretrained`` folder (``--out``), which
``AutoModelForCausalLM.from_pretrained`` loads.

The loop is a whole training loop's: autocast (``--amp bf16``, or ``fp16`` with
``ppfast.GradScaler``, whose found-inf is one decision for every rank), gradients clipped by
the whole model's norm (``--clip``, ``ppfast.clip_grad_norm_``), and the step's loss shared
with every rank (``share_loss=True``), so rank 0 logs it.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

import ppfast
import ppfast.hf

SMALL = {"layers": 8, "hidden": 256, "heads": 8, "kv_heads": 4}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="local folder of a transformers causal LM checkpoint")
    ap.add_argument("--arch", default="llama", help="model_type of the small config (no --model)")
    ap.add_argument("--layers", type=int, default=SMALL["layers"])
    ap.add_argument("--hidden", type=int, default=SMALL["hidden"])
    ap.add_argument("--heads", type=int, default=SMALL["heads"])
    ap.add_argument("--kv-heads", type=int, default=SMALL["kv_heads"])
    ap.add_argument("--data", help="local text file, one sample per line (default: made up)")
    ap.add_argument("--pack", action="store_true", help="full-length samples, no padding")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sample at most")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--schedule", default="zb-h1")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0: off)")
    ap.add_argument(
        "--amp",
        choices=["off", "bf16", "fp16"],
        default="off",
        help="autocast; fp16 scales the loss with ppfast.GradScaler",
    )
    ap.add_argument("--no-convert", action="store_true", help="keep torch's Linear layers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="hf_causal_lm_out", help="where the trained model goes")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


# ---------------------------------------------------------------------------- text


class Bytes:
    """Byte-level tokens: id = byte value; 0 (NUL) pads."""

    vocab_size, pad_token_id = 256, 0

    def encode(self, text: str) -> list[int]:
        return [b or 32 for b in text.encode()]


def tokenizer_of(args):
    """The checkpoint folder's tokenizer, if it has one; else bytes."""
    if args.model:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        except (OSError, ValueError):
            return Bytes()
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok
    return Bytes()


def made_up_text(n: int, seed: int) -> list[str]:
    """Sentences of a tiny grammar: enough structure for the loss to fall."""
    rng = random.Random(seed)
    nouns = ["cat", "stage", "rank", "bubble", "kernel", "tensor", "river", "garden"]
    verbs = ["sends", "waits for", "computes", "holds", "frees", "finds"]
    adjs = ["small", "idle", "busy", "first", "last", "green"]
    return [
        f"the {rng.choice(adjs)} {rng.choice(nouns)} {rng.choice(verbs)} the "
        f"{rng.choice(adjs)} {rng.choice(nouns)}" + (" again." if rng.random() < 0.3 else ".")
        for _ in range(n)
    ]


def samples_of(args, tok) -> list[list[int]]:
    lines = (
        Path(args.data).read_text(errors="replace").splitlines()
        if args.data
        else made_up_text(50 * args.batch, args.seed)
    )
    if not args.pack:
        ids = [tok.encode(line)[: args.seq] for line in lines if line.strip()]
        return [x for x in ids if len(x) > 1]
    stream = [t for line in lines for t in tok.encode(line + "\n")]
    return [stream[i : i + args.seq] for i in range(0, len(stream) - args.seq + 1, args.seq)]


def batch_of(samples: list[list[int]], step: int, args, pad: int) -> dict:
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding) of one step."""
    rng = random.Random(args.seed * 1000 + step)
    chosen = rng.sample(samples, args.batch) if len(samples) >= args.batch else samples
    # every batch as wide as --seq: the stages agree shapes once, at the first step
    ids = torch.full((len(chosen), args.seq), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(chosen):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


# ---------------------------------------------------------------------------- model


def build_model(args, vocab: int, pad: int):
    """The same model on every rank: loaded from the folder, or the small config, seeded."""
    if args.model:
        return transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    sizes = {
        "vocab_size": vocab,
        "hidden_size": args.hidden,
        "intermediate_size": 4 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": max(2 * args.seq, 128),
        "pad_token_id": pad,
    }
    if args.arch == "gpt2":  # GPT-2 names its sizes its own way
        sizes = {
            "vocab_size": vocab,
            "n_embd": args.hidden,
            "n_layer": args.layers,
            "n_head": args.heads,
            "n_positions": max(2 * args.seq, 128),
            "pad_token_id": pad,
        }
    config = transformers.AutoConfig.for_model(args.arch, **sizes)
    torch.manual_seed(args.seed)
    return transformers.AutoModelForCausalLM.from_config(config)


# ---------------------------------------------------------------------------- training


def main() -> None:
    args = parse()
    device = torch.device(args.device)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:  # ranks sharing the CPU: one intra-op pool each, of their share of the cores
        per_rank = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_rank))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, p = dist.get_rank(), dist.get_world_size()

    tok = tokenizer_of(args)
    model = build_model(args, tok.vocab_size, tok.pad_token_id)
    program = ppfast.generate(args.schedule, p, args.microbatches)  # where stages live
    n, mine = program.num_stages, program.stages_of(rank)
    cut = ppfast.hf.split(model, n)
    if rank == 0:
        print(f"{type(model).__name__}, {sum(x.numel() for x in model.parameters()):,} params")
        print(cut.describe())
    stages = []
    for s in mine:
        module = cut.stages[s].to(device)
        if not args.no_convert:
            ppfast.nn.convert(module)
        stages.append(ppfast.PipelineStage(module, s, n, device, tied=cut.tied[s]))
    weighting = "microbatch" if args.pack else "tokens"
    loss_fn = ppfast.hf.CausalLMLoss(weighting=weighting)
    sched = ppfast.get_schedule_class(args.schedule)(
        stages if len(stages) > 1 else stages[0],
        args.microbatches,
        loss_fn=loss_fn,
    )
    params = list({id(q): q for s in mine for q in cut.stages[s].parameters()}.values())
    opt = torch.optim.AdamW(params, lr=args.lr)
    # fp16: one found-inf decision for all ranks, so every rank skips the same steps
    scaler = ppfast.GradScaler(sched, enabled=args.amp == "fp16")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    samples = samples_of(args, tok)
    first, last = 0 in mine, n - 1 in mine
    times = []
    for step in range(args.steps):
        b = {k: v.to(device) for k, v in batch_of(samples, step, args, tok.pad_token_id).items()}
        opt.zero_grad()
        losses: list = []
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            sched.step(
                *((b["input_ids"],) if first else ()),
                **({"attention_mask": b["attention_mask"]} if first else {}),
                target=b["labels"] if last else None,
                losses=losses,
                return_outputs=False,
                share_loss=True,  # the step's loss on every rank: rank 0 logs it
            )
        scaler.unscale_(opt)  # the true gradients, before clipping (nothing without fp16)
        norm = ppfast.clip_grad_norm_(sched, args.clip) if args.clip else None
        scaler.step(opt)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        if rank == 0:
            tokens = int(ppfast.hf.count_tokens(b["labels"]))
            print(
                f"step {step:3d}  loss {sched.last_metrics.loss:.4f}"
                + (f"  grad norm {float(norm):6.3f}" if norm is not None else "")
                + f"  {times[-1] * 1e3:7.1f} ms  {tokens / times[-1]:8.0f} tokens/s",
                flush=True,
            )
    if rank == 0 and len(times) > 1:
        print(f"median step after the first: {statistics.median(times[1:]) * 1e3:.1f} ms")

    out = Path(args.out)
    ppfast.checkpoint.save(out / "stages", sched, opt, step=args.steps)
    dist.barrier()
    if rank == 0:
        fresh = build_model(args, tok.vocab_size, tok.pad_token_id)
        fresh.load_state_dict(ppfast.checkpoint.gather(out / "stages"), strict=True)
        fresh.save_pretrained(out / "model")
        if not isinstance(tok, Bytes):
            tok.save_pretrained(out / "model")
        print(f"saved the trained model to {out / 'model'} (from_pretrained loads it)")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
