"""A budget ladder for the LoRA search (``hydra.sweeper.ladder``): cheap trials weed out bad regions before
full-budget trials are spent there.

Rung k is a study of its own, ``<study>-rung<k>``, whose trials train ``round(fraction_k * S)`` optimizer
steps, S being a full trial's steps as the run plans them (training rows after ``data.max_train_samples``,
batch size, gradient accumulation, epochs, ``train.max_steps``). A rung trial is a complete short run,
warm-up and decay over its own steps: a finished short run ranks configurations better than a long one cut
mid-schedule.

Rung 0 samples over the search space (the sweep's ``enqueue`` entries first). Rung k+1, and then the main
search, get the best trials of the previous rung, as many as they have places (about ``keep`` of it), enqueued
with fixed params; pruned and failed trials never promote; several objectives promote by the first. The main
search keeps its ``n_trials`` full-budget trials and samples what the promotion leaves free. Rung k has
``ceil(n_trials / keep^(K-k))`` trials (K rungs).

The rungs are phases of the sweep's own worker loop (exact resume, many workers, failure accounting, MLflow
child runs tagged ``lora_sweep.role=rung<k>``, folders ``rung<k>-NNN``). A promotion waits until the rung has
no running trial, happens once, under the sweep's setup lock, and is recorded (the source trials' numbers)
in the next study's user attributes before anything is enqueued: a rerun after a kill enqueues only what is
missing and never promotes twice or differently.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from lora_sweep.errors import ConfigError
from lora_sweep.ranking import rank_key
from lora_sweep.sweep.optuna_api import storage_of
from lora_sweep.sweep.study import FINISHED, counts, make_pruner

if TYPE_CHECKING:
    from lora_sweep.sweep.runner import Phase, SweepRunner

log = logging.getLogger(__name__)

# keys that set a trial's budget: searching one would give every trial another S
PLANNING_KEYS = (
    "train.batch_size",
    "train.grad_accum",
    "train.epochs",
    "train.max_steps",
    "data.max_train_samples",
)
PROMOTED = "ladder_promoted"  # the next study's user attribute: {"from": study, "trials": [numbers]}
POLL_SECONDS = 5.0  # how often a worker looks whether another worker's rung trial has ended


@dataclass
class Rung:
    index: int
    fraction: float
    steps: int  # optimizer steps of each of its trials
    n_trials: int

    @property
    def role(self) -> str:
        return f"rung{self.index}"


@dataclass
class Ladder:
    full_steps: int  # S: a full trial's optimizer steps
    rungs: list[Rung]
    phases: list[Phase] = field(default_factory=list)  # one per rung, made with the search's phase


def plan(runner: SweepRunner) -> Ladder | None:
    """The rungs of ``hydra.sweeper.ladder``, checked against a full trial's step count before anything is
    opened or recorded; None without a ladder."""
    conf = runner.conf.ladder
    if conf is None:
        return None
    params = runner.settings.get("params") or {}
    searched = [key for key in params if key.lstrip("+~") in PLANNING_KEYS]
    if searched:
        raise ConfigError(
            f"hydra.sweeper.params.{searched[0]}",
            params[searched[0]],
            "sets a trial's budget, which the budget ladder's rungs take fractions of: fix it, or drop "
            "hydra.sweeper.ladder",
        )
    from lora_sweep.sweep.space import SearchSpace

    space = SearchSpace(
        params,
        alpha=runner.settings.get("alpha"),
        target_sets=runner.settings.get("target_sets"),
        conditions=runner.settings.get("conditions"),
        prefix="hydra.sweeper",
    )
    for i, entry in enumerate(runner.settings.get("enqueue") or []):  # they run in rung 0, not the search
        space.check_enqueued(dict(entry), f"hydra.sweeper.enqueue[{i}]")
    if len(runner.conf.objectives) > 1:
        log.info("budget ladder: rungs promote by the first objective, %s", runner.conf.objectives[0])
    from lora_sweep.prepare import prepare

    cfg = runner._task_config(runner._arguments_for([]))
    full = cfg.train.plan_steps(len(prepare(cfg).data.splits["train"]))[1]
    rungs, previous, top = [], 0, len(conf.fractions)
    for k, fraction in enumerate(conf.fractions):
        steps = round(fraction * full)
        key = f"hydra.sweeper.ladder.fractions[{k}]"
        if steps < 1:
            raise ConfigError(
                key, fraction, f"a rung trial would train round({fraction:g} x {full}) = 0 optimizer steps"
            )
        if steps >= full:
            raise ConfigError(
                key, fraction, f"round({fraction:g} x {full}) = {steps} steps: no cheaper than a full trial"
            )
        if steps <= previous:
            raise ConfigError(
                key, fraction, f"{steps} steps, as many as the rung before it: a full trial has only {full}"
            )
        rungs.append(Rung(k, fraction, steps, sizes(runner.conf.n_trials, conf.keep, top)[k]))
        previous = steps
    return Ladder(full, rungs)


def sizes(n_trials: int, keep: float, rungs: int) -> list[int]:
    """Trials of each rung: ``ceil(n_trials / keep^(K-k))``, so each keeps ``keep`` of the one before."""
    # 1e-9: 2 / 0.5**2 must be 8, whatever the last bit of the float division says
    return [math.ceil(n_trials / keep ** (rungs - k) - 1e-9) for k in range(rungs)]


def rung_phases(runner: SweepRunner, storage, search: Phase) -> list[Phase]:
    """One study per rung, made (or reopened) beside the search's, with its sampler, pruner, objectives and
    space; rung 0 holds the sweep's ``enqueue`` entries. Called under the sweep's setup lock."""
    from lora_sweep.sweep.runner import Phase

    ladder, settings = runner.ladder, runner.settings
    phases = []
    for rung in ladder.rungs:
        name = f"{settings['study_name']}-{rung.role}"
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=search.samplers(0),  # replaced before every ask
            pruner=make_pruner(runner.conf.pruner),
            directions=search.study.directions,
            load_if_exists=True,
        )
        if study.directions != search.study.directions:
            raise ConfigError(
                "hydra.sweeper.objectives", search.objectives, f"study {name!r} exists with other directions"
            )
        budget = {"fraction": rung.fraction, "steps": rung.steps, "full_steps": ladder.full_steps}
        if "lora_sweep" not in study.user_attrs:
            study.set_user_attr(
                "lora_sweep", {**search.study.user_attrs["lora_sweep"], "role": rung.role, "ladder": budget}
            )
            # checked by plan(); with lr_from_baseline they wait for the lr the baseline gives (lr_range)
            deferred = runner.conf.lr_from_baseline is not None
            for entry in (settings.get("enqueue") or []) if rung.index == 0 and not deferred else []:
                study.enqueue_trial(dict(entry), user_attrs={"enqueued": True})
        phase = Phase(
            rung.role,
            study,
            search.space,
            [f"train.max_steps={rung.steps}"],
            rung.n_trials,
            search.objectives,
            list(search.arguments),
            samplers=search.samplers,
        )
        phase.attrs = {"ladder_fraction": rung.fraction, "ladder_steps": rung.steps}
        phases.append(phase)
    search.attrs = {"ladder_fraction": 1.0, "ladder_steps": ladder.full_steps}
    for phase in phases:
        done = counts(phase.study)
        log.info(
            "study %s (%s): %d of %d trials finished, %d failed; %d optimizer steps each (%g of %d)",
            phase.study.study_name,
            phase.role,
            done["complete"] + done["pruned"],
            phase.n_trials,
            done["fail"],
            phase.attrs["ladder_steps"],
            phase.attrs["ladder_fraction"],
            ladder.full_steps,
        )
    return phases


def climb(runner: SweepRunner, search: Phase) -> None:
    """Run the rungs in order, each promoting its best into the next, the last into the main search."""
    previous = None
    for phase in runner.ladder.phases:
        phase.space = search.space  # the search's space as it is now (it may be refined after the baseline)
        if previous is not None:
            promote(runner, previous, phase)
        finish(runner, phase)
        previous = phase
    promote(runner, previous, search)


def finish(runner: SweepRunner, phase: Phase) -> None:
    """Run a rung until it has its trials and none of them is running, here or in another worker."""
    waiting = False
    while True:
        runner._run_phase(phase)
        state = counts(phase.study)
        if not state["running"] and state["complete"] + state["pruned"] >= phase.n_trials:
            return
        if state["running"]:
            if not waiting:
                log.info(
                    "study %s: waiting for %d running trials of other workers before promoting",
                    phase.study.study_name,
                    state["running"],
                )
            waiting = True
            time.sleep(POLL_SECONDS)


def promote(runner: SweepRunner, source: Phase, target: Phase) -> list[int]:
    """Enqueue ``source``'s best complete trials (as many as ``target`` has open places) into ``target``,
    once: the choice is recorded first, and a rerun enqueues only recorded trials not yet in ``target``."""
    from filelock import FileLock

    from lora_sweep.sweep.locks import study_lock

    storage = storage_of(target.study)
    lock = study_lock(storage, runner.storage_spec, f"{runner.settings['study_name']}/setup")
    with FileLock(str(runner.sweep_dir / ".setup.lock")), lock:
        recorded = target.study.user_attrs.get(PROMOTED)
        if recorded is None:
            # places still open: all of them, unless the ladder came to a search that already has trials
            taken = counts(target.study)
            places = target.n_trials - sum(taken[s] for s in ("complete", "pruned", "running", "waiting"))
            recorded = {"from": source.study.study_name, "trials": best(source.study, max(places, 0))}
            target.study.set_user_attr(PROMOTED, recorded)
        trials = source.study.get_trials(deepcopy=False)
        held = {t.user_attrs.get("promoted_from") for t in target.study.get_trials(deepcopy=False)}
        missing = [number for number in recorded["trials"] if number not in held]
        for number in missing:
            attrs = {"promoted_from": number, "source_study": recorded["from"]}
            enqueue(target.study, trials[number].params, attrs)
    if missing:
        log.info(
            "study %s: trials %s of %s promoted",
            target.study.study_name,
            recorded["trials"],
            recorded["from"],
        )
    return recorded["trials"]


def enqueue(study: optuna.Study, params: dict[str, Any], attrs: dict[str, Any]) -> None:
    study.enqueue_trial(dict(params), user_attrs=attrs)


def best(study: optuna.Study, n: int) -> list[int]:
    """Numbers of ``study``'s ``n`` best complete trials by the (first) objective, earlier first on ties."""
    direction = study.directions[0]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ranked = sorted(complete, key=lambda t: (rank_key(t.values[0], direction), t.number))
    return [t.number for t in ranked[:n]]


def summary(ladder: Ladder, search: Phase) -> list[dict[str, Any]]:
    """One entry per rung: its study, trials, steps per trial and how many went on to the next study."""
    rows = []
    nexts = [*ladder.phases[1:], search]
    for rung, phase, following in zip(ladder.rungs, ladder.phases, nexts):
        trials = phase.study.get_trials(deepcopy=False)
        promoted = following.study.user_attrs.get(PROMOTED) or {}
        rows.append(
            {
                "rung": rung.index,
                "study": phase.study.study_name,
                "fraction": rung.fraction,
                "steps": rung.steps,
                "full_steps": ladder.full_steps,
                "trials": sum(t.state in FINISHED for t in trials),
                "complete": sum(t.state == TrialState.COMPLETE for t in trials),
                "failed": sum(t.state == TrialState.FAIL for t in trials),
                "promoted": len(promoted.get("trials", [])),
                "promoted_to": following.study.study_name,
            }
        )
    return rows


def lines(rows: list[dict[str, Any]]) -> list[str]:
    return [
        f"rung{r['rung']} ({r['study']}): {r['trials']} trials of {r['steps']} steps "
        f"({r['fraction']:g} of {r['full_steps']}), {r['complete']} complete, {r['promoted']} promoted to "
        f"{r['promoted_to']}"
        for r in rows
    ]
