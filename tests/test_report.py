"""The comparison report, built from the real records of a tiny sweep (not hand-made numbers)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import torch

from lora_sweep.report.render import COLUMNS
from lora_sweep.report.select import pick_best
from tests.helpers import client, parents, run_sweep, write_sweep


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_bert_dir, tiny_csv):
    """One tiny sweep with a full-FT baseline, its report written when it ended."""
    root = tmp_path_factory.mktemp("report_sweep")
    tiny = [
        "model=local",
        f"model.name_or_path={tiny_bert_dir}",
        "data=local",
        f"data.path={tiny_csv}",
        "train.batch_size=16",
        "train.eval_batch_size=32",
        "train.max_length=16",
        "train.log_every=2",
        "tracking.system_metrics=false",
        "train.epochs=2",
        "train.eval_every=7",
        "method.targets=all_linear",
    ]
    write_sweep(
        root,
        "rep",
        {
            "n_trials": 3,
            "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2},
            "pruner": {"name": "none"},
            "params": {"method.r": "choice(1, 2, 8)", "train.lr": "tag(log, interval(2e-3, 1e-2))"},
            "enqueue": [{"method.r": 8, "train.lr": 5e-3}],
            "baseline": {
                "n_trials": 1,
                "params": {"train.lr": "tag(log, interval(1e-4, 1e-3))"},
                "enqueue": [{"train.lr": 1e-3}],
            },
            "report": {"enabled": True},  # the default: written when the sweep ends, with 3 replicate seeds
        },
    )
    result = run_sweep(root, "rep", tiny)
    return root, result, tiny_bert_dir


@pytest.mark.slow
def test_report_is_written_when_the_sweep_ends_and_logged_on_the_parent(swept):
    root, result, _ = swept
    folder = root / "reports" / "rep"
    assert "report: reports/rep/report.html" in result.stdout
    for name in (
        "report.md",
        "report.html",
        "report.json",
        "metric_vs_params.png",
        "metric_vs_params.svg",
        "metric_vs_rank.png",
        "learning_curves.png",
        "param_importance.png",
        "pruning_savings.png",
        "forgetting.png",
    ):
        assert (folder / name).is_file(), name
    (parent,) = parents(root, "rep")
    logged = {Path(a.path).name for a in client(root).list_artifacts(parent.info.run_id, "report")}
    assert {"report.md", "report.html", "report.json", "metric_vs_params.png"} <= logged


@pytest.mark.slow
def test_every_trial_appears_and_json_matches_markdown(swept):
    root, _, _ = swept
    report = json.loads((root / "reports" / "rep" / "report.json").read_text())
    markdown = (root / "reports" / "rep" / "report.md").read_text()
    rows = report["trials"]
    assert sorted((r["role"], r["trial"]) for r in rows) == [
        ("baseline", 0),
        ("search", 0),
        ("search", 1),
        ("search", 2),
    ]
    table_lines = [
        line
        for line in markdown.splitlines()
        if line.startswith("| baseline |") or line.startswith("| search |")
    ]
    assert len(table_lines) == len(rows)
    for row, line in zip(rows, table_lines):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row["role"] and cells[1].split()[0].strip("*") == str(row["trial"])
        val_column = [c for c, _, _ in COLUMNS].index("val_metric")
        assert cells[val_column] == f"{row['val_metric']:.4f}"  # the validation metric column
        # and both match the trial's own record (the report names it relative to its own folder)
        record = json.loads((root / "reports" / "rep" / row["record"]).read_text())
        assert row["val_metric"] == record["metrics"]["objective"]
        assert row["trainable_params"] == record["params"]["trainable_params"]


@pytest.mark.slow
def test_the_chosen_trial_obeys_the_stated_rule(swept):
    root, _, _ = swept
    report = json.loads((root / "reports" / "rep" / "report.json").read_text())
    rows = pd.DataFrame(report["trials"])
    lora = rows[(rows["role"] == "search") & (rows["state"] == "complete")]
    best = lora["val_metric"].max()
    close = lora[lora["val_metric"] >= best - report["tolerance"] - 1e-12]
    assert (
        report["chosen"]["trial"]
        == close.sort_values(["trainable_params", "val_metric", "trial"], ascending=[True, False, True]).iloc[
            0
        ]["trial"]
    )
    assert (
        "fewest trainable parameters" in report["rule"]
        and report["rule"] in (root / "reports" / "rep" / "report.md").read_text()
    )


def test_rule_tie_breaks():
    table = pd.DataFrame(
        [
            {
                "role": "search",
                "state": "complete",
                "trial": 0,
                "val_metric": 0.900,
                "trainable_params": 5000,
            },
            {
                "role": "search",
                "state": "complete",
                "trial": 1,
                "val_metric": 0.897,
                "trainable_params": 1000,
            },  # close, smaller
            {
                "role": "search",
                "state": "complete",
                "trial": 2,
                "val_metric": 0.899,
                "trainable_params": 1000,
            },  # same size, better
            {
                "role": "search",
                "state": "complete",
                "trial": 3,
                "val_metric": 0.899,
                "trainable_params": 1000,
            },  # later twin
            {
                "role": "search",
                "state": "complete",
                "trial": 4,
                "val_metric": 0.880,
                "trainable_params": 10,
            },  # too far behind
            {
                "role": "search",
                "state": "pruned",
                "trial": 5,
                "val_metric": 0.950,
                "trainable_params": 10,
            },  # pruned: not eligible
            {
                "role": "baseline",
                "state": "complete",
                "trial": 0,
                "val_metric": 0.990,
                "trainable_params": 10**7,
            },  # not LoRA
        ]
    )
    choice = pick_best(table, "accuracy", "maximize", tolerance=0.005)
    assert choice.row["trial"] == 2 and choice.best_value == 0.900 and choice.candidates == [0, 1, 2, 3]
    assert pick_best(table, "accuracy", "maximize", tolerance=0.0).row["trial"] == 0
    loss = table.assign(val_metric=1 - table["val_metric"])
    assert pick_best(loss, "loss", "minimize", tolerance=0.005).row["trial"] == 2


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls, self.stack, self.images = [], [], 0

    def handle_starttag(self, tag, attrs):
        if tag not in ("meta", "img", "br", "hr", "link", "input"):
            self.stack.append(tag)
        self.images += tag == "img"
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"


@pytest.mark.slow
def test_html_is_valid_and_self_contained(swept):
    root, _, _ = swept
    page = (root / "reports" / "rep" / "report.html").read_text()
    parser = _Links()
    parser.feed(page)
    assert not parser.stack  # every element closed
    assert parser.images >= 6 and all(url.startswith("data:image/png;base64,") for url in parser.urls)
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)  # nothing loads from a network


@pytest.mark.slow
def test_test_split_only_for_the_chosen_and_the_baseline(swept):
    root, _, _ = swept
    report = json.loads((root / "reports" / "rep" / "report.json").read_text())
    assert set(report["test"]) == {"chosen LoRA", "full fine-tuning"}
    assert report["test"]["chosen LoRA"]["trial"] == f"lora #{report['chosen']['trial']}"
    for row in report["trials"]:  # the sweep itself never touched the test split
        record = json.loads((root / "reports" / "rep" / row["record"]).read_text())
        assert not any(k.startswith("test_") for k in record["metrics"])
    similarity = report["forgetting"]["cosine_similarity_to_base"]
    assert set(similarity) == {"full #0", "lora #0", "lora #1", "lora #2"} and all(
        -1 <= v <= 1 for v in similarity.values()
    )


@pytest.mark.slow
def test_exported_adapter_and_merged_model_load_and_agree_and_are_registered(swept):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root, _, base_dir = swept
    report = json.loads((root / "reports" / "rep" / "report.json").read_text())
    export = report["export"]
    assert export["logits_agree"] and export["max_logit_difference"] < 1e-4
    best = root / "reports" / "rep" / "best"
    tokenizer = AutoTokenizer.from_pretrained(best / "merged")
    batch = tokenizer(
        ["the movie was good", "a dull boring film", "great cast"], return_tensors="pt", padding=True
    )
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    adapter = PeftModel.from_pretrained(base, best / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(best / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapter(**batch).logits, merged(**batch).logits, atol=1e-5, rtol=1e-4)
    version = client(root).get_model_version_by_alias("rep", "champion")
    assert version.source == str((best / "merged").resolve())
    assert version.run_id == next(
        r["mlflow_run_id"]
        for r in report["trials"]
        if r["role"] == "search" and r["trial"] == report["chosen"]["trial"]
    )


@pytest.mark.slow
def test_on_demand_by_study_name_and_by_parent_run_id(swept, tmp_path):
    root, _, _ = swept
    (parent,) = parents(root, "rep")
    for target in ("rep", parent.info.run_id):
        out = tmp_path / target
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "lora_sweep.report",
                target,
                "--out",
                str(out),
                "--tracking-uri",
                f"sqlite:///{root / 'mlflow.db'}",
            ],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert (
            json.loads((out / "rep" / "report.json").read_text())["chosen"]["trial"]
            == json.loads((root / "reports" / "rep" / "report.json").read_text())["chosen"]["trial"]
        )
    missing = subprocess.run(
        [sys.executable, "-m", "lora_sweep.report", "nope"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and missing.stderr.strip().startswith(
        "error: sweep='nope': neither a study folder"
    )


@pytest.mark.slow
def test_replicates_pair_the_chosen_config_with_full_ft_over_seeds(swept):
    root, _, _ = swept
    report = json.loads((root / "reports" / "rep" / "report.json").read_text())
    rep = report["replicates"]
    assert rep["seeds"] == [1, 2, 3]
    for split in ("validation", "test"):
        for label in ("lora", "full"):
            values = rep[split][label]["values"]
            assert len(values) == 3 and rep[split][label]["mean"] == pytest.approx(sum(values) / 3)
        diff = rep[split]["paired"]["difference"]
        paired_values = [a - b for a, b in zip(rep[split]["lora"]["values"], rep[split]["full"]["values"])]
        assert diff["mean"] == pytest.approx(sum(paired_values) / 3)
    (parent,) = parents(root, "rep")
    runs = client(root).search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
        "and tags.`lora_sweep.role` = 'replicate'",
    )
    assert sorted(
        (r.data.tags["lora_sweep.replicate_of"], r.data.tags["lora_sweep.seed"]) for r in runs
    ) == sorted((label, str(seed)) for label in ("lora", "full") for seed in (1, 2, 3))
    for r in runs:  # a replicate trains the chosen configuration with only the seed changed
        assert r.data.params["train.seed"] == r.data.tags["lora_sweep.seed"]
    assert "## Replicates" in (root / "reports" / "rep" / "report.md").read_text()


def test_confidence_interval_and_paired_test():
    from lora_sweep.report.replicates import interval, paired

    ci = interval([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["ci95"] == pytest.approx(
        4.302652729911275 / 3**0.5
    )  # t(0.975, 2) * sd / sqrt(n)
    result = paired([0.80, 0.82, 0.81], [0.83, 0.84, 0.85])
    assert result["difference"]["mean"] == pytest.approx(-0.03) and 0 < result["p_value"] < 0.05


def test_truncation_notes_group_the_trials_that_cut_the_same_rows():
    from lora_sweep.report import truncation_notes

    def record(max_length, cut, dropped=None):
        return {
            "data": {
                "max_length": max_length,
                "truncated": {
                    "train": {"rows": cut, "of": 400, "share": cut / 400, "median_tokens": 412},
                    "validation": {"rows": 3, "of": 80, "share": 3 / 80, "median_tokens": 15},
                },
                "dropped": dropped or {},
            }
        }

    records = {
        "lora #0": record(128, 388),
        "lora #1": record(128, 388),
        "full #0": record(128, 388),
        "lora #2": record(512, 0),
        "lora #3": record(64, 20, {"all": {"rows": 50, "of": 500, "share": 0.1}}),
        "old": {"data": {}},  # a record written before truncation was counted
    }
    assert truncation_notes(records) == [
        "train.max_length=128 truncates 97% of the train rows (388 of 400, median 412 tokens), 4% of the "
        "validation rows (3 of 80) in trials lora #0, lora #1, full #0",
        "train.max_length=64 truncates 5% of the train rows (20 of 400, median 412 tokens), 4% of the "
        "validation rows (3 of 80) and drops 10% of the rows (50 of 500) in trial lora #3",
        "train.max_length=512 truncates 4% of the validation rows (3 of 80) in trial lora #2",
    ]
    assert truncation_notes({"a": record(512, 0) | {"data": {"truncated": {}, "dropped": {}}}}) == []
