"""A resumed run logs each (metric, step) once: the steps it redoes after its last checkpoint were
logged by the attempt that died, and the MLflow run's curves must not hold them twice."""

from __future__ import annotations

from collections import Counter

import pytest
from mlflow.tracking import MlflowClient

from lora_sweep.config import TrackingConfig
from lora_sweep.record import read_record
from lora_sweep.run import run
from lora_sweep.tracking import MLflowTracker, make_tracker
from tests.helpers import Killed, die_after_step


def points(store: str, run_id: str) -> Counter:
    client = MlflowClient(tracking_uri=store)
    return Counter(
        (key, m.step)
        for key in client.get_run(run_id).data.metrics
        for m in client.get_metric_history(run_id, key)
    )


def test_resumed_run_logs_each_metric_step_once(compose, tiny_overrides, tmp_path):
    """Killed after logging step 14 (last checkpoint: step 12), rerun: steps 13-14 are trained again but
    not logged again, and the curve still has every step."""
    one_epoch = [o for o in tiny_overrides if not o.startswith("train.epochs=")]
    cfg = compose(*one_epoch, "train.epochs=1", "train.lr=5e-3")  # 21 steps, validation every 6
    with pytest.raises(Killed):
        run(cfg, tracker=die_after_step(make_tracker(cfg.tracking), 14))
    run_id = read_record(cfg.output_dir)["mlflow"]["run_id"]
    store = cfg.tracking.tracking_uri
    assert max(step for key, step in points(store, run_id) if key == "train_loss") == 14

    record = run(cfg)
    assert record.status == "completed" and record.resumes[0]["from_step"] == 12
    assert record.mlflow["run_id"] == run_id
    counted = points(store, run_id)
    assert {point: n for point, n in counted.items() if n > 1} == {}
    assert sorted(step for key, step in counted if key == "train_loss") == [*range(2, 21, 2), 21]
    assert sorted(step for key, step in counted if key == "val_accuracy") == [6, 12, 18, 21]
    assert ("trainable_params", 0) in counted and ("objective", 0) in counted


def test_tracker_continuing_a_run_skips_steps_already_logged(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrackingConfig(tracking_uri=store, experiment="history", system_metrics=False)
    first = MLflowTracker(cfg)
    first.start("trial", {}, {})
    for step in (2, 4, 6):
        first.log_metrics({"loss": 1.0 / step}, step)
    first.log_metrics({"setup_seconds": 3.0}, step=0)
    first._mlflow.end_run(status="KILLED")

    again = MLflowTracker(cfg)
    again.start("trial", {}, {}, resume_run_id=first.run_id)
    again.log_metrics({"setup_seconds": 0.1}, step=0)  # logged by the first attempt: kept as it was
    for step in (4, 6, 8):
        again.log_metrics({"loss": 0.5 / step, "lr": 1e-3}, step)  # lr is new at 4 and 6: logged
    again.end("completed")

    client = MlflowClient(tracking_uri=store)
    history = [(m.step, m.value) for m in client.get_metric_history(first.run_id, "loss")]
    assert history == [(2, 0.5), (4, 0.25), (6, 1 / 6), (8, 0.0625)]
    assert [m.step for m in client.get_metric_history(first.run_id, "lr")] == [4, 6, 8]
    assert [m.value for m in client.get_metric_history(first.run_id, "setup_seconds")] == [3.0]
