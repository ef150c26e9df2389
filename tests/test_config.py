"""Bad values fail early with one line naming the key and the value; good configs compose."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lora_sweep.config import RunConfig, method_config
from lora_sweep.errors import ConfigError
from lora_sweep.run import prepare

from .helpers import write_csv


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("method.r=0", "method.r=0", "must be a positive integer"),
        ("method.r=-4", "method.r=-4", "must be a positive integer"),
        ("method.r=8.5", "method.r=8.5", "expected an integer"),
        ("method.alpha=0", "method.alpha=0.0", "must be > 0"),
        ("method.alpha_ratio=-2", "method.alpha_ratio=-2.0", "must be > 0"),
        ("method.dropout=1.0", "method.dropout=1.0", "must be in [0, 1)"),
        ("method.dropout=-0.1", "method.dropout=-0.1", "must be in [0, 1)"),
        ("method.targets=attn", "method.targets='attn'", "must be one of attention_qv"),
        ("method.targets=[]", "method.targets=[]", "adapts nothing"),
        ("method.variant=vera", "method.variant='vera'", "must be one of lora, rslora, dora"),
        ("method.init=loftq", "method.init='loftq'", "must be one of default"),
        ("train.lr=0", "train.lr=0.0", "must be > 0"),
        ("train.lr=abc", "train.lr='abc'", "expected a number"),
        ("train.batch_size=0", "train.batch_size=0", "must be > 0"),
        ("train.max_length=0", "train.max_length=0", "must be > 0"),
        ("train.scheduler=step", "train.scheduler='step'", "must be one of linear"),
        ("train.precision=fp8", "train.precision='fp8'", "must be one of auto"),
        ("train.device=tpu", "train.device='tpu'", "must be auto, cpu"),
        ("data.split.test=0.0", "data.split.test=0.0", "strictly between 0 and 1"),
        ("data.split.validation=0.9", "data.split.test=0.15", "leaves no training data"),
        ("objective.metric=bleu", "objective.metric='bleu'", "must be one of accuracy"),
        ("+method.rank=8", "method.rank=8", "unknown key"),
    ],
)
def test_bad_value_names_key_and_value(compose, override, key, fragment):
    with pytest.raises(ConfigError) as caught:
        compose(override)
    message = str(caught.value)
    assert message.startswith(key + ":"), message
    assert fragment in message
    assert "\n" not in message


def test_defaults_compose_and_tie_alpha_to_rank(compose):
    cfg = compose()
    assert isinstance(cfg, RunConfig) and cfg.method.name == "lora" and cfg.method.adapter
    assert cfg.method.r == 8 and cfg.method.effective_alpha == 16 and cfg.method.scaling == 2
    assert cfg.train.lr == pytest.approx(2e-3)  # LoRA's own default, not full FT's
    cfg = compose("method.r=64")
    assert cfg.method.effective_alpha == 128  # alpha follows r through alpha_ratio
    cfg = compose("method.r=64", "method.alpha=16")
    assert cfg.method.effective_alpha == 16  # an explicit alpha wins


def test_full_method_has_its_own_learning_rate(compose):
    cfg = compose("method=full")
    assert cfg.method.name == "full" and not cfg.method.adapter
    assert cfg.train.lr == pytest.approx(1e-4)
    assert compose("method=full", "train.lr=3e-5").train.lr == pytest.approx(3e-5)


def test_rslora_scaling_uses_sqrt_rank():
    method = method_config("lora", r=16, alpha=32, alpha_ratio=None, variant="rslora")
    assert method.scaling == pytest.approx(32 / 4)


def test_every_config_file_composes(compose, tiny_bert_dir, tiny_csv):
    conf = Path(__file__).resolve().parent.parent / "conf"
    needs = {"model": [f"model.name_or_path={tiny_bert_dir}"], "data": [f"data.path={tiny_csv}"]}
    for group_dir in sorted(p for p in conf.iterdir() if p.is_dir()):
        for option in sorted(group_dir.glob("*.yaml")):
            overrides = [f"{group_dir.name}={option.stem}"]
            if option.stem in ("local", "hub", "instruction", "text"):
                overrides += needs.get(group_dir.name, [])
            if group_dir.name == "data" and option.stem in ("chatterbot", "instruction", "text"):
                overrides.append("model=smollm2_135m")  # causal-LM data: MiniLM, an encoder, is refused
            cfg = compose(*overrides)
            assert isinstance(cfg, RunConfig), option


# Problems that need the model's or the data's own description: still caught before any weight loads.


def test_preset_matching_no_module_of_the_model(compose, tmp_path, tiny_csv):
    from transformers import FNetConfig, FNetModel

    from .helpers import WORDS

    folder = tmp_path / "tiny_fnet"  # FNet mixes tokens by a Fourier transform: it has no attention layer
    FNetModel(
        FNetConfig(
            vocab_size=len(WORDS) + 5,
            hidden_size=32,
            num_hidden_layers=1,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    ).save_pretrained(folder)
    cfg = compose(  # the preset named: the default (all_linear) matches FNet's dense layers
        "model=local",
        f"model.name_or_path={folder}",
        "data=local",
        f"data.path={tiny_csv}",
        "method.targets=attention_qv",
    )
    with pytest.raises(ConfigError, match=r"^method.targets='attention_qv': the preset matches no module"):
        prepare(cfg)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("method.targets=[query,q_proj]", r"^method.targets\[1\]='q_proj': no Linear module"),
        (
            "model.name_or_path={tmp}/no_such_model",
            r"^model.name_or_path='.*no_such_model': no such model folder",
        ),
        (
            "model.name_or_path=nobody-here/not-a-model",
            r"^model.name_or_path='nobody-here/not-a-model': not a local folder, not in the Hugging Face "
            r"cache",
        ),
        (
            "data.text_column=nope",
            r"^data.text_column='nope': no such column in the train split \(columns: text, label\)",
        ),
        (
            "data.label_column=nope",
            r"^data.label_column='nope': no such column in the train split \(columns: text, label\)",
        ),
        ("data.path={tmp}/missing.csv", r"^data.path='.*missing.csv': no such file or folder"),
    ],
)
def test_problem_found_before_any_weight_loads(compose, tiny_overrides, tmp_path, override, pattern):
    cfg = compose(*tiny_overrides, override.format(tmp=tmp_path))
    with pytest.raises(ConfigError, match=pattern):
        prepare(cfg)


def test_empty_split(compose, tiny_overrides, tmp_path):
    from .helpers import sentiment_rows

    folder = tmp_path / "splits"
    folder.mkdir()
    write_csv(folder / "train.csv", sentiment_rows(40))
    write_csv(folder / "validation.csv", sentiment_rows(10))
    write_csv(folder / "test.csv", [])
    cfg = compose(*tiny_overrides, f"data.path={folder}")
    with pytest.raises(ConfigError, match=r"^data.path=.*splits.: the test split is empty"):
        prepare(cfg)


def test_more_labels_than_the_model_has(compose, tiny_overrides, tmp_path):
    rows = [(f"good movie {i}", ["positive", "negative", "neutral"][i % 3]) for i in range(60)]
    path = write_csv(tmp_path / "three.csv", rows)
    cfg = compose(*tiny_overrides, f"data.path={path}", "model.num_labels=2")
    with pytest.raises(
        ConfigError, match=r"^data.label_column='label': holds 3 labels .* but model.num_labels=2"
    ):
        prepare(cfg)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("method.r=0", "error: method.r=0: must be a positive integer"),
        ("method.dropout=1.5", "error: method.dropout=1.5: must be in [0, 1)"),
        ("model=local", "error: model.name_or_path='???': missing required value"),
        ("data.label_column=stars", "error: data.label_column='stars': no such column"),
    ],
)
def test_command_line_exits_with_one_line(tmp_path, override, expected):
    """The real entry point: exit code 2, one line on stderr, nothing recorded in MLflow."""
    result = subprocess.run(
        [sys.executable, "-m", "lora_sweep", override],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("train.seed=-1", "train.seed=-1", "must be >= 0"),
        ("train.seed=4294967296", "train.seed=4294967296", "must be < 2**32"),
        ("data.split.seed=-3", "data.split.seed=-3", "must be >= 0"),
        ("train.num_workers=-1", "train.num_workers=-1", "must be >= 0"),
        ("train.eval_every=-1", "train.eval_every=-1", "must be >= 0"),
        ("train.max_steps=0", "train.max_steps=0", "must be > 0"),
        ("train.grad_accum=0", "train.grad_accum=0", "must be > 0"),
        ("train.log_every=0", "train.log_every=0", "must be > 0"),
        ("train.epochs=0", "train.epochs=0", "must be > 0"),
        ("train.eval_batch_size=-2", "train.eval_batch_size=-2", "must be > 0"),
    ],
)
def test_every_integer_of_the_train_config_is_range_checked(compose, override, key, fragment):
    with pytest.raises(ConfigError) as caught:
        compose(override)
    assert str(caught.value).startswith(key + ":") and fragment in str(caught.value), str(caught.value)


def test_max_length_above_a_learned_position_table(compose, tiny_overrides, tiny_bert_dir):
    """The tiny BERT has 64 learned positions: 100 tokens would crash in the forward pass."""
    with pytest.raises(ConfigError) as caught:
        prepare(compose(*tiny_overrides, "train.max_length=100"))
    assert str(caught.value) == (
        "train.max_length=100: above the model's 64 positions (a learned position table, "
        "max_position_embeddings=64); set train.max_length=64 or less"
    )
    assert prepare(compose(*tiny_overrides, "train.max_length=64")).spec.position_limit == 64


def test_max_length_past_a_rotary_models_trained_positions_warns(compose, tiny_causal, caplog):
    """Rotary positions have no table to run out of: past max_position_embeddings is a warning only."""
    import logging

    with caplog.at_level(logging.WARNING):
        prepared = prepare(compose(*tiny_causal, "train.max_length=200"))
    assert prepared.spec.position_limit is None
    assert "train.max_length=200 is past the 128 positions the model was trained on" in caplog.text


def test_model_cache_dir_follows_lora_sweep_cache(compose, monkeypatch, tmp_path, tiny_bert_dir):
    monkeypatch.setenv("LORA_SWEEP_CACHE", str(tmp_path / "shared_cache"))
    for model in ("minilm", "roberta_base", "smollm2_135m"):
        assert compose(f"model={model}").model.cache_dir == str(tmp_path / "shared_cache"), model
    local = compose("model=local", f"model.name_or_path={tiny_bert_dir}")
    assert local.model.cache_dir == str(tmp_path / "shared_cache")
    monkeypatch.delenv("LORA_SWEEP_CACHE")
    unset = compose("model=local", f"model.name_or_path={tiny_bert_dir}")
    assert unset.model.cache_dir == "~/.cache/lora_sweep"
