"""The trial's side of a sweep, inside the process that trains (the sweeper's own, or a joblib worker).

The sweeper passes the study's storage, the trial id and the MLflow parent run through the ``sweep.*``
config keys. Here the trial reopens the study from its storage, reports the validation metric at each
evaluation and asks the pruner whether to stop; this works in any process, because everything goes
through the storage.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import optuna

from lora_sweep.config import RunConfig
from lora_sweep.sweep.optuna_api import heartbeat, storage_of
from lora_sweep.sweep.study import make_pruner, open_storage, worker_identity

log = logging.getLogger(__name__)


class TrialBridge:
    def __init__(self, cfg: RunConfig):
        sweep = cfg.sweep
        self.cfg = cfg
        storage = open_storage(sweep.storage)
        # sampler is irrelevant here (the sweeper samples); the pruner must be the study's own
        self.study = optuna.load_study(
            study_name=sweep.study_name, storage=storage, sampler=optuna.samplers.RandomSampler()
        )
        self.study.pruner = make_pruner(self.study.user_attrs.get("lora_sweep", {}).get("pruner", {}))
        self.trial = optuna.trial.Trial(self.study, sweep.trial_id)
        self.can_prune = len(self.study.directions) == 1  # Optuna has no pruning for several objectives
        self.trial.set_user_attr("worker", worker_identity())

    def on_evaluation(self, step: int, metrics: dict[str, float]) -> bool:
        if not self.can_prune:
            return False
        reported = storage_of(self.study).get_trial(self.cfg.sweep.trial_id).intermediate_values
        if step not in reported:  # a resumed trial
            self.trial.report(metrics[self.cfg.objective.metric], step)
        if self.trial.should_prune():
            log.info(
                "trial %d pruned at step %d (%s %.4f)",
                self.trial.number,
                step,
                self.cfg.objective.metric,
                metrics[self.cfg.objective.metric],
            )
            return True
        return False

    def tags(self) -> dict[str, str]:
        sweep = self.cfg.sweep
        tags = {
            "optuna.study": sweep.study_name,
            "optuna.trial_number": str(sweep.trial_number),
            "lora_sweep.role": sweep.role,
            "optuna.params": str(self.trial.params),
        }
        if sweep.role == "replicate":  # which configuration this run repeats, and with which seed
            attrs = self.trial.user_attrs
            source = f"{attrs.get('source_study')}#{attrs.get('source_trial')}"
            tags.update(
                {
                    "lora_sweep.replicate_of": str(attrs.get("replicate_of")),
                    "lora_sweep.seed": str(attrs.get("seed")),
                    "lora_sweep.source_trial": source,
                }
            )
        if "ladder_steps" in self.trial.user_attrs:  # the budget ladder: this trial's share of a full budget
            attrs = self.trial.user_attrs
            tags["lora_sweep.ladder_fraction"] = str(attrs["ladder_fraction"])
            tags["lora_sweep.ladder_steps"] = str(attrs["ladder_steps"])
        if sweep.parent_run_id:
            tags["mlflow.parentRunId"] = (
                sweep.parent_run_id
            )  # nests the run under the sweep's parent in the UI
        return tags

    def heartbeat(self) -> contextlib.AbstractContextManager[Any]:
        """Optuna's heartbeat for RDB storages, so a killed worker's trial is seen as stale from anywhere."""
        return heartbeat(storage_of(self.study), self.cfg.sweep.trial_id)
