"""tracking.py against a real MLflow sqlite store in a temp folder: a run started, logged and ended; a
run continued by id; runs closed after the fact; the sweep's parent run; the no-op tracker."""

from __future__ import annotations

import logging
import math

import pytest
from mlflow.tracking import MlflowClient

from lora_sweep.config import TrackingConfig
from lora_sweep.errors import ConfigError
from lora_sweep.tracking import MLFLOW_PARAM_LIMIT, MLflowTracker, SweepRun, Tracker, make_tracker


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating its schema is the slow part); tests use own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _config(store: str, experiment: str, **extra) -> TrackingConfig:
    return TrackingConfig(tracking_uri=store, experiment=experiment, system_metrics=False, **extra)


def _runs(store: str, experiment: str):
    client = MlflowClient(tracking_uri=store)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_start_log_end(store, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SecretValue12345")
    tracker = make_tracker(_config(store, "start_log_end"))
    assert isinstance(tracker, MLflowTracker) and tracker.location == store
    params = {
        "method.r": 8,
        "method.targets": ["query", "value"],
        "long": "x" * (MLFLOW_PARAM_LIMIT + 50),
        "token": "hf_SecretValue12345",
    }
    tracker.start("lora r=8", params, {"lora_sweep.role": "single", "note": "uses hf_SecretValue12345"})
    tracker.log_metrics({"loss": 0.5, "bad": math.nan, "inf": math.inf, "text": "no"}, step=1)
    tracker.log_metrics({"loss": 0.25}, step=2)
    tracker.set_tags({"epoch": 1})
    tracker.end("pruned")

    (run,) = _runs(store, "start_log_end")
    assert run.info.run_id == tracker.run_id and run.info.run_name == "lora r=8"
    assert (
        run.info.status == "KILLED" and run.data.tags["lora_sweep.status"] == "pruned"
    )  # no PRUNED in MLflow
    assert run.data.params["method.r"] == "8" and run.data.params["method.targets"] == '["query", "value"]'
    assert len(run.data.params["long"]) == MLFLOW_PARAM_LIMIT and run.data.params["long"].endswith("...")
    assert run.data.params["token"] == "***" and run.data.tags["note"] == "uses ***"
    assert run.data.tags["epoch"] == "1" and run.data.metrics == {"loss": 0.25}  # NaN, inf and text dropped
    history = MlflowClient(tracking_uri=store).get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25)]
    experiment = MlflowClient(tracking_uri=store).get_experiment_by_name("start_log_end")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_statuses_map_to_mlflow(store):
    for status, expected in (("completed", "FINISHED"), ("failed", "FAILED"), ("killed", "KILLED")):
        tracker = MLflowTracker(_config(store, "statuses"))
        tracker.start(status, {}, {})
        tracker.end(status)
        tracker.end(status)  # a second end is a no-op, not an error
        run = MlflowClient(tracking_uri=store).get_run(tracker.run_id)
        assert run.info.status == expected and run.data.tags["lora_sweep.status"] == status


def test_resume_continues_the_same_run_and_logs_params_once(store):
    first = MLflowTracker(_config(store, "resume"))
    first.start("trial 3", {"method.r": 8, "train.lr": 0.002}, {"lora_sweep.role": "search"})
    first.log_metrics({"val_accuracy": 0.6}, step=6)
    run_id = first.run_id
    first._mlflow.end_run(status="KILLED")  # what a killed process leaves: the run is not FINISHED

    again = MLflowTracker(_config(store, "resume"))
    # train.lr is already logged: MLflow params are write-once, so logging it again must be skipped
    again.start(
        "trial 3",
        {"method.r": 8, "train.lr": 0.002, "resumed_from_step": 6},
        {"lora_sweep.role": "search"},
        resume_run_id=run_id,
    )
    again.log_metrics({"val_accuracy": 0.8}, step=12)
    again.end("completed")

    (run,) = _runs(store, "resume")
    assert again.run_id == run_id == run.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["lora_sweep.resumed"] == "true"
    assert run.data.params == {"method.r": "8", "train.lr": "0.002", "resumed_from_step": "6"}
    history = MlflowClient(tracking_uri=store).get_metric_history(run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(6, 0.6), (12, 0.8)]  # one curve across both attempts


def test_resume_of_an_unknown_run_starts_a_new_one(store, caplog):
    tracker = MLflowTracker(_config(store, "unknown"))
    with caplog.at_level(logging.WARNING, logger="lora_sweep.tracking"):
        tracker.start("fresh", {"a": 1}, {}, resume_run_id="0123456789abcdef0123456789abcdef")
    tracker.end("completed")
    assert "cannot continue MLflow run 0123456789abcdef0123456789abcdef" in caplog.text
    (run,) = _runs(store, "unknown")
    assert run.info.run_id == tracker.run_id and "lora_sweep.resumed" not in run.data.tags


def test_close_run_ends_a_run_left_running(store, caplog):
    left = MLflowTracker(_config(store, "close"))
    left.start("left open", {}, {})
    run_id = left.run_id
    left._mlflow.end_run(status="RUNNING")  # detach without ending: as if the process died after its work
    assert MlflowClient(tracking_uri=store).get_run(run_id).info.status == "RUNNING"

    closer = MLflowTracker(_config(store, "close"))
    closer.close_run(run_id, "completed")
    run = MlflowClient(tracking_uri=store).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["lora_sweep.status"] == "completed"
    closer.close_run(run_id, "failed")  # already ended: left as it is
    assert MlflowClient(tracking_uri=store).get_run(run_id).info.status == "FINISHED"
    with caplog.at_level(logging.WARNING, logger="lora_sweep.tracking"):
        closer.close_run("ffffffffffffffffffffffffffffffff", "completed")
    assert "cannot close MLflow run ffffffffffffffffffffffffffffffff" in caplog.text
    closer.close_run(None, "completed")  # nothing to close


def test_tables_and_dicts_become_artifacts(store, tmp_path):
    import mlflow

    tracker = MLflowTracker(
        _config(
            store,
            "artifacts",
        )
    )
    tracker.start("artifacts", {}, {})
    tracker.log_dict({"train": {"lr": 0.002}, "path": tmp_path}, "config.json")
    tracker.log_table([{"prompt": "a", "response": "b"}, {"prompt": "c"}], "generations.json")
    (tmp_path / "ck" / "sub").mkdir(parents=True)
    (tmp_path / "ck" / "weights.safetensors").write_bytes(b"w")
    (tmp_path / "ck" / "optimizer.pt").write_bytes(b"o")
    (tmp_path / "ck" / "sub" / "tokenizer.json").write_text("{}")
    tracker.log_artifacts(tmp_path / "ck", "checkpoints/best", skip=("optimizer.pt",))
    tracker.end("completed")
    client = MlflowClient(tracking_uri=store)
    names = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config.json", "generations.json", "checkpoints"} <= names
    best = {a.path for a in client.list_artifacts(tracker.run_id, "checkpoints/best")}
    assert best == {"checkpoints/best/weights.safetensors", "checkpoints/best/sub"}  # optimizer.pt skipped
    assert mlflow.artifacts.load_dict(f"runs:/{tracker.run_id}/config.json") == {
        "train": {"lr": 0.002},
        "path": str(tmp_path),
    }
    table = mlflow.load_table("generations.json", run_ids=[tracker.run_id])
    assert table["prompt"].tolist() == ["a", "c"] and table["response"].tolist() == ["b", ""]


def test_sweep_parent_run_is_created_once_and_reopened(store):
    parent = SweepRun(_config(store, "sweep"))
    run_id = parent.open(
        None, "sweep quick", {"n_trials": 5, "space.method.r": "choice(4, 8)"}, {"lora_sweep.role": "sweep"}
    )
    parent.log_metrics({"best_value": 0.9, "nan": math.nan})
    parent.set_tags({"best_trial": 3})
    parent.finish("killed")
    assert MlflowClient(tracking_uri=store).get_run(run_id).info.status == "KILLED"

    again = SweepRun(_config(store, "sweep"))
    assert again.open(run_id, "sweep quick", {"n_trials": 5}, {}) == run_id
    assert MlflowClient(tracking_uri=store).get_run(run_id).info.status == "RUNNING"
    again.finish("completed")
    (run,) = _runs(store, "sweep")  # reopened, never duplicated
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.params == {"n_trials": "5", "space.method.r": "choice(4, 8)"} and run.data.metrics == {
        "best_value": 0.9
    }
    assert run.data.tags["best_trial"] == "3" and run.data.tags["lora_sweep.status"] == "completed"


def test_unusable_store_fails_with_one_line_naming_the_uri(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    uri = f"sqlite:///{tmp_path}/afile/mlflow.db"
    with pytest.raises(
        ConfigError, match=r"^tracking.tracking_uri='.*afile/mlflow.db': MLflow cannot use this store"
    ):
        MLflowTracker(_config(uri, "x")).start("x", {}, {})


def test_no_op_tracker_records_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracker = make_tracker(TrackingConfig(backend="none"))
    assert type(tracker) is Tracker
    tracker.start("run", {"a": 1}, {"b": "c"}, resume_run_id="abc")
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.set_tags({"x": "y"})
    tracker.log_dict({"a": 1}, "a.json")
    tracker.log_table([{"a": 1}], "t.json")
    tracker.log_artifacts(tmp_path, "x")
    tracker.close_run("abc", "completed")
    tracker.end("completed")
    assert tracker.run_id is None and tracker.location is None
    parent = SweepRun(TrackingConfig(backend="none"))
    assert (
        parent.open(None, "sweep", {"a": 1}, {}) is None and parent.run_id is None and parent.location is None
    )
    parent.log_metrics({"a": 1.0})
    parent.finish("completed")
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns
