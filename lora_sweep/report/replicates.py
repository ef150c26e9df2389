"""Replicates: is "LoRA matches full fine-tuning" more than one lucky seed?

The sweep, not the report, trains them: after the search and the baseline, the sweeper runs the chosen LoRA
configuration and the best full fine-tuning configuration again with seeds 1..N (the same seeds for both, so
the runs pair up) as the trials of a third study, ``<study>-replicates``
(``hydra.sweeper.report.replicates``).
Each is a normal trial with its own Hydra job folder, record and MLflow child run under the sweep's parent.
Here they are only read. Reported: mean and 95% confidence interval
(Student t) of the validation and test metric, and the paired difference LoRA - full with its interval
and a paired t-test.
"""

from __future__ import annotations

import math
from typing import Any


def interval(values: list[float]) -> dict[str, float]:
    """Mean and the half-width of its 95% Student-t confidence interval."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci95": float("nan"), "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "ci95": float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)), "n": n}


def paired(lora: list[float], full: list[float]) -> dict[str, float]:
    from scipy import stats

    differences = [a - b for a, b in zip(lora, full)]
    result = {"difference": interval(differences)}
    if len(differences) >= 2 and any(d != differences[0] for d in differences):
        result["p_value"] = float(stats.ttest_rel(lora, full).pvalue)
    return result


def replicate_records(study) -> dict[tuple[str, int], dict[int, dict]]:
    """The completed replicate runs of the sweep's ``<study>-replicates`` study, read from their records:
    (``lora`` | ``full``, source trial number) -> seed -> record."""
    from optuna.trial import TrialState

    from lora_sweep.sweep.trials import record_of

    found: dict[tuple[str, int], dict[int, dict]] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs, record = trial.user_attrs, record_of(trial)
        if record is None or record.get("status") != "completed" or "replicate_of" not in attrs:
            continue
        found.setdefault((attrs["replicate_of"], int(attrs["source_trial"])), {})[int(attrs["seed"])] = record
    return found


def summarize_replicates(
    study, lora_trial: int, full_trial: int, limit: int | None = None
) -> dict[str, Any] | str:
    """Mean, 95% CI and the paired test over the seeds both configurations were replicated with (the
    first ``limit`` of them); a sentence saying why not when there is nothing to pair."""
    if study is None:
        return "no replicates: run the sweep with hydra.sweeper.report.replicates=N"
    found = replicate_records(study)
    lora, full = found.get(("lora", lora_trial), {}), found.get(("full", full_trial), {})
    seeds = sorted(set(lora) & set(full))[:limit]
    if not seeds:
        made = sorted({f"{label} #{trial}" for label, trial in found}) or ["none completed"]
        return (
            f"no replicates of LoRA trial #{lora_trial} and full fine-tuning trial #{full_trial} "
            f"(the sweep's replicates: {', '.join(made)}): "
            "run the sweep with hydra.sweeper.report.replicates=N"
        )
    metric = lora[seeds[0]]["metrics"]["objective_metric"]
    summary: dict[str, Any] = {
        "seeds": seeds,
        "metric": metric,
        "trials": {"lora": lora_trial, "full": full_trial},
        "runs": {
            label: {s: records[s].get("mlflow", {}).get("run_id") for s in seeds}
            for label, records in (("lora", lora), ("full", full))
        },
    }
    for split, key in (("validation", f"best_val_{metric}"), ("test", f"test_{metric}")):
        a = [lora[s]["metrics"][key] for s in seeds]
        b = [full[s]["metrics"][key] for s in seeds]
        summary[split] = {
            "lora": {**interval(a), "values": a},
            "full": {**interval(b), "values": b},
            "paired": paired(a, b),
        }
    return summary
