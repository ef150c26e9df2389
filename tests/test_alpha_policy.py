"""hydra.sweeper.alpha policies: ``ratio`` (alpha = ratio * r), ``free`` (sampled on its own) and ``fixed``
(one constant, or a categorical of constants, whatever rank is sampled)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import FixedTrial, TrialState

from lora_sweep.errors import ConfigError
from lora_sweep.sweep.space import SearchSpace

from .helpers import load, write_sweep


def test_fixed_alpha_is_a_categorical_of_constants_that_clears_the_ratio():
    space = SearchSpace({"method.r": "choice(4, 8, 64)"}, alpha={"fixed": [16, 32]})
    assert space.names == ["method.r", "method.alpha"]
    assert space.params[-1].distribution == CategoricalDistribution([16.0, 32.0])
    for r in (4, 8, 64):
        values = space.sample(FixedTrial({"method.r": r, "method.alpha": 32.0}), {})
        assert space.overrides(values) == [f"method.r={r}", "method.alpha=32.0", "method.alpha_ratio=null"]
    one = SearchSpace({"method.r": "choice(4, 8)"}, alpha={"fixed": 32})
    assert one.params[-1].distribution == CategoricalDistribution([32.0])
    assert one.grid("hydra.sweeper.params") == {"method.r": [4, 8], "method.alpha": [32.0]}
    one.check_enqueued({"method.r": 4, "method.alpha": 32}, "hydra.sweeper.enqueue[0]")
    with pytest.raises(
        ConfigError, match=r"^hydra.sweeper.enqueue\[0\].method.alpha_ratio=2: not a searched"
    ):
        one.check_enqueued({"method.alpha_ratio": 2}, "hydra.sweeper.enqueue[0]")
    with pytest.raises(
        ConfigError, match=r"^hydra.sweeper.enqueue\[0\].method.alpha=16: outside the searched"
    ):
        one.check_enqueued({"method.alpha": 16}, "hydra.sweeper.enqueue[0]")
    # ratio and free are as they were
    tied = SearchSpace({"method.r": "choice(4, 8)"}, alpha={"ratio": [1, 2]})
    assert tied.overrides({"method.r": 8, "method.alpha_ratio": 2.0}) == [
        "method.r=8",
        "method.alpha_ratio=2.0",
        "method.alpha=null",
    ]


def test_a_sweep_with_fixed_alpha_trains_every_sampled_rank_with_the_same_alpha(tmp_path, sweep_in_process):
    write_sweep(
        tmp_path,
        "fixed",
        {
            "n_trials": 2,
            "sampler": {"name": "grid", "seed": 0},  # every rank once
            "pruner": {"name": "none"},
            "params": {"method.r": "choice(2, 8)"},
            "alpha": {"fixed": 16},
        },
    )
    sweep_in_process("fixed", "train.max_steps=2", "train.eval_every=2", "train.epochs=1")
    trials = load(tmp_path, "fixed").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    seen = {}
    for trial in trials:
        method = json.loads(Path(trial.user_attrs["record"]).read_text())["config"]["method"]
        adapter = json.loads((Path(trial.user_attrs["checkpoint"]) / "adapter_config.json").read_text())
        assert (method["alpha"], method["alpha_ratio"]) == (16.0, None)
        seen[method["r"]] = (adapter["r"], adapter["lora_alpha"])  # what PEFT built
    assert seen == {2: (2, 16.0), 8: (8, 16.0)}


ERRORS = {
    "fixed and ratio": (
        {"fixed": 32, "ratio": [1, 2]},
        "error: hydra.sweeper.alpha.ratio=[1, 2]: alpha.fixed is set: one alpha policy per study",
    ),
    "fixed and free": (
        {"fixed": 32, "free": "tag(log, interval(4, 64))"},
        "error: hydra.sweeper.alpha.free='tag(log, interval(4, 64))': alpha.fixed is set: one alpha policy",
    ),
    "fixed <= 0": (
        {"fixed": [16, 0]},
        "error: hydra.sweeper.alpha.fixed=[16, 0]: must be a number > 0 or a list of numbers > 0",
    ),
    "not a policy": (
        {"fixd": 32},
        "error: hydra.sweeper.alpha.fixd=32: not an alpha policy (one of ratio, free, fixed)",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_alpha_policies_are_one_line_before_anything_is_created(tmp_path, sweep_in_process, capsys, case):
    alpha, expected = ERRORS[case]
    write_sweep(tmp_path, "badalpha", {"n_trials": 1, "params": {"method.r": "choice(2, 4)"}, "alpha": alpha})
    with pytest.raises(SystemExit) as exited:
        sweep_in_process("badalpha", "train.max_steps=2")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exited.value.code == 2 and len(lines) == 1 and lines[0].startswith(expected), lines
    assert not (tmp_path / "outputs" / "sweeps" / "badalpha" / "optuna.journal").exists()
    assert not (tmp_path / "mlflow.db").exists()
