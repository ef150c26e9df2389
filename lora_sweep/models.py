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
    check_quantization(cfg)
    check_attention(cfg, auto_class(task), config)
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


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANT_PIP = "pip install 'lora_sweep[quant]' (or pip install 'bitsandbytes>=0.45')"


@dataclass(frozen=True)
class BasePlan:
    """How the base model's weights load: the one decision of dtypes and quantization (:func:`plan_base`)."""

    dtype: torch.dtype  # what from_pretrained loads the unquantized weights in
    quantization: str = "none"  # none | 4bit | 8bit
    compute_dtype: torch.dtype = torch.float32  # what a 4-bit layer dequantizes to for its matmul
    device: str | None = None  # a quantized base is placed by from_pretrained (device_map), never moved
    attn_implementation: str = "sdpa"

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"

    @property
    def base_dtype(self) -> str:
        """The frozen weights' storage, as the record and MLflow name it."""
        if self.quantization == "4bit":
            return "nf4"
        if self.quantization == "8bit":
            return "int8"
        return str(self.dtype).removeprefix("torch.")

    @property
    def trainable_dtype(self) -> str:
        return "float32"  # adapters, the new head and full fine-tuning's master weights

    def key(self) -> tuple:
        """What tells two loaded base models apart besides the checkpoint: for the reuse cache."""
        return (self.base_dtype, str(self.compute_dtype), self.device, self.attn_implementation)


def plan_base(cfg: ModelConfig, adapter: bool, device: torch.device) -> BasePlan:
    """The frozen base's dtype and quantization for this method on this device.

    auto: an adapter method on a GPU keeps its frozen base in bf16 (fp16 where the GPU has no bf16), halving
    its memory; its trainable parameters stay fp32. Full fine-tuning keeps fp32 master weights (bf16 comes
    from autocast). On CPU fp32: bf16 matmuls are slower there. A 4-bit base computes in bf16 on a GPU and
    in fp32 on CPU (bitsandbytes' CPU kernels dequantize either way; fp32 is the faster and exact one).
    """
    cuda = device.type == "cuda"
    bf16_ok = not cuda or torch.cuda.is_bf16_supported()
    if cfg.dtype == "auto":
        name = ("bf16" if bf16_ok else "fp16") if cuda and (adapter or cfg.quantization != "none") else "fp32"
    else:
        name = cfg.dtype
        if name == "bf16" and not bf16_ok:
            raise ConfigError("model.dtype", name, "this GPU has no bf16; use model.dtype=fp16 or auto")
        if name == "fp16" and not cuda:
            raise ConfigError(
                "model.dtype", name, "fp16 weights need a GPU; use model.dtype=bf16 or fp32 on CPU"
            )
    compute = TORCH_DTYPES[name] if cuda else torch.float32
    where = None
    if cfg.quantization != "none":
        where = str(device) if device.type != "cuda" or device.index is not None else f"cuda:{_cuda_index()}"
    return BasePlan(TORCH_DTYPES[name], cfg.quantization, compute, where, cfg.attn_implementation)


def _cuda_index() -> int:
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def check_quantization(cfg: ModelConfig) -> None:
    """A quantized base needs bitsandbytes: said before any weight loads."""
    import importlib.util

    if cfg.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.quantization", cfg.quantization, f"needs bitsandbytes: {QUANT_PIP}")


def check_attention(cfg: ModelConfig, skeleton_class, config) -> None:
    """The attention implementation against what is installed and what the model supports, on the meta
    skeleton (transformers runs its own dispatch checks when a model is built)."""
    choice = cfg.attn_implementation
    if choice == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise ConfigError(
                "model.attn_implementation",
                choice,
                "flash-attn is not installed or has no GPU here (on a CUDA machine: "
                "pip install flash-attn --no-build-isolation); use sdpa",
            )
    if choice == "sdpa":  # the default: transformers falls back to eager where a model has no SDPA
        return
    try:
        with torch.device("meta"), _quiet_transformers():
            skeleton_class.from_config(config, attn_implementation=choice)
    except (ValueError, ImportError) as err:
        raise ConfigError("model.attn_implementation", choice, _first_line(err)) from None


def _attention_kwargs(plan: BasePlan) -> dict:
    # sdpa stays transformers' own default, which falls back to eager for models without SDPA
    return {} if plan.attn_implementation == "sdpa" else {"attn_implementation": plan.attn_implementation}


def _quantization_kwargs(plan: BasePlan, skip: list[str]) -> dict:
    if not plan.quantized:
        return {}
    from transformers import BitsAndBytesConfig

    if plan.quantization == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=plan.compute_dtype,
            llm_int8_skip_modules=skip or None,  # also 4-bit's skip list: the head stays a plain Linear
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip or None)
    return {"quantization_config": config, "device_map": {"": plan.device}}


def load_base_model(
    spec: ModelSpec,
    cfg: ModelConfig,
    label_names: list[str],
    pad_token_id: int | None,
    plan: BasePlan | None = None,
):
    """The pretrained encoder/decoder with a freshly initialised classification head; or, for a causal LM,
    the pretrained model with its own LM head. In the plan's dtype (fp32 without one), quantized by
    bitsandbytes when it says so: then prepared for k-bit training (PEFT), its task head left unquantized."""
    from lora_sweep.tasks import get_task

    plan = plan or BasePlan(torch.float32, attn_implementation=cfg.attn_implementation)
    common = {
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "dtype": plan.dtype,
        **_attention_kwargs(plan),
        **_quantization_kwargs(plan, list(spec.head_names)),
    }
    if not get_task(spec.task).new_head:  # e.g. a causal LM keeps its own LM head
        model = auto_class(spec.task).from_pretrained(spec.source, **common)
        if model.generation_config.pad_token_id is None and pad_token_id is not None:
            model.generation_config.pad_token_id = pad_token_id  # generate() warns on every call otherwise
        return _prepared_for_kbit(model, plan)
    with _quiet_transformers():
        model = auto_class(spec.task).from_pretrained(
            spec.source,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
            **common,
        )
    if model.config.pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # decoder classifiers find the last token by it
    if plan.dtype != torch.float32 and not plan.quantized:
        # the new head trains: fp32 like every trainable weight (the method's copy of it inherits this)
        for name in spec.head_names:
            model.get_submodule(name).float()
    return _prepared_for_kbit(model, plan)


def _prepared_for_kbit(model, plan: BasePlan):
    """PEFT's k-bit preparation (norms and other unquantized weights to fp32, everything frozen); gradient
    checkpointing is switched per run by :func:`set_gradient_checkpointing`."""
    if not plan.quantized:
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def dtypes_of(model) -> dict[str, str]:
    """The dtypes the frozen and the trainable parameters actually have (a quantized layer's storage is
    uint8 or int8), for the record."""
    frozen = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.requires_grad})
    trainable = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})
    return {"frozen": ",".join(frozen), "trainable": ",".join(trainable)}


def wants_gradient_checkpointing(setting: bool | str, plan: BasePlan, model=None) -> bool:
    """train.gradient_checkpointing: auto means on for a quantized base (QLoRA's memory is the point) that
    supports it, off otherwise; true and false are what they say."""
    if setting != "auto":
        return bool(setting)
    return plan.quantized and bool(getattr(model, "supports_gradient_checkpointing", True))


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


def parameter_count(parameter) -> int:
    """The weights a parameter stands for: a 4-bit tensor packs two into each stored byte, so its own
    numel() is half the layer's (bitsandbytes keeps the real shape in its quant_state)."""
    quant_state = getattr(parameter, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else parameter.numel()


def count_parameters(model) -> dict[str, float]:
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in model.parameters())
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
    return sum(parameter_count(p) for p in model.parameters()) - lookups


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


def pick_precision(requested: str, device: torch.device, plan: BasePlan | None = None) -> str:
    """auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU (bf16 autocast is slow there).
    A bf16 or fp16 base computes in its own dtype (autocast), whatever the device."""
    from lora_sweep.errors import ConfigError

    if plan is not None and not plan.quantized and plan.dtype != torch.float32:
        name = "bf16" if plan.dtype == torch.bfloat16 else "fp16"
        if requested in ("auto", name):
            return name
        raise ConfigError(
            "train.precision",
            requested,
            f"a {name} base (model.dtype) computes in {name}; use train.precision=auto or {name}, "
            "or model.dtype=fp32",
        )
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise ConfigError("train.precision", requested, "fp16 needs a GPU; use fp32 or bf16 on CPU")
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"
