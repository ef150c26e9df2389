"""One JSON record per run: the single source of truth that reports read (they never retrain).

``record.json`` sits in the run's output folder. It is written when the run starts (status
``running``) and rewritten atomically at the end (``completed``, ``pruned`` or ``failed`` with the
error), so a crashed process still leaves a record that says what it was doing.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_sweep.secrets import redact

RECORD_FILE = "record.json"
SCHEMA_VERSION = 1


@dataclass
class RunRecord:
    output_dir: str
    config: dict[str, Any]
    versions: dict[str, str]
    git: dict[str, Any]
    status: str = "running"
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    device: str | None = None
    precision: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # trainable/total counts, LoRA targets, scaling
    metrics: dict[str, Any] = field(default_factory=dict)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: dict[str, Any] = field(default_factory=dict)
    mlflow: dict[str, Any] = field(default_factory=dict)
    resumes: list[dict[str, Any]] = field(
        default_factory=list
    )  # one entry per restart: when, from which step
    generations: list[dict[str, str]] = field(
        default_factory=list
    )  # causal LMs: fixed prompts, greedy answers
    schema_version: int = SCHEMA_VERSION

    @property
    def path(self) -> Path:
        return Path(self.output_dir) / RECORD_FILE

    def write(self) -> Path:
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{RECORD_FILE}.tmp{os.getpid()}")
        tmp.write_text(
            json.dumps(redact(self.__dict__), indent=2, default=str)
        )  # no password or token on disk
        os.replace(tmp, path)
        return path

    def finish(self, status: str, error: str | None = None) -> Path:
        self.status, self.error, self.finished_at = status, error, time.time()
        return self.write()


def load_run_record(data: dict[str, Any]) -> RunRecord:
    """A RunRecord from a record.json's contents (keys this version does not know are ignored)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(RunRecord)}
    return RunRecord(**{k: v for k, v in data.items() if k in known})


def read_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_FILE
    return json.loads(path.read_text())
