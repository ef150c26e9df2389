"""Where a model or dataset comes from: a local folder, the Hugging Face cache, or the hub.

Loading a hub id with no network makes huggingface_hub retry for ~46 s (minutes if DNS hangs). We
answer in seconds instead: a local folder or a cached copy needs no network, and otherwise one bounded
probe of the hub decides between downloading and a clear error.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from lora_sweep.errors import ConfigError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "~"))


def offline_forced() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def go_offline() -> None:
    """Make huggingface_hub and datasets use their caches only, from now on in this process.

    Both read HF_HUB_OFFLINE once at import, so setting the variable is not enough once they are loaded.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets.config
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 4.0) -> bool:
    """One TCP connect to the hub endpoint, DNS included, bounded by ``timeout`` seconds."""
    if offline_forced():
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=probe, daemon=True)  # getaddrinfo ignores socket timeouts
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def locate_model(name_or_path: str, revision: str | None = None, key: str = "model.name_or_path") -> str:
    """A folder to load from, or a hub id that can be loaded now; else a ConfigError naming ``key``."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(key, name_or_path, "folder has no config.json: not a transformers model folder")
        return str(path.resolve())
    if not is_hub_id(name_or_path):
        raise ConfigError(key, name_or_path, "no such model folder")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
    if isinstance(cached, str):
        if not hub_reachable():
            go_offline()  # the cached copy is all we need; never wait on retries
        return name_or_path
    if not hub_reachable():
        raise ConfigError(
            key,
            name_or_path,
            "not a local folder, not in the Hugging Face cache, and the hub is unreachable (offline?)",
        )
    return name_or_path


def require_hub_dataset(name: str, key: str = "data.path") -> None:
    """A hub dataset id is usable only online (or from datasets' cache, which load_dataset checks)."""
    if not is_hub_id(name):
        raise ConfigError(key, name, "no such dataset folder or file, and not a hub dataset id")
    if not hub_reachable():
        go_offline()  # datasets may still have it cached; if not, it fails at once instead of retrying
