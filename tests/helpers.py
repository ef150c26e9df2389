"""Helpers shared by several test modules (test modules never import each other): tiny learnable data,
and writing, running and reading back a sweep through the real command line."""

from __future__ import annotations

import csv
import random
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: conftest imports this module, and every test run pays for it
    import optuna
    from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent

# --- tiny learnable data ---------------------------------------------------------------------------------

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun", "moving", "smart", "warm", "best"]
NEGATIVE = ["bad", "awful", "dull", "boring", "weak", "poor", "messy", "flat", "cold", "worst"]
NEUTRAL = ["the", "a", "movie", "film", "plot", "cast", "was", "is", "very", "quite", "and", "story"]
WORDS = POSITIVE + NEGATIVE + NEUTRAL
CHAT_WORDS = ["user", "assistant", "system", "question", "answer", "say", "what", "is"]


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Sentences whose label is decided by their sentiment words: learnable by a tiny model."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        cue = POSITIVE if label == "positive" else NEGATIVE
        words = rng.sample(NEUTRAL, 4) + rng.sample(cue, 2)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def varied_sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Like :func:`sentiment_rows`, with 0 to 10 neutral words: sentences of different lengths."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        cue = POSITIVE if label == "positive" else NEGATIVE
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(0, 10))] + rng.sample(cue, 2)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def qa_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Questions whose answer is the sentiment words they contain: learnable by a tiny model."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        cue = rng.sample(POSITIVE if rng.random() < 0.5 else NEGATIVE, 2)
        words = rng.sample(NEUTRAL, 3) + cue
        rng.shuffle(words)
        rows.append({"prompt": "what is " + " ".join(words) + " ?", "response": " ".join(sorted(cue)) + " ."})
    return rows


def varied_qa_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Like :func:`qa_rows`, with 0 to 6 neutral words: rows of different lengths (what padding wastes)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        cue = rng.sample(POSITIVE if rng.random() < 0.5 else NEGATIVE, 2)
        words = rng.sample(NEUTRAL, rng.randint(0, 6)) + cue
        rng.shuffle(words)
        rows.append({"prompt": "what is " + " ".join(words) + " ?", "response": " ".join(sorted(cue)) + " ."})
    return rows


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --- sweeps through the real command line ------------------------------------------------------------------


def write_sweep(root: Path, name: str, sweeper: dict) -> Path:
    """A sweep file as a user writes one: select our sweeper, fix the sweep folder, describe the search."""
    import yaml

    folder = root / "extra_conf" / "sweeps"
    folder.mkdir(parents=True, exist_ok=True)
    body = {
        "defaults": [{"override /hydra/sweeper": "lora_optuna"}],
        # the report (and its replicate trainings) has its own tests: off unless a test asks for it
        "hydra": {
            "sweep": {"dir": "outputs/sweeps/${hydra.sweeper.study_name}"},
            "sweeper": {"study_name": name, "report": {"enabled": False}, **sweeper},
        },
    }
    path = folder / f"{name}.yaml"
    path.write_text("# @package _global_\n" + yaml.safe_dump(body, sort_keys=False))
    return path


def sweep_command(root: Path, name: str, tiny: list[str], *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lora_sweep",
        "--multirun",
        f"sweeps={name}",
        f"hydra.searchpath=[file://{root / 'extra_conf'}]",
        f"data.cache_dir={root / 'cache'}",
        *tiny,
        *extra,
    ]


def run_sweep(
    root: Path, name: str, tiny: list[str], *extra: str, check: bool = True
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        sweep_command(root, name, tiny, *extra),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def load(root: Path, study: str, folder: str | None = None) -> optuna.Study:
    """A study from the journal in its sweep folder (the baseline's study shares its sweep's journal)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    journal = root / "outputs" / "sweeps" / (folder or study) / "optuna.journal"
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    return optuna.load_study(study_name=study, storage=storage)


def client(root: Path) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def parents(root: Path, study: str):
    return client(root).search_runs(["1"], filter_string=f"tags.`lora_sweep.sweep` = '{study}'")


def children(root: Path, parent_id: str):
    return client(root).search_runs(["1"], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


# --- snapshots of everything a bad input (or a kill) must not touch -----------------------------------


def optuna_snapshot(root: Path, study: str, folder: str | None = None) -> dict:
    """Every trial of ``study`` (in its sweep folder's journal, ``folder`` as :func:`load` takes it): state,
    values, params, attributes, times."""
    return {
        t.number: (
            t.state,
            t.values,
            t.params,
            t.distributions,
            t.intermediate_values,
            t.user_attrs,
            t.datetime_start,
            t.datetime_complete,
        )
        for t in load(root, study, folder).get_trials()
    }


def mlflow_snapshot(root: Path) -> dict:
    """Every run of every experiment: status, times, params, tags, metrics and each metric's full history."""
    from mlflow.entities import ViewType

    c = client(root)
    experiments = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ALL)]
    snapshot = {}
    for r in c.search_runs(experiments, run_view_type=ViewType.ALL):
        histories = {
            key: [(m.step, m.value, m.timestamp) for m in c.get_metric_history(r.info.run_id, key)]
            for key in r.data.metrics
        }
        snapshot[r.info.run_id] = {
            "status": r.info.status,
            "start": r.info.start_time,
            "end": r.info.end_time,
            "name": r.info.run_name,
            "params": r.data.params,
            "tags": r.data.tags,
            "metrics": r.data.metrics,
            "histories": histories,
        }
    return snapshot


def records(root: Path) -> dict[str, bytes]:
    """Every record.json under ``root/outputs``, byte for byte."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "outputs").rglob("record.json"))}


def replay_sampler(sampler: dict, params: dict[str, str], values: list, direction) -> list[dict]:
    """The parameters the named sampler proposes, in order, when told ``values``: what a sweep with that
    sampler (and seed) over ``params`` must have sampled, trial by trial, in one worker."""
    import optuna

    from lora_sweep.sweep.space import SearchSpace
    from lora_sweep.sweep.study import ask, seeded_samplers

    space = SearchSpace(params)
    grid = space.grid("hydra.sweeper.params") if sampler.get("name") == "grid" else None
    samplers = seeded_samplers(dict(sampler), grid, False)  # each trial's own seed, as the sweep asks
    study = optuna.create_study(sampler=samplers(0), direction=direction)
    sampled = []
    for value in values:
        trial = ask(study, samplers)
        space.sample(trial, {})
        sampled.append(trial.params)
        study.tell(trial, value)
    return sampled


# --- a hand-made trials table, shaped like lora_sweep.report.collect.trials_table's ---------------------


def trial_row(
    trial: int,
    val_metric: float | None,
    trainable_params: int | None,
    *,
    role: str = "search",
    state: str = "complete",
    **extra,
) -> dict:
    """One row of the trials table; anything not given is what a LoRA trial on the tiny model records."""
    lora = role == "search"
    row = {
        "role": role,
        "trial": trial,
        "state": state,
        "fail_reason": None,
        "method": "lora" if lora else "full",
        "r": 8.0 if lora else None,
        "alpha": 16.0 if lora else None,
        "scaling": 2.0 if lora else None,
        "targets": "attention_qv" if lora else None,
        "variant": "lora" if lora else None,
        "dropout": None,
        "lr": 2e-3 if lora else 1e-4,
        "val_metric": val_metric,
        "trainable_params": trainable_params,
        "total_params": 1_000_000,
        "trainable_pct": None if trainable_params is None else trainable_params / 1e4,
        "peak_memory_mb": 512.0,
        "train_seconds": 12.0,
        "tokens_per_second": 900.0,
        "steps": 42,
        "total_steps": 42,
        "checkpoint_mb": 0.5,
        "checkpoint": f"/ck/{role}-{trial}/best",
        "mlflow_run_id": f"run{role}{trial}",
        "record": None,
        "evaluations": [
            {"step": 21, "accuracy": 0.7, "loss": 0.6},
            {"step": 42, "accuracy": val_metric or 0.0, "loss": 0.5},
        ],
        "seed": 0,
    }
    row.update(extra)
    return row


def trials_frame(*rows: dict):
    import pandas as pd

    return pd.DataFrame(list(rows))


FOURIERFT = """\
# @package _global_
# FourierFT (peft.FourierFTConfig): a method lora_sweep has no table entry for, as a user adds one
method:
  name: fourierft
  peft: FOURIERFT
  targets: attention_qv
  modules_to_save: []
  options:
    n_frequency: 64
    scaling: 100.0
train:
  lr: 5.0e-3
"""


def write_fourierft(conf: Path) -> Path:
    """A config folder (for hydra.searchpath) holding one new method file, ``method/fourierft.yaml``."""
    (conf / "method").mkdir(parents=True, exist_ok=True)
    (conf / "method" / "fourierft.yaml").write_text(FOURIERFT)
    return conf


def raise_from_forward(monkeypatch, make_error, when) -> None:
    """Every model a run builds raises ``make_error()`` from a forward pre-hook where ``when(module)``: an
    out-of-memory error surfaces exactly where the allocator would raise it (a real OOM cannot be produced
    on a CPU test machine; this hook is the one simulation). Undone with the monkeypatch."""
    import lora_sweep.run as run_module

    real = run_module.apply_method

    def apply_method(model, *args, **kwargs):
        model = real(model, *args, **kwargs)

        def hook(module, args, kwargs):
            if when(module):
                raise make_error()

        model.register_forward_pre_hook(
            hook, with_kwargs=True
        )  # on the PeftModel wrapper, dropped after the run
        return model

    monkeypatch.setattr(run_module, "apply_method", apply_method)


class Killed(BaseException):
    """Stands in for SIGKILL inside the test's process: no ``except Exception`` of the run catches it."""


def die_after_step(tracker, at_step: int):
    """``tracker`` that raises :class:`Killed` once it has logged a metric at ``at_step`` or later: the run
    stops there with its checkpoints as a killed process leaves them (the last one a few steps back)."""
    log_metrics = tracker.log_metrics

    def log_then_die(metrics, step=None):
        log_metrics(metrics, step)
        if step is not None and step >= at_step:
            raise Killed(f"killed after step {step}")

    tracker.log_metrics = log_then_die
    return tracker


def fit_on_cpu(cfg, on_evaluation=None, resume_from: Path | None = None):
    """A fresh base with the method applied, trained in-process by the loop itself on CPU (no run, no
    record, no tracking). Returns (prepared, model, result)."""
    import torch

    from lora_sweep.methods import apply_method
    from lora_sweep.models import load_base_model
    from lora_sweep.prepare import prepare
    from lora_sweep.tracking import Tracker
    from lora_sweep.train import fit

    prepared = prepare(cfg)
    torch.manual_seed(cfg.train.seed)
    model = load_base_model(
        prepared.spec, cfg.model, prepared.data.label_names, prepared.tokenizer.pad_token_id
    )
    model = apply_method(model, cfg.method, prepared.spec)
    result = fit(
        model,
        prepared.tokenizer,
        prepared.data,
        cfg,
        Tracker(),
        device=torch.device("cpu"),
        precision="fp32",
        checkpoint_dir=Path(cfg.output_dir) / "checkpoints",
        on_evaluation=on_evaluation,
        resume_from=resume_from,
    )
    return prepared, model, result
