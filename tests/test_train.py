"""The loop on tiny models: LoRA leaves the base bit-identical, full FT moves every weight, checkpoints
reload in their standard formats and reproduce the recorded metric, the last checkpoint can resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_sweep.checkpoint import RESUME_FILES, load_training_state
from lora_sweep.data import make_loader
from lora_sweep.evaluation import evaluate
from lora_sweep.record import read_record
from lora_sweep.run import run
from lora_sweep.train import build_optimizer
from tests.helpers import fit_on_cpu


def _fit(cfg):
    return fit_on_cpu(cfg)


def _val_accuracy(model, prepared, cfg):
    from transformers import DataCollatorWithPadding

    loader = make_loader(
        prepared.data.splits["validation"], DataCollatorWithPadding(prepared.tokenizer), 32, shuffle=False
    )
    return evaluate(model, loader, torch.device("cpu"), "fp32", len(prepared.data.label_names))["accuracy"]


@pytest.mark.parametrize("folder_fixture", ["tiny_bert_dir", "tiny_llama_dir"])
def test_lora_learns_and_leaves_base_weights_bit_identical(request, compose, tiny_overrides, folder_fixture):
    folder = request.getfixturevalue(folder_fixture)
    cfg = compose(
        *tiny_overrides, f"model.name_or_path={folder}", "method.targets=all_linear", "train.lr=5e-3"
    )
    pristine = load_file(folder / "model.safetensors")
    prepared, model, result = _fit(cfg)
    assert result.status == "completed" and result.steps == result.total_steps == 3 * 21
    assert result.best_metrics["accuracy"] >= 0.8  # the task is learnable: the loop really trains

    base = model.get_base_model()
    checked = 0
    for name, parameter in base.named_parameters():
        if (
            "lora_" in name
            or "modules_to_save" in name
            or "original_module" in name
            or "classifier" in name
            or "score" in name
        ):
            continue
        stored = name.replace(".base_layer", "")
        stored = (
            stored.split(".", 1)[1] if stored.split(".", 1)[1] in pristine else stored
        )  # bert./model. prefix
        assert torch.equal(parameter.detach(), pristine[stored]), name
        checked += 1
    assert checked >= 10


def test_full_fine_tuning_changes_every_weight(compose, tiny_overrides, tiny_bert_dir):
    cfg = compose(*tiny_overrides, "method=full", "train.lr=1e-3")
    pristine = load_file(tiny_bert_dir / "model.safetensors")
    _, model, result = _fit(cfg)
    assert result.best_metrics["accuracy"] >= 0.8
    for name, parameter in model.bert.named_parameters():
        assert not torch.equal(parameter.detach(), pristine[name]), f"{name} did not change"


def test_saved_adapter_reloads_with_peft_and_gives_the_same_metric(compose, tiny_overrides, tiny_bert_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cfg = compose(*tiny_overrides, "train.lr=5e-3", "method.targets=all_linear")
    prepared, _, result = _fit(cfg)
    best = Path(result.checkpoints["best"])
    assert (best / "adapter_model.safetensors").is_file() and (best / "adapter_config.json").is_file()
    assert not list(best.glob("*.bin")) and not list(best.glob("*.pt"))  # safetensors only
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    reloaded = PeftModel.from_pretrained(base, best)
    assert _val_accuracy(reloaded, prepared, cfg) == pytest.approx(result.best_metrics["accuracy"])


def test_full_checkpoint_reloads_with_from_pretrained(compose, tiny_overrides):
    from transformers import AutoModelForSequenceClassification

    cfg = compose(*tiny_overrides, "method=full", "train.lr=1e-3")
    prepared, _, result = _fit(cfg)
    reloaded = AutoModelForSequenceClassification.from_pretrained(result.checkpoints["best"])
    assert reloaded.config.id2label == {0: "negative", 1: "positive"}
    assert _val_accuracy(reloaded, prepared, cfg) == pytest.approx(result.best_metrics["accuracy"])


def test_last_checkpoint_holds_an_exact_resume_state(compose, tiny_overrides):
    cfg = compose(*tiny_overrides, "train.eval_every=0")
    prepared, model, result = _fit(cfg)
    last = Path(result.checkpoints["last"])
    assert all((last / name).is_file() for name in RESUME_FILES)
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == result.steps and state["epoch"] == 2 and state["batch_in_epoch"] == 21
    optimizer, scheduler = build_optimizer(model, cfg, result.total_steps)
    restored = load_training_state(last, optimizer, scheduler)
    assert restored["step"] == result.steps
    assert scheduler.last_epoch == result.total_steps
    moments = [s["exp_avg"] for s in optimizer.state_dict()["state"].values()]
    assert moments and all(m.abs().sum() > 0 for m in moments)  # the real moments, not fresh zeros


def test_run_writes_a_complete_record_and_mlflow_run(compose, tiny_overrides, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = compose(*tiny_overrides, "train.lr=5e-3", "method.targets=all_linear")
    record = run(cfg)
    on_disk = read_record(cfg.output_dir)
    assert on_disk["status"] == "completed" and record.status == "completed"
    assert on_disk["git"].keys() == {"commit", "dirty"} and on_disk["versions"]["torch"] == torch.__version__
    assert on_disk["config"]["method"]["r"] == 8 and on_disk["config"]["train"]["lr"] == pytest.approx(5e-3)
    metrics = on_disk["metrics"]
    assert metrics["objective"] == metrics["best_val_accuracy"] >= 0.8
    for key in (
        "test_accuracy",
        "test_macro_f1",
        "test_loss",
        "train_seconds",
        "tokens_per_second",
        "peak_memory_mb",
    ):
        assert metrics[key] > 0, key
    assert Path(on_disk["checkpoints"]["best"]).is_dir() and on_disk["checkpoints"]["size_bytes"]["best"] > 0
    assert on_disk["params"]["trainable_params"] < on_disk["params"]["total_params"]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow_run = client.get_run(on_disk["mlflow"]["run_id"])
    assert mlflow_run.info.status == "FINISHED"
    params, tags, logged = mlflow_run.data.params, mlflow_run.data.tags, mlflow_run.data.metrics
    assert (
        params["method.r"] == "8"
        and params["method.targets"] == "all_linear"
        and params["lora.scaling"] == "2.0"
    )
    assert float(params["train.lr"]) == pytest.approx(5e-3) and params["data.size.train"] == str(
        on_disk["data"]["sizes"]["train"]
    )
    assert tags["lora_sweep.method"] == "lora" and tags["lora_sweep.status"] == "completed"
    assert tags["version.peft"] and "mlflow.source.git.commit" in tags
    for key in (
        "trainable_params",
        "total_params",
        "trainable_ratio",
        "peak_memory_mb",
        "tokens_per_s",
        "step_time_s",
        "checkpoint_best_mb",
        "test_accuracy",
        "val_accuracy",
        "val_macro_f1",
    ):
        assert key in logged, key
    assert logged["trainable_params"] == on_disk["params"]["trainable_params"]
    loss_history = client.get_metric_history(mlflow_run.info.run_id, "train_loss")
    assert [m.step for m in loss_history] == [*range(2, 63, 2), 63]  # every log_every steps, and the last
    val_history = client.get_metric_history(mlflow_run.info.run_id, "val_accuracy")
    assert [m.step for m in val_history] == [*range(6, 63, 6), 63]
    assert len(client.get_metric_history(mlflow_run.info.run_id, "lr")) == len(loss_history)
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert {"config.yaml", "record.json", "checkpoints"} <= artifacts
    best = {Path(a.path).name for a in client.list_artifacts(mlflow_run.info.run_id, "checkpoints/best")}
    assert {"adapter_model.safetensors", "adapter_config.json", "lora_sweep.json"} <= best
    last = {Path(a.path).name for a in client.list_artifacts(mlflow_run.info.run_id, "checkpoints/last")}
    assert "adapter_model.safetensors" in last and "optimizer.pt" not in last


def test_failed_run_is_recorded_as_failed(compose, tiny_overrides, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    import lora_sweep.run as run_module

    def broken_fit(*args, **kwargs):
        raise RuntimeError("simulated crash in the loop")

    monkeypatch.setattr(run_module, "fit", broken_fit)
    cfg = compose(*tiny_overrides)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg)
    record = read_record(cfg.output_dir)
    assert record["status"] == "failed" and "simulated crash" in record["error"]
    mlflow_run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(
        record["mlflow"]["run_id"]
    )
    assert (
        mlflow_run.info.status == "FAILED" and "simulated crash" in mlflow_run.data.tags["lora_sweep.error"]
    )


def test_tracking_none_writes_no_mlflow_store(compose, tiny_overrides, tmp_path):
    cfg = compose(*tiny_overrides, "tracking=none", "train.epochs=1")
    record = run(cfg)
    assert record.status == "completed" and record.mlflow["run_id"] is None
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_run_uses_cuda_and_bf16(compose, tiny_overrides):
    cfg = compose(*tiny_overrides, "tracking=none", "train.lr=5e-3", "method.targets=all_linear")
    record = run(cfg)
    assert record.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert "peak_cuda_allocated_mb" in record.metrics and record.metrics["best_val_accuracy"] >= 0.8


@pytest.mark.slow
def test_reused_base_model_trains_exactly_like_a_fresh_one(compose, tiny_overrides, tmp_path):
    """A sweep's later trials reuse the process's base model: LoRA unloaded, full FT's weights restored.
    A LoRA run after a full fine-tune in the same process must equal a LoRA run from a fresh load."""
    import lora_sweep.run as run_module

    # as sweep trials: a single run keeps no pristine copy, so a run after a full fine-tune reloads
    lora = ["tracking=none", "train.epochs=1", "train.lr=5e-3", "method.targets=all_linear"]
    lora.append("sweep.study_name=s")
    run_module._PREPARED.clear()
    run_module._MODELS.clear()
    fresh = run(compose(*tiny_overrides, *lora, output_dir=tmp_path / "fresh"))
    assert fresh.params["setup_reused"] is False
    run(
        compose(
            *tiny_overrides,
            "tracking=none",
            "train.epochs=1",
            "method=full",
            "train.lr=1e-3",
            "sweep.study_name=s",
            output_dir=tmp_path / "full",
        )
    )
    reused = run(compose(*tiny_overrides, *lora, output_dir=tmp_path / "again"))
    assert reused.params["setup_reused"] is True
    assert reused.evaluations == fresh.evaluations  # every validation pass, to the last bit
