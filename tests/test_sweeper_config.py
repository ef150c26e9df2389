"""The sweeper's schema (``lora_sweep/sweep/settings.py``) is where its defaults live: the
settings become the typed schema, and the sweep code repeats none of its defaults."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from lora_sweep.errors import ConfigError
from lora_sweep.sweep.settings import (
    BaselineConf,
    LoraOptunaSweeperConf,
    PrunerConf,
    ReportConf,
    SamplerConf,
    sweeper_conf,
)

ROOT = Path(__file__).resolve().parent.parent
# the modules that read the sweeper's settings
READERS = [
    "lora_sweep/sweep/runner.py",
    "lora_sweep/sweep/study.py",
    "hydra_plugins/lora_sweep_optuna/sweeper.py",
]
SCHEMA = (LoraOptunaSweeperConf, SamplerConf, PrunerConf, BaselineConf, ReportConf)


def test_settings_left_out_take_the_schema_defaults():
    assert sweeper_conf({}) == LoraOptunaSweeperConf()
    conf = sweeper_conf(
        {"_target_": "x", "n_trials": 4, "pruner": {"name": "hyperband"}, "report": {"replicates": 0}}
    )
    assert (
        conf.n_trials == 4
        and conf.pruner == PrunerConf(name="hyperband")
        and conf.report == ReportConf(replicates=0)
    )
    assert conf.sampler == SamplerConf() and conf.max_failure_rate == LoraOptunaSweeperConf().max_failure_rate
    assert conf._target_ == LoraOptunaSweeperConf()._target_


def test_a_baseline_sampler_is_a_sampler_conf_with_the_schema_defaults():
    assert sweeper_conf({}).baseline.sampler is None
    assert sweeper_conf({"baseline": {"sampler": {"name": "random"}}}).baseline.sampler == SamplerConf(
        name="random"
    )


def test_unknown_or_bad_settings_name_their_key():
    with pytest.raises(ConfigError, match=r"hydra\.sweeper\.pruner\.patience"):
        sweeper_conf({"pruner": {"patience": 3}})
    with pytest.raises(ConfigError, match=r"hydra\.sweeper\.max_failure_rate"):
        sweeper_conf({"max_failure_rate": "half"})


def repeated_defaults(path: Path) -> list[str]:
    """``x.get("<schema field>", <default>)`` calls: a setting read with a fallback of its own."""
    fields = {f.name for cls in SCHEMA for f in dataclasses.fields(cls)} - {"_target_"}  # also a launcher key
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and len(node.args) == 2
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value in fields
        ):
            found.append(f"{path}:{node.lineno}: .get({node.args[0].value!r}, ...)")
    return found


def test_the_sweep_code_repeats_no_schema_default():
    found = [use for name in READERS for use in repeated_defaults(ROOT / name)]
    assert not found, "defaults belong in lora_sweep/sweep/settings.py:\n" + "\n".join(found)


def test_the_repeated_default_check_catches_one(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f(settings, record):\n    return settings.get('max_failure_rate', 0.5), record.get('x', 1)\n"
    )
    (found,) = repeated_defaults(sample)
    assert "'max_failure_rate'" in found
