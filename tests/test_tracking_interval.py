"""tracking.system_metrics_interval: MLflow's system-metrics sampler runs at the key's interval, and a bad
interval is one line naming the key before anything is recorded."""

from __future__ import annotations

import pytest

from lora_sweep.errors import ConfigError
from lora_sweep.tracking import make_tracker


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_a_non_positive_interval_is_refused(compose, value):
    with pytest.raises(ConfigError) as caught:
        compose(f"tracking.system_metrics_interval={value}")
    assert str(caught.value).startswith(f"tracking.system_metrics_interval={float(value)!r}: must be > 0")


def test_the_sampler_runs_at_the_configured_interval(compose, monkeypatch):
    import mlflow
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    cfg = compose("tracking.system_metrics=true", "tracking.system_metrics_interval=42")
    assert compose().tracking.system_metrics_interval == 10  # the default: MLflow's own, not 5 s
    started: list[float] = []
    original = SystemMetricsMonitor.start

    def record_interval(self):  # the real monitor, only watched
        started.append(self.sampling_interval)
        return original(self)

    monkeypatch.setattr(SystemMetricsMonitor, "start", record_interval)
    tracker = make_tracker(cfg.tracking)
    try:
        tracker.start("interval", {}, {})
    finally:
        tracker.end("completed")
        mlflow.set_system_metrics_sampling_interval(None)
    assert started == [42.0]
