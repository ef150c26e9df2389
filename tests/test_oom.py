"""Out of memory names the key that sized the failing batches: train.batch_size while training,
train.eval_batch_size inside an evaluation pass (validation, the test split) whichever task's evaluator ran.
The error is raised from a forward hook on the real model, as a real allocation failure would be."""

from __future__ import annotations

import re

import pytest
import torch

from lora_sweep.oom import OutOfMemory, during_evaluation, evaluation_pass, guard_memory
from lora_sweep.record import read_record
from lora_sweep.run import run
from tests.helpers import raise_from_forward

CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"


@pytest.fixture
def out_of_memory(monkeypatch):
    """arm(when): the model raises a CUDA out-of-memory error on a forward pass where ``when(module)``."""

    def arm(when):
        raise_from_forward(monkeypatch, lambda: torch.OutOfMemoryError(CUDA_OOM), when)

    return arm


def _causal(compose, tiny_causal, tmp_path, name):
    return compose(*tiny_causal, "train.epochs=1", "lm_eval.reference_texts=0", output_dir=tmp_path / name)


def test_out_of_memory_in_a_causal_lm_validation_pass_names_eval_batch_size(
    compose, tiny_causal, tmp_path, out_of_memory
):
    out_of_memory(lambda module: not module.training)
    with pytest.raises(OutOfMemory) as caught:
        run(_causal(compose, tiny_causal, tmp_path, "validation"))
    message = str(caught.value)
    assert re.match(
        r"^train.eval_batch_size=32: out of memory on cpu, tried to allocate 2.00 GiB during validation "
        r"\(train.max_length=48, precision fp32, method.r=8\); lower train.eval_batch_size$",
        message,
    ), message
    assert read_record(tmp_path / "validation")["error"] == f"OutOfMemory: {message}"


def test_out_of_memory_in_causal_lm_training_names_batch_size(compose, tiny_causal, tmp_path, out_of_memory):
    out_of_memory(lambda module: module.training)
    with pytest.raises(
        OutOfMemory,
        match=r"^train.batch_size=16: out of memory on cpu, tried to allocate 2.00 GiB "
        r"\(train.max_length=48, .*\); lower train.batch_size or train.max_length",
    ):
        run(_causal(compose, tiny_causal, tmp_path, "training"))


def test_out_of_memory_in_the_test_split_evaluation_names_eval_batch_size(
    compose, tiny_overrides, tmp_path, out_of_memory, monkeypatch
):
    """Validation passes go through; the test split (after the best checkpoint is loaded back) runs out."""
    import lora_sweep.run as run_module

    testing = []
    real_restore = run_module.restore_weights

    def restore_weights(model, path):
        testing.append(True)  # run() loads the best checkpoint back right before the test split
        return real_restore(model, path)

    monkeypatch.setattr(run_module, "restore_weights", restore_weights)
    out_of_memory(lambda module: bool(testing) and not module.training)
    cfg = compose(*tiny_overrides, "train.epochs=1", output_dir=tmp_path / "test")
    with pytest.raises(
        OutOfMemory,
        match=r"^train.eval_batch_size=32: .* during the test split evaluation \(.*\); "
        r"lower train.eval_batch_size$",
    ):
        run(cfg)
    assert read_record(tmp_path / "test")["status"] == "failed"


def test_the_mark_is_where_the_pass_is_not_a_frame_name():
    def evaluate():  # named like the old heuristic's frame, yet outside any evaluation pass
        raise RuntimeError("CUDA out of memory. Tried to allocate 8 bytes")

    with pytest.raises(RuntimeError) as outside:
        evaluate()
    assert during_evaluation(outside.value) is None
    with pytest.raises(RuntimeError) as inside, evaluation_pass("validation"):
        evaluate()
    assert during_evaluation(inside.value) == "validation"
    with pytest.raises(ValueError):  # anything that is not out of memory passes through untouched
        guard_memory(None, torch.device("cpu"), lambda: (_ for _ in ()).throw(ValueError("x")))
