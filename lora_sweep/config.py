"""The typed run configuration. Every range check lives here, so a bad value fails before any model loads.

The YAML files in ``conf/`` hold the defaults; these dataclasses hold the rules. ``RunConfig.from_hydra``
turns a composed Hydra config into this tree or raises one :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lora_sweep.errors import ConfigError
from lora_sweep.schema import build

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # the Hydra config tree (conf/method/*.yaml, ...)
TARGET_PRESETS = ("attention_qv", "attention_all", "mlp", "all_linear")
LORA_VARIANTS = ("lora", "rslora", "dora")
# PEFT's init_lora_weights that need no extra data pass or quantization config. "default" stands for
# PEFT's True: B = 0, so the adapter starts as a no-op. pissa/olora rewrite the base weights at init.
LORA_INITS = ("default", "gaussian", "orthogonal", "pissa", "olora")
# the frozen base's storage; "auto" is decided with the device and method (models.plan_base)
MODEL_DTYPES = ("auto", "fp32", "bf16", "fp16")
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
QUANTIZATIONS = ("none", "4bit", "8bit")
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
# What depends on the task (model.task, data.kind, objective.metric and its direction) is the tasks' own
# metadata: lora_sweep.tasks.check validates it, one layer up, right after a config is built.


def _positive(key: str, value: float | int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(key, value, "must be > 0")


def _seed(key: str, value: int) -> None:
    # torch, numpy and datasets all take a seed in [0, 2**32): numpy refuses anything else with a traceback
    if value < 0:
        raise ConfigError(key, value, "must be >= 0")
    if value >= 2**32:
        raise ConfigError(key, value, "must be < 2**32 (4294967296): numpy's seeds are 32-bit")


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(key, value, f"must be one of {', '.join(map(str, choices))}")


@dataclass
class ModelConfig:
    name: str
    name_or_path: str
    task: str = "auto"  # auto: from data.kind; else a task name (lora_sweep.tasks.TASKS)
    num_labels: int | None = None  # None: as many as the data has
    revision: str | None = None
    trust_remote_code: bool = False
    gguf_file: str | None = (
        None  # a GGUF file in name_or_path: dequantized once into cache_dir, loaded from there
    )
    cache_dir: str = "~/.cache/lora_sweep"
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16: the frozen base weights (trainable ones stay fp32)
    attn_implementation: str = "sdpa"  # sdpa | flash_attention_2 | eager, as transformers names them
    quantization: str = "none"  # none | 4bit (NF4, double quantization) | 8bit, through bitsandbytes

    def __post_init__(self) -> None:
        _choice("dtype", self.dtype, MODEL_DTYPES)
        _choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _choice("quantization", self.quantization, QUANTIZATIONS)
        if not self.name_or_path.strip():
            raise ConfigError("name_or_path", self.name_or_path, "must name a model folder or hub id")
        if self.num_labels is not None and self.num_labels < 2:
            raise ConfigError("num_labels", self.num_labels, "a classifier needs at least 2 labels")
        if self.gguf_file is not None and not self.gguf_file.endswith(".gguf"):
            raise ConfigError("gguf_file", self.gguf_file, "must name a .gguf file inside name_or_path")


@dataclass
class SplitConfig:
    """How to cut validation/test out of data that ships without them (seeded, stratified)."""

    validation: float = 0.15
    test: float = 0.15
    seed: int = 0
    stratify: bool = True

    def __post_init__(self) -> None:
        for name in ("validation", "test"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ConfigError(name, value, "must be a fraction strictly between 0 and 1")
        _seed("seed", self.seed)
        if self.validation + self.test >= 1:
            raise ConfigError(
                "test",
                self.test,
                f"validation + test = {self.validation + self.test:g} leaves no training data",
            )


@dataclass
class DataConfig:
    name: str
    source: Literal["builtin", "local", "hub"]
    kind: str = "classification"  # what the rows are: picks the task (lora_sweep.tasks.DATA_KINDS)
    path: str | None = None  # builtin: dataset name; local: file or folder; hub: dataset id
    format: Literal["auto", "csv", "tsv", "json", "jsonl", "parquet", "text"] = "auto"
    hub_config: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    split: SplitConfig = field(default_factory=SplitConfig)
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    cache_dir: str = "~/.cache/lora_sweep"
    # causal LMs: instruction rows are prompt/response columns or a list of chat messages, rendered with the
    # tokenizer's chat template (loss on the assistant's tokens only); text rows are continued pre-training
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"  # used instead of prompt/response when the data has it
    system_prompt: str | None = None  # null: the chat template's own default
    # text: concatenate documents and cut blocks of train.max_length tokens; instruction: padding-free
    # training batches (the same rows, concatenated, no attention across them)
    packing: bool = False
    prompts: list[str] = field(
        default_factory=list
    )  # generated greedily at the end; empty: the first test prompts

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("path", self.path, f"data.source={self.source} needs a path")
        if self.packing and self.kind not in ("text", "instruction"):
            raise ConfigError(
                "packing",
                self.packing,
                f"packing applies to data.kind=text or instruction (this is {self.kind})",
            )
        _positive("max_train_samples", self.max_train_samples, allow_none=True)
        _positive("max_eval_samples", self.max_eval_samples, allow_none=True)


@dataclass
class MethodConfig:
    """A fine-tuning method: a PEFT adapter (``peft``: PEFT's own method type) or full fine-tuning (null).

    Each method is one file in ``conf/method/``. The keys below are lora_sweep's shorthands shared by many
    PEFT methods (rank, alpha, dropout, init, targets as a preset); ``options`` holds any other field of
    PEFT's config class under PEFT's own name. :mod:`lora_sweep.methods` maps both onto that class. Only
    what needs no PEFT import is checked here, so a bad value fails before torch loads.
    """

    name: str
    peft: str | None = None  # PeftType name: LORA, LOHA, LOKR, IA3, ADALORA, VERA, BOFT, ...; null: full FT
    targets: str | list[str] | None = None  # a preset name or module names, resolved against the model
    r: int | None = None
    alpha: float | None = None  # explicit alpha wins over alpha_ratio
    alpha_ratio: float | None = None  # alpha = alpha_ratio * r when alpha is null
    dropout: float | None = None
    variant: str | None = None  # LoRA-family: lora | rslora (alpha/sqrt(r)) | dora
    init: str | None = None  # PEFT's init_lora_weights / init_weights; "default": PEFT's own default
    bias: Literal["none", "all", "lora_only"] | None = None
    modules_to_save: list[str] = field(default_factory=list)  # trained in full besides the task head
    options: dict[str, Any] = field(default_factory=dict)  # other fields of PEFT's config class, by name

    def __post_init__(self) -> None:
        if self.peft is None:
            used = [k for k in ADAPTER_KEYS if getattr(self, k) not in (None, [], {})]
            if used:
                raise ConfigError(
                    used[0], getattr(self, used[0]), "full fine-tuning has no adapter to configure"
                )
            return
        if self.r is not None and self.r <= 0:
            raise ConfigError("r", self.r, "must be a positive integer")
        if self.alpha is not None:
            _positive("alpha", self.alpha)
        elif self.alpha_ratio is not None:
            _positive("alpha_ratio", self.alpha_ratio)
        if self.alpha_ratio is not None and self.r is None and self.alpha is None:
            raise ConfigError(
                "alpha_ratio", self.alpha_ratio, "ties alpha to method.r, which this method has not"
            )
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError("dropout", self.dropout, "must be in [0, 1)")
        if self.targets is None:
            raise ConfigError(
                "targets",
                None,
                f"an adapter needs targets: a preset ({', '.join(TARGET_PRESETS)}) or module names",
            )
        if isinstance(self.targets, str):
            _choice("targets", self.targets, TARGET_PRESETS)
        elif not self.targets:
            raise ConfigError(
                "targets",
                self.targets,
                f"an empty list adapts nothing; use a preset ({', '.join(TARGET_PRESETS)}) or module names",
            )
        if self.variant is not None:
            _choice("variant", self.variant, LORA_VARIANTS)
        if self.init is not None and self.peft in ("LORA", "ADALORA"):
            if not (self.init in LORA_INITS or self.init.startswith("pissa_niter_")):
                raise ConfigError("init", self.init, f"must be one of {', '.join(LORA_INITS)}")

    @property
    def adapter(self) -> bool:
        """Whether the method trains a PEFT adapter (else every weight trains)."""
        return self.peft is not None

    @property
    def effective_alpha(self) -> float | None:
        if self.alpha is not None:
            return self.alpha
        return self.alpha_ratio * self.r if self.alpha_ratio is not None and self.r is not None else None

    @property
    def scaling(self) -> float | None:
        """The factor on the low-rank update: alpha/r, or alpha/sqrt(r) for rsLoRA."""
        if self.effective_alpha is None or self.r is None:
            return None
        return self.effective_alpha / (math.sqrt(self.r) if self.variant == "rslora" else self.r)


# the shorthand keys an adapter may set; full fine-tuning sets none of them
ADAPTER_KEYS = (
    "targets",
    "r",
    "alpha",
    "alpha_ratio",
    "dropout",
    "variant",
    "init",
    "bias",
    "modules_to_save",
    "options",
)


def method_config(name: str, conf_dir: Path | None = None, **overrides: Any) -> MethodConfig:
    """The method of ``conf/method/<name>.yaml`` (its defaults, the one place they are written), with
    ``overrides`` applied: what ``method=<name> method.<key>=<value>`` composes, without Hydra."""
    from omegaconf import OmegaConf

    path = Path(conf_dir or CONF_DIR) / "method" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError("method", name, f"no such method file ({path})")
    block = OmegaConf.to_container(OmegaConf.load(path).get("method"), resolve=True)
    return build(MethodConfig, {**block, **overrides}, "method")


@dataclass
class TrainConfig:
    lr: float = 2e-3
    weight_decay: float = 0.01
    scheduler: str = "linear"
    warmup_ratio: float = 0.06
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 32
    eval_batch_size: int = 64
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    eval_every: int = 100  # optimizer steps between validation passes; 0: only at the end
    eval_subset: int | None = None  # validation rows of the passes that pick and prune; None: all
    log_every: int = 10
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    max_length: int = 64
    num_workers: int = 0
    resume: bool = (
        True  # an output folder holding an unfinished run of this config resumes from its last checkpoint
    )
    # recompute activations in backward: less memory, ~30% more time; auto: on for a quantized base only
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    group_by_length: bool = False  # training batches of rows of similar length (changes batch composition)

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", self.weight_decay, "must be >= 0")
        _choice("scheduler", self.scheduler, SCHEDULERS)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum", "log_every", "max_length"):
            _positive(name, getattr(self, name))
        _positive("max_steps", self.max_steps, allow_none=True)
        _positive("eval_subset", self.eval_subset, allow_none=True)
        _positive("max_grad_norm", self.max_grad_norm, allow_none=True)
        if self.eval_every < 0:
            raise ConfigError("eval_every", self.eval_every, "must be >= 0 (0: evaluate only at the end)")
        if self.num_workers < 0:
            raise ConfigError("num_workers", self.num_workers, "must be >= 0")
        _seed("seed", self.seed)
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ConfigError("device", self.device, "must be auto, cpu, cuda, cuda:N or mps")

    def plan_steps(self, train_size: int) -> tuple[int, int]:
        """(optimizer steps per epoch, total optimizer steps) for ``train_size`` training rows."""
        batches = math.ceil(train_size / self.batch_size)
        per_epoch = math.ceil(batches / self.grad_accum)
        return per_epoch, self.max_steps or per_epoch * self.epochs


@dataclass
class TrackingConfig:
    backend: Literal["mlflow", "none"] = "mlflow"
    tracking_uri: str | None = None  # None: MLflow's default (sqlite:///mlflow.db in the working dir)
    experiment: str = "lora_sweep"
    run_name: str | None = None
    log_checkpoints: bool = True
    system_metrics: bool = True
    system_metrics_interval: float = 10.0  # seconds between MLflow's system-metrics samples

    def __post_init__(self) -> None:
        _positive("system_metrics_interval", self.system_metrics_interval)


@dataclass
class ObjectiveConfig:
    metric: str = (
        "accuracy"  # one of the task's metrics; its direction is the task's (tasks.metric_direction)
    )


@dataclass
class LMEvalConfig:
    """Causal LMs only: what a run generates at the end, and the out-of-task text forgetting is measured
    on."""

    max_new_tokens: int = 48
    num_prompts: int = 4  # generated prompts when data.prompts is empty (the first test prompts)
    reference_texts: int = 64  # NYT editorial snippets scored for perplexity before and after; 0 skips

    def __post_init__(self) -> None:
        _positive("max_new_tokens", self.max_new_tokens)
        for name in ("num_prompts", "reference_texts"):
            if getattr(self, name) < 0:
                raise ConfigError(name, getattr(self, name), "must be >= 0")


@dataclass
class SweepContext:
    """Set by the Optuna sweeper for each trial (``sweep.*`` keys); empty for a single run."""

    study_name: str | None = None
    storage: str | None = None
    trial_number: int | None = None
    trial_id: int | None = None
    parent_run_id: str | None = None
    role: str = "search"  # search | baseline | replicate | rung<k> (the budget ladder's rung k)

    def __post_init__(self) -> None:
        if self.role not in ("search", "baseline", "replicate") and not re.fullmatch(r"rung\d+", self.role):
            raise ConfigError("role", self.role, "must be search, baseline, replicate or rung<k>")

    @property
    def active(self) -> bool:
        return self.trial_id is not None


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    method: MethodConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    output_dir: str = "outputs/run"
    tags: dict[str, str] = field(default_factory=dict)
    evaluate_test: bool = True  # sweeps leave the test split to the chosen checkpoint only
    sweep: SweepContext = field(default_factory=SweepContext)
    lm_eval: LMEvalConfig = field(default_factory=LMEvalConfig)

    def __post_init__(self) -> None:
        # what no device can change: refused before torch loads (the device-dependent rules: plan_base)
        if not self.method.adapter and self.model.quantization != "none":
            raise ConfigError(
                "model.quantization",
                self.model.quantization,
                f"method={self.method.name} trains every weight, and quantized weights cannot train; "
                "use an adapter method (method=lora) or model.quantization=none",
            )
        if not self.method.adapter and self.model.dtype in ("bf16", "fp16"):
            raise ConfigError(
                "model.dtype",
                self.model.dtype,
                f"method={self.method.name} keeps fp32 master weights (updates to {self.model.dtype} "
                "weights round away); use model.dtype=auto or fp32 (train.precision=bf16 computes in bf16)",
            )

    @classmethod
    def from_mapping(cls, mapping: dict[str, Any]) -> RunConfig:
        return build(cls, dict(mapping))

    @classmethod
    def from_hydra(cls, cfg: Any) -> RunConfig:
        """A composed Hydra config (DictConfig), interpolations resolved, validated; any problem becomes
        one ConfigError naming its key. Used by the Hydra task and by the sweep's up-front validation."""
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        try:
            container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or "<config>"
            cause = err.__cause__ or err
            problem = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
            value = None
            if "Missing mandatory value" in str(err):
                problem, value = "missing required value (set it on the command line: key=value)", "???"
            raise ConfigError(key, value, problem) from None
        container.pop("hydra", None)
        return cls.from_mapping(container)

    @property
    def is_causal(self) -> bool:
        return self.model.task == "causal_lm"
