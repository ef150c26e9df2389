"""The sweep report: every trial against the full fine-tuning baseline, and the checkpoint to ship.

``python -m lora_sweep.report <study or MLflow parent run id>`` writes ``reports/<study>/`` with
report.md, a self-contained report.html, report.json and the figures (PNG and SVG). It reads the study
and the runs' records (the replicates too: the sweep trains them, see :mod:`lora_sweep.report.replicates`); it
never trains.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from lora_sweep.ranking import best_of
from lora_sweep.record import read_record
from lora_sweep.report import figures as fig
from lora_sweep.report.collect import Sweep, trials_table
from lora_sweep.report.literature import literature_sections, with_target_sets
from lora_sweep.report.render import to_html, to_json, to_markdown
from lora_sweep.report.replicates import summarize_replicates
from lora_sweep.report.select import DEFAULT_TOLERANCE, pick_best, with_comparisons
from lora_sweep.sweep.trials import best_full, trial_label

log = logging.getLogger(__name__)


def _importances(sweep: Sweep) -> dict[str, float]:
    import optuna

    complete = [
        t for t in sweep.search.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE
    ]
    if len(complete) < 3 or len(sweep.search.directions) > 1:
        return {}
    try:
        return optuna.importance.get_param_importances(sweep.search)
    except (RuntimeError, ValueError) as err:  # e.g. every completed trial sampled the same values
        log.info("parameter importance not estimated: %s", err)
        return {}


def headline(table, metric: str, direction: str) -> str:
    lora, full = table[table["role"] == "search"], table[table["role"] == "baseline"]
    states = lora["state"].value_counts().to_dict()
    methods = lora["method"].dropna().value_counts().to_dict() if "method" in lora else {}
    kind = (
        "LoRA"
        if set(methods) <= {"lora"}
        else "PEFT (" + ", ".join(f"{m} {n}" for m, n in methods.items()) + ")"
    )
    text = (
        f"{len(lora)} {kind} trials ({', '.join(f'{n} {s}' for s, n in states.items())}) and {len(full)} "
        "full fine-tuning "
        f"trial{'s' if len(full) != 1 else ''}."
    )
    done_lora = lora[lora["state"] == "complete"]["val_metric"].dropna()
    done_full = full[full["state"] == "complete"]["val_metric"].dropna()
    if len(done_lora) and len(done_full):
        best_lora, best_full = best_of(done_lora, direction), best_of(done_full, direction)
        text += (
            f" Best validation {metric}: {'LoRA' if kind == 'LoRA' else 'PEFT'} {best_lora:.4f}, "
            f"full fine-tuning {best_full:.4f} (gap {best_lora - best_full:+.4f})."
        )
    return text


def _records(table) -> dict[str, dict]:
    return {
        trial_label(r): read_record(r["record"])
        for _, r in table.iterrows()
        if r["state"] == "complete" and isinstance(r["record"], str) and Path(r["record"]).is_file()
    }


def truncation_notes(records: dict[str, dict]) -> list[str]:
    """What train.max_length cut in the trials' data, one line per distinct outcome (trials sharing data and
    max_length share one), read from each record; the line says which trials it holds for."""
    groups: dict[str, tuple[dict, list[str]]] = {}
    for label, record in records.items():
        data = record.get("data", {})
        truncated = {n: c for n, c in data.get("truncated", {}).items() if c.get("rows")}
        dropped = {n: c for n, c in data.get("dropped", {}).items() if c.get("rows")}
        if not truncated and not dropped:
            continue
        outcome = {"max_length": data.get("max_length"), "truncated": truncated, "dropped": dropped}
        key = json.dumps(outcome, sort_keys=True)
        groups.setdefault(key, (outcome, []))[1].append(label)

    def train_share(item: tuple[dict, list[str]]) -> float:
        return item[0]["truncated"].get("train", {}).get("share", 0.0)

    notes = []
    for outcome, labels in sorted(groups.values(), key=train_share, reverse=True):
        cut = [
            f"{100 * c['share']:.0f}% of the {name} rows ({c['rows']:,} of {c['of']:,}"
            + (
                f", median {c['median_tokens']:g} tokens)"
                if name == "train" and "median_tokens" in c
                else ")"
            )
            for name, c in outcome["truncated"].items()
        ]
        gone = [
            f"{100 * c['share']:.0f}% of the {'rows' if name == 'all' else name + ' rows'} "
            f"({c['rows']:,} of {c['of']:,})"
            for name, c in outcome["dropped"].items()
        ]
        text = f"train.max_length={outcome['max_length']}"
        if cut:
            text += " truncates " + ", ".join(cut)
        if gone:
            text += (" and drops " if cut else " drops ") + ", ".join(gone)
        notes.append(text + f" in trial{'s' if len(labels) > 1 else ''} {', '.join(labels)}")
    return notes


def checkpoint_sections(
    sweep: Sweep,
    table,
    choice,
    out_dir: Path,
    *,
    reference: list[str] | None,
    register_as: str | None,
    tracking_uri: str | None,
    replicates: int | None = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Test scores of the chosen checkpoint and the full-FT baseline, drift of every model (and of the
    replicates of those two, with intervals), the export. ``replicates``: as :func:`build_report`'s."""
    from lora_sweep.errors import LoraSweepError
    from lora_sweep.report import checkpoints as ck
    from lora_sweep.tasks import get_task, reference_texts

    records, extra, figures = _records(table), {}, {}
    full = best_full(table, sweep.direction)
    picks = {}
    if choice.row is not None:
        picks["chosen LoRA"] = trial_label(choice.row)
    if full is not None:
        picks["full fine-tuning"] = f"full #{full['trial']}"
    extra["test"] = {label: {"trial": key, **ck.test_metrics(records[key])} for label, key in picks.items()}
    tasks = {get_task(r["config"]["model"]["task"]) for r in records.values()}
    if len(tasks) == 1:
        extra["test_columns"] = tasks.pop().test_columns(sweep.metric)
    # what the task's forgetting measure is: each run's own before/after perplexity (read from its record, not
    # recomputed), or the drift of the checkpoint's representations from the base model's (measured here)
    measures = {get_task(r["config"]["model"]["task"]).forgetting_measure for r in records.values()}
    measure = measures.pop() if len(measures) == 1 else None
    if measure == "perplexity":
        perplexity = ck.perplexity_forgetting(records)
        if perplexity:
            texts = next(r["metrics"]["reference_texts"] for k, r in records.items() if k in perplexity)
            extra["forgetting"] = {
                "measure": "perplexity",
                "reference_texts": texts,
                "perplexity": perplexity,
            }
            roles = {key: "baseline" if key.startswith("full") else "search" for key in perplexity}
            figures["forgetting: perplexity on out-of-task text, after / before"] = fig.forgetting_perplexity(
                perplexity, roles, out_dir
            )[0]
        else:
            extra["forgetting_note"] = "not measured: the runs were made with lm_eval.reference_texts=0"
    if reference is None:
        try:
            reference = reference_texts(ck.REFERENCE_SIZE)
        except LoraSweepError as err:
            extra["forgetting_note"] = f"not measured: {err}"
    if reference and measure == "representation_similarity":
        # trials whose checkpoints keep_checkpoints deleted have no weights left to measure
        kept = {
            key: record for key, record in records.items() if not record.get("checkpoints", {}).get("deleted")
        }
        similarity = ck.representation_similarity(kept, reference)
        extra["forgetting"] = {"reference_texts": len(reference), "cosine_similarity_to_base": similarity}
        roles = {key: "baseline" if key.startswith("full") else "search" for key in similarity}
        figures["forgetting: drift from the base model on out-of-task text"] = fig.forgetting(
            similarity, roles, out_dir
        )[0]
    if len(picks) == 2:  # the chosen adapter and full FT, both checkpoints just scored on test
        from lora_sweep.report.intruders import checkpoint_intruders

        found = checkpoint_intruders(records[picks["chosen LoRA"]], records[picks["full fine-tuning"]])
        extra["intruders" if isinstance(found, dict) else "intruders_note"] = found
    if measure and choice.row is not None and full is not None and "forgetting" in extra:
        from lora_sweep.report.literature import replicate_forgetting

        # the same measure on each replicate's checkpoint: seed noise, so LoRA vs full FT has an interval
        found = replicate_forgetting(
            sweep.replicates, int(choice.row["trial"]), int(full["trial"]), replicates, measure, reference
        )
        extra["forgetting_replicates" if isinstance(found, dict) else "forgetting_replicates_note"] = found
    generations = {
        label: records[key].get("generations")
        for label, key in picks.items()
        if records[key].get("generations")
    }
    if generations:
        extra["generations"] = generations
    if choice.row is not None:
        record = records[trial_label(choice.row)]
        samples = list(reference or [])[:16] or ["a short check sentence"]
        extra["export"] = ck.export(record, out_dir / "best", samples)
        if register_as:
            extra["registry"] = ck.register(record, extra["export"], register_as, tracking_uri)
    return extra, figures


def build_report(
    sweep: Sweep,
    out_dir: Path,
    tolerance: float = DEFAULT_TOLERANCE,
    *,
    checkpoints: bool = True,
    reference: list[str] | None = None,
    register_as: str | None = None,
    tracking_uri: str | None = None,
    replicates: int | None = None,
) -> dict[str, Any]:
    """``replicates``: use the first N seeds of the sweep's replicate runs (None: all; 0: leave them out)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = with_comparisons(trials_table(sweep.search, sweep.baseline), sweep.direction)
    choice = pick_best(table, sweep.metric, sweep.direction, tolerance)
    figures = {
        f"validation {sweep.metric} vs trainable parameters": fig.metric_vs_params(
            table, sweep.metric, sweep.direction, out_dir
        )[0],
        f"validation {sweep.metric} vs rank, per target set": fig.metric_vs_rank(
            with_target_sets(table, sweep.search), sweep.metric, out_dir, sweep.direction
        )[0],
        "learning curves: top LoRA trials and full fine-tuning": fig.learning_curves(
            table, sweep.metric, sweep.direction, out_dir
        )[0],
        "parameter importance": fig.importance(_importances(sweep), out_dir)[0],
        "compute spent and saved by pruning": fig.pruning_savings(table, out_dir)[0],
    }
    extra: dict[str, Any] = {}
    if checkpoints:
        extra, more = checkpoint_sections(
            sweep,
            table,
            choice,
            out_dir,
            reference=reference,
            register_as=register_as,
            tracking_uri=tracking_uri,
            replicates=replicates,
        )
        figures.update(more)
    full = best_full(table, sweep.direction)
    if choice.row is not None and full is not None and (replicates is None or replicates > 0):
        # trained by the sweep (its replicate phase); read here, never trained
        found = summarize_replicates(
            sweep.replicates, int(choice.row["trial"]), int(full["trial"]), replicates
        )
        extra["replicates" if isinstance(found, dict) else "replicates_note"] = found
    # rank, learning rate: from the trials table alone, judged against the replicates' seed noise
    extra.update(
        literature_sections(
            table, sweep.search, sweep.metric, sweep.direction, tolerance, extra.get("replicates")
        )
    )
    chosen = (
        None
        if choice.row is None
        else {k: (None if v != v else v) for k, v in choice.row.drop(labels=["evaluations"]).items()}
    )
    truncation = truncation_notes(_records(table))
    if truncation:  # read from the records: how much of each row the trials were trained on
        extra["truncation"] = truncation
    summary = {
        "study": sweep.study_name,
        "metric": sweep.metric,
        "direction": sweep.direction,
        "tolerance": tolerance,
        "rule": choice.rule,
        "best_value": choice.best_value,
        "within_tolerance": choice.candidates,
        "chosen": chosen,
        "headline": headline(table, sweep.metric, sweep.direction),
        "parent_run_id": sweep.parent_run_id,
        **extra,
    }
    from lora_sweep.secrets import redact

    # paths as seen from the report's own folder, so a committed or copied report names no machine's layout
    shown, shown_table = relative_paths(summary, out_dir), table.copy()
    for column in shown_table.columns:  # paths, and paths inside text (a failure reason)
        if shown_table[column].dtype.kind not in "biufcmM":  # object or str columns (pandas 3: str)
            shown_table[column] = [relative_paths(value, out_dir) for value in shown_table[column]]
    (out_dir / "report.json").write_text(redact(to_json(shown, shown_table)))
    (out_dir / "report.md").write_text(redact(to_markdown(shown, shown_table, figures)))
    (out_dir / "report.html").write_text(redact(to_html(shown, shown_table, figures)))
    return summary


# a URL whose path is a file of this machine: sqlite:////abs/mlflow.db, journal:/abs/optuna.journal, file:///abs
_FILE_URL = re.compile(r"^([A-Za-z][\w+.-]*:(?:///|//)?)(/[^/].*)$")
# an absolute path inside text ("FileNotFoundError: /abs/record.json is missing"), not a fraction or a URL
_PATH_IN_TEXT = re.compile(r"(?<![\w.:/~-])/[\w.+@-]+(?:/[\w.+@-]*)*")


def relative_paths(value: Any, folder: Path) -> Any:
    """``value`` with every absolute path in it (strings, in dicts and lists; a file URL's path, an absolute
    path of this machine inside text) made relative to ``folder``."""
    if isinstance(value, dict):
        return {key: relative_paths(item, folder) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [relative_paths(item, folder) for item in value]
    if not isinstance(value, str):
        return value
    base = Path(folder).resolve()
    if os.path.isabs(value) and "\n" not in value:
        return os.path.relpath(value, base)
    url = _FILE_URL.match(value)
    if url and "\n" not in value:
        return url.group(1) + os.path.relpath(url.group(2), base)

    def local(match: re.Match) -> str:
        path = match.group(0)
        top = path.split("/")[1]
        return os.path.relpath(path, base) if top and os.path.isdir("/" + top) else path

    return _PATH_IN_TEXT.sub(local, value)


def write_report(
    study_name: str,
    storage_spec: str,
    folder: Path,
    out_dir: Path,
    tolerance: float = DEFAULT_TOLERANCE,
    **options: Any,
) -> dict[str, Any]:
    """The report of the study ``study_name`` in ``storage_spec``: what the sweep calls when it ends."""
    from lora_sweep.report.collect import open_sweep

    return build_report(open_sweep(study_name, storage_spec, folder), out_dir, tolerance, **options)
