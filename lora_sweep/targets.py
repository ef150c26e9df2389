"""Named LoRA target presets resolved against a model's real module names.

A preset means the same thing on every architecture ("the attention query and value projections"), but
each family names its modules differently. Resolution looks at the model's actual ``nn.Linear`` modules
and returns the exact module names, so a preset that matches nothing is an error before any training.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from lora_sweep.config import TARGET_PRESETS
from lora_sweep.errors import ConfigError

# family -> preset -> regex on the full module name. all_linear is attention_all + mlp: the task head
# (classifier/score) and BERT's pooler stay out, they are not part of the transformer blocks.
FAMILIES: dict[str, dict[str, str]] = {
    "bert": {  # BERT, RoBERTa, MiniLM, ELECTRA, XLM-R
        "attention_qv": r".*\.attention\.self\.(query|value)",
        "attention_all": r".*\.attention\.(self\.(query|key|value)|output\.dense)",
        "mlp": r".*\.layer\.\d+\.(intermediate\.dense|output\.dense)",
    },
    "llama": {  # Llama, Mistral, Qwen2, SmolLM, Gemma
        "attention_qv": r".*\.self_attn\.(q_proj|v_proj)",
        "attention_all": r".*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
        "mlp": r".*\.mlp\.(gate_proj|up_proj|down_proj)",
    },
    "distilbert": {
        "attention_qv": r".*\.attention\.(q_lin|v_lin)",
        "attention_all": r".*\.attention\.(q_lin|k_lin|v_lin|out_lin)",
        "mlp": r".*\.ffn\.(lin1|lin2)",
    },
}
for _presets in FAMILIES.values():
    _presets["all_linear"] = f"({_presets['attention_all']})|({_presets['mlp']})"


def detect_family(linear_names: Iterable[str]) -> str | None:
    names = list(linear_names)
    for family, presets in FAMILIES.items():
        pattern = re.compile(presets["attention_qv"])
        if any(pattern.fullmatch(name) for name in names):
            return family
    return None


def resolve_targets(targets: str | list[str], linear_names: Iterable[str], key: str = "method.targets") -> list[str]:
    """Full names of the Linear modules that ``targets`` (a preset or explicit names) selects, sorted.

    Explicit names match a module by its full name or by a dotted suffix (``query`` matches
    ``...attention.self.query``), as PEFT does; each name must match at least one module.
    """
    names = sorted(set(linear_names))
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise ConfigError(key, targets, f"unknown target preset; one of {', '.join(TARGET_PRESETS)} or a list of module names")
        family = detect_family(names)
        if family is None:
            raise ConfigError(key, targets, f"the preset matches no module of this model (families known: {', '.join(FAMILIES)}); give module names instead")
        pattern = re.compile(FAMILIES[family][targets])
        chosen = [name for name in names if pattern.fullmatch(name)]
        if not chosen:
            raise ConfigError(key, targets, f"the preset matches no module of this {family}-like model")
        return chosen
    chosen: set[str] = set()
    for i, target in enumerate(targets):
        hits = [name for name in names if name == target or name.endswith("." + target)]
        if not hits:
            sample = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names})[:12])
            raise ConfigError(f"{key}[{i}]", target, f"no Linear module of the model has this name (names end in: {sample})")
        chosen.update(hits)
    return sorted(chosen)


def linear_module_names(model) -> list[str]:
    """Names of the Linear layers inside the transformer, excluding the task head."""
    import torch

    head_names = ("classifier", "score", "lm_head", "qa_outputs")
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not any(part in head_names for part in name.split("."))
    ]
