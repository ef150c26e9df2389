"""report/select.pick_best, the rule that picks the checkpoint to ship, on hand-made tables."""

from __future__ import annotations

import pytest

from lora_sweep.report.select import DEFAULT_TOLERANCE, pick_best, with_comparisons

from .helpers import trial_row, trials_frame


def test_within_the_tolerance_the_fewest_trainable_parameters_win():
    table = trials_frame(
        trial_row(0, 0.900, 100_000), trial_row(1, 0.897, 10_000), trial_row(2, 0.880, 1_000)
    )
    choice = pick_best(table, "accuracy", "maximize", tolerance=0.005)
    assert int(choice.row["trial"]) == 1 and choice.best_value == pytest.approx(0.900)
    assert sorted(choice.candidates) == [0, 1]  # 0.880 is 0.02 behind: not a candidate
    assert "fewest trainable parameters" in choice.rule and "0.005" in choice.rule


def test_a_tighter_tolerance_keeps_the_best_metric():
    table = trials_frame(trial_row(0, 0.900, 100_000), trial_row(1, 0.897, 10_000))
    choice = pick_best(table, "accuracy", "maximize", tolerance=0.001)
    assert int(choice.row["trial"]) == 0 and choice.candidates == [0]
    assert int(pick_best(table, "accuracy", "maximize", tolerance=0.0).row["trial"]) == 0


def test_a_trial_exactly_the_tolerance_behind_is_a_candidate():
    table = trials_frame(
        trial_row(0, 0.900, 100_000), trial_row(1, 0.895, 10_000)
    )  # 0.900 - 0.895 > 0.005 in floats
    choice = pick_best(table, "accuracy", "maximize", tolerance=0.005)
    assert int(choice.row["trial"]) == 1 and sorted(choice.candidates) == [0, 1]


def test_ties_in_parameters_go_to_the_better_metric_then_the_earlier_trial():
    table = trials_frame(
        trial_row(3, 0.898, 10_000),
        trial_row(1, 0.899, 10_000),
        trial_row(2, 0.899, 10_000),
        trial_row(0, 0.900, 50_000),
    )
    assert (
        int(pick_best(table, "accuracy", "maximize", tolerance=0.005).row["trial"]) == 1
    )  # 0.899 beats 0.898; 1 < 2
    same = trials_frame(trial_row(5, 0.9, 10_000), trial_row(4, 0.9, 10_000))
    assert (
        int(pick_best(same, "accuracy", "maximize").row["trial"]) == 4
    )  # the earlier trial, whatever the row order


def test_only_completed_lora_trials_with_a_metric_count():
    table = trials_frame(
        trial_row(0, 0.99, 1_000_000, role="baseline"),  # full FT is the reference, not a pick
        trial_row(1, 0.95, 1_000, state="pruned"),
        trial_row(2, None, 500, state="failed"),
        trial_row(3, 0.97, 9_000, state="running"),
        trial_row(4, 0.90, 20_000),
        trial_row(5, 0.80, 100),
    )
    choice = pick_best(table, "accuracy", "maximize", tolerance=DEFAULT_TOLERANCE)
    assert (
        int(choice.row["trial"]) == 4
        and choice.candidates == [4]
        and choice.best_value == pytest.approx(0.90)
    )
    assert "_rank" not in choice.row.index  # the sort key does not leak into the report


def test_minimized_metric_picks_the_lowest():
    table = trials_frame(trial_row(0, 0.40, 100_000), trial_row(1, 0.403, 10_000), trial_row(2, 0.30, 90_000))
    choice = pick_best(table, "loss", "minimize", tolerance=0.005)
    assert (
        int(choice.row["trial"]) == 2
        and choice.best_value == pytest.approx(0.30)
        and choice.candidates == [2]
    )
    assert "lowest validation loss" in choice.rule
    choice = pick_best(table, "loss", "minimize", tolerance=0.11)
    assert int(choice.row["trial"]) == 1 and sorted(choice.candidates) == [0, 1, 2]


def test_no_completed_lora_trial_chooses_nothing():
    table = trials_frame(
        trial_row(0, 0.9, 1_000_000, role="baseline"), trial_row(1, 0.5, 100, state="pruned")
    )
    choice = pick_best(table, "accuracy", "maximize")
    assert choice.row is None and choice.best_value is None and choice.candidates == []


def test_comparisons_measure_the_gap_to_the_best_full_fine_tuning():
    table = trials_frame(
        trial_row(0, 0.88, 10_000),
        trial_row(1, 0.92, 2_000_000, role="baseline"),
        trial_row(2, 0.95, 2_000_000, role="baseline", state="pruned"),
    )
    compared = with_comparisons(table, "maximize")
    assert compared["gap_to_full"].tolist() == pytest.approx([0.88 - 0.92, 0.0, 0.95 - 0.92])
    assert compared["metric_per_m_params"][0] == pytest.approx(0.88 / 0.01)
    loss = with_comparisons(
        trials_frame(trial_row(0, 0.30, 10), trial_row(1, 0.40, 10, role="baseline")), "minimize"
    )
    assert loss["gap_to_full"][0] == pytest.approx(0.10)  # positive: LoRA is better (lower loss)
    assert "gap_to_full" not in table  # the input is left as it was
