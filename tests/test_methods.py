"""Every method file maps onto PEFT's own config class and trains end to end; a new method is one YAML
file."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from lora_sweep.config import CONF_DIR, method_config
from lora_sweep.errors import ConfigError
from lora_sweep.methods import SUBSET_FIELDS, config_class, peft_config, peft_kwargs
from lora_sweep.run import run
from lora_sweep.tasks import get_task
from lora_sweep.weights import require_safetensors
from tests.helpers import write_fourierft

ADAPTERS = ["lora", "loha", "lokr", "ia3", "adalora", "vera"]
TARGETS = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"]


@pytest.mark.parametrize("name", ADAPTERS)
def test_each_method_file_lands_on_peft_s_own_config_class(name):
    import peft

    method = method_config(name)
    config = peft_config(method, TARGETS, "sequence_classification", ["classifier"], total_steps=20)
    assert type(config) is peft.PEFT_TYPE_TO_CONFIG_MAPPING[method.peft]
    assert sorted(config.target_modules) == sorted(TARGETS) and "classifier" in config.modules_to_save
    for key, value in method.options.items():  # the file's options arrive under PEFT's own names
        if key in SUBSET_FIELDS:  # resolved to full module names: none asked for, none given
            assert not getattr(config, key) and not value
        else:
            assert getattr(config, key) == value, key
    if method.r is not None:
        assert config.r == method.r
    if method.effective_alpha is not None:
        assert method.effective_alpha in (getattr(config, "lora_alpha", None), getattr(config, "alpha", None))


def test_the_full_method_has_no_adapter():
    method = method_config("full")
    assert not method.adapter and method.r is None and method.scaling is None


def test_shorthands_find_each_class_s_own_field_names():
    assert peft_kwargs(method_config("lora", dropout=0.2), TARGETS)["lora_dropout"] == 0.2
    assert peft_kwargs(method_config("loha", dropout=0.2), TARGETS)["module_dropout"] == 0.2
    assert peft_kwargs(method_config("vera", dropout=0.2), TARGETS)["vera_dropout"] == 0.2
    assert peft_kwargs(method_config("lora", variant="dora"), TARGETS)["use_dora"] is True
    assert peft_kwargs(method_config("adalora"), TARGETS, total_steps=42)["total_step"] == 42  # from the run


@pytest.mark.parametrize(
    ("name", "overrides", "key", "problem"),
    [
        ("ia3", {"r": 8}, "method.r", "IA3Config has no such setting"),
        ("lora", {"options": {"nope": 1}}, "method.options.nope", "not a field of peft.LoraConfig"),
        ("ia3", {"variant": "dora"}, "method.variant", "IA3Config has no use_dora"),
        ("lora", {"peft": "NOPE"}, "method.peft", "not a PEFT method type"),
    ],
)
def test_a_setting_the_method_has_not_is_one_line_naming_the_key(name, overrides, key, problem):
    with pytest.raises(ConfigError) as caught:
        peft_kwargs(method_config(name, **overrides), TARGETS)
    message = str(caught.value)
    assert message.startswith(f"{key}=") and problem in message and "\n" not in message


def test_peft_s_own_value_checks_become_one_line():
    method = method_config("adalora", options={**method_config("adalora").options, "tinit": 30, "tfinal": 30})
    with pytest.raises(ConfigError, match=r"^method='adalora': peft.AdaLoraConfig: ") as caught:
        peft_config(
            method, TARGETS, "sequence_classification", total_steps=20
        )  # the schedule outlasts the run
    assert "\n" not in str(caught.value)


def _train(compose, tiny_overrides, tmp_path, *overrides, conf_dir=None):
    extra = [f"hydra.searchpath=[file://{conf_dir}]"] if conf_dir else []
    cfg = compose(
        *tiny_overrides,
        "train.epochs=1",
        "train.eval_every=0",
        *extra,
        *overrides,
        output_dir=tmp_path / re.sub(r"[^\w.-]+", "_", "-".join(overrides)),
    )
    return cfg, run(cfg)


def _reload(cfg, record):
    """The best checkpoint loaded as a user would (PeftModel on a fresh base), scored on validation."""
    from lora_sweep.data import make_loader
    from lora_sweep.methods import load_adapter
    from lora_sweep.models import load_base_model
    from lora_sweep.run import prepare

    prepared = prepare(cfg)
    base = load_base_model(
        prepared.spec, cfg.model, prepared.data.label_names, prepared.tokenizer.pad_token_id
    )
    model = load_adapter(base, require_safetensors(record.checkpoints["best"]))
    loader = make_loader(
        prepared.data.splits["validation"],
        get_task(cfg).collator(prepared.tokenizer),
        cfg.train.eval_batch_size,
        shuffle=False,
    )
    return get_task(cfg).evaluate(model, loader, torch.device("cpu"), "fp32", 2, desc="reload")


@pytest.mark.parametrize("name", ADAPTERS)
def test_every_method_trains_records_and_reloads(compose, tiny_overrides, tmp_path, name):
    cfg, record = _train(compose, tiny_overrides, tmp_path, f"method={name}", "method.targets=all_linear")
    assert record.status == "completed" and cfg.method.name == name
    params = record.params
    assert 0 < params["trainable_params"] < 0.5 * params["total_params"]  # an adapter, not the whole model
    assert params["mergeable"] is True
    adapter_config = Path(record.checkpoints["best"]) / "adapter_config.json"
    assert f'"peft_type": "{cfg.method.peft}"' in adapter_config.read_text()
    reloaded = _reload(cfg, record)
    assert reloaded["accuracy"] == pytest.approx(record.metrics["best_val_accuracy"], abs=1e-6)


def test_adalora_reallocates_its_rank_budget_during_training(compose, tiny_overrides, tmp_path):
    """lora_sweep calls PEFT's update_and_allocate after each step: the final budget is written down."""
    cfg, record = _train(
        compose,
        tiny_overrides,
        tmp_path,
        "method=adalora",
        "method.options.target_r=2",
        "method.options.init_r=6",
        "method.targets=all_linear",
    )
    saved = (Path(record.checkpoints["best"]) / "adapter_config.json").read_text()
    import json

    ranks = json.loads(saved)["rank_pattern"]
    assert ranks, "AdaLoRA never allocated its budget: update_and_allocate was not called"
    assert sum(sum(mask) for mask in ranks.values()) < 6 * len(ranks)  # budget cut from init_r=6 per layer


def test_a_new_peft_method_is_one_yaml_file(compose, tiny_overrides, tmp_path):
    """FourierFT is in no table of lora_sweep: its file alone makes it train, record, reload and export
    (tests/test_method_sweep.py sweeps and reports it)."""
    conf = write_fourierft(tmp_path / "more_conf")
    cfg, record = _train(compose, tiny_overrides, tmp_path, "method=fourierft", conf_dir=conf)
    assert record.status == "completed" and cfg.method.peft == "FOURIERFT"
    from mlflow.tracking import MlflowClient

    run_info = MlflowClient(tracking_uri=cfg.tracking.tracking_uri).get_run(record.mlflow["run_id"])
    assert run_info.info.run_name.startswith("fourierft-attention_qv-lr")
    assert run_info.data.params["method.options.n_frequency"] == "64"
    fields = {f.name for f in dataclasses.fields(config_class(cfg.method))}
    assert "n_frequency" in fields
    reloaded = _reload(cfg, record)
    assert reloaded["accuracy"] == pytest.approx(record.metrics["best_val_accuracy"], abs=1e-6)
    # the report's export: the adapter, and merged into W, both reloaded from disk and compared
    from lora_sweep.record import read_record
    from lora_sweep.report.checkpoints import export

    samples = ["a good film", "a dull boring plot"]
    exported = export(read_record(record.output_dir), tmp_path / "export", samples)
    assert exported["mergeable"] is True and exported["logits_agree"] is True
    assert (Path(exported["merged"]) / "model.safetensors").is_file()


def test_method_files_are_the_ones_the_readme_names():
    names = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
    assert names == sorted([*ADAPTERS, "full"])
