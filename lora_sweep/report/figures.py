"""The report's figures, drawn with matplotlib from the trials table (no training, no network)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
matplotlib.rcParams["svg.hashsalt"] = (
    "lora_sweep"  # stable SVG ids: a regenerated report diffs only where it changed
)
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from lora_sweep.ranking import ascending, sign  # noqa: E402
from lora_sweep.sweep.trials import trial_label  # noqa: E402

FULL_COLOR, LORA_COLOR, PRUNED_COLOR = "#c0392b", "#2e86c1", "#aab7b8"


def _save(fig, folder: Path, name: str) -> list[Path]:
    paths = [folder / f"{name}.png", folder / f"{name}.svg"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=130)
    fig.savefig(paths[1], metadata={"Date": None})  # no timestamp: the same figure gives the same file
    plt.close(fig)
    return paths


def pareto_front(points: pd.DataFrame, direction: str) -> pd.DataFrame:
    """Trials no other trial beats on both validation metric and trainable parameters."""
    ordered = points.sort_values(["trainable_params", "val_metric"], ascending=[True, ascending(direction)])
    front, best = [], None
    for _, row in ordered.iterrows():
        if best is None or sign(direction) * row["val_metric"] > sign(direction) * best:
            front.append(row)
            best = row["val_metric"]
    return pd.DataFrame(front)


def metric_vs_params(table: pd.DataFrame, metric: str, direction: str, folder: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lora = table[
        (table["role"] == "search") & table["val_metric"].notna() & table["trainable_params"].notna()
    ]
    done, pruned = lora[lora["state"] == "complete"], lora[lora["state"] == "pruned"]
    ax.scatter(
        pruned["trainable_params"],
        pruned["val_metric"],
        color=PRUNED_COLOR,
        label="LoRA, pruned (last value)",
        zorder=2,
    )
    ax.scatter(done["trainable_params"], done["val_metric"], color=LORA_COLOR, label="LoRA", zorder=3)
    if len(done):
        front = pareto_front(done, direction)
        ax.step(
            front["trainable_params"],
            front["val_metric"],
            where="post",
            color=LORA_COLOR,
            alpha=0.6,
            label="Pareto front",
        )
    full = table[(table["role"] == "baseline") & (table["state"] == "complete")]
    ax.scatter(
        full["trainable_params"],
        full["val_metric"],
        marker="*",
        s=220,
        color=FULL_COLOR,
        label="full fine-tuning",
        zorder=4,
    )
    if len(lora) or len(full):  # a log axis needs a positive point: a sweep with no finished trial has none
        ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(f"validation {metric}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, folder, "metric_vs_params")


def metric_vs_rank(table: pd.DataFrame, metric: str, folder: Path, direction: str = "maximize") -> list[Path]:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lora = table[(table["role"] == "search") & (table["state"] == "complete") & table["r"].notna()]
    several_methods = lora["method"].nunique() > 1
    # one line per target set: the name the sweep sampled (a preset or a target_sets name) when known
    column = "target_set" if "target_set" in lora else "targets"
    for (method, targets), group in lora.groupby(["method", column]):
        by_rank = group.groupby("r")["val_metric"]
        best = (by_rank.max() if sign(direction) > 0 else by_rank.min()).sort_index()
        ax.plot(
            best.index,
            best.values,
            marker="o",
            label=f"{method} {targets}" if several_methods else str(targets),
        )
    full = table[(table["role"] == "baseline") & (table["state"] == "complete")]["val_metric"]
    if not full.empty:
        top = full.max() if sign(direction) > 0 else full.min()
        ax.axhline(top, color=FULL_COLOR, linestyle="--", label="full fine-tuning (best)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("adapter rank r (log2)")
    ax.set_ylabel(f"best validation {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="target set")
    return _save(fig, folder, "metric_vs_rank")


def learning_curves(
    table: pd.DataFrame, metric: str, direction: str, folder: Path, top: int = 3
) -> list[Path]:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lora = table[(table["role"] == "search") & (table["state"] == "complete")]
    lora = lora.sort_values("val_metric", ascending=ascending(direction)).head(top)
    full = table[(table["role"] == "baseline") & (table["state"] == "complete")]
    full = full.sort_values("val_metric", ascending=ascending(direction)).head(1)
    for rows, color in ((lora, None), (full, FULL_COLOR)):
        for _, row in rows.iterrows():
            curve = pd.DataFrame(row["evaluations"])
            if curve.empty:
                continue
            label = f"{row['method']} #{row['trial']}" + (
                f" r={int(row['r'])} {row['targets']}"
                if row["r"] == row["r"] and row["r"] is not None
                else ""
            )
            ax.plot(curve["step"], curve[metric], marker=".", color=color, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"validation {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, folder, "learning_curves")


def importance(importances: dict[str, float], folder: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * max(len(importances), 1)))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color=LORA_COLOR)
    ax.set_xlabel("importance (Optuna fANOVA, normalised)")
    if not importances:
        ax.text(
            0.5, 0.5, "too few completed trials to estimate", ha="center", va="center", transform=ax.transAxes
        )
    return _save(fig, folder, "param_importance")


def pruning_savings(table: pd.DataFrame, folder: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = table[table["steps"].notna() & table["total_steps"].notna()].sort_values(["role", "trial"])
    labels = [trial_label(row) for _, row in rows.iterrows()]
    spent = rows["steps"].astype(float)
    saved = (rows["total_steps"] - rows["steps"]).astype(float)
    ax.bar(
        labels,
        spent,
        color=[PRUNED_COLOR if s == "pruned" else LORA_COLOR for s in rows["state"]],
        label="steps trained",
    )
    ax.bar(
        labels,
        saved,
        bottom=spent,
        color="white",
        edgecolor=PRUNED_COLOR,
        hatch="//",
        label="steps saved by pruning",
    )
    ax.set_ylabel("optimizer steps")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax.legend(fontsize=8)
    return _save(fig, folder, "pruning_savings")


def forgetting(similarity: dict[str, float], roles: dict[str, str], folder: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.35 * max(len(similarity), 1)))
    names = sorted(similarity, key=similarity.get)
    ax.barh(
        names,
        [1 - similarity[n] for n in names],
        color=[FULL_COLOR if roles[n] == "baseline" else LORA_COLOR for n in names],
    )
    ax.set_xlabel("representation drift from the base model on out-of-task text (1 - cosine similarity)")
    return _save(fig, folder, "forgetting")


def forgetting_perplexity(
    perplexity: dict[str, dict[str, float]], roles: dict[str, str], folder: Path
) -> list[Path]:
    """Causal LMs: how much each model's perplexity on out-of-task text rose (ratio after / before)."""
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.35 * max(len(perplexity), 1)))
    names = sorted(perplexity, key=lambda n: -perplexity[n]["ratio"])
    ax.barh(
        names,
        [perplexity[n]["ratio"] for n in names],
        color=[FULL_COLOR if roles[n] == "baseline" else LORA_COLOR for n in names],
    )
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("perplexity on out-of-task text, after / before fine-tuning (1: nothing forgotten)")
    return _save(fig, folder, "forgetting")
