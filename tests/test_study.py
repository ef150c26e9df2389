"""sweep/study: the sampler and pruner a sweep file names, in-process (the sweeps through the command
line are in tests/test_sweep.py, marked slow)."""

from __future__ import annotations

import itertools

import optuna
import pytest

from lora_sweep.errors import ConfigError
from lora_sweep.sweep.settings import PrunerConf, SamplerConf
from lora_sweep.sweep.space import SearchSpace
from lora_sweep.sweep.study import PRUNERS, SAMPLERS, ask, make_pruner, make_sampler, seeded_samplers

from .helpers import replay_sampler

GRID = {"method.r": "choice(2, 4)", "train.lr": "choice(2e-3, 5e-3)"}
FLOATS = {"method.dropout": "interval(0.0, 0.2)", "train.lr": "tag(log, interval(1e-3, 1e-2))"}


def _objective(params: dict) -> float:
    """A deterministic stand-in for a trial's validation metric."""
    return sum(float(v) for v in params.values())


def _sweep(sampler: dict, params: dict, n_trials: int, *, tell_last: bool = True) -> list[dict]:
    """What the sweep runner does in one worker: ask, sample the space, tell the result."""
    space = SearchSpace(params)
    grid = space.grid("hydra.sweeper.params") if sampler.get("name") == "grid" else None
    samplers = seeded_samplers(dict(sampler), grid, False)
    study = optuna.create_study(sampler=samplers(0), direction="maximize")
    sampled = []
    for number in range(n_trials):
        trial = ask(study, samplers)
        space.sample(trial, {})
        sampled.append(trial.params)
        if tell_last or number < n_trials - 1:
            study.tell(trial, _objective(trial.params))
    return sampled


@pytest.mark.parametrize(
    ("cfg", "cls"),
    [
        ({"name": "tpe", "seed": 0}, optuna.samplers.TPESampler),
        ({"name": "random", "seed": 0}, optuna.samplers.RandomSampler),
        ({"name": "gp", "seed": 0}, optuna.samplers.GPSampler),
        ({"name": "cmaes", "seed": 0}, optuna.samplers.CmaEsSampler),
        ({"name": "nsga2", "seed": 0}, optuna.samplers.NSGAIISampler),
        ({}, optuna.samplers.TPESampler),  # the default
    ],
)
def test_each_name_gives_its_sampler(cfg, cls):
    assert type(make_sampler(cfg, None, multi_objective=False)) is cls


def test_grid_sampler_visits_exactly_the_grid():
    points = _sweep({"name": "grid", "seed": 0}, GRID, 4, tell_last=False)  # (telling the last: see below)
    assert sorted((p["method.r"], p["train.lr"]) for p in points) == sorted(
        itertools.product([2, 4], [2e-3, 5e-3])
    )
    assert _sweep({"name": "grid", "seed": 0}, GRID, 3) == points[:3]  # seeded order
    assert isinstance(
        make_sampler({"name": "grid"}, {"method.r": [2, 4]}, False), optuna.samplers.GridSampler
    )


def test_telling_the_last_point_of_the_grid():
    """The sweep tells trials itself: covering the whole grid must not raise from Study.stop()."""
    points = _sweep({"name": "grid", "seed": 0}, GRID, 4)
    assert len({tuple(sorted(p.items())) for p in points}) == 4


@pytest.mark.parametrize(
    "sampler",
    [
        {"name": "tpe", "seed": 0, "n_startup_trials": 2},
        {"name": "random", "seed": 0},
        {"name": "cmaes", "seed": 0},
    ],
)
def test_a_fixed_seed_reproduces_the_sequence(sampler):
    first = _sweep(sampler, FLOATS, 5)
    assert _sweep(sampler, FLOATS, 5) == first and len({tuple(p.values()) for p in first}) == 5
    assert _sweep({**sampler, "seed": 1}, FLOATS, 5) != first


@pytest.mark.parametrize("name", ["tpe", "cmaes"])
def test_model_based_samplers_leave_random_sampling_after_their_startup(name):
    """What tests/test_sweep.py::test_samplers relies on: with one startup trial, the second proposal of
    TPE or CMA-ES is not what random sampling with the same seed proposes."""
    sampler = {"name": name, "seed": 0, "n_startup_trials": 1}
    mine = _sweep(sampler, FLOATS, 3)
    random = _sweep({"name": "random", "seed": 0}, FLOATS, 3)
    assert mine[1:] != random[1:]
    assert replay_sampler(sampler, FLOATS, [_objective(p) for p in mine], "maximize") == mine


def test_cmaes_refuses_several_objectives_and_unknown_names_fail_in_one_line():
    with pytest.raises(
        ConfigError, match=r"^hydra.sweeper.sampler.name='cmaes': CMA-ES optimises one objective"
    ):
        make_sampler({"name": "cmaes"}, None, multi_objective=True)
    assert type(make_sampler({"name": "nsga2"}, None, multi_objective=True)) is optuna.samplers.NSGAIISampler
    with pytest.raises(ConfigError) as caught:
        make_sampler({"name": "bayes"}, None, False)
    assert str(caught.value) == f"hydra.sweeper.sampler.name='bayes': must be one of {', '.join(SAMPLERS)}"
    with pytest.raises(ConfigError) as caught:
        make_pruner({"name": "asha"})
    assert str(caught.value) == f"hydra.sweeper.pruner.name='asha': must be one of {', '.join(PRUNERS)}"


def test_each_name_gives_its_pruner_with_its_settings():
    assert type(make_pruner({"name": "none"})) is optuna.pruners.NopPruner
    median = make_pruner({"name": "median", "n_startup_trials": 5, "n_warmup_steps": 50})
    assert type(median) is optuna.pruners.MedianPruner
    assert (median._n_startup_trials, median._n_warmup_steps) == (5, 50)
    assert type(make_pruner({})) is optuna.pruners.MedianPruner  # the default
    assert type(make_pruner({"name": "successive_halving"})) is optuna.pruners.SuccessiveHalvingPruner
    assert type(make_pruner({"name": "hyperband", "max_resource": 100})) is optuna.pruners.HyperbandPruner


def test_median_pruner_stops_a_trial_below_the_median():
    """The pruner a sweep gets prunes a clearly worse trial once its startup trials are done."""
    study = optuna.create_study(
        direction="maximize",
        pruner=make_pruner({"name": "median", "n_startup_trials": 2}),
        sampler=make_sampler({"name": "random", "seed": 0}, None, False),
    )
    for value in (0.8, 0.9):
        trial = study.ask()
        for step in (7, 14):
            trial.report(value, step)
        study.tell(trial, value)
    bad = study.ask()
    bad.report(0.5, 7)
    assert bad.should_prune()
    good = study.ask()
    good.report(0.95, 7)
    assert not good.should_prune()


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


def test_a_journal_that_cannot_be_written_is_one_line_and_creates_nothing(tmp_path):
    from lora_sweep.sweep.study import open_storage

    (tmp_path / "afile").write_text("a file where a folder should be")
    spec = f"journal:{tmp_path}/afile/sub/x.journal"
    with pytest.raises(ConfigError) as caught:
        open_storage(spec)
    assert str(caught.value) == (
        f"hydra.sweeper.storage='{spec}': cannot write the journal there: {tmp_path / 'afile'} is a file, "
        "not a folder"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
