"""Checkpoints in standard formats, written atomically.

A checkpoint folder holds the model in the format its method's tooling loads (a PEFT adapter that
``PeftModel.from_pretrained`` reads, with the trained classifier head; or a ``save_pretrained`` model),
the tokenizer, and ``lora_sweep.json`` (step, metrics). The *last* checkpoint also holds what an exact
resume needs: ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pt`` (tensors only, read with
``torch.load(weights_only=True)``) and ``trainer_state.json`` (step, epoch, data position, best so far).
Weights are safetensors only; nothing in a checkpoint folder is ever unpickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_sweep.weights import require_safetensors

META_FILE = "lora_sweep.json"
TRAINER_STATE_FILE = "trainer_state.json"
RESUME_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pt", TRAINER_STATE_FILE)


def is_peft_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_checkpoint(directory: Path, model, tokenizer, meta: dict[str, Any], *, optimizer=None, scheduler=None,
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint into a temp folder, then swap it in: a crash never leaves half a checkpoint."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_torch_rng_state(), tmp / "rng_state.pt")
        state = dict(trainer_state or {}, python_rng=_python_rng_state(), numpy_rng=_numpy_rng_state())
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))  # written last: marks it complete
    old = directory.with_name(f".{directory.name}.old{os.getpid()}")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def restore_weights(model, directory: Path) -> None:
    """Load a checkpoint's trained weights into ``model`` (same method and architecture) in place."""
    directory = require_safetensors(directory)  # PEFT would fall back to unpickling adapter_model.bin
    if is_peft_model(model):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(model, load_peft_weights(str(directory), device="cpu"))
        return
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        state.update(load_file(shard))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"checkpoint {directory} does not fit the model: unexpected {result.unexpected_keys[:5]}")


def load_training_state(directory: Path, optimizer, scheduler) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNGs from a last checkpoint; return its trainer state."""
    directory = Path(directory)
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
    rng = torch.load(directory / "rng_state.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and rng.get("cuda"):
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((directory / TRAINER_STATE_FILE).read_text())
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    return state


def read_meta(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _torch_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
