"""What the report does with checkpoints (lora_sweep/report/checkpoints.py): the registry gets a new model
version only when the champion changes; forgetting compares like with like (checked by hand)."""

from __future__ import annotations

from pathlib import Path

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


def _one_epoch(overrides: list[str]) -> list[str]:
    kept = [o for o in overrides if not o.startswith(("train.epochs=", "train.eval_every="))]
    return [*kept, "train.epochs=1", "train.eval_every=0"]


TEXTS = ["the movie was good", "a dull boring film", "great cast and a fun plot", "the story is flat"] * 3


def _mean_pooled(model, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def _lora_by_hand(base_dir, checkpoint) -> torch.nn.Module:
    """The encoder of a LoRA checkpoint, merged by hand: W + (alpha / r) B A for every adapted layer."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(base_dir)
    weights = load_file(checkpoint / "adapter_model.safetensors")
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    parameters = dict(encoder.named_parameters())
    adapted = []
    with torch.no_grad():
        for key, a in weights.items():
            if ".lora_A." in key:
                b = weights[key.replace(".lora_A.", ".lora_B.")]
                assert b.abs().sum() > 0  # trained: the adapter is not the no-op it starts as
                module = key.split("base_model.model.bert.", 1)[1].split(".lora_A.")[0]
                parameters[f"{module}.weight"] += scale * b @ a
                adapted.append(module)
    assert "pooler.dense" in adapted and len(adapted) == 13  # all_linear: 2 blocks x 6 layers + the pooler
    return encoder


def test_forgetting_is_the_cosine_of_mean_pooled_states_computed_by_hand(
    compose, tiny_overrides, tiny_bert_dir
):
    """LoRA on all_linear (BERT's pooler adapted too) and full fine-tuning, each against the untouched
    pretrained encoder: the report's figure equals the cosine of mask-weighted mean last hidden states, in
    eval mode, with one tokenization, computed here from the checkpoint files by hand. The pooler output
    is not part of the measure for either model (the classifier reads it, the measure does not)."""
    from transformers import AutoModel, AutoTokenizer

    from lora_sweep.record import read_record
    from lora_sweep.run import run

    quick = [*_one_epoch(tiny_overrides), "tracking=none"]
    lora = run(compose(*quick, "method.targets=all_linear", "train.lr=5e-3"))
    full = run(
        compose(*quick, "method=full", "train.lr=1e-3", output_dir=Path(lora.output_dir).parent / "full")
    )
    records = {"lora": read_record(lora.output_dir), "full": read_record(full.output_dir)}
    measured = ck.representation_similarity(records, TEXTS)

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    base = _mean_pooled(AutoModel.from_pretrained(tiny_bert_dir), tokenizer, TEXTS)
    tuned = {
        "lora": _lora_by_hand(tiny_bert_dir, Path(lora.checkpoints["best"])),
        "full": AutoModel.from_pretrained(full.checkpoints["best"]),
    }
    for key, encoder in tuned.items():
        by_hand = torch.nn.functional.cosine_similarity(_mean_pooled(encoder, tokenizer, TEXTS), base, dim=-1)
        assert measured[key] == pytest.approx(float(by_hand.mean()), abs=1e-5), key
        assert measured[key] < 0.9999  # the models did move
    # measuring again, after the export merged the LoRA model, gives the same: no base weight changed
    ck.export(records["lora"], Path(lora.output_dir) / "export", TEXTS[:4])
    assert ck.representation_similarity(records, TEXTS) == pytest.approx(measured, abs=1e-6)


def test_report_loads_an_adapter_whose_init_rewrote_the_base_weights(compose, tiny_overrides):
    """PiSSA starts the adapter from the base weights' principal part and leaves the residual in the base
    (in place): loading the checkpoint onto a fresh base must redo that (PEFT does, from the adapter's
    config), or the report would score and measure another model. The run's own test score is the truth,
    and the exported adapter loads on the pretrained weights as the merged model does."""
    from lora_sweep.record import read_record
    from lora_sweep.run import run

    quick = [*_one_epoch(tiny_overrides), "tracking=none", "train.lr=5e-3"]
    done = run(compose(*quick, "method.init=pissa"))
    record = read_record(done.output_dir)
    again = ck.test_metrics(record)
    assert again["loss"] == pytest.approx(record["metrics"]["test_loss"], abs=1e-5)
    assert again["accuracy"] == pytest.approx(record["metrics"]["test_accuracy"])
    export = ck.export(record, Path(done.output_dir) / "export", TEXTS[:4])
    assert export["logits_agree"], export
