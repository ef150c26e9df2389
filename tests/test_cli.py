"""The ``python -m lora_sweep`` entry point driven in-process: a bad value exits 2 with one line on
stderr before anything is recorded (the same through a real subprocess: tests/test_config.py, slow)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("method.r=0", "error: method.r=0: must be a positive integer"),
        ("method.dropout=1.5", "error: method.dropout=1.5: must be in [0, 1)"),
        ("model=local", "error: model.name_or_path='???': missing required value"),
    ],
)
def test_bad_value_exits_2_with_one_line_and_records_nothing(
    entry_point, capsys, tmp_path, override, expected
):
    assert entry_point(override) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), err[-2000:]
    assert not (tmp_path / "mlflow.db").exists() and not list(tmp_path.rglob("record.json"))


def test_truncation_is_in_the_record_and_the_summary(compose, tiny_overrides, tmp_path):
    """The tiny data's sentences are 8 tokens with [CLS] and [SEP]: train.max_length=6 cuts every row."""
    from lora_sweep.cli import summary
    from lora_sweep.record import read_record
    from lora_sweep.run import run

    record = run(compose(*tiny_overrides, "tracking=none", "train.max_length=6", "train.max_steps=2"))
    on_disk = read_record(record.output_dir)["data"]
    assert on_disk["max_length"] == 6 and on_disk["dropped"] == {}
    assert on_disk["truncated"]["train"] == {"rows": 336, "of": 336, "share": 1.0, "median_tokens": 8}
    assert set(on_disk["truncated"]) == {"train", "validation", "test"}
    assert (
        "  train.max_length=6 truncated 336 of 336 train rows (100%), 72 of 72 validation rows (100%), "
        "72 of 72 test rows (100%)\n" in summary(record)
    )
    quiet = run(compose(*tiny_overrides, "tracking=none", "train.max_steps=2", output_dir=tmp_path / "b"))
    assert "train.max_length" not in summary(quiet)
