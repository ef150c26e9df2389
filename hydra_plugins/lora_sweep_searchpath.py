"""Lets Hydra find the ``sweeps/`` config group of a lora_sweep checkout from any working directory.

Only lora_sweep's own app is touched: the path is added when its ``conf/`` is already on the search path.
"""

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

REPO_ROOT = Path(__file__).resolve().parent.parent


class LoraSweepSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        ours = str(REPO_ROOT / "conf")
        if any(element.path.removeprefix("file://") == ours for element in search_path.get_path()):
            search_path.append(provider="lora_sweep", path=f"file://{REPO_ROOT}")
