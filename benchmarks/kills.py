"""Kill one sweep again and again, then let it finish, and print what a kill cost.

    python benchmarks/kills.py                       # sweeps=quick, the real offline default (slow: ~1 h)
    python benchmarks/kills.py --tiny --kills 3      # a tiny BERT and csv built here: a few minutes
    python benchmarks/kills.py --kills 20 --seed 1 train.epochs=2

Each attempt starts the same ``python -m lora_sweep --multirun ...`` command in its own process group and,
after a random delay (seeded by ``--seed``), SIGKILLs the whole group, as the OOM killer or a pulled plug
would. After ``--kills`` kills the command runs to its end. Then the figures: MLflow parent runs of the
study (1 expected), runs still RUNNING (0), finished trials per study against its budget, configurations
sampled twice, checkpoints whose ``lora_sweep.json`` checksums or PEFT loading fail, stale temp folders
(``.*.tmp<pid>``) left in the sweep folder, and the time of each attempt. They are also written to
``<workdir>/kills.json``. Run it from anywhere; it works in ``--workdir`` (default: a new temp folder).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEMP_FOLDER = re.compile(r"^\..*\.tmp\d+$")
TINY_STUDY = "tiny_kills"
REPLICATE_KEYS = ("replicate_of", "source_study", "source_trial")


def build_tiny(root: Path) -> list[str]:
    """A tiny random BERT (hidden size 32), a learnable sentiment csv and a small sweep file, as the test
    suite builds them; returns the overrides that point a sweep at them."""
    import importlib.util

    import yaml

    spec = importlib.util.spec_from_file_location(
        "lora_sweep_bench_tiny", Path(__file__).with_name("tiny.py")
    )
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)  # the benchmarks' shared tiny model and data (benchmarks/tiny.py)
    model = tiny.build_tiny_model(root / "tiny_bert")
    data = tiny.build_tiny_data(root / "reviews.csv")
    sweeps = root / "extra_conf" / "sweeps"
    sweeps.mkdir(parents=True, exist_ok=True)
    sweeper = {
        "study_name": TINY_STUDY,
        "n_trials": 3,
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2},
        "pruner": {"name": "median", "n_startup_trials": 1},
        "params": {"method.r": "choice(2, 4, 8, 16)", "train.lr": "tag(log, interval(1e-3, 1e-2))"},
        "baseline": {"n_trials": 1, "params": {"train.lr": "tag(log, interval(1e-4, 1e-3))"}},
        "report": {"enabled": False},  # its replicates would double the trainings
    }
    body = {
        "defaults": [{"override /hydra/sweeper": "lora_optuna"}],
        "hydra": {"sweep": {"dir": "outputs/sweeps/${hydra.sweeper.study_name}"}, "sweeper": sweeper},
    }
    (sweeps / f"{TINY_STUDY}.yaml").write_text(
        "# @package _global_\n" + yaml.safe_dump(body, sort_keys=False)
    )
    return [
        f"sweeps={TINY_STUDY}",
        f"hydra.searchpath=[file://{root / 'extra_conf'}]",
        "model=local",
        f"model.name_or_path={model}",
        "data=local",
        f"data.path={data}",
        f"data.cache_dir={root / 'cache'}",
        "train.batch_size=16",
        "train.eval_batch_size=32",
        "train.epochs=2",
        "train.eval_every=7",
        "train.log_every=2",
        "train.max_length=16",
        "tracking.system_metrics=false",
        # every block's linear layers but the pooler: what the test suite's tiny sweeps learn with
        "method.targets=[query,key,value,attention.output.dense,intermediate.dense,output.dense]",
    ]


def attempt(command: list[str], cwd: Path, env: dict, delay: float | None, log) -> dict:
    """One run of the command; SIGKILL its process group after ``delay`` seconds (None: let it end)."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        process.wait(timeout=delay)
        killed = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        killed = True
    return {
        "delay_s": delay,
        "killed": killed,
        "exit": process.returncode,
        "seconds": time.monotonic() - started,
    }


def sweep_settings(sweep_file: Path, overrides: list[str]) -> dict:
    """The sweeper's settings as the sweep file writes them, with the command line's ``hydra.sweeper.*``
    overrides applied (``hydra.sweeper.report.replicates=1`` changes the replicates' budget)."""
    import yaml

    settings = yaml.safe_load(sweep_file.read_text())["hydra"]["sweeper"]
    for override in overrides:
        key, _, value = override.lstrip("+").partition("=")
        if not key.startswith("hydra.sweeper."):
            continue
        *parents, leaf = key[len("hydra.sweeper.") :].split(".")
        node = settings
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return settings


def study_figures(sweep_dir: Path, settings: dict) -> dict:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    storage_url = settings.get("storage")
    if storage_url:
        storage = storage_url[len("journal:") :] if storage_url.startswith("journal:") else storage_url
    else:
        storage = str(sweep_dir / "optuna.journal")
    if "://" in storage:
        store = storage
    else:
        store = optuna.storages.JournalStorage(JournalFileBackend(storage))
    name = settings["study_name"]
    report = settings.get("report") or {}
    budgets = {
        name: settings.get("n_trials"),
        f"{name}-baseline": (settings.get("baseline") or {}).get("n_trials"),
    }
    if report.get("enabled", True) and (report.get("replicates", 3) or 0) > 0 and budgets[f"{name}-baseline"]:
        budgets[f"{name}-replicates"] = 2 * report.get("replicates", 3)
    figures = {}
    for summary in optuna.get_all_study_summaries(store):
        study = optuna.load_study(study_name=summary.study_name, storage=store)
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
        # a replicate's configuration is its source trial's and its seed (its params hold only the seed)
        configs = [
            tuple(sorted((k, repr(v)) for k, v in t.params.items()))
            + tuple(repr(t.user_attrs.get(k)) for k in REPLICATE_KEYS if k in t.user_attrs)
            for t in trials
            if t.params
        ]
        figures[summary.study_name] = {
            "n_trials": budgets.get(summary.study_name),
            "finished": len(finished),
            "states": {s: sum(t.state.name == s for t in trials) for s in {t.state.name for t in trials}},
            "duplicate_configurations": len(configs) - len(set(configs)),
            "interrupted_trials": sum(bool(t.user_attrs.get("interruptions")) for t in trials),
        }
    return figures


def mlflow_figures(cwd: Path, study: str, tracking_uri: str | None) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri or f"sqlite:///{cwd / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(
        experiments, f"tags.`lora_sweep.sweep` = '{study}' and tags.`lora_sweep.role` = 'sweep'"
    )
    running = client.search_runs(experiments, "attributes.status = 'RUNNING'")
    return {
        "parent_runs": len(parents),
        "running_runs": len(running),
        "parent_status": [p.info.status for p in parents],
    }


def checkpoint_figures(sweep_dir: Path) -> dict:
    """Every checkpoint of every trial verified against its lora_sweep.json; each trial's best loaded."""
    from lora_sweep.checkpoint import verify
    from lora_sweep.record import read_record
    from lora_sweep.report.checkpoints import load_trained

    checked, unloadable = 0, []
    for meta in sorted(sweep_dir.glob("*/checkpoints/*/lora_sweep.json")):
        if meta.parent.name.startswith("."):  # a save cut short: a stale temp folder, counted as such
            continue
        checked += 1
        problem = verify(meta.parent)
        if problem:
            unloadable.append(f"{meta.parent.relative_to(sweep_dir)}: {problem}")
    loaded = 0
    for record_file in sorted(sweep_dir.glob("*/record.json")):
        record = read_record(record_file)
        if record.get("status") != "completed" or not (record.get("checkpoints") or {}).get("best"):
            continue
        try:
            load_trained(record)  # the adapter through PEFT (or the full model), safetensors only
            loaded += 1
        except Exception as err:  # noqa: BLE001 - every failure is a figure
            unloadable.append(f"{record_file.parent.name}/best: {type(err).__name__}: {err}")
    return {
        "checkpoints_verified": checked,
        "best_checkpoints_loaded": loaded,
        "unloadable_checkpoints": unloadable,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sweep", default="quick", help="the named sweep (sweeps/<name>.yaml); default quick"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny BERT and csv built here, a 3+1 trial sweep"
    )
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill delays")
    parser.add_argument("--max-delay", type=float, default=None, help="seconds (default: 40 tiny, 300 quick)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temp folder")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the sweep")
    args = parser.parse_args(argv)

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="lora_sweep-kills-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lora_sweep", "--multirun"]
    command += build_tiny(workdir) if args.tiny else [f"sweeps={args.sweep}"]
    command += args.overrides
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    max_delay = args.max_delay or (40.0 if args.tiny else 300.0)
    rng = random.Random(args.seed)
    print(f"workdir {workdir}\ncommand {' '.join(command)}", flush=True)

    attempts = []
    with (workdir / "kills.log").open("a") as log:
        for number in range(args.kills):
            # the first kill may land anywhere (imports, setup); the later ones anywhere in a resumed sweep
            result = attempt(command, workdir, env, rng.uniform(1.0, max_delay), log)
            attempts.append(result)
            print(
                f"attempt {number + 1}: {'killed' if result['killed'] else 'ended'} "
                f"after {result['seconds']:.1f} s"
            )
        final = attempt(command, workdir, env, None, log)
    print(f"final run: exit {final['exit']} after {final['seconds']:.1f} s", flush=True)

    if final["exit"] != 0:
        print(f"the final run failed (see {workdir / 'kills.log'})", file=sys.stderr)
        return 1
    folder = workdir / "extra_conf" / "sweeps" if args.tiny else REPO / "sweeps"
    settings = sweep_settings(folder / f"{TINY_STUDY if args.tiny else args.sweep}.yaml", args.overrides)
    sweep_dir = workdir / "outputs" / "sweeps" / settings["study_name"]  # the sweep files' hydra.sweep.dir
    tracking_uri = next(
        (o.split("=", 1)[1] for o in args.overrides if o.startswith("tracking.tracking_uri=")), None
    )
    studies = study_figures(sweep_dir, settings)
    figures = {
        "kills": sum(a["killed"] for a in attempts),
        "attempts": attempts,
        "final_run_seconds": final["seconds"],
        **mlflow_figures(workdir, settings["study_name"], tracking_uri),
        "studies": studies,
        "duplicate_configurations": sum(s["duplicate_configurations"] for s in studies.values()),
        **checkpoint_figures(sweep_dir),
        "stale_temp_folders": sorted(
            str(p.relative_to(sweep_dir)) for p in sweep_dir.rglob(".*") if TEMP_FOLDER.match(p.name)
        ),
    }
    (workdir / "kills.json").write_text(json.dumps(figures, indent=2))
    killed = [a["seconds"] for a in attempts if a["killed"]]
    print(f"kills: {figures['kills']} of {len(attempts)} attempts (the others ended before their delay)")
    if killed:
        print(
            f"time per killed attempt: {sum(killed) / len(killed):.1f} s mean, "
            f"final run {final['seconds']:.1f} s"
        )
    print(f"parent runs: {figures['parent_runs']} ({', '.join(figures['parent_status'])})")
    print(f"runs RUNNING at the end: {figures['running_runs']}")
    for name, study in studies.items():
        print(
            f"study {name}: {study['finished']} finished of {study['n_trials']}, states {study['states']}, "
            f"{study['interrupted_trials']} resumed after a kill, "
            f"{study['duplicate_configurations']} duplicate configurations"
        )
    print(
        f"checkpoints: {figures['checkpoints_verified']} verified, {figures['best_checkpoints_loaded']} best "
        f"loaded, unloadable: {figures['unloadable_checkpoints'] or 'none'}"
    )
    print(f"stale temp folders: {len(figures['stale_temp_folders'])} {figures['stale_temp_folders'] or ''}")
    print(f"figures: {workdir / 'kills.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
