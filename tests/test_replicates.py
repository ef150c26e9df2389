"""Replicates are the sweep's last phase (the ``<study>-replicates`` study); the report only reads them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.helpers import client as mlflow_client
from tests.helpers import load as load_study
from tests.helpers import run_sweep, write_sweep

# what a replicate may change in its source trial's config; everything else is launched exactly as the trial
# was
VARIES = {"output_dir", "sweep", "evaluate_test"}


@pytest.fixture(scope="module")
def replicated(tmp_path_factory, tiny_bert_dir, tiny_csv):
    root = tmp_path_factory.mktemp("replicates")
    tiny = [
        "model=local",
        f"model.name_or_path={tiny_bert_dir}",
        "data=local",
        f"data.path={tiny_csv}",
        "train.batch_size=16",
        "train.eval_batch_size=32",
        "train.max_length=16",
        "tracking.system_metrics=false",
        "train.epochs=1",
        "train.eval_every=7",
        "method.targets=all_linear",
        "method.dropout=0.05",
    ]
    write_sweep(
        root,
        "twice",
        {
            "n_trials": 2,
            "sampler": {"name": "random", "seed": 0},
            "pruner": {"name": "none"},
            "params": {"method.r": "choice(1, 4)", "train.lr": "tag(log, interval(2e-3, 1e-2))"},
            "baseline": {"n_trials": 1, "params": {"train.lr": "tag(log, interval(1e-4, 1e-3))"}},
            "report": {"enabled": True, "checkpoints": False, "replicates": 2},
        },
    )
    result = run_sweep(root, "twice", tiny)
    return root, tiny, result


def _parent(root: Path):
    (parent,) = mlflow_client(root).search_runs(["1"], filter_string="tags.`lora_sweep.sweep` = 'twice'")
    return parent


def _replicate_runs(root: Path):
    parent = _parent(root)
    return mlflow_client(root).search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
        "and tags.`lora_sweep.role` = 'replicate'",
    )


@pytest.mark.slow  # a real sweep in a subprocess
def test_the_sweep_runs_the_replicates_as_trials_of_a_third_study(replicated):
    root, _, _ = replicated
    study = load_study(root, "twice-replicates", "twice")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert sorted((t.user_attrs["replicate_of"], t.user_attrs["seed"]) for t in trials) == [
        ("full", 1),
        ("full", 2),
        ("lora", 1),
        ("lora", 2),
    ]
    report = json.loads((root / "reports" / "twice" / "report.json").read_text())
    sources = {
        "lora": ("twice", report["chosen"]["trial"]),
        "full": ("twice-baseline", report["replicates"]["trials"]["full"]),
    }
    for trial in trials:
        attrs = trial.user_attrs
        assert (attrs["source_study"], attrs["source_trial"]) == sources[attrs["replicate_of"]]
        assert trial.params == {"train.seed": attrs["seed"]}
        folder = Path(attrs["output_dir"])
        assert (
            folder.name == f"replicate-{trial.number:03d}"
            and (folder / ".hydra" / "overrides.yaml").is_file()
        )
        record = json.loads((folder / "record.json").read_text())
        assert record["status"] == "completed" and record["config"]["train"]["seed"] == attrs["seed"]
        assert (
            record["config"]["evaluate_test"] is True
            and f"test_{record['metrics']['objective_metric']}" in record["metrics"]
        )
        # the source trial's config exactly, with only the seed changed
        source = load_study(root, attrs["source_study"], "twice").trials[attrs["source_trial"]]
        original = json.loads(Path(source.user_attrs["record"]).read_text())["config"]
        mine = {k: v for k, v in record["config"].items() if k not in VARIES}
        theirs = {k: v for k, v in original.items() if k not in VARIES}
        theirs["train"] = {**theirs["train"], "seed": attrs["seed"]}
        assert mine == theirs
        assert record["config"]["sweep"]["role"] == "replicate"


@pytest.mark.slow  # a real sweep in a subprocess
def test_replicates_are_mlflow_children_of_the_sweeps_parent(replicated):
    root, _, _ = replicated
    runs = _replicate_runs(root)
    assert sorted((r.data.tags["lora_sweep.replicate_of"], r.data.tags["lora_sweep.seed"]) for r in runs) == [
        ("full", "1"),
        ("full", "2"),
        ("lora", "1"),
        ("lora", "2"),
    ]
    for run in runs:
        assert (
            run.data.params["train.seed"] == run.data.tags["lora_sweep.seed"]
            and run.info.status == "FINISHED"
        )


@pytest.mark.slow  # a real sweep in a subprocess
def test_the_report_on_demand_trains_nothing_and_reproduces_the_replicate_summary(replicated, tmp_path):
    root, _, _ = replicated
    script = (
        "import json, sys\n"
        "from lora_sweep.report.__main__ import main\n"
        f"code = main(['twice', '--out', {str(tmp_path)!r}, '--no-register', '--tracking-uri', "
        f"'sqlite:///{root / 'mlflow.db'}'])\n"
        "print(json.dumps({'code': code, 'modules': sorted(sys.modules)}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads(result.stdout.strip().splitlines()[-1])
    assert state["code"] == 0
    assert not {"lora_sweep.train", "lora_sweep.run", "lora_sweep.sweep.runner"} & set(state["modules"])
    mine = json.loads((tmp_path / "twice" / "report.json").read_text())["replicates"]
    sweeps = json.loads((root / "reports" / "twice" / "report.json").read_text())["replicates"]
    assert mine == sweeps and mine["seeds"] == [1, 2]
    records = {
        (t.user_attrs["replicate_of"], t.user_attrs["seed"]): json.loads(
            Path(t.user_attrs["record"]).read_text()
        )
        for t in load_study(root, "twice-replicates", "twice").get_trials()
    }
    metric = mine["metric"]
    for label in ("lora", "full"):
        assert mine["test"][label]["values"] == [
            records[(label, s)]["metrics"][f"test_{metric}"] for s in (1, 2)
        ]
        assert mine["validation"][label]["values"] == [
            records[(label, s)]["metrics"][f"best_val_{metric}"] for s in (1, 2)
        ]
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_sweep.report",
            "twice",
            "--out",
            str(tmp_path / "one"),
            "--no-register",
            "--replicates",
            "1",
            "--tracking-uri",
            f"sqlite:///{root / 'mlflow.db'}",
        ],
        check=False,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert json.loads((tmp_path / "one" / "twice" / "report.json").read_text())["replicates"]["seeds"] == [1]


@pytest.mark.slow  # a real sweep in a subprocess
def test_rerunning_the_sweep_reuses_finished_replicates(replicated):
    root, tiny, _ = replicated
    before = {r.info.run_id for r in _replicate_runs(root)}
    run_sweep(root, "twice", tiny)
    assert len(load_study(root, "twice-replicates", "twice").get_trials()) == 4
    assert {r.info.run_id for r in _replicate_runs(root)} == before


def test_the_report_says_plainly_when_there_are_no_replicates():
    from lora_sweep.report.render import checkpoint_lines
    from lora_sweep.report.replicates import summarize_replicates

    note = summarize_replicates(None, 0, 0)
    assert note == "no replicates: run the sweep with hydra.sweeper.report.replicates=N"
    assert note in "\n".join(checkpoint_lines({"metric": "accuracy", "replicates_note": note}))
