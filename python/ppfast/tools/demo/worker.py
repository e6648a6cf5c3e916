"""One demo run from the inside: one-device reference, profile, schedule, pipelined training."""

from __future__ import annotations

import torch

from ...training.pipe import Pipe
from ...training.pipeline import PipelineSchedule
from ...training.stage import PipelineStage
from .baseline import OneDevice, batch, make_optimizer, retime_every
from .choose import plan, splits_tie, stage_counts
from .data import MarkovData
from .model import GPT, loss_fn
from .options import DemoConfig
from .profile import merge, profile, timer, transfer_time
from .report import Reporter, stage_kind_times


def _record(rank: int, seconds: float, metrics, losses, timeline) -> dict:
    return {
        "timeline": timeline,
        "rank": rank,
        "time": seconds,
        "wall": metrics.wall,
        "busy": metrics.busy,
        "bubble": metrics.bubble,
        "p2p": list(metrics.p2p_latencies),
        "stage_kind_s": stage_kind_times(metrics.actions),
        "losses": [float(x) for x in losses],
    }


def _profile_batch(data: MarkovData, cfg: DemoConfig, device: torch.device):
    x, y = batch(data, 0, cfg, device)
    mb = cfg.batch // cfg.microbatches
    return x[:mb], y[:mb]


def _maker(cfg: DemoConfig, device: torch.device):
    """Fresh copies of the model, all starting from the same seed."""
    return lambda: GPT(cfg.size, cfg.seed).to(device)


def _tie(stage: int, mods: list) -> dict | None:
    """PipelineStage's tied= for the two stages that hold the tied weight: the token
    embedding (first stage) and the head (last). On one rank they are one Parameter, counted
    once; on two, the schedule sums their gradients after every step."""
    if stage == 0:
        return {"embedding": mods[0].embed.tok.weight}
    if stage == len(mods) - 1:
        return {"embedding": mods[-1].head.out.weight}
    return None


def run_rank(cfg: DemoConfig, device: torch.device, launch: dict) -> dict | None:
    """This rank's part of the demo on the default process group; rank 0 reports. Returns
    the metrics on rank 0, None elsewhere."""
    import torch.distributed as dist

    rank, p = dist.get_rank(), dist.get_world_size()
    data = MarkovData(cfg.vocab, cfg.seq, cfg.seed)
    rep = Reporter(cfg, launch) if rank == 0 else None
    ref = OneDevice(cfg, data, device) if rank == 0 else None
    if rep:
        rep.intro(data.entropy())
        # on one device while the other ranks wait, so it has the machine as a rank would
        for _ in range(min(cfg.check_steps, cfg.steps)):
            ref.step()
        rep.one_device(ref.result())
    dist.barrier()

    xm, ym = _profile_batch(data, cfg, device)
    mine_costs = profile(_maker(cfg, device), stage_counts(p, cfg.schedule), xm, ym, device)
    gathered: list = [None] * p
    dist.all_gather_object(gathered, mine_costs)
    costs = merge(gathered)
    comm = [transfer_time((xm.shape[0], cfg.seq, cfg.width), device)]
    dist.broadcast_object_list(comm, src=0)
    # the same costs on every rank give the same choice on every rank
    chosen = plan(p, cfg.microbatches, cfg.layers, costs, comm[0], cfg.schedule)
    if rep:
        rep.planned(chosen, costs, comm[0])

    program = chosen.program
    n = program.num_stages
    mods = GPT(cfg.size, cfg.seed).to(device).stages(n)
    mine = program.stages_of(rank)
    stages = [PipelineStage(mods[s], s, n, device, tied=_tie(s, mods)) for s in mine]
    sched = PipelineSchedule(
        stages if len(stages) > 1 else stages[0],
        cfg.microbatches,
        loss_fn,
        program=program,
        timeout=cfg.timeout,
    )
    opt = make_optimizer([q for s in mine for q in mods[s].parameters()], cfg)
    first, last = 0 in mine, n - 1 in mine
    now = timer(device)
    for k in range(cfg.steps):
        x, y = batch(data, k, cfg, device)
        # every rank starts the step at once, as the simulation assumes (the gather after the
        # previous step lets the other ranks go before rank 0)
        dist.barrier()
        t = now()
        losses: list = []
        sched.step(*((x,) if first else ()), target=y if last else None, losses=losses)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec = _record(rank, now() - t, sched.last_metrics, losses, sched.timeline())
        records = [None] * p if rank == 0 else None
        dist.gather_object(rec, records, dst=0)
        if rep:
            rep.step(k, records)
        if (k + 1) % retime_every(cfg) == 0 and k + 1 < cfg.steps:
            if ref:
                ref.step()  # timed again while the other ranks wait
            dist.barrier()
    if rep:
        rep.baseline = ref.result()
    result = rep.finish(sched.program) if rep else None
    dist.barrier()
    return result


def run_threads(cfg: DemoConfig, devices: list[torch.device], launch: dict) -> dict:
    """The whole demo in this process: the ranks are ppfast.Pipe's threads."""
    p = len(devices)
    data = MarkovData(cfg.vocab, cfg.seq, cfg.seed)
    rep = Reporter(cfg, launch)
    rep.intro(data.entropy())
    ref = OneDevice(cfg, data, devices[0])
    for _ in range(min(cfg.check_steps, cfg.steps)):
        ref.step()
    rep.one_device(ref.result())

    xm, ym = _profile_batch(data, cfg, devices[0])
    costs = profile(_maker(cfg, devices[0]), stage_counts(p, cfg.schedule), xm, ym, devices[0])
    # in-process hand-offs pass a pointer: no transfer time
    chosen = plan(p, cfg.microbatches, cfg.layers, costs, 0.0, cfg.schedule)
    rep.planned(chosen, costs, 0.0)

    program = chosen.program
    n = program.num_stages
    mods = GPT(cfg.size, cfg.seed).to(devices[0]).stages(n)
    if splits_tie(program):
        # threads of different ranks must not write one gradient at once: the head gets its
        # own copy, which the tie starts equal and keeps equal
        head = mods[-1].head.out
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    pipe = Pipe(
        mods, devices, chunks=cfg.microbatches, loss_fn=loss_fn, program=program,
        timeout=cfg.timeout, tied=[("0.embed.tok.weight", f"{n - 1}.head.out.weight")],
    )  # fmt: skip
    opt = make_optimizer([q for mod in mods for q in mod.parameters()], cfg)
    last_rank = program.stage_to_rank[-1]
    now = timer(devices[0])
    for k in range(cfg.steps):
        x, y = batch(data, k, cfg, devices[0])
        t = now()
        losses: list = []
        pipe.step(x, target=y, losses=losses)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = now() - t
        timeline = pipe.timeline()
        rep.step(
            k,
            [
                _record(
                    r, dt, met, losses if r == last_rank else [], [x for x in timeline if x[0] == r]
                )
                for r, met in enumerate(pipe.last_metrics)
            ],
        )
        if (k + 1) % retime_every(cfg) == 0 and k + 1 < cfg.steps:
            ref.step()
    rep.baseline = ref.result()
    return rep.finish(pipe.schedules[0].program)
