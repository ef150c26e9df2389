"""Samplers and pruners from the sweeper's schema (:mod:`lora_sweep.sweep.study`)."""

from __future__ import annotations

import optuna
import pytest

from hydra_plugins.lora_sweep_optuna.config import PrunerConf, SamplerConf
from lora_sweep.errors import ConfigError
from lora_sweep.sweep.study import make_pruner, make_sampler


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("tpe", optuna.samplers.TPESampler),
        ("random", optuna.samplers.RandomSampler),
        ("gp", optuna.samplers.GPSampler),
        ("cmaes", optuna.samplers.CmaEsSampler),
        ("nsga2", optuna.samplers.NSGAIISampler),
    ],
)
def test_make_sampler_from_the_schema(name, cls):
    assert type(make_sampler(SamplerConf(name=name), None, False)) is cls


def test_a_seeded_sampler_samples_the_same_values_twice():
    def first_values(sampler):
        study = optuna.create_study(sampler=sampler)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
        return [t.params["x"] for t in study.trials]

    conf = SamplerConf(name="tpe", seed=3, n_startup_trials=2)
    assert first_values(make_sampler(conf, None, False)) == first_values(make_sampler(conf, None, False))


def test_grid_and_bad_sampler_names():
    assert isinstance(
        make_sampler(SamplerConf(name="grid"), {"x": [1, 2]}, False), optuna.samplers.GridSampler
    )
    with pytest.raises(ConfigError, match="CMA-ES optimises one objective"):
        make_sampler(SamplerConf(name="cmaes"), None, True)
    with pytest.raises(ConfigError, match="must be one of"):
        make_sampler(SamplerConf(name="bayes"), None, False)


@pytest.mark.parametrize(
    ("cfg", "cls"),
    [
        ({}, optuna.pruners.MedianPruner),
        ({"name": "none"}, optuna.pruners.NopPruner),
        ({"name": "successive_halving"}, optuna.pruners.SuccessiveHalvingPruner),
        ({"name": "hyperband", "max_resource": 9}, optuna.pruners.HyperbandPruner),
        (PrunerConf(name="none"), optuna.pruners.NopPruner),
    ],
)
def test_make_pruner_from_the_schema_or_part_of_it(cfg, cls):
    """A study keeps its pruner's settings as a mapping: whatever it leaves out takes the schema's default."""
    assert type(make_pruner(cfg)) is cls


def test_a_partial_pruner_mapping_prunes_like_the_schema_defaults():
    def pruned_at(pruner):  # trials report 0 at steps 0-4; the last one reports 1 (worse) and asks to prune
        study = optuna.create_study(pruner=pruner)
        for _ in range(PrunerConf().n_startup_trials):
            trial = study.ask()
            for step in range(5):
                trial.report(0.0, step)
            study.tell(trial, 0.0)
        trial = study.ask()
        trial.report(1.0, 0)
        return bool(trial.should_prune())

    assert pruned_at(make_pruner({})) == pruned_at(make_pruner(PrunerConf())) is True
    assert pruned_at(make_pruner({"n_warmup_steps": 1})) is False


def test_bad_pruner_settings():
    with pytest.raises(ConfigError, match="must be one of"):
        make_pruner({"name": "asha"})
    with pytest.raises(ConfigError, match=r"hydra\.sweeper\.pruner\.patience"):
        make_pruner({"patience": 2})


def test_stale_trials_go_back_to_the_queue_and_resume_as_the_same_trial(tmp_path):
    import subprocess
    import sys
    import time

    from optuna.trial import TrialState

    from lora_sweep.sweep.study import requeue_stale_trials, worker_identity

    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=1, grace_period=1
    )
    study = optuna.create_study(study_name="s", storage=storage)
    silent, dead, alive = study.ask(), study.ask(), study.ask()
    storage.record_heartbeat(
        storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("s"), silent.number)
    )
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead.set_user_attr("worker", {**worker_identity(), "pid": gone.pid})
    alive.set_user_attr("worker", worker_identity())
    time.sleep(2.5)  # the silent trial's heartbeat is now older than its grace period
    assert requeue_stale_trials(study) == [silent.number, dead.number]
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.WAITING, TrialState.WAITING, TrialState.RUNNING]
    assert trials[0].user_attrs["interruptions"] == ["its heartbeat stopped"]
    assert trials[1].user_attrs["interruptions"] == ["its worker process died"]
    assert {study.ask().number, study.ask().number} == {silent.number, dead.number}
