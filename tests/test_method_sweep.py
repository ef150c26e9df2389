"""One study searches the PEFT method itself, each method's own settings sampled only where it applies."""

from __future__ import annotations

import json

import pytest
from optuna.trial import TrialState

from lora_sweep.record import read_record
from tests.helpers import children, load, parents, run_sweep, write_fourierft, write_sweep


@pytest.mark.slow
def test_a_sweep_over_methods_compares_them_with_full_fine_tuning(tmp_path, tiny):
    write_sweep(
        tmp_path,
        "method_choice",
        {
            "n_trials": 4,
            "sampler": {"name": "random", "seed": 0},
            "pruner": {"name": "none"},
            "params": {
                "method": "choice(lora, loha, ia3, fourierft)",
                "method.r": "choice(2, 4)",
                "train.lr": "tag(log, interval(1e-3, 1e-2))",
            },
            "alpha": {"ratio": [2]},
            "conditions": {
                "method.r": {"method": ["lora", "loha"]},
                "method.alpha_ratio": {"method": ["lora", "loha"]},
            },
            "enqueue": [
                {"method": "lora", "method.r": 4, "train.lr": 5e-3},
                {"method": "loha", "method.r": 2, "train.lr": 5e-3},
                {"method": "ia3", "train.lr": 1e-2},
                {"method": "fourierft", "train.lr": 5e-3},
            ],
            "baseline": {
                "n_trials": 1,
                "overrides": ["method=full"],
                "params": {"train.lr": "tag(log, interval(5e-5, 2e-4))"},
                "enqueue": [{"train.lr": 1e-4}],
            },
            "report": {
                "enabled": True,
                "replicates": 0,
                "checkpoints": True,
                "dir": str(tmp_path / "reports"),
            },
        },
    )
    write_fourierft(tmp_path / "extra_conf")  # a method of the user's own, next to the sweep file
    run_sweep(tmp_path, "method_choice", tiny, "train.epochs=1")
    trials = load(tmp_path, "method_choice").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert [t.params["method"] for t in trials] == ["lora", "loha", "ia3", "fourierft"]
    assert (
        "method.r" not in trials[2].params and "method.alpha_ratio" not in trials[2].params
    )  # IA3 has no rank
    for trial in trials:
        record = read_record(trial.user_attrs["record"])
        assert record["config"]["method"]["name"] == trial.params["method"]
        assert record["config"]["method"]["r"] == trial.params.get("method.r")
    trainable = [read_record(t.user_attrs["record"])["params"]["trainable_params"] for t in trials]
    assert trainable[2] < min(trainable[:2])  # IA3's vectors are the smallest adapter
    (parent,) = parents(tmp_path, "method_choice")
    assert len(children(tmp_path, parent.info.run_id)) == 5  # four methods and the full fine-tuning baseline
    report = json.loads((tmp_path / "reports" / "method_choice" / "report.json").read_text())
    methods = {row["method"] for row in report["trials"]}
    assert methods == {"lora", "loha", "ia3", "fourierft", "full"}
    assert all(row["mergeable"] is True for row in report["trials"] if row["method"] != "full")
    assert report["export"]["logits_agree"] is True
