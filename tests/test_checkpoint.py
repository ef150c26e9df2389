"""A checkpoint save cut off by a kill leaves its temp folder (``.last.tmp<pid>``, as big as a checkpoint):
the next run in that folder removes it, unless its process is still alive (a save in progress)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_sweep.checkpoint import remove_stale_saves
from lora_sweep.run import run
from lora_sweep.tracking import make_tracker
from tests.helpers import Killed, die_after_step


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped): what a killed save leaves in its name."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temp_folders_go_and_live_ones_stay(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    names = [f".last.tmp{dead}", f".best.tmp{dead}", f".last.old{dead}", f".last.tmp{alive}"]
    keep = ["best", "last", ".last.tmpx", "notes.tmp1"]
    for name in names + keep:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 100)
    removed = remove_stale_saves(tmp_path)
    assert sorted(p.name for p in removed) == sorted(names[:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[3], *keep])
    assert remove_stale_saves(tmp_path / "missing") == []


def test_resume_removes_the_temp_folder_of_a_killed_save(compose, tiny_overrides, tmp_path):
    one_epoch = [o for o in tiny_overrides if not o.startswith("train.epochs=")]
    cfg = compose(*one_epoch, "train.epochs=1", "tracking=none", "train.lr=5e-3")  # 21 steps
    with pytest.raises(Killed):
        run(cfg, tracker=die_after_step(make_tracker(cfg.tracking), 14))
    checkpoints = Path(cfg.output_dir) / "checkpoints"
    # what a save killed half way leaves: the temp folder, named after its dead process, never renamed
    stale = checkpoints / f".last.tmp{dead_pid()}"
    shutil.copytree(checkpoints / "last", stale)
    (stale / "lora_sweep.json").unlink()
    saving = checkpoints / f".best.tmp{os.getpid()}"  # a live process's save: not ours to remove
    saving.mkdir()

    record = run(cfg)
    assert record.status == "completed" and record.resumes[0]["from_step"] == 12
    assert not stale.exists() and saving.exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(["best", "last", saving.name])

    # a finished run, rerun: nothing to train, and still no stale folder left behind
    shutil.copytree(checkpoints / "last", stale)
    assert run(cfg).status == "completed" and not stale.exists()
