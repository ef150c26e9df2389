"""A short causal-LM sweep end to end through the real command line: the tiny chat Llama on tiny
instruction data, three LoRA trials and a full fine-tuning baseline, minimizing validation loss, with its
MLflow records (generations tables, perplexity curves) and the report (test loss/perplexity, forgetting as
perplexity on out-of-task text, the exported adapter and merged model checked to agree)."""

from __future__ import annotations

import json
import math

import pytest

from .helpers import children, client, parents, run_sweep, write_sweep

pytestmark = pytest.mark.slow


def test_causal_sweep_with_baseline_records_and_report(tmp_path, tiny_causal):
    write_sweep(
        tmp_path,
        "lm",
        {
            "n_trials": 3,
            "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2},
            "pruner": {"name": "none"},
            "params": {
                "method.r": "choice(2, 8)",
                "method.targets": "choice(attention_qv, mlp, all_linear)",
                "train.lr": "tag(log, interval(3e-3, 3e-2))",
            },
            "enqueue": [{"method.r": 8, "method.targets": "all_linear", "train.lr": 1e-2}],
            "baseline": {
                "n_trials": 1,
                "params": {"train.lr": "tag(log, interval(1e-3, 1e-2))"},
                "enqueue": [{"train.lr": 3e-3}],
            },
            "report": {"enabled": True, "replicates": 0},
        },
    )
    result = run_sweep(tmp_path, "lm", tiny_causal)
    assert "val loss" in result.stdout and "report: reports/lm/report.html" in result.stdout

    # MLflow: one parent, four children, each with perplexity curves and a generations table
    (parent,) = parents(tmp_path, "lm")
    runs = children(tmp_path, parent.info.run_id)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        assert "val_perplexity" in run.data.metrics and "reference_perplexity_after" in run.data.metrics
        assert "generations.json" in {a.path for a in client(tmp_path).list_artifacts(run.info.run_id)}

    # the report: direction minimize, the chosen trial has the lowest loss within tolerance
    report = json.loads((tmp_path / "reports" / "lm" / "report.json").read_text())
    assert report["metric"] == "loss" and report["direction"] == "minimize"
    lora = [r for r in report["trials"] if r["role"] == "search" and r["state"] == "complete"]
    best = min(r["val_metric"] for r in lora)
    assert report["best_value"] == pytest.approx(best)
    close = [r for r in lora if r["val_metric"] <= best + report["tolerance"] + 1e-12]
    assert (
        report["chosen"]["trial"]
        == min(close, key=lambda r: (r["trainable_params"], r["val_metric"], r["trial"]))["trial"]
    )
    for label in ("chosen LoRA", "full fine-tuning"):
        test = report["test"][label]
        assert test["perplexity"] == pytest.approx(math.exp(test["loss"]))
    forgetting = report["forgetting"]
    assert forgetting["measure"] == "perplexity" and set(forgetting["perplexity"]) == {
        f"lora #{r['trial']}" for r in lora
    } | {"full #0"}
    for key, value in forgetting["perplexity"].items():
        record = json.loads(
            (
                tmp_path
                / "reports"
                / "lm"
                / next(
                    r["record"]
                    for r in report["trials"]
                    if f"{'full' if r['role'] == 'baseline' else 'lora'} #{r['trial']}" == key
                )
            ).read_text()
        )
        assert value["before"] == record["metrics"]["reference_perplexity_before"]
        assert value["ratio"] == pytest.approx(
            record["metrics"]["reference_perplexity_after"] / value["before"]
        )
    assert report["export"]["logits_agree"] and report["export"]["max_logit_difference"] < 1e-4
    assert set(report["generations"]) == {"chosen LoRA", "full fine-tuning"}
    markdown = (tmp_path / "reports" / "lm" / "report.md").read_text()
    assert "| model | trial | test loss | test perplexity |" in markdown and "after / before" in markdown
    assert "## What the models say" in markdown and (tmp_path / "reports" / "lm" / "forgetting.png").is_file()
