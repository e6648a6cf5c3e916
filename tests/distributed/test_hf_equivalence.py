"""transformers causal LMs cut by ppfast.hf.split, trained on 2 gloo ranks, match the model
trained on one device.

One group of 2 ranks runs everything in turn: for each architecture (Llama, Mistral, Qwen2,
Gemma 2 and Gemma 3 text with sliding windows, GPT-2), under 1F1B, ZB-H1 (2 stages) and
ZB-V (4 stages, 2 per rank in the V placement), m = 4, with and without a padding mask,
with the layers as they are and converted by ppfast.nn.convert (Linear, GPT-2's Conv1D):
3 AdamW steps. The parent trains the same model on one device with ``model(input_ids,
attention_mask=..., labels=...)`` over the whole batch and compares, fp32, rtol 1e-5 and
atol 1e-6: the step's loss (the mean of the microbatch losses without padding, under
ppfast.hf.causal_lm_loss; their sum with padding, under the token-weighted loss), every
gradient at every step, and the parameters after the last step. Each architecture's last
run is saved with ppfast.checkpoint; gathered, it loads strictly into a fresh model, which
gives the trained model's logits and survives save_pretrained.
"""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import ARCHS, batch, build  # noqa: E402
from ranks import run_once, run_ranks  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
M, BATCH, STEPS, LR = 4, 8, 3, 1e-3
SCHEDULES = ("1f1b", "zb-h1", "zb-v")
CONFIGS = [
    (schedule, padded, convert)
    for schedule in SCHEDULES
    for padded in (False, True)
    for convert in (False, True)
]
SAVED = CONFIGS[-1]  # the run whose stages are saved: ZB-V, padded, converted


def optimizer(params):
    # eps well above its default: Adam divides by the gradient's own size, so where a
    # gradient is far below eps (a rare token's embedding row) a rounding-level difference
    # between the runs (which add the same terms in another order: microbatches against the
    # whole batch) moves the parameter by up to lr * difference / eps
    return torch.optim.AdamW(params, lr=LR, eps=1e-4, weight_decay=0.01)


def named(model, what: str) -> dict:
    """Every parameter's value or gradient by every name it has (a tied weight: both)."""
    return {
        n: (p.grad if what == "grad" else p).detach().clone()
        for n, p in model.named_parameters(remove_duplicate=False)
    }


# ---------------------------------------------------------------------------- on the ranks


def train(rank: int, arch: str, schedule: str, padded: bool, convert: bool, save_to) -> dict:
    import ppfast
    import ppfast.hf

    n = 4 if schedule == "zb-v" else 2
    placement = ppfast.v_placement(2) if schedule == "zb-v" else ppfast.loop_placement(2)
    mine = [s for s, r in enumerate(placement) if r == rank]
    model = build(arch)
    cut = ppfast.hf.split(model, n)
    stages = []
    for s in mine:
        if convert:
            ppfast.nn.convert(cut.stages[s])
        stages.append(ppfast.PipelineStage(cut.stages[s], s, n, "cpu", tied=cut.tied[s]))
    loss_fn = ppfast.hf.CausalLMLoss(weighting="tokens" if padded else "microbatch")
    cls = ppfast.get_schedule_class(schedule)
    sched = cls(stages if len(stages) > 1 else stages[0], M, loss_fn=loss_fn, timeout=60.0)
    params = list({id(p): p for s in mine for p in cut.stages[s].parameters()}.values())
    opt = optimizer(params)
    out = {"losses": [], "grads": []}
    for step in range(STEPS):
        b = batch(BATCH, step, padded)
        kwargs = {"attention_mask": b["attention_mask"]} if padded else {}
        opt.zero_grad()
        losses: list = []
        args = (b["input_ids"],) if 0 in mine else ()
        sched.step(*args, target=b["labels"] if n - 1 in mine else None, losses=losses, **kwargs)
        out["losses"].append([float(x) for x in losses])
        grads = {}
        for s in mine:
            for name, p in cut.stages[s].named_parameters(remove_duplicate=False):
                grads[name] = p.grad.detach().clone()
        out["grads"].append(grads)
        opt.step()
    out["params"] = {
        name: p.detach().clone()
        for s in mine
        for name, p in cut.stages[s].named_parameters(remove_duplicate=False)
    }
    if save_to is not None:
        ppfast.checkpoint.save(save_to, sched, opt, step=STEPS)
    return out


def train_all(rank: int, world: int, saves: dict) -> dict:
    results = {}
    for arch in ARCHS:
        for cfg in CONFIGS:
            try:
                results[(arch, *cfg)] = train(rank, arch, *cfg, saves.get((arch, *cfg)))
            except Exception as e:
                raise RuntimeError(f"rank {rank}: {arch}, (schedule, padded, convert) {cfg}") from e
    return results


# ---------------------------------------------------------------------------- one device


@functools.cache
def reference(arch: str, padded: bool) -> dict:
    """The whole batch through the whole model: HF's own loss, AdamW, 3 steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build(arch)
        opt = optimizer(model.parameters())
        out = {"loss": [], "mb_losses": [], "grads": []}
        for step in range(STEPS):
            b = batch(BATCH, step, padded)
            opt.zero_grad()
            loss = model(**b).loss
            loss.backward()
            out["loss"].append(loss.item())
            with torch.no_grad():
                ids, labels = b["input_ids"].chunk(M), b["labels"].chunk(M)
                masks = b["attention_mask"].chunk(M) if padded else [None] * M
                out["mb_losses"].append(
                    [
                        model(i, attention_mask=a, labels=y).loss.item()
                        for i, a, y in zip(ids, masks, labels, strict=True)
                    ]
                )
            out["grads"].append(named(model, "grad"))
            opt.step()
        out["params"] = named(model, "param")
        out["model"] = model
        return out
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- the checks


@pytest.fixture(scope="module")
def group_run(tmp_path_factory):
    """Every architecture and configuration on one group of 2 ranks, run on first use."""
    root = tmp_path_factory.mktemp("hf-ckpt")
    saves = {(arch, *SAVED): str(root / arch) for arch in ARCHS}

    def build_all():
        per_rank = run_ranks(train_all, 2, saves, timeout=300.0)
        merged = {}
        for key in per_rank[0]:
            parts = [r[key] for r in per_rank]
            holder = next(p for p in parts if p["losses"][0])
            grads = [{k: v for p in parts for k, v in p["grads"][s].items()} for s in range(STEPS)]
            merged[key] = {
                "losses": holder["losses"],
                "grads": grads,
                "params": {k: v for p in parts for k, v in p["params"].items()},
            }
        return merged, saves

    return run_once(build_all)


def _close(got, want, what):
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda e: f"{what}: {e}")


@pytest.mark.parametrize("convert", [False, True], ids=["plain", "converted"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_one_device(group_run, arch, schedule, padded, convert):
    got = group_run()[0][(arch, schedule, padded, convert)]
    want = reference(arch, padded)
    for step in range(STEPS):
        losses = torch.tensor(got["losses"][step], dtype=torch.float64)
        assert len(losses) == M
        batch_loss = losses.sum() if padded else losses.mean()
        _close(batch_loss, torch.tensor(want["loss"][step], dtype=torch.float64), f"step {step}")
        if not padded:  # each microbatch's own mean is the model's loss on that microbatch
            _close(losses, torch.tensor(want["mb_losses"][step], dtype=torch.float64), "mb")
        grads = got["grads"][step]
        assert sorted(grads) == sorted(want["grads"][step])
        for name, g in want["grads"][step].items():
            _close(grads[name], g, f"step {step} grad {name}")
    assert sorted(got["params"]) == sorted(want["params"])
    for name, p in want["params"].items():
        _close(got["params"][name], p, f"after {STEPS} steps: {name}")


@pytest.mark.parametrize("arch", ARCHS)
def test_gathered_checkpoint_loads_into_the_model(group_run, arch, tmp_path):
    import ppfast

    path = group_run()[1][(arch, *SAVED)]
    full = ppfast.checkpoint.gather(path)
    fresh = build(arch, seed=1)
    fresh.load_state_dict(full, strict=True)
    trained = reference(arch, SAVED[1])["model"]
    b = batch(BATCH, STEPS, padded=True)
    with torch.no_grad():
        want = trained(b["input_ids"], attention_mask=b["attention_mask"]).logits
        _close(fresh(b["input_ids"], attention_mask=b["attention_mask"]).logits, want, "logits")
        fresh.save_pretrained(tmp_path / "hf")
        again = type(fresh).from_pretrained(tmp_path / "hf").float()
        _close(again(b["input_ids"], attention_mask=b["attention_mask"]).logits, want, "reloaded")
