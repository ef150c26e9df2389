"""Base weights in the dtype the method needs, and 4-bit/8-bit bases (issue 13, items 1 and 2): real runs of
the tiny models on CPU (bitsandbytes' CPU kernels train), the export of a quantized run, the one-line
errors; the CUDA paths as ``gpu`` tests that skip without a GPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_sweep.errors import ConfigError
from lora_sweep.record import read_record

bnb = pytest.importorskip("bitsandbytes")  # the `quant` extra, which `dev` includes: CI has it


@pytest.fixture(autouse=True)
def _fresh_caches():
    """Each test loads its own base model: a base reused from an earlier test would hide the load path."""
    from lora_sweep import run as run_module

    run_module._PREPARED.clear()
    run_module._MODELS.clear()
    yield
    run_module._MODELS.clear()


# a few steps at a learning rate where the tiny model's loss visibly falls: these tests check the dtypes
# and that training works, not how well (2 CPU cores are shared by the whole suite)
SHORT = ("train.max_steps=18", "train.eval_every=6", "train.lr=1e-2")


def _falls(record, cfg) -> bool:
    """Every logged training loss finite, and the validation loss (no dropout noise) lower at the end than
    at the first evaluation."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    train = [m.value for m in client.get_metric_history(record.mlflow["run_id"], "train_loss")]
    validation = [e["loss"] for e in record.evaluations]
    assert train and all(math.isfinite(x) for x in train), train
    assert validation[-1] < validation[0], validation
    return True


def test_a_bf16_lora_run_keeps_frozen_weights_bf16_and_adapters_fp32(tmp_path, compose, tiny):
    """The Done-when test: an explicit model.dtype=bf16 on CPU is honoured. The frozen base is bf16, every
    trainable weight (LoRA's A and B, the new head) fp32 after a real run; it computes under bf16 autocast,
    its loss is finite and falls; record and MLflow name both dtypes."""
    from mlflow.tracking import MlflowClient

    from lora_sweep.run import _MODELS, run

    cfg = compose(*tiny, "model.dtype=bf16", *SHORT)
    record = run(cfg)
    assert record.status == "completed" and record.precision == "bf16"
    ((model, _),) = _MODELS.values()  # the cached base model the run trained on (its adapters unloaded)
    assert {p.dtype for p in model.bert.parameters()} == {torch.bfloat16}
    head = model.get_submodule("classifier")
    assert all(p.dtype == torch.float32 for p in head.parameters())  # the trained head, fp32
    assert record.params["base_dtype"] == "bfloat16" and record.params["trainable_dtype"] == "float32"
    # frozen: the base, and (fp32) PEFT's untouched original of the head it trains a copy of
    assert record.params["parameter_dtypes"] == {"frozen": "bfloat16,float32", "trainable": "float32"}
    saved = load_file(Path(record.checkpoints["best"]) / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    params = MlflowClient(cfg.tracking.tracking_uri).get_run(record.mlflow["run_id"]).data.params
    assert params["run.base_dtype"] == "bfloat16" and params["run.trainable_dtype"] == "float32"
    assert _falls(record, cfg)


def test_auto_dtype_on_cpu_is_fp32(tmp_path, compose, tiny_overrides):
    from lora_sweep.models import pick_precision, plan_base

    cfg = compose(*tiny_overrides)
    plan = plan_base(cfg.model, cfg.method.adapter, torch.device("cpu"))
    assert plan.dtype == torch.float32 and plan.base_dtype == "float32" and not plan.quantized
    assert pick_precision("auto", torch.device("cpu"), plan) == "fp32"
    assert plan_base(cfg.model, False, torch.device("cpu")).dtype == torch.float32


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_lora_classifier_trains_saves_and_exports(tmp_path, compose, tiny, quantization):
    """A bitsandbytes base on CPU: quantized Linear layers, a plain fp32 head that trains and is saved,
    gradient checkpointing on by default; the loss falls; the export's merged model is the base dequantized
    with the adapter merged, and gives the adapter's logits."""
    from lora_sweep.report.checkpoints import export
    from lora_sweep.run import _MODELS, run

    cfg = compose(*tiny, f"model.quantization={quantization}", *SHORT)
    record = run(cfg)
    assert record.status == "completed"
    ((model, _),) = _MODELS.values()
    layer = type(model.get_submodule("bert.encoder.layer.0.attention.self.key"))
    assert layer is (bnb.nn.Linear4bit if quantization == "4bit" else bnb.nn.Linear8bitLt)
    assert type(model.get_submodule("classifier")) is torch.nn.Linear
    assert model.is_gradient_checkpointing  # auto: on for a quantized base
    assert record.params["base_dtype"] == {"4bit": "nf4", "8bit": "int8"}[quantization]
    assert record.params["parameter_dtypes"]["trainable"] == "float32"
    saved = load_file(Path(record.checkpoints["best"]) / "adapter_model.safetensors")
    assert any("classifier" in k for k in saved)  # the head is saved with the adapter (modules_to_save)
    assert _falls(record, cfg)
    assert math.isfinite(record.metrics["test_loss"])

    info = export(read_record(record.output_dir), tmp_path / "export", ["the movie was good", "awful plot"])
    assert info["merged"] and info["logits_agree"], info
    assert info["dequantized_from"] == quantization and info["merged_dtype"] == "float32"
    merged = load_file(Path(info["merged"]) / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in merged.values())  # no quantized tensor left
    assert not any("absmax" in k or "quant" in k or "SCB" in k for k in merged)


def test_a_4bit_causal_lm_trains_with_its_lm_head_frozen(tmp_path, compose, tiny_causal):
    from lora_sweep.run import _MODELS, run

    cfg = compose(*tiny_causal, "model.quantization=4bit", *SHORT)
    record = run(cfg)
    assert record.status == "completed" and record.params["base_dtype"] == "nf4"
    ((model, _),) = _MODELS.values()
    assert type(model.get_submodule("model.layers.0.self_attn.q_proj")) is bnb.nn.Linear4bit
    assert type(model.get_submodule("lm_head")) is torch.nn.Linear
    assert _falls(record, cfg)
    assert math.isfinite(record.metrics["best_val_loss"]) and record.generations


def test_a_4bit_run_interrupted_resumes_to_the_uninterrupted_result(tmp_path, compose, tiny):
    """Stopped after its step-6 checkpoint, rerun into the same folder: it resumes there (adapter and head
    restored into the quantized model) and ends with the metrics of a run never stopped."""
    from lora_sweep import run as run_module

    extra = [*tiny, "model.quantization=4bit", *SHORT, "tracking=none", "method.dropout=0.1"]
    reference = run_module.run(compose(*extra, output_dir=tmp_path / "reference"))

    def stop_at_6(step, metrics):
        if step == 6:
            raise KeyboardInterrupt
        return False

    stopped = compose(*extra, output_dir=tmp_path / "stopped")
    with pytest.raises(KeyboardInterrupt):
        run_module.run(stopped, on_evaluation=stop_at_6)
    assert read_record(stopped.output_dir)["status"] == "killed"
    run_module._MODELS.clear()  # as a new process would: the base loads again
    resumed = run_module.run(stopped)
    assert resumed.status == "completed" and resumed.resumes[-1]["from_step"] == 6
    assert resumed.evaluations == pytest.approx(reference.evaluations, rel=1e-5)
    assert resumed.metrics["test_loss"] == pytest.approx(reference.metrics["test_loss"], rel=1e-5)


def test_quantization_is_a_searchable_parameter_and_part_of_the_base_model_key(compose, tiny_overrides):
    from lora_sweep.models import plan_base
    from lora_sweep.sweep.space import SearchSpace

    space = SearchSpace({"model.quantization": "choice(none, 4bit, 8bit)"})
    assert "model.quantization" in space.names
    plain = compose(*tiny_overrides)
    four = compose(*tiny_overrides, "model.quantization=4bit")
    cpu = torch.device("cpu")
    assert plan_base(plain.model, True, cpu).key() != plan_base(four.model, True, cpu).key()


def test_a_sweep_searches_quantization_and_loads_each_base_once(tmp_path, sweep_in_process):
    """model.quantization as a searched parameter: each trial trains on the base it chose (the reuse cache
    is keyed by it), and the records say which."""
    import json

    from optuna.trial import TrialState

    from tests.helpers import load, write_sweep

    write_sweep(
        tmp_path,
        "quant",
        {
            "n_trials": 3,
            "sampler": {"name": "random", "seed": 0},
            "pruner": {"name": "none"},
            "params": {"model.quantization": "choice(none, 4bit)"},
            "enqueue": [{"model.quantization": "4bit"}, {"model.quantization": "none"}],
        },
    )
    sweep_in_process("quant", "train.max_steps=6", "train.eval_every=6")
    trials = load(tmp_path, "quant").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for trial in trials:
        record = json.loads(Path(trial.user_attrs["record"]).read_text())
        want = {"4bit": "nf4", "none": "float32"}[trial.params["model.quantization"]]
        assert record["params"]["base_dtype"] == want
        assert ("uint8" in record["params"]["parameter_dtypes"]["frozen"]) == (want == "nf4")
    reused = [json.loads(Path(t.user_attrs["record"]).read_text())["params"]["setup_reused"] for t in trials]
    assert reused[:2] == [False, False]  # another base for another quantization, never the cached one
    assert reused[2] == (trials[2].params["model.quantization"] == "none")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["method=full", "model.quantization=4bit"],
            "model.quantization='4bit': method=full trains every weight, and quantized weights cannot train",
        ),
        (["method=full", "model.dtype=bf16"], "model.dtype='bf16': method=full keeps fp32 master weights"),
        (["model.attn_implementation=xformers"], "model.attn_implementation='xformers': must be one of sdpa"),
        (["model.quantization=3bit"], "model.quantization='3bit': must be one of none, 4bit, 8bit"),
        (["model.dtype=fp8"], "model.dtype='fp8': must be one of auto, fp32, bf16, fp16"),
        (["train.gradient_checkpointing=sometimes"], "train.gradient_checkpointing='sometimes': expected"),
    ],
)
def test_bad_dtype_and_quantization_values_name_the_key(compose, tiny_overrides, overrides, expected):
    with pytest.raises(ConfigError) as caught:
        compose(*tiny_overrides, *overrides)
    assert str(caught.value).startswith(expected), str(caught.value)


def test_device_dependent_refusals_are_one_line_before_any_weight(compose, tiny_overrides):
    from lora_sweep.models import pick_precision, plan_base
    from lora_sweep.prepare import prepare

    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^model.dtype='fp16': fp16 weights need a GPU"):
        plan_base(compose(*tiny_overrides, "model.dtype=fp16").model, True, cpu)
    bf16 = plan_base(compose(*tiny_overrides, "model.dtype=bf16").model, True, cpu)
    with pytest.raises(ConfigError, match=r"^train.precision='fp32': a bf16 base \(model.dtype\) computes"):
        pick_precision("fp32", cpu, bf16)
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():  # flash-attn needs CUDA and its own wheel: absent on CI
        cfg = compose(*tiny_overrides, "model.attn_implementation=flash_attention_2")
        with pytest.raises(ConfigError, match=r"^model.attn_implementation='flash_attention_2': flash-attn"):
            prepare(cfg)
    # eager is supported by every model: the check passes and the model is built with it
    prepare(compose(*tiny_overrides, "model.attn_implementation=eager"))


def test_bitsandbytes_missing_is_one_line_naming_the_key_and_the_pip_command(
    compose, tiny_overrides, monkeypatch
):
    import importlib.util

    from lora_sweep.models import check_quantization

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"^model.quantization='4bit': needs bitsandbytes: pip install"):
        check_quantization(compose(*tiny_overrides, "model.quantization=4bit").model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_dtype_on_gpu_loads_an_adapter_base_in_bf16(tmp_path, compose, tiny_overrides):
    from lora_sweep.run import _MODELS, run

    record = run(compose(*tiny_overrides, "train.device=cuda"))
    want = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    assert record.status == "completed" and record.params["base_dtype"] == want
    assert record.params["parameter_dtypes"] == {"frozen": want, "trainable": "float32"}
    ((model, _),) = _MODELS.values()
    assert next(model.parameters()).device.type == "cuda"
    full = run(compose(*tiny_overrides, "method=full", "train.device=cuda", output_dir=tmp_path / "full"))
    assert full.params["base_dtype"] == "float32"  # full fine-tuning keeps fp32 master weights


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_4bit_base_takes_less_gpu_memory_than_bf16(tmp_path):
    """On a Llama-shaped model big enough that its Linear layers dominate (~14M parameters, random)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_sweep.config import ModelConfig
    from lora_sweep.models import inspect_model, load_base_model, plan_base

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    sizes = {}
    for quantization in ("none", "4bit"):
        cfg = ModelConfig(
            name="llama", name_or_path=str(tmp_path / "llama"), task="causal_lm", quantization=quantization
        )
        spec = inspect_model(cfg)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        model = load_base_model(spec, cfg, [], None, plan_base(cfg, True, torch.device("cuda")))
        sizes[quantization] = torch.cuda.memory_allocated() - before
        assert next(p for p in model.parameters()).device.type == "cuda"
        del model
    # bf16 Linear weights (2 bytes) against NF4 (half a byte) plus their scales; embeddings alike in both
    assert 0 < sizes["4bit"] < 0.6 * sizes["none"], sizes


@pytest.mark.slow
def test_bad_dtype_attention_and_quantization_inputs_exit_2_and_change_nothing(tmp_path, tiny_overrides):
    """Through the command line, after a finished run: each bad input exits 2 with one line naming the key
    and the value, before any record or MLflow run; the earlier run is intact."""
    import subprocess
    import sys

    from transformers.utils import is_flash_attn_2_available

    from tests.helpers import mlflow_snapshot, records

    def single(name: str, *overrides: str) -> subprocess.CompletedProcess:
        command = [
            sys.executable,
            "-m",
            "lora_sweep",
            *tiny_overrides,
            f"data.cache_dir={tmp_path / 'cache'}",
            "train.max_steps=6",
            f"hydra.run.dir=outputs/{name}",
            *overrides,
        ]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    good = single("good")
    assert good.returncode == 0, good.stderr[-3000:]
    before, before_records = mlflow_snapshot(tmp_path), records(tmp_path)
    bad = {
        "full_4bit": (
            ["method=full", "model.quantization=4bit"],
            "error: model.quantization='4bit': method=full trains every weight",
        ),
        "full_bf16": (
            ["method=full", "model.dtype=bf16"],
            "error: model.dtype='bf16': method=full keeps fp32",
        ),
        "fp16_cpu": (
            ["model.dtype=fp16", "train.device=cpu"],
            "error: model.dtype='fp16': fp16 weights need a GPU",
        ),
        "bf16_fp32": (
            ["model.dtype=bf16", "train.precision=fp32"],
            "error: train.precision='fp32': a bf16 base (model.dtype) computes in bf16",
        ),
        "attention": (
            ["model.attn_implementation=xformers"],
            "error: model.attn_implementation='xformers': must",
        ),
    }
    if not is_flash_attn_2_available():
        bad["flash"] = (
            ["model.attn_implementation=flash_attention_2"],
            "error: model.attn_implementation='flash_attention_2': flash-attn is not installed",
        )
    for name, (overrides, expected) in bad.items():
        result = single(name, *overrides)
        lines = [line for line in result.stderr.splitlines() if line.startswith(("error:", "Traceback"))]
        assert result.returncode == 2 and len(lines) == 1, (name, result.stderr[-3000:])
        assert lines[0].startswith(expected), (name, lines)
    assert mlflow_snapshot(tmp_path) == before
    assert records(tmp_path) == before_records


def test_a_4bit_base_counts_the_weights_it_stands_for(tiny_llama_dir):
    """bitsandbytes stores two 4-bit weights per byte: the counts (and the FLOPs per token from them) must
    not halve with quantization."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_sweep.models import count_parameters, matmul_parameters

    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        device_map={"": "cpu"},
    )
    assert count_parameters(quantized)["total_params"] == count_parameters(plain)["total_params"]
    assert matmul_parameters(quantized) == matmul_parameters(plain)
