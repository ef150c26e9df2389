"""Causal LMs (instruction or plain-text data): loss and perplexity on the trained tokens; around training,
perplexity on out-of-task reference text (before and after: how much the model forgot) and greedy
generations for the fixed prompts. Torch and transformers are imported inside the methods only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lora_sweep.tasks import Task, reference_texts

if TYPE_CHECKING:
    from lora_sweep.config import RunConfig

GENERATIONS_FILE = "generations.json"

# reference perplexity of a base model (source, max length, texts, precision) -> value: the same for every
# trial
_BEFORE: dict[tuple, float] = {}


def reference_ppl(model, tokenizer, cfg: RunConfig, device, precision, texts) -> float:
    from lora_sweep.lm_eval import reference_perplexity

    return reference_perplexity(
        model, tokenizer, texts, device, precision, cfg.train.max_length, cfg.train.eval_batch_size
    )


class CausalLMTask(Task):
    name = "causal_lm"
    data_kinds = ("instruction", "text")
    metrics: ClassVar[dict[str, str]] = {"loss": "minimize", "perplexity": "minimize"}
    default_metric = "loss"
    report_companions = ("perplexity", "loss")
    new_head = False
    peft_task_type = "CAUSAL_LM"
    forgetting_measure = "perplexity"
    after_training_needs_best = True  # the generations and the perplexity after come from the best checkpoint

    def auto_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def prepare_data(self, cfg: RunConfig, tokenizer):
        from lora_sweep.lm_data import prepare_lm_data

        return prepare_lm_data(cfg.data, tokenizer, cfg.train.max_length)

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        from lora_sweep.lm_eval import lm_collator

        return lm_collator(tokenizer, pad_to_multiple_of)

    def train_collator(self, tokenizer, cfg: RunConfig, model, pad_to_multiple_of: int | None = None):
        """Instruction rows with ``data.packing``: padding-free batches of the same rows (text data is
        packed into blocks when it is prepared, and padded like any other)."""
        if not (cfg.data.packing and cfg.data.kind == "instruction"):
            return self.collator(tokenizer, pad_to_multiple_of)
        from lora_sweep.errors import ConfigError
        from lora_sweep.lm_eval import PackingCollator, packs_separately

        attention = cfg.model.attn_implementation  # as asked: transformers falls back to eager without sdpa
        # a forward that makes a KV cache skips transformers' packed-sequence mask (masking_utils builds it
        # only without a cache): rows would attend to each other. Training needs no cache; generate()
        # asks for one itself
        model.config.use_cache = False
        if not packs_separately(model, next(model.parameters()).device):
            raise ConfigError(
                "data.packing",
                True,
                f"{model.config.model_type} lets packed sequences attend to each other "
                f"(model.attn_implementation={attention}); use data.packing=false",
            )
        # flash attention reads the sequences from the position ids of one row only (transformers'
        # _is_packed_sequence); sdpa and eager build a mask per row: rows of at most train.max_length
        # tokens keep that mask no larger than a padded batch's
        budget = None if attention.startswith("flash") else cfg.train.max_length
        return PackingCollator(tokenizer.pad_token_id, budget, pad_to_multiple_of)

    def evaluate(
        self, model, loader, device, precision: str, num_labels: int = 0, desc: str = "eval"
    ) -> dict[str, float]:
        from lora_sweep.lm_eval import evaluate_lm

        return evaluate_lm(model, loader, device, precision, num_labels, desc=desc)

    def before_training(
        self, model, tokenizer, cfg: RunConfig, source: str, device, precision: str
    ) -> dict[str, float]:
        """Perplexity of the untrained model on the reference text (computed once per base model)."""
        if cfg.lm_eval.reference_texts == 0:
            return {}
        texts = reference_texts(cfg.lm_eval.reference_texts)
        key = (source, cfg.train.max_length, len(texts), precision)
        if key not in _BEFORE:
            model.to(device)
            _BEFORE[key] = reference_ppl(model, tokenizer, cfg, device, precision, texts)
        return {"reference_perplexity_before": _BEFORE[key], "reference_texts": len(texts)}

    def after_training(
        self, model, tokenizer, cfg: RunConfig, prompts: list, device, precision: str, output_dir: Path
    ) -> tuple[dict[str, float], list[dict]]:
        """Reference perplexity after training, and greedy generations for the fixed prompts (also written
        to ``generations.json`` in the run folder)."""
        from lora_sweep.lm_eval import generate

        metrics: dict[str, float] = {}
        if cfg.lm_eval.reference_texts:
            metrics["reference_perplexity_after"] = reference_ppl(
                model, tokenizer, cfg, device, precision, reference_texts(cfg.lm_eval.reference_texts)
            )
        chosen = list(cfg.data.prompts) or list(prompts)[: cfg.lm_eval.num_prompts]
        rows = (
            generate(
                model,
                tokenizer,
                chosen,
                device,
                precision,
                chat=cfg.data.kind == "instruction",
                max_new_tokens=cfg.lm_eval.max_new_tokens,
                system_prompt=cfg.data.system_prompt,
            )
            if chosen
            else []
        )
        (Path(output_dir) / GENERATIONS_FILE).write_text(json.dumps(rows, indent=2, ensure_ascii=False))
        return metrics, rows

    def forgetting_summary(self, metrics: dict[str, Any]) -> dict[str, float] | None:
        """Before/after reference perplexity of a run's record metrics, with the ratio (1.0: nothing
        forgotten)."""
        before, after = metrics.get("reference_perplexity_before"), metrics.get("reference_perplexity_after")
        if before is None or after is None:
            return None
        return {"before": before, "after": after, "ratio": after / before}
