"""Write the report as report.md, a self-contained report.html (figures embedded, sortable table, no
network) and report.json (the same numbers, machine readable)."""

from __future__ import annotations

import base64
import html
import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from lora_sweep.ranking import sign

COLUMNS = [  # (column, header, format)
    ("role", "role", "{}"),
    ("trial", "trial", "{}"),
    ("method", "method", "{}"),
    ("r", "rank", "{:.0f}"),
    ("alpha", "alpha", "{:g}"),
    ("scaling", "scaling", "{:.3g}"),
    ("targets", "targets", "{}"),
    ("variant", "variant", "{}"),
    ("mergeable", "merges into W", "{}"),
    ("lr", "lr", "{:.2e}"),
    ("state", "state", "{}"),
    ("val_metric", "val {metric}", "{:.4f}"),
    ("gap_to_full", "gap to full FT", "{:+.4f}"),
    ("trainable_params", "trainable", "{:,.0f}"),
    ("trainable_pct", "trainable %", "{:.2f}"),
    ("metric_per_m_params", "{metric} / M params", "{:.3g}"),
    ("peak_memory_mb", "peak MB", "{:.0f}"),
    ("peak_cuda_reserved_mb", "CUDA reserved MB", "{:.0f}"),
    ("train_seconds", "train s", "{:.0f}"),
    ("tokens_per_second", "tokens/s", "{:.0f}"),
    ("mfu_pct", "MFU %", "{:.1f}"),
    ("checkpoint_mb", "checkpoint MB", "{:.2f}"),
]


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _state(row: pd.Series) -> str:
    reason = row.get("fail_reason")
    return (
        f"{row['state']}: {str(reason)[:60]}"
        if row["state"] == "failed" and isinstance(reason, str)
        else row["state"]
    )


def markdown_table(table: pd.DataFrame, metric: str, chosen: int | None) -> str:
    headers = [h.format(metric=metric) for _, h, _ in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for _, row in table.iterrows():
        cells = [_state(row) if c == "state" else _cell(row.get(c), f) for c, _, f in COLUMNS]
        cells = [cell.replace("|", "\\|") for cell in cells]  # a '|' in a failure reason would split the row
        if row["role"] == "search" and row["trial"] == chosen:
            cells[1] = f"**{cells[1]}** (chosen)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """numpy scalars as Python numbers (exact, unlike pandas' to_json), NaN as null."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def to_json(summary: dict[str, Any], table: pd.DataFrame) -> str:
    rows = [
        {k: _plain(v) for k, v in row.items()}
        for row in table.drop(columns=["evaluations"]).to_dict(orient="records")
    ]
    return json.dumps(
        {**summary, "trials": rows}, indent=2, default=lambda v: _plain(v) if hasattr(v, "item") else str(v)
    )


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """Everything above the trials table, as Markdown lines (the HTML renders the same lines)."""
    metric = summary["metric"]
    chosen = summary.get("chosen") or {}
    lines = [summary["headline"], "", "## The chosen checkpoint", "", f"Rule: {summary['rule']}.", ""]
    if chosen:
        lines += [
            f"- trial {chosen['trial']}: {describe_method(chosen)}, lr {chosen['lr']:.2e}",
            f"- validation {metric} {chosen['val_metric']:.4f}; {chosen['trainable_params']:,.0f} trainable "
            "parameters "
            f"({chosen['trainable_pct']:.2f}%); checkpoint `{chosen['checkpoint']}`",
            "",
        ]
    else:
        lines += ["No LoRA trial has completed yet.", ""]
    if summary.get("truncation"):
        lines += ["## Truncation at train.max_length", "", *[f"- {n}" for n in summary["truncation"]], ""]
    return lines + checkpoint_lines(summary)


def describe_method(row: dict[str, Any]) -> str:
    """``LoRA r=8, alpha=16, targets attention_qv, variant lora``; only the settings the method has."""
    name = {
        "lora": "LoRA",
        "loha": "LoHa",
        "lokr": "LoKr",
        "ia3": "IA3",
        "adalora": "AdaLoRA",
        "vera": "VeRA",
    }
    parts = [name.get(row["method"], row["method"])]
    settings = [
        ("r", "r={:.0f}"),
        ("alpha", "alpha={:g}"),
        ("targets", "targets {}"),
        ("variant", "variant {}"),
    ]
    details = [
        f.format(row[key]) for key, f in settings if row.get(key) is not None and row.get(key) == row.get(key)
    ]
    if row.get("mergeable") is False:
        details.append("not mergeable into W")
    return " ".join(parts) + (" " + ", ".join(details) if details else "")


def to_markdown(summary: dict[str, Any], table: pd.DataFrame, figures: dict[str, Path]) -> str:
    chosen = summary.get("chosen") or {}
    parts = [f"# Sweep report: {summary['study']}", "", *summary_lines(summary)]
    parts += [
        "## Every trial",
        "",
        markdown_table(table, summary["metric"], chosen.get("trial")),
        "",
        "## Figures",
        "",
    ]
    for title, path in figures.items():
        parts += [f"### {title}", "", f"![{title}]({path.name})", ""]
    return "\n".join(parts)


def checkpoint_lines(summary: dict[str, Any]) -> list[str]:
    """Test scores, forgetting and export, as Markdown lines (also shown, escaped, in the HTML)."""
    metric, lines = summary["metric"], []
    if summary.get("test"):
        # the columns the task chose (a report.json written before tasks said so: as reports did then)
        has_perplexity = all("perplexity" in t for t in summary["test"].values())
        old = "perplexity" if metric == "loss" and has_perplexity else "loss"
        metric, second = summary.get("test_columns") or (metric, old)
        lines += [
            "## Held-out test split (evaluated only for these two)",
            "",
            f"| model | trial | test {metric} | test {second} |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {label} | {t['trial']} | {t[metric]:.4f} | {t[second]:.4f} |"
            for label, t in summary["test"].items()
        ]
        lines.append("")
    if summary.get("replicates_note"):
        lines += ["## Replicates", "", summary["replicates_note"], ""]
    if summary.get("replicates"):
        rep = summary["replicates"]
        lines += [
            "## Replicates",
            "",
            f"The chosen LoRA configuration and the full fine-tuning baseline, trained again with seeds "
            f"{rep['seeds']} (paired by seed): mean ± 95% confidence interval.",
            "",
            "| split | LoRA | full FT | LoRA - full FT (paired) | paired t-test p |",
            "|---|---|---|---|---|",
        ]
        for split in ("validation", "test"):
            r = rep[split]
            d = r["paired"]["difference"]
            lines.append(
                f"| {split} {metric} | {r['lora']['mean']:.4f} ± {r['lora']['ci95']:.4f} | "
                f"{r['full']['mean']:.4f} ± "
                f"{r['full']['ci95']:.4f} | {d['mean']:+.4f} ± {d['ci95']:.4f} | "
                f"{r['paired'].get('p_value', float('nan')):.3g} |"
            )
        d = rep["test"]["paired"]["difference"]
        lora_better = sign(summary.get("direction", "maximize")) * d["mean"] > 0
        verdict = (
            "the interval of the difference includes 0: no evidence that LoRA and full FT differ on test"
            if d["mean"] - d["ci95"] <= 0 <= d["mean"] + d["ci95"]
            else f"LoRA is better on test by {abs(d['mean']):.4f}"
            if lora_better
            else f"full FT is better on test by {abs(d['mean']):.4f}"
        )
        lines += ["", f"Verdict: {verdict}.", ""]
    if summary.get("forgetting", {}).get("measure") == "perplexity":
        f = summary["forgetting"]
        lines += [
            "## Forgetting",
            "",
            f"Perplexity on {f['reference_texts']} out-of-task texts (NYT editorial snippets) before and "
            "after fine-tuning (ratio 1.0: nothing forgotten; higher: the model got worse at text outside "
            "the task):",
            "",
            "| model | before | after | after / before |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {key} | {v['before']:.2f} | {v['after']:.2f} | {v['ratio']:.3f} |"
            for key, v in sorted(f["perplexity"].items(), key=lambda kv: kv[1]["ratio"])
        ]
        lines.append("")
    elif summary.get("forgetting"):
        sims = summary["forgetting"]["cosine_similarity_to_base"]
        lines += [
            "## Forgetting",
            "",
            f"Mean cosine similarity to the base model's pooled representations on "
            f"{summary['forgetting']['reference_texts']} out-of-task sentences (1.0: unchanged):",
            "",
        ]
        lines += [f"- {key}: {value:.4f}" for key, value in sorted(sims.items(), key=lambda kv: -kv[1])]
        lines.append("")
    elif summary.get("forgetting_note"):
        lines += ["## Forgetting", "", summary["forgetting_note"], ""]
    lines += intruder_lines(summary)
    if summary.get("generations"):
        lines += [
            "## What the models say",
            "",
            "Greedy answers to the run's fixed prompts, from the best checkpoint of each:",
            "",
        ]
        for label, rows in summary["generations"].items():
            lines += [f"**{label}**", "", "| prompt | response |", "|---|---|"]
            lines += [f"| {_cell_text(r['prompt'])} | {_cell_text(r['response'])} |" for r in rows]
            lines.append("")
    if summary.get("export"):
        e = summary["export"]
        merged = (
            f"- merged model: `{e['merged']}`"
            if e.get("merged")
            else "- not mergeable: this method's adapter does not fold into W; ship it with its base model"
        )
        if e.get("merged") and e.get("dequantized_from"):
            merged += (
                f" (the {e['dequantized_from']} base dequantized to {e.get('merged_dtype', 'float32')}, "
                "the adapter merged into it: loads without bitsandbytes)"
            )
        lines += [
            "## Export",
            "",
            f"- PEFT adapter: `{e['adapter']}`",
            merged,
            f"- reloaded from disk, they agree on {e['samples_checked']} sentences: max logit difference "
            f"{e['max_logit_difference']:.2e} ({'ok' if e['logits_agree'] else 'MISMATCH'})",
        ]
        if summary.get("registry"):
            r = summary["registry"]
            kept = r.get("registered") is False
            unchanged = " (unchanged: it already holds this checkpoint)" if kept else ""
            lines.append(
                f"- MLflow model registry: `{r['name']}` version {r['version']}, alias `{r['alias']}`"
                + unchanged
            )
        lines.append("")
    return lines


def intruder_lines(summary: dict[str, Any]) -> list[str]:
    """The intruder-dimension counts of the chosen adapter and of full fine-tuning (none: no lines)."""
    if summary.get("intruders_note"):
        return ["## Intruder dimensions", "", summary["intruders_note"], ""]
    found = summary.get("intruders")
    if not found:
        return []
    kinds = list(dict.fromkeys([*found["lora"]["by_module"], *found["full"]["by_module"]]))  # model order
    lines = [
        "## Intruder dimensions",
        "",
        found["note"],
        "",
        f"| model | intruders of top-{found['k']} slots | " + " | ".join(kinds) + " |",
        "|---|---|" + "---|" * len(kinds),
    ]
    for label, key in (("chosen LoRA", "lora"), ("full fine-tuning", "full")):
        side = found[key]
        slots = side["matrices"] * found["k"]
        counts = " | ".join(str(side["by_module"].get(kind, 0)) for kind in kinds)
        lines.append(f"| {label} | {side['total']} of {slots} | {counts} |")
    return [*lines, ""]


def _inline(text: str) -> str:
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", escaped)


def lines_to_html(lines: list[str]) -> str:
    """The small Markdown the summary uses (headings, paragraphs, bullets, tables) as HTML."""
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            out.append(f"<h2>{_inline(line[3:])}</h2>")
        elif line.startswith("| "):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not set(lines[i]) <= set("|-: "):
                    rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
            body = "".join(
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows[1:]
            )
            out.append(f"<table class='small'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append(f"<ul>{''.join(items)}</ul>")
            continue
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def to_html(markdown_summary: dict[str, Any], table: pd.DataFrame, figures: dict[str, Path]) -> str:
    s = markdown_summary
    metric = s["metric"]
    chosen = (s.get("chosen") or {}).get("trial")
    head = "".join(
        f"<th onclick='sortBy({i})'>{html.escape(h.format(metric=metric))}</th>"
        for i, (_, h, _) in enumerate(COLUMNS)
    )
    body = []
    for _, row in table.iterrows():
        cells = []
        for c, _, f in COLUMNS:
            value = row.get(c)
            text = _state(row) if c == "state" else _cell(value, f)
            key = (
                value
                if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))
                else text
            )
            cells.append(f"<td data-key='{html.escape(str(key))}'>{html.escape(text)}</td>")
        mark = " class='chosen'" if row["role"] == "search" and row["trial"] == chosen else ""
        body.append(f"<tr{mark}>{''.join(cells)}</tr>")
    images = "".join(
        f"<figure><img alt='{html.escape(t)}' "
        f"src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
        f"<figcaption>{html.escape(t)}</figcaption></figure>"
        for t, p in figures.items()
    )
    title = html.escape(s["study"])
    return "\n".join(
        [
            '<!doctype html><html lang="en"><head><meta charset="utf-8">',
            f"<title>Sweep report: {title}</title><style>{_asset('report.css')}</style></head><body>",
            f"<h1>Sweep report: {title}</h1>",
            lines_to_html(summary_lines(s)),
            "<h2>Every trial</h2><p>Click a column to sort.</p>",
            f'<table id="trials"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>',
            f"<h2>Figures</h2>{images}",
            f"<script>{_asset('report.js')}</script></body></html>",
        ]
    )


def _asset(name: str) -> str:
    """The report's stylesheet and script, package data inlined so that report.html stands alone."""
    return (resources.files("lora_sweep.report") / name).read_text()


def _cell_text(text: str) -> str:
    """Free text inside a Markdown table cell: one line, no column breaks."""
    return " ".join(str(text).split()).replace("|", "\\|") or " "
