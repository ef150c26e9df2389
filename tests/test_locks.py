"""The study-wide lock: several processes counting and asking on one real storage (journal file, SQLite,
a real PostgreSQL server) start exactly n_trials trials, never more, with unique numbers."""

from __future__ import annotations

import multiprocessing
import time

import optuna
import pytest
from optuna.trial import TrialState

from lora_sweep.sweep.locks import advisory_key, lock_file, study_lock
from lora_sweep.sweep.study import JOURNAL_PREFIX, counts, open_storage

N_TRIALS, WORKERS = 10, 4  # not a multiple: the last round is where unlocked workers overshoot


def _work(spec: str, start_at: float, use_lock: bool, out) -> None:
    """One worker process: the sweep runner's count-then-ask step, with a window that invites a race."""
    storage = open_storage(spec)
    study = optuna.load_study(study_name="locked", storage=storage, sampler=optuna.samplers.RandomSampler())
    time.sleep(max(0.0, start_at - time.time()))  # every worker starts asking at the same moment
    asked = []
    while True:
        with study_lock(study._storage, spec, "locked") if use_lock else _nothing():
            state = counts(study)
            if state["complete"] + state["running"] >= N_TRIALS:
                break
            time.sleep(0.02)  # the time a sampler takes: another worker would count the same trials here
            trial = study.ask()
        time.sleep(0.05)  # "training"
        study.tell(trial, float(trial.number))
        asked.append(trial.number)
    out.put(asked)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_workers(spec: str, use_lock: bool = True) -> tuple[list[optuna.trial.FrozenTrial], list[list[int]]]:
    optuna.create_study(study_name="locked", storage=open_storage(spec))
    context = multiprocessing.get_context("spawn")  # a fresh interpreter each, like separate terminals
    out = context.Queue()
    start_at = time.time() + 8  # spawned interpreters need a few seconds to import optuna
    processes = [context.Process(target=_work, args=(spec, start_at, use_lock, out)) for _ in range(WORKERS)]
    for process in processes:
        process.start()
    asked = [out.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    study = optuna.load_study(study_name="locked", storage=open_storage(spec))
    return study.get_trials(), asked


def check_exact(trials, asked) -> None:
    assert [t.state for t in trials] == [TrialState.COMPLETE] * N_TRIALS  # not one trial more
    numbers = sorted(n for worker in asked for n in worker)
    assert numbers == list(range(N_TRIALS))  # each trial started by exactly one worker
    assert sum(bool(worker) for worker in asked) >= 2  # the workers really shared the study


@pytest.mark.slow
def test_journal_and_sqlite_workers_start_exactly_n_trials(tmp_path):
    check_exact(*run_workers(JOURNAL_PREFIX + str(tmp_path / "optuna.journal")))
    check_exact(*run_workers(f"sqlite:///{tmp_path / 'optuna.db'}"))
    # the lock is a file of its own beside the storage, not Optuna's "<journal>.lock"
    assert lock_file(JOURNAL_PREFIX + str(tmp_path / "optuna.journal"), "locked").name.startswith(
        "optuna.journal.study-"
    )
    assert lock_file(f"sqlite:///{tmp_path / 'optuna.db'}", "locked").parent == tmp_path


@pytest.mark.slow
def test_postgres_workers_start_exactly_n_trials(postgres):
    check_exact(*run_workers(postgres["optuna"]))


def _open(url: str, start_at: float, out) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    try:
        optuna.create_study(study_name="opened", storage=open_storage(url), load_if_exists=True)
        out.put("ok")
    except Exception as err:  # noqa: BLE001 - reported to the test
        out.put(str(err))


@pytest.mark.slow
def test_workers_opening_an_empty_postgres_database_together_create_it_once(fresh_database):
    """Without the schema lock, 3 of 4 such workers failed: duplicate key ... "pg_type_typname_nsp_index"."""
    url = fresh_database("opened_together")
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start_at = time.time() + 8
    processes = [context.Process(target=_open, args=(url, start_at, out)) for _ in range(WORKERS)]
    for process in processes:
        process.start()
    results = [out.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    assert results == ["ok"] * WORKERS


def test_postgres_lock_excludes_another_connection(postgres):
    """While one worker holds the advisory lock, another connection cannot take it; after, it can."""
    from sqlalchemy import create_engine, text

    storage = open_storage(postgres["optuna"])
    other = create_engine(postgres["optuna"])
    key = advisory_key("exclusive")
    with other.connect() as connection:
        with study_lock(storage, postgres["optuna"], "exclusive"):
            assert (
                connection.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key}).scalar() is False
            )
        connection.rollback()
        assert connection.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key}).scalar() is True
    assert (
        advisory_key("exclusive") == key and advisory_key("other") != key
    )  # stable across processes, per study


def test_other_storages_warn_and_go_on(caplog):
    storage = open_storage("sqlite:///:memory:")
    with caplog.at_level("WARNING"), study_lock(storage, "sqlite:///:memory:", "x"):
        pass
    assert "may overshoot n_trials" in caplog.text
