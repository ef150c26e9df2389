"""The settings of our Optuna 5 sweeper (``hydra/sweeper=lora_optuna``), as typed dataclasses.

The Hydra plugin (``hydra_plugins/lora_sweep_optuna/config.py``) registers them with Hydra's ConfigStore;
they live in the package, not the plugin, because Hydra's plugin scan re-executes plugin modules (which
would make a second set of these classes) and because the sweep's building blocks read them.

These dataclasses are the only place the sweeper's defaults live: the sweeper builds a
:class:`LoraOptunaSweeperConf` from the settings Hydra composed (:func:`sweeper_conf`) and the code reads
its fields without fallbacks.
"""

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from lora_sweep.errors import ConfigError
from lora_sweep.schema import build

SAMPLERS = ("tpe", "random", "grid", "gp", "cmaes", "nsga2")
PRUNERS = ("none", "median", "successive_halving", "hyperband")
JOURNAL_PREFIX = "journal:"  # hydra.sweeper.storage=journal:<file>: an Optuna journal file
MAX_SEED = 2**32 - 1  # numpy's RandomState, which every Optuna sampler seeds, takes no other seed


def _at_least(key: str, value: Any, low: float, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not value >= low:  # NaN fails too
        raise ConfigError(key, value, f"must be >= {low:g}")


def _resource(key: str, value: Any) -> None:
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(key, value, "must be auto or an integer >= 1")


@dataclass
class SamplerConf:
    name: str = "tpe"  # tpe | random | grid | gp | cmaes | nsga2
    seed: Optional[int] = 0
    n_startup_trials: int = 10

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise ConfigError("name", self.name, f"must be one of {', '.join(SAMPLERS)}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ConfigError("seed", self.seed, f"must be in [0, {MAX_SEED}] (or null: unseeded)")
        _at_least("n_startup_trials", self.n_startup_trials, 0)


@dataclass
class PrunerConf:
    name: str = "median"  # none | median | successive_halving | hyperband
    n_startup_trials: int = 3  # median: trials to complete before pruning starts
    n_warmup_steps: int = 0  # median: steps of each trial never pruned
    min_resource: Any = 1  # successive_halving / hyperband
    max_resource: Any = "auto"
    reduction_factor: int = 3

    def __post_init__(self) -> None:
        if self.name not in PRUNERS:
            raise ConfigError("name", self.name, f"must be one of {', '.join(PRUNERS)}")
        _at_least("n_startup_trials", self.n_startup_trials, 0)
        _at_least("n_warmup_steps", self.n_warmup_steps, 0)
        _resource("min_resource", self.min_resource)
        _resource("max_resource", self.max_resource)
        if "auto" not in (self.min_resource, self.max_resource) and self.max_resource < self.min_resource:
            raise ConfigError(
                "max_resource", self.max_resource, f"must be >= pruner.min_resource ({self.min_resource})"
            )
        _at_least("reduction_factor", self.reduction_factor, 2)


@dataclass
class BaselineConf:
    """Full fine-tuning trials run by the same command, with their own small learning-rate search."""

    n_trials: int = 0
    overrides: List[str] = field(default_factory=lambda: ["method=full"])
    params: Dict[str, str] = field(default_factory=dict)
    enqueue: List[Dict[str, Any]] = field(default_factory=list)
    sampler: Optional[SamplerConf] = None  # None: TPE, seeded like the main study

    def __post_init__(self) -> None:
        _at_least("n_trials", self.n_trials, 0)  # 0: no baseline


@dataclass
class LrFromBaselineConf:
    """The LoRA search's learning rate, derived from the full fine-tuning baseline's best one: searched on a
    log scale over [best baseline lr * span[0], best baseline lr * span[1]], enqueued trials at
    best baseline lr * ratio (LoRA's best rate is ~10x full fine-tuning's; see lora_sweep.sweep.lr_range)."""

    ratio: float = 10.0
    span: List[float] = field(default_factory=lambda: [3.0, 30.0])

    def __post_init__(self) -> None:
        if not (self.ratio > 0 and math.isfinite(self.ratio)):
            raise ConfigError("ratio", self.ratio, "must be a finite number > 0")
        if len(self.span) != 2:
            raise ConfigError(
                "span", self.span, "must be two numbers [low, high] (multiples of the baseline lr)"
            )
        low, high = self.span
        if not (0 < low <= self.ratio <= high and math.isfinite(high)):
            raise ConfigError(
                "span", self.span, f"must hold 0 < low <= ratio ({self.ratio:g}) <= high, both finite"
            )


@dataclass
class LadderConf:
    """A budget ladder for the LoRA search: cheap rungs (each a study of its own) whose trials train a
    fraction of a full trial's optimizer steps, the best ``keep`` share of each rung promoted to the next
    rung and then to the full-budget search (:mod:`lora_sweep.sweep.ladder`)."""

    fractions: List[float] = field(default_factory=lambda: [0.25, 0.5])  # of a full trial's steps
    keep: float = 0.5  # share of a rung promoted to the next one

    def __post_init__(self) -> None:
        if not self.fractions:
            raise ConfigError("fractions", self.fractions, "must list at least one fraction of the budget")
        for i, fraction in enumerate(self.fractions):
            if not 0 < fraction < 1:  # NaN fails too
                raise ConfigError(
                    f"fractions[{i}]", fraction, "must be in (0, 1): a share of a full trial's steps"
                )
        if any(b <= a for a, b in zip(self.fractions, self.fractions[1:])):
            raise ConfigError(
                "fractions", self.fractions, "must be strictly increasing (cheapest rung first)"
            )
        if not 0 < self.keep < 1:
            raise ConfigError(
                "keep", self.keep, "must be in (0, 1): the share of a rung promoted to the next"
            )


@dataclass
class ReportConf:
    """The comparison report written when the sweep ends (python -m lora_sweep.report writes it on demand)."""

    enabled: bool = True
    dir: str = "reports"  # the report goes to <dir>/<study>/, relative to the working directory
    tolerance: float = 0.005  # best-pick rule: trials this close to the best compete on size
    checkpoints: bool = True  # test scores of the chosen and baseline checkpoints, forgetting, export
    # the sweep's last phase: seeds to re-train the chosen and the best full FT config with (0: skip)
    replicates: int = 3
    register_as: Optional[str] = None  # MLflow registered model name (alias "champion"); None: the study name

    def __post_init__(self) -> None:
        _at_least("tolerance", self.tolerance, 0)
        if not math.isfinite(self.tolerance):
            raise ConfigError("tolerance", self.tolerance, "must be a finite number >= 0")
        _at_least("replicates", self.replicates, 0)


@dataclass
class LoraOptunaSweeperConf:
    _target_: str = "hydra_plugins.lora_sweep_optuna.sweeper.LoraOptunaSweeper"
    study_name: str = "lora_sweep"
    storage: Optional[str] = None  # None: a journal file in the sweep folder; or any Optuna storage URL
    n_trials: int = 20  # finished (complete + pruned) trials of the LoRA search
    objectives: List[str] = field(default_factory=lambda: ["objective"])  # + trainable_params, peak_memory_mb
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    params: Dict[str, str] = field(
        default_factory=dict
    )  # key: choice(...) | range(...) | interval(...) | tag(log, ...)
    # {ratio: [0.5, 1, 2, 4], free: tag(log, interval(4, 512))}, or {fixed: 32} / {fixed: [16, 32]}
    alpha: Optional[Dict[str, Any]] = None
    conditions: Dict[str, Dict[str, List[Any]]] = field(default_factory=dict)
    target_sets: Dict[str, List[str]] = field(default_factory=dict)
    enqueue: List[Dict[str, Any]] = field(default_factory=list)
    baseline: BaselineConf = field(default_factory=BaselineConf)
    # the LoRA lr range from the baseline's best lr ({ratio: 10, span: [3, 30]}); None: train.lr in params.
    # LrFromBaselineConf's fields, typed Any as ladder is: so that the command line can set it
    lr_from_baseline: Any = None
    max_failure_rate: float = 0.5  # abort once more than this share of n_trials has failed
    keep_checkpoints: Optional[int] = (
        None  # keep the checkpoints of the k best trials (+ the report's pick); None: all
    )
    heartbeat_interval: Optional[int] = 60  # RDB storages: seconds between a running trial's heartbeats
    # >1: this many trials at once on each visible GPU (or on the CPU), each in its own joblib process
    trials_per_device: int = 1
    report: ReportConf = field(default_factory=ReportConf)
    # None: every LoRA trial trains the full budget; else LadderConf's fields. Typed Any so that the command
    # line can set it (hydra.sweeper.ladder={}): OmegaConf cannot assign to an Optional dataclass left None
    ladder: Any = None

    def __post_init__(self) -> None:
        if not self.study_name.strip():
            raise ConfigError("study_name", self.study_name, "must not be empty")
        if not self.n_trials >= 1:
            raise ConfigError("n_trials", self.n_trials, "must be a positive integer")
        # the sweep stops once more than max_failure_rate * n_trials trials failed: 0 at the first failure,
        # 1 after n_trials failures (as many failed trials as the sweep wants finished ones)
        if not 0 <= self.max_failure_rate <= 1:
            raise ConfigError(
                "max_failure_rate",
                self.max_failure_rate,
                "must be in [0, 1] (0: stop at the first failed trial; 1: after n_trials failures)",
            )
        _at_least("keep_checkpoints", self.keep_checkpoints, 1, allow_none=True)
        if self.heartbeat_interval is not None and not self.heartbeat_interval > 0:
            raise ConfigError("heartbeat_interval", self.heartbeat_interval, "must be > 0 (or null: none)")
        if not self.trials_per_device >= 1:
            raise ConfigError("trials_per_device", self.trials_per_device, "must be a positive integer")
        if self.ladder is not None and not isinstance(self.ladder, LadderConf):
            self.ladder = build(LadderConf, self.ladder, "ladder")
        if self.ladder is not None and self.sampler.name == "grid":
            raise ConfigError(
                "sampler.name",
                "grid",
                "a grid trains every point at the full budget and the budget ladder (hydra.sweeper.ladder) "
                "promotes only a rung's best: use tpe, random, gp or cmaes with the ladder, or drop it",
            )
        if self.lr_from_baseline is not None and not isinstance(self.lr_from_baseline, LrFromBaselineConf):
            self.lr_from_baseline = build(LrFromBaselineConf, self.lr_from_baseline, "lr_from_baseline")
        if self.lr_from_baseline is not None:
            self._check_lr_from_baseline()

    def _check_lr_from_baseline(self) -> None:
        given = {"ratio": self.lr_from_baseline.ratio, "span": self.lr_from_baseline.span}
        if self.baseline.n_trials < 1:
            raise ConfigError(
                "lr_from_baseline",
                given,
                "derives the LoRA learning rate from the full fine-tuning baseline, which this sweep "
                "does not run: set hydra.sweeper.baseline.n_trials >= 1",
            )
        if "train.lr" in self.params:
            raise ConfigError(
                "params.train.lr",
                self.params["train.lr"],
                "hydra.sweeper.lr_from_baseline derives the LoRA learning rate from the baseline: "
                "remove train.lr from params (or lr_from_baseline)",
            )
        for i, entry in enumerate(self.enqueue):
            if "train.lr" in entry:
                raise ConfigError(
                    f"enqueue[{i}].train.lr",
                    entry["train.lr"],
                    "the learning rate comes from the baseline (hydra.sweeper.lr_from_baseline): an enqueued "
                    "trial gets best baseline lr * ratio; leave train.lr out",
                )
        if self.sampler.name == "grid":
            raise ConfigError(
                "sampler.name",
                self.sampler.name,
                "the grid cannot search the continuous learning-rate range hydra.sweeper.lr_from_baseline "
                "derives; use another sampler",
            )


def sweeper_conf(settings: Mapping[str, Any]) -> "LoraOptunaSweeperConf":
    """The sweeper's settings (a plain mapping, as Hydra composed them) as the typed schema; a key left
    out takes the schema's default, an unknown key or a bad value is a one-line ``ConfigError``. Also
    checks, creating nothing, that the report's folder can be written: the sweep writes it only at the end."""
    given = {k: v for k, v in settings.items() if k != "_target_"}
    conf = build(LoraOptunaSweeperConf, given, "hydra.sweeper")
    if conf.storage is not None and conf.storage.startswith(JOURNAL_PREFIX):
        check_journal(conf.storage)
    if conf.report.enabled:
        problem = unwritable(Path(conf.report.dir))
        if problem:
            raise ConfigError(
                "hydra.sweeper.report.dir", conf.report.dir, f"cannot write the report there: {problem}"
            )
    return conf


def check_journal(storage: str) -> None:
    """A ``journal:<file>`` storage whose folder cannot be made or written is one line, not a traceback."""
    problem = unwritable(Path(storage[len(JOURNAL_PREFIX) :]).expanduser().parent)
    if problem:
        raise ConfigError("hydra.sweeper.storage", storage, f"cannot write the journal there: {problem}")


def unwritable(folder: Path) -> Optional[str]:
    """Why files cannot be made in ``folder`` (created with its parents if missing), or None; creates
    nothing. The first part of the path that exists decides: a file, or a folder this user cannot write."""
    folder = folder.expanduser().absolute()
    for existing in (folder, *folder.parents):
        if existing.exists():
            break
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
