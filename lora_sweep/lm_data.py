"""Causal-LM data: instruction rows rendered with the chat template (loss on the responses only), or plain
text for continued pre-training (optionally packed into fixed-length blocks); split, tokenized, cached.

Prompt masking works on characters, then tokens: the chat template renders the conversation up to each
assistant turn (with the generation prompt) and through it; the characters between the two renders are
that turn's answer, end-of-turn marker included, so the model learns to stop. The whole conversation is
tokenized once, and a token is trained on (label = its id) only when it starts inside an answer; every
other label is -100, which the loss ignores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from lora_sweep.config import DataConfig
from lora_sweep.data import (
    LENGTH_COLUMN,
    TaskData,
    _split,
    _tokenizer_fingerprint,
    check_not_all_empty,
    length_counts,
    load_raw,
    save_to_cache,
    source_files,
    warn_if_cut,
)
from lora_sweep.errors import ConfigError, LoraSweepError

CACHE_VERSION = 2  # bump when the prepared format changes (2: truncation counts in the meta file)
IGNORE = -100  # the label torch's cross entropy skips
STORED_PROMPTS = 16  # test prompts kept for the end-of-run generations


def conversation(row: dict, cfg: DataConfig) -> list[dict[str, str]]:
    """A row as chat messages: its ``messages`` list, or one user prompt and one assistant response."""
    if cfg.messages_column in row and row[cfg.messages_column] is not None:
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in row[cfg.messages_column]]
    else:
        messages = [
            {"role": "user", "content": str(row[cfg.prompt_column])},
            {"role": "assistant", "content": str(row[cfg.response_column])},
        ]
    if cfg.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    return messages


def encode_conversation(
    tokenizer, messages: list[dict[str, str]], max_length: int, count_tokens: bool = False
) -> dict[str, list[int]]:
    """input_ids, attention_mask and labels of one conversation; labels are -100 outside the answers.
    ``count_tokens``: also its length before truncation (``LENGTH_COLUMN``)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(prefix) and text.startswith(through)):
            raise LoraSweepError(
                "the chat template renders a conversation's beginning differently from the whole "
                "conversation, so the answers cannot be located for prompt masking"
            )
        spans.append((len(prefix), len(through)))
    encoded = tokenizer(
        text, add_special_tokens=False, truncation=True, max_length=max_length, return_offsets_mapping=True
    )
    labels = [
        token if any(start <= offset[0] < end for start, end in spans) else IGNORE
        for token, offset in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]
    result = {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "labels": labels,
    }
    if count_tokens:
        result[LENGTH_COLUMN] = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return result


def prompt_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation up to its first answer: what the model is asked at generation time."""
    first_answer = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    return messages[:first_answer]


def pack(split, block: int, eos_id: int | None):
    """Concatenate the documents (EOS between them) and cut blocks of ``block`` tokens; the last block may
    be shorter. Attention crosses document boundaries inside a block, as in standard packing."""
    import datasets

    stream: list[int] = []
    for ids in split["input_ids"]:
        stream.extend(ids + ([eos_id] if eos_id is not None else []))
    blocks = [stream[i : i + block] for i in range(0, len(stream), block)]
    blocks = [b for b in blocks if len(b) > 1]  # one token predicts nothing
    return datasets.Dataset.from_dict(
        {
            "input_ids": blocks,
            "attention_mask": [[1] * len(b) for b in blocks],
            "labels": [list(b) for b in blocks],
        }
    )


def cache_key(cfg: DataConfig, files: list[Path], tokenizer, max_length: int) -> str:
    identity = {
        "version": CACHE_VERSION,
        "kind": cfg.kind,
        "source": cfg.source,
        "path": cfg.path,
        "format": cfg.format,
        "files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
        "columns": [cfg.prompt_column, cfg.response_column, cfg.messages_column, cfg.text_column],
        "system_prompt": cfg.system_prompt,
        "packing": cfg.packing and cfg.kind == "text",  # instruction rows are packed per batch, not here
        "split": [cfg.split.validation, cfg.split.test, cfg.split.seed],
        "limits": [cfg.max_train_samples, cfg.max_eval_samples],
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "max_length": max_length,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _check_columns(cfg: DataConfig, raw) -> None:
    for split_name, split in raw.items():
        columns = split.column_names
        if cfg.kind == "text":
            needed = [("data.text_column", cfg.text_column)]
        elif cfg.messages_column in columns:
            continue
        else:
            needed = [
                ("data.prompt_column", cfg.prompt_column),
                ("data.response_column", cfg.response_column),
            ]
        for key, column in needed:
            if column not in columns:
                raise ConfigError(
                    key, column, f"no such column in the {split_name} split (columns: {', '.join(columns)})"
                )


def _check_not_all_empty(cfg: DataConfig, raw) -> None:
    columns = set().union(*(split.column_names for split in raw.values()))
    if cfg.kind == "text":
        check_not_all_empty(raw, [("data.text_column", cfg.text_column)])
    elif cfg.messages_column not in columns:
        check_not_all_empty(
            raw, [("data.prompt_column", cfg.prompt_column), ("data.response_column", cfg.response_column)]
        )


def _tokenize(cfg: DataConfig, raw, tokenizer, max_length: int):
    """The tokenized splits, and the rows dropped for length per split of ``raw`` ("all" for data that
    ships unsplit: its splits are cut after the drop, so no dropped row belongs to one)."""
    import datasets

    if cfg.kind == "instruction":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "data.kind",
                cfg.kind,
                "instruction data needs a tokenizer with a chat template; use data=text",
            )

        def encode(row):
            messages = conversation(row, cfg)
            return {
                **encode_conversation(tokenizer, messages, max_length, count_tokens=True),
                "prompt": json.dumps(prompt_messages(messages)),
            }
    else:

        def encode(row):
            text = str(row[cfg.text_column])
            encoded = tokenizer(
                text, truncation=not cfg.packing, max_length=None if cfg.packing else max_length
            )
            full = encoded if cfg.packing else tokenizer(text, truncation=False, verbose=False)
            return {
                LENGTH_COLUMN: len(full["input_ids"]),
                "input_ids": encoded["input_ids"],
                "attention_mask": encoded["attention_mask"],
                "labels": list(encoded["input_ids"]),
                "prompt": json.dumps(" ".join(text.split()[:8])),
            }

    encoded, dropped = {}, {}
    least = 1 if cfg.kind == "text" else 0  # a text's first token is never predicted
    for name, split in raw.items():
        split = split.filter(lambda row: cfg.kind != "text" or bool(str(row[cfg.text_column] or "").strip()))
        split = split.map(encode, remove_columns=split.column_names, desc=f"tokenizing {name}")
        # a prompt that fills max_length leaves no answer to learn from
        encoded[name] = split.filter(lambda row: sum(label != IGNORE for label in row["labels"]) > least)
        cut = len(split) - len(encoded[name])
        dropped["all" if len(raw) == 1 else name] = {
            "rows": cut,
            "of": len(split),
            "share": cut / len(split) if len(split) else 0.0,
        }
    return datasets.DatasetDict(encoded), dropped


def prepare_lm_data(cfg: DataConfig, tokenizer, max_length: int) -> TaskData:
    import datasets

    datasets.disable_progress_bars()
    files = source_files(cfg)
    cache_path = (
        Path(cfg.cache_dir).expanduser()
        / "tokenized"
        / f"{cfg.name}-{cache_key(cfg, files, tokenizer, max_length)}"
    )
    meta_file = cache_path / "lora_sweep_data.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        warn_if_cut(meta["lengths"])
        return TaskData(
            datasets.load_from_disk(str(cache_path / "splits")),
            [],
            cache_path,
            True,
            meta["prompts"],
            lengths=meta["lengths"],
        )

    raw = load_raw(cfg, files)
    _check_columns(cfg, raw)
    _check_not_all_empty(cfg, raw)
    tokenized, dropped = _tokenize(cfg, raw, tokenizer, max_length)
    # no labels to stratify by; documents are split before packing, so none straddles two splits
    splits = _split(dataclasses.replace(cfg, split=dataclasses.replace(cfg.split, stratify=False)), tokenized)
    prompts = [json.loads(p) for p in splits["test"]["prompt"][:STORED_PROMPTS]]
    # packed documents are cut into blocks, not truncated: nothing of them is lost
    lengths = length_counts(splits, max_length, dropped, truncating=not cfg.packing)
    warn_if_cut(lengths)
    splits = splits.remove_columns(["prompt", LENGTH_COLUMN])
    if cfg.packing:
        splits = datasets.DatasetDict(
            {name: pack(split, max_length, tokenizer.eos_token_id) for name, split in splits.items()}
        )
    meta = {"prompts": prompts, "lengths": lengths}
    return TaskData(save_to_cache(splits, cache_path, meta), [], cache_path, False, prompts, lengths=lengths)
