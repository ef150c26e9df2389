"""report/render: Markdown, HTML and JSON of a small hand-made summary and trials table."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest

from lora_sweep.report.render import COLUMNS, checkpoint_lines, to_html, to_json, to_markdown

from .helpers import trial_row, trials_frame

PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"
    b"\x00\x00\x00\rIDATx\x9cc\xf8\xff\xff?\x00\x05\xfe\x02\xfe\xa7V\xbd\xfa\x00\x00\x00\x00IEND\xaeB`\x82"
)


def _table():
    return trials_frame(
        trial_row(0, 0.9012, 74_498, lr=2e-3, gap_to_full=-0.02, metric_per_m_params=12.1),
        trial_row(
            1,
            0.8950,
            9_000,
            r=np.float64(2.0),
            alpha=4.0,
            lr=5e-3,
            gap_to_full=-0.0262,
            metric_per_m_params=99.4,
        ),
        trial_row(
            2,
            math.nan,
            None,
            state="failed",
            fail_reason="TrainingDiverged: <b>loss</b> is nan at step 6",
            gap_to_full=math.nan,
            metric_per_m_params=math.nan,
        ),
        trial_row(0, 0.9212, 22_788_484, role="baseline", gap_to_full=0.0, metric_per_m_params=0.04),
    )


def _summary(**extra):
    chosen = trial_row(1, 0.8950, 9_000, r=2.0, alpha=4.0, lr=5e-3)
    chosen.pop("evaluations")
    return {
        "study": "tiny & <quick>",
        "metric": "accuracy",
        "direction": "maximize",
        "tolerance": 0.005,
        "rule": "the highest validation accuracy; then the fewest trainable parameters",
        "best_value": 0.9012,
        "within_tolerance": [0, 1],
        "chosen": chosen,
        "headline": "2 LoRA trials and 1 full fine-tuning trial.",
        "parent_run_id": "abc123",
        **extra,
    }


def test_markdown_has_the_rule_the_chosen_trial_and_every_row(tmp_path):
    figure = tmp_path / "metric_vs_params.png"
    figure.write_bytes(PNG)
    text = to_markdown(_summary(), _table(), {"validation accuracy vs trainable parameters": figure})
    lines = text.splitlines()
    assert lines[0] == "# Sweep report: tiny & <quick>"
    assert "Rule: the highest validation accuracy; then the fewest trainable parameters." in lines
    assert "- trial 1: LoRA r=2, alpha=4, targets attention_qv, variant lora, lr 5.00e-03" in lines
    assert any(
        line.startswith("- validation accuracy 0.8950; 9,000 trainable parameters (0.90%)") for line in lines
    )
    table = [line for line in lines if line.startswith("| ") and ("search" in line or "baseline" in line)]
    assert len(table) == 4
    header = next(line for line in lines if line.startswith("| role |"))
    assert (
        header.count("|") == len(COLUMNS) + 1 and "val accuracy" in header and "accuracy / M params" in header
    )
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in table]
    assert (
        cells[1][1] == "**1** (chosen)" and cells[0][1] == "0" and cells[3][1] == "0"
    )  # only the LoRA trial 1
    at = {column: i for i, (column, _, _) in enumerate(COLUMNS)}
    assert (
        cells[0][:4] == ["search", "0", "lora", "8"]
        and cells[0][at["lr"]] == "2.00e-03"
        and cells[0][at["val_metric"]] == "0.9012"
    )
    assert cells[0][at["trainable_params"]] == "74,498" and cells[0][at["gap_to_full"]] == "-0.0200"
    assert (
        cells[2][at["state"]].startswith("failed: TrainingDiverged")
        and cells[2][at["val_metric"]] == "-"
        and cells[2][at["trainable_params"]] == "-"
    )  # NaN, None
    assert "![validation accuracy vs trainable parameters](metric_vs_params.png)" in lines


def test_a_bar_in_a_fail_reason_stays_in_its_cell():
    table = trials_frame(trial_row(0, None, None, state="failed", fail_reason="ValueError: a | b"))
    row = next(
        line
        for line in to_markdown(_summary(chosen=None), table, {}).splitlines()
        if line.startswith("| search")
    )
    assert row.count("|") - row.count("\\|") == len(COLUMNS) + 1


def test_no_chosen_trial_says_so():
    text = to_markdown(_summary(chosen=None), _table(), {})
    assert "No LoRA trial has completed yet." in text and "(chosen)" not in text


def test_json_holds_the_same_numbers_and_no_nan():
    table = _table()
    data = json.loads(to_json(_summary(), table))
    assert (
        data["study"] == "tiny & <quick>"
        and data["chosen"]["trial"] == 1
        and data["within_tolerance"] == [0, 1]
    )
    rows = data["trials"]
    assert len(rows) == 4 and all("evaluations" not in row for row in rows)
    assert [(r["role"], r["trial"], r["val_metric"]) for r in rows] == [
        ("search", 0, 0.9012),
        ("search", 1, 0.895),
        ("search", 2, None),
        ("baseline", 0, 0.9212),
    ]
    assert rows[1]["r"] == 2.0 and isinstance(
        rows[1]["r"], float
    )  # a numpy scalar, written as a plain number
    assert rows[2]["trainable_params"] is None and rows[2]["gap_to_full"] is None
    assert rows[0]["trainable_params"] == 74_498 and rows[3]["lr"] == 1e-4  # exact, not pandas' rounding
    assert set(rows[0]) == set(table.columns) - {"evaluations"}


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.rows, self.images, self.text, self.headers = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in ("meta", "img", "br"):
            self.stack.append(tag)
        if tag == "tr" and "tbody" in self.stack and self._in_trials:
            self.rows.append({"class": attrs.get("class"), "cells": []})
        if tag == "td" and self.rows and self._in_trials:
            self.rows[-1]["cells"].append(attrs.get("data-key"))
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "table":
            self._in_trials = attrs.get("id") == "trials"

    _in_trials = False

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack)
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)
        if self.stack and self.stack[-1] == "th" and self._in_trials:
            self.headers.append(data)


def test_html_is_well_formed_self_contained_and_escaped(tmp_path):
    figure = tmp_path / "fig.png"
    figure.write_bytes(PNG)
    page = to_html(_summary(), _table(), {"a figure": figure})
    parser = _Page()
    parser.feed(page)
    parser.close()
    assert parser.stack == []  # every tag closed, in order
    assert (
        len(parser.headers) == len(COLUMNS)
        and parser.headers[[c for c, _, _ in COLUMNS].index("val_metric")] == "val accuracy"
    )
    assert len(parser.rows) == 4 and all(len(r["cells"]) == len(COLUMNS) for r in parser.rows)
    assert [r["class"] for r in parser.rows] == [None, "chosen", None, None]
    assert (
        float(parser.rows[0]["cells"][[c for c, _, _ in COLUMNS].index("trainable_params")]) == 74498
    )  # sort keys are raw numbers, not "74,498"
    assert parser.images and all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert (
        "http://" not in page and "https://" not in page and "<b>loss</b>" not in page
    )  # no network, text escaped
    text = "".join(parser.text)
    assert "Sweep report: tiny & <quick>" in text and "TrainingDiverged: <b>loss</b> is nan" in text


def _replicates(mean: float, ci: float) -> dict:
    split = {
        "lora": {"mean": 0.90, "ci95": 0.01},
        "full": {"mean": 0.90 - mean, "ci95": 0.01},
        "paired": {"difference": {"mean": mean, "ci95": ci}, "p_value": 0.04},
    }
    return {"seeds": [1, 2, 3], "validation": split, "test": split}


@pytest.mark.parametrize(
    ("mean", "ci", "direction", "verdict"),
    [
        (
            0.002,
            0.010,
            "maximize",
            "Verdict: the interval of the difference includes 0: no evidence that LoRA and full FT differ",
        ),
        (0.030, 0.010, "maximize", "Verdict: LoRA is better on test by 0.0300."),
        (-0.030, 0.010, "maximize", "Verdict: full FT is better on test by 0.0300."),
        (-0.030, 0.010, "minimize", "Verdict: LoRA is better on test by 0.0300."),  # a lower loss is better
    ],
)
def test_replicate_verdict(mean, ci, direction, verdict):
    lines = checkpoint_lines(
        {"metric": "accuracy", "direction": direction, "replicates": _replicates(mean, ci)}
    )
    assert any(line.startswith(verdict) for line in lines), lines
    assert (
        f"| test accuracy | 0.9000 ± 0.0100 | {0.90 - mean:.4f} ± 0.0100 | {mean:+.4f} ± {ci:.4f} | 0.04 |"
        in lines
    )


def test_test_forgetting_and_export_sections():
    summary = {
        "metric": "accuracy",
        "test": {
            "chosen LoRA": {"trial": "lora #1", "accuracy": 0.88, "loss": 0.31},
            "full fine-tuning": {"trial": "full #0", "accuracy": 0.9, "loss": 0.25},
        },
        "forgetting": {"reference_texts": 64, "cosine_similarity_to_base": {"lora #1": 0.99, "full #0": 0.8}},
        "export": {
            "adapter": "/r/best/adapter",
            "merged": "/r/best/merged",
            "samples_checked": 16,
            "max_logit_difference": 3e-7,
            "logits_agree": True,
        },
    }
    lines = checkpoint_lines(summary)
    assert (
        "| chosen LoRA | lora #1 | 0.8800 | 0.3100 |" in lines
        and "| full fine-tuning | full #0 | 0.9000 | 0.2500 |" in lines
    )
    assert lines.index("- lora #1: 0.9900") < lines.index("- full #0: 0.8000")  # least drift first
    assert "- reloaded from disk, they agree on 16 sentences: max logit difference 3.00e-07 (ok)" in lines
    assert (
        checkpoint_lines({"metric": "accuracy", "forgetting_note": "not measured: no texts"})[-2]
        == "not measured: no texts"
    )


def test_a_report_names_paths_relative_to_its_own_folder(tmp_path):
    from lora_sweep.report import relative_paths

    folder = tmp_path / "reports" / "quick"
    found = relative_paths(
        {
            "checkpoint": str(tmp_path / "outputs" / "best"),
            "runs": [str(folder / "best")],
            "rule": "the highest",
        },
        folder,
    )
    assert found == {"checkpoint": "../../outputs/best", "runs": ["best"], "rule": "the highest"}


def test_truncation_notes_are_a_section_of_the_report(tmp_path):
    note = "train.max_length=128 truncates 97% of the train rows (388 of 400, median 412 tokens) in trial 0"
    markdown = to_markdown(_summary(truncation=[note]), _table(), {})
    assert f"## Truncation at train.max_length\n\n- {note}\n" in markdown
    assert "Truncation at train.max_length" not in to_markdown(_summary(), _table(), {})
    assert "truncates 97% of the train rows" in to_html(_summary(truncation=[note]), _table(), {})
