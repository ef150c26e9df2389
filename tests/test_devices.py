"""sweep/devices: how many trials a sweep runs at once and where (``hydra.sweeper.trials_per_device``).

The assignment is a pure function, tested here for every shape of machine; one slow sweep on the CPU proves
that two trials really run at once with the right results, and that bad settings change nothing; a GPU
test checks the round-robin on the GPUs there are (skipped without CUDA)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState

from lora_sweep.errors import ConfigError
from lora_sweep.sweep.devices import plan_workers
from lora_sweep.sweep.settings import sweeper_conf

from .helpers import client, load, mlflow_snapshot, optuna_snapshot, records, run_sweep, write_sweep


def test_trials_per_device_gives_k_workers_per_gpu_round_robin():
    devices, pool = plan_workers("auto", 3, 2, -1, 16)
    assert devices == ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1", "cuda:2"]
    assert pool == 6  # joblib's default n_jobs (one per core): the sweeper sizes the pool instead
    assert plan_workers("cuda", 2, 3, 8, 16) == (["cuda:0", "cuda:1"] * 3, None)  # 8 >= 6 processes: kept
    for gpus in range(1, 9):
        for k in range(1, 5):
            devices, _ = plan_workers("auto", gpus, k, -1 if k > 1 else gpus, 4)
            assert len(devices) == gpus * k
            if gpus > 1:  # every GPU gets exactly k workers, and worker i sits on GPU i mod gpus
                assert Counter(devices) == {f"cuda:{g}": k for g in range(gpus)}
                assert all(d == f"cuda:{i % gpus}" for i, d in enumerate(devices))


def test_one_device_runs_k_trials_without_a_device_override():
    # the CPU, a machine without CUDA, one GPU (auto names it) and one named GPU: k trials, no override
    for device, gpus in (("cpu", 4), ("auto", 0), ("auto", 1), ("cuda", 1), ("cuda:1", 4), ("mps", 0)):
        assert plan_workers(device, gpus, 3, -1, 2) == ([None] * 3, 3), device
    assert plan_workers("cpu", 0, 2, 2, 2) == ([None, None], None)


def test_one_trial_per_device_keeps_what_n_jobs_meant():
    assert plan_workers("auto", 0, 1, None, 8) == ([None], None)  # Hydra's basic launcher: one at a time
    assert plan_workers("auto", 4, 1, None, 8) == (["cuda:0"], None)  # as before: worker 0 on GPU 0
    assert plan_workers("cpu", 0, 1, -1, 3) == ([None] * 3, None)  # joblib's -1: one per core
    assert plan_workers("cpu", 0, 1, 0, 3) == ([None], None)
    assert plan_workers("auto", 2, 1, 4, 16) == (["cuda:0", "cuda:1", "cuda:0", "cuda:1"], None)
    assert plan_workers("auto", 1, 1, 2, 16) == ([None, None], None)


def test_settings_that_cannot_run_k_trials_at_once_are_one_line():
    with pytest.raises(ConfigError) as caught:
        plan_workers("cpu", 0, 2, None, 8)
    assert str(caught.value) == (
        "hydra.sweeper.trials_per_device=2: runs trials at once in separate processes: add "
        "hydra/launcher=joblib (Hydra's basic launcher runs them in the sweeper's own process, which holds "
        "one model at a time)"
    )
    with pytest.raises(ConfigError) as caught:
        plan_workers("auto", 2, 2, 3, 8)
    assert str(caught.value) == (
        "hydra.launcher.n_jobs=3: fewer processes than the 4 trials hydra.sweeper.trials_per_device=2 runs "
        "at once on 2 GPUs; leave n_jobs out (the sweeper sizes the pool) or set it to at least 4"
    )
    with pytest.raises(ConfigError, match=r"^hydra.launcher.n_jobs=1: .* the 2 trials .* on 1 device;"):
        plan_workers("cpu", 0, 2, 1, 8)
    for value, problem in ((0, "must be a positive integer"), (-2, "must be a positive integer")):
        with pytest.raises(ConfigError) as caught:
            sweeper_conf({"trials_per_device": value})
        assert str(caught.value) == f"hydra.sweeper.trials_per_device={value}: {problem}"
    with pytest.raises(ConfigError, match=r"^hydra.sweeper.trials_per_device=1.5: expected an integer$"):
        sweeper_conf({"trials_per_device": 1.5})
    assert sweeper_conf({}).trials_per_device == 1


SWEEP = {
    "n_trials": 2,
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "params": {"method.r": "choice(2, 4)", "train.lr": "tag(log, interval(1e-3, 1e-2))"},
}


def trial_records(root: Path, study: str) -> list[tuple[object, dict]]:
    trials = load(root, study).get_trials()
    return [(t, json.loads(Path(t.user_attrs["record"]).read_text())) for t in trials]


def overlap(a: dict, b: dict) -> bool:
    return a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]


@pytest.mark.slow
def test_two_trials_per_device_on_cpu_run_at_once_and_bad_settings_change_nothing(
    tmp_path, tiny, sweep_in_process, capsys
):
    write_sweep(tmp_path, "pertwo", SWEEP)
    result = run_sweep(
        tmp_path,
        "pertwo",
        tiny,
        "train.epochs=1",
        "train.device=cpu",
        "hydra/launcher=joblib",
        "hydra.sweeper.trials_per_device=2",
    )
    assert "2 trials at once (hydra.sweeper.trials_per_device=2): cpu, cpu" in result.stdout + result.stderr
    assert "Joblib.Parallel(n_jobs=2," in result.stdout + result.stderr  # the pool the sweeper sized
    done = trial_records(tmp_path, "pertwo")
    assert [t.state for t, _ in done] == [TrialState.COMPLETE] * 2
    (first, a), (second, b) = done
    assert overlap(a, b), (a["started_at"], a["finished_at"], b["started_at"], b["finished_at"])
    assert first.user_attrs["worker"]["pid"] != second.user_attrs["worker"]["pid"]  # two processes
    runs = {r.info.run_id: r for r in client(tmp_path).search_runs(["1"])}
    for trial, record in done:  # each trial's own config, result and run: nothing crossed between them
        assert record["status"] == "completed" and record["config"]["train"]["device"] == "cpu"
        assert record["config"]["method"]["r"] == trial.params["method.r"]
        assert record["config"]["train"]["lr"] == pytest.approx(trial.params["train.lr"])
        assert trial.value == pytest.approx(record["metrics"]["objective"])
        run = runs[record["mlflow"]["run_id"]]
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert run.data.params["method.r"] == str(trial.params["method.r"])
    assert a["output_dir"] != b["output_dir"]

    before = optuna_snapshot(tmp_path, "pertwo"), mlflow_snapshot(tmp_path), records(tmp_path)
    cases = {
        "zero": (
            ["hydra/launcher=joblib", "hydra.sweeper.trials_per_device=0"],
            "error: hydra.sweeper.trials_per_device=0: must be a positive integer",
        ),
        "basic launcher": (
            ["hydra.sweeper.trials_per_device=2"],
            "error: hydra.sweeper.trials_per_device=2: runs trials at once in separate processes: add "
            "hydra/launcher=joblib",
        ),
        "small pool": (
            ["hydra/launcher=joblib", "hydra.launcher.n_jobs=1", "hydra.sweeper.trials_per_device=2"],
            "error: hydra.launcher.n_jobs=1: fewer processes than the 2 trials",
        ),
    }
    for name, (overrides, expected) in cases.items():  # in this process: no second start-up to pay
        with pytest.raises(SystemExit) as caught:
            sweep_in_process(
                "pertwo", "train.epochs=1", "train.device=cpu", "hydra.sweeper.n_trials=4", *overrides
            )
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert caught.value.code == 2 and len(lines) == 1 and lines[0].startswith(expected), (name, lines)
    assert (optuna_snapshot(tmp_path, "pertwo"), mlflow_snapshot(tmp_path), records(tmp_path)) == before


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trials_per_device_puts_k_trials_on_each_gpu_round_robin(tmp_path, tiny):
    gpus, k = torch.cuda.device_count(), 2
    write_sweep(tmp_path, "pergpu", {**SWEEP, "n_trials": gpus * k})
    run_sweep(
        tmp_path,
        "pergpu",
        tiny,
        "train.epochs=1",
        "hydra/launcher=joblib",
        f"hydra.sweeper.trials_per_device={k}",
    )
    done = trial_records(tmp_path, "pergpu")
    assert [t.state for t, _ in done] == [TrialState.COMPLETE] * (gpus * k)
    runs = {r.info.run_id: r for r in client(tmp_path).search_runs(["1"])}
    # every worker asks for its first trial before any trial ends: one trial per worker
    used = [runs[record["mlflow"]["run_id"]].data.params["run.device"] for _, record in done]
    expected = {f"cuda:{g}": k for g in range(gpus)} if gpus > 1 else {"cuda": k}
    assert Counter(used) == expected
    for device in expected:  # the k trials of each GPU ran at the same time
        on_it = [record for (_, record), d in zip(done, used) if d == device]
        assert all(overlap(a, b) for i, a in enumerate(on_it) for b in on_it[i + 1 :])
