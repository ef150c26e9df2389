"""Bounded disk across a study: only the checkpoints that can still matter stay on disk.

Each trial keeps its best and last checkpoint while it runs (plus the previous last, for a safe resume;
the run drops that and the optimizer state when it ends). Across the study, ``keep_checkpoints: k``
keeps the checkpoints of the k best finished trials and deletes the others' weights; the trial's record,
metrics and MLflow run stay. Never deleted, whatever k: a trial still running, the trial the report's rule
picks now (it may sit outside the top k: the rule prefers fewer trainable parameters within a tolerance),
and the trial an existing report already chose.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from lora_sweep.ranking import rank_key
from lora_sweep.record import RECORD_FILE, load_run_record, read_record
from lora_sweep.sweep.trials import pick_best, trials_table

log = logging.getLogger(__name__)


def top_trials(study: optuna.Study, keep: int) -> set[int]:
    """The ``keep`` best finished trials by objective (the whole Pareto front when there are several)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(study.directions) > 1:
        keep_numbers = {t.number for t in study.best_trials}
    else:
        ranked = sorted(complete, key=lambda t: (rank_key(t.value, study.direction), t.number))
        keep_numbers = {t.number for t in ranked[:keep]}
    return keep_numbers


def report_choice(
    search: optuna.Study,
    baseline: optuna.Study | None,
    metric: str,
    direction: str,
    tolerance: float,
    report_dir: Path | None,
) -> set[int]:
    """The LoRA trial the report's rule picks from the trials finished so far, and the one a written report
    chose."""
    chosen = set()
    choice = pick_best(trials_table(search, baseline), metric, direction, tolerance)
    if choice.row is not None:
        chosen.add(int(choice.row["trial"]))
    written = Path(report_dir or "") / "report.json"
    if report_dir is not None and written.is_file():
        try:
            previous = json.loads(written.read_text()).get("chosen") or {}
            if previous.get("trial") is not None:
                chosen.add(int(previous["trial"]))
        except (OSError, ValueError):
            pass  # an unreadable old report protects nothing; the current rule still does
    return chosen


def enforce(study: optuna.Study, keep: int, protect: set[int]) -> list[int]:
    """Delete the checkpoint weights of every finished trial outside ``protect``; return their numbers."""
    deleted = []
    for trial in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    ):
        folder = Path(trial.user_attrs.get("output_dir") or "")
        checkpoints = folder / "checkpoints"
        if trial.number in protect or not trial.user_attrs.get("output_dir") or not checkpoints.is_dir():
            continue
        # the record says so first (Optuna freezes a finished trial's attributes): nothing will try to load
        # them
        _note_in_record(folder / RECORD_FILE, f"outside the {keep} best trials of study {study.study_name}")
        shutil.rmtree(checkpoints, ignore_errors=True)
        deleted.append(trial.number)
    if deleted:
        log.info("keep_checkpoints=%d: deleted the checkpoints of trials %s", keep, deleted)
    return deleted


def _note_in_record(path: Path, reason: str) -> None:
    """The record says the weights are gone (and why), so nothing later tries to load them."""
    if not path.is_file():
        return
    record = load_run_record(read_record(path))
    record.checkpoints["deleted"] = {"at": time.time(), "reason": reason}
    record.write()
