"""The table a sweep prints when it ends: every trial, the best marked, where its checkpoint and run are."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

STATE_NAMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
               TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


def best_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The best trial first (one objective), or the Pareto front sorted by the first objective."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return sorted(study.best_trials, key=lambda t: t.values[0], reverse=maximize)


def _row(trial: optuna.trial.FrozenTrial, role: str, metric: str, marks: set[int]) -> list[str]:
    p = trial.params
    alpha = p.get("method.alpha")
    if alpha is None and isinstance(p.get("method.alpha_ratio"), (int, float)) and "method.r" in p:
        alpha = p["method.alpha_ratio"] * p["method.r"]
    value = trial.user_attrs.get("objective")
    if value is None and trial.intermediate_values:
        value = list(trial.intermediate_values.values())[-1]
    ratio = trial.user_attrs.get("trainable_ratio")
    state = STATE_NAMES.get(trial.state, trial.state.name.lower())
    if trial.state == TrialState.FAIL and trial.user_attrs.get("fail_reason"):
        state += f": {trial.user_attrs['fail_reason'][:40]}"
    return [
        ("★ " if trial.number in marks else "") + f"{trial.number}",
        "full" if role == "baseline" else "lora",
        str(p.get("method.r", "-")),
        f"{alpha:g}" if isinstance(alpha, (int, float)) else "-",
        str(p.get("method.targets", "-")),
        str(p.get("method.variant", "")) or "-",
        f"{p['train.lr']:.2e}" if "train.lr" in p else "-",
        f"{value:.4f}" if isinstance(value, (int, float)) else "-",
        f"{100 * ratio:.2f}%" if isinstance(ratio, (int, float)) else "-",
        state,
    ]


def print_summary(phases, parent, metric: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    table = Table(title=f"sweep {phases[-1].study.study_name}", show_lines=False)
    for column in ("trial", "method", "rank", "alpha", "targets", "variant", "lr", f"val {metric}", "trainable", "state"):
        table.add_column(column, justify="right" if column in ("trial", "rank", "alpha", "lr", "trainable") else "left")
    for phase in phases:
        marks = {t.number for t in best_trials(phase.study)[: 1 if len(phase.study.directions) == 1 else None]}
        retried = {t.user_attrs["retry_of"] for t in phase.study.get_trials(deepcopy=False) if "retry_of" in t.user_attrs}
        for trial in phase.study.get_trials(deepcopy=False):
            if trial.number in retried and trial.state == TrialState.FAIL:
                continue  # its parameters ran again as a later trial
            table.add_row(*_row(trial, phase.role, metric, marks), end_section=False)
        table.add_section()
    console.print(table)
    best = best_trials(phases[-1].study)
    if best:
        top = best[0]
        label = "best trial" if len(best) == 1 or len(phases[-1].study.directions) == 1 else f"Pareto front: trials {[t.number for t in best]}; first"
        console.print(f"{label} {top.number}: val {metric} {top.values[0]:.4f}")
        console.print(f"  checkpoint: {top.user_attrs.get('checkpoint')}")
        if top.user_attrs.get("mlflow_run_id"):
            console.print(f"  mlflow run: {top.user_attrs['mlflow_run_id']} (parent {parent.run_id}) in {parent.location}")
    else:
        console.print("no trial completed yet")
