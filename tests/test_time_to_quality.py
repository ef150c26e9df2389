"""benchmarks/time_to_quality.py: its analysis on results with known answers (which result reached what,
when, after how many steps), its reading of real records and a real Optuna journal (--reuse), its bad
options, and one tiny grid + sweep through the real commands (slow)."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import write_sweep

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ttq():
    spec = importlib.util.spec_from_file_location(
        "time_to_quality", REPO / "benchmarks" / "time_to_quality.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def result(ttq, side, name, role, method, metric, pct, steps, ended, state="complete", started=None):
    return ttq.Result(side, name, role, method, state, metric, pct, steps, started, ended)


def sides(ttq):
    """Grid: full FT 0.84 at 100 s, LoRA 0.80 (0.3%) at 150 s, LoRA 0.815 (2.9%) at 250 s.
    Sweep: baseline 0.845 at 60 s; a pruned LoRA 0.90 at 80 s (pruned: not a result); LoRA 0.812 (1.5%) at
    120 s; LoRA 0.84 (5%: over the cap) at 150 s; LoRA 0.835 (1.9%) at 200 s; a replicate 0.90 at 300 s."""
    grid = ttq.Side(
        [
            result(ttq, "grid", "full", "grid", "full", 0.84, 100.0, 50, 100.0),
            result(ttq, "grid", "lora-small", "grid", "lora", 0.80, 0.3, 40, 150.0),
            result(ttq, "grid", "lora-big", "grid", "lora", 0.815, 2.9, 40, 250.0),
        ],
        260.0,
    )
    sweep = ttq.Side(
        [
            result(ttq, "sweep", "baseline #0", "baseline", "full", 0.845, 100.0, 30, 60.0, started=1.0),
            result(ttq, "sweep", "search #0", "search", "lora", 0.90, 1.0, 10, 80.0, state="pruned"),
            result(ttq, "sweep", "search #1", "search", "lora", 0.812, 1.5, 20, 120.0),
            result(ttq, "sweep", "search #2", "search", "lora", 0.84, 5.0, 20, 150.0),
            result(ttq, "sweep", "search #3", "search", "lora", 0.835, 1.9, 20, 200.0),
            result(ttq, "sweep", "replicate #0", "replicate", "lora", 0.90, 1.5, 20, 300.0, started=210.0),
            result(ttq, "sweep", "replicate #1", "replicate", "full", 0.85, 100.0, 30, 390.0, started=300.0),
        ],
        400.0,
    )
    return grid, sweep


def test_each_side_reaches_each_goal_at_the_first_qualifying_result(ttq):
    grid, sweep = sides(ttq)
    figures = ttq.analyse(grid, sweep, max_trainable_pct=2.0)

    assert figures["thresholds"]["a"] == pytest.approx(0.81)  # grid's best LoRA 0.815 - 0.5 point
    assert figures["thresholds"]["b"] == pytest.approx(0.83)  # grid's best full FT 0.84 - 1 point
    assert figures["grid"]["best_lora"]["name"] == "lora-big"  # the grid's own runs count as measured
    assert figures["grid"]["best_full"]["name"] == "full"
    # the grid reaches (a) with its last run: every run's steps by then; (b) never (no LoRA >= 0.83)
    assert figures["grid"]["reached"]["a"] == {
        "seconds": 250.0,
        "steps": 130,
        "by": "lora-big",
        "metric": 0.815,
    }
    assert figures["grid"]["reached"]["b"] is None
    assert figures["grid"]["reached_under_cap"]["a"] is None  # its 2.9% run is over the sweep's cap
    # the sweep: the pruned 0.90 and the 5% 0.84 never count; steps include the baseline and pruned trial
    assert figures["sweep"]["reached"]["a"] == {
        "seconds": 120.0,
        "steps": 60,
        "by": "search #1",
        "metric": 0.812,
    }
    assert figures["sweep"]["reached"]["b"] == {
        "seconds": 200.0,
        "steps": 100,
        "by": "search #3",
        "metric": 0.835,
    }
    assert figures["sweep"]["best_lora"]["name"] == "search #3"  # the 0.90 replicate is not a search result
    assert figures["sweep"]["steps"] == 100 and figures["sweep"]["replicate_steps"] == 50
    assert figures["sweep"]["search_seconds"] == 200.0
    assert figures["sweep"]["replicates_seconds"] == 180.0  # 210 s .. 390 s
    assert figures["grid"]["steps"] == 130

    ratios = figures["ratios"]
    assert ratios["wall"] == pytest.approx(400 / 260)
    assert ratios["search_wall"] == pytest.approx(200 / 260)
    assert ratios["steps"] == pytest.approx(100 / 130)
    assert ratios["a_seconds"] == pytest.approx(120 / 250)
    assert ratios["a_steps"] == pytest.approx(60 / 130)
    assert ratios["b_seconds"] is None and ratios["b_steps"] is None
    goals = figures["goals"]
    assert goals["a_steps_share_of_grid"] == pytest.approx(60 / 130)
    assert goals["reaches_grid_best_lora_within_steps_goal"] is False  # 46% > 25%
    assert goals["beats_grid_best_lora"] is True  # 0.835 > 0.815


def test_the_cap_and_the_steps_goal_decide(ttq):
    grid, sweep = sides(ttq)
    # no cap: the 5% trial counts; 0.84 at 150 s is then the first to reach (b)
    uncapped = ttq.analyse(grid, sweep, max_trainable_pct=None)
    assert uncapped["sweep"]["reached"]["b"]["by"] == "search #2"
    # a cap below every LoRA trial: the sweep has no LoRA result, so it cannot beat the grid
    tight = ttq.analyse(grid, sweep, max_trainable_pct=1.0)
    assert tight["sweep"]["reached"]["a"] is None and tight["sweep"]["best_lora"] is None
    assert tight["goals"] == {
        "a_steps_share_of_grid": None,
        "reaches_grid_best_lora_within_steps_goal": False,
        "steps_goal": 0.25,
        "beats_grid_best_lora": False,
    }
    # a grid four times as costly: (a) at 60 steps is within 25% of its 520
    for r in grid.results:
        r.steps *= 4
    assert ttq.analyse(grid, sweep)["goals"]["reaches_grid_best_lora_within_steps_goal"] is True


def test_a_lower_is_better_objective_turns_the_thresholds(ttq):
    grid = ttq.Side([result(ttq, "grid", "lora", "grid", "lora", 0.40, 1.0, 10, 10.0)], 10.0)
    sweep = ttq.Side(
        [
            result(ttq, "sweep", "search #0", "search", "lora", 0.406, 1.0, 5, 5.0),  # 0.6 point worse
            result(ttq, "sweep", "search #1", "search", "lora", 0.404, 1.0, 5, 8.0),
        ],
        9.0,
    )
    figures = ttq.analyse(grid, sweep, direction="minimize")
    assert figures["thresholds"]["a"] == pytest.approx(0.405)
    assert figures["sweep"]["reached"]["a"]["by"] == "search #1"
    assert figures["goals"]["beats_grid_best_lora"] is False  # 0.404 is not below 0.40


def test_the_grid_runs_compose_to_their_rows(ttq, tmp_path):
    from hydra import compose, initialize_config_dir

    from lora_sweep import cli

    # one run of each shape (full 1 and 2 epochs, LoRA q/v, LoRA all-linear): a compose costs ~0.5 s
    shapes = ("full-lr2e-5", "full-lr1e-4-2ep", "lora-r8-qv-lr5e-4", "lora-r16-all-lr2e-3")
    cli.register_resolvers()
    rows = {}
    with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
        for run in (run for run in ttq.GRID if run.name in shapes):
            overrides = [*run.overrides, *ttq.SEED, f"output_dir={tmp_path / run.name}"]
            cfg = cli.to_run_config(compose(config_name="config", overrides=overrides))
            m = cfg.method
            rows[run.name] = (m.name, cfg.train.lr, cfg.train.epochs, cfg.train.max_steps, cfg.train.seed)
            if m.name == "lora":
                rows[run.name] += (m.r, m.effective_alpha, m.targets, m.variant)
    assert rows == {
        "full-lr2e-5": ("full", 2e-5, 1, None, 0),
        "full-lr1e-4-2ep": ("full", 1e-4, 2, None, 0),
        "lora-r8-qv-lr5e-4": ("lora", 5e-4, 1, None, 0, 8, 16, "attention_qv", "lora"),
        "lora-r16-all-lr2e-3": ("lora", 2e-3, 1, None, 0, 16, 32, "all_linear", "lora"),
    }
    # the shared README's 8 rows without the r64 one: 1,888 s of training, 4 full FT and 4 LoRA runs
    assert sum(run.reference_seconds for run in ttq.GRID) == 1888
    assert [run.overrides[0] for run in ttq.GRID] == ["method=full"] * 4 + ["method=lora"] * 4


def record(folder: Path, method: str, metric: float, ratio: float, steps: int, **sweep) -> Path:
    """A record.json with the fields a run writes that the benchmark reads."""
    folder.mkdir(parents=True)
    config = {
        "method": {"name": method, "r": 8, "alpha": 16, "targets": "all_linear", "variant": "lora"},
        "train": {"lr": 1e-3, "epochs": 1, "max_steps": None},
        "objective": {"metric": "accuracy"},
        "sweep": sweep,
    }
    body = {
        "output_dir": str(folder),
        "config": config,
        "status": "completed",
        "params": {"trainable_ratio": ratio},
        "metrics": {"objective": metric, "objective_metric": "accuracy", "steps": steps},
        "started_at": 0.0,
        "finished_at": 1.0,
    }
    (folder / "record.json").write_text(json.dumps(body))
    return folder


def fake_workdir(tmp_path: Path) -> Path:
    """A workdir as a finished benchmark leaves it: two grid runs, and a sweep's three studies in a real
    journal (trial times set), with records; the sweep started 1000 s after the grid."""
    import optuna

    work = tmp_path / "work"
    t0 = 1_800_000_000.0
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its handler may hold an earlier test's stderr
    try:
        _fill(work, t0)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return work


def _fill(work: Path, t0: float) -> None:
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import FrozenTrial, TrialState

    runs = work / "grid" / "runs"
    record(runs / "full-lr1e-4", "full", 0.84, 1.0, 100)
    record(runs / "lora-r8-qv-lr2e-3", "lora", 0.81, 0.0033, 80)
    sweep_dir = work / "sweep" / "outputs" / "sweeps" / "s"
    journal = sweep_dir / "optuna.journal"
    sweep_dir.mkdir(parents=True)
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    spec = f"journal:{journal}"
    s0 = t0 + 1000

    def at(seconds: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(s0 + seconds)

    trials = {
        "s-baseline": [("baseline-000", "full", 0.85, 1.0, 50, 2, 40, TrialState.COMPLETE)],
        "s-rung0": [("rung0-000", "lora", 0.80, 0.015, 6, 40, 55, TrialState.COMPLETE)],  # a budget ladder's
        "s": [
            ("search-000", "lora", 0.79, 0.01, 20, 40, 60, TrialState.PRUNED),
            ("search-001", "lora", 0.806, 0.015, 25, 60, 90, TrialState.COMPLETE),  # (a): >= 0.805
            ("search-002", "lora", 0.835, 0.019, 25, 90, 130, TrialState.COMPLETE),  # (b): >= 0.83
        ],
        "s-replicates": [("replicate-000", "lora", 0.9, 0.015, 25, 140, 170, TrialState.COMPLETE)],
    }
    for name, rows in trials.items():
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
        for number, (folder, method, value, ratio, steps, start, end, state) in enumerate(rows):
            out = record(sweep_dir / folder, method, value, ratio, steps, study_name=name, storage=spec)
            study.add_trial(
                FrozenTrial(
                    number=number,
                    state=state,
                    value=value if state == TrialState.COMPLETE else None,
                    datetime_start=at(start),
                    datetime_complete=at(end),
                    params={"train.lr": 1e-3},
                    distributions={"train.lr": FloatDistribution(1e-4, 1e-2, log=True)},
                    user_attrs={"output_dir": str(out)},
                    system_attrs={},
                    intermediate_values={},
                    trial_id=number,
                )
            )
    timings = {
        "grid": {
            "started": t0,
            "ended": t0 + 500,
            "seconds": 500.0,
            "runs": [
                {"name": "full-lr1e-4", "started": t0, "ended": t0 + 300, "exit": 0},
                {"name": "lora-r8-qv-lr2e-3", "started": t0 + 300, "ended": t0 + 500, "exit": 0},
            ],
        },
        "sweep": {"started": s0, "ended": s0 + 200, "seconds": 200.0, "exit": 0},
    }
    (work / "timings.json").write_text(json.dumps(timings))


def test_reuse_reads_the_records_and_the_studies(ttq, tmp_path, capsys):
    work = fake_workdir(tmp_path)
    out = tmp_path / "ttq.json"
    assert ttq.main(["--reuse", str(work), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["sweep_name"] == "s" and figures["direction"] == "maximize"
    assert figures["grid"]["wall_seconds"] == 500.0 and figures["grid"]["steps"] == 180
    assert figures["grid"]["reached"]["a"] == {
        "seconds": 500.0,
        "steps": 180,
        "by": "lora-r8-qv-lr2e-3",
        "metric": 0.81,
    }
    sweep = figures["sweep"]
    assert [r["name"] for r in sweep["results"]] == [
        "baseline #0",
        "rung0 #0",
        "search #0",
        "search #1",
        "search #2",
        "replicate #0",
    ]
    # the pruned trial's 20 steps count, and so do the rung's 6
    assert sweep["steps"] == 126 and sweep["replicate_steps"] == 25
    assert sweep["reached"]["a"] == {"seconds": 90.0, "steps": 101, "by": "search #1", "metric": 0.806}
    assert sweep["reached"]["b"] == {"seconds": 130.0, "steps": 126, "by": "search #2", "metric": 0.835}
    assert sweep["search_seconds"] == 130.0 and sweep["replicates_seconds"] == 30.0
    assert figures["ratios"]["a_seconds"] == pytest.approx(90 / 500)
    assert figures["goals"]["a_steps_share_of_grid"] == pytest.approx(101 / 180)
    assert figures["goals"]["beats_grid_best_lora"] is True
    printed = capsys.readouterr().out
    assert "goal: the sweep beats the grid's best LoRA: yes" in printed
    assert "sweep: 90 s, 101 steps (search #1, 0.8060)" in printed
    # one side only
    assert ttq.main(["--reuse", str(work), "--only", "grid", "--json", str(out)]) == 0
    assert "sweep" not in json.loads(out.read_text())


def test_bad_options_are_one_line_and_change_nothing(ttq, tmp_path, capsys):
    work = fake_workdir(tmp_path)
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    cases = {
        ("--only", "both", "--workdir", str(tmp_path / "new")): "error: --only=both: must be grid or sweep",
        ("--grid", "full-lr1e-4,nope", "--workdir", str(tmp_path / "new")): "error: --grid=full-lr1e-4,nope: "
        "no such grid run (runs: full-lr2e-5, ",
        ("--reuse", str(tmp_path / "missing")): f"error: --reuse={tmp_path / 'missing'}: no such folder",
        ("--reuse", str(tmp_path)): f"error: --reuse={tmp_path}: holds no grid or sweep outputs",
        ("--workdir", str(work), "--only", "grid"): f"error: --workdir={work}: grid/ already holds a run",
        (
            "--max-trainable-pct",
            "0",
            "--reuse",
            str(work),
        ): "error: --max-trainable-pct=0.0: must be in (0, 100]",
        (
            "--data",
            str(tmp_path / "none.csv"),
        ): f"error: --data={tmp_path / 'none.csv'}: no such file or folder",
    }
    for argv, message in cases.items():
        assert ttq.main(list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "new").exists()
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_tiny_grid_and_sweep_back_to_back(tmp_path, tiny_bert_dir, tiny_csv, ttq):
    write_sweep(
        tmp_path,
        "ttq_tiny",
        {
            "n_trials": 2,
            "sampler": {"name": "random", "seed": 0},
            "params": {"method.r": "choice(2, 4)", "train.lr": "tag(log, interval(1e-3, 1e-2))"},
            "baseline": {"n_trials": 1, "params": {"train.lr": "tag(log, interval(1e-4, 1e-3))"}},
        },
    )
    work, out = tmp_path / "work", tmp_path / "ttq.json"
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "time_to_quality.py"),
        "--tiny",
        f"--model-path={tiny_bert_dir}",
        f"--data={tiny_csv}",
        "--grid=full-lr1e-4,lora-r8-qv-lr2e-3",
        "--sweep=ttq_tiny",
        "--set=tracking=none",  # MLflow has its own tests: here it would only add start-up time
        f"--workdir={work}",
        f"--json={out}",
        "--",
        f"hydra.searchpath=[file://{tmp_path / 'extra_conf'}]",
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    grid, sweep = figures["grid"], figures["sweep"]
    # 336 training rows at batch 16: 21 optimizer steps per epoch, one epoch each
    assert [(r["name"], r["state"], r["steps"]) for r in grid["results"]] == [
        ("full-lr1e-4", "complete", 21),
        ("lora-r8-qv-lr2e-3", "complete", 21),
    ]
    assert grid["best_lora"]["config"].startswith("lora r8 a16 attention_qv lr 0.002")
    assert [r["name"] for r in sweep["results"]] == ["baseline #0", "search #0", "search #1"]
    assert sweep["steps"] == sum(r["steps"] for r in sweep["results"]) > 0
    assert 0 < grid["wall_seconds"] and 0 < sweep["search_seconds"] <= sweep["wall_seconds"]
    assert "goal: the sweep beats the grid's best LoRA" in done.stdout
    assert figures["max_trainable_pct"] == 100.0  # --tiny: tiny models' adapters train far more than 2%
    # the analysis again from the folder (the cap --tiny chose stays with it): the same figures
    again = tmp_path / "again.json"
    assert ttq.main(["--reuse", str(work), "--json", str(again)]) == 0
    second = json.loads(again.read_text())
    assert {k: v for k, v in second.items() if k != "at"} == {k: v for k, v in figures.items() if k != "at"}
