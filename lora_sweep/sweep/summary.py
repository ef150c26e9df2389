"""The table a sweep prints when it ends: every trial, the best marked, where its checkpoint and run are."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from lora_sweep.ranking import rank_key
from lora_sweep.secrets import redact
from lora_sweep.sweep.trials import trials_table


def best_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The best trial first (one objective), or the Pareto front sorted by the first objective."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    return sorted(study.best_trials, key=lambda t: rank_key(t.values[0], study.directions[0]))


def _cell(value, fmt: str = "{}") -> str:
    return "-" if value is None or value != value else fmt.format(value)  # value != value: NaN


def print_summary(phases, parent, metric: str) -> None:
    """Every trial (the report's own rows), the best marked ★, and where its checkpoint and run are."""
    from rich.console import Console
    from rich.table import Table

    main, baseline = phases[-1], (phases[0] if len(phases) > 1 else None)
    rows = trials_table(main.study, baseline.study if baseline else None)
    console = Console(width=160)
    table = Table(title=f"sweep {main.study.study_name}", show_lines=False)
    for column in (
        "trial",
        "method",
        "rank",
        "alpha",
        "targets",
        "variant",
        "lr",
        f"val {metric}",
        "trainable",
        "state",
    ):
        table.add_column(
            column, justify="right" if column in ("trial", "rank", "alpha", "lr", "trainable") else "left"
        )
    for phase in phases:
        marks = {
            t.number for t in best_trials(phase.study)[: 1 if len(phase.study.directions) == 1 else None]
        }
        for _, row in rows[rows["role"] == phase.role].iterrows():
            state = row["state"] + (
                f": {str(row['fail_reason'])[:40]}"
                if row["state"] == "failed" and isinstance(row["fail_reason"], str)
                else ""
            )
            table.add_row(
                ("★ " if row["trial"] in marks else "") + str(row["trial"]),
                row["method"],
                _cell(row["r"], "{:.0f}"),
                _cell(row["alpha"], "{:g}"),
                _cell(row["targets"]),
                _cell(row["variant"]),
                _cell(row["lr"], "{:.2e}"),
                _cell(row["val_metric"], "{:.4f}"),
                _cell(row["trainable_pct"], "{:.2f}%"),
                state,
            )
        table.add_section()
    console.print(table)
    from lora_sweep.sweep.lr_range import ATTR

    lr = main.study.user_attrs.get(ATTR)
    if lr:
        console.print(
            f"LoRA lr searched over [{lr['low']:.2e}, {lr['high']:.2e}] (log): baseline trial "
            f"{lr['baseline_trial']}'s lr {lr['baseline_lr']:.2e} x {lr['span'][0]:g}..{lr['span'][1]:g}"
        )
    best = best_trials(main.study)
    if best:
        top = best[0]
        label = (
            "best trial"
            if len(best) == 1 or len(main.study.directions) == 1
            else f"Pareto front: trials {[t.number for t in best]}; first"
        )
        console.print(f"{label} {top.number}: val {metric} {top.values[0]:.4f}")
        console.print(f"  checkpoint: {top.user_attrs.get('checkpoint')}")
        if top.user_attrs.get("mlflow_run_id"):
            console.print(
                f"  mlflow run: {top.user_attrs['mlflow_run_id']} (parent {parent.run_id}) in "
                f"{redact(str(parent.location))}"
            )
    else:
        console.print("no trial completed yet")
