"""hydra.sweeper.lr_from_baseline: the LoRA search's learning-rate range comes from the best full fine-tuning
trial, is recorded once in the search study, and a resumed sweep (or another worker) reuses it as recorded."""

from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from lora_sweep.sweep import lr_range
from lora_sweep.sweep.settings import LrFromBaselineConf
from lora_sweep.sweep.space import SearchSpace

from .helpers import load, optuna_snapshot, parents, records, write_sweep

BASELINE_LR = "tag(log, interval(1e-5, 1e-3))"
SWEEP = {
    "n_trials": 1,
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "params": {"method.r": "choice(2, 4)"},
    "lr_from_baseline": {"ratio": 10, "span": [3, 30]},
    "enqueue": [{"method.r": 2}],  # no train.lr: it starts at best baseline lr * ratio
    "baseline": {
        "n_trials": 2,
        "overrides": ["method=full"],
        "params": {"train.lr": BASELINE_LR},
        "enqueue": [{"train.lr": 1e-4}, {"train.lr": 6e-4}],
    },
}
FAST = ("train.max_steps=2", "train.eval_every=2", "train.epochs=1")


def best_baseline(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The best completed trial of a maximizing study, ties to the earlier: the rule the range must follow."""
    done = study.get_trials(states=(TrialState.COMPLETE,))
    return sorted(done, key=lambda t: (-t.value, t.number))[0]


def trained_lr(trial: optuna.trial.FrozenTrial) -> float:
    return json.loads(Path(trial.user_attrs["record"]).read_text())["config"]["train"]["lr"]


def test_the_range_is_derived_from_the_best_baseline_trial_recorded_and_reused_on_resume(
    tmp_path, sweep_in_process, capsys
):
    write_sweep(tmp_path, "lrb", SWEEP)
    sweep_in_process("lrb", *FAST)
    assert "LoRA lr searched over [" in capsys.readouterr().out

    baseline, search = load(tmp_path, "lrb-baseline", "lrb"), load(tmp_path, "lrb")
    best = best_baseline(baseline)
    lr = best.params["train.lr"]
    recorded = search.user_attrs[lr_range.ATTR]
    assert recorded["baseline_trial"] == best.number and recorded["baseline_lr"] == lr
    assert recorded["baseline_value"] == best.value and recorded["baseline_study"] == "lrb-baseline"
    assert (recorded["low"], recorded["centre"], recorded["high"]) == (lr * 3, lr * 10, lr * 30)
    trials = search.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE]
    assert trials[0].params == {"method.r": 2, "train.lr": lr * 10}  # the enqueued trial, at the centre
    assert trained_lr(trials[0]) == lr * 10
    summary = json.loads((tmp_path / "outputs" / "sweeps" / "lrb" / "sweep_summary.json").read_text())
    assert summary["lr_range"] == recorded
    (parent,) = parents(tmp_path, "lrb")
    assert float(parent.data.tags["lora_sweep.lr_range.low"]) == recorded["low"]
    assert float(parent.data.tags["lora_sweep.lr_range.high"]) == recorded["high"]

    # the baseline study changes afterwards: a better trial at another lr (Optuna's public API)
    tampered = create_trial(
        params={"train.lr": 1e-5},
        distributions={"train.lr": FloatDistribution(1e-5, 1e-3, log=True)},
        value=best.value + 1.0,
    )
    baseline.add_trial(tampered)
    again = lr_range.derive(baseline, LrFromBaselineConf(), lambda: 0.0)
    assert again["baseline_lr"] == 1e-5 and again["low"] != recorded["low"]  # derived again, it would move

    sweep_in_process("lrb", *FAST, "hydra.sweeper.n_trials=2")
    search = load(tmp_path, "lrb")
    assert search.user_attrs[lr_range.ATTR] == recorded  # reused, not derived again
    trials = search.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert len(load(tmp_path, "lrb-baseline", "lrb").get_trials()) == 3  # no baseline trial ran again
    for trial in trials:
        lr_of_trial = trial.params["train.lr"]
        assert recorded["low"] <= lr_of_trial <= recorded["high"]
        assert math.isclose(trained_lr(trial), lr_of_trial, rel_tol=1e-12)
        assert trial.distributions["train.lr"] == FloatDistribution(
            recorded["low"], recorded["high"], log=True
        )


def test_a_worker_waits_for_running_baseline_trials_then_uses_the_range_one_worker_recorded(
    caplog, monkeypatch
):
    """Two workers of one study: the first to reach the search waits for the baseline trial another worker
    still trains (and logs once what it waits for), derives the range from it, records it; the second reads
    that record back, even once a better baseline trial has come in."""
    storage = optuna.storages.InMemoryStorage()
    baseline = optuna.create_study(study_name="s-baseline", storage=storage, direction="maximize")
    search = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    dist = FloatDistribution(1e-5, 1e-3, log=True)
    baseline.add_trial(create_trial(params={"train.lr": 1e-4}, distributions={"train.lr": dist}, value=0.7))
    other = baseline.ask({"train.lr": dist})  # another worker's trial, still training
    assert other.params["train.lr"] != 1e-4

    def finish_it():
        baseline.tell(other, 0.9)  # it ends better than the finished trial

    lock = threading.Lock()
    calls = []
    conf = LrFromBaselineConf(ratio=8, span=[2, 20])
    entries = [{"method.r": 4}]

    def apply(space):
        return lr_range.apply(
            search,
            space,
            baseline,
            conf,
            lock=lambda: lock,
            config_lr=lambda: pytest.fail("the baseline searched train.lr: the config's lr is not used"),
            run_baseline=lambda: calls.append(1),
            enqueue=entries,
        )

    timer = threading.Timer(0.3, finish_it)
    monkeypatch.setattr(lr_range, "POLL_SECONDS", 0.05)
    caplog.set_level(logging.INFO, logger="lora_sweep.sweep.lr_range")
    timer.start()
    try:
        space = SearchSpace({"method.r": "choice(2, 4)"})
        recorded = apply(space)
    finally:
        timer.cancel()
    lr = other.params["train.lr"]
    assert (recorded["baseline_trial"], recorded["baseline_lr"]) == (other.number, lr)
    assert (recorded["low"], recorded["centre"], recorded["high"]) == (lr * 2, lr * 8, lr * 20)
    assert search.user_attrs[lr_range.ATTR] == recorded
    waits = [r.getMessage() for r in caplog.records if "waiting for baseline trials" in r.getMessage()]
    assert len(waits) == 1 and f"[{other.number}]" in waits[0] and len(calls) > 1
    assert space.names == ["method.r", "train.lr"]
    assert space.params[-1].distribution == FloatDistribution(lr * 2, lr * 20, log=True)
    (queued,) = search.get_trials(states=(TrialState.WAITING,))
    assert queued.user_attrs["enqueue_index"] == 0

    baseline.add_trial(create_trial(params={"train.lr": 1e-3}, distributions={"train.lr": dist}, value=1.0))
    second = SearchSpace({"method.r": "choice(2, 4)"})
    assert apply(second) == recorded  # the second worker: the record, not a new derivation
    assert second.params[-1].distribution == space.params[-1].distribution
    assert len(search.get_trials(states=(TrialState.WAITING,))) == 1  # queued once, not once per worker


def test_a_baseline_that_searched_no_lr_gives_its_config_lr():
    study = optuna.create_study(direction="minimize")
    for value in (0.5, 0.3, 0.3):
        study.add_trial(create_trial(params={}, distributions={}, value=value))
    recorded = lr_range.derive(study, LrFromBaselineConf(), lambda: 2e-4)
    assert (recorded["baseline_trial"], recorded["baseline_lr"]) == (1, 2e-4)  # minimize; ties: earlier
    assert recorded["centre"] == 2e-4 * 10


def test_no_completed_baseline_trial_stops_the_sweep_with_one_line_and_changes_nothing(
    tmp_path, sweep_in_process, capsys
):
    """Every baseline trial pruned: the search cannot start; one line, exit 2, the study as it was."""
    write_sweep(
        tmp_path, "nobase", {**SWEEP, "baseline": {**SWEEP["baseline"], "n_trials": 1, "enqueue": []}}
    )
    from optuna.storages.journal import JournalFileBackend

    journal = tmp_path / "outputs" / "sweeps" / "nobase" / "optuna.journal"
    journal.parent.mkdir(parents=True)
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    baseline = optuna.create_study(study_name="nobase-baseline", storage=storage, direction="maximize")
    dist = FloatDistribution(1e-5, 1e-3, log=True)
    baseline.add_trial(
        create_trial(
            state=TrialState.PRUNED,
            params={"train.lr": 1e-4},
            distributions={"train.lr": dist},
            intermediate_values={2: 0.5},
        )
    )
    before = optuna_snapshot(tmp_path, "nobase-baseline", "nobase"), records(tmp_path)
    with pytest.raises(SystemExit) as exited:
        sweep_in_process("nobase", *FAST)
    assert exited.value.code == 2
    err = capsys.readouterr().err  # MLflow's own INFO lines (its store was created) go there too
    lines = [line for line in err.splitlines() if line.startswith(("error:", "Traceback"))]
    assert lines == [
        "error: hydra.sweeper.lr_from_baseline={'ratio': 10.0, 'span': [3.0, 30.0]}: no full fine-tuning "
        "trial of study 'nobase-baseline' completed (1 pruned, 0 failed): no learning rate to derive the "
        "LoRA range from; the LoRA search did not start"
    ]
    assert (optuna_snapshot(tmp_path, "nobase-baseline", "nobase"), records(tmp_path)) == before
    search = load(tmp_path, "nobase")
    assert search.get_trials() == [] and lr_range.ATTR not in search.user_attrs
    (parent,) = parents(tmp_path, "nobase")
    assert not any(key.startswith("lora_sweep.lr_range") for key in parent.data.tags)


ERRORS = {
    "no baseline": (
        {"baseline": {"n_trials": 0}},
        "error: hydra.sweeper.lr_from_baseline={'ratio': 10.0, 'span': [3.0, 30.0]}: derives the LoRA "
        "learning rate from the full fine-tuning baseline, which this sweep does not run",
    ),
    "lr in params": (
        {"params": {"method.r": "choice(2, 4)", "train.lr": "tag(log, interval(1e-4, 1e-2))"}},
        "error: hydra.sweeper.params.train.lr='tag(log, interval(1e-4, 1e-2))': "
        "hydra.sweeper.lr_from_baseline derives the LoRA learning rate from the baseline",
    ),
    "ratio": (
        {"lr_from_baseline": {"ratio": 0, "span": [3, 30]}},
        "error: hydra.sweeper.lr_from_baseline.ratio=0.0: must be a finite number > 0",
    ),
    "one number": (
        {"lr_from_baseline": {"span": [3]}},
        "error: hydra.sweeper.lr_from_baseline.span=[3.0]: must be two numbers [low, high]",
    ),
    "ratio outside the span": (
        {"lr_from_baseline": {"ratio": 10, "span": [20, 30]}},
        "error: hydra.sweeper.lr_from_baseline.span=[20.0, 30.0]: must hold 0 < low <= ratio (10) <= high",
    ),
    "low <= 0": (
        {"lr_from_baseline": {"ratio": 10, "span": [0, 30]}},
        "error: hydra.sweeper.lr_from_baseline.span=[0.0, 30.0]: must hold 0 < low <= ratio (10) <= high",
    ),
    "enqueued lr": (
        {"enqueue": [{"method.r": 2}, {"method.r": 4, "train.lr": 1e-3}]},
        "error: hydra.sweeper.enqueue[1].train.lr=0.001: the learning rate comes from the baseline",
    ),
    "grid": (
        {"sampler": {"name": "grid"}},
        "error: hydra.sweeper.sampler.name='grid': the grid cannot search the continuous learning-rate range",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_lr_from_baseline_settings_are_one_line_before_anything_is_created(
    tmp_path, sweep_in_process, capsys, case
):
    changed, expected = ERRORS[case]
    write_sweep(tmp_path, "badlr", {**SWEEP, **changed})
    with pytest.raises(SystemExit) as exited:
        sweep_in_process("badlr", *FAST)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exited.value.code == 2 and len(lines) == 1 and lines[0].startswith(expected), lines
    assert not (tmp_path / "outputs" / "sweeps" / "badlr" / "optuna.journal").exists()
    assert not (tmp_path / "mlflow.db").exists()
