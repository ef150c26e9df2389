"""Checkpoints in standard formats, written atomically.

A checkpoint folder holds the model in the format its method's tooling loads (a PEFT adapter that
``PeftModel.from_pretrained`` reads, with the trained classifier head; or a ``save_pretrained`` model)
and ``lora_sweep.json`` (step, metrics). The tokenizer never changes while a run trains, so a run writes
it once, into ``<output_dir>/tokenizer`` (it was 70% of a LoRA checkpoint's bytes, written at every
save); each checkpoint's manifest names it by a relative path (``"tokenizer": "../../tokenizer"``),
which holds as well in the run's MLflow artifacts, laid out the same way (:func:`tokenizer_folder`).
The *last* checkpoint also holds what an exact resume needs: ``optimizer.pt``, ``scheduler.pt``,
``rng_state.pt`` (tensors only, read with ``torch.load(weights_only=True)``) and ``trainer_state.json``
(step, epoch, data position, best so far).
Weights are safetensors only; nothing in a checkpoint folder is ever unpickled.

Integrity: ``lora_sweep.json`` is written last and lists every file with its size and SHA-256, so a
folder cut short by a kill, or damaged later, is told apart from a good one (:func:`verify`). The last
checkpoint is rotated: the one before it is kept as ``previous`` until the run ends, so a resume that
finds ``last`` unusable falls back to ``previous`` instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_sweep.weights import require_safetensors

log = logging.getLogger(__name__)

META_FILE = "lora_sweep.json"
TRAINER_STATE_FILE = "trainer_state.json"
RESUME_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pt", TRAINER_STATE_FILE)
TOKENIZER_DIR = "tokenizer"  # in the run's output folder, next to checkpoints/
# the folders save_checkpoint works in before its renames, named after the saving process
_SAVE_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)(?P<pid>\d+)$")


def is_peft_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def run_tokenizer_dir(checkpoint_dir: Path) -> Path:
    """Where a run whose checkpoints are in ``checkpoint_dir`` keeps its one copy of the tokenizer."""
    return Path(checkpoint_dir).parent / TOKENIZER_DIR


def save_tokenizer(directory: Path, tokenizer) -> Path:
    """The run's tokenizer, written once (atomically, with a manifest :func:`verify` checks)."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer.save_pretrained(tmp)
    files = {f.name: _fingerprint(f) for f in sorted(tmp.iterdir()) if f.is_file()}
    (tmp / META_FILE).write_text(json.dumps({"tokenizer": True, "files": files}, indent=2))
    _fsync_dir(tmp)
    _swap_in(tmp, directory)
    return directory


def tokenizer_folder(checkpoint: Path) -> Path:
    """The folder to load a checkpoint's tokenizer from (``AutoTokenizer.from_pretrained``): the checkpoint
    itself when it holds one (an export, or a checkpoint written before tokenizers were saved once), else
    the run's folder its manifest names."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "tokenizer_config.json").is_file():
        return checkpoint
    reference = (read_meta(checkpoint) or {}).get("tokenizer")
    folder = (checkpoint / reference).resolve() if reference else None
    if folder is None or not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"checkpoint {checkpoint} holds no tokenizer"
            + (f" and {folder} (its manifest's tokenizer) has none either" if folder else "")
        )
    return folder


def save_checkpoint(
    directory: Path,
    model,
    tokenizer,
    meta: dict[str, Any],
    *,
    optimizer=None,
    scheduler=None,
    trainer_state: dict[str, Any] | None = None,
    keep_previous: Path | None = None,
) -> Path:
    """Write the checkpoint into a temp folder, then swap it in: a crash never leaves half a checkpoint.

    ``tokenizer`` is a tokenizer, written into the folder, or the folder where the run saved it once
    (:func:`save_tokenizer`), which the manifest then names by its path relative to this checkpoint.
    With ``keep_previous``, the checkpoint being replaced moves there instead of being deleted.
    """
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if isinstance(tokenizer, Path):
        meta = dict(meta, tokenizer=os.path.relpath(tokenizer, directory))
    else:
        tokenizer.save_pretrained(tmp)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_torch_rng_state(), tmp / "rng_state.pt")
        state = dict(trainer_state or {}, python_rng=_python_rng_state(), numpy_rng=_numpy_rng_state())
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2))
    meta = dict(meta, files={f.name: _fingerprint(f) for f in sorted(tmp.iterdir()) if f.is_file()})
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))  # written last: marks it complete
    _fsync_dir(tmp)
    _swap_in(tmp, directory, keep_previous)
    return directory


def _swap_in(tmp: Path, directory: Path, keep_previous: Path | None = None) -> None:
    old = directory.with_name(f".{directory.name}.old{os.getpid()}")
    if keep_previous is not None and directory.exists():
        shutil.rmtree(keep_previous, ignore_errors=True)
        os.replace(directory, keep_previous)
    elif directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_saves(checkpoint_dir: Path) -> list[Path]:
    """Delete the temp folders of saves whose process is gone (killed mid-save, they would stay for ever,
    each as big as a checkpoint); a live process's folder is a save in progress and stays. Pids are of this
    host: a run folder is resumed on the machine that wrote it. Returns what was removed."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    removed = []
    for entry in sorted(checkpoint_dir.iterdir()):
        match = _SAVE_TEMP.match(entry.name)
        if match is None or not entry.is_dir() or _process_alive(int(match["pid"])):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        log.info("removed %s, left by a save that never finished (process %s is gone)", entry, match["pid"])
        removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OverflowError:  # no such pid on any system
        return False
    return True


def verify(directory: Path, *, resumable: bool = False) -> str | None:
    """Why ``directory`` is not a usable checkpoint, or None when every listed file is there and intact."""
    directory = Path(directory)
    if not directory.is_dir():
        return "missing"
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except FileNotFoundError:
        return f"no {META_FILE} (written last: the save never finished)"
    except (OSError, ValueError) as err:
        return f"{META_FILE} unreadable: {err}"
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return f"{META_FILE} lists no files"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['bytes']} were written"
        if _sha256(path) != expected["sha256"]:
            return f"{name} is corrupt (checksum mismatch)"
    if resumable and not all(name in files for name in RESUME_FILES):
        return "holds no training state"
    return None


def resume_point(checkpoint_dir: Path) -> Path | None:
    """The newest intact resumable checkpoint (``last``, else ``previous``); warns about each unusable one."""
    skipped = []
    for name in ("last", "previous"):
        candidate = Path(checkpoint_dir) / name
        problem = verify(candidate, resumable=True)
        if problem is None:
            for path, reason in skipped:
                log.warning("checkpoint %s is unusable (%s); resuming from %s", path, reason, candidate)
            return candidate
        if problem != "missing":
            skipped.append((candidate, problem))
    for path, reason in skipped:
        log.warning("checkpoint %s is unusable (%s); no earlier one: the run starts over", path, reason)
    return None


def drop_training_state(checkpoint_dir: Path) -> None:
    """After a run ends: remove what only a resume needs (the rotated checkpoint, optimizer moments, RNG).

    The kept checkpoints stay verifiable: their manifest is rewritten without the removed files.
    """
    checkpoint_dir = Path(checkpoint_dir)
    shutil.rmtree(checkpoint_dir / "previous", ignore_errors=True)
    last = checkpoint_dir / "last"
    meta = read_meta(last)
    if meta is None:
        return
    for name in RESUME_FILES:
        (last / name).unlink(missing_ok=True)
        meta.get("files", {}).pop(name, None)
    tmp = last / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, last / META_FILE)


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
        raise RuntimeError(
            f"checkpoint {directory} does not fit the model: unexpected {result.unexpected_keys[:5]}"
        )


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _fsync_dir(directory: Path) -> None:
    """Flush the files' data before the rename makes them "the" checkpoint (a power cut must not swap in
    empty files)."""
    for file in directory.iterdir():
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


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
