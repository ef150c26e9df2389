"""Replicates: is "LoRA matches full fine-tuning" more than one lucky seed?

The chosen LoRA configuration and the best full fine-tuning configuration are trained again with N new
seeds (the same seeds for both, so the runs pair up); each run is a normal lora_sweep run with its own
record and an MLflow child run under the sweep's parent. Reported: mean and 95% confidence interval
(Student t) of the validation and test metric, and the paired difference LoRA - full with its interval
and a paired t-test.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from lora_sweep.config import RunConfig


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


def _config(record: dict[str, Any], seed: int, output_dir: Path, parent_run_id: str | None) -> RunConfig:
    cfg = RunConfig.from_mapping(record["config"])
    sweep = dataclasses.replace(cfg.sweep, trial_id=None, trial_number=None, role="replicate", parent_run_id=parent_run_id)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed), output_dir=str(output_dir),
                               evaluate_test=True, sweep=sweep)


def run_replicates(lora_record: dict, full_record: dict, seeds: list[int], out_dir: Path, parent_run_id: str | None) -> dict[str, Any]:
    """Train both configurations once per seed (a finished replicate on disk is reused, not retrained)."""
    from lora_sweep.record import read_record
    from lora_sweep.run import run

    results: dict[str, dict[int, dict]] = {"lora": {}, "full": {}}
    for seed in seeds:
        for label, record in (("lora", lora_record), ("full", full_record)):
            folder = Path(out_dir) / f"{label}-seed{seed}"
            done = folder / "record.json"
            if done.is_file() and read_record(done)["status"] == "completed":
                results[label][seed] = read_record(done)
                continue
            tags = {"lora_sweep.role": "replicate", "lora_sweep.replicate_of": label, "lora_sweep.seed": str(seed)}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            replicate = run(_config(record, seed, folder, parent_run_id), extra_tags=tags, run_name_prefix=f"replicate {label} seed {seed} ")
            results[label][seed] = json.loads(json.dumps(replicate.__dict__, default=str))
    metric = lora_record["metrics"]["objective_metric"]
    summary: dict[str, Any] = {"seeds": list(seeds), "metric": metric}
    for split, key in (("validation", f"best_val_{metric}"), ("test", f"test_{metric}")):
        lora = [results["lora"][s]["metrics"][key] for s in seeds]
        full = [results["full"][s]["metrics"][key] for s in seeds]
        summary[split] = {"lora": {**interval(lora), "values": lora}, "full": {**interval(full), "values": full}, "paired": paired(lora, full)}
    return summary
