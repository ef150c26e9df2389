"""The Optuna sweeper through the real command line: real journal/sqlite storages, a real MLflow sqlite
store, tiny in-process models. Each test writes its own sweep file into a folder put on Hydra's search
path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
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


@pytest.mark.slow
def test_sweep_nests_trials_under_one_parent_and_links_trial_run_checkpoint(tmp_path, tiny):
    write_sweep(
        tmp_path,
        "small",
        {
            "n_trials": 3,
            "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2},
            "pruner": {"name": "none"},
            "params": {"method.r": "choice(2, 4, 8)", "train.lr": "tag(log, interval(1e-3, 1e-2))"},
            "alpha": {"ratio": [1, 2]},
            "enqueue": [{"method.r": 8, "method.alpha_ratio": 2, "train.lr": 5e-3}],
            "baseline": {
                "n_trials": 1,
                "params": {"train.lr": "tag(log, interval(1e-4, 1e-3))"},
                "enqueue": [{"train.lr": 1e-3}],
            },
        },
    )
    result = run_sweep(tmp_path, "small", tiny)
    assert "sweep small" in result.stdout and "best trial" in result.stdout and "★" in result.stdout

    study = load(tmp_path, "small")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert trials[0].params == {
        "method.r": 8,
        "method.alpha_ratio": 2.0,
        "train.lr": 5e-3,
    }  # the enqueued trial ran first
    baseline = load(tmp_path, "small-baseline", folder="small").get_trials()
    assert len(baseline) == 1 and baseline[0].params == {"train.lr": 1e-3}

    (parent,) = parents(tmp_path, "small")
    assert parent.info.status == "FINISHED" and parent.data.params["n_trials"] == "3"
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    runs = [
        r
        for r in children(tmp_path, parent.info.run_id)
        if r.data.tags["lora_sweep.role"] in ("search", "baseline")
    ]
    assert len(runs) == 4  # three LoRA trials and the full fine-tuning baseline
    roles = sorted(r.data.tags["lora_sweep.role"] for r in runs)
    assert roles == ["baseline", "search", "search", "search"]
    for trial in trials:  # trial -> run -> checkpoint, and back
        run = client(tmp_path).get_run(trial.user_attrs["mlflow_run_id"])
        assert (
            run.data.tags["optuna.trial_number"] == str(trial.number)
            and run.data.tags["optuna.state"] == "complete"
        )
        assert run.data.params["method.r"] == str(trial.params["method.r"])
        assert Path(trial.user_attrs["checkpoint"], "adapter_model.safetensors").is_file()
        record = json.loads(Path(trial.user_attrs["record"]).read_text())
        assert record["mlflow"]["run_id"] == run.info.run_id and record["metrics"]["objective"] == trial.value
        assert "test_accuracy" not in record["metrics"]  # the test split is kept for the chosen checkpoint
    # setup is paid once per process: later trials reuse the model and the tokenized data
    setups = [json.loads(Path(t.user_attrs["record"]).read_text())["params"] for t in baseline + trials]
    assert [s["setup_reused"] for s in setups] == [False, True, True, True]
    assert "reused the loaded model and tokenized data" in result.stdout + result.stderr


@pytest.mark.slow
def test_bad_trial_is_pruned_in_optuna_and_mlflow(tmp_path, tiny):
    write_sweep(
        tmp_path,
        "prune",
        {
            "n_trials": 2,
            "sampler": {"name": "random", "seed": 0},
            "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
            "params": {"train.lr": "tag(log, interval(1e-9, 1e-2))"},
            "enqueue": [
                {"train.lr": 5e-3},
                {"train.lr": 1e-9},
            ],  # a sound trial, then an absurd learning rate
        },
    )
    run_sweep(tmp_path, "prune", tiny)
    good, bad = load(tmp_path, "prune").get_trials()
    assert good.state == TrialState.COMPLETE and bad.state == TrialState.PRUNED
    assert len(bad.intermediate_values) < len(good.intermediate_values)  # it stopped early
    run = client(tmp_path).get_run(bad.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["lora_sweep.status"] == "pruned"
    assert run.data.tags["optuna.state"] == "pruned"
    history = client(tmp_path).get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == sorted(bad.intermediate_values)  # its partial metrics are kept


def _training(root: Path) -> bool:
    """The running trial has started its MLflow run (its record names it): a kill now cuts a trial mid-run."""
    for trial in load(root, "resume").get_trials(states=(TrialState.RUNNING,)):
        record = Path(trial.user_attrs.get("output_dir", "/nonexistent")) / "record.json"
        try:
            if json.loads(record.read_text()).get("mlflow", {}).get("run_id"):
                return True
        except (OSError, ValueError):
            pass
    return False


@pytest.mark.slow
def test_killed_sweep_resumes_to_exactly_n_trials(tmp_path, tiny):
    write_sweep(
        tmp_path,
        "resume",
        {
            "n_trials": 3,
            "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2},
            "pruner": {"name": "none"},
            "params": {"method.r": "choice(2, 4, 8)", "train.lr": "tag(log, interval(1e-3, 1e-2))"},
        },
    )
    command = sweep_command(
        tmp_path, "resume", tiny, "train.epochs=4"
    )  # long enough trials to be caught mid-run
    process = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    journal = tmp_path / "outputs" / "sweeps" / "resume" / "optuna.journal"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it in the middle of its second trial
        try:
            states = [t.state for t in load(tmp_path, "resume").get_trials()] if journal.exists() else []
        except KeyError:  # the journal exists, the study is not in it yet
            states = []
        if TrialState.COMPLETE in states and TrialState.RUNNING in states and _training(tmp_path):
            break
        time.sleep(0.3)
    else:
        pytest.fail("the sweep never reached its second trial")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    interrupted = load(tmp_path, "resume").get_trials()
    (stale,) = [t for t in interrupted if t.state == TrialState.RUNNING]  # left behind by the dead process
    report = subprocess.run(
        [sys.executable, "-m", "lora_sweep.report", "resume", "--replicates", "0", "--no-register"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )  # the report also reads an interrupted sweep
    assert report.returncode == 0, report.stderr[-3000:]
    rows = json.loads((tmp_path / "reports" / "resume" / "report.json").read_text())["trials"]
    assert [r["state"] for r in rows if r["trial"] == stale.number] == ["running"]

    stale_record = json.loads((Path(stale.user_attrs["output_dir"]) / "record.json").read_text())

    run_sweep(tmp_path, "resume", tiny, "train.epochs=4")  # the same command: the killed trial resumes
    trials = load(tmp_path, "resume").get_trials()
    assert len(trials) == 3 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    killed = trials[stale.number]  # the same trial finished, not a failed one plus a retry
    assert killed.state == TrialState.COMPLETE and killed.user_attrs["interruptions"] == [
        "its worker process died"
    ]
    assert (
        killed.params == stale.params
        and killed.user_attrs["mlflow_run_id"] == stale_record["mlflow"]["run_id"]
    )
    record = json.loads((Path(stale.user_attrs["output_dir"]) / "record.json").read_text())
    assert record["status"] == "completed" and len(record["resumes"]) == 1
    runs = client(tmp_path).search_runs(["1"], filter_string=f"tags.`optuna.trial_number` = '{stale.number}'")
    assert [r.info.run_id for r in runs] == [stale_record["mlflow"]["run_id"]]  # continued, not a second run
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["lora_sweep.resumed"] == "true"
    assert len(parents(tmp_path, "resume")) == 1  # the parent run was reused, not duplicated
    (parent,) = parents(tmp_path, "resume")
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sampler", "params"),
    [
        ({"name": "grid", "seed": 0}, {"method.r": "choice(2, 4)", "train.lr": "choice(2e-3, 5e-3)"}),
        (
            {"name": "tpe", "seed": 0, "n_startup_trials": 1},
            {"method.r": "range(2, 9, 2)", "train.lr": "tag(log, interval(1e-3, 1e-2))"},
        ),
        # one startup trial: the schema's default (10) would leave both trials to CMA-ES's random start
        (
            {"name": "cmaes", "seed": 0, "n_startup_trials": 1},
            {"method.dropout": "interval(0.0, 0.2)", "train.lr": "tag(log, interval(1e-3, 1e-2))"},
        ),
    ],
)
def test_samplers(tmp_path, tiny, sampler, params):
    write_sweep(
        tmp_path,
        "samplers",
        {"n_trials": 2, "sampler": sampler, "pruner": {"name": "none"}, "params": params},
    )
    run_sweep(tmp_path, "samplers", tiny, "train.epochs=1")
    study = load(tmp_path, "samplers")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert trials[0].params != trials[1].params
    # the named sampler ran: replayed on the recorded objective values, it proposes what the sweep tried
    recorded, values = [t.params for t in trials], [t.value for t in trials]
    assert replay_sampler(sampler, params, values, study.direction) == recorded
    if sampler["name"] == "grid":  # distinct points of the grid, each marked by Optuna's grid sampler
        grid = {"method.r": [2, 4], "train.lr": [2e-3, 5e-3]}
        assert all(p.keys() == grid.keys() and all(p[k] in grid[k] for k in grid) for p in recorded)
        grid_ids = [t.system_attrs["grid_id"] for t in trials]
        assert len(set(grid_ids)) == 2 and set(grid_ids) <= set(range(4))
    else:  # past its startup trial a model-based sampler differs from random sampling with the same seed
        random = replay_sampler({"name": "random", "seed": 0}, params, values, study.direction)
        assert random[1] != recorded[1]
    if sampler["name"] == "cmaes":
        assert any(key.startswith("cma:") for key in trials[1].system_attrs)  # CMA-ES keeps its state there


@pytest.mark.slow
def test_multi_objective_records_the_pareto_front(tmp_path, tiny):
    write_sweep(
        tmp_path,
        "pareto",
        {
            "n_trials": 3,
            "objectives": ["objective", "trainable_params"],
            "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 3},
            "params": {"method.r": "choice(1, 4, 16)", "method.targets": "choice(attention_qv, all_linear)"},
        },
    )
    result = run_sweep(tmp_path, "pareto", tiny, "train.epochs=1")
    study = load(tmp_path, "pareto")
    assert len(study.directions) == 2 and all(len(t.values) == 2 for t in study.get_trials())
    assert all(t.values[1] == t.user_attrs["trainable_params"] for t in study.get_trials())
    summary = json.loads((tmp_path / "outputs" / "sweeps" / "pareto" / "sweep_summary.json").read_text())
    assert sorted(summary["pareto_front"]) == sorted(t.number for t in study.best_trials)
    assert "Pareto front" in result.stdout


@pytest.mark.slow
def test_joblib_workers_share_the_study_without_duplicates(tmp_path, tiny):
    write_sweep(
        tmp_path,
        "parallel",
        {
            "n_trials": 4,
            "sampler": {"name": "random", "seed": 0},
            "pruner": {"name": "none"},
            "params": {"method.r": "choice(2, 4, 8, 16)", "train.lr": "tag(log, interval(1e-3, 1e-2))"},
        },
    )
    run_sweep(
        tmp_path, "parallel", tiny, "train.epochs=1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"
    )
    trials = load(tmp_path, "parallel").get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    workers = {t.user_attrs["worker"]["pid"] for t in trials}
    assert len(workers) == 2  # two worker processes trained
    starts = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(b[0] < a[1] for a, b in zip(starts, starts[1:]))  # trials overlapped in time
    records = [json.loads(Path(t.user_attrs["record"]).read_text()) for t in trials]
    assert len({r["output_dir"] for r in records}) == 4


@pytest.mark.slow
def test_sqlite_storage_url(tmp_path, tiny):
    write_sweep(
        tmp_path,
        "rdb",
        {
            "storage": f"sqlite:///{tmp_path}/optuna.db",
            "n_trials": 2,
            "sampler": {"name": "random", "seed": 0},
            "pruner": {"name": "none"},
            "params": {"train.lr": "tag(log, interval(1e-3, 1e-2))"},
        },
    )
    run_sweep(tmp_path, "rdb", tiny, "train.epochs=1")
    study = optuna.load_study(study_name="rdb", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            {"method.rank": "choice(4, 8)"},
            "error: hydra.sweeper.params.method.rank='choice(4, 8)': no such config key",
        ),
        (
            {"train.lr": "tag(log, interval(1e-2, 1e-4))"},
            "error: hydra.sweeper.params.train.lr='tag(log, interval(1e-2, 1e-4))': low 0.01 > high 0.0001",
        ),
        (
            {"train.lr": "tag(log, interval(0, 1e-2))"},
            "error: hydra.sweeper.params.train.lr='tag(log, interval(0, 1e-2))': a log scale needs low > 0",
        ),
        (
            {"method.r": "choice(4, 0)"},
            "error: hydra.sweeper.params -> method.r=0: must be a positive integer",
        ),
        (
            {"method.targets": "choice(attention_qv, everything)"},
            "error: hydra.sweeper.params.method.targets='everything': neither a preset",
        ),
    ],
)
def test_bad_sweep_file_fails_in_one_line_before_training(tmp_path, tiny, params, expected):
    write_sweep(tmp_path, "bad", {"n_trials": 2, "params": params})
    result = run_sweep(tmp_path, "bad", tiny, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr[-3000:]
    assert not list((tmp_path / "outputs").rglob("record.json"))  # nothing trained


@pytest.mark.slow
def test_unknown_sampler_and_pruner(tmp_path, tiny):
    write_sweep(
        tmp_path,
        "bad2",
        {"sampler": {"name": "bayes"}, "params": {"train.lr": "tag(log, interval(1e-3, 1e-2))"}},
    )
    result = run_sweep(tmp_path, "bad2", tiny, check=False)
    assert (
        result.returncode == 2
        and result.stderr.strip()
        == "error: hydra.sweeper.sampler.name='bayes': must be one of tpe, random, grid, gp, cmaes, nsga2"
    )
    result = run_sweep(
        tmp_path,
        "bad2",
        tiny,
        "hydra.sweeper.sampler.name=tpe",
        "hydra.sweeper.pruner.name=asha",
        check=False,
    )
    assert result.returncode == 2 and result.stderr.strip().startswith(
        "error: hydra.sweeper.pruner.name='asha': must be one of none, median"
    )


@pytest.mark.slow
def test_plain_hydra_grid_with_the_basic_sweeper(tmp_path, tiny):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_sweep",
            "--multirun",
            "method.r=2,4",
            f"data.cache_dir={tmp_path / 'cache'}",
            *tiny,
            "train.epochs=1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "outputs" / "multirun").rglob("record.json")]
    assert sorted(r["config"]["method"]["r"] for r in records) == [2, 4]
    assert all(r["status"] == "completed" for r in records)


def test_every_shipped_sweep_composes(tmp_path):
    """Every file under sweeps/ (recursively) composes and its search space validates."""
    from hydra import compose, initialize_config_dir

    from lora_sweep import cli
    from lora_sweep.sweep.space import SearchSpace

    cli.register_resolvers()
    files = sorted((REPO / "sweeps").rglob("*.yaml"))
    assert {f.stem for f in files} >= {"quick", "rank_alpha_targets"}
    for path in files:
        header = path.read_text().splitlines()[:12]
        assert any("python -m lora_sweep --multirun sweeps=" in line for line in header), (
            f"{path.name} names no run command"
        )
        name = path.relative_to(REPO / "sweeps").with_suffix("").as_posix()
        with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"sweeps={name}", "output_dir=x"], return_hydra_config=True)
        sweeper = cfg.hydra.sweeper
        assert sweeper._target_.endswith("LoraOptunaSweeper"), path
        from omegaconf import OmegaConf

        settings = OmegaConf.to_container(sweeper, resolve=False)
        space = SearchSpace(
            settings["params"],
            alpha=settings.get("alpha"),
            target_sets=settings.get("target_sets"),
            conditions=settings.get("conditions"),
        )
        for i, entry in enumerate(settings.get("enqueue") or []):
            space.check_enqueued(entry, f"{name}.enqueue[{i}]")
        cfg.hydra = None
        cli.to_run_config(
            OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg).items() if k != "hydra"})
        )
