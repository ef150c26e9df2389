"""tracking.SweepRun, the sweep's MLflow parent run: found again by the study's identity when the process
that made it died before storing its id, and never adopted from another study."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from lora_sweep.config import TrackingConfig
from lora_sweep.tracking import SweepRun

IDENTITY = ("lora_sweep.sweep", "lora_sweep.study_uid")


def _tags(study: str, uid: str) -> dict[str, str]:
    return {"lora_sweep.sweep": study, "lora_sweep.role": "sweep", "lora_sweep.study_uid": uid}


def test_a_parent_run_whose_id_was_never_stored_is_found_by_the_study_identity(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrackingConfig(tracking_uri=store, experiment="sweeps", system_metrics=False)
    made = SweepRun(cfg).open(None, "sweep s", {}, _tags("s", "uid-1"), IDENTITY)  # then the kill: no params
    other = SweepRun(cfg).open(None, "sweep s", {"n_trials": 3}, _tags("s", "uid-2"), IDENTITY)  # new study

    again = SweepRun(cfg)
    assert again.open(None, "sweep s", {"n_trials": 2}, _tags("s", "uid-1"), IDENTITY) == made
    again.finish("completed")
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(made)
    assert run.info.status == "FINISHED" and run.data.params == {"n_trials": "2"}  # what it missed
    assert client.get_run(other).data.params == {"n_trials": "3"}  # the other study's run untouched
    assert len(client.search_runs([run.info.experiment_id])) == 2
