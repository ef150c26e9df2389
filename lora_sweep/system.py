"""Facts about the machine and the code: memory peaks, package versions, git commit."""

from __future__ import annotations

import importlib.metadata
import platform
import re
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
            # what the caching allocator held: what other processes on the card could not have
            figures["peak_cuda_reserved_mb"] = torch.cuda.max_memory_reserved(self.device) / 2**20
            figures["peak_memory_mb"] = figures["peak_cuda_allocated_mb"]
        else:
            figures["peak_memory_mb"] = figures["peak_rss_mb"]
        return figures


# Peak dense (no 2:4 sparsity) FLOP/s per training precision, in TFLOPS, from NVIDIA's datasheets.
# Keyed by a pattern of torch.cuda.get_device_name(); the first match wins, so specific names come first.
# bf16/fp16 are tensor-core peaks with fp32 accumulation (what autocast uses); fp32 is the plain fp32
# peak, as torch runs fp32 matmuls without TF32 unless told to. A device or precision missing here gets
# no MFU (None, and the record says why): a guessed peak would make the figure meaningless.
PEAK_TFLOPS: tuple[tuple[str, str, dict[str, float]], ...] = (
    (r"H200.*NVL", "NVIDIA H200 NVL datasheet", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    (r"H200", "NVIDIA H200 SXM datasheet", {"bf16": 989.5, "fp16": 989.5, "fp32": 67.0}),
    (r"H100.*NVL", "NVIDIA H100 NVL datasheet", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    (r"H100.*PCIe", "NVIDIA H100 PCIe datasheet", {"bf16": 756.5, "fp16": 756.5, "fp32": 51.0}),
    (r"H100", "NVIDIA H100 SXM datasheet", {"bf16": 989.5, "fp16": 989.5, "fp32": 67.0}),
    (r"A100", "NVIDIA A100 datasheet", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    (r"L40S", "NVIDIA L40S datasheet", {"bf16": 362.05, "fp16": 362.05, "fp32": 91.6}),
    (r"L40\b", "NVIDIA L40 datasheet", {"bf16": 181.05, "fp16": 181.05, "fp32": 90.5}),
    (r"\bL4\b", "NVIDIA L4 datasheet", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    (r"\bA10\b", "NVIDIA A10 datasheet", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    (r"RTX 4090", "NVIDIA Ada GPU architecture whitepaper", {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6}),
    (r"RTX 3090", "NVIDIA Ampere GA102 whitepaper", {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6}),
    (r"V100.*PCIE", "NVIDIA V100 PCIe datasheet", {"fp16": 112.0, "fp32": 14.0}),
    (r"V100", "NVIDIA V100 SXM2 datasheet", {"fp16": 125.0, "fp32": 15.7}),
    (r"\bT4\b", "NVIDIA T4 datasheet", {"fp16": 65.0, "fp32": 8.1}),
)


def peak_flops(device: str, precision: str) -> dict[str, object]:
    """The peak FLOP/s that MFU divides by, for a device as :func:`device_description` names it and a
    training precision: ``{"flops": float | None, "source": str}``; without a known peak ``flops`` is
    None and ``source`` says why."""
    if device.startswith(("cpu", "mps")):
        return {"flops": None, "source": f"no peak for {device.split(' (')[0]}: MFU is computed on GPUs only"}
    for pattern, source, peaks in PEAK_TFLOPS:
        if re.search(pattern, device):
            if precision not in peaks:
                return {"flops": None, "source": f"{source} gives no {precision} peak"}
            tflops = peaks[precision]
            return {"flops": tflops * 1e12, "source": f"{source}: {tflops:g} TFLOPS {precision} dense"}
    return {"flops": None, "source": f"no peak known for {device} (lora_sweep.system.PEAK_TFLOPS)"}


def training_flops_per_token(matmul_params: int, trainable_params: int) -> int:
    """Model FLOPs of one training token: forward 2N, backward through every weight for the activations'
    gradients 2N, and the weights' own gradients 2 per trainable parameter. Full fine-tuning gives the
    usual 6N, an adapter method about 4N. N counts weights that multiply (an input embedding table is a
    lookup); attention's score FLOPs and gradient checkpointing's recompute are left out, as MFU does."""
    return 4 * matmul_params + 2 * min(trainable_params, matmul_params)


def model_flops_utilization(
    flops_per_token: int, tokens_per_second: float, peak: float | None
) -> float | None:
    """The share of the device's peak that the model's own FLOPs used (0..1), or None without a peak."""
    if not peak or not tokens_per_second:
        return None
    return flops_per_token * tokens_per_second / peak


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
