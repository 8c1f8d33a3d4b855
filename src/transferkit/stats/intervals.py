"""Intervals for every number a user compares: Wilson for proportions, the percentile bootstrap for metrics.

Wilson intervals come from statsmodels; the percentile bootstrap (Efron and Tibshirani 1993) is written
here, seeded and deterministic, and tested against direct reference computations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np
from numpy.typing import ArrayLike

from transferkit.errors import UsageError
from transferkit.stats.checks import as_labels, check_confidence, check_positive_int, check_same_length

logger = logging.getLogger(__name__)

# Resampled index matrices are drawn this many values at a time (8 MB of int64), whatever n_boot x n is.
_CHUNK_VALUES = 1_000_000


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (statsmodels `proportion_confint(method="wilson")`).

    Wilson rather than the normal approximation: it stays inside [0, 1] and
    keeps its coverage at 0 or n successes, where small test sets often are.

    Args:
        successes: Number of successes, 0 <= successes <= n.
        n: Number of trials; n == 0 gives (0.0, 1.0) (nothing is known).
        confidence: Coverage of the interval.

    Returns:
        (low, high) as fractions in [0, 1].

    Example:
        >>> low, high = wilson_interval(45, 50)
        >>> round(low, 3), round(high, 3)
        (0.786, 0.957)
    """
    alpha = check_confidence(confidence)
    n = check_positive_int("n", n, minimum=0)
    successes = check_positive_int("successes", successes, minimum=0)
    if successes > n:
        raise UsageError(f"successes must be at most n; got successes={successes}, n={n}.")
    if n == 0:
        return 0.0, 1.0
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(successes, n, alpha=alpha, method="wilson")
    return float(max(0.0, low)), float(min(1.0, high))


def resamples(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of bootstrap index rows; row b is the b-th `rng.integers(0, n, size=n)` of `default_rng(seed)`.

    Drawing a (rows, n) block gives the same numbers as drawing its rows one
    by one, so the blocks only bound memory; they do not change the resamples.
    """
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_VALUES // n)
    for start in range(0, n_boot, rows):
        yield rng.integers(0, n, size=(min(rows, n_boot - start), n))


def percentile_interval(stats: np.ndarray, alpha: float) -> tuple[float, float]:
    """Percentile bootstrap interval (Efron & Tibshirani 1993, ch. 13); numpy's default linear quantiles."""
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_interval(
    metric: Callable[[np.ndarray, np.ndarray], float],
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric(y_true, y_pred)`, resampling examples with replacement.

    Resample b takes the indices `rng.integers(0, n, size=n)`, the b-th such
    draw of `np.random.default_rng(seed)`, and the interval is the
    (alpha/2, 1 - alpha/2) quantiles of the n_boot metric values. For metrics
    without a closed-form interval (balanced accuracy, macro-F1); use
    `wilson_interval` for plain accuracy. The metric is called n_boot times:
    scikit-learn's metrics take about 1 ms a call.

    Args:
        metric: Function of (y_true, y_pred) returning a float.
        y_true: True labels, one per example.
        y_pred: Predicted labels, one per example.
        n_boot: Number of bootstrap resamples.
        seed: Seed of the resampling; the same seed gives the same interval.
        confidence: Coverage of the interval.

    Returns:
        (low, high) in the metric's units.

    Example:
        >>> from sklearn.metrics import balanced_accuracy_score
        >>> low, high = bootstrap_interval(balanced_accuracy_score, [0, 0, 1, 1, 1], [0, 1, 1, 1, 1], n_boot=200)
        >>> 0.0 <= low <= high <= 1.0
        True
    """
    alpha = check_confidence(confidence)
    n_boot = check_positive_int("n_boot", n_boot)
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    n = check_same_length("y_true and y_pred", y_true, y_pred)
    stats = [float(metric(y_true[idx], y_pred[idx])) for block in resamples(n, n_boot, seed) for idx in block]
    return percentile_interval(np.asarray(stats), alpha)


# --------------------------------------------------------------------------- metrics with intervals


def _bootstrap_confusions(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, K, K) confusion counts (true rows, predicted columns) of the same resamples as `bootstrap_interval`."""
    k2, out = n_classes * n_classes, []
    for block in resamples(len(y_true), n_boot, seed):
        codes = y_true[block] * n_classes + y_pred[block] + (np.arange(len(block)) * k2)[:, None]
        out.append(np.bincount(codes.ravel(), minlength=len(block) * k2).reshape(len(block), n_classes, n_classes))
    return np.concatenate(out)


def _balanced_accuracy_from_counts(cm: np.ndarray) -> np.ndarray:
    """Mean recall over the classes present in y_true of each resample: sklearn's `balanced_accuracy_score`."""
    support, tp = cm.sum(2), np.diagonal(cm, axis1=1, axis2=2)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros(support.shape), where=present)
    return recall.sum(1) / present.sum(1)


def _macro_f1_from_counts(cm: np.ndarray) -> np.ndarray:
    """Mean F1 = 2TP / (support + predicted) over classes in y_true or y_pred of each resample."""
    support, predicted, tp = cm.sum(2), cm.sum(1), np.diagonal(cm, axis1=1, axis2=2)
    present = (support + predicted) > 0
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros(support.shape), where=present)
    return f1.sum(1) / present.sum(1)


def _interval_entry(value: float | None, low: float | None, high: float | None, method: str, **extra) -> dict:
    return {"value": value, "low": low, "high": high, "method": method, **extra}


def _per_class_recall(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, confidence: float) -> list[dict]:
    """Recall of each class with its Wilson interval; a class absent from y_true has value/low/high None."""
    out = []
    for c in range(n_classes):
        support = int((y_true == c).sum())
        hits = int(((y_true == c) & (y_pred == c)).sum())
        if support == 0:
            out.append(_interval_entry(None, None, None, "wilson", **{"class": c, "n": 0}))
            continue
        low, high = wilson_interval(hits, support, confidence)
        out.append(_interval_entry(hits / support, low, high, "wilson", **{"class": c, "n": support}))
    return out


def score_with_intervals(
    y_true: ArrayLike, y_pred: ArrayLike, n_classes: int, *, seed: int = 0, n_boot: int = 2000, confidence: float = 0.95
) -> dict:
    """Accuracy, balanced accuracy, macro-F1 and per-class recall, each with its interval.

    Accuracy and per-class recall are proportions: Wilson intervals. Balanced
    accuracy and macro-F1 get percentile bootstrap intervals over examples,
    the resamples of `bootstrap_interval` with the same seed (computed from
    resampled confusion counts, about 100x faster than calling scikit-learn
    2,000 times; the tests check both give the same numbers).

    Classes absent from y_true: balanced accuracy averages recall over the
    classes present in y_true (scikit-learn's `balanced_accuracy_score`; an
    absent class has no recall to average). Macro-F1 averages over classes
    present in y_true or y_pred (scikit-learn's default labels): a class that
    is predicted but never true scores F1 = 0, so false alarms of it count; a
    class absent from both is left out. Per-class recall of an absent class
    is None (n = 0). A bootstrap resample applies the same rules to the
    classes it happens to contain.

    Args:
        y_true: True class indices in [0, n_classes).
        y_pred: Predicted class indices in [0, n_classes).
        n_classes: Number of classes of the task.
        seed: Seed of the bootstrap resampling.
        n_boot: Number of bootstrap resamples.
        confidence: Coverage of every interval.

    Returns:
        JSON-ready dict: "n", "confidence", and "accuracy", "balanced_accuracy",
        "macro_f1" each as {"value", "low", "high", "method"}, and
        "per_class_recall" as a list indexed by class of the same plus "class" and "n".

    Example:
        >>> s = score_with_intervals([0, 0, 1, 1, 2, 2], [0, 0, 1, 2, 2, 2], 3, n_boot=200)
        >>> round(s["accuracy"]["value"], 3), s["accuracy"]["method"]
        (0.833, 'wilson')
    """
    from sklearn.metrics import f1_score, recall_score

    check_confidence(confidence)
    n_classes = check_positive_int("n_classes", n_classes)
    n_boot = check_positive_int("n_boot", n_boot)
    y_true, y_pred = as_labels("y_true", y_true), as_labels("y_pred", y_pred)
    n = check_same_length("y_true and y_pred", y_true, y_pred)
    for name, arr in (("y_true", y_true), ("y_pred", y_pred)):
        if arr.min() < 0 or arr.max() >= n_classes:
            raise UsageError(
                f"{name} must hold class indices in [0, {n_classes}); got values from {arr.min()} to {arr.max()}. "
                f"Pass n_classes = the number of classes of the task."
            )
    hits = int((y_true == y_pred).sum())
    cm = _bootstrap_confusions(y_true, y_pred, n_classes, n_boot, seed)
    alpha, boot = 1.0 - confidence, f"bootstrap ({n_boot} resamples over examples, seed {seed})"
    # recall_score over the labels in y_true is balanced_accuracy_score without its warning for predicted-only classes.
    balanced = float(recall_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0.0))
    macro_f1 = float(f1_score(y_true, y_pred, labels=np.union1d(y_true, y_pred), average="macro", zero_division=0.0))
    return {
        "n": n,
        "confidence": confidence,
        "accuracy": _interval_entry(hits / n, *wilson_interval(hits, n, confidence), "wilson"),
        "balanced_accuracy": _interval_entry(balanced, *percentile_interval(_balanced_accuracy_from_counts(cm), alpha), boot),
        "macro_f1": _interval_entry(macro_f1, *percentile_interval(_macro_f1_from_counts(cm), alpha), boot),
        "per_class_recall": _per_class_recall(y_true, y_pred, n_classes, confidence),
    }
