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
    return lines + literature_lines(summary) + checkpoint_lines(summary)


def _points(summary: dict[str, Any]) -> bool:
    """Whether the report's metric differences read as points (a maximised metric in [0, 1])."""
    values = [row["best"] for row in (summary.get("rank") or {}).get("table", [])]
    return summary.get("direction", "maximize") == "maximize" and all(0 <= v <= 1 for v in values)


def literature_lines(summary: dict[str, Any]) -> list[str]:
    """Rank and learning rate as the literature reads them, on the sweep's numbers (Markdown lines)."""
    lines, metric = [], summary["metric"]
    rank = summary.get("rank") or {}
    if rank.get("table"):
        split = rank.get("split", 8)
        ranks = sorted({row["r"] for row in rank["table"]})
        cells = {(row["targets"], row["r"]): f"{row['best']:.4f} (#{row['trial']})" for row in rank["table"]}
        targets = list(dict.fromkeys(row["targets"] for row in rank["table"]))
        lines += [
            f"## Rank: is r > {split} flat?",
            "",
            f"Best validation {metric} per target set and rank (completed LoRA trials, trial number in "
            f"brackets). The LoRA paper (Hu et al. 2021) found little gained above r = {split}.",
            "",
            "| targets | " + " | ".join(f"r={r}" for r in ranks) + " |",
            "|---|" + "---|" * len(ranks),
        ]
        lines += [
            f"| {_cell_text(t)} | " + " | ".join(cells.get((t, r), "-") for r in ranks) + " |"
            for t in targets
        ]
        lines += ["", *[f"- {_cell_text(v)}" for v in rank.get("verdicts", {}).values()], ""]
    lr = summary.get("learning_rate")
    if lr:
        lines += [
            "## Learning rate: LoRA vs full fine-tuning",
            "",
            f"- best LoRA trial #{lr['lora']['trial']}: lr {lr['lora']['lr']:.2e}; best full fine-tuning "
            f"trial #{lr['full']['trial']}: lr {lr['full']['lr']:.2e}",
            f"- LoRA's best learning rate is {lr['ratio']:.3g}x full fine-tuning's (the literature expects "
            'about 10x with an alpha that does not grow with the rank: Biderman et al. 2024, "LoRA Without '
            "Regret\" 2025; PEFT's method comparison used 1e-4 vs 1e-5)",
        ]
        if lr.get("full_lrs_tried") == 1:
            lines.append(
                "- only one full fine-tuning learning rate was tried: the ratio is against that one value"
            )
        span = lr.get("range") or {}
        if span:
            text = "- the sweep derived the LoRA learning-rate range from the baseline:"
            if span.get("baseline_lr"):
                trial = span.get("baseline_trial")
                text += " full fine-tuning" + (f" trial #{trial}'s" if trial is not None else "'s")
                text += f" lr {span['baseline_lr']:.2e}"
                if span.get("centre"):
                    text += f" x {span['centre'] / span['baseline_lr']:.3g} = centre {span['centre']:.2e},"
            if span.get("low") and span.get("high"):
                text += f" searched {span['low']:.2e} to {span['high']:.2e} (log scale)"
            lines.append(text.rstrip(","))
            if lr.get("at_edge"):
                lines.append(
                    f"- the best LoRA learning rate sits at the {lr['at_edge']} end of that range: the best "
                    "may lie outside it (widen the span)"
                )
        lines.append("")
    return lines


def replicate_forgetting_lines(summary: dict[str, Any]) -> list[str]:
    """The forgetting measure over the replicate seeds: mean ± 95% CI per side and the paired difference."""
    if summary.get("forgetting_replicates_note"):
        return [summary["forgetting_replicates_note"], ""]
    f = summary.get("forgetting_replicates")
    if not f:
        return []
    perplexity = f["measure"] == "perplexity"
    what = "Perplexity after / before" if perplexity else "Cosine similarity to the base model"
    d = f["paired"]["difference"]
    p = f["paired"].get("p_value", float("nan"))
    if d["mean"] - d["ci95"] <= 0 <= d["mean"] + d["ci95"]:
        verdict = (
            "the interval of the difference includes 0: no evidence that LoRA and full FT forget differently"
        )
    else:  # similarity: higher is less drift; perplexity ratio: lower is less forgetting
        lora_less = (d["mean"] < 0) if perplexity else (d["mean"] > 0)
        verdict = f"LoRA forgets {'less' if lora_less else 'more'} than full FT on out-of-task text"
    return [
        f"{what} over the replicate seeds {f['seeds']} (paired by seed): LoRA "
        f"{f['lora']['mean']:.4f} ± {f['lora']['ci95']:.4f}, full FT {f['full']['mean']:.4f} ± "
        f"{f['full']['ci95']:.4f}; LoRA - full FT {d['mean']:+.4f} ± {d['ci95']:.4f} (paired t-test p "
        f"{p:.3g}): {verdict}.",
        "",
    ]


def intruder_lines(summary: dict[str, Any]) -> list[str]:
    """Intruder dimensions (Shuttleworth et al. 2024) of the chosen LoRA and of full fine-tuning, per
    matrix type, when the report counted them (``summary["intruders"]``), or why not
    (``summary["intruders_note"]``); [] when it did not try."""
    if summary.get("intruders_note"):
        return ["## Intruder dimensions", "", summary["intruders_note"], ""]
    found = summary.get("intruders")
    if not found:
        return []
    k, eps = found.get("k", found.get("top_k")), found.get("eps", found.get("epsilon"))
    sides = [(label, found.get(key)) for label, key in (("chosen LoRA", "lora"), ("full FT", "full"))]
    lines = [
        "## Intruder dimensions",
        "",
        f"An intruder dimension is one of the top {k} singular vectors of a fine-tuned weight matrix whose "
        f"cosine similarity to every singular vector of the pre-trained matrix is below {eps} (Shuttleworth "
        "et al. 2024: LoRA tends to grow them, full fine-tuning rarely does); counted on the same matrices "
        "for both.",
        "",
    ]

    def count(value: Any) -> str:
        if isinstance(value, dict):  # {"intruders": k, "of": n} or {"total": k, "matrices": m}
            got = value.get("intruders", value.get("total"))
            of = value.get("of") or (k * value["matrices"] if k and value.get("matrices") else None)
            return f"{got} of {of}" if of else str(got)
        return "-" if value is None else str(value)

    counted = [side if isinstance(side, dict) else {} for _, side in sides]
    types = list(dict.fromkeys(t for side in counted for t in side.get("by_module") or {}))
    heads = [
        f"{label} ({side['trial']})" if side.get("trial") else label
        for (label, _), side in zip(sides, counted)
    ]
    lines += [f"| matrix type | {heads[0]} | {heads[1]} |", "|---|---|---|"]
    for t in types:
        cells = [count((side.get("by_module") or {}).get(t)) for side in counted]
        lines.append(f"| {_cell_text(t)} | {cells[0]} | {cells[1]} |")
    matrices = next((side["matrices"] for side in counted if side.get("matrices")), None)
    if matrices:
        total = [str(side.get("total", "-")) for side in counted]
        of = f" (top {k} of each: {k * matrices})" if k else ""
        lines.append(f"| all {matrices} matrices{of} | {total[0]} | {total[1]} |")
    lines.append("")
    for label, side in sides:
        if isinstance(side, dict) and side.get("note"):
            lines.append(f"- {label}: {side['note']}")
        elif isinstance(side, str):
            lines.append(f"- {label}: {side}")
    if found.get("note"):
        lines.append(found["note"])
    return lines + [""]


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
    lines += replicate_forgetting_lines(summary) + intruder_lines(summary)
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
