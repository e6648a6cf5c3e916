"""ppfast.hf.split in one process: the stages keep the model's names, chained they give the
model's logits (padding, position ids, sliding windows and all), the tied head is declared,
the loss is the model's own, uncuttable models are refused saying why, and ppfast.hf says
how to install transformers when it is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import ppfast  # noqa: E402
import ppfast.hf  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
from hf_models import ALL_ARCHS, SEQ, batch, build  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
TIED = {"llama-tied", "gemma2", "gemma3", "gpt2"}

pytestmark = pytest.mark.usefixtures("one_thread")


def chained(stages, ids, **kwargs):
    out = stages[0](ids, **kwargs)
    for st in stages[1:]:
        out = st(*out)
    return out


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_stages_keep_the_model_names_and_give_its_logits(arch):
    model = build(arch)
    s = ppfast.hf.split(model, 3)
    assert isinstance(s, ppfast.Split) and s.num_stages == 3
    keys = [list(st.state_dict()) for st in s.stages]
    assert sorted({k for part in keys for k in part}) == sorted(model.state_dict())
    base, layers = s.plan.base_attr, s.plan.layers
    for st, part in zip(s.stages, keys, strict=True):
        own = {f"{base}.{layers}.{i}." for i in range(st.first, st.last)}
        lay = [k for k in part if k.startswith(f"{base}.{layers}.")]
        assert all(any(k.startswith(o) for o in own) for k in lay), (st, lay)
    b = batch(4, 0, padded=True)
    pos = torch.arange(SEQ).expand(4, SEQ) + 2
    for kwargs in ({}, {"attention_mask": b["attention_mask"]}, {"position_ids": pos}):
        with torch.no_grad():
            want = model(b["input_ids"], **kwargs).logits
            got = chained(s.stages, b["input_ids"], **kwargs)
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_tied_head_is_declared_once(arch):
    model = build(arch)
    s = ppfast.hf.split(model, 2)
    if arch not in TIED:
        assert s.tied == ({}, {})
        return
    (key,) = s.tied[0]
    assert s.tied[1].keys() == {key}
    assert s.tied[0][key] is s.tied[1][key] is model.get_input_embeddings().weight
    # one stage holds both: one parameter, nothing to tie
    assert ppfast.hf.split(model, 1).tied == ({},)


def test_gradients_flow_through_chained_stages():
    model = build("llama-tied")
    b = batch(2, 0, padded=True)
    model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    s = ppfast.hf.split(model, 4, "uniform")
    logits = chained(s.stages, b["input_ids"], attention_mask=b["attention_mask"])
    ppfast.hf.causal_lm_loss(logits, b["labels"]).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=RTOL, atol=ATOL, msg=n)


@pytest.mark.parametrize("method", ["uniform", "parameters", "type:DecoderLayer", "profile"])
def test_methods_of_ppfast_split(method):
    model = build("llama")
    b = batch(2, 0, padded=False)
    extra = {}
    if method == "profile":
        extra = {"sample": b["input_ids"], "target": b["labels"], "repeats": 1}
    s = ppfast.hf.split(model, 2, method, **extra)
    assert sum(s.counts) == 4 and len(s.stage_costs) == 2
    assert s.method == method and "stage" in s.describe()
    with torch.no_grad():
        torch.testing.assert_close(
            chained(s.stages, b["input_ids"]), model(b["input_ids"]).logits, rtol=RTOL, atol=ATOL
        )
    again = s.with_counts([1, 3])
    assert isinstance(again, ppfast.hf.HFSplit) and again.counts == (1, 3)
    assert [(st.first, st.last) for st in again.stages] == [(0, 1), (1, 4)]
    with torch.no_grad():
        torch.testing.assert_close(
            chained(again.stages, b["input_ids"]), model(b["input_ids"]).logits, rtol=RTOL,
            atol=ATOL,
        )  # fmt: skip
    counted = ppfast.hf.split(model, counts=[3, 1])
    assert counted.counts == (3, 1)


def test_causal_lm_loss_is_the_models_loss():
    model = build("qwen2")
    b = batch(4, 1, padded=True)
    out = model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    with torch.no_grad():
        torch.testing.assert_close(ppfast.hf.causal_lm_loss(out.logits, b["labels"]), out.loss)
        # token weighting: microbatch shares of the batch's count add up to the batch's mean
        by_tokens = ppfast.hf.CausalLMLoss(weighting="tokens")
        parts = list(zip(out.logits.chunk(4), b["labels"].chunk(4), strict=True))
        kw = by_tokens.batch_kwargs([y for _, y in parts])
        assert int(kw["num_items_in_batch"]) == int(ppfast.hf.count_tokens(b["labels"]))
        total = sum(by_tokens(x, y, **kw) for x, y in parts)
        torch.testing.assert_close(total, out.loss)
        # the microbatch mean of means differs here: the microbatches count different tokens
        means = sum(ppfast.hf.causal_lm_loss(x, y) for x, y in parts) / 4
        assert not torch.allclose(means, out.loss)
    assert ppfast.hf.causal_lm_loss.batch_kwargs([b["labels"]]) is None
    with pytest.raises(ValueError, match="weighting"):
        ppfast.hf.CausalLMLoss(weighting="samples")


def test_checkpoint_names_are_the_full_models():
    model = build("gpt2")
    s = ppfast.hf.split(model, 3)
    names = [lay.names for lay in ppfast.checkpoint.layouts(list(s.stages))]
    assert all(k == v for part in names for k, v in part.items())
    merged = {k: v for st in s.stages for k, v in st.state_dict().items()}
    fresh = build("gpt2", seed=1)
    fresh.load_state_dict(merged, strict=True)
    ids = batch(2, 0, padded=False)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits)


def test_convert_reaches_the_model_and_the_stages():
    model = build("gpt2")
    s = ppfast.hf.split(model, 2)
    for st in s.stages:
        ppfast.nn.convert(st)
    split_layers = [m for m in model.modules() if isinstance(m, ppfast.nn.SplitLayer)]
    assert len(split_layers) == 4 * 4 + 1  # c_attn, c_proj, c_fc, mlp c_proj per block; head
    assert model.lm_head.weight is model.transformer.wte.weight


# ---------------------------------------------------------------------------- refusals


def _custom(model_type: str, plan, layer_returns_tuple: bool = False, extra_child=False):
    import transformers as tf

    class Config(tf.PretrainedConfig):
        pass

    Config.model_type = model_type
    Config.base_model_pp_plan = plan

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, hidden_states, **kwargs):
            out = self.fc(hidden_states)
            return (out, out.sum()) if layer_returns_tuple else out

    class Base(tf.PreTrainedModel):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            self.embed = nn.Embedding(16, 8)
            self.layers = nn.ModuleList([Layer(), Layer()])
            if extra_child:
                self.adapter = nn.Linear(8, 8)
            self.post_init()

        def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
            h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
            for layer in self.layers:
                out = layer(h)
                h = out[0] if isinstance(out, tuple) else out
            return tf.modeling_outputs.BaseModelOutput(last_hidden_state=h)

    class LM(tf.PreTrainedModel):
        config_class = Config
        base_model_prefix = "model"
        _pp_plan = {"head": (["hidden_states"], ["logits"])}

        def __init__(self, config):
            super().__init__(config)
            self.model = Base(config)
            self.head = nn.Linear(8, 16)
            self.post_init()

        def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
            h = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds).last_hidden_state
            return tf.modeling_outputs.CausalLMOutput(logits=self.head(h))

    return LM(Config()), Base


PLAN = {"embed": (["input_ids"], ["inputs_embeds"]), "layers": (["hidden_states"], [])}


def test_a_custom_model_with_a_plan_is_cut():
    model, _ = _custom("ppfast-test-ok", PLAN)
    s = ppfast.hf.split(model, 2)
    ids = torch.randint(0, 16, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(chained(s.stages, ids), model(ids).logits)


def test_refusals_say_what_is_missing():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        ppfast.hf.split(nn.Linear(2, 2), 2)
    model, base_cls = _custom("ppfast-test-noplan", None)
    with pytest.raises(ValueError, match="no base_model_pp_plan.*ppfast-test-noplan"):
        ppfast.hf.split(model, 2)
    with pytest.raises(ValueError, match="no base model under a head"):
        ppfast.hf.split(build("llama").model, 2)
    model, _ = _custom("ppfast-test-nolayers", {"embed": ([], [])})
    with pytest.raises(ValueError, match="exactly one nn.ModuleList"):
        ppfast.hf.split(model, 2)
    model, _ = _custom("ppfast-test-extra", PLAN, extra_child=True)
    with pytest.raises(ValueError, match=r"children \['adapter'\] with parameters"):
        ppfast.hf.split(model, 2)
    model, _ = _custom("ppfast-test-tuple", PLAN, layer_returns_tuple=True)
    s = ppfast.hf.split(model, 2)
    with pytest.raises(ValueError, match="returns tuple, not the hidden states alone"):
        chained(s.stages, torch.randint(0, 16, (2, 5)))
    with pytest.raises(TypeError, match="leave pre= out"):
        ppfast.hf.split(build("llama"), 2, pre=nn.Linear(2, 2))


def test_without_transformers_import_says_how_to_install(monkeypatch):
    for name in list(sys.modules):
        if name == "ppfast.hf" or name.startswith("ppfast.hf."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"pip install ppfast\[hf\]"):
        import ppfast.hf  # noqa: F401


def test_hf_extra_pulls_in_transformers():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["hf"]
    assert any(req.replace(" ", "").startswith("transformers>=5") for req in extra), extra


def test_import_ppfast_does_not_import_transformers(tmp_path):
    code = "import sys, ppfast; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120)
