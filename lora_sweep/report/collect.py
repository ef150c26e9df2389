"""Gather a sweep's trials from its Optuna study and its runs' records into one table. Reads, never retrains.

A sweep is named by its study (``quick``: the journal in ``outputs/sweeps/quick/``) or by its MLflow
parent run id (whose params name the study and its storage). Finished, running and interrupted sweeps
all work: a trial without a record yet shows its parameters and state only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna

from lora_sweep.errors import LoraSweepError
from lora_sweep.ranking import direction_name
from lora_sweep.sweep.study import JOURNAL_PREFIX, open_storage
from lora_sweep.sweep.trials import STATES, record_of, trials_table  # noqa: F401 - the report's table


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
    replicates: optuna.Study | None = None  # the chosen LoRA and best full FT configs, re-run with new seeds


def locate(target: str, sweeps_dir: Path = Path("outputs/sweeps"), tracking_uri: str | None = None) -> Sweep:
    """A study name with its folder under ``sweeps_dir``, or an MLflow parent run id."""
    folder = Path(sweeps_dir) / target
    if (folder / "optuna.journal").is_file():
        return open_sweep(target, JOURNAL_PREFIX + str((folder / "optuna.journal").resolve()), folder)
    if len(target) == 32 and all(c in "0123456789abcdef" for c in target):
        from lora_sweep.tracking import run_params

        try:
            params = run_params(target, tracking_uri)
        except LookupError as err:
            raise LoraSweepError(f"sweep={target!r}: {err}") from None
        name, storage = params.get("study_name"), params.get("storage")
        if not name or not storage or "***" in storage:
            raise LoraSweepError(
                f"sweep={target!r}: this MLflow run is not a lora_sweep parent run with a readable storage"
            )
        folder = (
            Path(storage[len(JOURNAL_PREFIX) :]).parent
            if storage.startswith(JOURNAL_PREFIX)
            else Path(sweeps_dir) / name
        )
        return open_sweep(name, storage, folder)
    raise LoraSweepError(
        f"sweep={target!r}: neither a study folder under {sweeps_dir} nor an MLflow parent run id"
    )


def open_sweep(name: str, storage_spec: str, folder: Path) -> Sweep:
    storage = open_storage(storage_spec)
    names = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if name not in names:
        raise LoraSweepError(
            f"sweep={name!r}: no such study in {storage_spec} (studies: {', '.join(sorted(names))})"
        )
    search = optuna.load_study(study_name=name, storage=storage)
    baseline = (
        optuna.load_study(study_name=f"{name}-baseline", storage=storage)
        if f"{name}-baseline" in names
        else None
    )
    metric, direction = objective_metric(search), direction_name(search.directions[0])
    replicates = None
    if f"{name}-replicates" in names:  # the sweep's last phase (report.replicates > 0)
        replicates = optuna.load_study(study_name=f"{name}-replicates", storage=storage)
    parent_run_id = search.user_attrs.get("mlflow_parent_run_id")
    return Sweep(
        name, storage_spec, Path(folder), search, baseline, parent_run_id, metric, direction, replicates
    )


def objective_metric(search: optuna.Study) -> str:
    """The validation metric the study optimised: stored by the sweeper in the study's ``lora_sweep``
    attribute, or (studies made before it stored it) stated by a trial's record. Never guessed."""
    metric = (search.user_attrs.get("lora_sweep") or {}).get("metric")
    if metric:
        return metric
    for trial in search.get_trials(deepcopy=False):
        record = record_of(trial)
        if record and record.get("metrics", {}).get("objective_metric"):
            return record["metrics"]["objective_metric"]
    raise LoraSweepError(
        f"sweep={search.study_name!r}: neither the study nor any trial's record names the "
        "objective metric (no trial has finished yet?)"
    )
