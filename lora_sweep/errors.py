"""The one error type a user should ever see: a bad value, named by its config key."""

from __future__ import annotations

from typing import Any


class LoraSweepError(Exception):
    """Something the user can fix. Printed as one line, never as a traceback."""


class ConfigError(LoraSweepError):
    """A config value that cannot work. ``key`` is the dotted Hydra key (``method.r``)."""

    def __init__(self, key: str, value: Any, problem: str):
        self.key = key
        self.value = value
        self.problem = problem
        super().__init__(self._render())

    def _render(self) -> str:
        value = self.value
        if isinstance(value, str) and len(value) > 200:
            value = value[:200] + "..."
        from lora_sweep.secrets import redact

        return redact(
            f"{self.key}={value!r}: {self.problem}"
        )  # a storage URL or token in a value never reaches the screen

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key placed under a parent key (``r`` -> ``method.r``)."""
        key = f"{prefix}.{self.key}" if prefix and self.key else (prefix or self.key)
        return ConfigError(key, self.value, self.problem)


class TrainingDiverged(LoraSweepError):
    """The loss became NaN or infinite: the trial failed, the process can go on."""
