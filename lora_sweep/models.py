"""Describe and load the pretrained model: its module names on the meta device, its tokenizer, its weights,
and where and in which precision it trains. What the method makes of it is :mod:`lora_sweep.methods`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_sweep.config import ModelConfig
from lora_sweep.errors import ConfigError
from lora_sweep.hub import locate_model
from lora_sweep.targets import head_module_names, linear_module_names
from lora_sweep.weights import weights_problem

log = logging.getLogger(__name__)


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
    # the most tokens a sequence may have: the rows of a learned (or fixed) position table; None where
    # positions are computed (rotary, relative, ALiBi), which run past what the model was trained on
    position_limit: int | None = None
    trained_positions: int | None = None  # the config's max_position_embeddings (or n_positions, ...)
    module_names: list[str] = field(default_factory=list)  # every module, for method.modules_to_save


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
    if Path(source).is_dir():
        check_model_folder(Path(source), cfg.name_or_path)
    try:
        config = AutoConfig.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, num_labels=num_labels
        )
    except (OSError, ValueError, KeyError) as err:  # e.g. a model_type this transformers does not know
        raise ConfigError("model.name_or_path", cfg.name_or_path, _first_line(err)) from None
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
        position_limit=position_limit(skeleton),
        trained_positions=trained_positions(config),
        module_names=[name for name, _ in skeleton.named_modules() if name],
    )


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def check_model_folder(folder: Path, name_or_path: str) -> None:
    """A local model folder's config.json and safetensors headers, read before transformers sees them:
    transformers answers a broken config.json with a traceback, and a truncated weight file only fails once
    the weights load, after the data is tokenized and the run recorded."""
    key = "model.name_or_path"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(
            key, name_or_path, f"config.json is not UTF-8 (byte at offset {err.start})"
        ) from None
    except json.JSONDecodeError as err:
        raise ConfigError(
            key,
            name_or_path,
            f"config.json is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})",
        ) from None
    if not isinstance(config, dict):
        raise ConfigError(
            key, name_or_path, f"config.json holds a {type(config).__name__}, not a JSON object"
        )
    if not config.get("model_type"):
        # transformers would guess the architecture from any model name inside the folder's path
        raise ConfigError(
            key,
            name_or_path,
            "config.json has no model_type, so the architecture is unknown; "
            'add it (e.g. "model_type": "bert")',
        )
    for name in JSON_FILES:  # read by the tokenizer and generation loaders, with tracebacks of their own
        if (folder / name).is_file():
            try:
                json.loads((folder / name).read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                where = f"line {err.lineno}, column {err.colno}: {err.msg}" if hasattr(err, "lineno") else err
                raise ConfigError(key, name_or_path, f"{name} is not valid JSON ({where})") from None
    problem = weights_problem(folder)
    if problem:
        raise ConfigError(key, name_or_path, problem)


def position_limit(skeleton) -> int | None:
    """The longest sequence the model's position table holds, from the table itself (on meta): RoBERTa's
    and BART's start past an offset, so max_position_embeddings overstates them. None for a model whose
    positions are computed (rotary, relative, ALiBi): it has no table to run out of."""
    limits = []
    for name, module in skeleton.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if not isinstance(module, torch.nn.Embedding) or "relative" in leaf:
            continue
        if "position" in leaf or leaf == "wpe":
            offset = getattr(module, "offset", None)
            if offset is None:  # RoBERTa-style position ids count from padding_idx + 1
                offset = module.padding_idx + 1 if module.padding_idx is not None else 0
            limits.append(module.num_embeddings - offset)
    return min(limits) if limits else None


def trained_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_max_length(spec: ModelSpec, max_length: int) -> None:
    """train.max_length against the model's positions: past a position table the forward pass fails (an
    index error in the embedding), so that is an error; past what a rotary model was trained on it runs,
    with quality that may drop, so that is a warning."""
    if spec.position_limit is not None and max_length > spec.position_limit:
        table = f", max_position_embeddings={spec.trained_positions}" if spec.trained_positions else ""
        raise ConfigError(
            "train.max_length",
            max_length,
            f"above the model's {spec.position_limit} positions (a learned position table{table}); "
            f"set train.max_length={spec.position_limit} or less",
        )
    if spec.position_limit is None and spec.trained_positions and max_length > spec.trained_positions:
        log.warning(
            "train.max_length=%d is past the %d positions the model was trained on "
            "(max_position_embeddings); it runs, but quality may drop on longer sequences",
            max_length,
            spec.trained_positions,
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

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            spec.source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as err:  # noqa: BLE001 - tokenizers' own errors (Rust, KeyError, ...) share no base
        raise ConfigError(
            "model.name_or_path",
            cfg.name_or_path,
            f"its tokenizer does not load ({type(err).__name__}: {_first_line(err)})",
        ) from None
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


def matmul_parameters(model) -> int:
    """Parameters that take part in a matrix product: all but embedding tables, which are looked up (a
    table tied to the output head, as causal LMs tie it, multiplies there and counts)."""
    multiplied = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    lookups = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Embedding) and m.weight.data_ptr() not in multiplied
    )
    return sum(p.numel() for p in model.parameters()) - lookups


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
