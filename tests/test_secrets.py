"""Secrets (tokens and passwords from the environment, URL passwords) never reach MLflow, records, the sweep
summary, the report, error messages or log lines; ``***`` stands where they were."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from lora_sweep.errors import ConfigError
from lora_sweep.secrets import MASK, redact, redact_url, secret_values

from .helpers import run_sweep, sweep_command, write_sweep

HF_TOKEN = "hf_TopSecretToken1234567890"
TRACKING_PASSWORD = "Mlflow-Pa55word-xyz"
DB_PASSWORD = "Pw4Database9"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "postgresql://lora:Pw4Database9@db.example:5432/optuna",
            "postgresql://lora:***@db.example:5432/optuna",
        ),
        (
            "postgresql+psycopg2://u:p%40ss@h/db and http://a:b@c",
            "postgresql+psycopg2://u:***@h/db and http://a:***@c",
        ),
        (
            "https://mlflow.example:5000/api@v2",
            "https://mlflow.example:5000/api@v2",
        ),  # a port, not a password
        ("postgresql://lora@db.example/optuna", "postgresql://lora@db.example/optuna"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
    ],
)
def test_url_passwords_are_masked(text, expected):
    assert redact_url(text) == expected


def test_secret_environment_values_are_masked_recursively(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("MY_SERVICE_SECRET", "abcdefgh12")  # any *_SECRET of 8+ characters
    monkeypatch.setenv("SHORT_KEY", "abc")  # too short to mask safely
    data = {
        "tags": {"note": f"token={HF_TOKEN}"},
        "list": [HF_TOKEN, ("abcdefgh12", 3)],
        "n": 1.5,
        "none": None,
        HF_TOKEN: "as a key",
        "abc": "kept",
    }
    assert redact(data) == {
        "tags": {"note": "token=***"},
        "list": [MASK, (MASK, 3)],
        "n": 1.5,
        "none": None,
        MASK: "as a key",
        "abc": "kept",
    }
    assert set(secret_values()) >= {HF_TOKEN, "abcdefgh12"} and "abc" not in secret_values()


def test_config_error_text_is_masked(monkeypatch):
    monkeypatch.setenv("PGPASSWORD", DB_PASSWORD)
    err = ConfigError(
        "hydra.sweeper.storage", f"postgresql://lora:{DB_PASSWORD}@127.0.0.1:1/db", f"refused ({DB_PASSWORD})"
    )
    assert str(err) == "hydra.sweeper.storage='postgresql://lora:***@127.0.0.1:1/db': refused (***)"


def _text_of_store(db: Path) -> str:
    """Every row of every table of the MLflow sqlite store, as text."""
    with sqlite3.connect(db) as connection:
        return "\n".join(connection.iterdump())


@pytest.mark.slow
def test_no_secret_reaches_mlflow_records_summary_or_report(tmp_path, tiny):
    """A real sweep with a token and passwords in the environment and on the command line (tags, a
    storage-like
    URL): the whole MLflow store, its artifacts, every record.json, the sweep summary, the report, the Optuna
    journal and the console hold ``***`` where the secrets were, and never the secrets."""
    env = {**os.environ, "HF_TOKEN": HF_TOKEN, "MLFLOW_TRACKING_PASSWORD": TRACKING_PASSWORD}
    write_sweep(
        tmp_path,
        "secret",
        {
            "n_trials": 2,
            "sampler": {"name": "random", "seed": 0},
            "pruner": {"name": "none"},
            "params": {"train.lr": "tag(log, interval(1e-3, 1e-2))"},
            "report": {"enabled": True, "checkpoints": False, "replicates": 0},
        },
    )
    extra = [
        f"+tags.note={HF_TOKEN}",
        f"+tags.password={TRACKING_PASSWORD}",
        f"+tags.source='postgresql://lora:{DB_PASSWORD}@db.example/optuna'",
        "train.epochs=1",
    ]
    result = subprocess.run(
        sweep_command(tmp_path, "secret", tiny, *extra),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    texts = {"mlflow.db": _text_of_store(tmp_path / "mlflow.db"), "console": result.stdout + result.stderr}
    scanned = [
        p
        for p in tmp_path.rglob("*")
        if p.is_file()
        and (
            p.name in ("record.json", "sweep_summary.json", "optuna.journal")
            or "reports" in p.parts
            or "mlruns" in p.parts
            or "mlartifacts" in p.parts
        )
    ]
    assert any(p.name == "record.json" for p in scanned) and any("reports" in p.parts for p in scanned)
    assert any(
        "mlruns" in p.parts or "mlartifacts" in p.parts for p in scanned
    )  # the artifact folder was found and read
    texts.update({str(p.relative_to(tmp_path)): p.read_bytes().decode("utf-8", "replace") for p in scanned})
    for secret in (HF_TOKEN, TRACKING_PASSWORD, DB_PASSWORD):
        leaks = [name for name, text in texts.items() if secret in text]
        assert not leaks, f"{secret} in {leaks}"

    # *** stands where they were: the tags and params of every trial run, and the records
    from .helpers import client

    runs = [r for r in client(tmp_path).search_runs(["1"]) if r.data.tags.get("lora_sweep.role") == "search"]
    assert len(runs) == 2
    for run in runs:
        assert run.data.tags["note"] == MASK and run.data.tags["password"] == MASK
        assert run.data.tags["source"] == "postgresql://lora:***@db.example/optuna"
        assert run.data.params["tags.note"] == MASK
        assert MASK in run.data.tags["lora_sweep.command"]
        record = json.loads(Path(run.data.tags["lora_sweep.output_dir"], "record.json").read_text())
        assert record["config"]["tags"] == {
            "note": MASK,
            "password": MASK,
            "source": "postgresql://lora:***@db.example/optuna",
        }


@pytest.mark.slow
def test_bad_storage_url_error_masks_its_password(tmp_path, tiny):
    write_sweep(
        tmp_path,
        "pg",
        {
            "storage": f"postgresql://lora:{DB_PASSWORD}@127.0.0.1:1/optuna",
            "n_trials": 1,
            "params": {"train.lr": "tag(log, interval(1e-3, 1e-2))"},
        },
    )
    result = run_sweep(tmp_path, "pg", tiny, check=False)
    assert result.returncode != 0
    assert DB_PASSWORD not in result.stdout + result.stderr
    assert "error: hydra.sweeper.storage='postgresql://lora:***@127.0.0.1:1/optuna'" in result.stderr, (
        result.stderr[-3000:]
    )
