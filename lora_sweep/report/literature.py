"""What the literature says to look for, on the sweep's own numbers (read, never trained):

- metric vs rank per target set: is rank > 8 flat, as in the LoRA paper's ablations (Hu et al. 2021)? The best
  completed trial above r = 8 against the best at or below it, per target set, judged against the seed noise
  the replicates measured (else the report's tolerance);
- LoRA's best learning rate against full fine-tuning's: with a fixed alpha the best LoRA learning rate is
  about 10x full fine-tuning's (Biderman et al. 2024; "LoRA Without Regret", 2025), and the sweep may have
  centred its LoRA range on the baseline's (the search study's ``lora_sweep_lr_range`` attribute);
- forgetting with intervals: the forgetting measure of every replicate of the chosen LoRA configuration and of
  the best full fine-tuning one, mean and 95% interval per side and the paired difference by seed.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from lora_sweep.ranking import maximizes, rank_key, sign
from lora_sweep.sweep.trials import best_full

RANK_SPLIT = 8  # the LoRA paper's ablations: little gained above r = 8
LR_RANGE_ATTR = "lora_sweep_lr_range"  # the search study's user attribute, written by the sweeper
NO_REPLICATES = "the interval needs replicates: run the sweep with hydra.sweeper.report.replicates=N"


def with_target_sets(table: pd.DataFrame, search) -> pd.DataFrame:
    """``table`` with a ``target_set`` column: the name the sweep sampled (a preset or a ``target_sets``
    name; a record holds only the resolved module list), else the trial's own targets."""
    sampled = {t.number: t.params.get("method.targets") for t in search.get_trials(deepcopy=False)}
    names = [
        sampled.get(row["trial"]) if row["role"] == "search" and isinstance(sampled.get(row["trial"]), str)
        else row.get("targets")
        for _, row in table.iterrows()
    ]  # fmt: skip
    return table.assign(target_set=names) if len(table) else table


def _in_points(table: pd.DataFrame, direction: str) -> bool:
    """A maximised metric in [0, 1] (accuracy, F1): differences read as points (x 100)."""
    values = table["val_metric"].dropna() if "val_metric" in table else []
    return maximizes(direction) and len(values) > 0 and bool(((values >= 0) & (values <= 1)).all())


def _difference(value: float, points: bool) -> str:
    return f"{100 * value:+.1f} points" if points else f"{value:+.4f}"


def _width(value: float, points: bool) -> str:
    return f"±{100 * value:.1f} points" if points else f"±{value:.4f}"


def rank_noise(replicates: dict[str, Any] | None, tolerance: float) -> dict[str, Any]:
    """What a difference between two trials must exceed to count: the half-width of the chosen LoRA
    configuration's 95% interval over its replicate seeds when the replicates ran, else the tolerance."""
    lora = ((replicates or {}).get("validation") or {}).get("lora") or {}
    width = lora.get("ci95")
    if isinstance(width, (int, float)) and math.isfinite(width):
        source = f"the chosen LoRA's replicate 95% interval over {lora['n']} seeds"
        return {"value": float(width), "source": source}
    return {"value": float(tolerance), "source": "the report's tolerance"}


def rank_summary(table: pd.DataFrame, metric: str, direction: str, noise: dict[str, Any]) -> dict[str, Any]:
    """The best completed trial per (target set, rank), and per target set one sentence on whether the
    ranks above :data:`RANK_SPLIT` gain anything over those at or below it."""
    done = table[(table["role"] == "search") & (table["state"] == "complete")]
    done = done[done["val_metric"].notna() & done["r"].notna()]
    points = _in_points(done, direction)
    column = "target_set" if "target_set" in done else "targets"
    several = done["method"].nunique() > 1 if "method" in done else False
    rows, verdicts = [], {}
    methods = done["method"] if "method" in done else [None] * len(done)
    labels = [f"{m} {t}" if several else str(t) for m, t in zip(methods, done[column])]
    for label, group in done.assign(_label=labels).groupby("_label", sort=True):
        best_per_rank = {}
        for r, at in group.groupby("r"):
            top = at.assign(_key=rank_key(at["val_metric"], direction)).sort_values(["_key", "trial"]).iloc[0]
            best_per_rank[int(r)] = (float(top["val_metric"]), int(top["trial"]))
            rows.append(
                {"targets": label, "r": int(r), "best": float(top["val_metric"]), "trial": int(top["trial"])}
            )
        low = {r: v for r, v in best_per_rank.items() if r <= RANK_SPLIT}
        high = {r: v for r, v in best_per_rank.items() if r > RANK_SPLIT}
        if not low or not high:
            ranks = ", ".join(str(r) for r in sorted(best_per_rank))
            verdicts[label] = (
                f"{label}: not enough trials (completed at r = {ranks} only; the question needs one at "
                f"r <= {RANK_SPLIT} and one at r > {RANK_SPLIT})"
            )
            continue
        r_low = min(low, key=lambda r: rank_key(low[r][0], direction))
        r_high = min(high, key=lambda r: rank_key(high[r][0], direction))
        a, b = low[r_low][0], high[r_high][0]
        gain = b - a
        within = abs(gain) <= noise["value"] + 1e-12
        conclusion = (
            f"flat above r = {RANK_SPLIT}, as in the LoRA paper"
            if within
            else "higher rank helps"
            if sign(direction) * gain > 0
            else "higher rank hurts"
        )
        verdicts[label] = (
            f"{label}: best at r > {RANK_SPLIT} vs best at r <= {RANK_SPLIT}: {_difference(gain, points)} "
            f"({b:.4f} at r={r_high} vs {a:.4f} at r={r_low}), {'within' if within else 'beyond'} "
            f"{noise['source']} ({_width(noise['value'], points)}): {conclusion}"
        )
    return {"metric": metric, "split": RANK_SPLIT, "table": rows, "verdicts": verdicts, "noise": noise}


def learning_rate_summary(
    table: pd.DataFrame, direction: str, lr_range: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The best LoRA trial's learning rate over the best full fine-tuning trial's (None without both), and
    the range the sweep derived from the baseline when it did."""
    done = table[(table["role"] == "search") & (table["state"] == "complete")]
    done = done[done["val_metric"].notna() & done["lr"].notna()]
    full = best_full(table, direction) if (table["role"] == "baseline").any() else None
    if done.empty or full is None or not full["lr"] or full["lr"] != full["lr"]:
        return None
    best = done.assign(_key=rank_key(done["val_metric"], direction)).sort_values(["_key", "trial"]).iloc[0]
    baseline = table[(table["role"] == "baseline") & (table["state"] == "complete")]
    summary: dict[str, Any] = {
        "lora": {"trial": int(best["trial"]), "lr": float(best["lr"])},
        "full": {"trial": int(full["trial"]), "lr": float(full["lr"])},
        "ratio": float(best["lr"]) / float(full["lr"]),
        "full_lrs_tried": int(baseline["lr"].dropna().nunique()),
        "lora_lrs_tried": int(done["lr"].nunique()),
    }
    if isinstance(lr_range, dict) and lr_range:
        summary["range"] = dict(lr_range)
        low, high = lr_range.get("low"), lr_range.get("high")
        if low and high and high > low:  # within a tenth of the range's log width of one end
            margin = (math.log(high) - math.log(low)) / 10
            lr = math.log(float(best["lr"]))
            edge = (
                "low" if lr <= math.log(low) + margin else "high" if lr >= math.log(high) - margin else None
            )
            if edge:
                summary["at_edge"] = edge
    return summary


def replicate_forgetting(
    study,
    lora_trial: int,
    full_trial: int,
    limit: int | None,
    measure: str | None,
    reference: list[str] | None,
) -> dict[str, Any] | str:
    """The forgetting measure of each replicate of the chosen LoRA and the best full fine-tuning
    configuration (the seeds both have, the first ``limit``): mean ± 95% CI per side and the paired
    difference; a sentence saying why not when it cannot be measured."""
    from lora_sweep.report import checkpoints as ck
    from lora_sweep.report.replicates import interval, paired, replicate_records

    if study is None or limit == 0:
        return NO_REPLICATES
    found = replicate_records(study)
    lora, full = found.get(("lora", lora_trial), {}), found.get(("full", full_trial), {})
    seeds = sorted(set(lora) & set(full))[:limit]
    if not seeds:
        return (
            f"no replicates of LoRA trial #{lora_trial} and full fine-tuning trial #{full_trial} to measure: "
            "run the sweep with hydra.sweeper.report.replicates=N"
        )
    records = {f"{side} seed {s}": runs[s] for side, runs in (("lora", lora), ("full", full)) for s in seeds}
    if measure == "perplexity":
        values = {key: v["ratio"] for key, v in ck.perplexity_forgetting(records).items()}
        texts = next((r["metrics"].get("reference_texts") for r in records.values()), None)
    elif measure == "representation_similarity" and reference:
        kept = {k: r for k, r in records.items() if not r.get("checkpoints", {}).get("deleted")}
        values, texts = ck.representation_similarity(kept, reference), len(reference)
    else:
        return f"not measured over the replicates (forgetting measure {measure or 'unknown'})"
    seeds = [s for s in seeds if f"lora seed {s}" in values and f"full seed {s}" in values]
    if len(seeds) < 2:
        return "fewer than 2 replicate seeds could be measured on both sides: no interval"
    a = [values[f"lora seed {s}"] for s in seeds]
    b = [values[f"full seed {s}"] for s in seeds]
    return {
        "measure": measure,
        "seeds": seeds,
        "reference_texts": texts,
        "trials": {"lora": lora_trial, "full": full_trial},
        "lora": {**interval(a), "values": a},
        "full": {**interval(b), "values": b},
        "paired": paired(a, b),
    }


def literature_sections(
    table: pd.DataFrame,
    search,
    metric: str,
    direction: str,
    tolerance: float,
    replicates: dict[str, Any] | None,
) -> dict[str, Any]:
    """The summary keys ``rank`` and ``learning_rate`` (the latter only with a LoRA and a full trial)."""
    labelled = with_target_sets(table, search)
    extra: dict[str, Any] = {
        "rank": rank_summary(labelled, metric, direction, rank_noise(replicates, tolerance))
    }
    lr = learning_rate_summary(table, direction, search.user_attrs.get(LR_RANGE_ATTR))
    if lr is not None:
        extra["learning_rate"] = lr
    return extra
