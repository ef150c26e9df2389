"""sweep/study's requeue of trials nobody will finish: a trial asked for by a worker killed before it named
itself in the trial (seen only under the study lock, where asking and naming are one step)."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from lora_sweep.sweep.locks import study_lock
from lora_sweep.sweep.study import open_storage, requeue_stale_trials, worker_identity


def test_a_running_trial_without_a_worker_is_requeued_only_under_the_study_lock(tmp_path):
    spec = f"journal:{tmp_path / 'optuna.journal'}"
    storage = open_storage(spec)
    study = optuna.create_study(study_name="s", storage=storage)
    orphan, mine = study.ask(), study.ask()  # the orphan's worker died between ask() and naming itself
    mine.set_user_attr("worker", worker_identity())
    assert requeue_stale_trials(study) == []  # without the lock it may be a worker between the two steps
    with study_lock(storage, spec, "s") as exclusive:
        assert exclusive
        assert requeue_stale_trials(study, orphans=exclusive) == [orphan.number]
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.WAITING, TrialState.RUNNING]
    assert trials[0].user_attrs["interruptions"] == ["its worker died as it asked for the trial"]
    assert study.ask().number == orphan.number  # the same trial, asked for again


def test_a_storage_without_a_lock_across_processes_says_so(tmp_path):
    storage = optuna.storages.InMemoryStorage()
    with study_lock(storage, "sqlite:///:memory:", "s") as exclusive:
        assert exclusive is False
