"""The settings of our Optuna 5 sweeper (``hydra/sweeper=lora_optuna``), as typed dataclasses.

The Hydra plugin (``hydra_plugins/lora_sweep_optuna/config.py``) registers them with Hydra's ConfigStore;
they live in the package, not the plugin, because Hydra's plugin scan re-executes plugin modules (which
would make a second set of these classes) and because the sweep's building blocks read them.

These dataclasses are the only place the sweeper's defaults live: the sweeper builds a
:class:`LoraOptunaSweeperConf` from the settings Hydra composed (:func:`sweeper_conf`) and the code reads
its fields without fallbacks.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from lora_sweep.schema import build


@dataclass
class SamplerConf:
    name: str = "tpe"  # tpe | random | grid | gp | cmaes | nsga2
    seed: Optional[int] = 0
    n_startup_trials: int = 10


@dataclass
class PrunerConf:
    name: str = "median"  # none | median | successive_halving | hyperband
    n_startup_trials: int = 3  # median: trials to complete before pruning starts
    n_warmup_steps: int = 0  # median: steps of each trial never pruned
    min_resource: Any = 1  # successive_halving / hyperband
    max_resource: Any = "auto"
    reduction_factor: int = 3


@dataclass
class BaselineConf:
    """Full fine-tuning trials run by the same command, with their own small learning-rate search."""

    n_trials: int = 0
    overrides: List[str] = field(default_factory=lambda: ["method=full"])
    params: Dict[str, str] = field(default_factory=dict)
    enqueue: List[Dict[str, Any]] = field(default_factory=list)
    sampler: Optional[SamplerConf] = None  # None: TPE, seeded like the main study


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
    alpha: Optional[Dict[str, Any]] = None  # {ratio: [0.5, 1, 2, 4], free: tag(log, interval(4, 512))}
    conditions: Dict[str, Dict[str, List[Any]]] = field(default_factory=dict)
    target_sets: Dict[str, List[str]] = field(default_factory=dict)
    enqueue: List[Dict[str, Any]] = field(default_factory=list)
    baseline: BaselineConf = field(default_factory=BaselineConf)
    max_failure_rate: float = 0.5  # abort once more than this share of n_trials has failed
    keep_checkpoints: Optional[int] = (
        None  # keep the checkpoints of the k best trials (+ the report's pick); None: all
    )
    heartbeat_interval: Optional[int] = 60  # RDB storages: seconds between a running trial's heartbeats
    report: ReportConf = field(default_factory=ReportConf)


def sweeper_conf(settings: Mapping[str, Any]) -> "LoraOptunaSweeperConf":
    """The sweeper's settings (a plain mapping, as Hydra composed them) as the typed schema; a key left
    out takes the schema's default, an unknown key or a bad value is a one-line ``ConfigError``."""
    given = {k: v for k, v in settings.items() if k != "_target_"}
    return build(LoraOptunaSweeperConf, given, "hydra.sweeper")
