"""Shared test helpers: a sweep file written as a user writes one, the real command line, the real stores."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import yaml


def write_sweep(root: Path, name: str, sweeper: dict) -> Path:
    """A sweep file selecting our sweeper, its folder fixed, the report off unless ``sweeper`` turns it on."""
    folder = root / "extra_conf" / "sweeps"
    folder.mkdir(parents=True, exist_ok=True)
    body = {
        "defaults": [{"override /hydra/sweeper": "lora_optuna"}],
        "hydra": {
            "sweep": {"dir": "outputs/sweeps/${hydra.sweeper.study_name}"},
            "sweeper": {"study_name": name, "report": {"enabled": False}, **sweeper},
        },
    }
    path = folder / f"{name}.yaml"
    path.write_text("# @package _global_\n" + yaml.safe_dump(body, sort_keys=False))
    return path


def run_sweep(root: Path, name: str, tiny: list[str], *extra: str) -> subprocess.CompletedProcess:
    command = [
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
    result = subprocess.run(command, check=False, cwd=root, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def load_study(root: Path, study: str, folder: str) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend

    journal = root / "outputs" / "sweeps" / folder / "optuna.journal"
    return optuna.load_study(
        study_name=study, storage=optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    )


def mlflow_client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
