"""Training and benchmark pictures: valid PNGs, tolerant of missing values, written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from treepo import io
from treepo.viz import plots
from treepo.viz.plots import (comparison_figure, overall_saving, plot_comparison, plot_training, reward_figure,
                          rolling_mean, savings_figure, series)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def metric_rows(steps: int = 12) -> list[dict]:
    rows = []
    for s in range(steps):
        leaf = 1000 + 10 * s
        decoded = 500 + 5 * s
        row = {"step": s, "reward_mean": 0.1 * s, "accuracy": s / steps, "loss": 1.0 / (s + 1),
               "saving_vs_own_leaves": 1 - decoded / leaf, "decoded_tokens": decoded, "leaf_tokens": leaf}
        if s % 4 == 0:
            row["eval_accuracy"] = 0.2 + s / 100
        rows.append(row)
    return rows


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1000


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def labels(fig: Figure) -> list[str]:
    return [line.get_label() for ax in fig.axes for line in ax.get_lines()]


# -- data helpers --------------------------------------------------------------------------------


def test_series_skips_missing_and_non_numbers_and_sorts_by_step():
    rows = [{"step": 3, "x": 1.5}, {"step": 1, "x": 2}, {"step": 2, "x": None}, {"x": 9.0}, {"step": 4},
            {"step": 5, "x": float("nan")}, {"step": 6, "x": "7"}, {"step": 7, "x": True}, {"step": None, "x": 1.0}]
    steps, values = series(rows, "x")
    assert steps.tolist() == [1.0, 3.0]
    assert values.tolist() == [2.0, 1.5]
    assert [len(a) for a in series([], "x")] == [0, 0]


def test_rolling_mean_is_trailing_with_short_start():
    assert rolling_mean(np.array([1.0, 2, 3, 4, 5, 6]), 3).tolist() == pytest.approx([1, 1.5, 2, 3, 4, 5])


def test_overall_saving_uses_rows_with_both_counts():
    rows = [{"decoded_tokens": 50, "leaf_tokens": 100}, {"decoded_tokens": 30, "leaf_tokens": 100},
            {"decoded_tokens": 999}, {"leaf_tokens": 999, "decoded_tokens": None}]
    assert overall_saving(rows) == pytest.approx(0.6)
    assert overall_saving([{"decoded_tokens": 5}]) is None


# -- figures -------------------------------------------------------------------------------------


def test_reward_figure_rolling_mean_only_from_five_points():
    assert any("rolling mean" in label for label in labels(reward_figure(metric_rows(5))))
    assert not any("rolling mean" in label for label in labels(reward_figure(metric_rows(4))))


def test_reward_figure_eval_markers_only_when_present():
    fig = reward_figure(metric_rows(12))
    evals = [line for ax in fig.axes for line in ax.get_lines() if line.get_label() == "eval accuracy"]
    assert len(evals) == 1
    assert evals[0].get_xdata().tolist() == [0, 4, 8]
    assert evals[0].get_marker() == "D"
    rows = [{k: v for k, v in r.items() if k != "eval_accuracy"} for r in metric_rows(12)]
    assert "eval accuracy" not in labels(reward_figure(rows))


def test_savings_figure_cumulative_lines_and_ratio_axis():
    rows = metric_rows(6)
    rows[2]["decoded_tokens"] = None  # dropped from the cumulative decoded line only
    fig = savings_figure(rows)
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    decoded = lines["cumulative decoded tokens"]
    assert decoded.get_xdata().tolist() == [0, 1, 3, 4, 5]
    assert decoded.get_ydata()[-1] == sum(500 + 5 * s for s in (0, 1, 3, 4, 5))
    assert lines["cumulative leaf tokens (the tree's own leaves)"].get_ydata()[-1] == sum(1000 + 10 * s for s in range(6))
    ratio = lines["per-step saving vs own leaves"]
    assert ratio.get_ydata()[0] == pytest.approx(50.0)  # percent
    assert ratio.axes is not decoded.axes  # second axis
    assert "structural saving" in fig.axes[0].get_title()


def test_comparison_figure_has_three_panels():
    fig = comparison_figure({"tree": {"acc_before": 0.2, "acc_after": 0.4, "decoded_tokens": 1000, "wall_seconds": 3},
                             "independent": {"acc_before": 0.2, "acc_after": 0.35, "decoded_tokens": 2000,
                                             "wall_seconds": 5}})
    assert len(fig.axes) == 3
    acc, tokens, seconds = fig.axes
    assert [round(p.get_height(), 3) for p in acc.patches] == [0.2, 0.2, 0.4, 0.35]
    assert [p.get_height() for p in tokens.patches] == [1000, 2000]
    assert [p.get_height() for p in seconds.patches] == [3, 5]
    assert [t.get_text() for t in acc.get_xticklabels()] == ["tree", "independent"]


# -- files ---------------------------------------------------------------------------------------


def test_plot_training_writes_two_pngs(tmp_path):
    out = tmp_path / "run"
    paths = plot_training(metric_rows(), out)
    assert paths == [out / "reward.png", out / "savings.png"]
    for path in paths:
        assert_png(path)
    assert leftovers(out) == ["reward.png", "savings.png"]  # no temporary files left


def test_plot_training_tolerates_missing_keys(tmp_path):
    rows = [{"step": 0, "reward_mean": 0.5}, {"step": 1, "accuracy": None, "loss": 2.0}, {"reward_mean": 0.7},
            {"step": 2, "saving_vs_own_leaves": 0.4}, {"step": 3, "eval_accuracy": 0.3, "decoded_tokens": None}, {}]
    paths = plot_training(rows, tmp_path)
    assert [p.name for p in paths] == ["reward.png", "savings.png"]
    for path in paths:
        assert_png(path)


def test_plot_training_without_any_plottable_value_still_writes(tmp_path):
    paths = plot_training([{"loss": 1.0}], tmp_path)
    assert [p.name for p in paths] == ["reward.png", "savings.png"]
    for path in paths:
        assert_png(path)


def test_plot_training_empty_writes_nothing(tmp_path):
    out = tmp_path / "run"
    assert plot_training([], out) == []
    assert not out.exists()


def test_drawing_failure_leaves_no_file(tmp_path, monkeypatch):
    calls = []

    def failing_savefig(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # reward.png rendered fine; savings.png fails
            raise RuntimeError("disk full while drawing")
        return original(self, *args, **kwargs)

    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    (tmp_path / "reward.png").write_bytes(b"old picture")
    with pytest.raises(RuntimeError, match="disk full"):
        plot_training(metric_rows(), tmp_path)
    assert leftovers(tmp_path) == ["reward.png"]
    assert (tmp_path / "reward.png").read_bytes() == b"old picture"  # not replaced by a partial set


def test_write_failure_leaves_no_temp_file(tmp_path, monkeypatch):
    def failing_fsync(fd):
        raise OSError("device lost")

    monkeypatch.setattr(io.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="device lost"):
        plot_comparison({"a": {"acc_before": 0.1, "acc_after": 0.2, "decoded_tokens": 10, "wall_seconds": 1.0}},
                        tmp_path / "compare.png")
    assert leftovers(tmp_path) == []


def test_plot_comparison_writes_png_and_tolerates_missing_values(tmp_path):
    path = tmp_path / "bench" / "compare.png"
    variants = {"tree w=16": {"acc_before": 0.21, "acc_after": 0.35, "decoded_tokens": 1.2e6, "wall_seconds": 310.0},
                "independent": {"acc_before": 0.21, "acc_after": None, "decoded_tokens": 2.4e6},
                "tree w=8": {"acc_before": math.nan, "acc_after": 0.3, "decoded_tokens": 1.6e6, "wall_seconds": 400.0}}
    assert plot_comparison(variants, path) == path
    assert_png(path)
    assert leftovers(path.parent) == ["compare.png"]


def test_plot_comparison_needs_variants(tmp_path):
    with pytest.raises(ValueError, match="no variants"):
        plot_comparison({}, tmp_path / "compare.png")
    assert leftovers(tmp_path) == []


def test_dpi_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "DPI", 50)
    small = plot_comparison({"a": {"acc_before": 0.1, "acc_after": 0.2, "decoded_tokens": 10, "wall_seconds": 1}},
                            tmp_path / "small.png")
    width = int.from_bytes(small.read_bytes()[16:20], "big")  # IHDR width
    assert width == 12 * 50
