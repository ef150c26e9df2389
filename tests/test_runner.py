"""Pieces of the sweep loop (:mod:`lora_sweep.sweep.runner`) that need no sweep to check."""

from __future__ import annotations

from hydra.core.utils import JobReturn, JobStatus

from hydra_plugins.lora_sweep_optuna.config import SamplerConf, sweeper_conf
from lora_sweep.sweep.runner import _job_error, phase_sampler


def test_the_baseline_searches_with_tpe_seeded_like_the_main_study_unless_it_has_its_own_sampler():
    conf = sweeper_conf({"sampler": {"name": "random", "seed": 7}})
    assert phase_sampler(conf, "search") == SamplerConf(name="random", seed=7)
    assert phase_sampler(conf, "baseline") == SamplerConf(name="tpe", seed=7, n_startup_trials=3)
    own = sweeper_conf({"sampler": {"seed": 7}, "baseline": {"sampler": {"name": "gp", "seed": 1}}})
    assert phase_sampler(own, "baseline") == SamplerConf(name="gp", seed=1)


def test_a_failed_job_reports_its_exception_and_prints_nothing(capsys):
    failed = JobReturn(overrides=["sweep.storage=postgresql://u:secret@db/x"], status=JobStatus.FAILED)
    failed.return_value = ValueError("no such file")
    assert _job_error(failed) == "ValueError: no such file"
    done = JobReturn(status=JobStatus.COMPLETED)
    done.return_value = 0.5
    assert _job_error(done) == "float: 0.5"
    assert "secret" not in capsys.readouterr().err
