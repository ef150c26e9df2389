"""Kill windows of the sweeper, through the real command line: the sweep runs in its own process group and
is SIGKILLed at one exact operation, seen by polling (in a tight loop, never after a sleep) the Optuna
journal (JSON lines, one operation each) or MLflow's sqlite store (read-only). Then the same command runs
again, and the sweep must end as if it had never been killed: every trial finished once, one parent run,
nothing left RUNNING, and the configurations a seeded sweep samples unchanged by the kill."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.storages.journal._storage import JournalOperation
from optuna.trial import TrialState

from .helpers import (
    REPO,
    children,
    client,
    load,
    parents,
    replay_sampler,
    run_sweep,
    sweep_command,
    write_sweep,
)

pytestmark = pytest.mark.slow

PARAMS = {"method.r": "choice(2, 4, 8, 16)", "train.lr": "tag(log, interval(1e-3, 1e-2))"}
SAMPLER = {"name": "random", "seed": 0}


def _sweep(root: Path, name: str, n_trials: int) -> None:
    write_sweep(
        root, name, {"n_trials": n_trials, "sampler": SAMPLER, "pruner": {"name": "none"}, "params": PARAMS}
    )


def launch(root: Path, command: list[str]) -> subprocess.Popen:
    """``command`` in its own process group, niced: the test's polling loop gets a core when it needs one."""
    return subprocess.Popen(
        command,
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=lambda: os.nice(10),
    )


def start(root: Path, name: str, tiny: list[str], *extra: str) -> subprocess.Popen:
    return launch(root, sweep_command(root, name, tiny, *extra))


def kill_when(process: subprocess.Popen, moment, timeout: float = 600) -> None:
    """SIGKILL ``process``'s group the first time ``moment()`` is true; fail if it ends or times out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if moment():
            os.killpg(process.pid, 9)
            process.wait()
            return
        if process.poll() is not None:
            pytest.fail(f"the sweep ended (exit {process.returncode}) before the moment to kill it")
    os.killpg(process.pid, 9)
    process.wait()
    pytest.fail("the moment to kill the sweep never came")


class Journal:
    """The operations of an Optuna journal file, read incrementally (only what was appended since)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial, self.ops = path, 0, b"", []

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return self.ops
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        self.ops.extend(json.loads(line) for line in lines if line)
        return self.ops


def has_tag(db: Path, key: str, value: str) -> bool:
    """Whether MLflow's sqlite store holds a run tagged ``key=value`` (a run and its tags come at once)."""
    if not db.exists():
        return False
    try:
        connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0)
        try:
            query = "SELECT 1 FROM tags WHERE key = ? AND value = ?"
            return connection.execute(query, (key, value)).fetchone() is not None
        finally:
            connection.close()
    except sqlite3.Error:  # not created yet, or a writer holds it this instant
        return False


def has_parent_run(db: Path) -> bool:
    return has_tag(db, "lora_sweep.role", "sweep")


def check_ended_once(root: Path, name: str, n_trials: int) -> list:
    """Every trial finished once, one parent run FINISHED with a child run per trial, nothing RUNNING."""
    trials = load(root, name).get_trials()
    assert [(t.number, t.state) for t in trials] == [(n, TrialState.COMPLETE) for n in range(n_trials)]
    (parent,) = parents(root, name)
    assert parent.info.status == "FINISHED", parent.info.status
    runs = children(root, parent.info.run_id)
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs) == list(range(n_trials))
    assert not client(root).search_runs(["1"], filter_string="attributes.status = 'RUNNING'")
    return trials


def check_sampled_as_unkilled(trials: list) -> None:
    """The seeded sweep sampled what one unkilled worker samples, trial by trial: no configuration twice."""
    replayed = replay_sampler(SAMPLER, PARAMS, [t.value for t in trials], "maximize")
    assert [t.params for t in trials] == replayed
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)


def test_kill_between_creating_the_parent_run_and_storing_its_id(tmp_path, tiny):
    """The rerun finds the parent run the killed process made (by the study's identity) and reuses it."""
    _sweep(tmp_path, "parent", 2)
    study_created = Journal(tmp_path / "outputs" / "sweeps" / "parent" / "optuna.journal")
    process = start(tmp_path, "parent", tiny, "train.epochs=1")
    kill_when(process, lambda: has_parent_run(tmp_path / "mlflow.db"))
    assert study_created.read(), "the study was not created before its parent run"
    assert "mlflow_parent_run_id" not in load(tmp_path, "parent").user_attrs  # killed inside the window
    assert len(parents(tmp_path, "parent")) == 1

    run_sweep(tmp_path, "parent", tiny, "train.epochs=1")
    check_ended_once(tmp_path, "parent", 2)
    (parent,) = parents(tmp_path, "parent")
    assert load(tmp_path, "parent").user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert parent.data.params["n_trials"] == "2"  # what the killed process had no time to log


def test_kill_between_asking_for_a_trial_and_naming_its_worker(tmp_path, tiny):
    """Trial 1 exists, RUNNING, but no worker is named in it: the rerun takes it over (it is not another
    worker's), samples it and the next trial as an unkilled sweep does, and closes the sweep."""
    _sweep(tmp_path, "orphan", 3)
    journal = Journal(tmp_path / "outputs" / "sweeps" / "orphan" / "optuna.journal")

    def asked_for_trial_1() -> bool:
        ops = journal.read()
        creates = sum(op["op_code"] == JournalOperation.CREATE_TRIAL for op in ops)
        return creates >= 2 and ops[-1]["op_code"] == JournalOperation.CREATE_TRIAL

    process = start(tmp_path, "orphan", tiny, "train.epochs=1")
    kill_when(process, asked_for_trial_1)
    killed = load(tmp_path, "orphan").get_trials()[-1]
    assert killed.state == TrialState.RUNNING and "worker" not in killed.user_attrs and not killed.params

    result = run_sweep(tmp_path, "orphan", tiny, "train.epochs=1")
    assert "other workers of this study are still at work" not in result.stdout + result.stderr
    trials = check_ended_once(tmp_path, "orphan", 3)
    assert trials[killed.number].user_attrs["interruptions"] == ["its worker died as it asked for the trial"]
    check_sampled_as_unkilled(trials)


def test_two_workers_started_together_never_sample_the_same_configuration(tmp_path, tiny):
    """Each worker's first trial is the first draw of its own sampler unless seeds are per trial: three
    trials, long enough that both workers get one even when one starts much later than the other."""
    _sweep(tmp_path, "pair", 3)
    command = sweep_command(tmp_path, "pair", tiny, "train.epochs=10")  # ~17 s a trial: setup takes ~15
    # output to files, not pipes: a worker whose full pipe nobody reads yet would stall, and not ask
    logs = [(tmp_path / f"worker-{i}.log").open("w") for i in range(2)]
    workers = [subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    for worker, log in zip(workers, logs):
        worker.wait(timeout=900)
        log.close()
        assert worker.returncode == 0, Path(log.name).read_text()[-4000:]
    trials = check_ended_once(tmp_path, "pair", 3)
    assert {t.user_attrs["sweeper"]["pid"] for t in trials} == {w.pid for w in workers}  # both asked
    check_sampled_as_unkilled(trials)


def test_the_kill_benchmark_in_tiny_mode(tmp_path):
    """benchmarks/kills.py: two kills at seeded random moments, then the sweep to its end; its figures."""
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "kills.py"),
            "--tiny",
            "--kills",
            "2",
            "--max-delay",
            "15",
            "--workdir",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((tmp_path / "kills.json").read_text())
    # an attempt that ends before its delay is not killed: at most 15 s, far less than the sweep needs
    assert len(figures["attempts"]) == 2 and figures["kills"] >= 1, result.stdout[-3000:]
    clean = {"parent_runs": 1, "running_runs": 0, "duplicate_configurations": 0}
    assert {key: figures[key] for key in clean} == clean, result.stdout[-3000:]
    assert figures["unloadable_checkpoints"] == [], result.stdout[-3000:]
    assert all(s["finished"] == s["n_trials"] for s in figures["studies"].values()), result.stdout[-3000:]


def test_kill_between_creating_a_run_and_writing_its_id_to_the_record(tmp_path, tiny_overrides):
    """A run killed after MLflow made its run but before record.json named it: the rerun continues that run
    (found by the identity the record held before the run existed), so there is one run, FINISHED."""
    folder = tmp_path / "outputs" / "one"
    command = [
        sys.executable,
        "-m",
        "lora_sweep",
        *tiny_overrides,
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.epochs=1",
        "hydra.run.dir=outputs/one",
    ]
    process = launch(tmp_path, command)
    run_row = ("lora_sweep.output_dir", str(folder.resolve()))
    kill_when(process, lambda: has_tag(tmp_path / "mlflow.db", *run_row))
    record = json.loads((folder / "record.json").read_text())
    assert record["status"] == "running" and "run_id" not in record["mlflow"]  # killed inside the window
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    store = client(tmp_path)
    runs = store.search_runs([e.experiment_id for e in store.search_experiments()])
    assert [r.info.status for r in runs] == ["FINISHED"], [(r.info.run_id, r.info.status) for r in runs]
    assert json.loads((folder / "record.json").read_text())["mlflow"]["run_id"] == runs[0].info.run_id
