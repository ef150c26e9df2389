"""``hydra/sweeper=lora_optuna``: the sweeper's settings (:mod:`lora_sweep.sweep.settings`, the only place
their defaults live) registered with Hydra's ConfigStore."""

from hydra.core.config_store import ConfigStore

from lora_sweep.sweep.settings import (  # noqa: F401 - importable from the plugin as well
    BaselineConf,
    LoraOptunaSweeperConf,
    PrunerConf,
    ReportConf,
    SamplerConf,
    sweeper_conf,
)

ConfigStore.instance().store(
    group="hydra/sweeper", name="lora_optuna", node=LoraOptunaSweeperConf, provider="lora_sweep"
)
