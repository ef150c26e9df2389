"""sweep/study's per-trial sampler seeds, in-process: each worker below has its own storage object and its
own sampler, as a separate process has; they share one journal file. (The same through the command line,
with real kills and two real processes: tests/test_kills.py.)"""

from __future__ import annotations

import optuna
import pytest

from lora_sweep.sweep.space import SearchSpace
from lora_sweep.sweep.study import ask, open_storage, requeue, seeded_samplers, trial_seed

GRID = {"method.r": "choice(2, 4, 8)", "train.lr": "choice(2e-3, 5e-3)"}
FLOATS = {"method.dropout": "interval(0.0, 0.2)", "train.lr": "tag(log, interval(1e-3, 1e-2))"}
SAMPLERS = [
    {"name": "random", "seed": 0},
    {"name": "tpe", "seed": 0, "n_startup_trials": 2},
    {"name": "grid", "seed": 0},
    {"name": "cmaes", "seed": 0, "n_startup_trials": 2},
    {"name": "gp", "seed": 0, "n_startup_trials": 2},
    {"name": "nsga2", "seed": 0},
]


class Worker:
    """One process of a sweep: its own storage object, study object and samplers."""

    def __init__(self, journal, sampler: dict, params: dict):
        self.space = SearchSpace(params)
        grid = self.space.grid("hydra.sweeper.params") if sampler["name"] == "grid" else None
        self.samplers = seeded_samplers(sampler, grid, False)
        self.study = optuna.create_study(
            study_name="seeds",
            storage=open_storage(f"journal:{journal}"),
            sampler=self.samplers(0),
            direction="maximize",
            load_if_exists=True,
        )

    def ask(self) -> optuna.Trial:
        trial = ask(self.study, self.samplers)
        self.space.sample(trial, {})
        return trial

    def tell(self, trial: optuna.Trial) -> None:
        self.study.tell(trial, sum(float(v) for v in trial.params.values()))  # a stand-in metric


def _one_worker(tmp_path, sampler: dict, params: dict, n: int) -> list[dict]:
    worker = Worker(tmp_path / "alone.journal", sampler, params)
    sampled = []
    for _ in range(n):
        trial = worker.ask()
        sampled.append(trial.params)
        worker.tell(trial)
    return sampled


def _params(sampler: dict) -> dict:
    return GRID if sampler["name"] == "grid" else FLOATS


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s["name"])
def test_two_workers_sample_what_one_worker_samples_and_never_the_same_twice(tmp_path, sampler):
    params = _params(sampler)
    alone = _one_worker(tmp_path, sampler, params, 5)
    assert len({tuple(sorted(p.items())) for p in alone}) == 5  # no configuration twice
    journal = tmp_path / "shared.journal"
    workers = [Worker(journal, sampler, params), Worker(journal, sampler, params)]
    together = []
    for number in range(5):  # the workers take turns, as two processes do under the study lock
        worker = workers[number % 2]
        trial = worker.ask()
        assert trial.number == number
        together.append(trial.params)
        worker.tell(trial)
    assert together == alone


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s["name"])
def test_after_a_kill_the_next_process_samples_what_an_unkilled_sweep_would(tmp_path, sampler):
    params = _params(sampler)
    alone = _one_worker(tmp_path, sampler, params, 4)
    journal = tmp_path / "killed.journal"
    first = Worker(journal, sampler, params)
    first.tell(first.ask())
    killed = first.ask()  # sampled, never told: its process dies here
    second = Worker(journal, sampler, params)  # the rerun: a new process, a new sampler
    requeue(second.study, killed._trial_id, "its worker process died")
    sampled = [t.params for t in second.study.get_trials() if t.state.is_finished()]
    while len(sampled) < 4:
        trial = second.ask()
        sampled.append(trial.params)
        second.tell(trial)
    assert second.study.get_trials()[1].params == killed.params  # the killed trial resumed as itself
    assert sampled == alone


def test_trial_seeds_differ_per_trial_and_stay_unseeded_without_a_seed():
    seeds = [trial_seed(0, n) for n in range(100)]
    assert len(set(seeds)) == 100 and seeds == [trial_seed(0, n) for n in range(100)]
    assert trial_seed(1, 0) != trial_seed(0, 0) and all(0 <= s < 2**32 for s in seeds)
    assert trial_seed(None, 3) is None
