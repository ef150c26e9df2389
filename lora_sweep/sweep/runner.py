"""The sweep loop behind the Hydra sweeper: ask Optuna, launch the trial as a Hydra job, tell Optuna.

Each trial is one Hydra job (own output folder, own ``.hydra/``), launched by whatever launcher is
configured. With a parallel launcher (joblib, ``n_jobs`` workers) one thread per worker pulls trials
from the study as soon as its previous trial ends, so nobody waits for the slowest trial of a batch.
``hydra.sweeper.trials_per_device=k`` sizes that crew instead: k threads per visible GPU, each bound to one
GPU (:mod:`lora_sweep.sweep.devices`).
The study's storage is the only shared state, which is also what lets separate processes (two terminals,
two machines) work on one study.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from lora_sweep.config import RunConfig
from lora_sweep.errors import ConfigError, LoraSweepError
from lora_sweep.schema import to_dict
from lora_sweep.sweep import ladder
from lora_sweep.sweep.locks import closes_the_sweep, study_lock
from lora_sweep.sweep.optuna_api import heartbeat_enabled, storage_of
from lora_sweep.sweep.optuna_api import trial_id as trial_id_of
from lora_sweep.sweep.results import (
    OBJECTIVES,
    foreign_trial_folder,
    objective_value,
    read_record_in,
    summarize,
    trial_attrs,
)
from lora_sweep.sweep.settings import BaselineConf, LoraOptunaSweeperConf, ReportConf, SamplerConf
from lora_sweep.sweep.space import SearchSpace, format_value
from lora_sweep.sweep.study import (
    FINISHED,
    JOURNAL_PREFIX,
    ask,
    counts,
    make_pruner,
    open_storage,
    requeue,
    requeue_stale_trials,
    seeded_samplers,
    storage_spec,
    worker_identity,
)
from lora_sweep.sweep.trials import best_full, pick_best, trials_table
from lora_sweep.tasks import check as check_task
from lora_sweep.tracking import SweepRun

log = logging.getLogger(__name__)


class SweepAborted(LoraSweepError):
    pass


@dataclass
class Phase:
    """One study of the sweep: the LoRA search, or the full fine-tuning baseline's small lr search."""

    role: str
    study: optuna.Study
    space: SearchSpace
    overrides: list[str]
    n_trials: int
    objectives: list[str]
    arguments: list[str] = field(
        default_factory=list
    )  # the command line's overrides that apply to this phase
    wanted: list[dict[str, Any]] = field(default_factory=list)  # replicates: which source trial, which seed
    samplers: Callable[[int], optuna.samplers.BaseSampler] | None = None  # trial number -> seeded sampler
    attrs: dict[str, Any] = field(default_factory=dict)  # set on each of its trials (a rung's budget)


class SweepRunner:
    def __init__(
        self, conf: LoraOptunaSweeperConf, config: DictConfig, launcher, config_loader, arguments: list[str]
    ):
        self.conf = conf
        self.settings = to_dict(conf)  # the same settings as plain data: every key present
        self.config = config
        self.launcher = launcher
        self.config_loader = config_loader
        self.arguments = list(arguments)
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self._lock = threading.Lock()
        self.ladder: ladder.Ladder | None = None  # the budget ladder's rungs (run() plans them)
        # before anything opens: a trials_per_device the launcher cannot serve is a one-line error
        self.devices, self.pool = self._worker_plan()

    # --- setup: everything here runs, and fails, before any training ------------------------------------
    def _task_config(self, overrides: list[str]) -> RunConfig:
        try:
            composed = self.config_loader.load_sweep_config(self.config, list(overrides))
        except Exception as err:  # Hydra's own composition errors (bad group option, grammar)
            raise ConfigError("hydra.sweeper", " ".join(overrides[-3:]), str(err).splitlines()[0]) from None
        composed_plain = OmegaConf.to_container(composed, resolve=False)
        composed_plain.pop("hydra", None)
        composed_plain["output_dir"] = str(self.sweep_dir / "validation")
        return check_task(RunConfig.from_hydra(OmegaConf.create(composed_plain)))

    def _arguments_for(self, overrides: list[str]) -> list[str]:
        """Command-line overrides for a phase: when the phase switches the method group (the baseline's
        method=full), the command line's method.* keys belong to the other method and are left out."""
        if any(o.split("=", 1)[0].lstrip("+~") == "method" for o in overrides):
            return [a for a in self.arguments if not a.lstrip("+~").startswith("method.")]
        return list(self.arguments)

    def _validate(self, space: SearchSpace, overrides: list[str], where: str) -> None:
        """Compose the config with every choice of every parameter: a bad value fails now, not in trial 7."""
        from lora_sweep.methods import peft_kwargs, trained_head
        from lora_sweep.models import inspect_model, pick_device, pick_precision, plan_base
        from lora_sweep.targets import resolve_targets

        first = {p.name: _first(p.distribution) for p in space.params}
        variants = [first] + [
            {**first, p.name: c}
            for p in space.params
            if hasattr(p.distribution, "choices")
            for c in p.distribution.choices[1:]
        ]
        fixed = self._condition_values(space)
        spec = first_cfg = None
        for values in variants:
            values = space.applicable(values, fixed)  # a method's own keys only where that method is chosen
            try:
                cfg = self._task_config(self._arguments_for(overrides) + overrides + space.overrides(values))
            except ConfigError as err:
                raise ConfigError(f"{where} -> {err.key}", err.value, err.problem) from None
            first_cfg = first_cfg or cfg
            try:  # the base's dtype on this device (model.dtype=fp16 on CPU, ...), as each trial decides it
                device = pick_device(cfg.train.device)
                pick_precision(cfg.train.precision, device, plan_base(cfg.model, cfg.method.adapter, device))
            except ConfigError as err:
                raise ConfigError(f"{where} -> {err.key}", err.value, err.problem) from None
            if cfg.method.adapter:
                spec = spec or inspect_model(cfg.model)
                targets = resolve_targets(
                    cfg.method.targets, spec.linear_names, key=f"{where} -> method.targets"
                )
                try:
                    peft_kwargs(cfg.method, targets, trained_head(spec))
                except ConfigError as err:
                    raise ConfigError(f"{where} -> {err.key}", err.value, err.problem) from None
        from lora_sweep.prepare import prepare

        prepare(
            first_cfg
        )  # the data (path, columns, splits, labels) is the same for every trial: check it once, now

    def _phase(
        self,
        role: str,
        storage,
        study_name: str,
        block: dict[str, Any],
        overrides: list[str],
        objectives: list[str],
    ) -> Phase:
        where = "hydra.sweeper" if role == "search" else "hydra.sweeper.baseline"
        space = SearchSpace(
            block.get("params") or {},
            alpha=block.get("alpha"),
            target_sets=self.settings.get("target_sets"),
            conditions=block.get("conditions"),
            prefix=where,
        )
        for i, entry in enumerate(block.get("enqueue") or []):
            space.check_enqueued(dict(entry), f"{where}.enqueue[{i}]")
        missing = object()
        searches_method = "method" in (block.get("params") or {})
        for key, text in (block.get("params") or {}).items():
            if searches_method and key.startswith("method."):
                continue  # a key of another method's file: composing each choice in _validate checks it
            if OmegaConf.select(self.config, key, default=missing) is missing:
                raise ConfigError(f"{where}.params.{key}", text, "no such config key")
        self._validate(space, overrides, f"{where}.params")
        unknown = [o for o in objectives if o not in OBJECTIVES]
        if unknown:
            raise ConfigError(
                "hydra.sweeper.objectives", unknown[0], f"must be among {', '.join(OBJECTIVES)}"
            )
        directions = [self._direction(o) for o in objectives]
        sampler_cfg = phase_sampler(self.conf, role)
        grid = space.grid(f"{where}.params") if sampler_cfg.name == "grid" else None
        samplers = seeded_samplers(sampler_cfg, grid, len(directions) > 1)
        n_trials = int(block["n_trials"])
        if grid is not None and n_trials > math.prod(len(values) for values in grid.values()):
            n_trials = math.prod(len(values) for values in grid.values())
            log.warning("%s.n_trials: the grid has only %d points; running those", where, n_trials)
        pruner = make_pruner(self.conf.pruner)
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            sampler=samplers(0),  # replaced before every ask (see _worker)
            pruner=pruner,
            directions=directions,
            load_if_exists=True,
        )
        if study.directions != [optuna.study.StudyDirection[d.upper()] for d in directions]:
            raise ConfigError(
                "hydra.sweeper.objectives", objectives, f"study {study_name!r} exists with other directions"
            )
        if "lora_sweep" not in study.user_attrs:  # a new study: remember its settings, queue the fixed trials
            # "metric": the objective's metric, so the report reads it instead of guessing
            study.set_user_attr(
                "lora_sweep",
                {
                    "pruner": self.settings["pruner"],
                    "objectives": objectives,
                    "metric": OmegaConf.select(self.config, "objective.metric"),
                    "role": role,
                    "params": dict(block.get("params") or {}),
                },
            )
            deferred = role == "search" and self.conf.lr_from_baseline is not None  # queued with its lr
            for entry in [] if deferred else block.get("enqueue") or []:
                study.enqueue_trial(dict(entry), user_attrs={"enqueued": True})
        phase = Phase(role, study, space, overrides, n_trials, objectives, self._arguments_for(overrides))
        phase.samplers = samplers
        return phase

    def _direction(self, objective: str) -> str:
        if objective == "objective":
            from lora_sweep.tasks import metric_direction

            return metric_direction(OmegaConf.select(self.config, "objective.metric"))
        return OBJECTIVES[objective][1]

    # --- replicates: the chosen LoRA and the best full FT config again, with new seeds ----------------
    def _replicate_phase(self, storage) -> Phase | None:
        """The third study, ``<study>-replicates``: seeds 1..N of the LoRA trial the report's rule picks and
        of the best full fine-tuning trial, enqueued as trials with fixed params, run by the same worker
        loop (exact resume, many workers, failure accounting, child runs under the parent)."""
        report = self.conf.report
        n = report.replicates
        search, baseline = self.phases[-1], self.phases[0] if len(self.phases) > 1 else None
        if n <= 0 or not report.enabled:  # they exist for the report's comparison
            return None
        if baseline is None:
            log.info(
                "no replicates: they pair the chosen LoRA config with full fine-tuning; "
                "set hydra.sweeper.baseline.n_trials"
            )
            return None
        if any(counts(p.study)["running"] for p in (search, baseline)):
            log.info("other workers still run search trials: the last one to finish runs the replicates")
            return None
        metric, direction = OmegaConf.select(self.config, "objective.metric"), self._direction("objective")
        tolerance = report.tolerance
        table = trials_table(search.study, baseline.study)
        chosen, full = pick_best(table, metric, direction, tolerance).row, best_full(table, direction)
        if chosen is None or full is None:
            log.warning(
                "no replicates: no %s trial completed", "LoRA" if chosen is None else "full fine-tuning"
            )
            return None
        name = f"{self.settings['study_name']}-replicates"
        # the sampler never samples (every trial is enqueued); no pruning: a replicate runs to its end
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=optuna.samplers.RandomSampler(),
            pruner=optuna.pruners.NopPruner(),
            directions=[direction],
            load_if_exists=True,
        )
        if "lora_sweep" not in study.user_attrs:
            study.set_user_attr(
                "lora_sweep", {"pruner": {"name": "none"}, "objectives": ["objective"], "role": "replicate"}
            )
        sources = (("lora", search, chosen), ("full", baseline, full))
        wanted = [
            {
                "replicate_of": label,
                "source_study": source.study.study_name,
                "source_trial": int(row["trial"]),
                "seed": seed,
                "overrides": self._replicate_overrides(source, int(row["trial"]), seed),
            }
            for seed in range(1, n + 1)
            for label, source, row in sources
        ]
        phase = Phase("replicate", study, SearchSpace({}), [], 0, ["objective"], wanted=wanted)
        trials = study.get_trials(deepcopy=False)
        held = {_replicate_key(t.user_attrs) for t in trials if t.state != TrialState.FAIL}
        for spec in wanted:  # a rerun (or more seeds) queues only what is missing; a failed one runs again
            if _replicate_key(spec) not in held:
                study.enqueue_trial({"train.seed": spec["seed"]}, user_attrs=spec)
        keys = {_replicate_key(spec) for spec in wanted}
        # replicates of an earlier pick (before the search grew) stay in the study and count as taken places
        stale = sum(
            _replicate_key(t.user_attrs) not in keys
            for t in trials
            if t.state in (*FINISHED, TrialState.RUNNING)
        )
        phase.n_trials = len(keys) + stale
        finished = sum(_replicate_key(t.user_attrs) in keys for t in trials if t.state in FINISHED)
        log.info(
            "study %s (replicate): LoRA trial %d and full fine-tuning trial %d, seeds 1..%d; "
            "%d of %d finished",
            name,
            int(chosen["trial"]),
            int(full["trial"]),
            n,
            finished,
            len(keys),
        )
        return phase

    def _replicate_overrides(self, phase: Phase, number: int, seed: int) -> list[str]:
        """The source trial's overrides exactly as it was launched, with only the seed changed."""
        params = phase.study.get_trials(deepcopy=False)[number].params
        values = {name: params[name] for name in phase.space.names if name in params}
        launched = [*phase.arguments, *phase.overrides, *phase.space.overrides(values)]
        kept = [o for o in launched if o.split("=", 1)[0].lstrip("+~") != "train.seed"]
        return [*kept, f"train.seed={seed}"]

    def _replicate_values(self, phase: Phase, trial: optuna.Trial) -> dict[str, Any]:
        """Which replicate this trial is: its enqueued attributes, or (a fresh trial after a failure) the
        first wanted replicate no other trial holds."""
        attrs = trial.user_attrs
        if "replicate_of" not in attrs:
            held = {
                _replicate_key(t.user_attrs)
                for t in phase.study.get_trials(deepcopy=False)
                if t.state != TrialState.FAIL and t.number != trial.number
            }
            attrs = next((spec for spec in phase.wanted if _replicate_key(spec) not in held), phase.wanted[0])
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
        # an int of one value: a categorical's choices could not differ from one trial to the next
        trial.suggest_int("train.seed", attrs["seed"], attrs["seed"])
        return attrs

    # --- the sweep folder and the MLflow parent run --------------------------------------------------
    def _refuse_foreign_trial_folders(self, spec: str, study_name: str) -> None:
        """A trial folder of this sweep folder that holds another study's trial (the storage was moved, or
        another study shares the folder) would be relaunched into, and its record read as this trial's."""
        names = (study_name, f"{study_name}-baseline", f"{study_name}-replicates")
        names += tuple(f"{study_name}-{rung.role}" for rung in (self.ladder.rungs if self.ladder else []))
        foreign = foreign_trial_folder(self.sweep_dir, names, spec)
        if foreign is not None:
            folder, theirs = foreign
            raise ConfigError(
                "hydra.sweep.dir",
                str(self.sweep_dir),
                f"{folder} holds trial {theirs['trial_number']} of study {theirs['study_name']!r} in storage "
                f"{theirs['storage']}, not of this sweep's storage; give this sweep its own hydra.sweep.dir, "
                "or its old storage",
            )

    def _open_parent(self, main: optuna.Study, study_name: str) -> SweepRun:
        """The study's one MLflow parent run. The study gets its identity before the run exists: a run made
        by a process killed before storing the run's id is found again by that identity, never doubled."""
        uid = main.user_attrs.get("lora_sweep_uid")
        if uid is None:
            uid = uuid.uuid4().hex
            main.set_user_attr("lora_sweep_uid", uid)
        from lora_sweep.secrets import redact_url

        parent = SweepRun(self._tracking_config())
        known = main.user_attrs.get("mlflow_parent_run_id")
        tags = {
            "lora_sweep.sweep": study_name,
            "lora_sweep.role": "sweep",
            "lora_sweep.study_uid": uid,
            "lora_sweep.storage": redact_url(self.storage_spec),
        }
        identity = ("lora_sweep.sweep", "lora_sweep.study_uid")
        parent_id = parent.open(known, f"sweep {study_name}", self._parent_params(), tags, identity)
        if parent_id and known != parent_id:
            parent.log_dict(OmegaConf.to_container(self.config.hydra.sweeper, resolve=True), "sweep.yaml")
            main.set_user_attr("mlflow_parent_run_id", parent_id)
        return parent

    # --- the loop ------------------------------------------------------------------------------------
    def run(self) -> list[Phase]:
        from filelock import FileLock

        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        settings = self.settings
        keep = settings.get("keep_checkpoints")
        if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
            raise ConfigError(
                "hydra.sweeper.keep_checkpoints",
                keep,
                "must be an integer >= 1, or null to keep every checkpoint",
            )
        replicates = self.conf.report.replicates
        if not isinstance(replicates, int) or isinstance(replicates, bool) or replicates < 0:
            raise ConfigError(
                "hydra.sweeper.report.replicates", replicates, "must be an integer >= 0 (0: no replicates)"
            )
        self.ladder = ladder.plan(self)  # its rungs' step counts are checked before anything opens
        spec = storage_spec(self.conf.storage, self.sweep_dir)
        study_name = settings["study_name"]
        if spec.startswith(JOURNAL_PREFIX):  # opening a journal creates it: refuse a foreign folder first
            self._refuse_foreign_trial_folders(spec, study_name)
            storage = open_storage(spec, self.conf.heartbeat_interval)
        else:  # a database that cannot be reached is the first thing to hear about
            storage = open_storage(spec, self.conf.heartbeat_interval)
            self._refuse_foreign_trial_folders(spec, study_name)
        baseline = settings["baseline"]
        self.storage_spec = spec

        # one creator of the study and its parent run (the study lock reaches workers on other machines)
        with FileLock(str(self.sweep_dir / ".setup.lock")), study_lock(storage, spec, f"{study_name}/setup"):
            phases = []
            if self.conf.baseline.n_trials > 0:  # an empty list of overrides or objectives: the schema's
                phases.append(
                    self._phase(
                        "baseline",
                        storage,
                        f"{study_name}-baseline",
                        baseline,
                        list(self.conf.baseline.overrides or BaselineConf().overrides),
                        ["objective"],
                    )
                )
            objectives = list(self.conf.objectives or LoraOptunaSweeperConf().objectives)
            block = settings if self.ladder is None else {**settings, "enqueue": []}  # enqueued: to rung 0
            phases.append(self._phase("search", storage, study_name, block, [], objectives))
            if self.ladder is not None:
                self.ladder.phases = ladder.rung_phases(self, storage, phases[-1])
            self.phases = phases
            self.parent = self._open_parent(phases[-1].study, study_name)
        for phase in phases:
            with study_lock(storage, spec, phase.study.study_name) as exclusive:
                requeue_stale_trials(phase.study, orphans=exclusive)
            done = counts(phase.study)
            log.info(
                "study %s (%s): %d of %d trials finished, %d failed; storage %s",
                phase.study.study_name,
                phase.role,
                done["complete"] + done["pruned"],
                phase.n_trials,
                done["fail"],
                spec if "://" not in spec else "(url)",
            )
        self.replicates = None
        try:
            for phase in phases:
                if phase.role == "search" and self.conf.lr_from_baseline is not None:
                    self._lr_from_baseline(phase)
                if phase is phases[-1] and self.ladder is not None:  # the rungs first, their best into it
                    ladder.climb(self, phase)
                self._run_phase(phase)
            setup = study_lock(storage, spec, f"{study_name}/setup")
            with FileLock(str(self.sweep_dir / ".setup.lock")), setup:
                self.replicates = self._replicate_phase(storage)
            if self.replicates is not None:
                self._run_phase(self.replicates)
        except BaseException:
            self.parent.finish("killed")
            raise
        self._finish(phases)
        return phases

    def _lr_from_baseline(self, search: Phase) -> None:
        """The search's train.lr range from the finished baseline, recorded once in the search study."""
        from lora_sweep.sweep import lr_range

        baseline, storage = self.phases[0], storage_of(search.study)
        recorded = lr_range.apply(
            search.study,
            search.space,
            baseline.study,
            self.conf.lr_from_baseline,
            lock=lambda: study_lock(storage, self.storage_spec, search.study.study_name),
            config_lr=lambda: self._task_config([*baseline.arguments, *baseline.overrides]).train.lr,
            run_baseline=lambda: self._run_phase(baseline),
            enqueue=list(self.settings.get("enqueue") or []),
            queue=self.ladder.phases[0].study if self.ladder is not None else None,  # entries run in rung 0
        )
        self.parent.set_tags(lr_range.tags(recorded))

    def _run_phase(self, phase: Phase) -> None:
        workers = len(self.devices)
        if workers == 1:
            self._worker(phase, 0)
            return
        errors: list[BaseException] = []

        def target(index: int) -> None:
            try:
                self._worker(phase, index)
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                errors.append(err)

        threads = [
            threading.Thread(target=target, args=(i,), name=f"sweep-worker-{i}") for i in range(workers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def _worker(self, phase: Phase, index: int) -> None:
        device = self.devices[index]
        while True:
            # threads of this process, then every other worker of the study: count and ask as one step
            lock = study_lock(storage_of(phase.study), self.storage_spec, phase.study.study_name)
            with self._lock, lock as exclusive:
                # a worker killed mid-trial, or between asking and naming itself: its trial is ours now
                requeue_stale_trials(phase.study, orphans=exclusive)
                state = counts(phase.study)
                finished = state["complete"] + state["pruned"]
                limit = float(self.conf.max_failure_rate) * max(phase.n_trials, 1)
                if state["fail"] > limit:
                    raise SweepAborted(
                        f"hydra.sweeper.max_failure_rate={self.conf.max_failure_rate}: "
                        f"{state['fail']} trials "
                        f"of {phase.study.study_name} failed; last reason: {self._last_failure(phase.study)}"
                    )
                if finished + state["running"] >= phase.n_trials:
                    return
                trial = ask(phase.study, phase.samplers) if phase.samplers else phase.study.ask()
                trial.set_user_attr("worker", worker_identity())
                trial.set_user_attr(
                    "sweeper", worker_identity()
                )  # "worker" becomes the training process's (joblib)
                for key, value in phase.attrs.items():
                    trial.set_user_attr(key, value)
                if phase.role == "replicate":
                    values = self._replicate_values(phase, trial)
                else:
                    values = phase.space.sample(trial, self._condition_values(phase.space))
            self._launch(phase, trial, values, device)

    def _launch(self, phase: Phase, trial: optuna.Trial, values: dict[str, Any], device: str | None) -> None:
        storage, trial_id = storage_of(phase.study), trial_id_of(phase.study, trial.number)
        if heartbeat_enabled(storage):  # a requeued trial's old heartbeat must not read as stale
            storage.record_heartbeat(trial_id)
        subdir = f"{phase.role}-{trial.number:03d}"
        if phase.role == "replicate":  # the source trial's launch with a new seed, scored on the test split
            task, evaluate_test, shown = list(values["overrides"]), "true", values["overrides"][-1:]
        else:
            task = [*phase.arguments, *phase.overrides, *phase.space.overrides(values)]
            evaluate_test, shown = "false", None
        overrides = [
            *task,
            f"sweep.study_name={format_value(phase.study.study_name)}",
            f"sweep.storage={format_value(self.storage_spec)}",
            f"sweep.trial_number={trial.number}",
            f"sweep.trial_id={trial_id}",
            f"sweep.role={phase.role}",
            f"sweep.parent_run_id={format_value(self.parent.run_id)}",
            f"evaluate_test={evaluate_test}",
            f"hydra.sweep.subdir={subdir}",
        ]
        if device:
            overrides.append(f"train.device={device}")
        trial.set_user_attr("output_dir", str((self.sweep_dir / subdir).resolve()))
        interrupted = storage.get_trial(trial_id).user_attrs.get("interruptions")
        log.info(
            "trial %s-%d%s: %s",
            phase.role,
            trial.number,
            f" resumes ({interrupted[-1]})" if interrupted else "",
            " ".join(shown or phase.space.overrides(values)) or "(defaults)",
        )
        try:
            (result,) = self.launcher.launch([overrides], initial_job_idx=trial.number)
        except BaseException:  # Ctrl-C or a launcher crash: the same trial resumes when the sweep is rerun
            requeue(phase.study, trial_id, "interrupted")
            raise
        self._tell(phase, trial, result)

    def _tell(self, phase: Phase, trial: optuna.Trial, result) -> None:
        from hydra.core.utils import JobStatus

        output_dir = (
            Path(str(result.hydra_cfg.hydra.runtime.output_dir)) if result.hydra_cfg is not None else None
        )
        # only this trial's record: a folder can hold another study's (refused at start, unless it came later)
        record = read_record_in(output_dir, (phase.study.study_name, trial.number, self.storage_spec))
        for key, value in trial_attrs(record).items():
            trial.set_user_attr(key, value)
        status = record.get("status") if record else None
        if result.status == JobStatus.COMPLETED and status == "completed":
            values = [objective_value(record, objective) for objective in phase.objectives]
            phase.study.tell(trial, values if len(values) > 1 else values[0])
            state = "complete"
        elif status == "pruned":
            phase.study.tell(trial, state=TrialState.PRUNED)
            state = "pruned"
        else:
            reason = (record or {}).get("error") or _job_error(result)
            from lora_sweep.secrets import redact

            reason = redact(str(reason).splitlines()[0][:500] if str(reason) else "")
            trial.set_user_attr("fail_reason", reason)
            phase.study.tell(trial, state=TrialState.FAIL)
            state = "failed"
            log.warning("trial %s-%d failed: %s (the sweep goes on)", phase.role, trial.number, reason)
        run_id = (record or {}).get("mlflow", {}).get("run_id")
        self.parent.set_tags({"optuna.state": state}, run_id=run_id)
        if self.conf.keep_checkpoints is not None:
            self._retain()

    def _retain(self) -> None:
        """Delete the checkpoints no report can want any more (see :mod:`lora_sweep.sweep.retention`)."""
        from lora_sweep.sweep import retention

        keep = int(self.settings["keep_checkpoints"])
        search, baseline = self.phases[-1].study, self.phases[0].study if len(self.phases) > 1 else None
        report = self.conf.report
        chosen = retention.report_choice(
            search,
            baseline,
            OmegaConf.select(self.config, "objective.metric"),
            self._direction("objective"),
            report.tolerance,
            Path(report.dir) / self.settings["study_name"],
        )
        retention.enforce(search, keep, retention.top_trials(search, keep) | chosen)
        if baseline is not None:
            retention.enforce(baseline, keep, retention.top_trials(baseline, keep))

    # --- the end ----------------------------------------------------------------------------------
    def _finish(self, phases: list[Phase]) -> None:
        from lora_sweep.sweep.summary import print_summary

        rungs = ladder.summary(self.ladder, phases[-1]) if self.ladder is not None else None
        summary = summarize(phases, self.parent, {"ladder": rungs} if rungs else None)
        from lora_sweep.secrets import redact

        (self.sweep_dir / "sweep_summary.json").write_text(json.dumps(redact(summary), indent=2, default=str))
        print_summary(phases, self.parent, OmegaConf.select(self.config, "objective.metric"))
        for line in ladder.lines(rungs or []):
            print(line)
        studies = [phase.study for phase in phases]
        if self.replicates is not None:
            studies.insert(-1, self.replicates.study)  # the main study stays last
        if self.ladder is not None:  # a worker may have trained rung trials only
            studies[:0] = [phase.study for phase in self.ladder.phases]
        if not closes_the_sweep(studies, self.storage_spec, worker_identity()):
            log.info(
                "other workers of this study are still at work: the last one out writes the report and "
                "closes the parent run"
            )
            return
        if self.conf.report.enabled:
            self._report(self.conf.report)
        self.parent.finish("completed")

    def _report(self, report: ReportConf) -> None:
        from lora_sweep.report import write_report

        out = Path(report.dir) / self.settings["study_name"]
        tracking = self._tracking_config()
        register_as = report.register_as or (self.conf.study_name if tracking.backend == "mlflow" else None)
        summary = write_report(
            self.conf.study_name,
            self.storage_spec,
            self.sweep_dir,
            out,
            report.tolerance,
            checkpoints=report.checkpoints,
            register_as=register_as,
            tracking_uri=self.parent.location,
            replicates=report.replicates,
        )
        self.parent.log_artifacts(out, "report")
        print(
            f"report: {out / 'report.html'}"
            + (f" (chosen: trial {summary['chosen']['trial']})" if summary.get("chosen") else "")
        )

    # --- helpers -------------------------------------------------------------------------------------
    def _worker_plan(self) -> tuple[list[str | None], int | None]:
        """Each worker thread's device, and the joblib pool size they need (see ``plan_workers``)."""
        from lora_sweep.sweep.devices import SPREAD, plan_workers

        launcher = OmegaConf.select(self.config, "hydra.launcher") or {}
        n_jobs = None  # Hydra's basic launcher: one trial at a time, in this process
        if "joblib" in str(launcher.get("_target_", "")).lower():
            value = launcher.get("n_jobs")
            n_jobs = 1 if value is None else int(value)  # joblib reads null as 1
        device = str(OmegaConf.select(self.config, "train.device", default="auto"))
        gpus = 0
        if device in SPREAD:
            import torch

            gpus = torch.cuda.device_count()
        k = self.conf.trials_per_device
        devices, pool = plan_workers(device, gpus, k, n_jobs, os.cpu_count() or 1)
        if k > 1:
            log.info(
                "%d trials at once (hydra.sweeper.trials_per_device=%d): %s",
                len(devices),
                k,
                ", ".join(d or device for d in devices),
            )
        return devices, pool

    def _tracking_config(self):
        from lora_sweep.config import TrackingConfig
        from lora_sweep.schema import build

        return build(TrackingConfig, OmegaConf.to_container(self.config.tracking, resolve=True), "tracking")

    def _parent_params(self) -> dict[str, Any]:
        s = self.settings
        from lora_sweep.sweep.study import redact_url

        c = self.conf
        params = {
            "study_name": c.study_name,
            "n_trials": c.n_trials,
            "sampler": c.sampler.name,
            "pruner": c.pruner.name,
            "objectives": c.objectives,
            "storage": redact_url(self.storage_spec),
            "baseline.n_trials": c.baseline.n_trials,
            **({"ladder": s["ladder"]} if s.get("ladder") else {}),
            "command": " ".join(["python -m lora_sweep --multirun", *self.arguments]),
        }
        params.update({f"space.{k}": v for k, v in (s.get("params") or {}).items()})
        if s.get("alpha"):
            params["space.alpha"] = s["alpha"]
        if s.get("lr_from_baseline"):  # the derived range itself: the parent's lora_sweep.lr_range.* tags
            params["space.lr_from_baseline"] = s["lr_from_baseline"]
        return params

    def _condition_values(self, space: SearchSpace) -> dict[str, Any]:
        """The config's own values of the keys conditions look at; a config group (``method``) by its name."""
        values = {}
        for key in _condition_keys(space):
            value = OmegaConf.select(self.config, key)
            values[key] = value.get("name") if OmegaConf.is_config(value) else value
        return values

    @staticmethod
    def _last_failure(study: optuna.Study) -> str:
        failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        return failed[-1].user_attrs.get("fail_reason", "unknown") if failed else "unknown"


def _first(distribution) -> Any:
    return distribution.choices[0] if hasattr(distribution, "choices") else distribution.low


def _replicate_key(attrs: dict[str, Any]) -> tuple:
    return attrs.get("replicate_of"), attrs.get("source_study"), attrs.get("source_trial"), attrs.get("seed")


def _condition_keys(space: SearchSpace) -> set[str]:
    return {key for p in space.params for key in (p.when or {})}


def phase_sampler(conf: LoraOptunaSweeperConf, role: str) -> SamplerConf:
    """The sampler of a phase: the baseline's own if given, else (a small 1-D learning-rate search) TPE
    seeded like the main study."""
    if role != "baseline":
        return conf.sampler
    return conf.baseline.sampler or SamplerConf(name="tpe", seed=conf.sampler.seed, n_startup_trials=3)


def _job_error(result) -> str:
    """What a job that left no record returned or raised, as ``Type: message``."""
    import contextlib
    import io

    try:  # Hydra re-raises a failed job's exception here, after printing its overrides (passwords too)
        with contextlib.redirect_stderr(io.StringIO()):
            value = result.return_value
    except Exception as err:  # noqa: BLE001 - the job's own error, whatever it is
        value = err
    return f"{type(value).__name__}: {value}"
