"""Load the pretrained model and turn it into what the method trains: a PEFT LoRA model, or itself.

Full fine-tuning and LoRA differ only in :func:`apply_method`; everything downstream (the loop,
checkpoints, tracking) sees a ``torch.nn.Module`` with some parameters requiring grad.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from lora_sweep.config import FullMethodConfig, LoraMethodConfig, ModelConfig
from lora_sweep.hub import locate_model
from lora_sweep.targets import detect_family, linear_module_names, resolve_targets


@dataclass
class ModelSpec:
    """What we know about a model from its config alone, before any weight is read."""

    source: str  # local folder or hub id
    task: str  # sequence_classification | causal_lm
    model_type: str
    family: str | None
    linear_names: list[str]
    total_params: int


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
    config = AutoConfig.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, num_labels=num_labels)
    with torch.device("meta"), _quiet_transformers():
        skeleton = auto_class(task).from_config(config, trust_remote_code=cfg.trust_remote_code)
    names = linear_module_names(skeleton)
    return ModelSpec(
        source=source,
        task=task,
        model_type=config.model_type,
        family=detect_family(names),
        linear_names=names,
        total_params=sum(p.numel() for p in skeleton.parameters()),
    )


def load_tokenizer(spec: ModelSpec, cfg: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:  # decoder LMs ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(spec: ModelSpec, cfg: ModelConfig, label_names: list[str], pad_token_id: int | None):
    """The pretrained encoder/decoder with a freshly initialised classification head, in fp32; or, for a
    causal LM, the pretrained model with its own LM head."""
    from lora_sweep.tasks import get_task

    if not get_task(spec.task).new_head:  # e.g. a causal LM keeps its own LM head
        model = auto_class(spec.task).from_pretrained(spec.source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                                      dtype=torch.float32)
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


def peft_lora_config(method: LoraMethodConfig, target_names: list[str], task: str = "sequence_classification"):
    from peft import LoraConfig, TaskType

    from lora_sweep.tasks import get_task

    return LoraConfig(
        # SEQ_CLS also trains and saves the new classifier head (modules_to_save); a causal LM keeps its own head
        task_type=TaskType[get_task(task).peft_task_type],
        r=method.r,
        lora_alpha=method.effective_alpha,
        lora_dropout=method.dropout,
        target_modules=list(target_names),
        use_rslora=method.variant == "rslora",
        use_dora=method.variant == "dora",
        init_lora_weights=True if method.init == "default" else method.init,
        bias=method.bias,
        modules_to_save=list(method.modules_to_save) or None,
    )


def apply_method(model, method: LoraMethodConfig | FullMethodConfig, spec: ModelSpec):
    """LoRA: wrap in a PeftModel whose only trainable parameters are adapters and the head. Full: all."""
    if isinstance(method, FullMethodConfig):
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    from peft import get_peft_model

    targets = resolve_targets(method.targets, spec.linear_names)
    return get_peft_model(model, peft_lora_config(method, targets, spec.task))


def set_gradient_checkpointing(model, enabled: bool) -> None:
    """Recompute activations in the backward pass (less memory, more time). Set on the base model before
    the method wraps it; switched off again for a reused base model whose last trial had it on."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        if enabled:
            from lora_sweep.errors import ConfigError

            raise ConfigError("train.gradient_checkpointing", enabled, f"{type(model).__name__} does not support it")
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
