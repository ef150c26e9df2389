"""The search space of a sweep, written in Hydra's sweep syntax and sampled through Optuna.

``choice(a, b)``, ``range(start, stop[, step])``, ``interval(low, high)``, ``int(interval(...))`` and
``tag(log, interval(...))`` become Optuna distributions. LoRA-aware additions:

- ``alpha``: tie ``method.alpha`` to the sampled rank by a ratio (``ratio: [0.5, 1, 2, 4]``), or let it
  be sampled on its own (``free: tag(log, interval(4, 512))``); Optuna sees a categorical
  ``method.alpha_ratio`` whose value ``free`` switches on a conditional ``method.alpha``. Or hold it
  constant across ranks (``fixed: 32``, or ``fixed: [16, 32]``, a categorical of constants): with a fixed
  alpha (or rsLoRA) the best learning rate hardly moves with the rank, so the lr search is not chasing r.
- ``target_sets``: named lists of module names usable as ``method.targets`` choices next to the presets;
  a raw list is never a choice (Optuna's categoricals must be plain values, and names read better).
- ``conditions``: a parameter is sampled only when earlier values match, e.g. ``method.init`` only for
  ``method.variant: [lora, rslora]``; otherwise the config's own value stands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from lora_sweep.config import TARGET_PRESETS, RunConfig
from lora_sweep.errors import ConfigError
from lora_sweep.sweep.settings import LoraOptunaSweeperConf

FREE = "free"
ALPHA_RATIO, ALPHA = "method.alpha_ratio", "method.alpha"
ALPHA_POLICIES = ("ratio", "free", "fixed")


@dataclass
class Param:
    name: str  # the config key it overrides, which is also its Optuna name
    distribution: BaseDistribution
    when: dict[str, list] | None = None
    where: str = ""  # the sweeper key it is written under, and its text there: for error lines
    text: str = ""


def _parse(key: str, text: str, where: str) -> BaseDistribution:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    try:
        override = OverridesParser.create().parse_override(f"{key}={text}")
    except Exception as err:
        raise ConfigError(where, text, f"not a sweep expression: {str(err).splitlines()[0]}") from None
    value = override.value()
    if isinstance(value, ChoiceSweep):
        choices = list(value.list)
        if any(isinstance(c, (list, dict)) for c in choices):
            raise ConfigError(
                where,
                text,
                "a list is not a choice: name it in hydra.sweeper.target_sets and choose the name",
            )
        if not choices:
            raise ConfigError(where, text, "choice() needs at least one value")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        values = [start + i * step for i in range(max(0, math.ceil((stop - start) / step)))]
        if not values:
            raise ConfigError(where, text, f"range is empty (start {start} >= stop {stop})")
        if all(isinstance(v, int) for v in (start, stop, step)):
            return IntDistribution(values[0], values[-1], step=step)
        return FloatDistribution(values[0], values[-1], step=step)
    if isinstance(value, IntervalSweep):
        low, high, log = value.start, value.end, "log" in value.tags
        if low > high:
            raise ConfigError(where, text, f"low {low} > high {high}")
        if log and low <= 0:
            raise ConfigError(where, text, f"a log scale needs low > 0 (got {low})")
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log)
        return FloatDistribution(float(low), float(high), log=log)
    raise ConfigError(
        where, text, "expected choice(...), range(...), interval(...) or tag(log, interval(...))"
    )


class SearchSpace:
    def __init__(
        self,
        params: dict[str, str],
        *,
        alpha: dict | None = None,
        target_sets: dict[str, list[str]] | None = None,
        conditions: dict[str, dict[str, list]] | None = None,
        prefix: str = "hydra.sweeper",
    ):
        self.target_sets = dict(target_sets or {})
        self.prefix = prefix
        self.params: list[Param] = []
        conditions = dict(conditions or {})
        for key, text in params.items():
            if key in (ALPHA, ALPHA_RATIO) and alpha:
                raise ConfigError(
                    f"{prefix}.params.{key}", text, "alpha is already searched through hydra.sweeper.alpha"
                )
            where = f"{prefix}.params.{key}"
            self.params.append(
                Param(key, _parse(key, str(text), where), conditions.pop(key, None), where, str(text))
            )
        self.fixed_alpha = bool(alpha) and alpha.get("fixed") is not None
        if alpha:
            unknown = sorted(set(alpha) - set(ALPHA_POLICIES))
            if unknown:
                raise ConfigError(
                    f"{prefix}.alpha.{unknown[0]}",
                    alpha[unknown[0]],
                    f"not an alpha policy (one of {', '.join(ALPHA_POLICIES)})",
                )
        if self.fixed_alpha:
            self.params.append(_fixed_alpha(alpha, conditions.pop(ALPHA, None), prefix))
        elif alpha:
            ratios = [float(r) for r in alpha.get("ratio") or []]
            if any(r <= 0 for r in ratios):
                raise ConfigError(f"{prefix}.alpha.ratio", ratios, "ratios must be > 0")
            free = alpha.get("free")
            choices = ratios + ([FREE] if free else [])
            if not choices:
                raise ConfigError(f"{prefix}.alpha", alpha, "give ratio: [...] and/or free: <interval>")
            self.params.append(
                Param(ALPHA_RATIO, CategoricalDistribution(choices), conditions.pop(ALPHA_RATIO, None))
            )
            if free:
                where = f"{prefix}.alpha.free"
                self.params.append(
                    Param(ALPHA, _parse(ALPHA, str(free), where), {ALPHA_RATIO: [FREE]}, where, str(free))
                )
        if conditions:
            key = next(iter(conditions))
            raise ConfigError(
                f"{prefix}.conditions.{key}", conditions[key], "conditions a parameter that is not searched"
            )
        names = [p.name for p in self.params]
        for param in self.params:
            for other in param.when or {}:
                if other in names and names.index(other) > names.index(param.name):
                    raise ConfigError(
                        f"{prefix}.conditions.{param.name}",
                        other,
                        "must refer to a parameter listed before it",
                    )
            if param.name == "method.targets":
                for choice in param.distribution.choices:
                    if choice not in TARGET_PRESETS and choice not in self.target_sets:
                        raise ConfigError(
                            f"{prefix}.params.method.targets",
                            choice,
                            f"neither a preset ({', '.join(TARGET_PRESETS)}) nor a name in "
                            f"{prefix}.target_sets",
                        )

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    @staticmethod
    def _applies(param: Param, known: dict[str, Any]) -> bool:
        return not param.when or all(known.get(k) in allowed for k, allowed in param.when.items())

    def applicable(self, values: dict[str, Any], fixed: dict[str, Any]) -> dict[str, Any]:
        """``values`` without the parameters whose condition fails (what a trial would sample)."""
        chosen: dict[str, Any] = {}
        for param in self.params:
            if param.name in values and self._applies(param, {**fixed, **chosen}):
                chosen[param.name] = values[param.name]
        return chosen

    def sample(self, trial: optuna.Trial, fixed: dict[str, Any]) -> dict[str, Any]:
        """Sample every parameter whose condition holds, in order (Optuna's define-by-run)."""
        chosen: dict[str, Any] = {}
        for param in self.params:
            if not self._applies(param, {**fixed, **chosen}):
                continue
            dist = param.distribution
            if isinstance(dist, CategoricalDistribution):
                chosen[param.name] = trial.suggest_categorical(param.name, dist.choices)
            elif isinstance(dist, IntDistribution):
                chosen[param.name] = trial.suggest_int(
                    param.name, dist.low, dist.high, step=dist.step, log=dist.log
                )
            else:
                chosen[param.name] = trial.suggest_float(
                    param.name, dist.low, dist.high, step=dist.step, log=dist.log
                )
        return chosen

    def overrides(self, values: dict[str, Any]) -> list[str]:
        """Hydra overrides that apply sampled (or enqueued) values to the config."""
        out = []
        for name, value in values.items():
            if name == ALPHA_RATIO:
                if value == FREE:
                    out.append(f"{ALPHA_RATIO}=null")
                else:
                    out += [f"{ALPHA_RATIO}={value}", f"{ALPHA}=null"]
            elif name == "method.targets" and value in self.target_sets:
                out.append(f"method.targets=[{','.join(self.target_sets[value])}]")
            elif name == ALPHA and self.fixed_alpha:  # the constant, whatever r and the method file's ratio
                out += [f"{ALPHA}={format_value(value)}", f"{ALPHA_RATIO}=null"]
            else:
                out.append(f"{name}={format_value(value)}")
        return out

    def check_enqueued(self, entry: dict[str, Any], where: str) -> None:
        for name, value in entry.items():
            if name not in self.names:
                raise ConfigError(
                    f"{where}.{name}", value, f"not a searched parameter (searched: {', '.join(self.names)})"
                )
            dist = next(p.distribution for p in self.params if p.name == name)
            try:
                inside = _in_range(dist, dist.to_internal_repr(value))
            except (ValueError, TypeError):
                inside = False
            if not inside:
                raise ConfigError(f"{where}.{name}", value, "outside the searched range or choices")

    def check_values(self, config: dict[str, Any], other_method: bool = False) -> None:
        """Every choice, and both ends of every range, set in ``config`` (the run config as plain data) and
        put through the run config's own checks: a value the search can sample but no run accepts fails
        now, in one line, instead of failing trials one by one. ``other_method``: the ``method.*`` keys
        belong to another method file than ``config``'s (a searched ``method``, the baseline's
        ``method=full``); the sweep checks those by composing each choice."""
        for param in self.params:
            if param.name == "method" or (other_method and param.name.startswith("method.")):
                continue  # a config group, composed choice by choice before the first trial
            if not _has_key(config, param.name):
                raise ConfigError(param.where, param.text, "no such config key")
            dist = param.distribution
            if isinstance(dist, CategoricalDistribution):
                for choice in dist.choices:
                    try:
                        _check_run_config(config, self._assignments(param.name, choice))
                    except ConfigError as err:  # as the sweep's composition of each choice names it
                        raise ConfigError(
                            f"{self.prefix}.params -> {err.key}", err.value, err.problem
                        ) from None
                continue
            for end, value in (("low", dist.low), ("high", dist.high)):
                try:
                    _check_run_config(config, self._assignments(param.name, value))
                except ConfigError as err:
                    raise ConfigError(
                        param.where,
                        param.text,
                        f"its {end} end {value!r} fails the run config's check: {err}",
                    ) from None

    def _assignments(self, name: str, value: Any) -> dict[str, Any]:
        """The config values one sampled value sets, as :meth:`overrides` writes them."""
        if name == ALPHA_RATIO:
            return {ALPHA_RATIO: None} if value == FREE else {ALPHA_RATIO: value, ALPHA: None}
        if name == "method.targets" and value in self.target_sets:
            return {name: list(self.target_sets[value])}
        if name == ALPHA and self.fixed_alpha:
            return {ALPHA: value, ALPHA_RATIO: None}
        return {name: value}

    def grid(self, where: str) -> dict[str, list]:
        """The search space as GridSampler wants it: every parameter discrete, none conditional."""
        grid = {}
        for param in self.params:
            dist = param.distribution
            if param.when:
                raise ConfigError(
                    f"{where}.{param.name}",
                    "conditional",
                    "the grid sampler cannot search conditional parameters",
                )
            if isinstance(dist, CategoricalDistribution):
                grid[param.name] = list(dist.choices)
            elif dist.step is not None:
                count = int(round((dist.high - dist.low) / dist.step)) + 1
                grid[param.name] = [dist.low + i * dist.step for i in range(count)]
            else:
                raise ConfigError(
                    f"{where}.{param.name}", "interval", "the grid sampler needs choice() or range() values"
                )
        return grid


def _fixed_alpha(alpha: dict, when: dict | None, prefix: str) -> Param:
    """``fixed: 32`` or ``fixed: [16, 32]``: method.alpha a categorical of constants, alpha_ratio null."""
    where, fixed = f"{prefix}.alpha", alpha["fixed"]
    others = [k for k in ("ratio", "free") if alpha.get(k) is not None]
    if others:
        raise ConfigError(
            f"{where}.{others[0]}",
            alpha[others[0]],
            "alpha.fixed is set: one alpha policy per study (ratio, free or fixed), not both",
        )
    values = list(fixed) if isinstance(fixed, (list, tuple)) else [fixed]
    if not values or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values
    ):
        raise ConfigError(f"{where}.fixed", fixed, "must be a number > 0 or a list of numbers > 0")
    choices = list(dict.fromkeys(float(v) for v in values))
    return Param(ALPHA, CategoricalDistribution(choices), when, f"{where}.fixed", str(fixed))


def check_search(conf: LoraOptunaSweeperConf, config: Any) -> None:
    """Parse every search space of the sweep (the baseline's, then the search's, as the sweep builds them)
    and check every value they can sample against the run config's own checks, before the sweep opens its
    storage: a bad space creates no study, journal file or MLflow run. ``config``: the composed config."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(config, resolve=False)
    plain.pop("hydra", None)
    plain["output_dir"] = "validation"  # ${hydra:runtime.output_dir} has no job to resolve against yet
    blocks = [("hydra.sweeper", conf.params, conf.alpha, conf.conditions, "method" in conf.params)]
    if conf.baseline.n_trials > 0:  # its overrides switch the method file (method=full)
        blocks.insert(0, ("hydra.sweeper.baseline", conf.baseline.params, None, None, True))
    for prefix, params, alpha, conditions, other_method in blocks:
        space = SearchSpace(
            params, alpha=alpha, target_sets=conf.target_sets, conditions=conditions, prefix=prefix
        )
        space.check_values(plain, other_method)


def _has_key(config: dict[str, Any], key: str) -> bool:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _check_run_config(config: dict[str, Any], values: dict[str, Any]) -> None:
    """The run config's checks (config.py, then the task's) on ``config`` with dotted ``values`` set."""
    import copy

    from omegaconf import OmegaConf

    from lora_sweep.tasks import check as check_task

    changed = copy.deepcopy(config)
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = changed
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    check_task(RunConfig.from_hydra(OmegaConf.create(changed)))


def _in_range(dist, internal: float) -> bool:
    """Whether a value (in Optuna's internal representation) lies in ``dist``: Optuna's own rule, from
    the distribution's public attributes."""
    if isinstance(dist, CategoricalDistribution):
        return 0 <= int(internal) < len(dist.choices)
    if not dist.low <= internal <= dist.high:
        return False
    if isinstance(dist, IntDistribution):
        return (internal - dist.low) % dist.step == 0
    steps = None if dist.step is None else (internal - dist.low) / dist.step
    return steps is None or abs(steps - round(steps)) < 1.0e-8


def format_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back unchanged."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    text = str(value)
    if text and all(c.isalnum() or c in "_-./" for c in text) and not text[0].isdigit():
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
