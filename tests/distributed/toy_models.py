"""Small models cut into pipeline stages, their data, training them on one rank of a pipeline,
and the one-device reference they are checked against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import ppfast

DIM = 16
SEQ = 6
MICROBATCH = 2  # samples per microbatch
LR = 0.05
STEPS = 3


class Chain(nn.Module):
    """Blocks run in order; a block's tuple output is the next block's arguments, so a stage
    can take and return several tensors."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, *args):
        out = args
        for block in self.blocks:
            out = block(*args)
            args = out if isinstance(out, tuple) else (out,)
        return out


class MLPBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return F.gelu(self.fc(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TwoStreamBlock(nn.Module):
    """Takes and returns (x, skip). Odd blocks hand skip on untouched, so with one block per
    stage some stages return one of their inputs as an output, which the stage must neither
    free after sending nor lose the gradient of."""

    def __init__(self, dim: int, index: int):
        super().__init__()
        self.index = index
        self.a = nn.Linear(dim, dim)
        self.b = nn.Linear(dim, dim)
        self.c = nn.Linear(dim, dim) if index % 2 == 0 else None

    def forward(self, x, skip):
        h = torch.tanh(self.a(x))
        out = h + self.b(skip)
        if self.c is not None:
            skip = skip + self.c(h)
        return out, skip


def mse_loss(out, target):
    return F.mse_loss(out, target)


def two_stream_loss(out, target):
    x, skip = out
    return F.mse_loss(x, target) + 0.5 * (skip * x).mean()


MODELS = ("mlp", "transformer", "two-stream")


def build_blocks(model: str, num_blocks: int, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    if model == "mlp":
        return [MLPBlock(DIM) for _ in range(num_blocks)]
    if model == "transformer":
        return [TransformerBlock(DIM) for _ in range(num_blocks)]
    if model == "two-stream":
        return [TwoStreamBlock(DIM, i) for i in range(num_blocks)]
    raise ValueError(f"unknown model {model!r}")


def loss_fn_of(model: str):
    return two_stream_loss if model == "two-stream" else mse_loss


def split_stages(blocks: list[nn.Module], num_stages: int) -> list[Chain]:
    """Stage s gets an equal, contiguous share of the blocks (the modules are shared, not
    copied, so a stage's parameters are the whole model's)."""
    per, left = divmod(len(blocks), num_stages)
    assert left == 0, f"{len(blocks)} blocks do not split into {num_stages} stages"
    return [Chain(blocks[s * per : (s + 1) * per]) for s in range(num_stages)]


def batch(model: str, m: int, step: int, seed: int = 0, seq: int = SEQ):
    """(inputs, target) of one step: m microbatches of MICROBATCH samples each."""
    g = torch.Generator().manual_seed(1000 * seed + 100 * step + m)
    n = m * MICROBATCH
    shape = (n, DIM) if model == "mlp" else (n, seq, DIM)
    x = torch.randn(shape, generator=g)
    target = torch.randn(shape, generator=g)
    if model == "two-stream":
        return (x, torch.randn(shape, generator=g)), target
    return (x,), target


def make_optimizer(params):
    # SGD with momentum rather than Adam: Adam divides by the gradient's own size, so a
    # rounding-level difference in a near-zero gradient becomes a full-size step.
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def stage_state(stages: dict[int, nn.Module], what: str) -> dict[int, dict[str, torch.Tensor]]:
    """{stage: {name: tensor}} of each parameter's grad ("grad") or value ("param")."""
    out = {}
    for s, mod in stages.items():
        out[s] = {
            name: (p.grad if what == "grad" else p).detach().clone()
            for name, p in mod.named_parameters()
        }
    return out


def reference(model: str, num_blocks: int, m: int, num_stages: int, seqs=(SEQ,) * STEPS):
    """The same training on one device: per microbatch loss_fn(model(x_mb), y_mb), then
    (loss / m).backward(), one optimizer step per entry of ``seqs`` (the sequence length of
    that step). Returns per step the losses, outputs and {stage: grads}, and {stage: params}
    after the last step."""
    blocks = build_blocks(model, num_blocks)
    stages = dict(enumerate(split_stages(blocks, num_stages)))
    whole = Chain(blocks)
    opt = make_optimizer(whole.parameters())
    loss_fn = loss_fn_of(model)
    result = {"losses": [], "grads": [], "outputs": []}
    for step, seq in enumerate(seqs):
        inputs, target = batch(model, m, step, seq=seq)
        opt.zero_grad()
        losses, outputs = [], []
        for x_mb, y_mb in zip(
            zip(*(t.chunk(m) for t in inputs), strict=True), target.chunk(m), strict=True
        ):
            out = whole(*x_mb)
            loss = loss_fn(out, y_mb)
            (loss / m).backward()
            losses.append(loss.item())
            outputs.append(out)
        result["losses"].append(losses)
        result["outputs"].append(_cat(outputs))
        result["grads"].append(stage_state(stages, "grad"))
        opt.step()
    result["params"] = stage_state(stages, "param")
    # evaluation after training: forwards alone on the next step's batch
    inputs, target = batch(model, m, len(seqs), seq=seqs[-1])
    with torch.no_grad():
        pairs = [
            (out := whole(*x_mb), loss_fn(out, y_mb).item())
            for x_mb, y_mb in zip(
                zip(*(t.chunk(m) for t in inputs), strict=True), target.chunk(m), strict=True
            )
        ]
    result["eval"] = {"losses": [x for _, x in pairs], "outputs": _cat([o for o, _ in pairs])}
    return result


def _cat(outputs: list):
    """Microbatch outputs as one batch: tensors, or tuples of tensors element by element."""
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts).detach() for parts in zip(*outputs, strict=True))
    return torch.cat(outputs).detach()


def assert_states_close(got: dict, want: dict, what: str, rtol: float, atol: float) -> None:
    """Same stages, same parameter names, every tensor close."""
    import torch.testing

    assert sorted(got) == sorted(want), f"{what}: stages {sorted(got)} != {sorted(want)}"
    for s in want:
        assert sorted(got[s]) == sorted(want[s]), f"{what}, stage {s}: parameter names differ"
        for name, t in want[s].items():
            torch.testing.assert_close(
                got[s][name],
                t,
                rtol=rtol,
                atol=atol,
                msg=lambda e, s=s, n=name: f"{what}, stage {s}, {n}: {e}",
            )


# ---------------------------------------------------------------------------- pipelines

SCHEDULE_CLASSES = {
    "gpipe": ppfast.ScheduleGPipe,
    "1f1b": ppfast.Schedule1F1B,
    "interleaved-1f1b": ppfast.ScheduleInterleaved1F1B,
    "looped-bfs": ppfast.ScheduleLoopedBFS,
    "interleaved-zb": ppfast.ScheduleInterleavedZeroBubble,
    "zb-h1": ppfast.ScheduleZBH1,
    "zb-h2": ppfast.ScheduleZBH2,
    "zb-v": ppfast.ScheduleZBVZeroBubble,
    "dualpipev": ppfast.ScheduleDualPipeV,
}
CHUNKED = frozenset({"interleaved-1f1b", "looped-bfs", "interleaved-zb", "zb-v", "dualpipev"})
V_PLACED = frozenset({"zb-v", "dualpipev"})


def num_stages_of(schedule: str, p: int) -> int:
    return 2 * p if schedule in CHUNKED else p


def placement(schedule: str, p: int) -> tuple[int, ...]:
    if schedule in V_PLACED:
        return ppfast.v_placement(p)
    return ppfast.loop_placement(p, 2 if schedule in CHUNKED else 1)


def train_rank(
    rank: int,
    p: int,
    schedule: str,
    model: str,
    m: int,
    *,
    seqs=(SEQ,) * STEPS,
    dynamic_shapes: bool = False,
    timeout: float = 30.0,
    transport: str | None = None,
) -> dict:
    """This rank's share of :func:`reference`'s training (2p blocks), on the default group.

    Returns what this rank saw per step (losses, step's return value, {stage: grads}) and
    {stage: params} after the last step, or {"rejected": message} when the first step raised
    ValueError (a configuration the schedule refuses). ``transport`` is the schedule's
    (None: auto, which is shared memory for these CPU ranks)."""
    n = num_stages_of(schedule, p)
    chains = split_stages(build_blocks(model, 2 * p), n)
    mine = [s for s, r in enumerate(placement(schedule, p)) if r == rank]
    stages = [
        ppfast.PipelineStage(chains[s], s, n, "cpu", dynamic_shapes=dynamic_shapes) for s in mine
    ]
    sched = SCHEDULE_CLASSES[schedule](
        stages[0] if len(stages) == 1 else stages,
        m,
        loss_fn_of(model),
        timeout=timeout,
        transport=transport,
    )
    opt = make_optimizer([q for s in mine for q in chains[s].parameters()])
    out = {"losses": [], "outputs": [], "grads": [], "stages": mine}
    for step, seq in enumerate(seqs):
        inputs, target = batch(model, m, step, seq=seq)
        opt.zero_grad()
        losses: list = []
        try:
            result = sched.step(
                *(inputs if 0 in mine else ()),
                target=target if n - 1 in mine else None,
                losses=losses,
            )
        except ValueError as e:
            if step == 0:
                return {"rejected": str(e)}
            raise
        out["losses"].append([float(x) for x in losses])
        out["outputs"].append(result)
        out["grads"].append(stage_state({s: chains[s] for s in mine}, "grad"))
        opt.step()
    out["params"] = stage_state({s: chains[s] for s in mine}, "param")
    inputs, target = batch(model, m, len(seqs), seq=seqs[-1])
    losses = []
    result = sched.eval(
        *(inputs if 0 in mine else ()), target=target if n - 1 in mine else None, losses=losses
    )
    out["eval"] = {"losses": [float(x) for x in losses], "outputs": result}
    return out


def merge_ranks(per_rank: list[dict], last_stage: int) -> dict:
    """One run's results from all ranks, shaped as :func:`reference` returns them."""
    rejected = [r.get("rejected") for r in per_rank]
    if any(rejected):
        assert all(rejected), f"only ranks {[i for i, x in enumerate(rejected) if x]} rejected it"
        return {"rejected": rejected}
    holder = next(r for r in per_rank if last_stage in r["stages"])
    steps = len(holder["losses"])
    for r in per_rank:
        if r is not holder:
            assert r["losses"] == [[]] * steps, "losses reported off the last stage's rank"
            assert r["outputs"] == [None] * steps, "outputs returned off the last stage's rank"
    return {
        "losses": holder["losses"],
        "outputs": holder["outputs"],
        "eval": holder.get("eval"),
        "grads": [{s: g for r in per_rank for s, g in r["grads"][k].items()} for k in range(steps)],
        "params": {s: t for r in per_rank for s, t in r["params"].items()},
        # what each rank was told the whole model's gradient norm is, where they asked
        "norms": [r["norms"] for r in per_rank] if "norms" in holder else None,
        # the step's loss as each rank was told it (step(..., share_loss=True))
        "step_losses": [r["step_losses"] for r in per_rank] if "step_losses" in holder else None,
    }


def assert_matches(got: dict, want: dict, rtol: float, atol: float, outputs: bool = True) -> None:
    """Losses per microbatch, outputs, every gradient at every step, and the final parameters;
    and, where both ran one, the evaluation pass after training."""
    import torch.testing

    if got.get("eval") is not None and want.get("eval") is not None:
        ge, we = got["eval"], want["eval"]
        torch.testing.assert_close(
            torch.tensor(ge["losses"]), torch.tensor(we["losses"]), rtol=rtol, atol=atol
        )
        torch.testing.assert_close(ge["outputs"], we["outputs"], rtol=rtol, atol=atol)

    assert "rejected" not in got, got.get("rejected")
    assert len(got["losses"]) == len(want["losses"])
    for k, want_losses in enumerate(want["losses"]):
        assert len(got["losses"][k]) == len(want_losses), f"step {k}: number of losses"
        torch.testing.assert_close(
            torch.tensor(got["losses"][k]), torch.tensor(want_losses), rtol=rtol, atol=atol
        )
        if outputs:
            torch.testing.assert_close(got["outputs"][k], want["outputs"][k], rtol=rtol, atol=atol)
        assert_states_close(got["grads"][k], want["grads"][k], f"step {k} grads", rtol, atol)
    assert_states_close(got["params"], want["params"], "params after the last step", rtol, atol)
    if got.get("step_losses") is not None:  # every rank has the mean of the step's losses
        means = torch.tensor([sum(x) / len(x) for x in want["losses"]])
        for rank, step_losses in enumerate(got["step_losses"]):
            torch.testing.assert_close(
                torch.tensor(step_losses), means, rtol=rtol, atol=atol,
                msg=lambda e, rank=rank: f"rank {rank}'s step losses: {e}",
            )  # fmt: skip
    if want.get("norms") is not None:  # every rank has the one norm of the whole model
        for rank, norms in enumerate(got["norms"]):
            torch.testing.assert_close(
                torch.tensor(norms), torch.tensor(want["norms"]), rtol=rtol, atol=atol,
                msg=lambda e, rank=rank: f"rank {rank}'s gradient norms: {e}",
            )  # fmt: skip
