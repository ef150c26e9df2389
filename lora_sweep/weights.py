"""Weights are read from safetensors only: nothing in a checkpoint folder is ever unpickled.

PEFT's ``load_peft_weights`` and transformers' ``from_pretrained`` fall back to ``*.bin`` pickles when a
folder has no safetensors file. A checkpoint folder is something a run leaves on disk where others can
write, so a folder without safetensors weights is refused rather than handed to that fallback.
"""

from __future__ import annotations

import json
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


# safetensors' own cap on the JSON header: a larger length field means the first 8 bytes are not one
MAX_HEADER_BYTES = 100_000_000


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a ``.safetensors`` file, read from its header alone: the 8-byte length, the JSON
    header, and the file size the tensors' end offsets imply. None when nothing is. A file cut short (a
    copy or download that stopped) is found without reading a single weight."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{path.name} is not a safetensors file ({size} bytes, shorter than its 8-byte header)"
        length = int.from_bytes(head, "little")
        if length > MAX_HEADER_BYTES:
            return (
                f"{path.name} is not a safetensors file (its first 8 bytes announce a {length:,}-byte header)"
            )
        if 8 + length > size:
            return f"{path.name} is truncated: {size:,} bytes, but its header alone announces {8 + length:,}"
        try:
            header = json.loads(handle.read(length))
            ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return f"{path.name} is not a safetensors file (its header is not safetensors' JSON)"
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"{path.name} is truncated: {size:,} bytes of the {expected:,} its header announces"
    return None


def weights_problem(folder: Path) -> str | None:
    """The first problem of a model folder's safetensors weights (a truncated file, a missing shard)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{index.name} is not a valid shard index (no weight_map)"
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            return (
                f"{index.name} names {missing[0]}, which is missing ({len(missing)} of {len(shards)} shards)"
            )
    for file in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            return problem
    return None
