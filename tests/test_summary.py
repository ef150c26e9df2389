"""sweep/summary: the best trials of a study and the table a sweep prints when it ends, on in-memory
Optuna studies (trials without records show what Optuna sampled)."""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from lora_sweep.sweep.summary import best_trials, print_summary

DISTRIBUTIONS = {
    "method.r": CategoricalDistribution([2, 4, 8]),
    "train.lr": FloatDistribution(1e-4, 1e-2, log=True),
}


@dataclass
class _Phase:
    role: str
    study: optuna.Study


@dataclass
class _Parent:
    run_id: str | None
    location: str | None


def _study(name: str, trials: list[tuple], directions=("maximize",)) -> optuna.Study:
    study = optuna.create_study(study_name=name, directions=list(directions))
    for state, value, params, attrs in trials:
        values = value if isinstance(value, list) or value is None else [value]
        study.add_trial(
            create_trial(
                state=state,
                values=values,
                params=params,
                distributions={k: DISTRIBUTIONS[k] for k in params},
                user_attrs=attrs,
                # a trial with no record shows the last value it reported
                intermediate_values={7: values[0]} if values else {},
            )
        )
    return study


def _search():
    return _study(
        "quick",
        [
            (
                TrialState.COMPLETE,
                0.81,
                {"method.r": 2, "train.lr": 2e-3},
                {"checkpoint": "/ck/0", "mlflow_run_id": "r0"},
            ),
            (
                TrialState.COMPLETE,
                0.93,
                {"method.r": 8, "train.lr": 5e-3},
                {"checkpoint": "/ck/1", "mlflow_run_id": "r1"},
            ),
            (
                TrialState.FAIL,
                None,
                {"method.r": 4, "train.lr": 1e-2},
                {"fail_reason": "TrainingDiverged: loss is nan"},
            ),
            (TrialState.PRUNED, None, {"method.r": 4, "train.lr": 1e-4}, {}),
        ],
    )


def test_best_trial_of_one_objective():
    assert [t.number for t in best_trials(_search())] == [1]
    minimized = _study(
        "loss",
        [
            (TrialState.COMPLETE, 0.5, {"method.r": 2, "train.lr": 1e-3}, {}),
            (TrialState.COMPLETE, 0.3, {"method.r": 4, "train.lr": 1e-3}, {}),
        ],
        directions=("minimize",),
    )
    assert [t.number for t in best_trials(minimized)] == [1]
    assert best_trials(_study("none", [(TrialState.FAIL, None, {"method.r": 2, "train.lr": 1e-3}, {})])) == []


def test_pareto_front_sorted_by_the_first_objective():
    study = _study(
        "pareto",
        [
            (TrialState.COMPLETE, [0.80, 1_000], {"method.r": 2, "train.lr": 1e-3}, {}),
            (TrialState.COMPLETE, [0.90, 9_000], {"method.r": 8, "train.lr": 1e-3}, {}),
            (
                TrialState.COMPLETE,
                [0.85, 9_500],
                {"method.r": 8, "train.lr": 2e-3},
                {},
            ),  # dominated by trial 1
            (TrialState.COMPLETE, [0.88, 4_000], {"method.r": 4, "train.lr": 1e-3}, {}),
        ],
        directions=("maximize", "minimize"),
    )
    assert [t.number for t in best_trials(study)] == [1, 3, 0]


def test_printed_table_marks_the_best_and_says_where_it_is(capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "Pa55word-for-mlflow")
    baseline = _study(
        "quick-baseline",
        [
            (TrialState.COMPLETE, 0.95, {"train.lr": 1e-4}, {}),
            (TrialState.COMPLETE, 0.91, {"train.lr": 2e-4}, {}),
        ],
    )
    parent = _Parent("parent123", "http://me:Pa55word-for-mlflow@mlflow:5000")
    print_summary([_Phase("baseline", baseline), _Phase("search", _search())], parent, "accuracy")
    out = capsys.readouterr().out
    assert "sweep quick" in out and "val accuracy" in out
    lines = out.splitlines()
    marked = [line for line in lines if "★" in line]
    assert len(marked) == 2  # the best of each phase
    assert "★ 1" in marked[1] and "0.9300" in marked[1] and "lora" in marked[1]
    assert "★ 0" in marked[0] and "0.9500" in marked[0] and "full" in marked[0]
    assert any("failed: TrainingDiverged: loss is nan" in line for line in lines)
    assert any("pruned" in line for line in lines)
    assert "best trial 1: val accuracy 0.9300" in out and "checkpoint: /ck/1" in out
    assert "mlflow run: r1 (parent parent123) in http://me:***@mlflow:5000" in out
    assert "Pa55word-for-mlflow" not in out


def test_nothing_completed_yet(capsys):
    study = _study("early", [(TrialState.RUNNING, None, {"method.r": 2, "train.lr": 1e-3}, {})])
    print_summary([_Phase("search", study)], _Parent(None, None), "accuracy")
    out = capsys.readouterr().out
    assert "no trial completed yet" in out and "★" not in out
