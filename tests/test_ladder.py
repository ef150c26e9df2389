"""The budget ladder (``hydra.sweeper.ladder``): cheap rungs, each a study of its own, whose best trials are
promoted to the next rung and then to the full-budget search; a real sweep on the tiny model, in-process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from optuna.trial import TrialState

from lora_sweep.ranking import rank_key
from lora_sweep.sweep import ladder

from .helpers import Killed, children, load, mlflow_snapshot, parents, records, write_sweep

# 64 training rows at batch 16, 2 epochs: a full trial trains S = 8 optimizer steps; the rungs 2 and 4
TRAIN_ROWS, BATCH, EPOCHS = 64, 16, 2
FULL_STEPS = EPOCHS * math.ceil(TRAIN_ROWS / BATCH)
LADDER = {"fractions": [0.25, 0.5], "keep": 0.5}
SWEEP = {
    "n_trials": 1,
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "params": {"method.r": "choice(2, 4, 8)", "train.lr": "tag(log, interval(1e-4, 3e-1))"},
    "enqueue": [{"method.r": 4, "train.lr": 1e-2}],
}
ON = "hydra.sweeper.ladder={fractions:[0.25,0.5],keep:0.5}"  # the ladder, from the command line
# only the end of each trial is evaluated; the validation loss ranks (lower is better, and it has no ties)
SMALL = (
    "objective.metric=loss",
    f"data.max_train_samples={TRAIN_ROWS}",
    "data.max_eval_samples=48",
    f"train.batch_size={BATCH}",
    f"train.epochs={EPOCHS}",
    "train.eval_every=0",
    "tracking.log_checkpoints=false",
)
STUDIES = ("climb-rung0", "climb-rung1", "climb")


def steps_of(trial) -> int:
    return json.loads(Path(trial.user_attrs["record"]).read_text())["metrics"]["steps"]


def top(trials, n: int) -> list[int]:
    """What the ladder must promote: the n best complete trials (the lowest loss), the earlier on ties."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return [t.number for t in sorted(complete, key=lambda t: (rank_key(t.value, "minimize"), t.number))[:n]]


def test_a_two_rung_ladder_promotes_each_rungs_best_and_resumes_without_promoting_twice(
    tmp_path, sweep_in_process, monkeypatch, capsys
):
    write_sweep(tmp_path, "climb", SWEEP)
    # killed as the first promotion (rung 0 -> rung 1) has enqueued one of its trials
    real, enqueued = ladder.enqueue, []

    def enqueue_then_die(study, params, attrs):
        real(study, params, attrs)
        enqueued.append(attrs["promoted_from"])
        raise Killed("killed between two promotions' enqueues")

    monkeypatch.setattr(ladder, "enqueue", enqueue_then_die)
    with pytest.raises(Killed):
        sweep_in_process("climb", *SMALL, ON)
    monkeypatch.setattr(ladder, "enqueue", real)
    rung0 = load(tmp_path, "climb-rung0", "climb").get_trials()
    assert [t.state for t in rung0] == [TrialState.COMPLETE] * 4  # ceil(1 / 0.5^2) trials at 1/4
    first_choice = load(tmp_path, "climb-rung1", "climb").user_attrs[ladder.PROMOTED]["trials"]
    assert enqueued == first_choice[:1] and len(first_choice) == 2

    sweep_in_process("climb", *SMALL, ON)  # the rerun finishes the promotion the kill cut short
    out = capsys.readouterr().out
    studies = {name: load(tmp_path, name, "climb") for name in STUDIES}
    rung0, rung1, main = (studies[name].get_trials() for name in STUDIES)
    assert [len(rung0), len(rung1), len(main)] == [4, 2, 1]
    assert all(t.state == TrialState.COMPLETE for t in rung0 + rung1 + main)
    assert rung0[0].params == {"method.r": 4, "train.lr": 1e-2}  # the sweep's enqueued entry runs in rung 0
    # each rung trial trains its own round(fraction * S) steps, each main trial the full S
    for trials, fraction in ((rung0, 0.25), (rung1, 0.5), (main, 1.0)):
        steps = round(fraction * FULL_STEPS)
        assert [steps_of(t) for t in trials] == [steps] * len(trials)
        assert {(t.user_attrs["ladder_fraction"], t.user_attrs["ladder_steps"]) for t in trials} == {
            (fraction, steps)
        }
    # promoted: exactly the best half of the rung before, once each, with its params, recorded in the study
    for source, target, name in ((rung0, rung1, "climb-rung1"), (rung1, main, "climb")):
        chosen = top(source, len(target))
        assert studies[name].user_attrs[ladder.PROMOTED]["trials"] == chosen
        assert sorted(t.user_attrs["promoted_from"] for t in target) == sorted(chosen)
        for trial in target:
            assert trial.params == source[trial.user_attrs["promoted_from"]].params
    assert first_choice == top(rung0, 2)  # the choice the killed run recorded is the one that ran

    (parent,) = parents(tmp_path, "climb")
    roles = sorted(r.data.tags["lora_sweep.role"] for r in children(tmp_path, parent.info.run_id))
    assert roles == ["rung0"] * 4 + ["rung1"] * 2 + ["search"]
    folders = sorted(p.name for p in (tmp_path / "outputs" / "sweeps" / "climb").glob("*-0*"))
    assert folders == [*(f"rung0-00{i}" for i in range(4)), "rung1-000", "rung1-001", "search-000"]
    summary = json.loads((tmp_path / "outputs" / "sweeps" / "climb" / "sweep_summary.json").read_text())
    assert [(r["trials"], r["steps"], r["promoted"]) for r in summary["ladder"]] == [(4, 2, 2), (2, 4, 1)]
    assert (
        "rung0 (climb-rung0): 4 trials of 2 steps (0.25 of 8), 4 complete, 2 promoted to climb-rung1" in out
    )

    # the same command once more: nothing trains, nothing is promoted again, every study as it was
    before = {name: optuna_snapshot_of(tmp_path, name) for name in STUDIES}
    runs, disk = mlflow_snapshot(tmp_path), records(tmp_path)
    sweep_in_process("climb", *SMALL, ON)
    assert {name: optuna_snapshot_of(tmp_path, name) for name in STUDIES} == before
    assert records(tmp_path) == disk
    assert {k: v["tags"].get("lora_sweep.role") for k, v in mlflow_snapshot(tmp_path).items()} == {
        k: v["tags"].get("lora_sweep.role") for k, v in runs.items()
    }
    # a bad ladder on the finished sweep: one line, and every study, run and record as it was
    runs = mlflow_snapshot(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        sweep_in_process("climb", *SMALL, "hydra.sweeper.ladder={fractions:[0.05,0.5]}")
    assert stopped.value.code == 2
    assert (
        "error: hydra.sweeper.ladder.fractions[0]=0.05: a rung trial would train" in capsys.readouterr().err
    )
    assert {name: optuna_snapshot_of(tmp_path, name) for name in STUDIES} == before
    assert (mlflow_snapshot(tmp_path), records(tmp_path)) == (runs, disk)


def optuna_snapshot_of(root: Path, study: str) -> dict:
    """``optuna_snapshot`` of a study kept in the ``climb`` sweep's journal."""
    trials = load(root, study, "climb").get_trials()
    return {t.number: (t.state, t.values, t.params, t.user_attrs) for t in trials}


BAD = [
    ({"ladder": {"fractions": []}}, "hydra.sweeper.ladder.fractions=[]: must list at least one fraction"),
    ({"ladder": {"fractions": [0.5, 0.25]}}, "hydra.sweeper.ladder.fractions=[0.5, 0.25]: must be strictly"),
    ({"ladder": {"fractions": [0.25, 1.0]}}, "hydra.sweeper.ladder.fractions[1]=1.0: must be in (0, 1)"),
    ({"ladder": {"keep": 1.0}}, "hydra.sweeper.ladder.keep=1.0: must be in (0, 1)"),
    ({"ladder": {}, "sampler": {"name": "grid"}}, "hydra.sweeper.sampler.name='grid': a grid trains every"),
    (  # S = 8 steps: 0.05 of it rounds to 0
        {"ladder": {"fractions": [0.05, 0.5]}},
        "hydra.sweeper.ladder.fractions[0]=0.05: a rung trial would train round(0.05 x 8) = 0 ",
    ),
    (  # 0.2 and 0.25 of 8 steps are both 2
        {"ladder": {"fractions": [0.2, 0.25]}},
        "hydra.sweeper.ladder.fractions[1]=0.25: 2 steps, as many as the rung before it",
    ),
    (  # 0.95 of 8 steps rounds to 8
        {"ladder": {"fractions": [0.25, 0.95]}},
        "hydra.sweeper.ladder.fractions[1]=0.95: round(0.95 x 8) = 8 steps: no cheaper than a full trial",
    ),
    ({"ladder": True}, "hydra.sweeper.ladder=True: expected a mapping of LadderConf fields"),
    (
        {"ladder": {}, "params": {"train.batch_size": "choice(8, 16)"}},
        "hydra.sweeper.params.train.batch_size='choice(8, 16)': sets a trial's budget",
    ),
]


@pytest.mark.parametrize("sweeper, line", BAD, ids=[line.split(":")[0] for _, line in BAD])
def test_a_bad_ladder_is_one_line_and_exit_2_before_anything_is_made(
    tmp_path, sweep_in_process, capsys, sweeper, line
):
    write_sweep(tmp_path, "bad", {**SWEEP, "ladder": LADDER, **sweeper})
    with pytest.raises(SystemExit) as stopped:
        sweep_in_process("bad", *SMALL)
    errors = [e for e in capsys.readouterr().err.splitlines() if e.startswith(("error:", "Traceback"))]
    assert stopped.value.code == 2 and len(errors) == 1 and errors[0].startswith(f"error: {line}"), errors
    assert not (tmp_path / "outputs" / "sweeps" / "bad").exists() or not any(
        (tmp_path / "outputs" / "sweeps" / "bad").iterdir()
    )  # no journal, no trial folder
    assert not (tmp_path / "mlflow.db").exists()


def test_rung_sizes_keep_the_share_of_the_rung_before():
    assert ladder.sizes(2, 0.5, 2) == [
        8,
        4,
    ]  # the README's example: 8 at 1/4, 4 at 1/2, then 2 at full budget
    assert ladder.sizes(40, 1 / 3, 2) == [360, 120]  # 40 / (1/3)^2 is 360.00000000000006 in floats
    assert ladder.sizes(2, 0.3, 2) == [23, 7]


def test_the_best_complete_trials_promote_by_the_first_objective_pruned_and_failed_never():
    import optuna

    study = optuna.create_study(directions=["minimize", "minimize"])
    for loss, size in ((0.4, 9), (0.2, 1), (0.3, 5), (0.2, 0)):  # 1 and 3 tie on the loss: the earlier first
        study.add_trial(optuna.trial.create_trial(values=[loss, size]))
    for state in (TrialState.PRUNED, TrialState.FAIL):  # no value to rank by, whatever the pruner saw
        study.add_trial(optuna.trial.create_trial(state=state, intermediate_values={1: 0.01}))
    assert ladder.best(study, 3) == [1, 3, 2]
    assert ladder.best(study, 9) == [1, 3, 2, 0]
    higher = optuna.create_study(direction="maximize")
    for accuracy in (0.5, 0.9, 0.7):
        higher.add_trial(optuna.trial.create_trial(value=accuracy))
    assert ladder.best(higher, 2) == [1, 2]
