"""An MLflow tracking server that cannot be reached fails in seconds with one line naming
``tracking.tracking_uri``, for a single run and for a sweep's parent run; one that answers keeps working.
The unreachable server is a closed port on 127.0.0.1 (connection refused at once) or a listening socket
that never answers (the probe's timeout bounds it); the answering ones are real HTTP servers in this
process."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import pytest

from lora_sweep.config import TrackingConfig
from lora_sweep.errors import ConfigError
from lora_sweep.record import read_record
from lora_sweep.run import run
from lora_sweep.tracking import MLflowTracker, SweepRun, probe_tracking_server

CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens there, the connection is refused at once
EXPECTED = f"tracking.tracking_uri={CLOSED!r}: MLflow server unreachable: "


def test_probe_of_a_closed_port_fails_at_once_with_one_line():
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        probe_tracking_server(CLOSED)
    assert time.perf_counter() - started < 5
    assert str(caught.value).startswith(EXPECTED) and "\n" not in str(caught.value)
    assert caught.value.key == "tracking.tracking_uri"


def test_probe_of_a_server_that_never_answers_is_bounded_by_its_timeout():
    with socket.socket() as listener:  # accepts connections (the kernel's backlog) but never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.perf_counter()
        with pytest.raises(ConfigError, match="MLflow server unreachable: .*timed out"):
            probe_tracking_server(uri, timeout=1.0)
        assert time.perf_counter() - started < 4


def test_probe_hides_a_password_in_the_uri():
    with pytest.raises(ConfigError) as caught:
        probe_tracking_server("http://user:hunter2-secret@127.0.0.1:9")
    assert "hunter2-secret" not in str(caught.value) and "user:***@127.0.0.1:9" in str(caught.value)


class _Answer(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):  # keep the test output clean
        pass


class _NotFound(_Answer):
    status = 404


@pytest.mark.parametrize("handler", [_Answer, _NotFound], ids=["health ok", "answers 404"])
def test_probe_of_a_server_that_answers_passes(handler):
    """Any HTTP answer means a server is there (a proxy in front of MLflow may not route /health): MLflow's
    own requests then say what is wrong, if anything."""
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        probe_tracking_server(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


def test_local_stores_need_no_probe(tmp_path):
    probe_tracking_server(f"sqlite:///{tmp_path / 'mlflow.db'}")
    probe_tracking_server(str(tmp_path / "mlruns"))
    probe_tracking_server(None)
    assert not (tmp_path / "mlflow.db").exists()  # a probe opens nothing


def test_tracker_and_sweep_parent_run_fail_fast():
    cfg = TrackingConfig(tracking_uri=CLOSED, experiment="probe", system_metrics=False)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="MLflow server unreachable"):
        MLflowTracker(cfg).start("run", {}, {})
    with pytest.raises(ConfigError, match="MLflow server unreachable"):
        SweepRun(cfg)
    assert time.perf_counter() - started < 10  # MLflow's own retries took 253 s


def test_single_run_against_an_unreachable_server_fails_in_seconds(compose, tiny_overrides, tmp_path):
    cfg = compose(*tiny_overrides, f"tracking.tracking_uri={CLOSED}")
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        run(cfg)
    assert time.perf_counter() - started < 30  # data preparation included
    assert str(caught.value).startswith(EXPECTED)
    record = read_record(cfg.output_dir)
    assert record["status"] == "failed" and "MLflow server unreachable" in record["error"]
    assert not (Path(cfg.output_dir) / "checkpoints").exists()  # nothing trained


@pytest.mark.slow
def test_commands_against_an_unreachable_server_exit_2_in_seconds(tmp_path, tiny_overrides, tiny):
    """The real command line: a single run and a sweep, each one line on stderr and exit code 2, long
    before MLflow's own retries would have given up; the sweep starts no trial."""
    import subprocess
    import sys

    from tests.helpers import run_sweep, write_sweep

    single = [sys.executable, "-m", "lora_sweep", *tiny_overrides, f"data.cache_dir={tmp_path / 'cache'}"]
    write_sweep(
        tmp_path, "offline", {"n_trials": 2, "params": {"train.lr": "tag(log, interval(1e-3, 1e-2))"}}
    )
    for name, start in (
        (
            "single run",
            lambda: subprocess.run(
                [*single, f"tracking.tracking_uri={CLOSED}", "hydra.run.dir=outputs/single"],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=600,
            ),
        ),
        (
            "sweep",
            lambda: run_sweep(tmp_path, "offline", tiny, f"tracking.tracking_uri={CLOSED}", check=False),
        ),
    ):
        started = time.perf_counter()
        result = start()
        assert time.perf_counter() - started < 120, name  # imports and data included; MLflow alone: 253 s
        assert result.returncode == 2, (name, result.stderr[-3000:])
        lines = [line for line in result.stderr.splitlines() if line.startswith(("error:", "Traceback"))]
        assert len(lines) == 1 and lines[0].startswith(f"error: {EXPECTED}"), (name, result.stderr[-3000:])
    assert not (tmp_path / "outputs" / "sweeps" / "offline" / "search-000").exists()
    assert not list((tmp_path / "outputs" / "sweeps").rglob("record.json"))


@pytest.mark.slow
def test_a_real_mlflow_server_passes_the_probe_and_records_the_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from tests import servers

    with servers.mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path) as url:
        probe_tracking_server(url)
        cfg = TrackingConfig(tracking_uri=url, experiment="served", system_metrics=False)
        parent = SweepRun(cfg)
        parent_id = parent.open(None, "sweep", {"study": "served"}, {"lora_sweep.sweep": "served"})
        tracker = MLflowTracker(cfg)
        tracker.start("trial 0", {"method.r": 8}, {"mlflow.parentRunId": parent_id})
        tracker.log_metrics({"val_accuracy": 0.75}, step=6)
        tracker.end("completed")
        parent.finish("completed")
        run_info = MlflowClient(tracking_uri=url).get_run(tracker.run_id)
        assert run_info.info.status == "FINISHED" and run_info.data.metrics == {"val_accuracy": 0.75}
