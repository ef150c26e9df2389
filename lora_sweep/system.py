"""Facts about the machine and the code: memory peaks, package versions, git commit."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

TRACKED_PACKAGES = (
    "lora_sweep",
    "torch",
    "transformers",
    "peft",
    "datasets",
    "tokenizers",
    "safetensors",
    "hydra-core",
    "omegaconf",
    "optuna",
    "mlflow",
    "numpy",
    "pandas",
)


class MemoryMeter:
    """Peak memory of this run: CUDA max allocated on GPU, otherwise the largest RSS sampled.

    RSS is sampled at logging points rather than read from ru_maxrss, because ru_maxrss is the peak of
    the whole process and a sweep runs many trials in one process.
    """

    def __init__(self, device: torch.device):
        import psutil

        self.device = device
        self._process = psutil.Process()
        self.peak_rss = self._process.memory_info().rss
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)

    def figures(self) -> dict[str, float]:
        self.sample()
        figures = {"peak_rss_mb": self.peak_rss / 2**20}
        if self.device.type == "cuda":
            figures["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            figures["peak_memory_mb"] = figures["peak_cuda_allocated_mb"]
        else:
            figures["peak_memory_mb"] = figures["peak_rss_mb"]
        return figures


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_info(start: Path | None = None) -> dict[str, str | bool | None]:
    """Commit of the lora_sweep checkout (not of the working directory) and whether it has local edits."""
    folder = start or Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=folder, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def directory_size(path: Path, skip: tuple[str, ...] = ()) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.name not in skip)


def weights_size(path: Path) -> int:
    """Bytes of model weights alone (what a deployment ships), without tokenizer or resume state."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
