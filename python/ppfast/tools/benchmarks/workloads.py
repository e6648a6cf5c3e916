"""Models the benchmarks train: fresh stage modules on demand, a batch, and a loss."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Workload:
    """A model that splits into equal stages, with what a pipeline step needs around it."""

    name: str
    num_blocks: int
    make_stages: Callable[[int], list[nn.Module]]  # n fresh stage modules (plain nn.Linear)
    make_whole: Callable[[], nn.Module]  # a fresh copy of the whole model, for one device
    inputs: torch.Tensor
    targets: torch.Tensor
    loss_fn: Callable
    # what a stage after the first receives for one microbatch of inputs
    hidden: Callable[[torch.Tensor], torch.Tensor]
    text: str

    def split(self, n: int) -> list[nn.Module]:
        return self.make_stages(n)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs, self.targets

    def describe(self) -> str:
        return self.text

    def check(self, ranks: int, m: int) -> None:
        # chunked schedules put two stages on each rank
        if self.num_blocks % (2 * ranks):
            raise ValueError(
                f"{self.num_blocks} blocks do not split evenly into {2 * ranks} stages "
                f"({ranks} ranks x 2 for the chunked schedules); choose --depth as a multiple "
                f"of {2 * ranks}"
            )
        if self.inputs.shape[0] % m:
            raise ValueError(
                f"batch {self.inputs.shape[0]} does not split into {m} microbatches; choose "
                "--batch as a multiple of --microbatches"
            )


def mlp(args) -> Workload:
    """``depth`` blocks of Linear(width, width) + GELU, MSE loss on random data."""
    torch.manual_seed(0)
    blocks = [
        nn.Sequential(nn.Linear(args.width, args.width), nn.GELU()) for _ in range(args.depth)
    ]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.width, generator=gen)
    y = torch.randn(args.batch, args.width, generator=gen)

    def stages(n: int) -> list[nn.Module]:
        per = len(blocks) // n
        return [nn.Sequential(*copy.deepcopy(blocks[i * per : (i + 1) * per])) for i in range(n)]

    text = f"{args.depth} x [Linear({args.width}, {args.width}) + GELU], batch {args.batch}"
    return Workload(
        "mlp", args.depth, stages, lambda: nn.Sequential(*copy.deepcopy(blocks)), x, y,
        nn.MSELoss(), lambda xb: xb.clone(), text,
    )  # fmt: skip


def gpt(args) -> Workload:
    """The demo's GPT-style decoder (``ppfast demo``): ``depth`` blocks of width ``width``,
    sequence 64, vocabulary 256, on its synthetic language; cross-entropy loss. The head's
    weight is a copy of the embedding's on both runtimes: torch.distributed.pipelining has no
    ties across stages, and a tie adds one small exchange per step, not compute."""
    from ppfast.tools.demo.data import MarkovData
    from ppfast.tools.demo.model import GPT, ModelSize, loss_fn

    size = ModelSize(vocab=256, width=args.width, heads=4, layers=args.depth, seq=64)
    model = GPT(size, seed=0)
    for mod in model.modules():  # back to plain nn.Linear: each runtime converts its own way
        if isinstance(mod, nn.Linear):
            mod.__class__ = nn.Linear
    x, y = MarkovData(size.vocab, size.seq, seed=0).batch(0, args.batch)

    def stages(n: int) -> list[nn.Module]:
        fresh = copy.deepcopy(model)
        fresh.head.out.weight = nn.Parameter(fresh.embed.tok.weight.detach().clone())
        return fresh.stages(n)

    def hidden(xb: torch.Tensor) -> torch.Tensor:
        return torch.randn(xb.shape[0], size.seq, size.width)

    text = (
        f"GPT decoder, {args.depth} blocks of width {args.width}, seq 64, vocab 256, "
        f"batch {args.batch}"
    )
    return Workload(
        "gpt", args.depth, stages, lambda: copy.deepcopy(model), x, y,
        loss_fn, hidden, text,
    )  # fmt: skip


WORKLOADS: dict[str, Callable] = {"mlp": mlp, "gpt": gpt}


def make_workload(args) -> Workload:
    return WORKLOADS[args.model](args)
