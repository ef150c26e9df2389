"""The trial's side of a sweep (lora_sweep/sweep/trial.py's TrialBridge) with the real training loop: what
the pruner may and may not stop."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import TrialState

from lora_sweep.checkpoint import verify
from lora_sweep.record import read_record
from lora_sweep.run import run
from lora_sweep.sweep.study import open_storage
from lora_sweep.sweep.trial import TrialBridge


def test_a_trial_that_reached_its_last_step_is_complete_whatever_the_pruner_says(tmp_path, compose, tiny):
    """One epoch of 21 steps, validated at 7, 14 and 21. An earlier trial reported only at step 21, with a
    value no trial can reach: the median pruner stays silent at 7 and 14 (nothing to compare with) and
    says "prune" at 21, the last step. The trial is complete: trained to its end, checkpoint kept."""
    spec = f"journal:{tmp_path / 'optuna.journal'}"
    study = optuna.create_study(study_name="last", storage=open_storage(spec), direction="maximize")
    study.set_user_attr(
        "lora_sweep", {"pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0}}
    )
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.COMPLETE,
            value=2.0,
            intermediate_values={21: 2.0},
            params={"x": 0.0},
            distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
        )
    )
    trial = study.ask()
    cfg = compose(
        *tiny,
        "train.epochs=1",
        "tracking=none",
        "sweep.study_name=last",
        f"sweep.storage='{spec}'",
        f"sweep.trial_number={trial.number}",
        f"sweep.trial_id={trial._trial_id}",
    )
    bridge = TrialBridge(cfg)
    assert not bridge.trial.should_prune()  # nothing reported yet
    record = run(cfg, on_evaluation=bridge.on_evaluation)

    assert record.status == "completed"
    reported = study.get_trials()[trial.number].intermediate_values
    assert sorted(reported) == [7, 14, 21]  # the last evaluation still reached the study
    assert bridge.trial.should_prune()  # and the pruner did want this trial stopped there
    saved = read_record(Path(cfg.output_dir))
    assert saved["status"] == "completed" and saved["metrics"]["steps"] == 21
    assert verify(Path(saved["checkpoints"]["best"])) is None
