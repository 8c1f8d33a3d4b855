"""Figures for the HTML reports: matplotlib's object API (pyplot's global state and backend stay untouched), PNG inline."""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transferkit.compare.results import StrategyResult


def new_figure(width: float = 6, height: float = 4):
    """A figure and its axes, built without pyplot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def png_base64(fig) -> str:
    """The figure as a base64 PNG, for a data: URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def plot_accuracy_vs_time(results: list[StrategyResult]) -> str:
    fig, ax = new_figure()
    for r in results:
        span = _accuracy_span(r)
        err = [[max(0.0, r.test_accuracy - span[0]) * 100], [max(0.0, span[1] - r.test_accuracy) * 100]] if span else None
        ax.errorbar(r.seconds, r.test_accuracy * 100, yerr=err, fmt="o", capsize=4, markersize=7)
        ax.annotate(r.label, (r.seconds, r.test_accuracy * 100), textcoords="offset points", xytext=(5, 5), parse_math=False)
    ax.set_xscale("log")
    ax.set_xlabel("training time (s, log scale)")
    ax.set_ylabel("test accuracy (%); bars: 95% interval, or min-max over seeds")
    ax.set_title("Accuracy vs training time")
    ax.grid(alpha=0.3)
    return png_base64(fig)


def plot_learning_curves(curve: list[StrategyResult]) -> str:
    fig, ax = new_figure()
    for spec in dict.fromkeys(r.strategy for r in curve):
        pts = sorted((r.train_per_class, r.test_accuracy * 100) for r in curve if r.strategy == spec)
        ax.plot(*zip(*pts), marker="o", label=spec)
    ax.set_xscale("log")
    ax.set_xlabel("training examples per class (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Learning curves")
    ax.legend()
    ax.grid(alpha=0.3)
    return png_base64(fig)


def _accuracy_span(r: StrategyResult) -> tuple[float, float] | None:
    """What an error bar spans: min-max over the seeds, else the Wilson 95% interval of the one run."""
    spread = r.spread("test_accuracy")
    if spread:
        return spread["min"], spread["max"]
    iv = (r.metrics.get("intervals") or {}).get("accuracy")
    return (iv["low"], iv["high"]) if iv else None


def plot_reliability(results: list[StrategyResult]) -> str:
    """Reliability diagram: accuracy against mean confidence per confidence bin (15 bins), one line per strategy."""
    from transferkit.stats.calibration import confidence_bins

    fig, ax = new_figure(5, 5)
    ax.plot([0, 100], [0, 100], color="#999", linestyle="--", label="perfectly calibrated")
    for r in results:
        p = r.metrics.get("predictions") or {}
        if not p.get("prob"):
            continue
        bins = [b for b in confidence_bins(p["prob"], np.asarray(p["true"]) == np.asarray(p["pred"])) if b["count"]]
        ax.plot(
            [b["mean_confidence"] * 100 for b in bins],
            [b["accuracy"] * 100 for b in bins],
            marker="o",
            label=f"{r.label} (ECE {r.metrics.get('ece', 0):.3f})",
        )
    ax.set_xlabel("confidence of the predicted class (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Reliability (test, after temperature scaling)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return png_base64(fig)


def plot_validation_curves(results: list[StrategyResult]) -> str | None:
    """Validation accuracy per fine-tuning epoch of each strategy that has epochs (first seed)."""
    rows = {r.label: [h for h in r.history if "C" not in h] for r in results}
    rows = {k: v for k, v in rows.items() if v}
    if not rows:
        return None
    fig, ax = new_figure()
    for label, hist in rows.items():
        ax.plot(range(1, len(hist) + 1), [h["val_acc"] * 100 for h in hist], marker="o", label=label)
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Validation accuracy per epoch")
    ax.legend()
    ax.grid(alpha=0.3)
    return png_base64(fig)


def plot_confusion(matrix: list[list[int]], classes: list[str], title: str) -> str:
    m = np.asarray(matrix)
    size = min(8, 2 + 0.4 * len(classes))
    fig, ax = new_figure(size, size)
    ax.imshow(m, cmap="Blues")
    if len(classes) <= 20:
        ax.set_xticks(range(len(classes)), classes, rotation=90, parse_math=False)
        ax.set_yticks(range(len(classes)), classes, parse_math=False)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, parse_math=False)
    return png_base64(fig)


def plot_history(history: list[dict], title: str) -> str:
    fig, ax = new_figure()
    rows = [r for r in history if "C" not in r]
    if rows:
        ax.plot(range(1, len(rows) + 1), [r["val_acc"] * 100 for r in rows], marker="o", label="validation")
        ax.plot(range(1, len(rows) + 1), [r["train_acc"] * 100 for r in rows], marker=".", label="train")
        ax.set_xlabel("epoch (all image phases)")
    else:
        probe = [r for r in history if "C" in r]
        ax.plot([r["C"] for r in probe], [r["val_acc"] * 100 for r in probe], marker="o", label="validation")
        ax.set_xscale("log")
        ax.set_xlabel("probe regularisation C (log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, parse_math=False)
    ax.legend()
    ax.grid(alpha=0.3)
    return png_base64(fig)
