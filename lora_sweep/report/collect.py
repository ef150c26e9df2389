"""Gather a sweep's trials from its Optuna study and its runs' records into one table. Reads, never retrains.

A sweep is named by its study (``quick``: the journal in ``outputs/sweeps/quick/``) or by its MLflow
parent run id (whose params name the study and its storage). Finished, running and interrupted sweeps
all work: a trial without a record yet shows its parameters and state only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from lora_sweep.config import MethodConfig
from lora_sweep.errors import LoraSweepError
from lora_sweep.ranking import best_of, direction_name
from lora_sweep.schema import build
from lora_sweep.sweep.study import JOURNAL_PREFIX, open_storage

STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
          TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


@dataclass
class Sweep:
    study_name: str
    storage: str
    folder: Path
    search: optuna.Study
    baseline: optuna.Study | None
    parent_run_id: str | None
    metric: str  # validation metric the sweep optimised
    direction: str  # maximize | minimize


def locate(target: str, sweeps_dir: Path = Path("outputs/sweeps"), tracking_uri: str | None = None) -> Sweep:
    """A study name with its folder under ``sweeps_dir``, or an MLflow parent run id."""
    folder = Path(sweeps_dir) / target
    if (folder / "optuna.journal").is_file():
        return open_sweep(target, JOURNAL_PREFIX + str((folder / "optuna.journal").resolve()), folder)
    if len(target) == 32 and all(c in "0123456789abcdef" for c in target):
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        try:
            run = client.get_run(target)
        except Exception as err:
            raise LoraSweepError(f"sweep={target!r}: no such MLflow run in {client.tracking_uri} ({str(err).splitlines()[0]})") from None
        name, storage = run.data.params.get("study_name"), run.data.params.get("storage")
        if not name or not storage or "***" in storage:
            raise LoraSweepError(f"sweep={target!r}: this MLflow run is not a lora_sweep parent run with a readable storage")
        folder = Path(storage[len(JOURNAL_PREFIX):]).parent if storage.startswith(JOURNAL_PREFIX) else Path(sweeps_dir) / name
        return open_sweep(name, storage, folder)
    raise LoraSweepError(f"sweep={target!r}: neither a study folder under {sweeps_dir} nor an MLflow parent run id")


def open_sweep(name: str, storage_spec: str, folder: Path) -> Sweep:
    storage = open_storage(storage_spec)
    names = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if name not in names:
        raise LoraSweepError(f"sweep={name!r}: no such study in {storage_spec} (studies: {', '.join(sorted(names))})")
    search = optuna.load_study(study_name=name, storage=storage)
    baseline = optuna.load_study(study_name=f"{name}-baseline", storage=storage) if f"{name}-baseline" in names else None
    metric, direction = objective_metric(search), direction_name(search.directions[0])
    parent = search.user_attrs.get("mlflow_parent_run_id")
    return Sweep(name, storage_spec, Path(folder), search, baseline, parent, metric, direction)


def objective_metric(search: optuna.Study) -> str:
    """The validation metric the study optimised: stored by the sweeper in the study's ``lora_sweep``
    attribute, or (studies made before it stored it) stated by a trial's record. Never guessed."""
    metric = (search.user_attrs.get("lora_sweep") or {}).get("metric")
    if metric:
        return metric
    for trial in search.get_trials(deepcopy=False):
        record = _record(trial)
        if record and record.get("metrics", {}).get("objective_metric"):
            return record["metrics"]["objective_metric"]
    raise LoraSweepError(f"sweep={search.study_name!r}: neither the study nor any trial's record names the "
                         "objective metric (no trial has finished yet?)")


def _record(trial: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
    path = trial.user_attrs.get("record") or (Path(trial.user_attrs["output_dir"]) / "record.json" if "output_dir" in trial.user_attrs else None)
    if path and Path(path).is_file():
        return json.loads(Path(path).read_text())
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
            rows.append(_row(role, trial, _record(trial), study.directions[0]))
    return pd.DataFrame(rows)


def _method(record: dict | None, trial: optuna.trial.FrozenTrial, role: str) -> dict[str, Any]:
    """The trial's method as its record states it (effective alpha and scaling from the config's own
    rules); for a trial with no record yet, what Optuna sampled."""
    if record is None:
        p = trial.params
        name = "full" if role == "baseline" else p.get("method", "lora")
        return {"method": name, "r": p.get("method.r"), "alpha": p.get("method.alpha"), "scaling": None,
                "targets": p.get("method.targets"), "variant": p.get("method.variant"),
                "dropout": p.get("method.dropout"), "lr": p.get("train.lr"), "mergeable": None}
    config = record["config"]
    method = build(MethodConfig, config["method"], "method")
    targets = method.targets if isinstance(method.targets, str) or method.targets is None else ",".join(method.targets)
    return {"method": method.name, "r": method.r, "alpha": method.effective_alpha, "scaling": method.scaling,
            "targets": targets, "variant": method.variant, "dropout": method.dropout, "lr": config["train"]["lr"],
            "mergeable": record.get("params", {}).get("mergeable")}


def _row(role: str, trial: optuna.trial.FrozenTrial, record: dict | None, direction) -> dict[str, Any]:
    metrics, params, checkpoints = (record or {}).get("metrics", {}), (record or {}).get("params", {}), (record or {}).get("checkpoints", {})
    value = metrics.get("objective")
    if value is None and trial.intermediate_values:  # no record yet: the best validation value reported so far
        value = best_of(trial.intermediate_values.values(), direction)
    return {
        "role": role, "trial": trial.number, "state": STATES.get(trial.state, trial.state.name.lower()),
        "fail_reason": trial.user_attrs.get("fail_reason") or (record or {}).get("error"), **_method(record, trial, role),
        "val_metric": value, "trainable_params": params.get("trainable_params"), "total_params": params.get("total_params"),
        "trainable_pct": 100 * params["trainable_ratio"] if "trainable_ratio" in params else None,
        "peak_memory_mb": metrics.get("peak_memory_mb"), "train_seconds": metrics.get("train_seconds"),
        "tokens_per_second": metrics.get("tokens_per_second"), "steps": metrics.get("steps"), "total_steps": metrics.get("total_steps"),
        "checkpoint_mb": checkpoints.get("best_weights_mb"), "checkpoint": checkpoints.get("best"),
        "mlflow_run_id": (record or {}).get("mlflow", {}).get("run_id"), "record": trial.user_attrs.get("record"),
        "evaluations": (record or {}).get("evaluations", []), "seed": (record or {}).get("config", {}).get("train", {}).get("seed"),
    }
