"""sweep/settings: every numeric sweeper setting is range-checked by the schema, so a bad one is one line
naming ``hydra.sweeper.<key>`` before the sweep opens a storage, a study or an MLflow run (the same through
the command line against an existing sweep: tests/test_bad_input.py, slow)."""

from __future__ import annotations

import os

import pytest

from lora_sweep.errors import ConfigError
from lora_sweep.sweep.settings import PRUNERS, SAMPLERS, PrunerConf, SamplerConf, sweeper_conf


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_failure_rate": -1}, "hydra.sweeper.max_failure_rate=-1.0: must be in [0, 1]"),
        ({"max_failure_rate": 1.5}, "hydra.sweeper.max_failure_rate=1.5: must be in [0, 1]"),
        ({"n_trials": 0}, "hydra.sweeper.n_trials=0: must be a positive integer"),
        ({"n_trials": -3}, "hydra.sweeper.n_trials=-3: must be a positive integer"),
        ({"baseline": {"n_trials": -1}}, "hydra.sweeper.baseline.n_trials=-1: must be >= 0"),
        ({"report": {"replicates": -1}}, "hydra.sweeper.report.replicates=-1: must be >= 0"),
        ({"report": {"tolerance": -0.01}}, "hydra.sweeper.report.tolerance=-0.01: must be >= 0"),
        ({"report": {"tolerance": float("nan")}}, "hydra.sweeper.report.tolerance=nan: must be >= 0"),
        ({"keep_checkpoints": 0}, "hydra.sweeper.keep_checkpoints=0: must be >= 1"),
        ({"heartbeat_interval": 0}, "hydra.sweeper.heartbeat_interval=0: must be > 0"),
        ({"study_name": ""}, "hydra.sweeper.study_name='': must not be empty"),
        ({"sampler": {"seed": -1}}, "hydra.sweeper.sampler.seed=-1: must be in [0, 4294967295]"),
        ({"sampler": {"seed": 2**32}}, "hydra.sweeper.sampler.seed=4294967296: must be in [0, 4294967295]"),
        ({"sampler": {"n_startup_trials": -1}}, "hydra.sweeper.sampler.n_startup_trials=-1: must be >= 0"),
        ({"sampler": {"name": "bayes"}}, "hydra.sweeper.sampler.name='bayes': must be one of"),
        (
            {"baseline": {"sampler": {"seed": -2}}},
            "hydra.sweeper.baseline.sampler.seed=-2: must be in [0, 4294967295]",
        ),
        ({"pruner": {"name": "asha"}}, "hydra.sweeper.pruner.name='asha': must be one of"),
        ({"pruner": {"n_warmup_steps": -1}}, "hydra.sweeper.pruner.n_warmup_steps=-1: must be >= 0"),
        ({"pruner": {"n_startup_trials": -1}}, "hydra.sweeper.pruner.n_startup_trials=-1: must be >= 0"),
        (
            {"pruner": {"min_resource": 0}},
            "hydra.sweeper.pruner.min_resource=0: must be auto or an integer >= 1",
        ),
        (
            {"pruner": {"min_resource": "some"}},
            "hydra.sweeper.pruner.min_resource='some': must be auto or an integer >= 1",
        ),
        (
            {"pruner": {"max_resource": -5}},
            "hydra.sweeper.pruner.max_resource=-5: must be auto or an integer >= 1",
        ),
        (
            {"pruner": {"min_resource": 10, "max_resource": 5}},
            "hydra.sweeper.pruner.max_resource=5: must be >= pruner.min_resource (10)",
        ),
        ({"pruner": {"reduction_factor": 1}}, "hydra.sweeper.pruner.reduction_factor=1: must be >= 2"),
    ],
)
def test_bad_numeric_settings_fail_in_one_line(settings, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        sweeper_conf(settings)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value), str(caught.value)


def test_the_ends_of_each_range_are_valid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    conf = sweeper_conf(
        {
            "max_failure_rate": 0,
            "n_trials": 1,
            "baseline": {"n_trials": 0},
            "report": {"replicates": 0, "tolerance": 0},
            "keep_checkpoints": 1,
            "heartbeat_interval": None,
            "sampler": {"seed": 2**32 - 1, "n_startup_trials": 0},
            "pruner": {
                "n_warmup_steps": 0,
                "n_startup_trials": 0,
                "min_resource": "auto",
                "reduction_factor": 2,
            },
        }
    )
    assert conf.max_failure_rate == 0 and conf.sampler.seed == 2**32 - 1
    assert sweeper_conf({"max_failure_rate": 1, "sampler": {"seed": None}}).max_failure_rate == 1
    assert sweeper_conf({"pruner": {"min_resource": 3, "max_resource": 3}}).pruner.max_resource == 3


def test_the_names_of_samplers_and_pruners_live_in_the_schema():
    assert SAMPLERS[0] == SamplerConf().name and PRUNERS[1] == PrunerConf().name
    with pytest.raises(
        ConfigError, match=r"^name='gp2': must be one of tpe, random, grid, gp, cmaes, nsga2$"
    ):
        SamplerConf(name="gp2")


def test_an_unwritable_report_folder_is_found_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file where a folder should be")
    with pytest.raises(ConfigError) as caught:
        sweeper_conf({"report": {"dir": "afile/reports"}})
    assert str(caught.value) == (
        "hydra.sweeper.report.dir='afile/reports': cannot write the report there: "
        f"{tmp_path / 'afile'} is a file, not a folder"
    )
    with pytest.raises(ConfigError, match=r"^hydra.sweeper.report.dir='afile': cannot write the report"):
        sweeper_conf({"report": {"dir": "afile"}})
    # a report that is not written needs no folder; a folder that does not exist yet is made at the end
    assert sweeper_conf({"report": {"dir": "afile/reports", "enabled": False}}).report.enabled is False
    assert sweeper_conf({"report": {"dir": "new/deeper/reports"}}).report.dir == "new/deeper/reports"
    assert not (tmp_path / "new").exists()  # checking creates nothing


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_report_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "locked").mkdir(mode=0o555)
    with pytest.raises(ConfigError, match=r"^hydra.sweeper.report.dir='locked/r': cannot write the report"):
        sweeper_conf({"report": {"dir": "locked/r"}})


def test_a_journal_under_a_file_is_found_before_anything_runs(tmp_path):
    (tmp_path / "afile").write_text("a file where a folder should be")
    storage = f"journal:{tmp_path}/afile/x.journal"
    with pytest.raises(ConfigError) as caught:
        sweeper_conf({"storage": storage})
    assert str(caught.value) == (
        f"hydra.sweeper.storage='{storage}': cannot write the journal there: {tmp_path / 'afile'} is a file, "
        "not a folder"
    )
    assert sweeper_conf({"storage": f"journal:{tmp_path}/new/x.journal"}).storage.endswith("x.journal")
    assert not (tmp_path / "new").exists()
