"""Model FLOP utilisation: the FLOPs of a training token from the parameter counts, the peak FLOP/s table,
and what a run records (an MFU on a known GPU; on CPU none, and why)."""

from __future__ import annotations

import pytest
import torch

from lora_sweep.models import matmul_parameters
from lora_sweep.record import read_record
from lora_sweep.run import run
from lora_sweep.system import PEAK_TFLOPS, model_flops_utilization, peak_flops, training_flops_per_token


def test_full_fine_tuning_costs_6n_and_an_adapter_about_4n():
    n = 1_000_000
    assert training_flops_per_token(n, n) == 6 * n
    assert training_flops_per_token(n, 0) == 4 * n  # frozen weights: forward and activations' grads only
    assert training_flops_per_token(n, 3_000) == 4 * n + 6_000  # an adapter's own weight grads
    # 1e9 FLOPs per token at 1e3 tokens/s on a 1e13 FLOP/s device is 10% of its peak
    assert model_flops_utilization(10**9, 1e3, 1e13) == pytest.approx(0.1)
    assert model_flops_utilization(10**9, 1e3, None) is None


def test_embedding_lookups_do_not_count_and_a_tied_output_head_does():
    class Tiny(torch.nn.Module):
        def __init__(self, tied: bool):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 8)  # 800 weights, looked up
            self.position = torch.nn.Embedding(16, 8)  # 128, looked up
            self.body = torch.nn.Linear(8, 8)  # 72
            self.head = torch.nn.Linear(8, 100, bias=False)  # 800
            if tied:
                self.head.weight = self.embed.weight

    assert matmul_parameters(Tiny(tied=False)) == 72 + 800
    assert matmul_parameters(Tiny(tied=True)) == 72 + 800  # the shared table multiplies in the head


@pytest.mark.parametrize(
    "device, precision, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.5),
        ("NVIDIA H100 PCIe", "bf16", 756.5),
        ("NVIDIA H200", "bf16", 989.5),
        ("NVIDIA H200 NVL", "bf16", 835.5),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA L40S", "bf16", 362.05),
        ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
        ("NVIDIA GeForce RTX 3090", "fp16", 71.0),
        ("Tesla T4", "fp16", 65.0),
    ],
)
def test_peak_lookup_by_cuda_device_name(device, precision, tflops):
    peak = peak_flops(device, precision)
    assert peak["flops"] == pytest.approx(tflops * 1e12)
    assert peak["source"].endswith(f"{tflops:g} TFLOPS {precision} dense")


@pytest.mark.parametrize(
    "device, precision, reason",
    [
        ("cpu (2 threads)", "fp32", "no peak for cpu: MFU is computed on GPUs only"),
        ("NVIDIA A10G", "bf16", "no peak known for NVIDIA A10G"),  # not A10's, not A100's
        ("Tesla T4", "bf16", "gives no bf16 peak"),  # T4 has no bf16
    ],
)
def test_no_peak_is_guessed(device, precision, reason):
    peak = peak_flops(device, precision)
    assert peak["flops"] is None and reason in peak["source"]


def test_every_table_row_is_a_dense_peak_per_precision():
    for _pattern, source, peaks in PEAK_TFLOPS:
        assert source and set(peaks) <= {"bf16", "fp16", "fp32"} and all(v > 0 for v in peaks.values())


def test_cpu_run_records_no_mfu_and_why(compose, tiny_overrides, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = compose(*tiny_overrides, "train.epochs=1", "train.eval_every=0")
    run(cfg)
    record = read_record(cfg.output_dir)
    metrics, params = record["metrics"], record["params"]
    assert metrics["mfu"] is None and metrics["mfu_peak_tflops"] is None
    assert metrics["mfu_peak_source"] == "no peak for cpu: MFU is computed on GPUs only"
    assert (
        metrics["model_flops_per_token"] == params["model_flops_per_token"] > 4 * params["trainable_params"]
    )
    logged = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(
        record["mlflow"]["run_id"]
    )
    assert logged.data.tags["lora_sweep.mfu_peak"] == metrics["mfu_peak_source"]
    assert logged.data.metrics["model_flops_per_token"] == metrics["model_flops_per_token"]
    assert "mfu" not in logged.data.metrics


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiny_cuda_run_records_mfu_and_cuda_peaks(compose, tiny_overrides, tmp_path):
    from mlflow.tracking import MlflowClient

    name = torch.cuda.get_device_name()
    cfg = compose(*tiny_overrides, "train.epochs=1", "train.eval_every=0", "train.device=cuda")
    record = run(cfg)
    metrics = read_record(cfg.output_dir)["metrics"]
    assert metrics["peak_cuda_reserved_mb"] >= metrics["peak_cuda_allocated_mb"] > 0
    if peak_flops(name, record.precision)["flops"] is None:
        pytest.skip(f"{name} is not in lora_sweep.system.PEAK_TFLOPS")
    assert 0 < metrics["mfu"] < 1 and metrics["mfu_peak_tflops"] > 0
    assert metrics["mfu_peak_source"] == peak_flops(name, record.precision)["source"]
    logged = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(record.mlflow["run_id"])
    assert logged.data.metrics["mfu"] == pytest.approx(metrics["mfu"])
    assert logged.data.metrics["peak_cuda_reserved_mb"] == pytest.approx(metrics["peak_cuda_reserved_mb"])
