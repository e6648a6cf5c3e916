"""ppfast.split: balanced cuts of a model into pipeline stages, and the cuts it refuses.

Every method is checked on small models whose best cut is known: uniform's uneven counts
(30 layers on 4 stages: 8, 8, 7, 7), parameters with a heavy embedding, type:REGEX with
layers that ride along, explicit counts, and against a brute force over every cut. The
stages must hold the original layer objects, each exactly once, and run like the model.
``profile`` on a model with very unequal blocks must time each layer's F, I and W, cut by
those costs, and give a clearly shorter simulated 1F1B step than ``uniform``, both partitions
costed with the same per-layer costs; its clock there counts work, so every number is exact.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ppfast
from ppfast.model.balance import balance
from ppfast.model.partition import Split, split

RTOL, ATOL = 1e-5, 1e-6


def linears(n: int, width: int = 8) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(width, width) for _ in range(n)]


def flat(s: Split) -> list[nn.Module]:
    return [m for stage in s.stages for m in stage]


def assert_once_each(s: Split, modules: list[nn.Module]) -> None:
    got = flat(s)
    assert len(got) == len(modules)
    assert all(a is b for a, b in zip(got, modules, strict=True))


class Work:
    """A clock for the profiler that reads units of work done (Linear applications, forward or
    backward) instead of seconds: what it measures is then exact, whatever else the machine
    runs."""

    def __init__(self):
        self.done = 0

    def __call__(self) -> float:
        return float(self.done)

    def tick(self, *_):
        self.done += 1


class Repeat(nn.Module):
    """One Linear applied ``reps`` times: its cost grows with reps, its parameters do not.
    Each application, and its backward, is one unit of ``work`` when given."""

    def __init__(self, width: int, reps: int, work: Work | None = None):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.reps = reps
        self.work = work

    def forward(self, x):
        for _ in range(self.reps):
            x = torch.tanh(self.fc(x))
            if self.work is not None:
                self.work.tick()
                if x.requires_grad:
                    x.register_hook(self.work.tick)
        return x


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return F.gelu(self.fc(x))


# ---------------------------------------------------------------------- uniform and counts


@pytest.mark.parametrize(
    ("n", "k", "want"),
    [(30, 4, [8, 8, 7, 7]), (7, 3, [3, 2, 2]), (8, 4, [2, 2, 2, 2]), (5, 5, [1] * 5), (9, 1, [9])],
)
def test_uniform_gives_larger_stages_first(n, k, want):
    layers = linears(n)
    s = split(nn.Sequential(*layers), k)
    assert list(s.counts) == want
    assert list(s.stage_costs) == want
    assert_once_each(s, layers)
    assert all(isinstance(st, nn.Sequential) for st in s.stages)
    assert s.ranges[0][0] == 0 and s.ranges[-1][1] == n


def test_explicit_counts_cut_where_told():
    layers = linears(7)
    s = split(layers, 3, counts=[1, 4, 2])
    assert s.counts == (1, 4, 2)
    assert [len(st) for st in s.stages] == [1, 4, 2]
    assert_once_each(s, layers)
    # num_stages may be left to the counts; the method then only says what is reported
    s = split(layers, counts=[5, 2], method="parameters")
    assert s.counts == (5, 2) and s.stage_costs == (5 * 72, 2 * 72)


def test_stages_run_like_the_model_and_keep_sequential_names():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4)
    )
    x = torch.randn(3, 8)
    s = split(model, 3, "parameters")
    out = x
    for stage in s.stages:
        out = stage(out)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    assert_once_each(s, list(model))
    # a stage's parameter names are the model's, so checkpoints map one to one
    model_keys = set(model.state_dict())
    assert set().union(*(st.state_dict().keys() for st in s.stages)) == model_keys


# ---------------------------------------------------------------------- parameters and pre/post


def test_parameters_balances_unequal_layers():
    torch.manual_seed(0)
    widths = [8, 8, 8, 8, 32, 32, 8, 8]  # params: 72 x 4, 1056 x 2, 72 x 2
    layers = [nn.Linear(w, w) for w in widths]
    s = split(layers, 3, "parameters")
    # the two wide layers must not share a stage
    assert s.counts == (4, 1, 3)
    assert s.stage_costs == (4 * 72, 1056, 1056 + 2 * 72)
    assert s.unit == "parameters"


def test_heavy_embedding_moves_layers_off_stage_zero():
    blocks = linears(12, width=16)  # 272 parameters each
    plain = split(blocks, 4, "parameters")
    assert plain.counts == (3, 3, 3, 3)
    embed = nn.Embedding(50, 16)  # 800 parameters, about 3 blocks
    s = split(blocks, 4, "parameters", pre=embed)
    assert s.counts[0] < plain.counts[0]
    assert s.counts == (1, 4, 4, 3)
    assert s.stages[0][0] is embed and s.stage_costs[0] == 800 + 272
    # a heavy head does the same to the last stage
    head = nn.Linear(16, 50)
    s = split(blocks, 4, "parameters", post=head)
    assert s.counts[-1] < plain.counts[-1] and s.stages[-1][-1] is head
    # uniform counts layers only: pre and post do not move anything
    assert split(blocks, 4, pre=embed, post=head).counts == (3, 3, 3, 3)


def test_list_of_blocks_with_pre_and_post():
    torch.manual_seed(0)
    embed, norm, head = nn.Embedding(20, 16), nn.LayerNorm(16), nn.Linear(16, 20)
    blocks = [Block(16) for _ in range(6)]
    s = split(nn.ModuleList(blocks), 3, pre=embed, post=[norm, head])
    assert s.counts == (2, 2, 2)
    assert list(s.stages[0]) == [embed, *blocks[:2]]
    assert list(s.stages[2]) == [*blocks[4:], norm, head]
    assert s.pre == (embed,) and s.post == (norm, head)
    assert_once_each(s, [embed, *blocks, norm, head])
    idx = torch.randint(0, 20, (2, 5))
    out = idx
    for stage in s.stages:
        out = stage(out)
    want = embed(idx)
    for b in blocks:
        want = b(want)
    torch.testing.assert_close(out, head(norm(want)), rtol=0, atol=0)
    # one stage holds everything
    one = split(blocks, 1, pre=embed, post=[norm, head])
    assert list(one.stages[0]) == [embed, *blocks, norm, head]


def test_tied_embedding_and_head_are_keyed_for_pipeline_stage():
    embed, head = nn.Embedding(20, 16), nn.Linear(16, 20, bias=False)
    head.weight = embed.weight
    s = split(linears(4, width=16), 2, pre=embed, post=head)
    assert s.tied[0] == {"pre.weight": embed.weight}
    assert s.tied[1] == {"pre.weight": head.weight}
    stages = [ppfast.PipelineStage(st, k, 2, tied=s.tied[k]) for k, st in enumerate(s.stages)]
    assert stages[1].tied["pre.weight"] is embed.weight
    assert split(linears(4), 2).tied == ({}, {})


# ---------------------------------------------------------------------- type:REGEX


def test_type_balances_matching_layers_and_the_rest_ride_along():
    torch.manual_seed(0)
    blocks = [Block(8) for _ in range(8)]
    layers = [nn.Embedding(10, 8)]
    for b in blocks:
        layers += [b, nn.Dropout(0.0)]
    layers += [nn.LayerNorm(8), nn.Linear(8, 10)]
    s = split(nn.Sequential(*layers), 3, "type:^Block$")
    assert s.stage_costs == (3, 3, 2)
    assert s.unit == "matching layers"
    assert_once_each(s, layers)
    for stage in s.stages:
        mods = list(stage)
        # every Dropout stays right after its Block
        for a, b in itertools.pairwise(mods):
            if isinstance(b, nn.Dropout):
                assert isinstance(a, Block)
        assert not isinstance(mods[0], nn.Dropout)
    assert isinstance(s.stages[0][0], nn.Embedding)
    assert isinstance(s.stages[-1][-1], nn.Linear)
    # searched in the class name, case-insensitive, alternatives allowed
    assert split(layers, 4, "type:block|transformerblock").stage_costs == (2, 2, 2, 2)


def test_type_counts_matching_pre_and_post_modules():
    blocks = [Block(8) for _ in range(6)]
    s = split(blocks, 3, "type:Block", pre=Block(8), post=nn.Linear(8, 2))
    assert s.pre_cost == 1 and s.post_cost == 0
    assert max(s.stage_costs) == 3 and sum(s.stage_costs) == 7


# ---------------------------------------------------------------------- the balancing itself


def brute_force(costs: list[float], k: int) -> float:
    n, best = len(costs), float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = [0, *cuts, n]
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(edges)))
    return best


def test_balance_finds_the_least_heaviest_stage():
    rng = random.Random(0)
    for _ in range(150):
        n = rng.randint(1, 10)
        k = rng.randint(1, n)
        costs = [rng.choice([0.0, rng.random(), float(rng.randint(1, 9))]) for _ in range(n)]
        counts = balance(costs, k)
        assert len(counts) == k and sum(counts) == n and min(counts) >= 1
        edges = list(itertools.accumulate([0, *counts]))
        got = max(sum(costs[a:b]) for a, b in itertools.pairwise(edges))
        assert got == pytest.approx(brute_force(costs, k), rel=1e-9, abs=1e-12)


def test_balance_is_fast_on_deep_models():
    counts = balance([float(k % 7 + 1) for k in range(1000)], 64)
    assert sum(counts) == 1000 and len(counts) == 64


def test_virtual_stages_are_more_stages():
    s = split(linears(16), 8)  # 4 ranks x 2 stages per rank
    assert s.counts == (2,) * 8
    prog = ppfast.generate("interleaved-1f1b", 4, 8, v=2)
    sim = ppfast.simulate(prog, s.costs())
    assert sim.makespan > 0


def test_costs_scale_with_the_balanced_share():
    s = split(linears(6), 2, counts=[4, 2])
    c = s.costs(comm=0.5, f=1, i=2, w=1)
    assert c.comm == 0.5
    assert c.per_stage == ((4 / 3, 8 / 3, 4 / 3), (2 / 3, 4 / 3, 2 / 3))


def test_describe_is_a_table_of_the_stages():
    s = split(linears(7), 3, pre=nn.Embedding(4, 8), post=nn.Linear(8, 2))
    text = s.describe()
    assert str(s) == text
    lines = text.splitlines()
    assert "7 layers into 3 stages by 'uniform'" in lines[0]
    assert "pre, 0-2" in lines[2] and "5-6, post" in lines[4]
    assert "heaviest: stage 0" in lines[-1]
    assert repr(s) == "Split(method='uniform', counts=(3, 2, 2), unit='layers')"


# ---------------------------------------------------------------------- refused


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"num_stages": 4, "counts": [8, 8, 7, 6]}, ValueError, "29 layers but the model has 30"),
        ({"num_stages": 4, "counts": [10, 10, 10, 0]}, ValueError, "stage 3 0 layers"),
        ({"num_stages": 3, "counts": [15, 15]}, ValueError, "gives 2 stages but num_stages is 3"),
        ({"num_stages": 31}, ValueError, "30 layers cannot fill 31 stages"),
        ({"num_stages": 0}, ValueError, "at least 1"),
        ({"num_stages": -2}, ValueError, "at least 1"),
        ({"num_stages": 2.0}, TypeError, "must be an int"),
        ({}, TypeError, "needs num_stages"),
        ({"num_stages": 2, "method": "flops"}, ValueError, "unknown split method 'flops'; use"),
        ({"num_stages": 2, "method": "type:Block"}, ValueError, "matches no layer.*Linear"),
        ({"num_stages": 2, "method": "type:"}, ValueError, "needs a regular expression"),
        ({"num_stages": 2, "method": "type:(("}, ValueError, "not a valid regular expression"),
        ({"num_stages": 2, "method": "profile"}, ValueError, "pass sample="),
        ({"num_stages": 2, "sample": torch.zeros(1)}, ValueError, "only serve method 'profile'"),
        ({"num_stages": 2, "pre": "embed"}, TypeError, "pre takes an nn.Module"),
    ],
)  # fmt: skip
def test_refuses_splits_that_drop_or_duplicate_layers(kwargs, error, words):
    with pytest.raises(error, match=words):
        split(nn.Sequential(*linears(30)), **kwargs)


def test_refuses_a_module_it_cannot_read_layers_from_and_repeated_modules():
    with pytest.raises(TypeError, match=r"pass an nn.Sequential, or a list"):
        split(Block(8), 2)
    with pytest.raises(ValueError, match="no layers"):
        split([], 1)
    with pytest.raises(TypeError, match="layer 1 is a str"):
        split([nn.ReLU(), "relu"], 1)
    layer = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="layer 2 is the same module object as layer 0"):
        split([layer, nn.ReLU(), layer], 2)
    with pytest.raises(ValueError, match="post module 0 is the same module object as layer 1"):
        split([nn.ReLU(), layer], 2, post=layer)
    s = split(linears(4), 2, "parameters")
    with pytest.raises(ValueError, match="add up to 3 layers"):
        s.with_counts([2, 1])


# ---------------------------------------------------------------------- profile


def test_profile_cuts_by_what_it_measured_and_beats_uniform(one_thread, monkeypatch):
    """Four blocks that loop a Linear 10 times, then twelve that run it once: uniform puts
    all four on stage 0; a cut by measured cost spreads them. The profiler's clock counts
    work, so what each layer costs, the cut and the simulated steps are exact (seconds
    measured on this machine are bench/bench_split_profile.py's)."""
    from ppfast.model import profile_units

    work = Work()
    monkeypatch.setattr(profile_units, "_clock", lambda modules, args: work)
    torch.manual_seed(0)
    layers = [Repeat(128, 10, work) for _ in range(4)] + [Repeat(128, 1, work) for _ in range(12)]
    x, y = torch.randn(64, 128), torch.randn(64, 128)
    prof = split(layers, 4, "profile", sample=x, target=y, loss_fn=F.mse_loss)
    # F around the forward, I around the backward (a plain Linear's weight gradient is in I)
    assert prof.layer_times == ((10.0, 10.0, 0.0),) * 4 + ((1.0, 1.0, 0.0),) * 12, prof.describe()
    assert prof.layer_costs == (20.0,) * 4 + (2.0,) * 12
    assert (prof.pre_times, prof.post_times) == (None, (0.0, 0.0, 0.0))
    # No cut's heaviest stage is under 40: with one heavy block per stage, the fourth shares
    # its stage with the twelve light ones (44). Of the cuts at 40 the most even, then the one
    # with longer stages first: two heavy, one, one and a light one, the other eleven.
    assert prof.counts == (2, 1, 2, 11), prof.describe()
    assert prof.stage_costs == (40.0, 20.0, 22.0, 22.0)
    assert prof.stage_times == ((20.0, 20.0, 0.0), (10.0, 10.0, 0.0)) + ((11.0, 11.0, 0.0),) * 2
    # stage costs are the sums of the measured layers, pre/post included
    assert sum(prof.stage_costs) == sum(prof.layer_costs) + prof.post_cost

    uni = prof.with_counts(split(layers, 4).counts)  # same measured layers, uniform cut
    assert uni.counts == (4, 4, 4, 4)
    assert uni.stage_costs == (80.0, 8.0, 8.0, 8.0)
    program = ppfast.generate("1f1b", 4, 8)
    t_prof = ppfast.simulate(program, prof.costs()).makespan
    t_uni = ppfast.simulate(program, uni.costs()).makespan
    print(f"\n{prof}\nsimulated 1F1B step (p=4, m=8), in units of work: profile {t_prof:g}, "
          f"uniform {t_uni:g}, ratio {t_prof / t_uni:.2f}")  # fmt: skip
    # each is bound by its heaviest stage (40 against 80) over the 8 microbatches
    assert t_prof < 0.75 * t_uni


def test_profile_times_split_layers_and_leaves_the_model_as_it_was(one_thread):
    torch.manual_seed(0)
    embed = nn.Linear(16, 32)
    blocks = [
        nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.Dropout(0.5)) for _ in range(4)
    ]
    head = nn.Linear(32, 4)
    ppfast.nn.convert(nn.ModuleList([embed, *blocks, head]))
    for p in head.parameters():
        p.main_grad = torch.zeros(p.shape)
    before = {k: v.clone() for b in blocks for k, v in b.state_dict().items()}
    stats = [b[1].running_mean.clone() for b in blocks]
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    rng = torch.get_rng_state()
    s = split(blocks, 2, "profile", pre=embed, post=head, sample=x, target=y,
              loss_fn=F.cross_entropy, warmup=1, repeats=2)  # fmt: skip
    assert len(s.layer_times) == 4 and s.pre_times is not None and s.post_times is not None
    # split layers defer their weight gradients to W, which is timed apart
    assert all(t[2] > 0 for t in s.layer_times)
    assert s.pre_cost == pytest.approx(sum(s.pre_times))
    for b, mean in zip(blocks, stats, strict=True):
        torch.testing.assert_close(b[1].running_mean, mean, rtol=0, atol=0)
    after = {k: v for b in blocks for k, v in b.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for m in [embed, *blocks, head] for p in m.parameters())
    assert all(not p.main_grad.any() for p in head.parameters())
    assert all(b[0].weight_store is None for b in blocks)
    assert torch.equal(torch.get_rng_state(), rng)
    # profile without a loss_fn starts the backward from the output's mean
    s = split(blocks, 2, "profile", sample=torch.randn(8, 32), warmup=0, repeats=1)
    assert sum(s.counts) == 4 and s.post_times[0] > 0
    with pytest.raises(ValueError, match="leave f, i and w out"):
        s.costs(f=2)


def test_profiled_split_trains_like_one_device(one_thread):
    """The stages of a profiled split, run by ppfast.Pipe under 1F1B, give the one-device
    model's losses and gradients (fp32, rtol 1e-5, atol 1e-6)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), *[Block(32) for _ in range(5)], nn.Linear(32, 16))
    m = 4
    x, y = torch.randn(m * 2, 16), torch.randn(m * 2, 16)
    s = split(model, 2, "profile", sample=x[:2], target=y[:2], loss_fn=F.mse_loss, repeats=2)
    want_losses = []
    for xs, ys in zip(x.chunk(m), y.chunk(m), strict=True):
        loss = F.mse_loss(model(xs), ys)
        want_losses.append(loss.item())
        (loss / m).backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    pipe = ppfast.Pipe(list(s.stages), ["cpu"] * 2, chunks=m, loss_fn=F.mse_loss, timeout=30)
    losses: list = []
    pipe.step(x, target=y, losses=losses)
    assert [float(v) for v in losses] == pytest.approx(want_losses, rel=RTOL, abs=ATOL)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[k], rtol=RTOL, atol=ATOL)
