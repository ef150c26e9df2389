"""The tokenizer is written once per run, not into every checkpoint: checkpoints name the run's copy, and a
checkpoint still finds its tokenizer in the run folder, a copy of it, or the MLflow artifacts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lora_sweep.checkpoint import read_meta, save_checkpoint, tokenizer_folder, verify
from lora_sweep.run import prepare, run

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _encodes_like(folder: Path, tokenizer) -> bool:
    text = ["a fine film, really", "dull"]
    return AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_a_run_writes_its_tokenizer_once_and_every_checkpoint_names_it(
    compose, tiny_overrides, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    cfg = compose(*tiny_overrides, "train.epochs=1")  # 21 steps, validation every 6: 4 saves of each
    tokenizer = prepare(cfg).tokenizer
    saves = []
    original = type(tokenizer).save_pretrained

    def counted(self, *args, **kwargs):
        saves.append(args[0] if args else kwargs.get("save_directory"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "save_pretrained", counted)
    record = run(cfg)
    monkeypatch.undo()
    output = Path(cfg.output_dir)
    assert len(saves) == 1 and len(record.evaluations) == 4
    assert verify(output / "tokenizer") is None and record.checkpoints["tokenizer"] == str(
        output / "tokenizer"
    )
    for name in ("best", "last"):
        checkpoint = output / "checkpoints" / name
        assert not any((checkpoint / f).exists() for f in TOKENIZER_FILES), name
        assert read_meta(checkpoint)["tokenizer"] == "../../tokenizer" and verify(checkpoint) is None
        assert tokenizer_folder(checkpoint) == (output / "tokenizer").resolve()
    assert _encodes_like(tokenizer_folder(output / "checkpoints" / "best"), tokenizer)
    assert record.checkpoints["tokenizer_bytes"] > 0

    # the run folder copied elsewhere: the reference is relative
    moved = shutil.copytree(output, tmp_path / "elsewhere")
    assert tokenizer_folder(moved / "checkpoints" / "best") == (moved / "tokenizer").resolve()

    # the MLflow artifacts, downloaded: laid out as the run folder, so the same reference holds
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    downloaded = Path(client.download_artifacts(record.mlflow["run_id"], "", str(tmp_path / "download")))
    assert _encodes_like(tokenizer_folder(downloaded / "checkpoints" / "best"), tokenizer)
    assert _encodes_like(tokenizer_folder(downloaded / "checkpoints" / "last"), tokenizer)


def test_a_checkpoint_holding_its_own_tokenizer_still_loads_it(tmp_path, tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    old_style = save_checkpoint(tmp_path / "old", model, tokenizer, {"step": 1})  # as every save was before
    assert tokenizer_folder(old_style) == old_style and _encodes_like(old_style, tokenizer)
    assert "tokenizer" not in json.loads((old_style / "lora_sweep.json").read_text())


def test_a_checkpoint_whose_tokenizer_is_gone_says_where_it_looked(tmp_path, tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    lone = save_checkpoint(
        tmp_path / "run" / "checkpoints" / "best", model, tmp_path / "run" / "tokenizer", {}
    )
    with pytest.raises(FileNotFoundError, match="holds no tokenizer and .*run/tokenizer .* has none either"):
        tokenizer_folder(lone)
