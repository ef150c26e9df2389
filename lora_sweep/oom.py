"""Out of memory during training: one line naming the keys to change, memory given back, the run failed.

An OOM is a property of one configuration (batch size, sequence length, rank, precision), not of the
process: in a sweep the trial fails with this line as its reason and the next trial gets the memory back.
"""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from lora_sweep.config import RunConfig
from lora_sweep.errors import ConfigError

T = TypeVar("T")

# CPU allocators and older CUDA builds raise a plain RuntimeError; torch >= 2.5 raises torch.OutOfMemoryError
_OOM_TEXT = re.compile(r"out of memory|can't allocate memory|DefaultCPUAllocator", re.IGNORECASE)
_TRIED = re.compile(r"[Tt]ried to allocate (?P<size>[\d.]+ ?[KMGT]?i?B|\d+ bytes)")


class OutOfMemory(ConfigError):
    """The configuration does not fit in the device's memory."""


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and bool(_OOM_TEXT.search(str(err)))


# set on an exception raised inside evaluation_pass(): the allocation failed at train.eval_batch_size
_DURING_EVALUATION = "_lora_sweep_during_evaluation"


@contextlib.contextmanager
def evaluation_pass(name: str = "validation") -> Iterator[None]:
    """Marks the code inside as an evaluation pass (validation or test, batches of train.eval_batch_size):
    an error raised there is tagged, so :func:`guard_memory` names the key that sizes those batches,
    whichever task's evaluator ran. ``name`` (validation, test) is what the message says it was."""
    try:
        yield
    except Exception as err:
        setattr(err, _DURING_EVALUATION, name)
        raise


def during_evaluation(err: BaseException) -> str | None:
    """The name of the :func:`evaluation_pass` the error was raised in; None: not in one (training)."""
    return getattr(err, _DURING_EVALUATION, None)


def _size(text: str) -> str:
    match = _TRIED.search(text)
    if not match:
        return ""
    size = match["size"]
    if size.endswith("bytes"):
        size = f"{int(size.split()[0]) / 2**20:.1f} MiB"
    return f", tried to allocate {size}"


def describe(
    err: BaseException, cfg: RunConfig, device: torch.device, evaluating: str | bool | None
) -> OutOfMemory:
    from lora_sweep.models import pick_precision

    train = cfg.train
    context = f"train.max_length={train.max_length}, precision {pick_precision(train.precision, device)}"
    if cfg.method.r is not None:
        context += f", method.r={cfg.method.r}"
    where = f"out of memory on {device}{_size(str(err))}"
    if evaluating:
        return OutOfMemory(
            "train.eval_batch_size",
            train.eval_batch_size,
            f"{where} during {evaluating if isinstance(evaluating, str) else 'validation'} "
            f"({context}); "
            "lower train.eval_batch_size",
        )
    return OutOfMemory(
        "train.batch_size",
        train.batch_size,
        f"{where} ({context}, train.grad_accum={train.grad_accum}); lower train.batch_size or "
        "train.max_length, "
        "or raise train.grad_accum",
    )


def release(device: torch.device, model=None) -> None:
    """Give the memory of the failed step back: gradients, the dead frames' tensors, the allocator's cache."""
    if model is not None:
        for parameter in model.parameters():
            parameter.grad = None
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def guard_memory(cfg: RunConfig, device: torch.device, work: Callable[[], T], model=None) -> T:
    """``work()``, with an out-of-memory error turned into :class:`OutOfMemory` after the memory is
    released."""
    try:
        return work()
    except Exception as err:  # noqa: BLE001 - anything else is re-raised untouched
        if not is_out_of_memory(err):
            raise
        problem = describe(err, cfg, device, during_evaluation(err))
    # outside the except block: the exception and the frames holding the activations are gone
    release(device, model)
    raise problem
