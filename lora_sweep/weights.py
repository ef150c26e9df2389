"""Weights are read from safetensors only: nothing in a checkpoint folder is ever unpickled.

PEFT's ``load_peft_weights`` and transformers' ``from_pretrained`` fall back to ``*.bin`` pickles when a
folder has no safetensors file. A checkpoint folder is something a run leaves on disk where others can
write, so a folder without safetensors weights is refused rather than handed to that fallback.
"""

from __future__ import annotations

from pathlib import Path

from lora_sweep.errors import LoraSweepError

SAFE_WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class UnsafeCheckpoint(LoraSweepError):
    """A checkpoint folder whose weights exist only as pickles."""


def require_safetensors(directory: str | Path) -> Path:
    """``directory`` if it holds safetensors weights; else one line saying which pickles were not loaded."""
    directory = Path(directory)
    if any((directory / name).is_file() for name in SAFE_WEIGHT_FILES) or any(
        directory.glob("*.safetensors")
    ):
        return directory
    pickles = sorted(p.name for p in directory.glob("*") if p.suffix in PICKLE_SUFFIXES)
    found = f"; refusing to unpickle {', '.join(pickles)}" if pickles else ""
    raise UnsafeCheckpoint(
        f"checkpoint {directory}: no safetensors weights (adapter_model.safetensors or "
        f"model.safetensors){found}"
    )
