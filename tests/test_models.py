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


# --- bad model folders: one line naming model.name_or_path, before any weight is read (issue 12) --------


def _model_copy(source, tmp_path):
    import shutil

    folder = tmp_path / "model_copy"
    shutil.copytree(source, folder)
    return folder


def _problem(folder) -> str:
    with pytest.raises(ConfigError) as caught:
        _spec(folder)
    message = str(caught.value)
    assert message.startswith(f"model.name_or_path={str(folder)!r}: "), message
    assert "\n" not in message
    return message.split(": ", 1)[1]


def test_corrupt_config_json_is_one_line(tiny_bert_dir, tmp_path):
    folder = _model_copy(tiny_bert_dir, tmp_path)
    (folder / "config.json").write_text('{"model_type": "bert",\n "hidden_size": 32,,\n}')
    assert _problem(folder).startswith("config.json is not valid JSON (line 2, column")


def test_config_json_without_model_type_is_one_line(tiny_bert_dir, tmp_path):
    import json

    folder = _model_copy(tiny_bert_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    assert _problem(folder).startswith("config.json has no model_type")


def test_truncated_safetensors_is_found_from_its_header(tiny_bert_dir, tmp_path):
    folder = _model_copy(tiny_bert_dir, tmp_path)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as handle:
        handle.truncate(size // 2)
    problem = _problem(folder)
    assert problem.startswith(f"model.safetensors is truncated: {size // 2:,} bytes of the {size:,}"), problem
    weights.write_bytes(b"\x00" * 4)
    assert _problem(folder).startswith("model.safetensors is not a safetensors file")


def test_position_limit_comes_from_the_learned_position_table(tmp_path):
    """BERT's table has max_position_embeddings rows, RoBERTa's two fewer usable ones (positions start after
    padding_idx), GPT-2's n_positions; a rotary model (Llama) has no table, so no hard limit."""
    from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig

    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64}
    configs = {
        "bert": (BertConfig(max_position_embeddings=40, **small), 40),
        "roberta": (RobertaConfig(max_position_embeddings=42, pad_token_id=1, **small), 40),
        "gpt2": (GPT2Config(n_positions=40, n_embd=32, n_layer=1, n_head=4), 40),
        "llama": (LlamaConfig(max_position_embeddings=40, num_key_value_heads=4, **small), None),
    }
    for name, (config, limit) in configs.items():
        config.save_pretrained(tmp_path / name)  # config.json alone: inspect_model reads no weight
        spec = _spec(tmp_path / name)
        assert spec.position_limit == limit, name
        assert spec.trained_positions == (42 if name == "roberta" else 40), name


def test_corrupt_tokenizer_files_are_one_line(tiny_bert_dir, tmp_path):
    folder = _model_copy(tiny_bert_dir, tmp_path)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "truncation"')
    assert _problem(folder).startswith("tokenizer.json is not valid JSON (line 1, column 32")


def test_a_tokenizer_that_does_not_load_is_one_line(tiny_bert_dir, tmp_path):
    folder = _model_copy(tiny_bert_dir, tmp_path)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    cfg = ModelConfig(name="tiny", name_or_path=str(folder))
    with pytest.raises(ConfigError) as caught:
        load_tokenizer(inspect_model(cfg), cfg)
    message = str(caught.value)
    assert message.startswith(f"model.name_or_path={str(folder)!r}: its tokenizer does not load (") and (
        "\n" not in message
    ), message


def test_a_file_that_is_not_gguf_is_one_line(tmp_path):
    folder = tmp_path / "gguf_model"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF" + b"\x07" * 200)  # the magic, then nothing valid
    cfg = ModelConfig(
        name="g", name_or_path=str(folder), gguf_file="model.gguf", cache_dir=str(tmp_path / "cache")
    )
    with pytest.raises(ConfigError) as caught:
        inspect_model(cfg)
    message = str(caught.value)
    assert message.startswith("model.gguf_file='model.gguf': cannot be converted (") and "\n" not in message
    assert not list((tmp_path / "cache" / "models").glob("*/"))  # no half-converted folder left
