"""A sweep's trials as one table, and the rule that picks the checkpoint to ship: shared by the sweep (its
summary, keep_checkpoints, the replicates of the chosen trial) and the report. Reads, never trains."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from lora_sweep.config import MethodConfig
from lora_sweep.ranking import ascending, best_of, maximizes, rank_key, sign
from lora_sweep.record import RECORD_FILE, read_record
from lora_sweep.schema import build
from lora_sweep.sweep.settings import ReportConf

STATES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}


def record_of(trial: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
    path = trial.user_attrs.get("record") or (
        Path(trial.user_attrs["output_dir"]) / RECORD_FILE if "output_dir" in trial.user_attrs else None
    )
    if path and Path(path).is_file():
        return read_record(path)
    return None


def trials_table(search: optuna.Study, baseline: optuna.Study | None = None) -> pd.DataFrame:
    """One row per trial of the search and of the full fine-tuning baseline, retried duplicates left out."""
    rows = []
    for role, study in (("baseline", baseline), ("search", search)):
        if study is None:
            continue
        trials = study.get_trials(deepcopy=False)
        retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
        for trial in trials:
            if trial.number in retried and trial.state == TrialState.FAIL:
                continue  # its parameters ran again as a later trial
            rows.append(_row(role, trial, record_of(trial), study.directions[0]))
    return pd.DataFrame(rows)


def _method(record: dict | None, trial: optuna.trial.FrozenTrial, role: str) -> dict[str, Any]:
    """The trial's method as its record states it (effective alpha and scaling from the config's own
    rules); for a trial with no record yet, what Optuna sampled."""
    if record is None:
        p = trial.params
        name = "full" if role == "baseline" else p.get("method", "lora")
        return {
            "method": name,
            "r": p.get("method.r"),
            "alpha": p.get("method.alpha"),
            "scaling": None,
            "targets": p.get("method.targets"),
            "variant": p.get("method.variant"),
            "dropout": p.get("method.dropout"),
            "lr": p.get("train.lr"),
            "mergeable": None,
        }
    config = record["config"]
    method = build(MethodConfig, config["method"], "method")
    targets = (
        method.targets
        if isinstance(method.targets, str) or method.targets is None
        else ",".join(method.targets)
    )
    return {
        "method": method.name,
        "r": method.r,
        "alpha": method.effective_alpha,
        "scaling": method.scaling,
        "targets": targets,
        "variant": method.variant,
        "dropout": method.dropout,
        "lr": config["train"]["lr"],
        "mergeable": record.get("params", {}).get("mergeable"),
    }


def _row(role: str, trial: optuna.trial.FrozenTrial, record: dict | None, direction) -> dict[str, Any]:
    metrics = (record or {}).get("metrics", {})
    params = (record or {}).get("params", {})
    checkpoints = (record or {}).get("checkpoints", {})
    value = metrics.get("objective")
    if (
        value is None and trial.intermediate_values
    ):  # no record yet: the best validation value reported so far
        value = best_of(trial.intermediate_values.values(), direction)
    return {
        "role": role,
        "trial": trial.number,
        "state": STATES.get(trial.state, trial.state.name.lower()),
        "fail_reason": trial.user_attrs.get("fail_reason") or (record or {}).get("error"),
        **_method(record, trial, role),
        "val_metric": value,
        "trainable_params": params.get("trainable_params"),
        "total_params": params.get("total_params"),
        "trainable_pct": 100 * params["trainable_ratio"] if "trainable_ratio" in params else None,
        "peak_memory_mb": metrics.get("peak_memory_mb"),
        "peak_cuda_reserved_mb": metrics.get("peak_cuda_reserved_mb"),
        "mfu_pct": 100 * metrics["mfu"] if metrics.get("mfu") is not None else None,
        "train_seconds": metrics.get("train_seconds"),
        "tokens_per_second": metrics.get("tokens_per_second"),
        "steps": metrics.get("steps"),
        "total_steps": metrics.get("total_steps"),
        "checkpoint_mb": checkpoints.get("best_weights_mb"),
        "checkpoint": checkpoints.get("best"),
        "mlflow_run_id": (record or {}).get("mlflow", {}).get("run_id"),
        "record": trial.user_attrs.get("record"),
        "evaluations": (record or {}).get("evaluations", []),
        "seed": (record or {}).get("config", {}).get("train", {}).get("seed"),
    }


def trial_label(row) -> str:
    """``lora #5``, ``ia3 #2``, ``full #0``: a trial as the report names it (its method, its number)."""
    method = "full" if row["role"] == "baseline" else (row.get("method") or "lora")
    return f"{method} #{row['trial']}"


DEFAULT_TOLERANCE = ReportConf.tolerance  # the schema's default, written once there


@dataclass
class Choice:
    row: pd.Series | None
    rule: str
    best_value: float | None
    candidates: list[int]  # trial numbers within the tolerance


def pick_best(
    table: pd.DataFrame, metric: str, direction: str, tolerance: float = DEFAULT_TOLERANCE
) -> Choice:
    """Best validation metric; among the LoRA trials within ``tolerance`` of it, the fewest trainable
    parameters; then the better metric; then the earlier trial."""
    better = "highest" if maximizes(direction) else "lowest"
    rule = (
        f"the {better} validation {metric} among completed LoRA trials; among the trials within "
        f"{tolerance:g} of it, the one with the fewest trainable parameters (ties: better validation "
        f"{metric}, then the earlier trial)"
    )
    done = table[(table["role"] == "search") & (table["state"] == "complete") & table["val_metric"].notna()]
    if done.empty:
        return Choice(None, rule, None, [])
    best = best_of(done["val_metric"], direction)
    close = done[(done["val_metric"] - best).abs() <= tolerance + 1e-12]
    ordered = close.assign(_rank=rank_key(close["val_metric"], direction)).sort_values(
        ["trainable_params", "_rank", "trial"]
    )
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


def best_full(table: pd.DataFrame, direction: str) -> pd.Series | None:
    """The best completed full fine-tuning trial by validation metric (ties: the earlier trial)."""
    full = table[(table["role"] == "baseline") & (table["state"] == "complete") & table["val_metric"].notna()]
    if full.empty:
        return None
    return full.sort_values(["val_metric", "trial"], ascending=[ascending(direction), True]).iloc[0]
