"""A sweep's later trials reuse the process's loaded base model, with no second copy of what no trial changes.

An adapter trial leaves the base weights as they were: PEFT's ``unload`` takes its layers out, and the
modules it trains in full (the new head, ``method.modules_to_save``) are copies PEFT made, whose frozen
originals go back in place. So a LoRA trial copies nothing (a 4-bit base, which cannot be copied cheaply,
is reused as it is). Only what a trial's config makes it change in the base itself is copied before the
trial and put back after it:

- base biases a method trains (``method.bias=all`` / ``lora_only``): a copy of every bias, in a sweep;
- every weight, for full fine-tuning and for the LoRA inits that rewrite W (PiSSA, OLoRA, CorDA, LoftQ,
  LoRA-GA): a full copy on the host when the memory allows, else the base is dropped and the next trial
  reloads it from disk (the log says which).

A single run (no ``sweep.study_name``) copies nothing at all: what it changed is dropped, and a later run in
the same process loads its base again.
"""

from __future__ import annotations

import gc
import logging
from typing import Literal

import torch

from lora_sweep.config import MethodConfig

log = logging.getLogger(__name__)

# key -> (a clean base model, its state-dict keys: an adapter layer left behind shows up as extra keys).
# One per process. A trial takes its model out while it runs and gives it back only once it is restored,
# so a trial that dies half way can never hand a changed base to the next one.
_MODELS: dict[str, tuple[object, frozenset[str]]] = {}

# PEFT's LoRA inits that rewrite the targeted base weights (W - scaling·B·A, or a quantized W)
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
# full fine-tuning keeps gradients and AdamW's two moments beside the weights: room a host copy must leave
TRAINING_STATE_COPIES = 3
HEADROOM = 1.1  # the copy and the training state must fit in this share of the available memory, inverted

Plan = Literal["unload", "copy", "reload"]


def take(key: str):
    """The cached base model of ``key``, now owned by the caller (out of the cache), or None."""
    entry = _MODELS.pop(key, None)
    if entry is None:
        return None
    model, names = entry
    if set(model.state_dict()) != names:
        raise RuntimeError(
            "the cached base model still carries adapter layers: the last run did not unload them"
        )
    return model


def drop_all() -> None:
    """Let the cached base go (a new one replaces it): its memory is free before the next one loads."""
    _MODELS.clear()
    free_memory()


def free_memory() -> None:
    """What the last trial left behind (optimizer state, activations, adapters) back to the system: cyclic
    garbage first, then CUDA's caching allocator."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def base_changes(method: MethodConfig) -> str | None:
    """Why a trial of this method changes every base weight it touches, or None (an adapter on a frozen
    base)."""
    if not method.adapter:
        return "full fine-tuning trains every weight"
    for name, value in [("method.init", method.init), *_init_options(method)]:
        if isinstance(value, str) and value.lower().startswith(BASE_REWRITING_INITS):
            return f"{name}={value} rewrites the targeted base weights"
    return None


def _init_options(method: MethodConfig) -> list[tuple[str, object]]:
    return [(f"method.options.{k}", v) for k, v in method.options.items() if k.startswith("init")]


def trains_base_biases(method: MethodConfig) -> bool:
    return any(b not in (None, "none") for b in (method.bias, method.options.get("bias")))


def state_bytes(model) -> int:
    """Bytes of the model's state, each storage once (tied weights share one)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in model.state_dict().values()}
    return sum(s.nbytes() for s in storages.values())


def available_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


class TrialBase:
    """One trial's hold on the base model: what it copies before the trial, and how it gives the base back.

    Made right after the base is loaded or taken from the cache and before the method is applied, while the
    base is still pristine."""

    def __init__(self, key: str, model, method: MethodConfig, in_sweep: bool, device: torch.device):
        self.key, self.in_sweep = key, in_sweep
        self.names = frozenset(model.state_dict())
        self.copy: dict[str, torch.Tensor] = {}
        self.plan: Plan = "unload"
        reason = base_changes(method)
        if reason is None and trains_base_biases(method):
            reason = f"method.bias={method.bias or method.options.get('bias')} trains the base biases"
            if in_sweep:  # a bias is a vector: copying all of them costs next to nothing
                self.copy = _copy_of({k: v for k, v in model.state_dict().items() if "bias" in k})
                self.plan = "copy"
                log.info("%s: the trial restores them from a copy afterwards", reason)
                return
        if reason is None:
            return
        if not in_sweep:
            self.plan = "reload"
            log.info("%s: a single run makes no pristine copy (a later run in this process reloads)", reason)
            return
        self.plan, self.copy = self._full_copy(model, reason, method, device)

    @staticmethod
    def _full_copy(model, reason: str, method: MethodConfig, device) -> tuple[Plan, dict]:
        size = state_bytes(model)
        training = size * TRAINING_STATE_COPIES if not method.adapter and device.type == "cpu" else 0
        available = available_bytes()
        mib = 2**20
        if getattr(model, "hf_quantizer", None) is None and (size + training) * HEADROOM <= available:
            log.info(
                "%s: the trial restores the base from a pristine copy afterwards (%.0f MiB; %.0f MiB free)",
                reason,
                size / mib,
                available / mib,
            )
            return "copy", _copy_of(model.state_dict())
        log.info(
            "%s: no memory for a pristine copy (%.0f MiB, with %.0f MiB of training state; %.0f MiB free): "
            "the next trial reloads the base from disk",
            reason,
            size / mib,
            training / mib,
            available / mib,
        )
        return "reload", {}

    def give_back(self, model) -> None:
        """Take the trial out of ``model`` (the trial's model: the PeftModel, or the base itself) and put the
        base back in the cache when it is the pristine base again; drop it otherwise. The caller frees the
        memory (:func:`free_memory`) once it holds no reference to the trial's model either."""
        try:
            base = self._restored(model) if model is not None else None
        except Exception:  # noqa: BLE001 - a base that cannot be put back is reloaded; the run's error stands
            log.warning("could not restore the base after the trial: the next reloads it", exc_info=True)
            base = None
        self.copy = {}
        if base is not None:
            _MODELS.clear()
            _MODELS[self.key] = (base, self.names)

    def _restored(self, model):
        from lora_sweep.checkpoint import is_peft_model

        if self.plan == "reload":
            return None
        if is_peft_model(model):
            base = model.get_base_model()
            originals = _saved_originals(base)
            if not model.active_peft_config.is_prompt_learning:  # prompt methods add no layer to the base
                model.unload()
            for name, module in originals.items():
                base.set_submodule(name, module)
            model = base
        if self.copy:
            model.load_state_dict(self.copy, strict=len(self.copy) == len(self.names))
        if set(model.state_dict()) != self.names:
            log.warning("the base model still carries layers of the trial: the next trial reloads it")
            return None
        for parameter in model.parameters():
            parameter.grad = None
        return model.eval()  # as from_pretrained returns it


def _saved_originals(base) -> dict[str, torch.nn.Module]:
    """The frozen originals of the modules PEFT trains in full (``modules_to_save``): PEFT's ``unload``
    puts the trained copy in their place."""
    from peft.utils import ModulesToSaveWrapper

    return {
        name: module.original_module
        for name, module in base.named_modules()
        if isinstance(module, ModulesToSaveWrapper)
    }


def _copy_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
