"""train.eval_subset: the validation passes that choose the best checkpoint and feed the pruner use one
fixed seeded subset; the chosen checkpoint is scored on the whole split, and that is the objective."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_sweep.checkpoint import restore_weights
from lora_sweep.data import make_loader
from lora_sweep.errors import ConfigError
from lora_sweep.methods import apply_method
from lora_sweep.models import load_base_model
from lora_sweep.run import prepare, run
from lora_sweep.tasks import get_task
from lora_sweep.tracking import make_tracker
from lora_sweep.train import validation_subset
from tests.helpers import Killed, die_after_step

SUBSET = 24  # of the tiny data's 72 validation rows


def test_the_subset_is_fixed_by_the_seed_and_in_split_order(compose, tiny_overrides):
    split = prepare(compose(*tiny_overrides)).data.splits["validation"]
    first, again = validation_subset(split, SUBSET, 0), validation_subset(split, SUBSET, 0)
    assert len(first) == SUBSET and first["input_ids"] == again["input_ids"]
    other = validation_subset(split, SUBSET, 1)
    assert other["input_ids"] != first["input_ids"]
    rows = [split["input_ids"].index(ids) for ids in first["input_ids"]]
    assert rows == sorted(rows)
    assert validation_subset(split, None, 0) is split and validation_subset(split, len(split), 0) is split
    before = torch.get_rng_state()
    validation_subset(split, SUBSET, 0)
    assert torch.equal(torch.get_rng_state(), before)  # draws nothing an exact resume would have to replay


def _whole_split_score(cfg, checkpoint: Path) -> dict[str, float]:
    prepared = prepare(cfg)
    model = load_base_model(
        prepared.spec, cfg.model, prepared.data.label_names, prepared.tokenizer.pad_token_id
    )
    model = apply_method(model, cfg.method, prepared.spec)
    restore_weights(model, checkpoint)
    task = get_task(cfg)
    loader = make_loader(
        prepared.data.splits["validation"], task.collator(prepared.tokenizer), 32, shuffle=False
    )
    return task.evaluate(model, loader, torch.device("cpu"), "fp32", len(prepared.data.label_names))


def test_passes_use_the_subset_and_the_objective_is_the_chosen_checkpoint_on_the_whole_split(
    compose, tiny_overrides, tmp_path
):
    from mlflow.tracking import MlflowClient

    cfg = compose(*tiny_overrides, "train.epochs=2", f"train.eval_subset={SUBSET}")  # 42 steps, 7 passes
    record = run(cfg)
    assert [e["samples"] for e in record.evaluations] == [SUBSET] * 7
    best = max(record.evaluations, key=lambda e: e["accuracy"])  # the first best, as the loop keeps it
    assert record.checkpoints["best_step"] == best["step"]
    metrics = record.metrics
    assert metrics["subset_val_accuracy"] == best["accuracy"]
    whole = _whole_split_score(cfg, Path(record.checkpoints["best"]))
    assert whole["samples"] == 72 and metrics["objective_rows"] == 72
    assert metrics["objective"] == metrics["best_val_accuracy"] == pytest.approx(whole["accuracy"])
    assert (
        metrics["best_val_loss"] == pytest.approx(whole["loss"])
        and metrics["objective_split"] == "validation"
    )
    logged = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(record.mlflow["run_id"])
    assert logged.data.metrics["val_full_accuracy"] == pytest.approx(whole["accuracy"])
    assert logged.data.metrics["best_val_accuracy"] == pytest.approx(whole["accuracy"])


def test_without_a_subset_nothing_changes(compose, tiny_overrides):
    record = run(compose(*tiny_overrides, "tracking=none", "train.epochs=1", "train.eval_subset=1000"))
    assert [e["samples"] for e in record.evaluations] == [72] * 4
    best = max(record.evaluations, key=lambda e: e["accuracy"])
    assert record.metrics["objective"] == best["accuracy"] and "subset_val_accuracy" not in record.metrics


def test_a_killed_run_with_a_subset_resumes_exactly(compose, tiny_overrides, tmp_path):
    overrides = (*tiny_overrides, "tracking=none", "train.epochs=2", f"train.eval_subset={SUBSET}")
    reference = run(compose(*overrides, output_dir=tmp_path / "reference"))
    cfg = compose(*overrides, output_dir=tmp_path / "killed")
    with pytest.raises(Killed):
        run(cfg, tracker=die_after_step(make_tracker(cfg.tracking), 28))
    resumed = run(cfg)
    assert resumed.resumes and resumed.resumes[0]["from_step"] == 24
    assert resumed.evaluations == reference.evaluations
    same = ("objective", "best_val_accuracy", "best_val_loss", "subset_val_accuracy", "test_accuracy")
    assert {k: resumed.metrics[k] for k in same} == {k: reference.metrics[k] for k in same}


@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_non_positive_subset_is_refused(compose, value):
    with pytest.raises(ConfigError) as caught:
        compose(f"train.eval_subset={value}")
    assert str(caught.value) == f"train.eval_subset={value}: must be > 0"
