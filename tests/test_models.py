"""Target presets on real module names, and the LoRA properties PEFT must give us."""

from __future__ import annotations

import pytest
import torch

from lora_sweep.config import ModelConfig, method_config
from lora_sweep.errors import ConfigError
from lora_sweep.methods import apply_method
from lora_sweep.models import count_parameters, inspect_model, load_base_model, load_tokenizer
from lora_sweep.targets import resolve_targets


def _spec(folder):
    return inspect_model(ModelConfig(name="tiny", name_or_path=str(folder)))


def test_presets_on_bert_like_names(tiny_bert_dir):
    spec = _spec(tiny_bert_dir)
    assert spec.family == "bert"
    qv = resolve_targets("attention_qv", spec.linear_names)
    assert qv == sorted(
        f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")
    )
    attention = resolve_targets("attention_all", spec.linear_names)
    assert len(attention) == 8 and all(".attention." in name for name in attention)
    mlp = resolve_targets("mlp", spec.linear_names)
    assert sorted(n.split(".", 4)[-1] for n in mlp) == sorted(["intermediate.dense", "output.dense"] * 2)
    everything = resolve_targets("all_linear", spec.linear_names)
    # PEFT's all-linear: the pretrained pooler is in, the new task head is out
    assert set(everything) == set(attention) | set(mlp) | {"bert.pooler.dense"}
    assert not any("classifier" in n for n in everything) and spec.head_names == ["classifier"]


def test_presets_on_llama_like_names(tiny_llama_dir):
    spec = _spec(tiny_llama_dir)
    assert spec.family == "llama"
    assert resolve_targets("attention_qv", spec.linear_names) == sorted(
        f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")
    )
    assert len(resolve_targets("attention_all", spec.linear_names)) == 8
    assert {n.rsplit(".", 1)[-1] for n in resolve_targets("mlp", spec.linear_names)} == {
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert len(resolve_targets("all_linear", spec.linear_names)) == 14
    assert "score" not in " ".join(spec.linear_names)


def test_explicit_names_match_by_suffix(tiny_bert_dir):
    spec = _spec(tiny_bert_dir)
    assert len(resolve_targets(["query", "attention.output.dense"], spec.linear_names)) == 4
    with pytest.raises(ConfigError, match=r"method.targets\[0\]='c_attn'"):
        resolve_targets(["c_attn"], spec.linear_names)


def _model(folder, method):
    torch.manual_seed(0)
    cfg = ModelConfig(name="tiny", name_or_path=str(folder))
    spec = inspect_model(cfg)
    tokenizer = load_tokenizer(spec, cfg)
    base = load_base_model(spec, cfg, ["negative", "positive"], tokenizer.pad_token_id)
    batch = tokenizer(["the movie was good", "a dull boring film"], return_tensors="pt", padding=True)
    base.eval()
    with torch.no_grad():
        base_logits = base(**batch).logits.clone()
    model = apply_method(base, method, spec)
    model.eval()
    return model, batch, base_logits


@pytest.mark.parametrize("folder_fixture", ["tiny_bert_dir", "tiny_llama_dir"])
def test_lora_starts_as_a_no_op_and_freezes_the_base(request, folder_fixture):
    model, batch, base_logits = _model(
        request.getfixturevalue(folder_fixture), method_config("lora", r=4, targets="all_linear")
    )
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base_logits)  # B = 0: exactly the base model
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "modules_to_save" in name for name in trainable)
    assert any("lora_A" in name for name in trainable) and any(
        "modules_to_save" in name for name in trainable
    )
    counts = count_parameters(model)
    assert 0 < counts["trainable_ratio"] < 0.5


def test_merged_weights_give_the_adapter_logits(tiny_bert_dir):
    model, batch, base_logits = _model(tiny_bert_dir, method_config("lora", r=4, targets="attention_all"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)  # as if trained: the adapter now changes the output
        adapted = model(**batch).logits.clone()
        assert not torch.allclose(adapted, base_logits, atol=1e-4)
        merged = model.merge_and_unload()
        assert not any("lora_" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**batch).logits, adapted, atol=1e-5, rtol=1e-4)


def test_variants_reach_peft(tiny_bert_dir):
    model, _, _ = _model(
        tiny_bert_dir, method_config("lora", r=16, alpha=32, alpha_ratio=None, variant="rslora")
    )
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert layer.scaling["default"] == pytest.approx(32 / 4)
    model, _, _ = _model(tiny_bert_dir, method_config("lora", r=4, variant="dora"))
    assert any("lora_magnitude_vector" in name for name, p in model.named_parameters() if p.requires_grad)


def test_full_method_trains_everything(tiny_bert_dir):
    model, _, _ = _model(tiny_bert_dir, method_config("full"))
    assert all(p.requires_grad for p in model.parameters())
    assert count_parameters(model)["trainable_ratio"] == 1.0
