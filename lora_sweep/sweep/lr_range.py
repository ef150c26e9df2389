"""The LoRA search's learning-rate range, derived from the full fine-tuning baseline the sweep runs first.

``hydra.sweeper.lr_from_baseline: {ratio: 10, span: [3, 30]}``: once the baseline phase has finished, the
LoRA search samples ``train.lr`` on a log scale over [best baseline lr * 3, best baseline lr * 30], and its
enqueued trials start at best baseline lr * 10. With a fixed alpha (or rsLoRA) LoRA's best rate is close to
rank-invariant and about 10x full fine-tuning's (Biderman et al. 2024; "LoRA Without Regret", 2025; PEFT's
benchmark 1e-4 vs 1e-5; our grid 2e-3 vs 1e-4), so the baseline already tells where to look.

The range is derived once, under the search study's lock, and recorded in the search study's user attribute
``lora_sweep_lr_range``: a resumed sweep, a second worker or a worker on another machine reads it back and
uses exactly that range, even if the baseline study changes later (more trials, a better one). The best
baseline trial is read from Optuna's own values and the study's direction, so a worker that cannot see the
other machines' trial folders derives the same range.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from lora_sweep.errors import ConfigError
from lora_sweep.ranking import rank_key
from lora_sweep.sweep.settings import LrFromBaselineConf
from lora_sweep.sweep.space import Param, SearchSpace

log = logging.getLogger(__name__)

ATTR = "lora_sweep_lr_range"  # the search study's user attribute holding the derived range
LR = "train.lr"
WHERE = "hydra.sweeper.lr_from_baseline"
POLL_SECONDS = 5.0  # how often a worker looks again at baseline trials other workers are still running


def given(conf: LrFromBaselineConf) -> dict[str, Any]:
    """The setting as the user wrote it: the value of its error lines."""
    return {"ratio": conf.ratio, "span": list(conf.span)}


def derive(
    baseline: optuna.Study, conf: LrFromBaselineConf, config_lr: Callable[[], float]
) -> dict[str, Any]:
    """The range from the best completed baseline trial (the study's direction; ties: the earlier trial):
    its ``train.lr``, or ``config_lr()`` (the baseline config's own) when the baseline searched no lr."""
    done = [
        t for t in baseline.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None
    ]
    if not done:
        trials = baseline.get_trials(deepcopy=False)
        pruned, failed = (sum(t.state == s for t in trials) for s in (TrialState.PRUNED, TrialState.FAIL))
        states = f"{pruned} pruned, {failed} failed"
        raise ConfigError(
            WHERE,
            given(conf),
            f"no full fine-tuning trial of study {baseline.study_name!r} completed ({states}): no learning "
            "rate to derive the LoRA range from; the LoRA search did not start",
        )
    best = min(done, key=lambda t: (rank_key(t.value, baseline.direction), t.number))
    lr = float(best.params[LR]) if LR in best.params else float(config_lr())
    low, high = conf.span
    return {
        "low": lr * low,
        "high": lr * high,
        "centre": lr * conf.ratio,
        "ratio": conf.ratio,
        "span": [low, high],
        "baseline_lr": lr,
        "baseline_trial": best.number,
        "baseline_value": best.value,
        "baseline_study": baseline.study_name,
    }


def wait_for_baseline(
    baseline: optuna.Study, run_baseline: Callable[[], None], poll: float | None = None
) -> None:
    """Return once no baseline trial is running: a range derived from a partial baseline would differ from
    the one the last baseline trial makes best. ``run_baseline`` runs the baseline phase's worker loop: it
    returns at once, unless a trial a dead worker left went back to the queue, which this worker then runs."""
    told = False
    while True:
        run_baseline()
        running = [t.number for t in baseline.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        if not running:
            return
        if not told:
            log.info(
                "study %s: waiting for baseline trials %s (other workers) before deriving the LoRA "
                "learning-rate range",
                baseline.study_name,
                running,
            )
            told = True
        time.sleep(POLL_SECONDS if poll is None else poll)


def enqueue_missing(search: optuna.Study, entries: list[dict[str, Any]], recorded: dict[str, Any]) -> None:
    """Queue the search's fixed trials at the centre of the range: each entry once, whatever the kills (an
    entry is known by its index; the record says how many there were when the range was derived)."""
    held = {t.user_attrs.get("enqueue_index") for t in search.get_trials(deepcopy=False)}
    for index, entry in enumerate(entries[: int(recorded.get("enqueue", 0))]):
        if index not in held:
            search.enqueue_trial(
                {**dict(entry), LR: recorded["centre"]}, user_attrs={"enqueued": True, "enqueue_index": index}
            )


def searched(space: SearchSpace, recorded: dict[str, Any]) -> None:
    """Give the search space its ``train.lr``: log scale over the recorded range (once)."""
    if LR in space.names:
        return
    text = f"tag(log, interval({recorded['low']!r}, {recorded['high']!r}))"
    distribution = FloatDistribution(float(recorded["low"]), float(recorded["high"]), log=True)
    space.params.append(Param(LR, distribution, None, WHERE, text))


def apply(
    search: optuna.Study,
    space: SearchSpace,
    baseline: optuna.Study,
    conf: LrFromBaselineConf,
    *,
    lock: Callable[[], contextlib.AbstractContextManager],
    config_lr: Callable[[], float],
    run_baseline: Callable[[], None],
    enqueue: list[dict[str, Any]],
    queue: optuna.Study | None = None,
) -> dict[str, Any]:
    """The recorded range (derived now if this is the first worker to get here), the search's enqueued
    trials queued with its centre (into ``queue``, the budget ladder's first rung, when there is one), and
    ``train.lr`` added to ``space``, before the search's first ask."""
    recorded = search.user_attrs.get(ATTR)
    if recorded is None:
        wait_for_baseline(baseline, run_baseline)
        with lock():
            recorded = search.user_attrs.get(ATTR)  # read from the storage again, under the lock
            if recorded is None:  # no other worker derived it while this one waited
                recorded = {**derive(baseline, conf, config_lr), "enqueue": len(enqueue)}
                search.set_user_attr(ATTR, recorded)
                log.info(
                    "study %s: LoRA train.lr searched over [%.3g, %.3g] (log), enqueued trials at %.3g: "
                    "baseline trial %d's lr %.3g x %s",
                    search.study_name,
                    recorded["low"],
                    recorded["high"],
                    recorded["centre"],
                    recorded["baseline_trial"],
                    recorded["baseline_lr"],
                    recorded["span"],
                )
    else:
        log.info(
            "study %s: LoRA train.lr range [%.3g, %.3g] as recorded (baseline trial %d's lr %.3g)",
            search.study_name,
            recorded["low"],
            recorded["high"],
            recorded["baseline_trial"],
            recorded["baseline_lr"],
        )
    with lock():
        enqueue_missing(queue or search, enqueue, recorded)
    searched(space, recorded)
    return recorded


def tags(recorded: dict[str, Any]) -> dict[str, str]:
    """The range as MLflow tags of the parent run."""
    keys = ("low", "high", "centre", "baseline_lr", "baseline_trial")
    return {f"lora_sweep.lr_range.{key}": str(recorded[key]) for key in keys}
