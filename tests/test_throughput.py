"""benchmarks/throughput.py's workers, in-process on the tiny BERT: the three loops train on the very same
batches and the timed window covers the steps asked (a smoke test that the benchmark still runs against
the public run path it drives; it measures nothing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_loop_times_the_same_steps_on_the_same_batches(throughput, tiny_overrides, tmp_path):
    warmup, steps = 1, 2
    overrides = [o for o in tiny_overrides if not o.startswith(("train.epochs", "train.eval_every"))] + [
        "tracking=none",
        f"train.max_steps={warmup + steps}",
        "train.eval_every=0",
        f"train.log_every={warmup + steps}",
        "train.device=cpu",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    results = {}
    for side in "abc":
        workdir = tmp_path / side
        workdir.mkdir()
        spec = {
            "overrides": overrides,
            "warmup": warmup,
            "steps": steps,
            "side": side,
            "workdir": str(workdir),
        }
        results[throughput.SIDES[side]] = throughput.worker(spec)
    for result in results.values():
        assert result["optimizer_steps"] == warmup + steps
        assert result["seconds"] > 0 and result["tokens_per_s"] > 0
        assert 0 < result["trainable"] < result["parameters"]
    # each worker checked its loop trained on the batches it drew; all drew the same ones
    assert len({r["tokens"] for r in results.values()}) == 1
    assert len({r["positions"] for r in results.values()}) == 1
    assert len({(r["parameters"], r["trainable"]) for r in results.values()}) == 1
    # and trained them alike: train.gradient_checkpointing=auto resolved once, the same dtypes
    assert {r["gradient_checkpointing"] for r in results.values()} == {False}
    assert len({tuple(r["dtypes"]) for r in results.values()}) == 1


def test_a_loop_that_trains_on_other_batches_is_caught(throughput):
    import torch

    window = throughput.Window(
        torch.device("cpu"), 1, 1, [{"input_ids": torch.ones(2, 3, dtype=torch.long)}] * 2
    )
    try:
        model = torch.nn.Linear(3, 3)
        window.watch(model)
        model.forward = lambda input_ids: input_ids  # the hook sees keyword inputs, as the loops pass them
        for _ in range(2):
            model(input_ids=torch.zeros(2, 4, dtype=torch.long))
            window._after_step(None, (), {})
        with pytest.raises(RuntimeError, match="not the ones the others got"):
            window.result()
    finally:
        window.handle.remove()
