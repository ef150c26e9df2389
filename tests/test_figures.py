"""report/figures: the Pareto front and each figure drawn from a hand-made trials table."""

from __future__ import annotations

import pandas as pd
import pytest

from lora_sweep.report import figures as fig

from .helpers import trial_row, trials_frame

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _table():
    return trials_frame(
        trial_row(0, 0.90, 100_000, r=8.0, targets="attention_qv"),
        trial_row(1, 0.88, 10_000, r=2.0, targets="attention_qv"),
        trial_row(2, 0.89, 200_000, r=16.0, targets="all_linear"),  # beaten by trial 0: fewer params, better
        trial_row(3, 0.70, 5_000, r=1.0, targets="all_linear", state="pruned", steps=14),
        trial_row(4, None, None, state="failed", steps=None),
        trial_row(0, 0.92, 2_000_000, role="baseline"),
    )


def test_pareto_front_keeps_only_undominated_trials():
    done = _table().iloc[:3]
    front = fig.pareto_front(done, "maximize")
    assert front["trial"].tolist() == [1, 0]  # fewest parameters first; trial 2 is dominated
    losses = trials_frame(trial_row(0, 0.3, 100), trial_row(1, 0.2, 1_000), trial_row(2, 0.25, 10_000))
    assert fig.pareto_front(losses, "minimize")["trial"].tolist() == [0, 1]
    tied = trials_frame(trial_row(0, 0.9, 100), trial_row(1, 0.9, 1_000))
    assert fig.pareto_front(tied, "maximize")["trial"].tolist() == [0]  # equal metric, more params: dominated


def _check(paths, folder, name):
    assert [p.name for p in paths] == [f"{name}.png", f"{name}.svg"] and all(
        p.parent == folder for p in paths
    )
    assert paths[0].read_bytes()[:8] == PNG_MAGIC and paths[0].stat().st_size > 1000
    assert b"<svg" in paths[1].read_bytes()[:2000]
    return paths[1].read_text()


def test_each_figure_is_written_as_png_and_svg(tmp_path):
    table = _table()
    svg = _check(fig.metric_vs_params(table, "accuracy", "maximize", tmp_path), tmp_path, "metric_vs_params")
    for label in ("LoRA, pruned (last value)", "Pareto front", "full fine-tuning"):
        assert label in svg
    svg = _check(fig.metric_vs_rank(table, "accuracy", tmp_path), tmp_path, "metric_vs_rank")
    assert "attention_qv" in svg and "all_linear" in svg and "full fine-tuning (best)" in svg
    svg = _check(
        fig.learning_curves(table, "accuracy", "maximize", tmp_path, top=2), tmp_path, "learning_curves"
    )
    assert "lora #0 r=8 attention_qv" in svg and "lora #2 r=16 all_linear" in svg and "full #0" in svg
    assert "lora #1" not in svg  # not among the top two
    svg = _check(fig.importance({"train.lr": 0.7, "method.r": 0.3}, tmp_path), tmp_path, "param_importance")
    assert "train.lr" in svg and "method.r" in svg
    svg = _check(fig.pruning_savings(table, tmp_path), tmp_path, "pruning_savings")
    assert "steps saved by pruning" in svg and "lora #3" in svg and "lora #4" not in svg  # no steps, no bar
    sims = {"lora #0": 0.99, "full #0": 0.8}
    _check(
        fig.forgetting(sims, {"lora #0": "search", "full #0": "baseline"}, tmp_path), tmp_path, "forgetting"
    )
    ppl = {
        "lora #0": {"before": 10.0, "after": 11.0, "ratio": 1.1},
        "full #0": {"before": 10.0, "after": 20.0, "ratio": 2.0},
    }
    svg = _check(
        fig.forgetting_perplexity(ppl, {"lora #0": "search", "full #0": "baseline"}, tmp_path),
        tmp_path,
        "forgetting",
    )
    assert "after / before" in svg


def _nothing():
    return pd.DataFrame([trial_row(0, None, None, state="failed", steps=None)])


def test_figures_with_nothing_to_show_still_render(tmp_path):
    empty = _nothing()
    _check(fig.metric_vs_rank(empty, "accuracy", tmp_path), tmp_path, "metric_vs_rank")
    _check(fig.learning_curves(empty, "accuracy", "maximize", tmp_path), tmp_path, "learning_curves")
    _check(fig.pruning_savings(empty, tmp_path), tmp_path, "pruning_savings")
    assert "too few completed trials to estimate" in _check(
        fig.importance({}, tmp_path), tmp_path, "param_importance"
    )


def test_metric_vs_params_with_no_trial_to_show(tmp_path):
    _check(fig.metric_vs_params(_nothing(), "accuracy", "maximize", tmp_path), tmp_path, "metric_vs_params")


def test_the_same_table_gives_the_same_svg(tmp_path):
    """Stable SVG ids and no timestamp: a regenerated report changes only where its numbers changed."""
    for name in "abc":
        (tmp_path / name).mkdir()
    first = fig.metric_vs_params(_table(), "accuracy", "maximize", tmp_path / "a")
    second = fig.metric_vs_params(_table(), "accuracy", "maximize", tmp_path / "b")
    assert first[1].read_bytes() == second[1].read_bytes()
    changed = _table()
    changed.loc[0, "val_metric"] = 0.91
    assert (
        fig.metric_vs_params(changed, "accuracy", "maximize", tmp_path / "c")[1].read_bytes()
        != first[1].read_bytes()
    )


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_learning_curves_pick_the_top_trials_by_direction(tmp_path, direction):
    svg = fig.learning_curves(_table(), "accuracy", direction, tmp_path, top=1)[1].read_text()
    best = (
        "lora #0" if direction == "maximize" else "lora #1"
    )  # 0.90 is the highest, 0.88 the lowest complete
    assert best in svg and sum(f"lora #{t}" in svg for t in range(5)) == 1
