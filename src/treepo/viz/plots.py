"""Training and benchmark pictures (PNG), drawn with matplotlib and written atomically.

    paths = plot_training(rows, Path("runs/demo"))    # rows: metrics.jsonl, one per step
    # -> [runs/demo/reward.png, runs/demo/savings.png]
    plot_comparison({"tree": {...}, "independent": {...}}, Path("runs/bench/compare.png"))

- reward.png: reward mean (top) and accuracy (bottom) per step, each with a rolling mean once
  there are ROLLING_MIN_POINTS points; held-out eval accuracy as markers;
- savings.png: cumulative decoded vs cumulative leaf tokens (the tokens of the tree's own leaves,
  each counted once per leaf), with the per-step saving against those leaves on a second axis.
  This is the structural saving; it is not a saving against independent sampling, whose answers
  are shorter where paths stop early (tree leaves lean toward long paths).

A value that is missing, None or not a finite number drops that point only. Figures are bare
`Figure`s (drawn by Agg when saved as PNG), not pyplot: no global backend switch. Every figure is
rendered to memory first, so a drawing error writes nothing; each file is then written with
`io.atomic_open`, so a reader never sees half a PNG.
"""

from __future__ import annotations

import io as _bytes_io
import math
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from .. import io
from ..errors import InputError

DPI = 110
ROLLING_MIN_POINTS = 5
COLOURS = {"reward": "#4c78a8", "accuracy": "#54a24b", "eval": "#e45756", "decoded": "#4c78a8",
           "leaf": "#f58518", "ratio": "#7f7f7f", "before": "#9ecae9", "after": "#4c78a8",
           "seconds": "#b279a2"}


# -- data ----------------------------------------------------------------------------------------


def _number(value: Any) -> Optional[float]:
    """`value` as a finite float, or None when it is missing, not a number, or NaN/inf."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def series(rows: Iterable[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` over the rows that have both a step and a value, sorted by step."""
    points = [(s, v) for s, v in ((_number(r.get("step")), _number(r.get(key))) for r in rows)
              if s is not None and v is not None]
    points.sort(key=lambda p: p[0])  # stable: repeated steps keep their file order
    steps, values = zip(*points) if points else ((), ())
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def rolling_window(points: int) -> int:
    """The rolling-mean window for a series of `points` points: about a tenth, at least 5."""
    return max(ROLLING_MIN_POINTS, points // 10)


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start)."""
    sums = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


# -- figures -------------------------------------------------------------------------------------


def reward_figure(rows: list[dict]):
    """Reward mean and accuracy against step, with rolling means and eval accuracy markers."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6.5))
    top, bottom = fig.subplots(2, 1, sharex=True)
    _trend(top, *series(rows, "reward_mean"), "reward mean", COLOURS["reward"])
    top.set(ylabel="reward", title="Reward")
    _trend(bottom, *series(rows, "accuracy"), "training accuracy", COLOURS["accuracy"])
    eval_steps, eval_acc = series(rows, "eval_accuracy")
    if len(eval_steps):
        bottom.plot(eval_steps, eval_acc, ls="--", lw=1, marker="D", ms=7, color=COLOURS["eval"],
                    label="eval accuracy")
    bottom.set(xlabel="step", ylabel="accuracy", title="Accuracy")
    for ax in (top, bottom):
        _finish(ax)
    fig.suptitle("Training reward and accuracy per step")
    fig.tight_layout()
    return fig


def savings_figure(rows: list[dict]):
    """Cumulative decoded vs leaf tokens against step; per-step saving vs own leaves on a second axis."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    lines = []
    for key, label in (("leaf_tokens", "leaf tokens (the tree's own leaves)"), ("decoded_tokens", "decoded tokens")):
        steps, values = series(rows, key)
        if len(steps):
            lines += ax.plot(steps, np.cumsum(values), lw=2, color=COLOURS[key.split("_")[0]],
                             label=f"cumulative {label}")
    ax.set(xlabel="step", ylabel="cumulative tokens")
    ax.yaxis.set_major_formatter(EngFormatter())
    steps, ratio = series(rows, "saving_vs_own_leaves")
    if len(steps):
        ratio_ax = ax.twinx()
        lines += ratio_ax.plot(steps, 100 * ratio, ls=":", lw=1, marker="o", ms=3, color=COLOURS["ratio"],
                               label="per-step saving vs own leaves")
        ratio_ax.set_ylabel("saving vs own leaves (%)")
        ratio_ax.set_ylim(min(0.0, 100 * ratio.min()) - 2, max(100.0, 100 * ratio.max()) + 2)
    if lines:
        ax.legend(handles=lines, loc="upper left")
    else:
        _no_data(ax)
    ax.grid(True, alpha=0.3)
    overall = overall_saving(rows)
    ax.set_title("Tokens decoded by tree sampling vs its own leaves' tokens"
                 + (f" (structural saving {overall:.1%})" if overall is not None else ""))
    fig.tight_layout()
    return fig


def overall_saving(rows: list[dict]) -> Optional[float]:
    """1 - decoded/leaf over the rows that report both token counts; None without leaf tokens."""
    pairs = [(_number(r.get("decoded_tokens")), _number(r.get("leaf_tokens"))) for r in rows]
    pairs = [(d, l) for d, l in pairs if d is not None and l is not None]
    leaf = sum(l for _, l in pairs)
    return 1.0 - sum(d for d, _ in pairs) / leaf if leaf > 0 else None


def comparison_figure(variants: dict[str, dict]):
    """Three panels over the variants: accuracy before/after, decoded tokens, wall seconds."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    names = list(variants)
    x = np.arange(len(names))
    fig = Figure(figsize=(max(12.0, 3 * (1.5 + 0.9 * len(names))), 4.8))
    acc_ax, tok_ax, sec_ax = fig.subplots(1, 3)
    for offset, key, label in ((-0.2, "acc_before", "before"), (0.2, "acc_after", "after")):
        _bars(acc_ax, x + offset, [variants[n].get(key) for n in names], 0.4, COLOURS[label], "{:.3f}", label)
    acc_ax.set(ylabel="held-out accuracy", title="Held-out accuracy")
    acc_ax.set_ylim(0, 1.15 * max([1.0] + [v for n in names for v in _values(variants[n], "acc_before", "acc_after")]))
    acc_ax.legend(loc="upper left", ncol=2)
    _bars(tok_ax, x, [variants[n].get("decoded_tokens") for n in names], 0.6, COLOURS["decoded"], "{:,.0f}")
    tok_ax.set(ylabel="tokens", title="Decoded tokens")
    tok_ax.yaxis.set_major_formatter(EngFormatter())
    _bars(sec_ax, x, [variants[n].get("wall_seconds") for n in names], 0.6, COLOURS["seconds"], "{:.1f}")
    sec_ax.set(ylabel="seconds", title="Wall-clock time")
    rotate = len(names) > 3 or max(len(n) for n in names) > 12
    for ax in (acc_ax, tok_ax, sec_ax):
        ax.set_xticks(x, names, rotation=20 if rotate else 0, ha="right" if rotate else "center")
        ax.grid(True, axis="y", alpha=0.3)
        ax.margins(y=0.12)
    fig.suptitle("Benchmark: variants compared")
    fig.tight_layout()
    return fig


def _trend(ax, steps: np.ndarray, values: np.ndarray, label: str, colour: str) -> None:
    """The raw points, faint, and a bold rolling mean once there are enough points."""
    if not len(steps):
        return
    ax.plot(steps, values, lw=1, marker="o", ms=3, alpha=0.45, color=colour, label=label)
    if len(steps) >= ROLLING_MIN_POINTS:
        window = rolling_window(len(steps))
        ax.plot(steps, rolling_mean(values, window), lw=2.2, color=colour,
                label=f"{label}, rolling mean ({window} steps)")


def _finish(ax) -> None:
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend(loc="best", fontsize=9)
    else:
        _no_data(ax)


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="#777")


def _values(row: dict, *keys: str) -> list[float]:
    return [v for v in (_number(row.get(k)) for k in keys) if v is not None]


def _bars(ax, x: np.ndarray, values: list[Any], width: float, colour: str, fmt: str,
          label: Optional[str] = None) -> None:
    """Bars labelled with their values; a missing value draws no bar and is labelled 'n/a'."""
    numbers = [_number(v) for v in values]
    bars = ax.bar(x, [0.0 if v is None else v for v in numbers], width, color=colour, label=label)
    ax.bar_label(bars, labels=["n/a" if v is None else fmt.format(v) for v in numbers], fontsize=8, padding=2)


# -- files ---------------------------------------------------------------------------------------


def plot_training(rows: list[dict], out_dir: Path) -> list[Path]:
    """Write `out_dir/reward.png` and `out_dir/savings.png` from metrics rows; return their paths.

    No rows writes nothing and returns []. Both figures are rendered before either is written.
    """
    if not rows:
        return []
    out_dir = Path(out_dir)
    rendered = {"reward.png": _png_bytes(reward_figure(rows)), "savings.png": _png_bytes(savings_figure(rows))}
    paths = []
    for name, data in rendered.items():
        _write(out_dir / name, data)
        paths.append(out_dir / name)
    return paths


def plot_comparison(variants: dict[str, dict], path: Path) -> Path:
    """Write the three-panel benchmark comparison of `variants` to `path` (PNG); return `path`."""
    if not variants:
        raise InputError("plot_comparison got no variants: pass at least one name -> results entry.")
    path = Path(path)
    _write(path, _png_bytes(comparison_figure(variants)))
    return path


def save_png(fig, path: Path, dpi: int = 120) -> Path:
    """Lay out a pyplot figure, write it to `path` as PNG atomically, and close it (the benchmarks' pictures)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = _bytes_io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    _write(Path(path), buffer.getvalue())
    return Path(path)


def _png_bytes(fig) -> bytes:
    buffer = _bytes_io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    with io.atomic_open(path, "wb") as f:
        f.write(data)
