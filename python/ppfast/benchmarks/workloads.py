"""Models the benchmarks train: each a list of blocks split evenly into stages, a batch, a loss."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Workload:
    """A model as equal blocks, with what a pipeline step needs around it."""

    name: str
    blocks: list[nn.Module]
    inputs: torch.Tensor
    targets: torch.Tensor
    loss_fn: Callable
    # what a stage after the first receives for one microbatch of inputs
    hidden: Callable[[torch.Tensor], torch.Tensor]
    text: str

    def split(self, n: int) -> list[nn.Module]:
        """Fresh copies of the blocks as ``n`` stages of equal block counts."""
        per = len(self.blocks) // n
        return [
            nn.Sequential(*[copy.deepcopy(b) for b in self.blocks[i * per : (i + 1) * per]])
            for i in range(n)
        ]

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs, self.targets

    def describe(self) -> str:
        return self.text

    def check(self, ranks: int, m: int) -> None:
        # chunked schedules put two stages on each rank
        if len(self.blocks) % (2 * ranks):
            raise ValueError(
                f"{len(self.blocks)} blocks do not split evenly into {2 * ranks} stages "
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
    text = f"{args.depth} x [Linear({args.width}, {args.width}) + GELU], batch {args.batch}"
    return Workload("mlp", blocks, x, y, nn.MSELoss(), lambda xb: xb.clone(), text)


WORKLOADS: dict[str, Callable] = {"mlp": mlp}


def make_workload(args) -> Workload:
    return WORKLOADS[args.model](args)
