"""Named LoRA target presets resolved against a model's real module names.

A preset means the same thing on every architecture ("the attention query and value projections"), but
each family names its modules differently. Resolution gives every targetable layer (``nn.Linear`` or
transformers' ``Conv1D``, the task head left out) a role read from its leaf name and its parent module's
name, using the table :data:`ROLES`; a preset is a set of roles. A preset that matches nothing is an error
before any training.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from lora_sweep.config import TARGET_PRESETS
from lora_sweep.errors import ConfigError

# A parent module that is attention: self_attn, attn, attention(.self), SelfAttention, self_attention, and
# cross-attention (encoder_attn, EncDecAttention, crossattention); matched case-insensitively.
_ATTENTION = r"[^.]*att(?:n|ention)[^.]*(?:\.self)?"
# A parent module that is the feed-forward block: mlp, ffn, feed_forward, T5's DenseReluDense, MoE experts.
_MLP = r"[^.]*(?:mlp|ffn|feed_?forward|DenseReluDense|moe)[^.]*(?:\.experts\.\d+)?"
_ANY = r"[^.]+(?:\.[^.]+)*"  # the leaf name alone decides (the parent is the block itself)

# (role, parent pattern, leaf pattern, who names it so). The first row that matches a module's full name
# (``...<parent>.<leaf>``) gives its role; attention rows come first, so that BERT's attention.output.dense
# is the attention output and only the block's own output.dense is the MLP's down projection.
# fmt: off
ROLES: list[tuple[str, str, str, str]] = [
    ("qkv", _ATTENTION, r"c_attn|qkv_proj|query_key_value|Wqkv|qkv|in_proj|W_pack",
     "GPT-2, GPT-BigCode, Phi-3, GPT-NeoX, Falcon, BLOOM, MPT, Baichuan"),
    ("q", _ATTENTION, r"q|q_proj|query|query_proj|q_lin|wq", "Llama, BERT, BART, T5, DeBERTa, DistilBERT"),
    ("k", _ATTENTION, r"k|k_proj|key|key_proj|k_lin|wk", "as q"),
    ("v", _ATTENTION, r"v|v_proj|value|value_proj|v_lin|wv", "as q"),
    ("o", _ATTENTION, r"o|o_proj|out_proj|out_lin|c_proj|dense|wo", "Llama, BART, T5, GPT-2, ALBERT"),
    ("o", _ATTENTION + r"\.output", r"dense", "BERT, RoBERTa, DeBERTa, ELECTRA"),
    ("gate_up", _MLP, r"gate_up_proj", "Phi-3"),
    ("gate", _MLP, r"gate_proj|w1|wi_0", "Llama, Mistral, Qwen2, Gemma, Mixtral, gated T5"),
    ("up", _MLP, r"up_proj|c_fc|fc1|fc_in|w3|wi|wi_1|dense_h_to_4h|lin1", "Llama, GPT-2, T5, DistilBERT"),
    ("down", _MLP, r"down_proj|c_proj|fc2|fc_out|w2|wo|dense_4h_to_h|lin2", "as up"),
    ("up", _ANY, r"fc1|ffn", "BART, OPT, Whisper (fc1 in the block itself), ALBERT (ffn)"),
    ("down", _ANY, r"fc2|ffn_output", "BART, OPT, Whisper, ALBERT"),
    ("up", r"intermediate", r"dense", "BERT, RoBERTa, DeBERTa, ELECTRA, FNet"),
    ("down", r"output", r"dense", "BERT, RoBERTa, DeBERTa, ELECTRA, FNet"),
]
# fmt: on

# all_linear takes every targetable layer whatever its role (PEFT's "all-linear"), so it has no row here.
PRESET_ROLES: dict[str, frozenset[str]] = {
    "attention_qv": frozenset({"q", "v", "qkv"}),  # a fused qkv layer holds q and v
    "attention_all": frozenset({"q", "k", "v", "o", "qkv"}),
    "mlp": frozenset({"up", "gate", "down", "gate_up"}),
}

_COMPILED = [
    (role, re.compile(rf"(?:^|\.)(?:{parent})\.(?:{leaf})$", re.IGNORECASE))
    for role, parent, leaf, _ in ROLES
]


def module_role(name: str) -> str | None:
    """The role of the layer of this full module name: q, k, v, o, qkv, up, gate, down, gate_up, or None."""
    for role, pattern in _COMPILED:
        if pattern.search(name):
            return role
    return None


def _leaf_names(names: Iterable[str], limit: int = 40) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    return ", ".join(leaves[:limit]) + (", ..." if len(leaves) > limit else "")


def check_modules_to_save(
    modules: list[str], module_names: Iterable[str], key: str = "method.modules_to_save"
) -> None:
    """Each name must match a module by its full name or a dotted suffix, as PEFT matches them: PEFT itself
    skips a name that matches nothing, and the module would silently stay frozen."""
    names = list(module_names)
    for i, module in enumerate(modules):
        if not any(name == module or name.endswith("." + module) for name in names):
            top = sorted({name.split(".")[0] for name in names})
            raise ConfigError(
                f"{key}[{i}]",
                module,
                f"no module of the model has this name (its top-level modules: {', '.join(top)})",
            )


def resolve_targets(
    targets: str | list[str], linear_names: Iterable[str], key: str = "method.targets"
) -> list[str]:
    """Full names of the targetable modules that ``targets`` (a preset or explicit names) selects, sorted.

    Explicit names match a module by its full name or by a dotted suffix (``query`` matches
    ``...attention.self.query``), as PEFT does; each name must match at least one module.
    """
    names = sorted(set(linear_names))
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise ConfigError(
                key,
                targets,
                f"unknown target preset; one of {', '.join(TARGET_PRESETS)} or a list of module names",
            )
        roles = PRESET_ROLES.get(targets)
        chosen = [name for name in names if roles is None or module_role(name) in roles]
        if not chosen:
            raise ConfigError(
                key,
                targets,
                f"the preset matches no module of this model (targetable modules end in: "
                f"{_leaf_names(names) or 'none'}); give module names instead",
            )
        return chosen
    chosen: set[str] = set()
    for i, target in enumerate(targets):
        hits = [name for name in names if name == target or name.endswith("." + target)]
        if not hits:
            raise ConfigError(
                f"{key}[{i}]",
                target,
                f"no Linear module of the model has this name (names end in: {_leaf_names(names)})",
            )
        chosen.update(hits)
    return sorted(chosen)


def _has_parameters(module) -> bool:
    return next(iter(module.parameters()), None) is not None


def head_module_names(model, base=None) -> list[str]:
    """Top-level names of the modules the task class adds to the bare model: the task head (BERT's
    ``classifier``, BART's ``classification_head``, DeBERTa's ``pooler`` and ``classifier``, ``score``,
    ``lm_head``), found by comparing ``model`` with ``base``, a bare model of the same config (by default
    the task model's own body, ``model.base_model``). Modules without parameters (dropout) are left out."""
    inner = getattr(model, "base_model", model)
    if inner is model:  # a bare model: nothing was added
        return []
    prefix = next((name for name, module in model.named_modules() if module is inner), "")
    base = inner if base is None else base
    body = {prefix} | {f"{prefix}.{name}" if prefix else name for name, _ in base.named_modules() if name}
    added = [
        name
        for name, module in model.named_modules()
        if name and name not in body and not prefix.startswith(name + ".") and _has_parameters(module)
    ]
    return [name for name in added if not any(name.startswith(other + ".") for other in added)]


def linear_module_names(model, head_names: Iterable[str] | None = None) -> list[str]:
    """Names of the layers LoRA can adapt (``nn.Linear`` and transformers' ``Conv1D``, as PEFT's
    "all-linear"), excluding the task head (``head_names``; by default :func:`head_module_names`)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    heads = tuple(head_module_names(model) if head_names is None else head_names)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D))
        and not any(name == head or name.startswith(head + ".") for head in heads)
    ]
