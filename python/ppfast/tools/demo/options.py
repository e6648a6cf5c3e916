"""The demo's settings: command-line flags, defaults, and the checks made before any rank starts."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, fields

from .data import FANOUT
from .model import ModelSize

LAUNCHES = ("auto", "processes", "threads")


@dataclass(frozen=True)
class DemoConfig:
    """Everything one demo run needs; picklable, so it travels to spawned ranks as is."""

    schedule: str | None = None  # None: profile, then run the fastest in simulation
    ranks: int = 2
    microbatches: int = 8
    layers: int = 8
    width: int = 192
    heads: int = 4
    seq: int = 64
    batch: int = 32
    vocab: int = 256
    steps: int = 40
    lr: float = 1.5e-3
    seed: int = 0
    device: str = "auto"
    out: str = "ppfast-demo"
    launch: str = "auto"
    threads: int = 0  # intra-op threads per rank; 0: the machine's cores shared out over ranks
    check_steps: int = 4  # steps trained on one device, for the loss check and the speed-up
    timeout: float = 120.0

    @property
    def size(self) -> ModelSize:
        return ModelSize(self.vocab, self.width, self.heads, self.layers, self.seq)

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq

    def threads_per_rank(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.ranks)

    def as_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Raise ValueError, saying what to change, for settings no schedule could run."""
        if self.ranks < 2:
            raise ValueError(f"--ranks {self.ranks}: a pipeline needs at least 2 ranks")
        for name in ("microbatches", "batch", "steps", "check_steps"):
            if getattr(self, name) < 1:
                flag = name.replace("_", "-")
                raise ValueError(f"--{flag} must be at least 1, got {getattr(self, name)}")
        if self.batch % self.microbatches:
            raise ValueError(
                f"--batch {self.batch} does not split into {self.microbatches} microbatches; "
                "use a batch divisible by --microbatches"
            )
        self.size.check()
        if self.vocab < FANOUT:
            raise ValueError(f"--vocab {self.vocab} is too small: use at least {FANOUT} tokens")
        if self.layers < self.ranks:
            raise ValueError(
                f"--layers {self.layers} is fewer than --ranks {self.ranks}: every rank needs at "
                f"least one block; use --layers {self.ranks} or more"
            )
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.launch not in LAUNCHES:
            raise ValueError(f"--launch must be one of {', '.join(LAUNCHES)}, got {self.launch!r}")
        if self.threads < 0:
            raise ValueError(f"--threads must be 0 (automatic) or more, got {self.threads}")
        if self.timeout <= 0:
            raise ValueError(f"--timeout must be positive, got {self.timeout}")
        if self.schedule is not None:
            from ...program.schedules import lookup

            lookup(self.schedule)  # an unknown name fails here, listing the known ones


# flag -> help; the default is appended from DemoConfig
_HELP = {
    "schedule": "schedule to run (default: the fastest in simulation at the profiled costs; "
    "`ppfast list` names them all)",
    "ranks": "pipeline ranks",
    "microbatches": "microbatches per step",
    "layers": "transformer blocks",
    "width": "model width",
    "heads": "attention heads",
    "seq": "tokens per sequence",
    "batch": "sequences per step",
    "vocab": "vocabulary size",
    "steps": "training steps",
    "lr": "AdamW learning rate",
    "seed": "seed of the model and the data",
    "device": "cpu, cuda or cuda:N ('auto': cuda when there is a GPU, else cpu)",
    "out": "folder for the pictures, the trace and the metrics",
    "launch": "processes: gloo ranks (the default on CPU); threads: ppfast.Pipe in this "
    "process (the default on GPUs without torchrun); under torchrun the ranks are its own",
    "threads": "intra-op threads per rank on CPU (0: the cores shared out over the ranks)",
    "check_steps": "steps trained on one device, for the loss check and the speed-up",
    "timeout": "seconds a rank waits for a peer before it fails",
}
_SHORT = {"schedule": "-s", "ranks": "-p", "microbatches": "-m"}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ppfast demo",
        description=(
            "Train a small GPT-style model pipelined over local ranks on generated data: "
            "profile the stages, run the schedule the simulator finds fastest, and compare "
            "with one device and with the simulation."
        ),
    )
    for f in fields(DemoConfig):
        flags = [f"--{f.name.replace('_', '-')}", *([_SHORT[f.name]] if f.name in _SHORT else [])]
        kind = {"int": int, "float": float}.get(str(f.type))
        extra = {"choices": LAUNCHES} if f.name == "launch" else {}
        shown = "" if f.default is None else f" (default: {f.default})"
        ap.add_argument(*flags, type=kind, default=f.default, help=_HELP[f.name] + shown, **extra)
    return ap


def parse(argv: list[str] | None) -> DemoConfig:
    args = parser().parse_args(argv)
    cfg = DemoConfig(**vars(args))
    cfg.check()
    return cfg
