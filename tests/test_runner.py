"""A sweep on the tiny model driven in-process through the real entry point (Hydra's basic launcher runs
the trials in this process): the fast counterpart of tests/test_sweep.py's command-line sweeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus
from optuna.trial import TrialState

from lora_sweep.sweep.runner import _job_error, phase_sampler
from lora_sweep.sweep.settings import SamplerConf, sweeper_conf

from .helpers import children, client, load, parents, write_sweep


@pytest.mark.slow  # two trainings: ~5 min on 2 shared cores, tens of seconds idle
def test_in_process_sweep_nests_trials_and_links_trial_run_record_checkpoint(
    tmp_path, sweep_in_process, capsys
):
    write_sweep(
        tmp_path,
        "inproc",
        {
            "n_trials": 2,
            "sampler": {"name": "random", "seed": 0},
            "pruner": {"name": "none"},
            "params": {"method.r": "choice(2, 4)", "train.lr": "tag(log, interval(1e-3, 1e-2))"},
            "enqueue": [{"method.r": 4, "train.lr": 5e-3}],
        },
    )
    sweep_in_process("inproc", "train.epochs=1")
    out = capsys.readouterr().out
    assert "sweep inproc" in out and "★" in out and "best trial" in out

    study = load(tmp_path, "inproc")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert trials[0].params == {"method.r": 4, "train.lr": 5e-3}  # the enqueued trial ran first
    (parent,) = parents(tmp_path, "inproc")
    assert parent.info.status == "FINISHED" and parent.data.params["n_trials"] == "2"
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    runs = {r.info.run_id: r for r in children(tmp_path, parent.info.run_id)}
    assert sorted(r.data.tags["lora_sweep.role"] for r in runs.values()) == ["search", "search"]
    for trial in trials:  # trial -> run -> record -> checkpoint, and back
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "complete"
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert run.data.params["method.r"] == str(trial.params["method.r"])
        record = json.loads(Path(trial.user_attrs["record"]).read_text())
        assert record["mlflow"]["run_id"] == run.info.run_id and record["metrics"]["objective"] == trial.value
        assert "test_accuracy" not in record["metrics"]  # the test split is kept for the chosen checkpoint
        assert Path(trial.user_attrs["checkpoint"], "adapter_model.safetensors").is_file()
    setups = [json.loads(Path(t.user_attrs["record"]).read_text())["params"]["setup_reused"] for t in trials]
    assert setups == [False, True]  # the model and tokenized data are loaded once per process
    summary = json.loads((tmp_path / "outputs" / "sweeps" / "inproc" / "sweep_summary.json").read_text())
    assert (
        summary and client(tmp_path).get_run(parent.info.run_id).data.tags["lora_sweep.status"] == "completed"
    )


def test_the_baseline_searches_with_tpe_seeded_like_the_main_study_unless_it_has_its_own_sampler():
    conf = sweeper_conf({"sampler": {"name": "random", "seed": 7}})
    assert phase_sampler(conf, "search") == SamplerConf(name="random", seed=7)
    assert phase_sampler(conf, "baseline") == SamplerConf(name="tpe", seed=7, n_startup_trials=3)
    own = sweeper_conf({"sampler": {"seed": 7}, "baseline": {"sampler": {"name": "gp", "seed": 1}}})
    assert phase_sampler(own, "baseline") == SamplerConf(name="gp", seed=1)


def test_a_failed_job_reports_its_exception_and_prints_nothing(capsys):
    failed = JobReturn(overrides=["sweep.storage=postgresql://u:secret@db/x"], status=JobStatus.FAILED)
    failed.return_value = ValueError("no such file")
    assert _job_error(failed) == "ValueError: no such file"
    done = JobReturn(status=JobStatus.COMPLETED)
    done.return_value = 0.5
    assert _job_error(done) == "float: 0.5"
    assert "secret" not in capsys.readouterr().err
