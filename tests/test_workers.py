"""Many workers, one study: separate `python -m lora_sweep --multirun` processes started by hand on one
study, through the real command line. On one machine with the default journal storage and MLflow's
default sqlite store; across machines' worth of setup with a real PostgreSQL server holding the study and
an `mlflow server` process holding the runs. Plus the storage URLs that cannot work."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from .helpers import load, run_sweep, sweep_command, write_sweep
from .servers import PG_PASSWORD, free_port, mlflow_server

SEARCH = {
    "n_trials": 4,
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "params": {"method.r": "choice(2, 4, 8, 16)", "train.lr": "tag(log, interval(1e-3, 1e-2))"},
    "baseline": {"n_trials": 1, "params": {"train.lr": "tag(log, interval(1e-4, 1e-3))"}},
}


def start_workers(
    root: Path, name: str, tiny: list[str], *extra: str, count: int = 2
) -> list[subprocess.Popen]:
    """`count` terminals running the same command at the same moment."""
    command = sweep_command(root, name, tiny, *extra)
    return [
        subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(count)
    ]


def wait_all(workers: list[subprocess.Popen]) -> list[str]:
    outputs = [worker.communicate(timeout=900) for worker in workers]
    for worker, (stdout, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stdout[-2000:] + stderr[-4000:]
    return [stdout + stderr for stdout, stderr in outputs]


def check_study(
    search: optuna.Study, baseline: optuna.Study, workers: list[subprocess.Popen]
) -> list[optuna.trial.FrozenTrial]:
    trials = search.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4  # exactly n_trials, not one more started
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert [t.state for t in baseline.get_trials()] == [
        TrialState.COMPLETE
    ]  # the baseline ran once, not once per worker
    pids = {t.user_attrs["worker"]["pid"] for t in trials + baseline.get_trials()}
    assert pids == {w.pid for w in workers}  # both terminals trained
    folders = [Path(t.user_attrs["record"]).parent for t in trials]
    assert len(set(folders)) == 4
    for trial in trials:
        record = json.loads(Path(trial.user_attrs["record"]).read_text())
        assert record["status"] == "completed" and record["metrics"]["objective"] == trial.value
        assert record["mlflow"]["run_id"] == trial.user_attrs["mlflow_run_id"]
    return trials


def check_mlflow(client: MlflowClient, study: str, trials: list[optuna.trial.FrozenTrial]) -> None:
    experiment = client.get_experiment_by_name("lora_sweep")
    (parent,) = client.search_runs(
        [experiment.experiment_id], f"tags.`lora_sweep.sweep` = '{study}'"
    )  # one parent
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(r.data.tags["lora_sweep.role"] for r in children) == ["baseline"] + ["search"] * 4
    by_id = {r.info.run_id: r for r in children}
    for trial in trials:  # every trial's run, nested, finished, tagged with its own trial number
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED" and run.data.tags["optuna.trial_number"] == str(trial.number)
        assert run.data.metrics["objective"] == pytest.approx(trial.value)
    assert not client.search_runs(
        [experiment.experiment_id], "attributes.status = 'RUNNING'"
    )  # nothing left running


@pytest.mark.slow
def test_two_terminals_share_the_default_journal_and_mlflow_sqlite(tmp_path, tiny):
    # the report (without its checkpoint work and replicates) shows who closes the sweep
    write_sweep(
        tmp_path, "duo", {**SEARCH, "report": {"enabled": True, "checkpoints": False, "replicates": 0}}
    )
    started = time.perf_counter()
    # trials long enough that the second terminal, still starting up, finds some left to take
    workers = start_workers(tmp_path, "duo", tiny, "train.epochs=6")
    outputs = wait_all(workers)
    print(f"two workers, journal + mlflow sqlite: {time.perf_counter() - started:.1f} s")
    trials = check_study(load(tmp_path, "duo"), load(tmp_path, "duo-baseline", folder="duo"), workers)
    check_mlflow(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), "duo", trials)
    # one report, by the last worker out, with every trial finished in it; the other left it to that one
    assert sum("report: " in output for output in outputs) == 1
    assert sum("the last one out writes the report" in output for output in outputs) == 1
    rows = json.loads((tmp_path / "reports" / "duo" / "report.json").read_text())["trials"]
    assert sorted((r["trial"], r["state"]) for r in rows if r.get("method") != "full") == [
        (n, "complete") for n in range(4)
    ]


@pytest.mark.slow
def test_two_workers_on_postgres_and_an_mlflow_server(tmp_path, tiny, fresh_database):
    storage, tracking = fresh_database("duo_optuna"), fresh_database("duo_mlflow")
    write_sweep(tmp_path, "duo_pg", {**SEARCH, "storage": storage})
    with mlflow_server(tracking, tmp_path) as url:
        started = time.perf_counter()
        # as on two machines: each worker its own folder, nothing shared but the two servers
        for folder in ("a", "b"):
            (tmp_path / folder).mkdir()
        command = sweep_command(tmp_path, "duo_pg", tiny, "train.epochs=6", f"tracking.tracking_uri={url}")
        workers = [
            subprocess.Popen(
                command, cwd=tmp_path / folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for folder in ("a", "b")
        ]
        wait_all(workers)
        print(f"two workers, postgresql + mlflow server: {time.perf_counter() - started:.1f} s")
        search = optuna.load_study(study_name="duo_pg", storage=storage)
        trials = check_study(
            search, optuna.load_study(study_name="duo_pg-baseline", storage=storage), workers
        )
        assert {Path(t.user_attrs["record"]).parts[-6] for t in trials} == {
            "a",
            "b",
        }  # each wrote in its own folder
        client = MlflowClient(url)
        check_mlflow(client, "duo_pg", trials)
        for trial in trials:  # artifacts went through the server into its artifact store
            run = client.get_run(trial.user_attrs["mlflow_run_id"])
            assert run.info.artifact_uri.startswith("mlflow-artifacts:")
            assert any(f.path == "config.yaml" for f in client.list_artifacts(run.info.run_id))
            # the study's password never reaches the tracking server
            assert (
                PG_PASSWORD not in json.dumps(run.data.params)
                and run.data.params["sweep.storage"].count("***") == 1
            )
        assert list((tmp_path / "artifacts").rglob("config.yaml"))


BAD_STORAGES = [
    ("postgresql:/sweeper:{pw}@127.0.0.1/optuna", "not a storage URL"),  # one slash: no scheme separator
    ("postgresql://sweeper:{pw}@127.0.0.1:port/optuna", "cannot open the study storage"),  # port not a number
    ("postgress://sweeper:{pw}@127.0.0.1/optuna", "cannot open the study storage"),  # no such dialect
    (
        "postgresql://sweeper:{pw}@127.0.0.1:{free_port}/optuna",
        "cannot open the study storage",
    ),  # nothing listens there
]


@pytest.mark.slow
def test_bad_storage_urls_fail_in_one_line_and_lose_nothing(tmp_path, tiny):
    """Each bad URL: exit 2, one last stderr line naming the key and the value with its password hidden;
    the study and MLflow runs already there are untouched."""
    write_sweep(tmp_path, "kept", {**SEARCH, "n_trials": 1, "baseline": {"n_trials": 0}})
    run_sweep(tmp_path, "kept", tiny, "train.epochs=1")
    journal = tmp_path / "outputs" / "sweeps" / "kept" / "optuna.journal"
    before_journal, before_trials = journal.read_bytes(), load(tmp_path, "kept").get_trials()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def runs():
        return sorted(
            (r.info.run_id, r.info.status, r.data.tags.get("lora_sweep.status"))
            for r in client.search_runs(["1"])
        )

    before_runs = runs()
    for template, problem in BAD_STORAGES:
        url = template.format(pw=PG_PASSWORD, free_port=free_port())
        started = time.perf_counter()
        result = run_sweep(
            tmp_path, "kept", tiny, f"hydra.sweeper.storage={url}", "hydra.sweeper.n_trials=2", check=False
        )
        assert time.perf_counter() - started < 60  # no hanging on a server that is not there
        assert result.returncode == 2, result.stderr[-3000:]
        last = result.stderr.strip().splitlines()[-1]
        redacted = url.replace(PG_PASSWORD, "***")
        assert last.startswith(f"error: hydra.sweeper.storage={redacted!r}: {problem}"), last
        assert PG_PASSWORD not in result.stderr + result.stdout
    assert journal.read_bytes() == before_journal and load(tmp_path, "kept").get_trials() == before_trials
    assert runs() == before_runs  # the sweep's parent run was not reopened, killed or duplicated


def test_storage_urls_are_redacted_everywhere():
    from lora_sweep.secrets import password_of, redact, redact_text, redact_url

    assert redact_url("postgresql://u:p%40ss@db:5432/optuna") == "postgresql://u:***@db:5432/optuna"
    assert redact_url("postgresql+psycopg://u:pw@db/optuna") == "postgresql+psycopg://u:***@db/optuna"
    assert (
        redact_url("postgresql:/u:pw@db/optuna") == "postgresql:/u:***@db/optuna"
    )  # malformed, still hidden
    assert (
        redact_url("postgresql://u@db/optuna") == "postgresql://u@db/optuna"
    )  # no password: PGPASSWORD or ~/.pgpass
    assert redact_url("journal:/a/b:c@d.journal") == "journal:/a/b:c@d.journal"
    assert (
        redact_text('password authentication failed for "u" (pw)', [password_of("postgresql://u:pw@db/x")])
        == 'password authentication failed for "u" (***)'
    )
    assert redact({"sweep": {"storage": "postgresql://u:pw@db/x", "n": 1}, "l": ["http://a:b@c"]}) == {
        "sweep": {"storage": "postgresql://u:***@db/x", "n": 1},
        "l": ["http://a:***@c"],
    }
