"""The Hydra Sweeper plugin: a thin adapter from Hydra's interface to :mod:`lora_sweep.sweep.runner`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class LoraOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        super().__init__()
        self.settings = {
            k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in settings.items()
        }
        self.hydra_context = None
        self.task_function = None
        self.config = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.task_function = task_function
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from lora_sweep.errors import ConfigError, LoraSweepError
        from lora_sweep.sweep.runner import SweepRunner
        from lora_sweep.sweep.settings import sweeper_conf, unwritable
        from lora_sweep.sweep.space import check_search

        parsed = OverridesParser.create(config_loader=self.hydra_context.config_loader).parse_overrides(
            list(arguments)
        )
        sweep_overrides = [o.input_line for o in parsed if o.is_sweep_override()]
        if sweep_overrides:
            print(
                f"error: {sweep_overrides[0]}: comma lists and sweep functions on the command line are for "
                "Hydra's basic "
                "sweeper; with hydra/sweeper=lora_optuna put the search space in hydra.sweeper.params",
                file=sys.stderr,
            )
            sys.exit(2)
        try:
            conf = sweeper_conf(self.settings)
            check_search(conf, self.config)  # before the storage opens: a bad space creates nothing
            sweep_dir = str(self.config.hydra.sweep.dir)
            problem = unwritable(Path(sweep_dir))
            if problem:
                raise ConfigError("hydra.sweep.dir", sweep_dir, f"cannot make the sweep's folder: {problem}")
            loader = self.hydra_context.config_loader
            runner = SweepRunner(conf, self.config, self.launcher, loader, arguments)
            if runner.pool is not None:
                runner.launcher = self._joblib_launcher(runner.pool)
            return runner.run()
        except LoraSweepError as err:
            from lora_sweep.secrets import redact

            print(f"error: {redact(str(err))}", file=sys.stderr)
            sys.exit(2)

    def _joblib_launcher(self, n_jobs: int) -> Any:
        """The joblib launcher again with a pool of ``n_jobs`` processes: trials_per_device > 1 sizes the
        pool when hydra.launcher.n_jobs is left at joblib's default (one process per CPU core)."""
        from hydra.core.plugins import Plugins
        from omegaconf import open_dict, read_write

        with read_write(self.config.hydra), open_dict(self.config.hydra):
            self.config.hydra.launcher.n_jobs = n_jobs
        return Plugins.instance().instantiate_launcher(
            hydra_context=self.hydra_context, task_function=self.task_function, config=self.config
        )
