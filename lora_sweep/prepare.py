"""Everything a run needs before training, validated against the model's and the data's own description
before a single weight is read: the model's config and module names (on the meta device), the target
preset, the tokenizer, the prepared data. Cached per process (a sweep's later trials reuse it).

Used by a run, by the sweep's up-front validation and by the report's checkpoint loading.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

from lora_sweep.config import RunConfig
from lora_sweep.data import TaskData
from lora_sweep.methods import peft_config, trained_head
from lora_sweep.models import ModelSpec, check_max_length, inspect_model, load_tokenizer
from lora_sweep.schema import to_dict
from lora_sweep.targets import check_modules_to_save, resolve_targets
from lora_sweep.tasks import check as check_task
from lora_sweep.tasks import get_task


@dataclass
class Prepared:
    """What a run needs before training, all of it validated."""

    spec: ModelSpec
    tokenizer: object
    data: TaskData
    targets: list[str] | None
    setup_seconds: float
    reused: bool = False


# Setup paid once per process: a sweep's later trials reuse the tokenized data.
_PREPARED: dict[str, Prepared] = {}


def cache_key(*parts: object) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def prepare(cfg: RunConfig) -> Prepared:
    """Validate everything against the model's and the data's own description, before any weight loads."""
    started = time.perf_counter()
    check_task(cfg)  # idempotent: a config built outside the CLI is checked here too
    key = cache_key(to_dict(cfg.model), to_dict(cfg.data), cfg.train.max_length)
    cached = _PREPARED.get(key)
    reused = cached is not None
    if cached is None:
        spec = inspect_model(cfg.model, num_labels=cfg.model.num_labels or 2)
        if cfg.method.adapter:  # a bad target list is the first thing to hear about, as before
            resolve_targets(cfg.method.targets, spec.linear_names)
        check_max_length(spec, cfg.train.max_length)  # before tokenizing: the data cache is keyed by it
        tokenizer = load_tokenizer(spec, cfg.model)
        data = get_task(cfg).prepare_data(cfg, tokenizer)
        cached = _PREPARED[key] = Prepared(spec, tokenizer, data, None, 0.0)
    targets = resolve_targets(cfg.method.targets, cached.spec.linear_names) if cfg.method.adapter else None
    if cfg.method.adapter:  # PEFT's own checks of the method's values, before any weight loads
        check_modules_to_save(cfg.method.modules_to_save, cached.spec.module_names)
        peft_config(
            cfg.method,
            targets,
            cached.spec.task,
            trained_head(cached.spec),
            total_steps=cfg.train.plan_steps(len(cached.data.splits["train"]))[1],
        )
    seconds = time.perf_counter() - started
    return dataclasses.replace(cached, targets=targets, setup_seconds=seconds, reused=reused)
