"""Describe and load the pretrained model: its module names on the meta device, its tokenizer, its weights,
and where and in which precision it trains. What the method makes of it is :mod:`lora_sweep.methods`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from lora_sweep.config import ModelConfig
from lora_sweep.hub import locate_model
from lora_sweep.targets import head_module_names, linear_module_names


@dataclass
class ModelSpec:
    """What we know about a model from its config alone, before any weight is read."""

    source: str  # local folder or hub id
    task: str  # sequence_classification | causal_lm
    model_type: str
    family: str | None
    linear_names: list[str]
    total_params: int
    # top-level modules the task class adds to the bare model (the new classifier, or lm_head): never LoRA
    # targets; a sequence classifier trains and saves them in full (modules_to_save)
    head_names: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _quiet_transformers():
    """Hide the expected "classifier weights newly initialized" notice: a fresh head is the point."""
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(previous)


def model_source(cfg: ModelConfig) -> str:
    """A folder or hub id to load from; a GGUF file is first converted into a plain checkpoint (cached)."""
    if cfg.gguf_file:
        from lora_sweep.gguf import ensure_converted

        return str(ensure_converted(cfg.name_or_path, cfg.gguf_file, cfg.cache_dir))
    return locate_model(cfg.name_or_path, cfg.revision)


def auto_class(task: str):
    """The transformers auto class of a task (by name): a new classification head, or the model's LM head."""
    from lora_sweep.tasks import get_task

    return get_task(task).auto_class()


def inspect_model(cfg: ModelConfig, num_labels: int = 2) -> ModelSpec:
    """Read config.json and build the model on the meta device: module names and sizes, no weights."""
    from transformers import AutoConfig

    source = model_source(cfg)
    # RunConfig resolves "auto" from data.kind; a bare ModelConfig means a classifier, as it always did
    task = cfg.task if cfg.task != "auto" else "sequence_classification"
    config = AutoConfig.from_pretrained(
        source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, num_labels=num_labels
    )
    with torch.device("meta"), _quiet_transformers():
        skeleton = auto_class(task).from_config(config, trust_remote_code=cfg.trust_remote_code)
    heads = _head_names(skeleton, config, cfg.trust_remote_code)
    return ModelSpec(
        source=source,
        task=task,
        model_type=config.model_type,
        family=config.model_type,
        linear_names=linear_module_names(skeleton, heads),
        total_params=sum(p.numel() for p in skeleton.parameters()),
        head_names=heads,
    )


def _head_names(skeleton, config, trust_remote_code: bool) -> list[str]:
    """The task model's modules that the bare model (AutoModel, on meta) lacks; the task model's own body
    stands in where no AutoModel exists for the config."""
    from transformers import AutoModel

    try:
        with torch.device("meta"), _quiet_transformers():
            base = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - no bare model for this config (remote code, composite): use the body
        base = None
    return head_module_names(skeleton, base)


def load_tokenizer(spec: ModelSpec, cfg: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        spec.source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if tokenizer.pad_token is None:  # decoder LMs ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(spec: ModelSpec, cfg: ModelConfig, label_names: list[str], pad_token_id: int | None):
    """The pretrained encoder/decoder with a freshly initialised classification head, in fp32; or, for a
    causal LM, the pretrained model with its own LM head."""
    from lora_sweep.tasks import get_task

    if not get_task(spec.task).new_head:  # e.g. a causal LM keeps its own LM head
        model = auto_class(spec.task).from_pretrained(
            spec.source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=torch.float32
        )
        if model.generation_config.pad_token_id is None and pad_token_id is not None:
            model.generation_config.pad_token_id = pad_token_id  # generate() warns on every call otherwise
        return model
    with _quiet_transformers():
        model = auto_class(spec.task).from_pretrained(
            spec.source,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
            dtype=torch.float32,
        )
    if model.config.pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # decoder classifiers find the last token by it
    return model


def set_gradient_checkpointing(model, enabled: bool) -> None:
    """Recompute activations in the backward pass (less memory, more time). Set on the base model before
    the method wraps it; switched off again for a reused base model whose last trial had it on."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        if enabled:
            from lora_sweep.errors import ConfigError

            raise ConfigError(
                "train.gradient_checkpointing", enabled, f"{type(model).__name__} does not support it"
            )
        return
    if enabled:
        # non-reentrant: gradients reach LoRA layers even though the frozen embeddings need none
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    elif model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()


def count_parameters(model) -> dict[str, float]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total, "trainable_ratio": trainable / total}


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        from lora_sweep.errors import ConfigError

        raise ConfigError("train.device", requested, "CUDA is not available on this machine")
    return device


def pick_precision(requested: str, device: torch.device) -> str:
    """auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU (bf16 autocast is slow there)."""
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            from lora_sweep.errors import ConfigError

            raise ConfigError("train.precision", requested, "fp16 needs a GPU; use fp32 or bf16 on CPU")
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"
