"""Causal-LM data (instruction and text rows): unreadable files and empty columns named in one line, and what
train.max_length truncates or drops counted per split, through the tokenized-data cache (issue 12)."""

from __future__ import annotations

import json
import logging

import pytest

from lora_sweep.config import DataConfig
from lora_sweep.errors import ConfigError
from lora_sweep.lm_data import prepare_lm_data

from .helpers import qa_rows, write_csv


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_chat_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_llama_dir)


def _cfg(tmp_path, path, kind="instruction", **extra) -> DataConfig:
    return DataConfig(
        name="t", source="local", kind=kind, path=str(path), cache_dir=str(tmp_path / "cache"), **extra
    )


def _problem(tmp_path, tokenizer, path, kind="instruction") -> str:
    with pytest.raises(ConfigError) as caught:
        prepare_lm_data(_cfg(tmp_path, path, kind), tokenizer, max_length=48)
    message = str(caught.value)
    assert "\n" not in message and "An error occurred while generating" not in message, message
    return message


def test_malformed_instruction_jsonl_names_the_line(tmp_path, chat_tokenizer):
    lines = [json.dumps(row) for row in qa_rows(20)]
    lines[11] = lines[11].replace('"response":', '"response"')
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    message = _problem(tmp_path, chat_tokenizer, path)
    assert message.startswith(f"data.path={str(path)!r}: qa.jsonl line 12 is not valid JSON ("), message


def test_instruction_jsonl_that_is_not_utf8(tmp_path, chat_tokenizer):
    path = tmp_path / "qa.jsonl"
    text = "".join(json.dumps(row) + "\n" for row in qa_rows(20)).encode()
    path.write_bytes(text[:100] + b"\xff" + text[100:])
    line = text[:100].count(b"\n") + 1
    assert _problem(tmp_path, chat_tokenizer, path) == (
        f"data.path={str(path)!r}: qa.jsonl is not UTF-8 (byte 0xff at offset 100, line {line}); "
        "save it as UTF-8"
    )


def test_empty_text_file(tmp_path, chat_tokenizer):
    path = tmp_path / "notes.txt"
    path.write_text("")
    assert _problem(tmp_path, chat_tokenizer, path, kind="text") == (
        f"data.path={str(path)!r}: notes.txt is empty (0 bytes)"
    )


def test_text_column_empty_in_every_row(tmp_path, chat_tokenizer):
    path = write_csv(tmp_path / "docs.csv", [("", "a") for _ in range(30)], header=("text", "source"))
    assert _problem(tmp_path, chat_tokenizer, path, kind="text") == (
        "data.text_column='text': empty in every row of the train split (30 rows)"
    )


def test_response_column_empty_in_every_row(tmp_path, chat_tokenizer):
    rows = [(row["prompt"], "") for row in qa_rows(30)]
    path = write_csv(tmp_path / "qa.csv", rows, header=("prompt", "response"))
    assert _problem(tmp_path, chat_tokenizer, path) == (
        "data.response_column='response': empty in every row of the train split (30 rows)"
    )


def test_rows_truncated_and_dropped_for_length_are_counted(tmp_path, chat_tokenizer, caplog):
    """A conversation of 22 tokens whose answer starts at token 18: with train.max_length=24, a row whose
    prompt is 10 words longer has no answer token left (dropped), one whose answer is 6 words longer is
    cut."""
    rows = qa_rows(100)
    for i, row in enumerate(rows):
        if i % 5 == 0:
            row["prompt"] = row["prompt"][:-2] + " the movie" * 5 + " ?"
        elif i % 5 == 1:
            row["response"] = row["response"][:-2] + " very good" * 3 + " ."
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with caplog.at_level(logging.WARNING):
        data = prepare_lm_data(_cfg(tmp_path, path), chat_tokenizer, max_length=24)
    lengths = data.lengths
    assert lengths["dropped"] == {"all": {"rows": 20, "of": 100, "share": 0.2}}
    assert sum(data.sizes.values()) == 80
    assert sum(s["rows"] for s in lengths["truncated"].values()) == 20
    assert {name: s["of"] for name, s in lengths["truncated"].items()} == data.sizes
    assert "train.max_length=24 leaves 20% of the rows (20 of 100) nothing to learn from" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = prepare_lm_data(_cfg(tmp_path, path), chat_tokenizer, max_length=24)
    assert again.from_cache and again.lengths == lengths and "nothing to learn from" in caplog.text
    roomy = prepare_lm_data(_cfg(tmp_path, path), chat_tokenizer, max_length=64).lengths
    assert roomy["dropped"] == {"all": {"rows": 0, "of": 100, "share": 0.0}}
    assert all(s["rows"] == 0 for s in roomy["truncated"].values())


def test_packed_text_is_never_counted_as_truncated(tmp_path, chat_tokenizer):
    path = tmp_path / "notes.txt"
    path.write_text("".join(" ".join(["good movie"] * 30) + "\n" for _ in range(40)))
    data = prepare_lm_data(_cfg(tmp_path, path, kind="text", packing=True), chat_tokenizer, max_length=16)
    assert all(s["rows"] == 0 for s in data.lengths["truncated"].values())
    cut = prepare_lm_data(_cfg(tmp_path, path, kind="text"), chat_tokenizer, max_length=16).lengths
    assert sum(s["rows"] for s in cut["truncated"].values()) == 40
