"""Hugging Face decoders (Llama, Qwen2, GPT-2) pipelined by ppfast and torch.distributed.pipelining.

Each model is built from its config with random weights at every width asked for, cut into
stages, and trained on 2 local gloo ranks (one torch thread each) under ppfast's schedules
(1F1B, ZB-H1, ZB-V, interleaved ZB) and torch's (Schedule1F1B, ScheduleZBVZeroBubble,
ScheduleInterleavedZeroBubble, and ppfast's ZB-H1 program run by torch's own runtime), on the
same stages, alternating in rounds. ppfast's stages are converted with ``ppfast.nn.convert``
(weight gradients wait for W) and declare the tied embedding and head; torch's get deep copies
of the same stage modules, untied.

Per model and width, as DESIGN.md's "Measuring a pipeline" says:

    T_limit   every rank runs forward and backward of its own stages (for the schedule's
              placement: loop or V) for all microbatches at once, no transfers, no waiting
    eta       T_limit / T_step                            (medians over rounds)
    bubble    measured, 1 - compute / step per rank, averaged (compute: the stages' own F, I,
              W, B calls; for ppfast the JSON also has the executor's own figure)
    sim       the simulator's bubble for the same program at the F, I, W (B) costs of each
              stage profiled alone (both ranks profiling their own stages at once, gradients
              accumulating as in a step); torch's programs at the same costs
    eta sim   the eta that program reaches at those costs against the limit at those costs
    F/I/W     a rank's compute per kind in the run against m x the profiled cost
    idle      step - compute: waiting for a peer, transfers, executor and schedule overhead

Contention shows as compute thread-CPU below its wall time, and as CPU that other processes
used during the run (from /proc/stat); such a run is flagged.

    python bench/bench_models.py [--models llama,qwen2,gpt2] [--widths 512,1024] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ppfast.tools.benchmarks.machine import facts, free_port, header

# ppfast schedule -> torch's counterpart (a class of torch.distributed.pipelining, or
# "runtime": ppfast's program loaded into torch's _PipelineScheduleRuntime)
PAIRS = {
    "1f1b": "Schedule1F1B",
    "zb-h1": "runtime",
    "zb-v": "ScheduleZBVZeroBubble",
    "interleaved-zb": "ScheduleInterleavedZeroBubble",
    "auto": None,
}
PPFAST_CLASS = {
    "1f1b": "Schedule1F1B",
    "zb-h1": "ScheduleZBH1",
    "zb-v": "ScheduleZBVZeroBubble",
    "interleaved-zb": "ScheduleInterleavedZeroBubble",
    "auto": "ScheduleAuto",
}
ZERO_BUBBLE = ("zb-h1", "zb-v", "interleaved-zb")


# ---------------------------------------------------------------------------- models


def make_model(name: str, width: int, layers: int, vocab: int, seq: int) -> nn.Module:
    """A causal LM of ``name`` from its config, random weights (seed 0), embedding tied to
    the head, no dropout, SDPA attention."""
    import transformers as tf

    common = {"vocab_size": vocab, "tie_word_embeddings": True, "attn_implementation": "sdpa"}
    if name in ("llama", "qwen2"):
        heads = max(2, width // 128)
        cls = tf.LlamaConfig if name == "llama" else tf.Qwen2Config
        cfg = cls(
            hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=seq, **common,
        )  # fmt: skip
        model_cls = tf.LlamaForCausalLM if name == "llama" else tf.Qwen2ForCausalLM
    elif name == "gpt2":
        cfg = tf.GPT2Config(
            n_embd=width, n_layer=layers, n_head=max(2, width // 64), n_positions=seq,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
            **common,
        )  # fmt: skip
        model_cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(f"unknown model {name!r}; choose from llama, qwen2, gpt2")
    torch.manual_seed(0)
    return model_cls(cfg).train()


def describe_model(name: str, width: int, layers: int, vocab: int, seq: int) -> str:
    if name == "gpt2":
        return (f"GPT-2, {layers} layers, width {width}, {max(2, width // 64)} heads, "
                f"MLP {4 * width}, vocab {vocab}, seq {seq}")  # fmt: skip
    heads = max(2, width // 128)
    return (f"{'Llama' if name == 'llama' else 'Qwen2'}, {layers} layers, width {width}, "
            f"{heads} heads / {max(1, heads // 2)} KV, MLP {2 * width}, vocab {vocab}, "
            f"seq {seq}")  # fmt: skip


def cut(model: nn.Module, num_stages: int):
    """The model's stages by ``ppfast.hf.split``, the same number of layers on each: the
    embeddings on the first, the final norm and the head on the last; ``.tied`` declares the
    embedding the head shares. A stage after the first takes (hidden states, attention mask,
    position ids); the last returns the logits."""
    import ppfast.hf

    return ppfast.hf.split(model, num_stages, method="uniform")


def untied_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose head has its own copy of the embedding (torch has no ties)."""
    out = copy.deepcopy(model)
    out.lm_head.weight = nn.Parameter(out.base_model.get_input_embeddings().weight.detach().clone())
    return out


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1)
    )


# ---------------------------------------------------------------------------- one rank


def _program(name: str, p: int, m: int, costs=None):
    import ppfast

    if name == "auto":
        return ppfast.generate("auto", p, m, costs=costs)
    spec = ppfast.program.schedules.lookup(name)
    return ppfast.generate(name, p, m, spec.default_v if spec.v_free else None)


def _limit_key(prog) -> str:
    """Which limit a program is measured against: the layers a rank holds under its placement
    (loop placements, one stage per rank or interleaved, give a rank the same layers)."""
    return "v" if prog.num_stages > prog.p and prog.stage_to_rank[-1] == 0 else "loop"


class _Log:
    """Per compute call of instrumented stages: (stage, kind, start, wall s, thread-CPU s);
    start on the monotonic clock, which the ranks of one machine share."""

    def __init__(self):
        self.calls: list[tuple[int, str, float, float, float]] = []

    def wrap(self, obj, method: str, stage: int, kind_of) -> None:
        fn = getattr(obj, method)

        def inner(*a, **k):
            c, t = time.thread_time(), time.perf_counter()
            out = fn(*a, **k)
            self.calls.append(
                (stage, kind_of(a, k), t, time.perf_counter() - t, time.thread_time() - c)
            )
            return out

        setattr(obj, method, inner)

    def ppfast(self, stage) -> None:
        s = stage.stage_index
        self.wrap(stage, "forward", s, lambda a, k: "F")
        full = lambda a, k: a[2] if len(a) > 2 else k["full"]  # noqa: E731
        self.wrap(stage, "backward", s, lambda a, k: "B" if full(a, k) else "I")
        self.wrap(stage, "weight", s, lambda a, k: "W")

    def torch(self, stage) -> None:
        s = stage.stage_index
        self.wrap(stage, "forward_one_chunk", s, lambda a, k: "F")
        full = lambda a, k: k.get("full_backward", a[2] if len(a) > 2 else True)  # noqa: E731
        self.wrap(stage, "backward_one_chunk", s, lambda a, k: "B" if full(a, k) else "I")
        self.wrap(stage, "backward_weight_one_chunk", s, lambda a, k: "W")


class _Unviewed(nn.Module):
    """A stage for torch's schedules whose outputs are never views: torch's split backward
    detaches a stage's outputs in place, which a view refuses (GPT-2's hidden states leave
    its forward as a view). The copy is one activation per microbatch."""

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, *args, **kwargs):
        out = self.stage(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.clone() if isinstance(o, torch.Tensor) and o._base is not None else o
                         for o in out)  # fmt: skip
        return out


def build(runtime: str, name: str, prog, base, rank: int, m: int):
    """This rank's stages of ``prog`` under ``runtime``, from a fresh copy of ``base``."""
    import ppfast

    n, mine = prog.num_stages, prog.stages_of(rank)
    log = _Log()
    if runtime == "ppfast":
        split = cut(copy.deepcopy(base), n)
        mods = {s: ppfast.nn.convert(split.stages[s]) for s in mine}
        stages = [ppfast.PipelineStage(mods[s], s, n, "cpu", tied=split.tied[s] or None)
                  for s in mine]  # fmt: skip
        for st in stages:
            log.ppfast(st)
        one = stages if len(stages) > 1 else stages[0]
        if name == "auto":
            sched = ppfast.ScheduleAuto(one, m, loss_fn, program=prog, timeout=300)
        else:
            sched = getattr(ppfast, PPFAST_CLASS[name])(one, m, loss_fn, timeout=300)
    else:
        import torch.distributed.pipelining as tp
        from torch.distributed.pipelining import schedules as tps

        split = cut(untied_copy(base), n)
        mods = {s: _Unviewed(copy.deepcopy(split.stages[s])) for s in mine}
        stages = [tp.PipelineStage(mods[s], s, n, torch.device("cpu")) for s in mine]
        for st in stages:
            log.torch(st)
        if PAIRS[name] == "runtime":
            sched = tps._PipelineScheduleRuntime(stages, m, loss_fn=loss_fn)
            sched._prepare_schedule_with_comms(ppfast.to_pipeline_order(prog))
        else:
            cls = getattr(tp, PAIRS[name])
            sched = cls(stages if len(stages) > 1 else stages[0], m, loss_fn=loss_fn)
    params = list({id(q): q for md in mods.values() for q in md.parameters()}.values())
    return {"runtime": runtime, "name": name, "sched": sched, "params": params, "mine": mine,
            "n": n, "prog": prog, "log": log}  # fmt: skip


def _hidden(mb: int, seq: int, width: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(mb, seq, width, generator=gen)


def _received(h: torch.Tensor) -> list[torch.Tensor]:
    """What a stage after the first receives: hidden states, and the attention mask and
    position ids the first stage was not given (empty)."""
    empty = torch.empty(0, dtype=torch.long)
    return [h, empty, empty]


def profile(base, rank: int, p: int, cuts: dict[int, list[int]], xm, ym, args, width: int):
    """F, I, W (converted, store deferring) and B (plain backward) of each (cut, stage) this
    rank holds, one microbatch at a time; every rank profiles its own stages at the same time.
    Returns {(n, s): {kind: (median wall s, median thread-CPU s)}}."""
    import ppfast

    gen = torch.Generator().manual_seed(2 + rank)
    mb = xm[0].shape[0]
    h, g = _hidden(mb, args.seq, width, gen), _hidden(mb, args.seq, width, gen)
    units = []
    for n, owned in cuts.items():
        split = cut(copy.deepcopy(base), n)
        for s in owned:
            st = ppfast.PipelineStage(ppfast.nn.convert(split.stages[s]), s, n, "cpu")
            units.append(((n, s), st))
    samples = {key: defaultdict(list) for key, _ in units}

    def timed(fn, *a, **k):
        c, t = time.thread_time(), time.perf_counter()
        fn(*a, **k)
        return time.perf_counter() - t, time.thread_time() - c

    # Gradients accumulate over the reps as over a step's microbatches (a W adds into .grad;
    # only a step's first allocates it), and are dropped after the warm-up and at the end.
    for rep in range(args.profile_warmup + args.profile_reps):
        dist.barrier()
        if rep == args.profile_warmup:
            for _, st in units:
                for q in st.submod.parameters():
                    q.grad = None
        for key, st in units:
            inp = None if st.is_first else _received(h)
            grads = None if st.is_last else [g]
            st.weight_store.enabled = True
            st.prepare(1, [(xm[0],)], [{}], [ym[0]], loss_fn, 1.0)
            f = timed(st.forward, 0, inp)
            i = timed(st.backward, 0, grads, full=False)
            w = timed(st.weight, 0)
            st.weight_store.enabled = False
            st.prepare(1, [(xm[0],)], [{}], [ym[0]], loss_fn, 1.0)
            f2 = timed(st.forward, 0, inp)
            b = timed(st.backward, 0, grads, full=True)
            st.weight_store.check_empty()
            if rep >= args.profile_warmup:
                for kind, v in (("F", f), ("I", i), ("W", w), ("F_plain", f2), ("B", b)):
                    samples[key][kind].append(v)
    for _, st in units:
        for q in st.submod.parameters():
            q.grad = None
    return {
        key: {kd: tuple(statistics.median(x[j] for x in v) for j in (0, 1)) for kd, v in d.items()}
        for key, d in samples.items()
    }


def make_limit(base, rank: int, prog, xm, ym, args, width: int):
    """One rank's share of the limit: forward and backward of the stages it holds under
    ``prog``'s placement, for every microbatch, with no transfers (plain modules)."""
    n, mine = prog.num_stages, prog.stages_of(rank)
    split = cut(untied_copy(base), n)
    own = [(s, split.stages[s]) for s in mine]
    gen = torch.Generator().manual_seed(7 + rank)
    mb = xm[0].shape[0]
    h = [_hidden(mb, args.seq, width, gen) for _ in own]
    g = [_hidden(mb, args.seq, width, gen) for _ in own]

    def limit():
        for xb, yb in zip(xm, ym, strict=True):
            for k, (s, md) in enumerate(own):
                out = md(xb) if s == 0 else md(*_received(h[k].requires_grad_(True)))
                if s == n - 1:
                    loss_fn(out, yb).backward()
                else:
                    out[0].backward(g[k])
                h[k].grad = None
        for _, md in own:
            for q in md.parameters():
                q.grad = None

    return limit


def _transfer_time(rank: int, shape: tuple[int, ...], reps: int = 20) -> float:
    """Half a round trip of one activation between the two ranks over gloo (median)."""
    t = torch.zeros(shape)
    times = []
    for _ in range(reps):
        dist.barrier()
        if rank == 0:
            start = time.perf_counter()
            dist.send(t, 1)
            dist.recv(t, 1)
            times.append((time.perf_counter() - start) / 2)
        elif rank == 1:
            dist.recv(t, 0)
            dist.send(t, 0)
    out = [statistics.median(times) if times else 0.0]
    dist.broadcast_object_list(out, src=0)
    return out[0]


def _auto_costs(prof: dict, p: int, transfer: float):
    """Per-pass costs for ``auto``: a rank's share of F, I, W (the one-stage-per-rank cut's
    stages, the slowest rank's)."""
    import ppfast

    per = [prof[(p, s)] for s in range(p) if (p, s) in prof]
    f, i, w = (max(c[k][0] for c in per) for k in ("F", "I", "W"))
    return ppfast.Costs(f, i, w, transfer)


def rank_main(rank: int, p: int, port: int, args, model: str, width: int, queue) -> None:
    import resource

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=p)
    import ppfast  # noqa: F401  (after the group: ppfast's import registers its extensions)

    m = args.microbatches
    base = make_model(model, width, args.layers, args.vocab, args.seq)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    xm, ym = list(x.chunk(m)), list(y.chunk(m))
    names = [s for s in args.schedules.split(",") if s]
    progs = {name: _program(name, p, m) for name in names if name != "auto"}
    cuts: dict[int, set[int]] = defaultdict(set)
    for prog in [*progs.values(), _program("1f1b", p, m), _program("zb-v", p, m)]:
        cuts[prog.num_stages] |= set(prog.stages_of(rank))
    if "auto" in names:  # auto may choose any of the placements
        for n in (p, 2 * p):
            cuts[n] |= set(range(n)) if n == 2 * p else {rank}
    prof_mine = profile(base, rank, p, {n: sorted(s) for n, s in cuts.items()}, xm, ym, args,
                        width)  # fmt: skip
    parts = [None] * p
    dist.all_gather_object(parts, prof_mine)
    prof = {(r, *key): v for r, part in enumerate(parts) for key, v in part.items()}
    mb_shape = (args.batch // m, args.seq, width)
    transfer = _transfer_time(rank, mb_shape)
    auto_costs = None
    if "auto" in names:
        mine_loop = {(n, s): v for (r, n, s), v in prof.items() if n == p and s == r}
        auto_costs = _auto_costs(mine_loop, p, transfer)
        progs["auto"] = _program("auto", p, m, auto_costs)
    configs = []
    for name in names:
        for runtime in ("ppfast", "torch"):
            if runtime == "torch" and PAIRS[name] is None:
                continue
            try:
                configs.append(build(runtime, name, progs[name], base, rank, m))
            except Exception as e:  # noqa: BLE001 - a schedule a runtime cannot build is skipped
                if rank == 0:
                    print(f"  skipping {runtime} {name}: {type(e).__name__}: {e}", flush=True)
    limits = {"loop": make_limit(base, rank, _program("1f1b", p, m), xm, ym, args, width),
              "v": make_limit(base, rank, _program("zb-v", p, m), xm, ym, args, width)}  # fmt: skip

    def run(cfg):
        sched, mine, n = cfg["sched"], cfg["mine"], cfg["n"]
        if 0 in mine:
            sched.step(x, target=y if n - 1 in mine else None)
        elif n - 1 in mine:
            sched.step(target=y)
        else:
            sched.step()
        for q in cfg["params"]:
            q.grad = None

    starts: list[float] = []

    def timed(fn) -> dict:
        dist.barrier()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t, c = time.perf_counter(), time.process_time()
        starts.append(t)
        fn()
        local, cpu = time.perf_counter() - t, time.process_time() - c
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        dist.barrier()
        return {"wall": time.perf_counter() - t, "cpu_wall": cpu / local,
                "minflt": r1.ru_minflt - r0.ru_minflt}  # fmt: skip

    for cfg in configs:  # warm up: shape agreement, allocator, the tie's first exchange
        for _ in range(args.warmup):
            timed(lambda cfg=cfg: run(cfg))
    for fn in limits.values():
        timed(fn)
    records: dict[str, list[dict]] = defaultdict(list)
    timelines: dict[str, list] = {}  # the last round's compute calls, ms from the step's start
    for rnd in range(args.rounds):
        for key, fn in limits.items():
            records[f"limit:{key}"].append(timed(fn))
        k = rnd % max(1, len(configs))  # rotate the order: drift spreads over all configs
        for cfg in configs[k:] + configs[:k]:
            cfg["log"].calls.clear()
            rec = timed(lambda cfg=cfg: run(cfg))
            kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
            per_stage: dict[str, list[float]] = defaultdict(list)
            for s, kind, _, wall, cpu in cfg["log"].calls:
                kinds[kind][0] += wall
                kinds[kind][1] += cpu
                per_stage[f"{s}{kind}"].append(wall)
            rec["kinds"] = dict(kinds)
            rec["stage_kind"] = {sk: statistics.median(v) for sk, v in per_stage.items()}
            met = getattr(cfg["sched"], "last_metrics", None)
            if cfg["runtime"] == "ppfast" and met is not None:
                rec["bubble"] = met.bubble
                rec["exec_wall"], rec["busy"] = met.wall, met.busy
                rec["p2p_p50"] = met.p2p_p50
                rec["stage_kind"] = {}
                by: dict[str, list[float]] = defaultdict(list)
                for text, start, end in met.actions:
                    a = ppfast.parse_action(text)
                    for part in a.parts():
                        by[f"{part.stage}{part.kind}"].append((end - start) / len(a.parts()))
                rec["stage_kind"] = {sk: statistics.median(v) for sk, v in by.items()}
            records[f"{cfg['runtime']}:{cfg['name']}"].append(rec)
            timelines[f"{cfg['runtime']}:{cfg['name']}"] = [
                (f"{s}{kind}", (t - starts[-1]) * 1e3, (t + wall - starts[-1]) * 1e3)
                for s, kind, t, wall, _ in cfg["log"].calls
            ]
    info = {
        "timelines": timelines,
        "records": dict(records),
        "profile": {f"{r}/{n}/{s}": v for (r, n, s), v in prof.items()} if rank == 0 else None,
        "transfer": transfer,
        "auto_costs": [auto_costs.f, auto_costs.i, auto_costs.w, auto_costs.comm]
        if auto_costs
        else None,
        "programs": {
            name: {"stage_to_rank": list(pr.stage_to_rank), "chosen": pr.meta.get("chosen")}
            for name, pr in progs.items()
        },  # fmt: skip
        "mine": {f"{c['runtime']}:{c['name']}": c["mine"] for c in configs},
    }
    gathered = [None] * p
    dist.all_gather_object(gathered, info)
    if rank == 0:
        queue.put(gathered)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------- the run


def _proc_stat_busy() -> float:
    """Seconds of CPU time all processes used since boot (user, nice, system, irq, softirq,
    steal), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        vals = [int(v) for v in fields]
        return (sum(vals[:3]) + sum(vals[5:8])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def _cpu_pressure_us() -> float:
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                return float(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


def run_model(args, model: str, width: int) -> tuple[list, dict]:
    """Spawn the ranks for one model and width; returns what they gathered and the machine's
    load around the run."""
    import resource

    port = free_port()
    load = {"loadavg_before": os.getloadavg()}
    busy0, psi0 = _proc_stat_busy(), _cpu_pressure_us()
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [
        ctx.Process(target=rank_main, args=(r, 2, port, args, model, width, queue))
        for r in range(2)
    ]
    for pr in procs:
        pr.start()
    try:
        while queue.empty():  # a rank that fails exits without putting anything
            failed = [pr for pr in procs if pr.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(
                    f"{model} width {width}: rank {procs.index(failed[0])} exited with code "
                    f"{failed[0].exitcode} (its traceback is above)"
                )
            time.sleep(0.2)
        gathered = queue.get()
    finally:
        for pr in procs:
            pr.join(timeout=120)
            if pr.is_alive():
                pr.terminate()
    wall = time.perf_counter() - t0
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
    load.update(
        loadavg_after=os.getloadavg(),
        wall_s=wall,
        ranks_cpu_s=ours,
        # what other processes used while the ranks ran, in cores (0 on a quiet machine)
        others_cores=max(0.0, (_proc_stat_busy() - busy0 - ours) / wall),
        cpu_pressure=(_cpu_pressure_us() - psi0) / 1e6 / wall,
    )
    return gathered, load


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def simulated(prog, prof: dict, transfer: float):
    """The simulator's step for ``prog`` at the profiled costs of each stage on the rank that
    holds it: (F, I, W) where the program splits the backward, else (F, B, 0) of the plain
    backward. Returns the Simulation (bubble, bubble_per_rank, makespan)."""
    import ppfast
    from ppfast.program.ir import Kind

    n = prog.num_stages
    has_w = {x.stage for acts in prog.ranks for a in acts for x in a.parts() if x.kind is Kind.W}
    table = []
    for s in range(n):
        c = prof[f"{prog.stage_to_rank[s]}/{n}/{s}"]
        if s in has_w:
            table.append((c["F"][0], c["I"][0], c["W"][0]))
        else:
            table.append((c["F_plain"][0], c["B"][0], 0.0))
    return ppfast.simulate(prog, ppfast.Costs(comm=transfer, per_stage=tuple(table)))


def profiled_limit(prog, prof: dict, m: int) -> float:
    """T_limit at the profiled costs: the slowest rank's m x (F + B) of the stages it holds."""
    n = prog.num_stages
    return max(
        m * sum(prof[f"{r}/{n}/{s}"][k][0] for s in prog.stages_of(r) for k in ("F_plain", "B"))
        for r in range(prog.p)
    )


def torch_program(name: str, p: int, m: int, progs: dict):
    """torch's own program for a schedule (its generator's actions), for the simulator."""
    import ppfast

    if PAIRS[name] == "runtime":
        return progs[name]
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

    return ppfast.from_pipeline_order(get_schedule_ops(PAIRS[name].removeprefix("Schedule"), p, m))


def summarize(args, model: str, width: int, gathered: list, load: dict) -> dict:
    """Medians over rounds, per schedule and runtime, with ratios, bubbles and where the time
    went; prints the block of the table for this model and width."""
    import ppfast

    p, m = 2, args.microbatches
    r0 = gathered[0]
    prof = r0["profile"]
    transfer = r0["transfer"]
    limit = {k: _med(rec["wall"] for rec in r0["records"][f"limit:{k}"]) for k in ("loop", "v")}
    progs = {}
    for name in r0["programs"]:
        if name == "auto":
            costs = ppfast.Costs(*r0["auto_costs"])
            progs[name] = _program(name, p, m, costs)
        else:
            progs[name] = _program(name, p, m)
    limit_progs = {"loop": _program("1f1b", p, m), "v": _program("zb-v", p, m)}
    rows = []
    for key in r0["records"]:
        if key.startswith("limit:"):
            continue
        runtime, name = key.split(":")
        prog = progs[name]
        lkey = _limit_key(prog)
        step = _med(rec["wall"] for rec in r0["records"][key])
        row = {"schedule": name, "runtime": runtime, "step_s": step, "limit": lkey,
               "eta": limit[lkey] / step, "ranks": []}  # fmt: skip
        if name == "auto":
            row["auto_chose"] = r0["programs"]["auto"]["chosen"]
        for r, info in enumerate(gathered):
            recs = info["records"][key]
            mine = info["mine"][key]
            kinds = sorted({kd for rec in recs for kd in rec["kinds"]})
            run = {kd: _med(rec["kinds"].get(kd, [0, 0])[0] for rec in recs) for kd in kinds}
            cpu = {kd: _med(rec["kinds"].get(kd, [0, 0])[1] for rec in recs) for kd in kinds}
            prof_kind = {"F": "F_plain" if "B" in kinds else "F", "I": "I", "W": "W", "B": "B"}
            alone = {
                kd: m * sum(prof[f"{r}/{prog.num_stages}/{s}"][prof_kind[kd]][0] for s in mine)
                for kd in kinds
            }
            compute = sum(run.values())
            rank_row = {
                "stages": mine,
                # idle share of the step, as the simulator counts it: the rank's compute
                # against the whole step (its waits at either end included)
                "bubble": 1.0 - compute / step,
                "compute_ms": {kd: v * 1e3 for kd, v in run.items()},
                "compute_cpu_ms": {kd: v * 1e3 for kd, v in cpu.items()},
                "alone_ms": {kd: v * 1e3 for kd, v in alone.items()},
                "run_vs_alone": {kd: run[kd] / alone[kd] for kd in kinds if alone[kd] > 0},
                "idle_ms": (step - compute) * 1e3,
                "compute_cpu_wall": sum(cpu.values()) / compute if compute else None,
                "process_cpu_wall": _med(rec["cpu_wall"] for rec in recs),
                "minflt_per_step": _med(rec["minflt"] for rec in recs),
            }
            if runtime == "ppfast":
                rank_row["p2p_p50_ms"] = _med(rec.get("p2p_p50") for rec in recs) * 1e3
                # the executor's own step on this rank; the rest of the step is spent outside
                # it (the tied weights' exchange, waiting at the step's end for the other rank)
                rank_row["executor_ms"] = _med(rec.get("exec_wall") for rec in recs) * 1e3
                rank_row["executor_bubble"] = _med(rec.get("bubble") for rec in recs)
            row["ranks"].append(rank_row)
        row["bubble"] = statistics.mean(rr["bubble"] for rr in row["ranks"])
        # the simulator at the profiled costs: the bubble this program leaves, and the eta it
        # would reach against the limit at the same costs (torch's program at ppfast's costs)
        try:
            sim_prog = prog if runtime == "ppfast" else torch_program(name, p, m, progs)
            sim = simulated(sim_prog, prof, transfer)
        except Exception:  # noqa: BLE001 - a program torch cannot hand over is not simulated
            sim = None
        if sim is not None:
            row["simulated_bubble"] = sim.bubble
            row["simulated_eta"] = profiled_limit(limit_progs[lkey], prof, m) / sim.makespan
            for rr, sb in zip(row["ranks"], sim.bubble_per_rank, strict=True):
                rr["simulated_bubble"] = sb
        rows.append(row)
    by = {(r["runtime"], r["schedule"]): r for r in rows}
    for row in rows:
        peer = by.get(("torch", row["schedule"]))
        if row["runtime"] == "ppfast" and peer:
            row["speedup_vs_torch"] = peer["step_s"] / row["step_s"]
        base = by.get(("ppfast", "1f1b"))
        if row["runtime"] == "ppfast" and base and row is not base:
            row["eta_minus_1f1b"] = row["eta"] - base["eta"]
    compute_ratio = [rr["compute_cpu_wall"] for r in rows for rr in r["ranks"]
                     if rr["compute_cpu_wall"]]  # fmt: skip
    load["compute_cpu_wall_min"] = min(compute_ratio) if compute_ratio else None
    # the load average lags by minutes: what other processes used during the run, and compute
    # descheduled while it ran, say whether this run shared the cores
    load["contended"] = bool(
        load["others_cores"] > args.max_others or (load["compute_cpu_wall_min"] or 1.0) < 0.95
    )
    profile_ms = {
        k: {kd: {"wall": v[0] * 1e3, "cpu": v[1] * 1e3} for kd, v in d.items()}
        for k, d in prof.items()
    }
    out = {
        "model": model,
        "width": width,
        "text": describe_model(model, width, args.layers, args.vocab, args.seq),
        "T_limit_s": limit,
        "transfer_s": transfer,
        "load": load,
        "profile_ms": profile_ms,
        "rows": rows,
        "raw_steps_s": {k: [rec["wall"] for rec in v] for k, v in r0["records"].items()},
        # the last round's compute calls per rank: (action, start ms, end ms) from the step's start
        "timelines": {k: [g["timelines"][k] for g in gathered] for k in r0["timelines"]},
    }
    print_block(args, out)
    return out


def _f(x, fmt: str, none: str = "") -> str:
    return format(x, fmt) if x is not None else none


def print_block(args, res: dict) -> None:
    load, lim = res["load"], res["T_limit_s"]
    print(f"\n{res['text']}, batch {args.batch}, m = {args.microbatches}")
    flag = "  ** CONTENDED **" if load["contended"] else ""
    print(
        f"T_limit loop {lim['loop'] * 1e3:.1f} ms, V {lim['v'] * 1e3:.1f} ms; transfer "
        f"{res['transfer_s'] * 1e3:.2f} ms; load {load['loadavg_before'][0]:.2f} -> "
        f"{load['loadavg_after'][0]:.2f}; others {load['others_cores']:.2f} cores; cpu pressure "
        f"{load['cpu_pressure']:.1%}; compute cpu/wall >= "
        f"{_f(load['compute_cpu_wall_min'], '.2f')}{flag}"
    )
    print(
        f"{'schedule':15s} {'runtime':7s} {'step ms':>8s} {'eta':>6s} {'sim':>6s} {'vs torch':>8s} "
        f"{'bubble':>7s} {'sim':>6s}  per rank: bubble/sim, run/alone F I W B, idle ms"
    )
    for row in res["rows"]:
        ranks = []
        for rr in row["ranks"]:
            ratio = " ".join(f"{kd}{v:.2f}" for kd, v in rr["run_vs_alone"].items())
            sim = _f(rr.get("simulated_bubble"), ".1%", "-")
            ranks.append(f"{rr['bubble']:.1%}/{sim} {ratio} idle {rr['idle_ms']:.0f}")
        name = row["schedule"] + (f"({row['auto_chose']})" if row.get("auto_chose") else "")
        vs = row.get("speedup_vs_torch")
        vs = f"{vs:.2f}x" if vs else ""
        sim = _f(row.get("simulated_bubble"), ".1%")
        eta_sim = _f(row.get("simulated_eta"), ".3f")
        print(
            f"{name:15s} {row['runtime']:7s} {row['step_s'] * 1e3:8.1f} {row['eta']:6.3f} "
            f"{eta_sim:>6s} {vs:>8s} {row['bubble']:7.1%} {sim:>6s}  " + " | ".join(ranks)
        )


def machine() -> dict:
    import transformers

    return facts(transformers=transformers.__version__)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    ap.add_argument("--models", default="llama,qwen2,gpt2")
    ap.add_argument("--widths", default="512,1024")
    ap.add_argument("--layers", type=int, default=8, help="a multiple of 4 (4 stages for ZB-V)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--microbatches", "-m", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per schedule")
    ap.add_argument("--profile-reps", type=int, default=5)
    ap.add_argument("--profile-warmup", type=int, default=1)
    ap.add_argument(
        "--schedules",
        default="1f1b,zb-h1,zb-v,interleaved-zb,auto",
        help=f"comma-separated, from {', '.join(PAIRS)}",
    )
    ap.add_argument(
        "--max-others",
        type=float,
        default=0.1,
        help="cores other processes may use during a run before it is flagged contended",
    )
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "models.json"))
    ap.add_argument("--append", action="store_true", help="add this run to the file's runs")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    unknown = [s for s in args.schedules.split(",") if s not in PAIRS]
    if unknown:
        raise ValueError(f"unknown schedules {unknown}; choose from {', '.join(PAIRS)}")
    if args.layers % 4:
        raise ValueError(f"--layers {args.layers}: ZB-V cuts 4 stages; use a multiple of 4")
    if args.batch % args.microbatches:
        raise ValueError("--batch must be a multiple of --microbatches")
    mach = machine()
    print(f"{mach['cpu']}, {mach['cores']} cores, torch {mach['torch']}, transformers "
          f"{mach['transformers']}; 2 gloo ranks x {args.threads} thread(s); medians of "
          f"{args.rounds} rounds")  # fmt: skip
    # ppfast's CPU schedules keep freed memory in the process (ppfast.training.host_memory);
    # the limit and torch's schedules run in the same processes, after ppfast's first step
    mach["keep_host_memory"] = os.environ.get("PPFAST_KEEP_HOST_MEMORY", "1") != "0"
    run = {**header("bench/bench_models.py", argv, machine=mach),
           "setup": {k: v for k, v in vars(args).items() if k not in ("json", "append")},
           "results": []}  # fmt: skip
    t0 = time.perf_counter()
    for model in args.models.split(","):
        for width in (int(w) for w in args.widths.split(",")):
            gathered, load = run_model(args, model, width)
            run["results"].append(summarize(args, model, width, gathered, load))
    run["wall_s"] = time.perf_counter() - t0
    out = Path(args.json)
    runs = []
    if args.append and out.exists():
        runs = json.loads(out.read_text()).get("runs", [])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": [*runs, run]}, indent=1) + "\n")
    print(f"\n{run['wall_s']:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
