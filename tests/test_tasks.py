"""The task interface: each task's metadata and directions, the one place a task is chosen (data.kind), the
ranking helpers every module ranks with, and each task's evaluation checked by hand on tiny models."""

from __future__ import annotations

import math
import subprocess
import sys

import optuna
import pytest
import torch

from lora_sweep import ranking, tasks
from lora_sweep.errors import ConfigError, LoraSweepError
from lora_sweep.tasks import Task, get_task, metric_direction, task_for_kind
from lora_sweep.tasks.causal_lm import CausalLMTask
from lora_sweep.tasks.classification import ClassificationTask


def test_each_task_states_its_metrics_directions_and_defaults():
    classifier, causal = get_task("sequence_classification"), get_task("causal_lm")
    assert isinstance(classifier, ClassificationTask) and isinstance(causal, CausalLMTask)
    assert classifier.metrics == {"accuracy": "maximize", "macro_f1": "maximize", "loss": "minimize"}
    assert causal.metrics == {"loss": "minimize", "perplexity": "minimize"}
    assert (classifier.default_metric, causal.default_metric) == ("accuracy", "loss")
    assert (classifier.forgetting_measure, causal.forgetting_measure) == (
        "representation_similarity",
        "perplexity",
    )
    assert not classifier.after_training_needs_best and causal.after_training_needs_best
    assert (classifier.new_head, causal.new_head) == (True, False)
    assert (classifier.peft_task_type, causal.peft_task_type) == ("SEQ_CLS", "CAUSAL_LM")
    for task in tasks.TASKS.values():
        assert isinstance(task, Task) and task.default_metric in task.metrics
        assert set(task.metrics.values()) <= set(ranking.DIRECTIONS)
        assert task.test_columns(task.default_metric)[0] == task.default_metric
    assert classifier.test_columns("accuracy") == ["accuracy", "loss"]
    assert classifier.test_columns("loss") == ["loss", "accuracy"]
    assert causal.test_columns("loss") == ["loss", "perplexity"] and causal.test_columns("perplexity") == [
        "perplexity",
        "loss",
    ]


def test_a_task_is_chosen_from_data_kind_in_one_place():
    assert {kind: task.name for kind, task in tasks.DATA_KINDS.items()} == {
        "classification": "sequence_classification",
        "instruction": "causal_lm",
        "text": "causal_lm",
    }
    assert task_for_kind("text") is get_task("causal_lm") is get_task(get_task("causal_lm"))
    assert (
        tasks.default_metric("classification") == "accuracy" and tasks.default_metric("instruction") == "loss"
    )
    with pytest.raises(
        ConfigError, match=r"^data.kind='tokens': must be one of classification, instruction, text$"
    ):
        task_for_kind("tokens")
    with pytest.raises(KeyError, match="unknown task"):
        get_task("token_classification")


def test_a_metric_has_one_direction_for_every_task():
    assert tasks.all_metrics() == ("accuracy", "macro_f1", "loss", "perplexity")
    assert [metric_direction(m) for m in tasks.all_metrics()] == [
        "maximize",
        "maximize",
        "minimize",
        "minimize",
    ]
    with pytest.raises(KeyError, match="unknown metric 'bleu'"):
        metric_direction("bleu")


def test_the_run_config_carries_its_task_and_checks_the_objective_against_it(
    compose, tiny_overrides, tiny_causal
):
    cfg = compose(*tiny_overrides, "objective.metric=macro_f1")
    assert get_task(cfg) is get_task("sequence_classification")
    assert metric_direction(cfg.objective.metric) == "maximize"
    causal = compose(*tiny_causal, "objective.metric=perplexity")
    assert (
        get_task(causal) is get_task("causal_lm") and metric_direction(causal.objective.metric) == "minimize"
    )
    with pytest.raises(
        ConfigError, match=r"^objective.metric='macro_f1': a causal_lm run reports loss, perplexity$"
    ):
        compose(*tiny_causal, "objective.metric=macro_f1")
    with pytest.raises(
        ConfigError, match=r"^model.task='tokens': must be one of auto, sequence_classification, causal_lm$"
    ):
        compose(*tiny_overrides, "model.task=tokens")


def test_the_task_metadata_loads_without_torch():
    """The config check runs before torch is imported: a bad config fails fast."""
    code = (
        "import sys; import lora_sweep.config, lora_sweep.tasks as t, lora_sweep.ranking; "
        "assert t.metric_direction('accuracy') == 'maximize'; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_ranking_helpers():
    assert (
        ranking.best_of([0.2, 0.9, 0.5], "maximize") == 0.9
        and ranking.best_of([0.2, 0.9, 0.5], "minimize") == 0.2
    )
    assert ranking.best_of([3.0, 1.0], optuna.study.StudyDirection.MINIMIZE) == 1.0
    assert ranking.is_better(0.6, 0.5, "maximize") and not ranking.is_better(0.6, 0.5, "minimize")
    assert not ranking.is_better(0.5, 0.5, "maximize") and ranking.is_better(9.0, None, "minimize")
    assert sorted([0.2, 0.9, 0.5], key=lambda v: ranking.rank_key(v, "maximize")) == [0.9, 0.5, 0.2]
    assert sorted([0.2, 0.9, 0.5], key=lambda v: ranking.rank_key(v, "minimize")) == [0.2, 0.5, 0.9]
    assert ranking.ascending("minimize") and not ranking.ascending("maximize")
    assert ranking.sign("maximize") == 1 and ranking.sign(optuna.study.StudyDirection.MINIMIZE) == -1
    with pytest.raises(ValueError, match="must be maximize or minimize"):
        ranking.direction_name("up")


def test_the_report_reads_the_objective_metric_from_the_study_never_guesses():
    from lora_sweep.report.collect import objective_metric

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name="s", storage=storage, direction="minimize")
    with pytest.raises(LoraSweepError, match="names the objective metric"):
        objective_metric(study)  # no attribute, no record: no "accuracy" fallback
    study.set_user_attr("lora_sweep", {"objectives": ["objective"], "metric": "perplexity"})
    assert objective_metric(optuna.load_study(study_name="s", storage=storage)) == "perplexity"


def _single_batch_loader(task: Task, split, tokenizer):
    from lora_sweep.data import make_loader

    return make_loader(split, task.collator(tokenizer), len(split), shuffle=False)


def test_classification_evaluation_on_a_tiny_model(compose, tiny_overrides):
    from lora_sweep.models import inspect_model, load_tokenizer

    cfg = compose(*tiny_overrides)
    task = get_task(cfg)
    spec = inspect_model(cfg.model)
    tokenizer = load_tokenizer(spec, cfg.model)
    data = task.prepare_data(cfg, tokenizer)
    torch.manual_seed(0)
    model = task.auto_class().from_pretrained(spec.source, num_labels=len(data.label_names))
    split = data.splits["validation"]
    metrics = task.evaluate(
        model,
        _single_batch_loader(task, split, tokenizer),
        torch.device("cpu"),
        "fp32",
        len(data.label_names),
    )
    assert set(metrics) == {*task.metrics, "samples"} and metrics["samples"] == len(split)

    batch = next(iter(_single_batch_loader(task, split, tokenizer)))  # the same numbers by hand
    with torch.no_grad():
        logits = model.eval()(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"]
    assert metrics["loss"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5
    )
    predicted = logits.argmax(-1)
    assert metrics["accuracy"] == pytest.approx(float((predicted == labels).float().mean()))
    f1 = []
    for cls in range(len(data.label_names)):
        tp = int(((predicted == cls) & (labels == cls)).sum())
        wrong = int(((predicted == cls) != (labels == cls)).sum())
        if tp + wrong:
            f1.append(2 * tp / (2 * tp + wrong))
    assert metrics["macro_f1"] == pytest.approx(sum(f1) / len(f1))


def test_causal_evaluation_on_a_tiny_model(compose, tiny_causal):
    from lora_sweep.lm_data import IGNORE
    from lora_sweep.models import inspect_model, load_tokenizer

    cfg = compose(*tiny_causal)
    task = get_task(cfg)
    spec = inspect_model(cfg.model)
    tokenizer = load_tokenizer(spec, cfg.model)
    data = task.prepare_data(cfg, tokenizer)
    model = task.auto_class().from_pretrained(spec.source)
    split = data.splits["validation"]
    metrics = task.evaluate(
        model, _single_batch_loader(task, split, tokenizer), torch.device("cpu"), "fp32", 0
    )
    assert set(metrics) == {*task.metrics, "samples"} and metrics["samples"] == len(split)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))

    batch = next(iter(_single_batch_loader(task, split, tokenizer)))
    assert (batch["labels"] == IGNORE).any()  # prompt tokens and padding are masked: they must not count
    with (
        torch.no_grad()
    ):  # one batch: the model's own token-mean loss over the trained tokens is the same number
        expected = float(model.eval()(**batch).loss)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
