"""Optuna's side of a sweep: storage, sampler, pruner, the study, its budget and its stale trials.

Default storage: a journal file (``JournalStorage(JournalFileBackend)``) in the sweep's output folder.
It survives the process, several worker processes on one machine share it safely through its file lock,
it needs no database server, and it costs ~6 ms per trial against ~87 ms for SQLite. Any Optuna storage
URL (``sqlite:///…``, ``postgresql://…``) can be given instead: PostgreSQL for workers on several
machines; RDB storages also get Optuna's heartbeat, so a dead worker's trial is noticed from anywhere.

A trial whose worker died is not failed and re-run under a new number: it goes back to the queue and
resumes, as the same trial, from its last checkpoint (:func:`requeue_stale_trials`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import socket
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from lora_sweep.errors import ConfigError
from lora_sweep.schema import build
from lora_sweep.secrets import password_of, redact_text, redact_url, secret_values
from lora_sweep.sweep.optuna_api import stale_trial_ids, storage_of, trial_id
from lora_sweep.sweep.settings import (  # noqa: F401 - SAMPLERS, PRUNERS: the names, importable here too
    JOURNAL_PREFIX,
    PRUNERS,
    SAMPLERS,
    PrunerConf,
    SamplerConf,
    check_journal,
)

log = logging.getLogger(__name__)
# TPE's group/constant_liar options are "experimental" in Optuna 5 but stable in practice; the warnings
# would fill every sweep's log. Optuna's own INFO lines duplicate ours.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.WARNING)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
CONNECT_TIMEOUT = 10  # seconds to reach a database server


def storage_spec(storage: str | None, sweep_dir: Path) -> str:
    """The storage as one string a trial process can reopen: a URL, or ``journal:<absolute path>``."""
    if storage is None:
        return JOURNAL_PREFIX + str((sweep_dir / "optuna.journal").resolve())
    if storage.startswith(JOURNAL_PREFIX):
        return JOURNAL_PREFIX + str(Path(storage[len(JOURNAL_PREFIX) :]).expanduser().resolve())
    return storage


def open_storage(spec: str, heartbeat_interval: int | None = None) -> optuna.storages.BaseStorage:
    if spec.startswith(JOURNAL_PREFIX):
        from optuna.storages.journal import JournalFileBackend

        check_journal(spec)
        path = Path(spec[len(JOURNAL_PREFIX) :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    from lora_sweep.sweep.locks import schema_lock

    if "://" not in spec:
        raise ConfigError(
            "hydra.sweeper.storage",
            redact_url(spec),
            "not a storage URL (sqlite:///path.db, postgresql://user@host/db) nor journal:<file>",
        )
    engine_kwargs = None
    if not spec.startswith("sqlite"):  # a dead server fails in seconds, not after the OS's TCP timeout
        engine_kwargs = {
            "pool_pre_ping": True,
            "connect_args": {"connect_timeout": CONNECT_TIMEOUT} if spec.startswith("postgres") else {},
        }
    try:
        with schema_lock(
            spec, CONNECT_TIMEOUT
        ):  # workers starting together on an empty database create its tables once
            return optuna.storages.RDBStorage(
                spec,
                heartbeat_interval=heartbeat_interval,
                engine_kwargs=engine_kwargs,
                grace_period=None if heartbeat_interval is None else 3 * heartbeat_interval,
            )
    except Exception as err:  # malformed URL, unknown dialect, unreachable server, wrong password
        problem = redact_text(
            str(err).splitlines()[0] if str(err) else type(err).__name__,
            [p for p in [password_of(spec)] if p] + secret_values(),
        )  # drivers quote the password
        raise ConfigError(
            "hydra.sweeper.storage", redact_url(spec), f"cannot open the study storage: {problem}"
        ) from None


class SweepGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, minus its ``Study.stop()`` once the grid is covered: that call only works inside
    ``Study.optimize``, and the sweep tells trials itself (it already caps n_trials at the grid's size)."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_sampler(
    cfg: SamplerConf | Mapping[str, Any], grid: dict[str, list] | None, multi_objective: bool
) -> optuna.samplers.BaseSampler:
    """The sampler of ``cfg``: the schema's dataclass, or a mapping of some of its fields."""
    if isinstance(cfg, Mapping):
        cfg = build(SamplerConf, cfg, "hydra.sweeper.sampler")
    name, seed = cfg.name, cfg.seed  # names and ranges: checked by the schema (SamplerConf)
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=cfg.n_startup_trials,
            multivariate=True,
            group=True,
            constant_liar=True,
        )  # the liar keeps parallel workers apart
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return SweepGridSampler(grid, seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=cfg.n_startup_trials)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if multi_objective:
        raise ConfigError(
            "hydra.sweeper.sampler.name", name, "CMA-ES optimises one objective; use tpe or nsga2 for several"
        )
    return optuna.samplers.CmaEsSampler(
        seed=seed, n_startup_trials=cfg.n_startup_trials, warn_independent_sampling=False
    )


def trial_seed(seed: int | None, number: int) -> int | None:
    """The sampler seed of trial ``number`` of a study seeded ``seed``: a fixed function of both, so trial n
    proposes the same configuration in whichever process asks for it, after any number of kills, and two
    trials never share a random stream (a sampler seeded once per process restarts its sequence in each)."""
    if seed is None:
        return None
    return int.from_bytes(hashlib.blake2b(f"{seed}/{number}".encode(), digest_size=4).digest(), "big")


def seeded_samplers(
    cfg: SamplerConf | Mapping[str, Any], grid: dict[str, list] | None, multi_objective: bool
) -> Callable[[int], optuna.samplers.BaseSampler]:
    """``number -> sampler`` for :func:`ask`: ``cfg``'s sampler seeded for that trial. Every sampler here
    keeps its state in the study (TPE's liars, CMA-ES's and NSGA-II's generations, the grid's visited
    points), so a fresh instance per trial loses nothing but the random stream it must not share.

    The grid keeps the study's own seed: it shuffles its points once, by that seed, and trial n takes
    point n of that order (Optuna's GridSampler), which is already the same in every process."""
    if isinstance(cfg, Mapping):
        cfg = build(SamplerConf, cfg, "hydra.sweeper.sampler")
    make_sampler(cfg, grid, multi_objective)  # a bad name fails now, not at the first ask

    def sampler_for(number: int) -> optuna.samplers.BaseSampler:
        if cfg.name == "grid":
            return make_sampler(cfg, grid, multi_objective)
        seeded = dataclasses.replace(cfg, seed=trial_seed(cfg.seed, number))
        return make_sampler(seeded, grid, multi_objective)

    return sampler_for


def next_trial_number(study: optuna.Study) -> int:
    """The number ``study.ask()`` gives next: the first queued trial's, else a new one's. Exact while the
    caller holds the study lock (nobody else asks meanwhile)."""
    trials = study.get_trials(deepcopy=False)
    waiting = [t.number for t in trials if t.state == TrialState.WAITING]
    return min(waiting) if waiting else len(trials)


def ask(study: optuna.Study, samplers: Callable[[int], optuna.samplers.BaseSampler]) -> optuna.Trial:
    """``study.ask()`` with the sampler seeded for the trial it is about to create or pop."""
    number = next_trial_number(study)
    study.sampler = samplers(number)
    trial = study.ask()
    if trial.number != number:  # another process asked meanwhile (a storage without a study lock)
        log.debug("trial %d sampled with trial %d's seed", trial.number, number)
    return trial


def make_pruner(cfg: PrunerConf | Mapping[str, Any]) -> optuna.pruners.BasePruner:
    """The pruner of ``cfg``: the schema's dataclass, or a mapping of some of its fields (as a study keeps
    it in its user attributes), the schema's defaults filling the rest."""
    if isinstance(cfg, Mapping):
        cfg = build(PrunerConf, cfg, "hydra.sweeper.pruner")
    name = cfg.name  # names and ranges: checked by the schema (PrunerConf)
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps
        )
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=cfg.min_resource, reduction_factor=cfg.reduction_factor
        )
    return optuna.pruners.HyperbandPruner(
        min_resource=cfg.min_resource, max_resource=cfg.max_resource, reduction_factor=cfg.reduction_factor
    )


def counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}


def worker_identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def requeue(study: optuna.Study, trial_id: int, reason: str) -> bool:
    """Put an unfinished trial back in the queue: the next ``ask()`` of any worker, here or on another
    machine, pops this same trial (number, parameters, output folder, MLflow run) and it resumes from its
    last checkpoint. Popping is atomic in every Optuna storage, so two workers never both take it."""
    storage = storage_of(study)
    try:
        if storage.get_trial(trial_id).state != TrialState.RUNNING:
            return False
        storage.set_trial_state_values(trial_id, TrialState.WAITING)
    except optuna.exceptions.UpdateFinishedTrialError:  # another worker finished it meanwhile
        return False
    interruptions = storage.get_trial(trial_id).user_attrs.get("interruptions", [])
    storage.set_trial_user_attr(trial_id, "interruptions", [*interruptions, reason])
    return True


def requeue_stale_trials(study: optuna.Study, orphans: bool = False) -> list[int]:
    """Requeue RUNNING trials whose worker is gone; return their numbers.

    On this machine a dead worker is seen at once (its pid no longer exists). RDB storages also see a
    trial whose heartbeat stopped, from any machine (Optuna's heartbeat). A trial of a live worker, or of
    another machine without heartbeat, is left alone.

    ``orphans``: the caller holds the study lock, under which every worker asks for a trial and names
    itself its worker in one step; a RUNNING trial that names no worker was then asked for by a worker
    killed in between, and nobody will ever finish it.
    """
    storage = storage_of(study)
    stale: dict[int, str] = {trial_id: "its heartbeat stopped" for trial_id in stale_trial_ids(study)}
    me = worker_identity()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if worker is None:
            if orphans:
                stale[trial_id(study, trial.number)] = "its worker died as it asked for the trial"
        elif worker.get("host") == me["host"] and not _alive(int(worker.get("pid", -1))):
            stale[trial_id(study, trial.number)] = "its worker process died"
    numbers = [
        storage.get_trial(trial_id).number
        for trial_id, reason in stale.items()
        if requeue(study, trial_id, reason)
    ]
    if numbers:
        log.warning(
            "trials %s were left running by a dead worker: they resume from their last checkpoint",
            sorted(numbers),
        )
    return sorted(numbers)
