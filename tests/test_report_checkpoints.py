"""What the report does with checkpoints (lora_sweep/report/checkpoints.py): the registry gets a new model
version only when the champion changes; forgetting compares like with like (checked by hand)."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from lora_sweep.checkpoint import save_checkpoint
from lora_sweep.report import checkpoints as ck


@pytest.fixture
def tiny_checkpoint(tiny_bert_dir, tmp_path):
    """``save(name, bump)``: a checkpoint folder of the tiny classifier (weights shifted by ``bump``)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)

    def save(name: str, bump: float = 0.0):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
        with torch.no_grad():
            model.classifier.weight += bump
        return save_checkpoint(tmp_path / name / "best", model, tokenizer, {"step": 1})

    return save


def test_rerunning_the_report_registers_a_new_version_only_when_the_champion_changes(
    tiny_checkpoint, tmp_path
):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store)
    run_id = client.create_run(client.create_experiment("registry")).info.run_id

    def report_once(checkpoint, out):
        record = {"checkpoints": {"best": str(checkpoint)}, "mlflow": {"run_id": run_id}}
        export = {"merged": str(tmp_path / out / "merged"), "adapter": str(tmp_path / out / "adapter")}
        return ck.register(record, export, "study", store)

    first = tiny_checkpoint("trial-3")
    assert str(report_once(first, "report")["version"]) == "1"
    again = report_once(first, "report")  # the sweep's report, then `python -m lora_sweep.report study`
    assert str(again["version"]) == "1" and again["registered"] is False
    assert str(report_once(first, "elsewhere")["version"]) == "1"  # same champion, exported to another folder
    assert [str(v.version) for v in client.search_model_versions("name='study'")] == ["1"]

    other = tiny_checkpoint("trial-5", bump=0.5)  # a better trial became the champion
    changed = report_once(other, "report")
    assert str(changed["version"]) == "2" and changed["registered"] is True
    assert str(client.get_model_version_by_alias("study", "champion").version) == "2"
    assert str(report_once(other, "report")["version"]) == "2"
    assert sorted(str(v.version) for v in client.search_model_versions("name='study'")) == ["1", "2"]
