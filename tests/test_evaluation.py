"""Classification evaluation over length-sorted batches: the same metrics as in the dataset's order, and
per-row predictions put back in the dataset's order."""

from __future__ import annotations

import pytest
import torch

from lora_sweep.data import make_loader
from lora_sweep.evaluation import evaluate
from tests.helpers import varied_sentiment_rows, write_csv


def test_sorted_batches_give_the_natural_orders_metrics_and_predictions(compose, tiny_overrides, tmp_path):
    from transformers import DataCollatorWithPadding

    from lora_sweep.models import load_base_model
    from lora_sweep.run import prepare

    data = write_csv(tmp_path / "reviews.csv", varied_sentiment_rows(480))
    cfg = compose(*tiny_overrides, f"data.path={data}")
    prepared = prepare(cfg)
    torch.manual_seed(0)
    model = load_base_model(
        prepared.spec, cfg.model, prepared.data.label_names, prepared.tokenizer.pad_token_id
    )
    split = prepared.data.splits["validation"]
    collator = DataCollatorWithPadding(prepared.tokenizer)
    # a head that tells rows apart (an untrained one predicts one class for all): logits centred on the
    # rows' mean pooled output
    with torch.no_grad():
        model.eval()
        batch = collator([split[i] for i in range(len(split))])
        batch.pop("labels")
        pooled = model.bert(**batch).pooler_output
        torch.nn.init.normal_(model.classifier.weight, std=20.0)
        model.classifier.bias.copy_(-model.classifier.weight @ pooled.mean(0))
    natural = make_loader(split, collator, 8, shuffle=False)
    ordered = make_loader(split, collator, 8, shuffle=False, sort_by_length=True)
    assert list(ordered.sampler) != list(natural.sampler)
    cpu = torch.device("cpu")
    a = evaluate(model, natural, cpu, "fp32", 2, per_row=True)
    b = evaluate(model, ordered, cpu, "fp32", 2, per_row=True)
    assert b["predictions"] == a["predictions"] and len(set(a["predictions"])) == 2
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert (b["accuracy"], b["macro_f1"], b["samples"]) == (a["accuracy"], a["macro_f1"], a["samples"])
    # row i's prediction is that of row i alone
    with torch.no_grad():
        model.eval()
        alone = model(**collator([split[5]])).logits.argmax(-1).item()
    assert b["predictions"][5] == alone
