"""Bad input: one clear line, the right exit code or trial state, and nothing recorded before it is lost.

Cases already proved elsewhere are not repeated here (the README's "Bad input: what you see" table names
the test of every case): config ranges in tests/test_config.py, search ranges, samplers and pruners in
tests/test_sweep.py. This module covers what needs a run, a sweep, or an existing store: diverging loss,
out of memory, an unwritable MLflow store, data problems found before a sweep trains, and that studies,
MLflow runs and records made before a bad input are intact after it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState

from lora_sweep.errors import ConfigError
from lora_sweep.oom import OutOfMemory
from lora_sweep.record import read_record
from lora_sweep.run import prepare, run
from tests.helpers import raise_from_forward

from .helpers import (
    client,
    load,
    mlflow_snapshot,
    optuna_snapshot,
    records,
    run_sweep,
    sentiment_rows,
    sweep_command,
    write_csv,
    write_sweep,
)

DIVERGING_LR = (
    "1e6"  # AdamW moves every adapter weight by ~lr per step: the tiny model's loss is NaN within 6 steps
)


# --- snapshots of everything a bad input must not touch ------------------------------------------------


def error_lines(stderr: str) -> list[str]:
    """The lines meant for the user (progress bars also write to stderr)."""
    return [line for line in stderr.splitlines() if line.startswith("error:") or line.startswith("Traceback")]


# --- one run -------------------------------------------------------------------------------------------


def single(root: Path, tiny_overrides: list[str], name: str, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "lora_sweep",
        *tiny_overrides,
        f"data.cache_dir={root / 'cache'}",
        "train.epochs=1",
        f"hydra.run.dir=outputs/{name}",
        *overrides,
    ]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_single_run_bad_inputs_leave_the_existing_store_intact(tmp_path, tiny_overrides):
    """An existing ./mlflow.db with a finished run, then bad commands: exit 2 with one line each, the old run
    and record unchanged, and no run or record left RUNNING by a command that stopped half way."""
    good = single(tmp_path, tiny_overrides, "good")
    assert good.returncode == 0, good.stderr[-3000:]
    before, before_records = mlflow_snapshot(tmp_path), records(tmp_path)
    assert [r["status"] for r in before.values()] == ["FINISHED"]

    (tmp_path / "afile").write_text("a file where the store's folder should be")
    bad = {
        "rank": (["method.r=0"], "error: method.r=0: must be a positive integer"),
        "data": (["data.path=missing.csv"], "error: data.path='missing.csv': no such file or folder"),
        "diverged": (
            [f"train.lr={DIVERGING_LR}"],
            "error: train.lr=1e+06: training diverged, loss is nan at step",
        ),
        "store": (
            [f"tracking.tracking_uri=sqlite:///{tmp_path}/afile/mlflow.db"],
            f"error: tracking.tracking_uri='sqlite:///{tmp_path}/afile/mlflow.db': MLflow cannot use this "
            "store:",
        ),
    }
    for name, (overrides, expected) in bad.items():
        result = single(tmp_path, tiny_overrides, name, *overrides)
        assert result.returncode == 2, (name, result.stderr[-3000:])
        lines = error_lines(result.stderr)
        assert len(lines) == 1 and lines[0].startswith(expected), (name, result.stderr[-3000:])

    after = mlflow_snapshot(tmp_path)
    assert {k: after[k] for k in before} == before  # the old run, value for value
    new = [r for k, r in after.items() if k not in before]
    assert [r["status"] for r in new] == [
        "FAILED"
    ]  # only the diverged run reached MLflow, and it ended FAILED
    assert (
        new[0]["tags"]["lora_sweep.status"] == "failed"
        and "training diverged" in new[0]["tags"]["lora_sweep.error"]
    )
    assert {k: v for k, v in records(tmp_path).items() if k in before_records} == before_records
    statuses = {Path(k).parent.name: json.loads(v)["status"] for k, v in records(tmp_path).items()}
    assert statuses == {
        "good": "completed",
        "diverged": "failed",
        "store": "failed",
    }  # nothing left "running"


# --- a sweep ---------------------------------------------------------------------------------------------

SWEEP = {
    "n_trials": 2,
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "params": {"method.r": "choice(2, 4)", "train.lr": "tag(log, interval(1e-3, 1e-2))"},
    "enqueue": [{"method.r": 4, "train.lr": 5e-3}],
}


@pytest.fixture
def swept(tmp_path, tiny):
    """A finished two-trial sweep on a journal storage and an MLflow sqlite store."""
    write_sweep(tmp_path, "intact", SWEEP)
    run_sweep(tmp_path, "intact", tiny, "train.epochs=1")
    return tmp_path


@pytest.mark.slow
def test_bad_search_range_on_rerun_changes_nothing(swept, tiny):
    root = swept
    before = optuna_snapshot(root, "intact"), mlflow_snapshot(root), records(root)
    assert [s[0] for s in before[0].values()] == [TrialState.COMPLETE] * 2
    write_sweep(
        root, "intact", {**SWEEP, "params": {**SWEEP["params"], "train.lr": "tag(log, interval(1e-2, 1e-4))"}}
    )  # edited by hand
    result = run_sweep(root, "intact", tiny, "train.epochs=1", "hydra.sweeper.n_trials=3", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: hydra.sweeper.params.train.lr='tag(log, interval(1e-2, 1e-4))': low 0.01 > high 0.0001"
    )
    assert (
        optuna_snapshot(root, "intact"),
        mlflow_snapshot(root),
        records(root),
    ) == before  # parent run included


@pytest.mark.slow
def test_trial_with_a_diverging_value_fails_and_the_sweep_goes_on(swept, tiny):
    """A trial whose learning rate makes the loss NaN ends FAILED in Optuna and MLflow with a one-line reason;
    the next trial runs; the earlier trials, their MLflow runs and records are intact."""
    root = swept
    trials, runs, disk = optuna_snapshot(root, "intact"), mlflow_snapshot(root), records(root)
    (parent_id,) = [k for k, r in runs.items() if r["tags"].get("lora_sweep.role") == "sweep"]
    # what a user does to try one more value by hand: enqueue it in the study
    load(root, "intact").enqueue_trial({"method.r": 2, "train.lr": float(DIVERGING_LR)})
    result = run_sweep(root, "intact", tiny, "train.epochs=1", "hydra.sweeper.n_trials=3")
    assert "the sweep goes on" in result.stdout + result.stderr

    after = load(root, "intact").get_trials()
    assert [t.state for t in after] == [
        TrialState.COMPLETE,
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
    ]
    bad = after[2]
    assert bad.params["train.lr"] == float(DIVERGING_LR)
    assert bad.user_attrs["fail_reason"].startswith(
        "TrainingDiverged: train.lr=1e+06: training diverged, loss is nan at step"
    )
    bad_run = client(root).get_run(bad.user_attrs["mlflow_run_id"])
    assert bad_run.info.status == "FAILED" and bad_run.data.tags["optuna.state"] == "failed"
    assert bad_run.data.tags["lora_sweep.error"] == bad.user_attrs["fail_reason"]
    assert read_record(bad.user_attrs["record"])["status"] == "failed"

    assert {n: s for n, s in optuna_snapshot(root, "intact").items() if n in trials} == trials
    now = mlflow_snapshot(root)
    assert {k: now[k] for k in runs if k != parent_id} == {k: v for k, v in runs.items() if k != parent_id}
    assert (
        now[parent_id]["params"] == runs[parent_id]["params"] and now[parent_id]["status"] == "FINISHED"
    )  # reopened, not duplicated
    assert {k: v for k, v in records(root).items() if k in disk} == disk


@pytest.mark.slow
def test_unwritable_mlflow_store_stops_the_sweep_before_any_trial(tmp_path, tiny):
    (tmp_path / "afile").write_text("not a folder")
    write_sweep(tmp_path, "store", {"n_trials": 2, "params": {"train.lr": "tag(log, interval(1e-3, 1e-2))"}})
    uri = f"sqlite:///{tmp_path}/afile/mlflow.db"
    result = run_sweep(tmp_path, "store", tiny, f"tracking.tracking_uri={uri}", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(
        f"error: tracking.tracking_uri='{uri}': MLflow cannot use this store:"
    ), result.stderr[-3000:]
    assert not list((tmp_path / "outputs").rglob("record.json"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.path={root}/missing.csv", "error: data.path='{root}/missing.csv': no such file or folder"),
        (
            "data.text_column=review",
            "error: data.text_column='review': no such column in the train split (columns: text, label)",
        ),
    ],
)
def test_bad_data_stops_the_sweep_before_any_trial(tmp_path, tiny, override, expected):
    """Data is the same for every trial: a sweep checks it once, before training, instead of failing every
    trial."""
    write_sweep(tmp_path, "data", {"n_trials": 2, "params": {"train.lr": "tag(log, interval(1e-3, 1e-2))"}})
    result = run_sweep(tmp_path, "data", tiny, override.format(root=tmp_path), check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == expected.format(root=tmp_path), result.stderr[-3000:]
    assert not list((tmp_path / "outputs").rglob("record.json"))


# --- out of memory ---------------------------------------------------------------------------------------

OOM_ERRORS = {
    "cuda": lambda: torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"
    ),
    "cpu": lambda: RuntimeError(
        "[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: not enough memory: "
        "you tried to allocate 1073741824 bytes."
    ),
}


@pytest.fixture
def out_of_memory(monkeypatch):
    """Raise an out-of-memory error from a forward pre-hook on the real (tiny) PEFT model, in training or in
    validation. A real OOM cannot be produced on a CPU-only test machine; this hook is the one simulation:
    the error surfaces exactly where the allocator would raise it, inside the model's forward pass."""

    def arm(kind: str, during: str):
        raise_from_forward(
            monkeypatch, OOM_ERRORS[kind], lambda module: module.training == (during == "training")
        )

    return arm


TRAINING_OOM = (
    r"^train.batch_size=16: out of memory on cpu, tried to allocate {size} \(train.max_length=16, precision "
    r"fp32, "
    r"method.r=8, train.grad_accum=1\); lower train.batch_size or train.max_length, or raise "
    r"train.grad_accum$"
)
VALIDATION_OOM = (
    r"^train.eval_batch_size=32: out of memory on cpu, tried to allocate {size} during validation "
    r"\(train.max_length=16, precision fp32, method.r=8\); lower train.eval_batch_size$"
)


@pytest.mark.slow  # two real runs per case; tests/test_oom.py covers the message in the fast tier
@pytest.mark.parametrize(
    ("kind", "during", "expected"),
    [
        ("cuda", "training", TRAINING_OOM),
        ("cpu", "training", TRAINING_OOM),
        ("cuda", "validation", VALIDATION_OOM),
    ],
)
def test_out_of_memory_fails_the_run_with_one_line_and_the_next_run_works(
    compose, tiny_overrides, tmp_path, out_of_memory, monkeypatch, kind, during, expected
):
    from mlflow.tracking import MlflowClient

    size = {"cuda": "2.00 GiB", "cpu": "1024.0 MiB"}[kind]
    out_of_memory(kind, during)
    cfg = compose(*tiny_overrides, "train.epochs=1", output_dir=tmp_path / "oom")
    with pytest.raises(OutOfMemory) as caught:
        run(cfg)
    message = str(caught.value)
    assert isinstance(caught.value, ConfigError) and "\n" not in message
    assert re.match(expected.format(size=size), message), message
    record = read_record(tmp_path / "oom")
    assert record["status"] == "failed" and record["error"] == f"OutOfMemory: {message}"
    mlflow_run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(
        record["mlflow"]["run_id"]
    )
    assert mlflow_run.info.status == "FAILED" and mlflow_run.data.tags["lora_sweep.error"] == record["error"]

    # memory back, hook gone: the next run in this process (the next trial) trains normally
    monkeypatch.undo()
    again = run(compose(*tiny_overrides, "train.epochs=1", output_dir=tmp_path / "next"))
    assert again.status == "completed" and again.params["setup_reused"] is True


@pytest.mark.slow
def test_out_of_memory_fails_one_trial_and_the_sweep_goes_on(tmp_path, tiny):
    """Trials sampling train.batch_size=24 run out of memory (simulated from a forward pre-hook in the sweep's
    own process, see the fixture above); they end FAILED with the one-line reason, the others complete."""
    write_sweep(
        tmp_path,
        "oom",
        {
            "n_trials": 2,
            "sampler": {"name": "random", "seed": 0},
            "pruner": {"name": "none"},
            "params": {"train.batch_size": "choice(16, 24)"},
            "enqueue": [{"train.batch_size": 16}, {"train.batch_size": 24}, {"train.batch_size": 16}],
        },
    )
    argv = sweep_command(tmp_path, "oom", tiny, "train.epochs=1")[3:]
    code = f"""
import sys, torch
import lora_sweep.run as run_module
real = run_module.apply_method
def apply_method(model, *args, **kwargs):
    model = real(model, *args, **kwargs)
    def hook(module, args, kwargs):
        if module.training and kwargs["input_ids"].shape[0] == 24:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. "
                                         "GPU 0 has a total capacity of 79.19 GiB")
    model.register_forward_pre_hook(hook, with_kwargs=True)
    return model
run_module.apply_method = apply_method
sys.argv = ["lora_sweep", *{argv!r}]
from lora_sweep.__main__ import main
main()
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = load(tmp_path, "oom").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    reason = trials[1].user_attrs["fail_reason"]
    assert reason.startswith(
        "OutOfMemory: train.batch_size=24: out of memory on cpu, tried to allocate 2.00 GiB"
    ), reason
    assert client(tmp_path).get_run(trials[1].user_attrs["mlflow_run_id"]).info.status == "FAILED"


# --- data the model cannot be taught --------------------------------------------------------------------


def test_label_that_only_an_evaluation_split_has(compose, tiny_overrides, tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    write_csv(folder / "train.csv", sentiment_rows(40))
    write_csv(folder / "validation.csv", sentiment_rows(10) + [("the movie was quite something", "neutral")])
    write_csv(folder / "test.csv", sentiment_rows(10, seed=1))
    cfg = compose(*tiny_overrides, f"data.path={folder}")
    with pytest.raises(
        ConfigError,
        match=r"^data.label_column='label': the validation split has label\(s\) neutral that the train "
        r"split never has \(train labels: negative, positive\)$",
    ):
        prepare(cfg)


# --- bad model folders, seeds, lengths and data files: one line each, nothing recorded (issue 12) -----------


@pytest.mark.slow
def test_bad_model_and_data_inputs_exit_2_with_one_line_before_anything_is_recorded(
    tmp_path, tiny_overrides, tiny_bert_dir
):
    """After a finished run: a corrupt config.json, a truncated safetensors file, a negative seed, a
    max_length past the model's position table, a non-UTF-8 csv. Each exits 2 with one line
    naming the key and the value, before any record or MLflow run; the earlier run is intact."""
    import shutil

    good = single(tmp_path, tiny_overrides, "good")
    assert good.returncode == 0, good.stderr[-3000:]
    before, before_records = mlflow_snapshot(tmp_path), records(tmp_path)

    corrupt = shutil.copytree(tiny_bert_dir, tmp_path / "corrupt_config")
    (corrupt / "config.json").write_text('{"model_type": "bert", "hidden_size": 32,,}')
    truncated = shutil.copytree(tiny_bert_dir, tmp_path / "truncated_weights")
    weights = truncated / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    latin1 = write_csv(tmp_path / "latin1.csv", sentiment_rows(60))
    latin1.write_bytes(latin1.read_bytes().replace(b"good", "g\u00e9od".encode("latin-1"), 1))
    bad = {
        "config": (
            [f"model.name_or_path={corrupt}"],
            f"error: model.name_or_path='{corrupt}': config.json is not valid JSON (line 1, column",
        ),
        "weights": (
            [f"model.name_or_path={truncated}"],
            f"error: model.name_or_path='{truncated}': model.safetensors is truncated: ",
        ),
        "seed": (["train.seed=-1"], "error: train.seed=-1: must be >= 0"),
        "length": (
            ["train.max_length=100"],
            "error: train.max_length=100: above the model's 64 positions (a learned position table, "
            "max_position_embeddings=64); set train.max_length=64 or less",
        ),
        "latin1": (
            [f"data.path={latin1}"],
            f"error: data.path='{latin1}': latin1.csv is not UTF-8 (byte 0xe9 at offset ",
        ),
    }
    for name, (overrides, expected) in bad.items():
        result = single(tmp_path, tiny_overrides, name, *overrides)
        assert result.returncode == 2, (name, result.stderr[-3000:])
        lines = error_lines(result.stderr)
        assert len(lines) == 1 and lines[0].startswith(expected), (name, result.stderr[-3000:])
    assert mlflow_snapshot(tmp_path) == before  # no new run, the old one value for value
    assert records(tmp_path) == before_records  # no record started by any of them


# --- bad sweeper settings and Hydra errors on the command line (issue 12) -------------------------------


def everything_on_disk(root: Path) -> dict[str, bytes]:
    """Every file under outputs/ (journal, records, checkpoints, summaries) and reports/, byte for byte."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for folder in ("outputs", "reports")
        for p in sorted((root / folder).rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_bad_sweeper_settings_and_hydra_errors_on_rerun_change_nothing(swept, tiny):
    """Against a finished sweep: each bad setting, search range or Hydra error is one line on stderr and exit
    code 2, before anything is created; the study, its MLflow runs (the parent included), the records and
    every file on disk are as they were, byte for byte."""
    root = swept
    (root / "afile").write_text("a file where a folder should be")
    before = optuna_snapshot(root, "intact"), mlflow_snapshot(root), records(root), everything_on_disk(root)
    assert [s[0] for s in before[0].values()] == [TrialState.COMPLETE] * 2
    report_on = "hydra.sweeper.report.enabled=true"
    cases = {
        "failure rate": (
            ["hydra.sweeper.max_failure_rate=-1"],
            "error: hydra.sweeper.max_failure_rate=-1.0: must be in [0, 1]",
        ),
        "no trials": (
            ["hydra.sweeper.n_trials=0"],
            "error: hydra.sweeper.n_trials=0: must be a positive integer",
        ),
        "baseline": (
            ["hydra.sweeper.baseline.n_trials=-1"],
            "error: hydra.sweeper.baseline.n_trials=-1: must be >= 0",
        ),
        "replicates": (
            [report_on, "hydra.sweeper.report.replicates=-1"],
            "error: hydra.sweeper.report.replicates=-1: must be >= 0",
        ),
        "tolerance": (
            ["hydra.sweeper.report.tolerance=-1"],
            "error: hydra.sweeper.report.tolerance=-1.0: must be >= 0",
        ),
        "keep": (
            ["hydra.sweeper.keep_checkpoints=0"],
            "error: hydra.sweeper.keep_checkpoints=0: must be >= 1",
        ),
        "report dir": (
            [report_on, "hydra.sweeper.report.dir=afile/reports"],
            "error: hydra.sweeper.report.dir='afile/reports': cannot write the report there: "
            f"{root / 'afile'} is a file, not a folder",
        ),
        "warmup": (
            ["hydra.sweeper.pruner.n_warmup_steps=-1"],
            "error: hydra.sweeper.pruner.n_warmup_steps=-1: must be >= 0",
        ),
        "seed": (
            ["hydra.sweeper.sampler.seed=-1"],
            "error: hydra.sweeper.sampler.seed=-1: must be in [0, 4294967295]",
        ),
        "journal": (
            [f"hydra.sweeper.storage=journal:{root}/afile/x.journal"],
            f"error: hydra.sweeper.storage='journal:{root}/afile/x.journal': cannot write the journal there",
        ),
        "sweep dir": (
            ["hydra.sweep.dir=afile/sweeps"],
            "error: hydra.sweep.dir='afile/sweeps': cannot make the sweep's folder: "
            f"{root / 'afile'} is a file",
        ),
        "typo": (["train.lrr=1"], "error: train.lrr=1: no such config key (did you mean train.lr?)"),
        "type": (["hydra.sweeper.n_trials=abc"], "error: hydra.sweeper.n_trials='abc': expected an integer"),
        "option": (["method=nope"], "error: method='nope': no such method option; options: adalora, full"),
    }
    for name, (overrides, expected) in cases.items():
        result = run_sweep(
            root, "intact", tiny, "train.epochs=1", "hydra.sweeper.n_trials=3", *overrides, check=False
        )
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), (
            name,
            result.stderr,
        )

    # a range whose high end no run accepts: the sweep file edited by hand
    write_sweep(
        root, "intact", {**SWEEP, "params": {**SWEEP["params"], "method.dropout": "interval(0.0, 1.5)"}}
    )
    result = run_sweep(root, "intact", tiny, "train.epochs=1", "hydra.sweeper.n_trials=3", check=False)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: hydra.sweeper.params.method.dropout='interval(0.0, 1.5)': its high end 1.5 fails the run "
        "config's check: method.dropout=1.5: must be in [0, 1)"
    ), result.stderr[-3000:]
    after = optuna_snapshot(root, "intact"), mlflow_snapshot(root), records(root), everything_on_disk(root)
    assert after == before


@pytest.mark.slow
def test_hydra_errors_of_a_single_run_are_one_line_and_create_nothing(tmp_path, tiny_overrides):
    cases = {
        "train.lrr=1": "error: train.lrr=1: no such config key (did you mean train.lr?)",
        "hydra.sweeper.n_trials=abc": "error: hydra.sweeper.n_trials='abc': no such config key (a setting of "
        "hydra/sweeper=lora_optuna",
        "method=nope": "error: method='nope': no such method option; options: adalora, full",
        "train.lr=[1": "error: train.lr='[1': not a valid override",
        "method.r=8,16": "error: method.r='8,16': a comma list or sweep runs several jobs: add --multirun",
    }
    for override, expected in cases.items():
        result = single(tmp_path, tiny_overrides, "bad", override)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output folder, no MLflow store, no cache
