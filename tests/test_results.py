"""sweep/results: which trial a record in a sweep folder belongs to. A sweep folder reused with another
storage holds records of another study's trials; they must never be read as this study's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_sweep.sweep.results import foreign_trial_folder, read_record_in

from .helpers import load, mlflow_snapshot, optuna_snapshot, parents, records, write_sweep

OLD = "journal:/old/optuna.journal"


def _record(folder: Path, study: str, number: int, storage: str) -> Path:
    folder.mkdir(parents=True)
    sweep = {"study_name": study, "storage": storage, "trial_number": number, "trial_id": number}
    (folder / "record.json").write_text(
        json.dumps({"output_dir": str(folder), "status": "completed", "config": {"sweep": sweep}})
    )
    return folder


def test_a_record_is_read_only_as_its_own_trials(tmp_path):
    folder = _record(tmp_path / "baseline-000", "s-baseline", 0, OLD)
    assert read_record_in(folder)["status"] == "completed"  # asked for no trial: whatever is there
    assert read_record_in(folder, ("s-baseline", 0, OLD))["status"] == "completed"
    assert read_record_in(folder, ("s-baseline", 0, "journal:/new/optuna.journal")) is None
    assert read_record_in(folder, ("s-baseline", 1, OLD)) is None
    assert read_record_in(folder, ("s", 0, OLD)) is None
    # a password in a storage URL is masked in records: the same storage still matches
    url = "postgresql://u:hunter2hunter2@db/optuna"
    masked = _record(tmp_path / "search-000", "s", 0, "postgresql://u:***@db/optuna")
    assert read_record_in(masked, ("s", 0, url)) is not None


def test_a_sweep_folder_holding_another_storages_trials_is_found(tmp_path):
    _record(tmp_path / "search-000", "s", 0, OLD)
    _record(tmp_path / "baseline-000", "s-baseline", 0, OLD)
    (tmp_path / "validation").mkdir()  # not a trial folder: never looked at
    (tmp_path / "search-001").mkdir()  # a trial folder without a record yet
    studies = ("s", "s-baseline", "s-replicates")
    assert foreign_trial_folder(tmp_path, studies, OLD) is None
    folder, theirs = foreign_trial_folder(tmp_path, studies, "journal:/new/optuna.journal")
    assert folder == "baseline-000" and theirs["study_name"] == "s-baseline" and theirs["storage"] == OLD
    assert foreign_trial_folder(tmp_path, ("t", "t-baseline"), OLD)[0] == "baseline-000"
    assert foreign_trial_folder(tmp_path / "nothing-here", studies, OLD) is None


def test_a_sweep_folder_moved_with_its_own_journal_is_still_its_studys(tmp_path):
    """Records name the journal by its absolute path: moved along with the folder, it is the same study."""
    old = tmp_path / "old"
    _record(tmp_path / "new" / "search-000", "s", 0, f"journal:{old / 'optuna.journal'}")
    record = json.loads((tmp_path / "new" / "search-000" / "record.json").read_text())
    record["output_dir"] = str(old / "search-000")
    (tmp_path / "new" / "search-000" / "record.json").write_text(json.dumps(record))
    own = f"journal:{tmp_path / 'new' / 'optuna.journal'}"
    assert foreign_trial_folder(tmp_path / "new", ("s",), own) is None
    elsewhere = f"journal:{tmp_path / 'other' / 'optuna.journal'}"  # but not another journal
    assert foreign_trial_folder(tmp_path / "new", ("s",), elsewhere)[0] == "search-000"


@pytest.mark.slow  # one training, in-process
def test_moving_the_storage_of_an_existing_sweep_folder_is_refused_in_one_line(
    tmp_path, sweep_in_process, capsys
):
    """Same hydra.sweep.dir, new hydra.sweeper.storage: the new study's trial 0 would run in search-000,
    which holds the old study's trial 0, and read its record as its own (re-tagging the old completed MLflow
    run as failed, and making a second parent run). Refused before anything is opened or recorded."""
    write_sweep(
        tmp_path,
        "moved",
        {"n_trials": 1, "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"}, "params": {}},
    )
    sweep_in_process("moved", "train.epochs=1")
    before = mlflow_snapshot(tmp_path), optuna_snapshot(tmp_path, "moved"), records(tmp_path)
    capsys.readouterr()

    moved = tmp_path / "elsewhere" / "optuna.journal"
    with pytest.raises(SystemExit) as stopped:
        sweep_in_process("moved", "train.epochs=1", f"hydra.sweeper.storage=journal:{moved}")
    assert stopped.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: hydra.sweep.dir='outputs/sweeps/moved': ")
    assert "search-000 holds trial 0 of study 'moved'" in lines[0]
    assert not moved.parent.exists()  # no storage opened
    assert (mlflow_snapshot(tmp_path), optuna_snapshot(tmp_path, "moved"), records(tmp_path)) == before
    assert len(parents(tmp_path, "moved")) == 1 and load(tmp_path, "moved").trials[0].state.is_finished()
