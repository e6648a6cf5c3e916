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


def one_device(cfg: DemoConfig, data: MarkovData, device: torch.device) -> dict:
    """Train the whole model for ``cfg.check_steps`` steps as the pipeline does: per
    microbatch loss, backward of loss / m, one AdamW step. Returns per step the microbatch
    losses and the step's time (compute and optimizer, as the pipelined steps count)."""
    model = GPT(cfg.size, cfg.seed).to(device)
    opt = make_optimizer(model.parameters(), cfg)
    now = timer(device)
    m = cfg.microbatches
    losses, times = [], []
    for step in range(min(cfg.check_steps, cfg.steps)):
        x, y = batch(data, step, cfg, device)
        t = now()
        got = []
        for xb, yb in zip(x.chunk(m), y.chunk(m), strict=True):
            loss = loss_fn(model(xb), yb)
            (loss / m).backward()
            got.append(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(now() - t)
        losses.append([float(v) for v in got])
    return {"losses": losses, "step_times": times}
