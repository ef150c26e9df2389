"""Which checkpoint to ship, by a rule stated in words, and how each LoRA trial compares with full FT."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from lora_sweep.ranking import best_of, maximizes, rank_key, sign

DEFAULT_TOLERANCE = 0.005  # half a point of accuracy: below what one seed to the next moves on this data


@dataclass
class Choice:
    row: pd.Series | None
    rule: str
    best_value: float | None
    candidates: list[int]  # trial numbers within the tolerance


def pick_best(table: pd.DataFrame, metric: str, direction: str, tolerance: float = DEFAULT_TOLERANCE) -> Choice:
    """Best validation metric; among the LoRA trials within ``tolerance`` of it, the fewest trainable
    parameters; then the better metric; then the earlier trial."""
    better = "highest" if maximizes(direction) else "lowest"
    rule = (f"the {better} validation {metric} among completed LoRA trials; among the trials within {tolerance:g} of it, "
            f"the one with the fewest trainable parameters (ties: better validation {metric}, then the earlier trial)")
    done = table[(table["role"] == "search") & (table["state"] == "complete") & table["val_metric"].notna()]
    if done.empty:
        return Choice(None, rule, None, [])
    best = best_of(done["val_metric"], direction)
    close = done[(done["val_metric"] - best).abs() <= tolerance + 1e-12]
    ordered = close.assign(_rank=rank_key(close["val_metric"], direction)).sort_values(
        ["trainable_params", "_rank", "trial"])
    return Choice(ordered.iloc[0].drop("_rank"), rule, float(best), [int(t) for t in close["trial"]])


def with_comparisons(table: pd.DataFrame, direction: str) -> pd.DataFrame:
    """Add each trial's gap to the best full fine-tuning trial (positive: LoRA is better) and its
    validation metric per million trainable parameters (how much quality each parameter buys)."""
    table = table.copy()
    full = table[(table["role"] == "baseline") & (table["state"] == "complete")]["val_metric"].dropna()
    reference = best_of(full, direction) if not full.empty else None
    table["gap_to_full"] = None if reference is None else sign(direction) * (table["val_metric"] - reference)
    table["metric_per_m_params"] = table["val_metric"] / (table["trainable_params"] / 1e6)
    return table
