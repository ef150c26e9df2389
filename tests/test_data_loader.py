"""lora_sweep.data.make_loader's orders: length-sorted evaluation batches, length-grouped training batches
(train.group_by_length) that stay exactly resumable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_sweep.data import in_dataset_order, make_loader, row_lengths
from lora_sweep.errors import ConfigError
from tests.helpers import fit_on_cpu, varied_sentiment_rows, write_csv


def _rows(n: int = 400) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 40, (n,), generator=generator).tolist()
    return [{"input_ids": list(range(k)), "row": i} for i, k in enumerate(lengths)]


def _padded_positions(loader, rows) -> int:
    order = list(loader.sampler)
    batches = [order[i : i + loader.batch_size] for i in range(0, len(order), loader.batch_size)]
    return sum(len(b) * max(len(rows[i]["input_ids"]) for i in b) for b in batches)


def test_sorted_evaluation_order_is_longest_first_and_restorable():
    rows = _rows()
    loader = make_loader(rows, list, 16, shuffle=False, sort_by_length=True)
    lengths = [len(rows[i]["input_ids"]) for i in loader.sampler]
    assert lengths == sorted(lengths, reverse=True) and sorted(loader.sampler) == list(range(len(rows)))
    natural = make_loader(rows, list, 16, shuffle=False)
    assert _padded_positions(loader, rows) < 0.8 * _padded_positions(natural, rows)
    seen = [row["row"] for batch in loader for row in batch]
    assert in_dataset_order(seen, loader) == list(range(len(rows)))


def test_length_grouped_batches_are_seeded_grouped_and_skip_exactly():
    rows = _rows()
    grouped = make_loader(rows, list, 8, shuffle=True, seed=3, epoch=1, group_by_length=True)
    order = list(grouped.sampler)
    assert sorted(order) == list(range(len(rows)))  # every row once per epoch

    def again(epoch: int) -> list[int]:
        return list(
            make_loader(rows, list, 8, shuffle=True, seed=3, epoch=epoch, group_by_length=True).sampler
        )

    assert order == again(1) and order != again(2)
    shuffled = make_loader(rows, list, 8, shuffle=True, seed=3, epoch=1)
    assert _padded_positions(grouped, rows) < 0.8 * _padded_positions(shuffled, rows)
    # a resumed epoch's batches are the uninterrupted epoch's from that batch on
    resumed = make_loader(rows, list, 8, shuffle=True, seed=3, epoch=1, group_by_length=True, skip_batches=5)
    assert list(resumed.sampler) == order[5 * 8 :]
    assert row_lengths(rows)[:3] == [len(r["input_ids"]) for r in rows[:3]]


class _Killed(Exception):
    pass


def _fit(cfg, resume_from: Path | None = None, kill_at: int | None = None):
    def on_evaluation(step, metrics):
        if kill_at is not None and step >= kill_at:
            raise _Killed  # as a kill after the checkpoint of this step was written
        return False

    return fit_on_cpu(cfg, on_evaluation, resume_from)[2]


@pytest.fixture(scope="module")
def varied_csv(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("varied") / "reviews.csv", varied_sentiment_rows(480))


def test_a_length_grouped_run_resumes_exactly(tmp_path, compose, tiny_overrides, varied_csv):
    """Killed after step 12's checkpoint (mid-epoch: 21 steps, dropout on), resumed: the same evaluations
    as a run never killed; and grouping changed the batches (other evaluations)."""
    extra = [
        "train.group_by_length=true",
        f"data.path={varied_csv}",
        "method.dropout=0.1",
        "train.lr=5e-3",
        "train.epochs=1",
    ]
    reference = _fit(compose(*tiny_overrides, *extra, output_dir=tmp_path / "reference"))
    killed = compose(*tiny_overrides, *extra, output_dir=tmp_path / "killed")
    with pytest.raises(_Killed):
        _fit(killed, kill_at=12)
    resumed = _fit(killed, resume_from=Path(killed.output_dir) / "checkpoints" / "last")
    assert resumed.resumed_from_step == 12
    assert resumed.evaluations == pytest.approx(reference.evaluations, rel=1e-6)
    ungrouped = _fit(compose(*tiny_overrides, *extra[1:], output_dir=tmp_path / "ungrouped"))
    losses = [e["loss"] for e in reference.evaluations]
    assert [e["loss"] for e in ungrouped.evaluations][1:] != pytest.approx(losses[1:], rel=1e-6)


@pytest.mark.parametrize(("value", "shown"), [("maybe", "'maybe'"), ("2", "2")])
def test_group_by_length_takes_true_or_false(compose, tiny_overrides, value, shown):
    with pytest.raises(ConfigError) as raised:
        compose(*tiny_overrides, f"train.group_by_length={value}")
    assert str(raised.value) == f"train.group_by_length={shown}: expected true or false"
