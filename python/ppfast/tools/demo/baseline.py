"""The reference run: the same model, data and microbatches trained on one device, unpipelined."""

from __future__ import annotations

import torch

from .data import MarkovData
from .model import GPT, loss_fn
from .options import DemoConfig
from .profile import timer


def make_optimizer(params, cfg: DemoConfig) -> torch.optim.Optimizer:
    # one entry per parameter: the tied embedding is shared by the first and the last stage
    unique = list({id(p): p for p in params}.values())
    return torch.optim.AdamW(unique, lr=cfg.lr, weight_decay=0.0)


def batch(data: MarkovData, step: int, cfg: DemoConfig, device: torch.device):
    x, y = data.batch(step, cfg.batch)
    return x.to(device), y.to(device)


class OneDevice:
    """The whole model trained as the pipeline trains it: per microbatch loss, backward of
    loss / m, one AdamW step. Its first steps see the same batches as the pipeline's, so
    their losses must match; later steps only time it again, between pipelined steps, so
    that both are timed under the same conditions on a machine whose load drifts."""

    def __init__(self, cfg: DemoConfig, data: MarkovData, device: torch.device):
        self.cfg, self.data, self.device = cfg, data, device
        self.model = GPT(cfg.size, cfg.seed).to(device)
        self.opt = make_optimizer(self.model.parameters(), cfg)
        self.now = timer(device)
        self.k = 0
        self.losses: list[list[float]] = []
        self.step_times: list[float] = []

    def step(self) -> None:
        """One training step: its losses and its time (compute and optimizer, as the
        pipelined steps are timed)."""
        m = self.cfg.microbatches
        x, y = batch(self.data, self.k, self.cfg, self.device)
        t = self.now()
        got = []
        for xb, yb in zip(x.chunk(m), y.chunk(m), strict=True):
            loss = loss_fn(self.model(xb), yb)
            (loss / m).backward()
            got.append(loss.detach())
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_times.append(self.now() - t)
        self.losses.append([float(v) for v in got])
        self.k += 1

    def result(self) -> dict:
        checked = min(self.cfg.check_steps, self.cfg.steps)
        return {"losses": self.losses[:checked], "step_times": list(self.step_times)}


def retime_every(cfg: DemoConfig) -> int:
    """Pipelined steps between two more one-device steps (about four over the run)."""
    return max(1, cfg.steps // 4)
