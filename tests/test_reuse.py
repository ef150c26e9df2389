"""reuse: a sweep's later trials reuse the loaded base model, copying only what a trial changes in it, and
nothing of a trial (optimizer, adapter) stays alive after it."""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

FAST = ["tracking=none", "train.max_steps=4", "train.eval_every=4", "evaluate_test=false"]
SWEEP = "sweep.study_name=reuse"  # what the sweeper sets for each trial


@pytest.fixture
def fresh_process():
    """Nothing loaded yet, as in a new process; nothing left for the next test."""
    from lora_sweep import reuse
    from lora_sweep.prepare import _PREPARED

    _PREPARED.clear()
    reuse._MODELS.clear()
    yield reuse._MODELS
    reuse._MODELS.clear()


def fresh_state(cfg) -> dict[str, torch.Tensor]:
    """The state dict of the base as loading it from disk under the run's seed gives."""
    from transformers import set_seed

    from lora_sweep.models import load_base_model
    from lora_sweep.run import prepare

    prepared = prepare(cfg)
    set_seed(cfg.train.seed)
    data, pad = prepared.data, prepared.tokenizer.pad_token_id
    return load_base_model(prepared.spec, cfg.model, data.label_names, pad).state_dict()


def assert_bitwise_equal(model, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(expected)
    changed = [k for k, v in state.items() if not torch.equal(v, expected[k])]
    assert not changed, f"differ from a fresh load: {changed}"


def cached_model(models):
    ((model, _),) = models.values()
    return model


def test_after_each_trial_the_base_is_a_fresh_load(compose, tiny_overrides, tmp_path, fresh_process):
    """LoRA (the head restored without a copy), then trials that change the base in each way a config can:
    every weight (full FT; PiSSA rewrites W), base biases, a module PEFT trains in full."""
    from lora_sweep.run import run

    lora = [*tiny_overrides, *FAST, SWEEP, "train.lr=5e-2"]
    trials = [
        [],
        ["method=full", "train.lr=1e-3"],
        ["+method.options.init_lora_weights=pissa"],
        ["method.bias=all", "method.modules_to_save=[pooler]"],
    ]
    for number, overrides in enumerate(trials):
        cfg = compose(*lora, *overrides, output_dir=tmp_path / str(number))
        assert run(cfg).params["setup_reused"] is (number > 0)
        assert_bitwise_equal(cached_model(fresh_process), fresh_state(cfg))


def test_a_lora_trial_copies_nothing_and_a_full_trial_copies_the_base_only_in_a_sweep(
    compose, tiny_overrides, fresh_process
):
    from lora_sweep.reuse import TrialBase
    from lora_sweep.run import base_model, model_key, prepare

    cpu = torch.device("cpu")
    for method, in_sweep, plan in [
        ("lora", True, "unload"),
        ("lora", False, "unload"),
        ("full", True, "copy"),
        ("full", False, "reload"),
    ]:
        cfg = compose(*tiny_overrides, f"method={method}")
        prepared = prepare(cfg)
        model, _ = base_model(cfg, prepared)
        trial = TrialBase(model_key(cfg, prepared), model, cfg.method, in_sweep, cpu)
        assert trial.plan == plan, (method, in_sweep)
        assert bool(trial.copy) == (plan == "copy"), (method, in_sweep)
        if plan == "copy":
            assert set(trial.copy) == set(model.state_dict())
        trial.give_back(model)
        assert bool(fresh_process) == (plan != "reload")


def test_a_full_trial_reloads_the_base_when_no_copy_fits_and_says_which(
    compose, tiny_overrides, tmp_path, fresh_process, monkeypatch, caplog
):
    from lora_sweep import reuse
    from lora_sweep.run import run

    lora = [*tiny_overrides, *FAST, SWEEP, "train.lr=5e-2"]
    full = [*tiny_overrides, *FAST, SWEEP, "method=full", "train.lr=1e-3"]
    caplog.set_level(logging.INFO, logger="lora_sweep.reuse")
    run(compose(*full, output_dir=tmp_path / "copied"))
    assert "restores the base from a pristine copy" in caplog.text
    assert run(compose(*lora, output_dir=tmp_path / "after_copy")).params["setup_reused"] is True

    caplog.clear()
    monkeypatch.setattr(reuse, "available_bytes", lambda: 0)  # no copy fits
    run(compose(*full, output_dir=tmp_path / "reloaded"))
    assert "no memory for a pristine copy" in caplog.text and "reloads the base from disk" in caplog.text
    assert not fresh_process  # the changed base is gone, its memory free
    cfg = compose(*lora, output_dir=tmp_path / "after_reload")
    assert run(cfg).params["setup_reused"] is False
    assert_bitwise_equal(cached_model(fresh_process), fresh_state(cfg))


def test_a_single_run_makes_no_copy_and_a_later_run_reloads_what_it_changed(
    compose, tiny_overrides, tmp_path, fresh_process, caplog
):
    from lora_sweep.run import run

    caplog.set_level(logging.INFO, logger="lora_sweep.reuse")
    run(compose(*tiny_overrides, *FAST, "method=full", "train.lr=1e-3", output_dir=tmp_path / "full"))
    assert "a single run makes no pristine copy" in caplog.text
    assert not fresh_process
    lora = [*tiny_overrides, *FAST, "train.lr=5e-2"]
    assert run(compose(*lora, output_dir=tmp_path / "one")).params["setup_reused"] is False
    assert run(compose(*lora, output_dir=tmp_path / "two")).params["setup_reused"] is True  # no copy needed


class Watch:
    """Weak references to what a trial creates: its optimizer, its PeftModel, its adapter weights."""

    def __init__(self):
        from peft import PeftModel

        self.refs: list[weakref.ref] = []

        def on_forward(module, *_):  # returns None: a forward hook's result would replace the output
            if isinstance(module, PeftModel):
                self._see_model(module)

        self.handles = [
            register_optimizer_step_post_hook(lambda optimizer, *_: self._see(optimizer)),
            torch.nn.modules.module.register_module_forward_hook(on_forward),
        ]

    def _see(self, obj) -> None:
        if not any(r() is obj for r in self.refs):
            self.refs.append(weakref.ref(obj))

    def _see_model(self, model) -> None:
        self._see(model)
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                self._see(parameter)

    def alive(self) -> list[str]:
        gc.collect()
        return [type(r()).__name__ for r in self.refs if r() is not None]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_nothing_of_a_trial_stays_referenced_after_it_ends_or_fails(
    compose, tiny_overrides, tmp_path, fresh_process
):
    from lora_sweep.run import run

    lora = [*tiny_overrides, *FAST, SWEEP, "train.lr=5e-2"]
    watch = Watch()
    try:
        run(compose(*lora, output_dir=tmp_path / "ok"))
        assert len(watch.refs) > 2  # it saw the optimizer, the PeftModel and adapter weights
        assert watch.alive() == []

        def stop(step, metrics):
            raise RuntimeError("the trial dies here")

        watch.refs.clear()
        with pytest.raises(RuntimeError, match="the trial dies here") as caught:
            run(compose(*lora, output_dir=tmp_path / "dies"), on_evaluation=stop)
        assert len(watch.refs) > 2
        # while the error, with its traceback, is still in hand (a sweep logs it, then starts the next trial)
        assert watch.alive() == [] and caught.value.__traceback__ is not None
    finally:
        watch.close()
    assert fresh_process  # the base itself stays, clean, for the next trial


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_memory_returns_to_the_base_models_size_after_each_trial(
    compose, tiny_overrides, tmp_path, fresh_process
):
    from lora_sweep.reuse import state_bytes
    from lora_sweep.run import run

    sweep = [*tiny_overrides, *FAST, SWEEP, "train.device=cuda"]
    for name, method in [("lora", ["train.lr=5e-2"]), ("full", ["method=full"]), ("again", [])]:
        run(compose(*sweep, *method, output_dir=tmp_path / name))
        base = cached_model(fresh_process)
        assert next(base.parameters()).device.type == "cuda"
        # the base's own weights and buffers, nothing of the trial (optimizer, gradients, adapters, copies)
        assert torch.cuda.memory_allocated() <= state_bytes(base) + 2**16, name
