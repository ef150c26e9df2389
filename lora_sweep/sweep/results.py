"""What a finished trial's record says, turned into Optuna values and attributes, and the sweep's summary."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lora_sweep.record import RECORD_FILE, read_record
from lora_sweep.secrets import redact
from lora_sweep.sweep.study import counts

# objective name -> where its value is in a trial's record, and which way is better
OBJECTIVES = {
    "objective": None,
    "trainable_params": ("params", "minimize"),
    "peak_memory_mb": ("metrics", "minimize"),
    "train_seconds": ("metrics", "minimize"),
}


def objective_value(record: dict, objective: str) -> float:
    if objective == "objective":
        return float(record["metrics"]["objective"])
    section, _ = OBJECTIVES[objective]
    return float(record[section][objective])


TRIAL_FOLDER = re.compile(r"(search|baseline|replicate|rung\d+)-\d{3,}")


def read_record_in(output_dir: Path | None, trial: tuple[str, int, str] | None = None) -> dict | None:
    """The record in ``output_dir``; with ``trial`` (study name, trial number, storage spec) only if it is
    that trial's: a record another study's trial left in a reused folder is none of this trial's."""
    if output_dir is None or not (output_dir / RECORD_FILE).is_file():
        return None
    record = read_record(output_dir)
    if trial is not None and record_trial(record) != (trial[0], trial[1], redact(trial[2])):
        return None
    return record


def record_trial(record: dict) -> tuple[str | None, int | None, str | None]:
    """Which trial a record belongs to: (study name, trial number, storage), from its ``sweep.*`` config
    (the storage as records keep it, password masked)."""
    sweep = (record.get("config") or {}).get("sweep") or {}
    return sweep.get("study_name"), sweep.get("trial_number"), sweep.get("storage")


def foreign_trial_folder(sweep_dir: Path, studies: tuple[str, ...], spec: str) -> tuple[str, dict] | None:
    """The first trial folder of ``sweep_dir`` whose record belongs to a study other than ``studies`` in
    storage ``spec``, with that record's ``sweep.*`` config; None when every trial folder is theirs."""
    if not sweep_dir.is_dir():
        return None
    storage = redact(spec)
    for folder in sorted(sweep_dir.iterdir()):
        if not TRIAL_FOLDER.fullmatch(folder.name) or not (folder / RECORD_FILE).is_file():
            continue
        try:
            record = read_record(folder)
        except (OSError, ValueError):  # a record cut short is resumed over, whoever wrote it
            continue
        study, _, theirs = record_trial(record)
        if study not in studies or theirs not in (storage, _moved_journal(record, spec, sweep_dir)):
            return folder.name, record["config"]["sweep"]
    return None


def _moved_journal(record: dict, spec: str, sweep_dir: Path) -> str | None:
    """When ``spec`` is the sweep folder's own journal, the name that journal had in the record's days: a
    sweep folder moved with its journal is the same study (its records still name the old path)."""
    own = f"journal:{(sweep_dir / 'optuna.journal').resolve()}"
    if spec != own or not record.get("output_dir"):
        return None
    return f"journal:{Path(record['output_dir']).parent / 'optuna.journal'}"


def trial_attrs(record: dict | None) -> dict[str, Any]:
    """What the trial's record says, copied to the Optuna trial so trial, run and checkpoint find each
    other."""
    if not record:
        return {}
    attrs = {
        "record": str(Path(record["output_dir"]) / RECORD_FILE),
        "mlflow_run_id": record.get("mlflow", {}).get("run_id"),
        "checkpoint": record.get("checkpoints", {}).get("best"),
        "status": record.get("status"),
    }
    for key in ("trainable_params", "total_params", "trainable_ratio"):
        if key in record.get("params", {}):
            attrs[key] = record["params"][key]
    for key in ("objective", "peak_memory_mb", "train_seconds", "tokens_per_second", "steps"):
        if key in record.get("metrics", {}):
            attrs[key] = record["metrics"][key]
    return attrs


def summarize(phases, parent, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sweep's outcome, also stored on the MLflow parent run: best trial (or Pareto front), baseline;
    ``extra``: more of it (the budget ladder's rungs)."""
    from lora_sweep.sweep.summary import best_trials

    main = phases[-1]
    best = best_trials(main.study)
    summary: dict[str, Any] = {
        "n_trials": main.n_trials,
        **{f"trials_{k}": v for k, v in counts(main.study).items() if v},
    }
    if best:
        top = best[0]
        summary.update(
            best_trial=top.number,
            best_value=top.values[0],
            best_checkpoint=top.user_attrs.get("checkpoint"),
            best_run_id=top.user_attrs.get("mlflow_run_id"),
        )
        if len(main.study.directions) > 1:
            summary["pareto_front"] = [t.number for t in best]
        parent.set_tags(
            {
                "best_trial": top.number,
                "best_run_id": top.user_attrs.get("mlflow_run_id"),
                "best_checkpoint": top.user_attrs.get("checkpoint"),
            }
        )
        parent.log_metrics({"best_value": top.values[0], "n_complete": counts(main.study)["complete"]})
    if len(phases) > 1 and best_trials(phases[0].study):
        summary["baseline_best_value"] = best_trials(phases[0].study)[0].values[0]
        parent.log_metrics({"baseline_best_value": summary["baseline_best_value"]})
    from lora_sweep.sweep.lr_range import ATTR

    if ATTR in main.study.user_attrs:  # hydra.sweeper.lr_from_baseline: the range every LoRA trial searched
        summary["lr_range"] = main.study.user_attrs[ATTR]
    summary.update(extra or {})
    parent.log_dict(summary, "sweep_summary.json")
    return summary
