"""Nothing lost: a run killed with SIGKILL resumes exactly; checkpoints are atomic and verified, a damaged
one is skipped for the one before it; a finished run leaves only its best and last checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_sweep.checkpoint import RESUME_FILES, resume_point, save_checkpoint, verify
from lora_sweep.record import read_record
from lora_sweep.run import run

# The real run() in its own process; a tracker that SIGKILLs the process once a given step is logged
# stands in for the OOM killer or a pulled plug at a known moment (the same command, unkilled, resumes).
RUNNER = """
import os, signal, sys
from hydra import compose, initialize_config_dir
from lora_sweep import cli
from lora_sweep.run import run
from lora_sweep.tracking import make_tracker

cli.register_resolvers()
with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
    cfg = cli.to_run_config(compose(config_name="config", overrides=sys.argv[1:]))
tracker = make_tracker(cfg.tracking)
if "KILL_AT_STEP" in os.environ:
    log_metrics = tracker.log_metrics

    def log_then_die(metrics, step=None):
        log_metrics(metrics, step)
        if step is not None and step >= int(os.environ["KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)

    tracker.log_metrics = log_then_die
run(cfg, tracker=tracker)
"""


def _run_in_process(
    tmp_path: Path, overrides: list[str], kill_at: int | None = None
) -> subprocess.CompletedProcess:
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = {k: v for k, v in os.environ.items() if k != "KILL_AT_STEP"}
    if kill_at is not None:
        env["KILL_AT_STEP"] = str(kill_at)
    return subprocess.run(
        [sys.executable, str(script), *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _overrides(tmp_path: Path, tiny_overrides: list[str], output: Path, *extra: str) -> list[str]:
    return [
        *tiny_overrides,
        f"output_dir={output}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "train.lr=5e-3",
        *extra,
    ]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(checkpoint.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_sigkilled_run_resumes_exactly_in_the_same_mlflow_run(tmp_path, compose, tiny_overrides, method):
    """Killed at step 14 (last checkpoint: step 12), rerun: same final metrics and weights as a run never
    killed, one MLflow run continued to FINISHED. Dropout is on, so the RNG state matters."""
    from mlflow.tracking import MlflowClient

    extra = ["method=full", "train.lr=1e-3"] if method == "full" else ["method.dropout=0.1"]
    reference = run(
        compose(*tiny_overrides, "tracking=none", "train.lr=5e-3", *extra, output_dir=tmp_path / "reference")
    )

    output = tmp_path / "killed"
    args = _overrides(tmp_path, tiny_overrides, output, *extra)
    killed = _run_in_process(tmp_path, args, kill_at=14)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert read_record(output)["status"] == "running"  # what a killed process leaves
    run_id = read_record(output)["mlflow"]["run_id"]
    assert json.loads((output / "checkpoints" / "last" / "trainer_state.json").read_text())["step"] == 12

    resumed = _run_in_process(tmp_path, args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = read_record(output)
    assert record["status"] == "completed" and record["resumes"][0]["from_step"] == 12
    assert record["evaluations"] == pytest.approx(reference.evaluations, rel=1e-6)
    assert record["metrics"]["objective"] == pytest.approx(reference.metrics["objective"], rel=1e-6)
    assert record["metrics"]["test_loss"] == pytest.approx(reference.metrics["test_loss"], rel=1e-6)
    mine, theirs = _weights(output / "checkpoints" / "last"), _weights(Path(reference.checkpoints["last"]))
    assert (
        mine
        and mine.keys() == theirs.keys()
        and all(torch.allclose(mine[k], theirs[k], atol=1e-6) for k in mine)
    )

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert record["mlflow"]["run_id"] == run_id
    assert (
        len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    )  # continued, not a second run
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags["lora_sweep.resumed"] == "true"
    steps = sorted({m.step for m in client.get_metric_history(run_id, "val_accuracy")})
    assert steps == [e["step"] for e in reference.evaluations]  # the curve has no gap where the kill was
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == [
        "best",
        "last",
    ]  # bounded: no previous, no temp


@pytest.mark.slow
def test_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, compose, tiny_overrides):
    reference = run(
        compose(*tiny_overrides, "tracking=none", "train.lr=5e-3", output_dir=tmp_path / "reference")
    )
    output = tmp_path / "killed"
    args = _overrides(tmp_path, tiny_overrides, output, "tracking=none")
    assert (
        _run_in_process(tmp_path, args, kill_at=20).returncode == -signal.SIGKILL
    )  # last: step 18, previous: 12
    weights = output / "checkpoints" / "last" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte: the file still parses, only the checksum knows
    weights.write_bytes(bytes(data))

    resumed = _run_in_process(tmp_path, args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warning = next(line for line in resumed.stderr.splitlines() if "is unusable" in line)
    assert (
        "checkpoints/last is unusable (adapter_model.safetensors is corrupt (checksum mismatch)); resuming "
        "from" in warning
    )
    assert warning.rstrip().endswith("checkpoints/previous")
    record = read_record(output)
    assert record["resumes"][0]["from_step"] == 12
    assert record["evaluations"] == pytest.approx(reference.evaluations, rel=1e-6)


def test_verify_tells_a_complete_checkpoint_from_a_damaged_one(tmp_path, tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    folder = save_checkpoint(tmp_path / "ck", model, tokenizer, {"step": 1})
    assert verify(folder) is None and verify(folder, resumable=True) == "holds no training state"
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    assert verify(folder).startswith("config.json has")
    folder = save_checkpoint(tmp_path / "ck2", model, tokenizer, {"step": 1})
    (folder / "lora_sweep.json").unlink()
    assert "never finished" in verify(folder)
    folder = save_checkpoint(tmp_path / "ck3", model, tokenizer, {"step": 1})
    (folder / "model.safetensors").unlink()
    assert verify(folder) == "model.safetensors is missing"
    assert verify(tmp_path / "nothing") == "missing"


SAVER = """
import sys, torch
from pathlib import Path
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from lora_sweep.checkpoint import save_checkpoint
from lora_sweep.train import build_optimizer

model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], num_labels=2)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
optimizer = torch.optim.AdamW(model.parameters())
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
out = Path(sys.argv[2])
for step in range(1, 100000):
    save_checkpoint(out / "last", model, tokenizer, {"step": step}, optimizer=optimizer, scheduler=scheduler,
                    trainer_state={"step": step}, keep_previous=out / "previous")
    if step == 1:  # from here on a checkpoint was complete once: every kill must leave a resume point
        print("saving", flush=True)
"""


@pytest.mark.slow
def test_sigkill_while_saving_never_leaves_a_checkpoint_that_looks_valid_and_is_not(tmp_path, tiny_bert_dir):
    """Kill a process that does nothing but save checkpoints, at seeded random moments: each time, the
    resume point is an intact checkpoint (no half-written folder passes for a good one)."""
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    rng = random.Random(7)
    for attempt in range(5):
        out = tmp_path / f"attempt{attempt}"
        process = subprocess.Popen(
            [sys.executable, str(script), str(tiny_bert_dir), str(out)], stdout=subprocess.PIPE, text=True
        )
        assert process.stdout.readline().strip() == "saving"
        time.sleep(rng.uniform(0.05, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        point = resume_point(out)
        assert point is not None and verify(point, resumable=True) is None, attempt
        step = json.loads((point / "trainer_state.json").read_text())["step"]
        assert (
            json.loads((point / "lora_sweep.json").read_text())["step"] == step
        )  # one save's files, not two mixed
        assert torch.load(point / "optimizer.pt", weights_only=True)["param_groups"]


def test_finished_run_keeps_only_best_and_last_without_resume_state(compose, tiny_overrides):
    record = run(compose(*tiny_overrides, "tracking=none", "method=full", "train.lr=1e-3"))
    checkpoints = Path(record.output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "last"]
    assert not any((checkpoints / "last" / name).exists() for name in RESUME_FILES)
    assert verify(checkpoints / "best") is None and verify(checkpoints / "last") is None
    on_disk = sum(f.stat().st_size for f in (checkpoints / "last").iterdir())
    assert (
        abs(record.checkpoints["size_bytes"]["last"] - on_disk) < 1024
    )  # the record counted what stays (the manifest shrank)


def test_rerun_of_a_finished_run_does_nothing_and_another_config_is_refused(
    compose, tiny_overrides, tmp_path, capsys
):
    from lora_sweep.errors import ConfigError

    cfg = compose(*tiny_overrides, "tracking=none", "train.epochs=1")
    first = run(cfg)
    before = (Path(first.output_dir) / "record.json").read_text()
    again = run(cfg)
    assert again.metrics == first.metrics and (Path(first.output_dir) / "record.json").read_text() == before
    with pytest.raises(ConfigError, match=r"output_dir=.*holds a run of another config \(differs in train\)"):
        run(compose(*tiny_overrides, "tracking=none", "train.epochs=1", "train.lr=1e-4"))
    assert (Path(first.output_dir) / "record.json").read_text() == before  # nothing overwritten


@pytest.mark.slow
def test_sweep_killed_at_random_moments_ends_as_if_never_killed(tmp_path, tiny):
    """SIGKILL the whole sweep four times at seeded random moments (the first anywhere, from imports on;
    the others while a trial trains), rerun the same command each time, then let it finish."""
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState
    from transformers import DataCollatorWithPadding

    from lora_sweep.data import make_loader
    from lora_sweep.evaluation import evaluate
    from lora_sweep.report.checkpoints import load_trained
    from tests.helpers import load, parents, run_sweep, sweep_command, write_sweep

    n_trials = 4
    write_sweep(
        tmp_path,
        "chaos",
        {
            "n_trials": n_trials,
            "sampler": {"name": "random", "seed": 0},
            "pruner": {"name": "median", "n_startup_trials": 1},
            "keep_checkpoints": 1,
            "params": {"method.r": "choice(2, 4, 8)", "train.lr": "tag(log, interval(1e-3, 1e-2))"},
        },
    )
    extra = ["train.epochs=4"]  # trials of ~84 steps: long enough to be caught mid-run
    command = sweep_command(tmp_path, "chaos", tiny, *extra)
    journal = tmp_path / "outputs" / "sweeps" / "chaos" / "optuna.journal"
    rng = random.Random(20261124)
    for attempt in range(4):
        process = subprocess.Popen(
            command,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if attempt == 0:
            time.sleep(rng.uniform(2, 15))
        else:
            deadline = time.time() + 300
            while time.time() < deadline and process.poll() is None:
                try:
                    running = (
                        [
                            t
                            for t in load(tmp_path, "chaos").get_trials(states=(TrialState.RUNNING,))
                            if t.user_attrs.get("worker", {}).get("pid") == process.pid
                        ]
                        if journal.exists()
                        else []
                    )
                except KeyError:
                    running = []
                if running:
                    break
                time.sleep(0.2)
            time.sleep(rng.uniform(0, 3))
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    run_sweep(tmp_path, "chaos", tiny, *extra)

    trials = load(tmp_path, "chaos").get_trials()
    assert [t.number for t in trials] == list(range(n_trials))  # no extra trial, no duplicate number
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), [t.state for t in trials]
    assert any(t.user_attrs.get("interruptions") for t in trials)  # a kill did land mid-trial

    mlflow = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = parents(tmp_path, "chaos")
    assert parent.info.status == "FINISHED"
    children = mlflow.search_runs(["1"], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == list(
        range(n_trials)
    )  # one run per trial
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert not mlflow.search_runs(["1"], filter_string="attributes.status = 'RUNNING'")  # no orphans

    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    record = read_record(best.user_attrs["output_dir"])
    assert verify(Path(record["checkpoints"]["best"])) is None
    cfg, prepared, model = load_trained(record)
    loader = make_loader(
        prepared.data.splits["validation"], DataCollatorWithPadding(prepared.tokenizer), 32, shuffle=False
    )
    metrics = evaluate(model, loader, torch.device("cpu"), "fp32", len(prepared.data.label_names))
    assert metrics["accuracy"] == pytest.approx(
        record["metrics"]["objective"], abs=1e-6
    )  # the checkpoint is the one recorded
    for (
        trial
    ) in trials:  # keep_checkpoints=1: only the best (which is also the report's pick here, or kept as such)
        kept = (Path(trial.user_attrs["output_dir"]) / "checkpoints").is_dir()
        assert kept == ("deleted" not in read_record(trial.user_attrs["output_dir"])["checkpoints"]), (
            trial.number
        )
    assert (Path(best.user_attrs["output_dir"]) / "checkpoints").is_dir()
