"""Stage checkpoints: a run saved on gloo ranks resumes where it stopped, on as many stages or,
through the full model's state_dict, on another number of them.

The model is 6 blocks of [Linear(32, 32), GELU] in one nn.Sequential, trained with Adam on
4 microbatches per step. One 2-rank run (1F1B) trains K steps, saves, and trains J more: the
unbroken run. Then, each in fresh processes with modules initialised differently:
- 2 ranks load the checkpoint and train J steps: the losses equal the unbroken run's, bit
  for bit (same stages, same schedule, so the same arithmetic);
- 3 ranks (ZB-H1) load the gathered full state_dict and optimizer state, each keeping its
  share, and train J steps: losses within rtol 1e-6 of the unbroken run's. Both runs save
  at the end, and the 3-stage checkpoint (stages numbered from 0: names from the sizes the
  ranks exchange) gathers to the 2-stage one's parameters. A rank that cannot save makes
  every rank raise, and no manifest is written.
The gathered state_dict loads strictly into the unsplit model and equals the one-device model
trained K steps on the same microbatches (fp32, rtol 1e-5, atol 1e-6), as does the gathered
Adam state. Tied weights, names, and the errors are checked in this process (all stages
local, or ranks as threads under ppfast.Pipe).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ranks import run_ranks
from torch import nn
from toy_models import Chain, build_blocks, split_stages

import ppfast
import ppfast.checkpoint as ckpt
from ppfast.model.partition import split

WIDTH, BLOCKS, M, MICROBATCH, K, J, LR = 32, 6, 4, 2, 3, 3, 1e-2
CUTS = {2: (0, 6, 12), 3: (0, 4, 8, 12)}  # children of the Sequential held by each stage
RTOL, ATOL = 1e-5, 1e-6

pytestmark = pytest.mark.usefixtures("one_thread")


def build(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*(m for _ in range(BLOCKS) for m in (nn.Linear(WIDTH, WIDTH), nn.GELU())))


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    n = M * MICROBATCH
    return torch.randn(n, WIDTH, generator=g), torch.randn(n, WIDTH, generator=g)


def train(sched, opt, rank: int, last: bool, steps) -> list[list[float]]:
    out = []
    for step in steps:
        x, y = batch(step)
        opt.zero_grad()
        losses: list = []
        sched.step(*((x,) if rank == 0 else ()), target=y if last else None, losses=losses)
        opt.step()
        out.append([float(v) for v in losses])
    return out


def pipeline(rank: int, n: int, module: nn.Module, schedule=ppfast.Schedule1F1B):
    stage = ppfast.PipelineStage(module, rank, n, "cpu")
    sched = schedule(stage, M, F.mse_loss, timeout=60)
    return sched, torch.optim.Adam(module.parameters(), lr=LR)


# ---------------------------------------------------------------------------- ranks


def unbroken_rank(rank: int, world: int, path: str) -> list:
    """K steps, save, J more steps; the stages are slices of the model (they keep its keys)."""
    lo, hi = CUTS[2][rank : rank + 2]
    sched, opt = pipeline(rank, 2, build(0)[lo:hi])
    losses = train(sched, opt, rank, rank == 1, range(K))
    ckpt.save(path, sched, opt, step=K, extra={"rank": rank})
    losses += train(sched, opt, rank, rank == 1, range(K, K + J))
    ckpt.save(f"{path}-end", sched, step=K + J)
    return losses


def resume_rank(rank: int, world: int, path: str) -> dict:
    lo, hi = CUTS[2][rank : rank + 2]
    sched, opt = pipeline(rank, 2, build(10 + rank)[lo:hi])
    info = ckpt.load(path, sched, opt)
    losses = train(sched, opt, rank, rank == 1, range(K, K + J))
    return {"losses": losses, "step": info.step, "extra": info.extra}


def resplit_rank(rank: int, world: int, path: str) -> dict:
    """Stages re-numbered from 0 (nn.Sequential(*layers[lo:hi])): their full-model names come
    from the other stages' sizes, exchanged over the group."""
    lo, hi = CUTS[3][rank : rank + 2]
    module = nn.Sequential(*list(build(20 + rank))[lo:hi])
    sched, opt = pipeline(rank, 3, module, ppfast.ScheduleZBH1)
    for g in opt.param_groups:
        g["lr"] = 1.0  # the saved learning rate must replace it
    ckpt.load_full(ckpt.gather(path), sched, opt, ckpt.gather_optimizer(path))
    names = sorted(ckpt.layouts(sched)[0].names.values())
    losses = train(sched, opt, rank, rank == 2, range(K, K + J))
    ckpt.save(f"{path}-end3", sched, step=K + J)  # names from the stages' exchanged sizes
    # a rank that cannot save makes every rank raise, and no manifest is written
    stray = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1)
    try:
        ckpt.save(f"{path}-failed", sched, stray if rank == 1 else opt)
        failed = None
    except Exception as e:
        failed = f"{type(e).__name__}: {e}"
    return {"losses": losses, "lr": opt.param_groups[0]["lr"], "names": names, "failed": failed}


# ---------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoint folder after K steps, losses of the unbroken K + J steps)."""
    path = tmp_path_factory.mktemp("ckpt") / "step-3"
    per_rank = run_ranks(unbroken_rank, 2, str(path), timeout=120.0)
    assert per_rank[0] == [[]] * (K + J)
    return path, per_rank[1]


def one_device(steps: int):
    """The unsplit model and its Adam after ``steps`` steps on the same microbatches."""
    model = build(0)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        for xm, ym in zip(x.chunk(M), y.chunk(M), strict=True):
            (F.mse_loss(model(xm), ym) / M).backward()
        opt.step()
    return model, opt


def test_resume_on_the_same_stages_equals_the_unbroken_run(saved):
    path, unbroken = saved
    got = run_ranks(resume_rank, 2, str(path), timeout=120.0)
    assert [r["step"] for r in got] == [K, K]
    assert [r["extra"] for r in got] == [{"rank": 0}, {"rank": 1}]
    assert got[1]["losses"] == unbroken[K:]  # bit for bit


def test_gather_equals_one_device_and_loads_strictly(saved):
    path, _ = saved
    full = ckpt.gather(path)
    model, opt = one_device(K)
    want = model.state_dict()
    assert list(full) == list(want)
    for name, t in want.items():
        torch.testing.assert_close(full[name], t, rtol=RTOL, atol=ATOL, msg=name)
    fresh = build(5)
    fresh.load_state_dict(full, strict=True)
    # Adam's moments, by full-model name, against the one-device optimizer's
    state = ckpt.gather_optimizer(path)
    names = [n for n, _ in model.named_parameters()]
    assert state["param_groups"][0]["params"] == names and len(state["param_groups"]) == 1
    assert state["param_groups"][0]["lr"] == LR
    for i, name in enumerate(names):
        for key, t in opt.state_dict()["state"][i].items():
            torch.testing.assert_close(state["state"][name][key], t, rtol=RTOL, atol=ATOL)
    manifest = ckpt.read_manifest(path)
    assert manifest["num_stages"] == 2 and manifest["step"] == K
    assert sorted(manifest["stages"][1]["tensors"]) == sorted(
        f"{i}.{w}" for i in range(6, 12, 2) for w in ("weight", "bias")
    )


def test_resume_on_three_stages_through_the_full_state(saved):
    path, unbroken = saved
    got = run_ranks(resplit_rank, 3, str(path), timeout=150.0)
    assert [r["lr"] for r in got] == [LR] * 3
    assert got[1]["names"] == sorted(f"{i}.{w}" for i in (4, 6) for w in ("weight", "bias"))
    assert got[0]["losses"] == got[1]["losses"] == [[]] * J
    torch.testing.assert_close(
        torch.tensor(got[2]["losses"]), torch.tensor(unbroken[K:]), rtol=1e-6, atol=0
    )
    end2, end3 = ckpt.gather(f"{path}-end"), ckpt.gather(f"{path}-end3")
    assert list(end3) == list(end2) and ckpt.read_manifest(f"{path}-end3")["num_stages"] == 3
    for name, t in end2.items():
        torch.testing.assert_close(end3[name], t, rtol=RTOL, atol=ATOL, msg=name)
    assert got[1]["failed"].startswith("ValueError: the optimizer holds a parameter of shape [2]")
    for r in (0, 2):
        assert got[r]["failed"].startswith(
            f"RuntimeError: rank {r}: the checkpoint was not saved; rank(s) [1] failed writing"
        ), got[r]["failed"]
    assert not os.path.exists(f"{path}-failed/manifest.json")


# ---------------------------------------------------------------------------- in this process


def test_names_of_stages_cut_from_one_sequential():
    model = build(0)
    kept, renumbered = (
        [model[0:4], model[4:12]],
        [nn.Sequential(*list(model)[a:b]) for a, b in ((0, 4), (4, 12))],
    )
    for stages in (kept, renumbered):
        names = [lay.names for lay in ckpt.layouts(stages)]
        assert sorted(names[1].values()) == sorted(
            f"{i}.{w}" for i in range(4, 12, 2) for w in ("weight", "bias")
        )
    # under one child path: toy_models' Chain holds its blocks in .blocks
    chains = split_stages(build_blocks("mlp", 4), 2)
    assert ckpt.layouts(chains)[1].names["blocks.0.fc.weight"] == "blocks.2.fc.weight"
    # explicit: an offset, a prefix, a dict, a callable; one spec per stage index
    stage = nn.Sequential(nn.Linear(2, 2))
    lone = [ckpt.layouts([stage], n)[0].names["0.weight"] for n in (None, "", "enc.")]
    assert lone == ["0.weight", "0.weight", "enc.0.weight"]
    two = [stage, nn.Sequential(nn.Linear(2, 2))]
    specs = {0: lambda k: "a." + k, 1: {"0.weight": "w", "0.bias": "b"}}
    assert [lay.names for lay in ckpt.layouts(two, specs)] == [
        {"0.weight": "a.0.weight", "0.bias": "a.0.bias"},
        {"0.weight": "w", "0.bias": "b"},
    ]
    assert ckpt.layouts(two, {1: 7})[1].names == {"0.weight": "7.weight", "0.bias": "7.bias"}
    with pytest.raises(ValueError, match=r"cannot tell where stage 0.*stage 1's module.*names="):
        ckpt.layouts([Chain([nn.Linear(2, 2)]), nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"missing \['0.bias'\]"):
        ckpt.layouts(two, {1: {"0.weight": "w"}})
    with pytest.raises(ValueError, match=r"both map to full-model name 'x'"):
        ckpt.layouts([stage], lambda k: "x")


def test_shard_splits_a_full_state_dict_over_any_stage_count():
    model, other = build(0), build(1)
    stages = [nn.Sequential(*list(other)[a:b]) for a, b in ((0, 2), (2, 8), (8, 12))]
    parts = ckpt.shard(model.state_dict(), stages)
    for s, part in parts.items():
        stages[s].load_state_dict(part, strict=True)
    assert torch.equal(stages[1][0].weight, model[2].weight)
    assert torch.equal(stages[2][2].bias, model[10].bias)
    by_layout = ckpt.shard(model.state_dict(), ckpt.layouts(stages))
    assert {s: list(p) for s, p in by_layout.items()} == {s: list(p) for s, p in parts.items()}
    with pytest.raises(ValueError, match=r"no stage holds \['8.weight'"):
        ckpt.shard(model.state_dict(), stages[:2])


class TiedLM(nn.Module):
    """An embedding, blocks, and a head that is the embedding."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(11, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight


def test_names_by_identity_with_the_model_the_stages_were_cut_from(tmp_path):
    model = TiedLM(0)
    cut = split(model.blocks, 3, pre=model.embed, post=model.head)
    ckpt.save(tmp_path, list(cut.stages), names=model)
    names = [sorted(r["tensors"]) for r in ckpt.read_manifest(tmp_path)["stages"]]
    assert names[0][0] == "blocks.0.bias" and names[0][-1] == "embed.weight"
    assert names[2][-1] == "head.weight"
    fresh = TiedLM(1)
    fresh.load_state_dict(ckpt.gather(tmp_path), strict=True)
    for name, t in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name
    with pytest.raises(ValueError, match=r"stage 0: the module holding 'pre.weight' is not one"):
        ckpt.layouts(list(cut.stages), TiedLM(0))


def save_two(path: Path, seed: int = 0) -> list[nn.Module]:
    model = build(seed)
    stages = [model[0:6], model[6:12]]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, WIDTH)).sum().backward()
    opt.step()
    ckpt.save(path, stages, opt, step=1)
    return stages


def test_errors_say_what_to_change(tmp_path):
    path = tmp_path / "ckpt"
    save_two(path)
    model = build(1)
    # another stage count
    with pytest.raises(ValueError, match=r"saved on 2 stages.*gather.*load_full"):
        ckpt.load(path, [model[0:4], model[4:8], model[8:12]])
    # other shapes than saved
    wide = nn.Sequential(*(m for _ in range(BLOCKS) for m in (nn.Linear(WIDTH, 8), nn.GELU())))
    with pytest.raises(ValueError, match=r"stage 0 does not match.*shape/dtype differ.*\[8, 32\]"):
        ckpt.load(path, [wide[0:6], wide[6:12]])
    # other names than saved
    with pytest.raises(ValueError, match=r"stage 1's module has other keys than when saved"):
        ckpt.load(path, [model[0:6], nn.Sequential(*list(model)[6:12])])
    with pytest.raises(ValueError, match=r"stage 1 does not match.*not there: \['0.weight'"):
        ckpt.load(path, [model[0:6], nn.Sequential(*list(model)[6:12])], names={1: ""})
    # but an offset naming them as saved loads
    ckpt.load(path, [model[0:6], nn.Sequential(*list(model)[6:12])], names={1: 6})
    # no optimizer state saved
    bare = tmp_path / "bare"
    ckpt.save(bare, [model[0:6], model[6:12]])
    with pytest.raises(ValueError, match=r"no optimizer state for stages \[0, 1\].*optimizer=None"):
        ckpt.load(bare, [model[0:6], model[6:12]], torch.optim.SGD(model.parameters(), lr=1))
    # a missing shard, a stale one, an unfinished save
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    os.remove(broken / "stage-00001-of-00002.pt")
    with pytest.raises(FileNotFoundError, match=r"stage-00001-of-00002.pt is missing: stage 1's"):
        ckpt.gather(broken)
    shutil.copy(bare / "stage-00001-of-00002.pt", broken)
    with pytest.raises(ValueError, match=r"belongs to another save"):
        ckpt.gather(broken)
    os.remove(broken / "manifest.json")
    with pytest.raises(FileNotFoundError, match=r"save did not finish"):
        ckpt.load(broken, [model[0:6], model[6:12]])
    # a full state_dict of another model
    with pytest.raises(ValueError, match=r"lacks stage 0's"):
        ckpt.load_full({"x": torch.zeros(1)}, [model[0:6], model[6:12]])
    # an optimizer over parameters the stages do not hold
    stray = torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=1)
    with pytest.raises(ValueError, match=r"optimizer holds a parameter of shape \[3\]"):
        ckpt.save(tmp_path / "stray", [model[0:6], model[6:12]], stray)


def test_saving_again_replaces_the_checkpoint(tmp_path):
    stages = save_two(tmp_path, seed=0)
    first = json.loads((tmp_path / "manifest.json").read_text())["save_id"]
    with torch.no_grad():
        stages[1][0].weight.add_(1)
    ckpt.save(tmp_path, stages, step=2)
    manifest = ckpt.read_manifest(tmp_path)
    assert manifest["save_id"] != first and manifest["step"] == 2
    torch.testing.assert_close(ckpt.gather(tmp_path)["6.weight"], stages[1][0].weight.detach())
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_one_full_name_on_two_stages_appears_once_and_must_agree(tmp_path):
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    with torch.no_grad():
        b.weight.copy_(a.weight)
    names = {0: {"weight": "shared", "bias": "a.bias"}, 1: {"weight": "shared", "bias": "b.bias"}}
    ckpt.save(tmp_path / "ok", [a, b], names=names)
    assert list(ckpt.gather(tmp_path / "ok")) == ["shared", "a.bias", "b.bias"]
    with torch.no_grad():
        b.weight.add_(1)
    ckpt.save(tmp_path / "bad", [a, b], names=names)
    with pytest.raises(ValueError, match=r"'shared' differs between stages 0 and 1"):
        ckpt.gather(tmp_path / "bad")


def test_tied_embedding_and_head_under_pipe(tmp_path):
    """Ranks as threads: the tied copies are saved by each stage under its own full-model name,
    gathered equal, and load strictly into the one-device model, where they are one tensor."""
    sys.path.insert(0, str(Path(__file__).parent))
    import test_split_backward as tsb

    stages = tsb.build(2)
    tsb.untie(stages)  # one copy per thread; the tie starts the head from the embedding
    pipe = ppfast.Pipe(
        stages, ["cpu"] * 2, chunks=4, schedule="1f1b", loss_fn=tsb.loss_fn, timeout=30,
        tied=[("0.embed.weight", "1.head.weight"), ("0.proj_in.weight", "1.proj_out.weight")],
    )  # fmt: skip
    params = [q for s in stages for q in s.parameters()]
    opt = tsb.optimizer(params)
    for step in range(tsb.STEPS):
        ids, target = tsb.batch(4, step)
        opt.zero_grad()
        pipe.step(ids, target=target)
        opt.step()
    ckpt.save(tmp_path, pipe, opt, names={0: "0.", 1: "1."})
    manifest = ckpt.read_manifest(tmp_path)
    assert manifest["stages"][0]["tied"] == {
        "0.embed.weight": "0.embed.weight",
        "0.proj_in.weight": "0.proj_in.weight",
    }
    assert sorted(manifest["stages"][1]["tied"].values()) == ["1.head.weight", "1.proj_out.weight"]
    full = ckpt.gather(tmp_path)
    assert torch.equal(full["0.embed.weight"], full["1.head.weight"])
    model = nn.Sequential(*tsb.build(2))  # head.weight is embed.weight
    model.load_state_dict(full, strict=True)
    want = tsb.reference(2, 4)["params"]
    for s, mod in enumerate(model):
        for name, p in mod.named_parameters():
            torch.testing.assert_close(p, want[s][name], rtol=RTOL, atol=ATOL)
    # and back onto separate copies, the optimizer's momentum with them
    again = tsb.build(2)
    tsb.untie(again, seed=3)
    opt2 = tsb.optimizer([q for s in again for q in s.parameters()])
    ckpt.load_full(full, again, opt2, ckpt.gather_optimizer(tmp_path), names={0: "0.", 1: "1."})
    assert torch.equal(again[1].head.weight, again[0].embed.weight)
    head = opt.state[stages[1].head.weight]["momentum_buffer"]
    assert torch.equal(opt2.state[again[1].head.weight]["momentum_buffer"], head)


class Note:
    """An object of the user's own class: unpickling it runs the class's code (here
    ``__setstate__``, which leaves a file to show that it ran)."""

    def __init__(self, text: str, marker: Path):
        self.text, self.marker = text, str(marker)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        Path(self.marker).write_text("unpickled")


def test_extra_of_other_classes_loads_only_when_trusted(tmp_path):
    model = build(0)
    stages = [model[0:6], model[6:12]]
    marker = tmp_path / "ran"
    ckpt.save(tmp_path / "ckpt", stages, extra={"note": Note("hi", marker), "lr": [0.1]})
    with pytest.raises(ValueError, match=r"Note.*pass weights_only=False") as refused:
        ckpt.load(tmp_path / "ckpt", stages)
    assert "ppfast.checkpoint.load(path, stages, optimizer, weights_only=False)" in str(
        refused.value
    )
    assert not marker.exists(), "the refused load ran the class's code"
    info = ckpt.load(tmp_path / "ckpt", stages, weights_only=False)
    assert info.extra["note"].text == "hi" and marker.exists()
    # tensors, containers, numbers and strings need no trust
    plain = {"lr": [0.1, 0.01], "last_epoch": 3, "name": "cosine", "t": torch.ones(2)}
    ckpt.save(tmp_path / "plain", stages, extra=plain)
    got = ckpt.load(tmp_path / "plain", stages).extra
    assert (
        got.keys() == plain.keys()
        and got["lr"] == plain["lr"]
        and torch.equal(got["t"], plain["t"])
    )
    # an extra file of another save is refused, as a shard would be
    ckpt.save(tmp_path / "other", stages, extra={"lr": [1.0]})
    shutil.copy(tmp_path / "other" / "stage-00000-of-00002.extra.pt", tmp_path / "plain")
    with pytest.raises(ValueError, match=r"extra.pt belongs to another save"):
        ckpt.load(tmp_path / "plain", stages)
