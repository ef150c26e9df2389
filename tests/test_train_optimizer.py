"""AdamW's kernel: fused where the device has one, the same update as torch's per-parameter loop, and a
state dict any kernel wrote resumes in the fused one."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_sweep.train import build_optimizer, optimizer_kernel


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2))


def _steps(model, optimizer, n: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(4, 8, generator=generator)
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_cpu_parameters_get_the_fused_kernel(compose, tiny_overrides):
    cfg = compose(*tiny_overrides)
    optimizer, _ = build_optimizer(_model(), cfg, total_steps=10)
    assert optimizer.defaults["fused"] is True
    assert optimizer_kernel([torch.zeros(2, dtype=torch.int64)]) == {}  # no fused kernel for integers


def test_fused_update_equals_the_per_parameter_loop_and_resumes_from_its_state(
    compose, tiny_overrides, monkeypatch
):
    cfg = compose(*tiny_overrides)
    fused_model, loop_model = _model(), _model()
    fused, _ = build_optimizer(fused_model, cfg, total_steps=10)
    with monkeypatch.context() as patch:  # the same groups and schedule on torch's per-parameter loop
        patch.setattr("lora_sweep.train.optimizer_kernel", lambda parameters: {"foreach": False})
        loop, _ = build_optimizer(loop_model, cfg, total_steps=10)
    assert loop.defaults["fused"] is not True and loop.defaults["foreach"] is False
    for optimizer in (fused, loop):  # the scheduler's warmup starts at lr 0: take a real step
        for group in optimizer.param_groups:
            group["lr"] = 1e-2
    _steps(fused_model, fused, 5)
    _steps(loop_model, loop, 5)
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a checkpoint written by the loop kernel (older runs) continues in the fused one as the loop would
    resumed_model = copy.deepcopy(loop_model)
    resumed, _ = build_optimizer(resumed_model, cfg, total_steps=10)
    resumed.load_state_dict(copy.deepcopy(loop.state_dict()))  # a saved file shares no tensors
    assert resumed.defaults["fused"] is True
    _steps(resumed_model, resumed, 3, seed=2)
    _steps(loop_model, loop, 3, seed=2)
    for a, b in zip(resumed_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_parameters_get_the_fused_kernel(compose, tiny_overrides):
    cfg = compose(*tiny_overrides)
    optimizer, _ = build_optimizer(_model().cuda(), cfg, total_steps=10)
    assert optimizer.defaults["fused"] is True
