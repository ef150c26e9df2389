"""Sequence classification: a new head on an encoder (or decoder), scored by loss, accuracy and macro-F1.
Forgetting is the report's to measure (representation similarity to the base model on reference text).
Torch and transformers are imported inside the methods only."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from lora_sweep.tasks import Task

if TYPE_CHECKING:
    from lora_sweep.config import RunConfig


class ClassificationTask(Task):
    name = "sequence_classification"
    data_kinds = ("classification",)
    metrics: ClassVar[dict[str, str]] = {"accuracy": "maximize", "macro_f1": "maximize", "loss": "minimize"}
    default_metric = "accuracy"
    report_companions = ("loss", "accuracy")
    new_head = True
    peft_task_type = "SEQ_CLS"
    forgetting_measure = "representation_similarity"

    def auto_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def prepare_data(self, cfg: RunConfig, tokenizer):
        from lora_sweep.data import prepare_data

        return prepare_data(cfg.data, tokenizer, cfg.train.max_length, cfg.model.num_labels)

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def evaluate(
        self, model, loader, device, precision: str, num_labels: int, desc: str = "eval"
    ) -> dict[str, float]:
        from lora_sweep.evaluation import evaluate

        return evaluate(model, loader, device, precision, num_labels, desc=desc)
