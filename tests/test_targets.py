"""Every preset on every family people fine-tune: tiny random models (hidden 32, one layer) built from a
transformers config, resolved, wrapped by our own apply_method, trained one step, saved and reloaded."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lora_sweep.config import ModelConfig, method_config
from lora_sweep.errors import ConfigError
from lora_sweep.methods import apply_method
from lora_sweep.models import inspect_model, load_base_model
from lora_sweep.targets import ROLES, head_module_names, linear_module_names, module_role, resolve_targets

VOCAB = 64
PAD, EOS = 0, 2  # every family gets these ids, inside the tiny vocabulary
LABELS = ["negative", "positive"]
PRESETS = ["attention_qv", "attention_all", "mlp", "all_linear"]


def _configs() -> dict[str, object]:
    import transformers as t

    ids = {"vocab_size": VOCAB, "pad_token_id": PAD, "eos_token_id": EOS, "bos_token_id": 1}
    decoder = {
        **ids,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    encoder = {
        **ids,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    }
    return {
        "bert": t.BertConfig(**encoder),
        "roberta": t.RobertaConfig(**encoder),
        "distilbert": t.DistilBertConfig(
            **ids, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_position_embeddings=64
        ),
        "deberta-v2": t.DebertaV2Config(**encoder),
        "albert": t.AlbertConfig(**encoder, embedding_size=16),
        "gpt2": t.GPT2Config(**ids, n_embd=32, n_layer=1, n_head=4, n_positions=64),
        "llama": t.LlamaConfig(**decoder),
        "qwen2": t.Qwen2Config(**decoder),
        "mistral": t.MistralConfig(**decoder),
        "phi3": t.Phi3Config(**decoder),
        "gemma": t.GemmaConfig(**decoder, head_dim=8),
        "bart": t.BartConfig(
            **ids,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            decoder_start_token_id=EOS,
            forced_eos_token_id=None,
            num_labels=2,
        ),
        "t5": t.T5Config(
            **ids, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=PAD
        ),
    }


FAMILIES = list(_configs())
# what each family's new sequence-classification head is called: found by the code, stated here by hand
HEADS = {
    "distilbert": ["pre_classifier", "classifier"],
    "deberta-v2": ["pooler", "classifier"],
    "bart": ["classification_head"],
    "t5": ["classification_head"],
}
DECODERS = {"gpt2", "llama", "qwen2", "mistral", "phi3", "gemma"}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each family's bare model (no task head, like a pretrained checkpoint), saved: config and weights."""
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("families")
    folders = {}
    for family, config in _configs().items():
        torch.manual_seed(0)
        folders[family] = root / family
        AutoModel.from_config(config).save_pretrained(folders[family])
    return folders


@pytest.fixture(scope="session")
def loaded(family_dirs):
    """family -> (spec, base model with a fresh head, loaded once; tests wrap deep copies of it)."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            cfg = ModelConfig(name=family, name_or_path=str(family_dirs[family]))
            spec = inspect_model(cfg)
            torch.manual_seed(0)
            cache[family] = (spec, load_base_model(spec, cfg, LABELS, PAD))
        return cache[family]

    return get


def _batch(family: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 7), generator=generator)
    ids = torch.cat([ids, torch.full((2, 1), EOS)], dim=1)  # BART/T5 classify at the (one) eos token
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}


@pytest.mark.parametrize("family", FAMILIES)
def test_head_is_what_the_task_class_adds(loaded, family):
    spec, _ = loaded(family)
    assert spec.head_names == HEADS.get(family, ["score"] if family in DECODERS else ["classifier"])
    assert spec.linear_names and not any(n.split(".")[0] in spec.head_names for n in spec.linear_names)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_preset_trains_adapters_and_the_head_on_every_family(loaded, tmp_path, family, preset):
    from peft import PeftModel
    from safetensors.torch import load_file

    spec, pristine = loaded(family)
    targets = resolve_targets(preset, spec.linear_names)
    assert targets
    torch.manual_seed(0)
    model = apply_method(copy.deepcopy(pristine), method_config("lora", r=2, targets=preset), spec)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)  # as if trained: with B = 0, A would get a zero gradient
    batch = _batch(family)
    model.train()
    model(**batch).loss.backward()

    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    lora = {name: p for name, p in trainable.items() if "lora_A" in name or "lora_B" in name}
    head = {name: p for name, p in trainable.items() if ".modules_to_save." in name}
    assert set(trainable) == set(lora) | set(head)  # nothing else trains
    assert len(lora) == 2 * len(targets)
    for name, parameter in {**lora, **head}.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    for head_name in spec.head_names:
        assert any(f"{head_name}.modules_to_save." in name for name in head), head_name
    for name, parameter in model.named_parameters():
        if name not in trainable:
            assert parameter.grad is None, name  # the base stays frozen

    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for head_name in spec.head_names:
        assert any(key.startswith(f"base_model.model.{head_name}.") for key in saved), head_name
    torch.manual_seed(1)  # a different fresh head: the saved one must replace it
    reloaded = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, logits)


def test_bart_lora_trains_its_classification_head(loaded):
    spec, pristine = loaded("bart")
    model = apply_method(copy.deepcopy(pristine), method_config("lora", r=4, targets="attention_qv"), spec)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    assert lora == 6 * (4 * 32 + 32 * 4)  # q and v of encoder self-, decoder self- and cross-attention
    head = sum(p.numel() for p in pristine.classification_head.parameters())
    assert head == 32 * 32 + 32 + 32 * 2 + 2 and trainable == lora + head  # before: the head stayed out


def _leaves(names: list[str]) -> set[str]:
    return {".".join(n.split(".")[-2:]) for n in names}


def test_presets_pick_roles_from_leaf_and_parent(loaded):
    gpt2, _ = loaded("gpt2")
    assert _leaves(resolve_targets("attention_qv", gpt2.linear_names)) == {"attn.c_attn"}  # fused qkv
    assert _leaves(resolve_targets("attention_all", gpt2.linear_names)) == {"attn.c_attn", "attn.c_proj"}
    assert _leaves(resolve_targets("mlp", gpt2.linear_names)) == {
        "mlp.c_fc",
        "mlp.c_proj",
    }  # c_proj by its parent
    phi3, _ = loaded("phi3")
    assert _leaves(resolve_targets("attention_qv", phi3.linear_names)) == {"self_attn.qkv_proj"}
    assert _leaves(resolve_targets("mlp", phi3.linear_names)) == {"mlp.gate_up_proj", "mlp.down_proj"}
    bart, _ = loaded("bart")
    attention = resolve_targets("attention_all", bart.linear_names)
    assert len(attention) == 12 and any(
        "encoder_attn.out_proj" in n for n in attention
    )  # cross-attention too
    assert _leaves(resolve_targets("mlp", bart.linear_names)) == {"0.fc1", "0.fc2"}
    assert len(resolve_targets("all_linear", bart.linear_names)) == 16
    t5, _ = loaded("t5")
    assert {n.rsplit(".", 2)[-2] for n in resolve_targets("attention_qv", t5.linear_names)} == {
        "SelfAttention",
        "EncDecAttention",
    }
    assert _leaves(resolve_targets("mlp", t5.linear_names)) == {"DenseReluDense.wi", "DenseReluDense.wo"}
    bert, _ = loaded("bert")
    assert module_role("bert.encoder.layer.0.attention.output.dense") == "o"
    assert module_role("bert.encoder.layer.0.output.dense") == "down"
    assert "bert.pooler.dense" in resolve_targets("all_linear", bert.linear_names)  # as PEFT's all-linear
    assert all(len(row) == 4 for row in ROLES)


def test_conv1d_layers_can_be_named_explicitly(loaded):
    spec, _ = loaded("gpt2")
    assert resolve_targets(["c_attn"], spec.linear_names) == ["transformer.h.0.attn.c_attn"]
    with pytest.raises(
        ConfigError,
        match=r"^method.targets\[1\]='q_proj': no Linear module of the model has this name "
        r"\(names end in: c_attn, c_fc, c_proj\)$",
    ):
        resolve_targets(["c_attn", "q_proj"], spec.linear_names)


def test_a_preset_that_cannot_apply_lists_the_targetable_names(tmp_path):
    from transformers import FNetConfig, FNetModel

    FNetModel(
        FNetConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    ).save_pretrained(tmp_path)
    spec = inspect_model(ModelConfig(name="fnet", name_or_path=str(tmp_path)))
    assert len(resolve_targets("mlp", spec.linear_names)) == 2
    with pytest.raises(
        ConfigError,
        match=r"^method.targets='attention_all': the preset matches no module of this model "
        r"\(targetable modules end in: dense, projection\); give module names instead$",
    ):
        resolve_targets("attention_all", spec.linear_names)


def test_causal_lm_head_is_found_and_stays_frozen(family_dirs):
    cfg = ModelConfig(name="gpt2", name_or_path=str(family_dirs["gpt2"]), task="causal_lm")
    spec = inspect_model(cfg)
    assert spec.head_names == ["lm_head"] and "lm_head" not in spec.linear_names
    model = apply_method(
        load_base_model(spec, cfg, [], PAD), method_config("lora", r=2, targets="all_linear"), spec
    )
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_head_of_a_bare_model_is_empty_and_names_default_to_its_body(family_dirs):
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(family_dirs["deberta-v2"], num_labels=2)
    with torch.device("meta"):
        task, bare = AutoModelForSequenceClassification.from_config(config), AutoModel.from_config(config)
    assert head_module_names(bare) == []
    assert head_module_names(task) == head_module_names(task, bare) == ["pooler", "classifier"]
    assert not any(n.startswith(("pooler", "classifier")) for n in linear_module_names(task))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A two-layer GPT-2 (Conv1D layers) with a word-level tokenizer over the tiny sentiment words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast

    from .conftest import WORDS

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<|endoftext|>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>", pad_token="<pad>"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    GPT2Model(
        GPT2Config(
            vocab_size=len(vocab),
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=2,
        )
    ).save_pretrained(folder)
    return folder


def test_gpt2_run_trains_conv1d_adapters_and_records_them(compose, tiny_overrides, tiny_gpt2_dir):
    from safetensors.torch import load_file

    from lora_sweep.record import read_record
    from lora_sweep.run import run

    cfg = compose(
        *tiny_overrides,
        f"model.name_or_path={tiny_gpt2_dir}",
        "method.targets=all_linear",
        "train.lr=5e-3",
        "tracking=none",
    )
    record = run(cfg)
    on_disk = read_record(cfg.output_dir)
    assert record.status == on_disk["status"] == "completed"
    assert on_disk["params"]["target_modules"] == sorted(
        f"transformer.h.{i}.{m}"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    assert on_disk["metrics"]["best_val_accuracy"] >= 0.75  # the task is learnable: the adapters really train
    saved = load_file(Path(on_disk["checkpoints"]["best"]) / "adapter_model.safetensors")
    assert any(".c_attn.lora_A." in key for key in saved) and any(
        key.startswith("base_model.model.score.") for key in saved
    )


def test_modules_to_save_that_match_no_module_are_one_line(compose, tiny_overrides):
    """PEFT skips a modules_to_save name that matches nothing, so the module would silently stay frozen."""
    from lora_sweep.errors import ConfigError
    from lora_sweep.prepare import prepare

    bad = compose(*tiny_overrides, "method.modules_to_save=[embeddings.word_embeddings,nope]")
    with pytest.raises(ConfigError, match=r"^method.modules_to_save\[1\]='nope': no module of the model"):
        prepare(bad)
    good = prepare(compose(*tiny_overrides, "method.modules_to_save=[embeddings.word_embeddings]"))
    assert "bert.embeddings.word_embeddings" in good.spec.module_names
