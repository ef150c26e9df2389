"""A method config (``conf/method/<name>.yaml``) mapped onto PEFT's own config class, and applied to a model.

PEFT describes every adapter method with a config dataclass (``peft.LoraConfig``, ``peft.LoHaConfig``, ...),
found from its method type by ``peft.PEFT_TYPE_TO_CONFIG_MAPPING``. A method file names the type
(``peft: LOHA``); its ``options`` are that class's fields under PEFT's own names; the shorthand keys that
lora_sweep's sweeps search across methods (``r``, ``alpha``, ``dropout``, ``init``, ``variant``, ``bias``)
land on the class's field for the same idea, found by :data:`SHORTHANDS`. A new PEFT method is therefore one
YAML file; only a method that names one of those ideas unusually needs a candidate added to that table.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lora_sweep.config import MethodConfig
from lora_sweep.errors import ConfigError
from lora_sweep.targets import resolve_targets

# shorthand key -> the candidate field names on PEFT's config class, first match wins; "{type}" stands for
# the method type in lower case (vera_dropout, boft_dropout, init_ia3_weights, ...)
SHORTHANDS: dict[str, tuple[str, ...]] = {
    "r": ("r",),
    "alpha": ("lora_alpha", "alpha", "{type}_alpha"),
    "dropout": ("lora_dropout", "module_dropout", "{type}_dropout"),
    "init": ("init_lora_weights", "init_weights", "init_{type}_weights"),
    "bias": ("bias",),
}
# variant -> the boolean fields of the LoRA family it switches on
VARIANT_FIELDS = {"lora": (), "rslora": ("use_rslora",), "dora": ("use_dora",)}
# fields PEFT needs from the run itself, filled when the method file leaves them null
RUN_FIELDS = ("total_step",)
# fields naming a subset of the targets (IA3: layers whose input, not output, is scaled): resolved to the
# same full names as target_modules, because PEFT compares the two lists literally when an adapter reloads
SUBSET_FIELDS = ("feedforward_modules",)


def config_class(method: MethodConfig):
    """PEFT's config dataclass for ``method.peft``; a one-line error for a type PEFT does not have."""
    import peft

    mapping = peft.PEFT_TYPE_TO_CONFIG_MAPPING
    if method.peft not in mapping:
        known = ", ".join(sorted(str(k) for k in mapping))
        raise ConfigError(
            "method.peft", method.peft, f"not a PEFT method type (PEFT {peft.__version__} has: {known})"
        )
    return mapping[method.peft]


def _field_for(shorthand: str, fields: set[str], peft_type: str) -> str | None:
    for candidate in SHORTHANDS[shorthand]:
        name = candidate.format(type=peft_type.lower())
        if name in fields:
            return name
    return None


def peft_kwargs(
    method: MethodConfig,
    target_names: list[str],
    head_names: list[str] | None = None,
    total_steps: int | None = None,
) -> dict[str, Any]:
    """The keyword arguments of PEFT's config class for this method, every key checked against its fields."""
    cls = config_class(method)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {"target_modules": list(target_names)}
    values = {
        "r": method.r,
        "alpha": method.effective_alpha,
        "dropout": method.dropout,
        "bias": method.bias,
        "init": None if method.init in (None, "default") else method.init,
    }
    for shorthand, value in values.items():
        if value is None:
            continue
        name = _field_for(shorthand, fields, method.peft)
        if name is None:
            key = "alpha" if shorthand == "alpha" and method.alpha is None else shorthand
            raise ConfigError(
                f"method.{key}",
                getattr(method, key),
                f"{cls.__name__} has no such setting; set the method's own fields under method.options",
            )
        kwargs[name] = value
    for flag in VARIANT_FIELDS.get(method.variant or "lora", ()):
        if flag not in fields:
            raise ConfigError("method.variant", method.variant, f"{cls.__name__} has no {flag}")
        kwargs[flag] = True
    for name, value in method.options.items():
        if name not in fields or name in ("peft_type", "task_type", "target_modules"):
            raise ConfigError(f"method.options.{name}", value, f"not a field of peft.{cls.__name__}")
        kwargs[name] = value
    for name in SUBSET_FIELDS:
        if name in fields:
            wanted = kwargs.get(name) or []
            kwargs[name] = [t for t in target_names if any(t == w or t.endswith("." + w) for w in wanted)]
    for name in RUN_FIELDS:
        if name in fields and kwargs.get(name) is None and total_steps is not None:
            kwargs[name] = total_steps
    modules_to_save = [*(head_names or []), *method.modules_to_save]
    if modules_to_save:
        kwargs["modules_to_save"] = list(dict.fromkeys(modules_to_save))
    return kwargs


def peft_config(
    method: MethodConfig,
    target_names: list[str],
    task: str,
    head_names: list[str] | None = None,
    total_steps: int | None = None,
):
    """PEFT's config object for the method; PEFT's own checks of the values become one key-named line."""
    from peft import TaskType

    from lora_sweep.tasks import get_task

    cls = config_class(method)
    task_type = TaskType[get_task(task).peft_task_type]  # the PeftModel class that wraps this task's model
    try:
        return cls(task_type=task_type, **peft_kwargs(method, target_names, head_names, total_steps))
    except (ValueError, TypeError) as err:
        raise ConfigError("method", method.name, f"peft.{cls.__name__}: {str(err).splitlines()[0]}") from None


def apply_method(
    model, method: MethodConfig, spec, targets: list[str] | None = None, total_steps: int | None = None
):
    """Adapter methods: wrap in a PeftModel whose only trainable parameters are the adapter and the head.
    Full fine-tuning: every weight trains. A run passes the targets it resolved once (its prepared state);
    a direct caller may leave them to be resolved here from the model's description."""
    if not method.adapter:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    import torch
    from peft import get_peft_model

    if targets is None:
        targets = resolve_targets(method.targets, spec.linear_names)

    model = get_peft_model(
        model, peft_config(method, list(targets or []), spec.task, trained_head(spec), total_steps)
    )
    # over a bf16/fp16 base every trainable weight stays fp32: AdamW's small updates would round away
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return model


def trained_head(spec) -> list[str]:
    """The modules the task adds (a new classifier) train in full and are saved with the adapter, whatever
    the family calls them; a causal LM's own pretrained head stays frozen."""
    from lora_sweep.tasks import get_task

    return list(spec.head_names) if get_task(spec.task).new_head else []


def after_optimizer_step(model, step: int) -> None:
    """Methods whose adapter changes shape as training goes (AdaLoRA re-allocates its rank budget) are told
    of every optimizer step, through PEFT's own hook."""
    tuner = getattr(model, "base_model", None)
    if hasattr(tuner, "update_and_allocate"):
        tuner.update_and_allocate(step)


def is_mergeable(model) -> bool:
    """Whether the trained adapter folds into the base weights (``merge_and_unload``): free inference."""
    config = getattr(model, "peft_config", {}).get("default")
    return config is not None and not config.is_prompt_learning and hasattr(model, "merge_and_unload")


def run_name(method: MethodConfig, lr: float) -> str:
    """A short, readable name: ``lora-r8-a16-attention_qv-lr0.002``, ``ia3-all_linear-lr0.01``,
    ``full-lr1e-05``."""
    parts = [method.name + ("" if method.variant in (None, "lora") else f"-{method.variant}")]
    if method.r is not None:
        parts.append(f"r{method.r}")
    if method.effective_alpha is not None:
        parts.append(f"a{method.effective_alpha:g}")
    if method.targets is not None:
        parts.append(method.targets if isinstance(method.targets, str) else "custom")
    return "-".join([*parts, f"lr{lr:g}"])


def derived_params(method: MethodConfig, targets: list[str] | None) -> dict[str, Any]:
    """What the config implies but does not state: effective alpha, scaling, how many modules are adapted."""
    if not method.adapter:
        return {}
    # the "lora." names predate other methods; kept so saved MLflow views and comparisons still find them
    params: dict[str, Any] = {"lora.num_target_modules": len(targets or [])}
    if method.effective_alpha is not None:
        params["lora.effective_alpha"] = method.effective_alpha
    if method.scaling is not None:
        params["lora.scaling"] = method.scaling
    return params


def load_adapter(base, folder):
    """A saved adapter on its base model, as PEFT loads it (the adapter's type comes from its own
    adapter_config.json), in eval mode. Loaded as trainable because AdaLoRA's forward reads the settings of
    its trainable adapter even when it only evaluates; under ``torch.no_grad`` that costs nothing."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(folder), is_trainable=True).eval()
