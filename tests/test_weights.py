"""Nothing in a checkpoint folder is ever unpickled: weights come from safetensors, resume state from
``torch.load(weights_only=True)``. Each planted file below would create a marker file if unpickled."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from lora_sweep.checkpoint import load_training_state, restore_weights, save_checkpoint
from lora_sweep.methods import apply_method
from lora_sweep.models import load_base_model
from lora_sweep.run import prepare
from lora_sweep.schema import to_dict
from lora_sweep.train import build_optimizer
from lora_sweep.weights import UnsafeCheckpoint


class Payload:
    """Unpickling this opens ``path`` for writing, i.e. creates it: proof that code ran."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def plant(folder: Path, marker: Path, *names: str) -> None:
    for name in names:
        torch.save({"state": Payload(marker)}, folder / name)


@pytest.fixture
def checkpoint(compose, tiny_overrides, tmp_path):
    """A real checkpoint of the tiny BERT (LoRA or full) and the record a report would read it through."""

    def make(*overrides: str):
        cfg = compose(*tiny_overrides, *overrides, output_dir=tmp_path / "run")
        prepared = prepare(cfg)
        torch.manual_seed(0)
        model = apply_method(
            load_base_model(
                prepared.spec, cfg.model, prepared.data.label_names, prepared.tokenizer.pad_token_id
            ),
            cfg.method,
            prepared.spec,
        )
        folder = save_checkpoint(
            tmp_path / "run" / "checkpoints" / "best", model, prepared.tokenizer, {"step": 0}
        )
        record = {"config": to_dict(cfg), "checkpoints": {"best": str(folder)}}
        return cfg, model, folder, record

    return make


def test_the_payload_does_run_when_unpickled(tmp_path):
    """The control: without weights_only the planted file executes (so the tests below can fail)."""
    marker = tmp_path / "pwned"
    plant(tmp_path, marker, "pytorch_model.bin")
    torch.load(tmp_path / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_lora_checkpoint_never_unpickles(checkpoint, tmp_path):
    from lora_sweep.report.checkpoints import load_trained

    marker = tmp_path / "pwned"
    cfg, model, folder, record = checkpoint()
    plant(folder, marker, "adapter_model.bin", "pytorch_model.bin", "training_args.bin")
    restore_weights(model, folder)  # reads adapter_model.safetensors, ignores the pickles
    load_trained(record)
    assert not marker.exists()

    (folder / "adapter_model.safetensors").unlink()  # now PEFT would fall back to adapter_model.bin
    with pytest.raises(
        UnsafeCheckpoint,
        match=r"no safetensors weights .*; refusing to unpickle adapter_model.bin, pytorch_model.bin",
    ):
        restore_weights(model, folder)
    with pytest.raises(UnsafeCheckpoint):
        load_trained(record)
    assert not marker.exists()


def test_full_checkpoint_never_unpickles(checkpoint, tmp_path):
    from lora_sweep.report.checkpoints import load_trained

    marker = tmp_path / "pwned"
    cfg, model, folder, record = checkpoint("method=full")
    plant(folder, marker, "pytorch_model.bin")
    restore_weights(model, folder)
    load_trained(record)  # from_pretrained(use_safetensors=True): model.safetensors, never pytorch_model.bin
    assert not marker.exists()

    (folder / "model.safetensors").unlink()
    with pytest.raises(UnsafeCheckpoint, match="refusing to unpickle pytorch_model.bin"):
        load_trained(record)
    with pytest.raises(UnsafeCheckpoint):
        restore_weights(model, folder)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pt"])
def test_resume_state_is_read_with_weights_only(checkpoint, tmp_path, name):
    marker = tmp_path / "pwned"
    cfg, model, folder, _ = checkpoint()
    optimizer, scheduler = build_optimizer(model, cfg, total_steps=10)
    save_checkpoint(
        folder,
        model,
        prepare(cfg).tokenizer,
        {"step": 1},
        optimizer=optimizer,
        scheduler=scheduler,
        trainer_state={"step": 1},
    )
    plant(folder, marker, name)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_training_state(folder, optimizer, scheduler)
    assert not marker.exists()
