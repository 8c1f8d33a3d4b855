"""Metrics: accuracy, top-k, macro-F1, per-class precision/recall/F1, confusion matrix (computed by scikit-learn),
each headline score with its 95% interval, the calibration error, and the per-example predictions behind them;
the top-k predictions per input, as predict and serve give them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, top_k_accuracy_score

from transferkit.errors import UsageError
from transferkit.stats.calibration import expected_calibration_error
from transferkit.stats.intervals import score_with_intervals

TOP_K = 5


def metrics(logits: np.ndarray, y_true: np.ndarray, classes: list[str], ids: list[str] | None = None, seed: int = 0) -> dict:
    """Every metric transferkit reports, as plain JSON-ready numbers.

    Args:
        logits: scores of shape (n, K), columns in the order of `classes`; the prediction is the argmax.
        y_true: true class indices in ``range(K)``, shape (n,).
        classes: the K class names.
        ids: each example's id (its path, or a text's row), kept with its prediction; None numbers them.
        seed: seed of the bootstrap intervals.

    Returns:
        ``n``, ``accuracy``, ``top5_accuracy`` (None when K <= 5: every class is then in the top 5),
        ``macro_f1``, ``balanced_accuracy``, ``per_class`` ({name: {precision, recall, f1, support}}),
        ``absent_classes``, ``confusion`` (true classes as rows, predicted as columns, K x K),
        ``intervals`` (accuracy: Wilson 95%; balanced accuracy and macro-F1: seeded bootstrap over
        examples; per-class recall: Wilson; see :func:`transferkit.stats.intervals.score_with_intervals`),
        ``ece`` (expected calibration error of the softmax, 15 equal-width bins) and ``predictions``
        (columns ``id``, ``true``, ``pred``, ``prob`` = probability of the predicted class).

    A class with no example in `y_true` (support 0) has no defined recall, so its precision, recall and
    F1 are None (JSON null) and it is listed in ``absent_classes``; ``macro_f1`` averages F1 over the
    classes present in `y_true` only, so scoring on a subset of the classes does not drag it down. A
    present class that is never predicted has precision 0 (scikit-learn's ``zero_division=0``). With no
    examples (n = 0) the scalar metrics are 0.0 and every class is absent.

    Raises:
        UsageError: `logits` is not of shape (len(y_true), len(classes)).

    Example:
        >>> m = metrics(np.array([[2.0, 0.1, 0.0], [0.2, 1.0, 0.0]]), np.array([0, 1]), ["cat", "dog", "eel"])
        >>> m["accuracy"], m["macro_f1"], m["absent_classes"]
        (1.0, 1.0, ['eel'])
        >>> m["per_class"]["eel"]
        {'precision': None, 'recall': None, 'f1': None, 'support': 0}
    """
    logits, y_true, labels = np.asarray(logits, dtype=float), np.asarray(y_true, dtype=np.int64), np.arange(len(classes))
    if len(y_true) == 0:
        return _empty(classes)
    if logits.shape != (len(y_true), len(classes)):
        raise UsageError(
            f"metrics: logits have shape {logits.shape}, expected (n, K) = ({len(y_true)}, {len(classes)}): "
            "one row per label in y_true and one column per class, in the order of `classes`."
        )
    pred = logits.argmax(1)
    cm = confusion_matrix(y_true, pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    present = labels[support > 0]
    probs = softmax(logits)
    intervals = score_with_intervals(y_true, pred, len(classes), seed=seed)
    return {
        "n": len(y_true),
        "accuracy": float(np.trace(cm) / len(y_true)),
        "top5_accuracy": _top_k_accuracy(logits, y_true, labels),
        "macro_f1": float(f1_score(y_true, pred, labels=present, average="macro", zero_division=0)),
        "balanced_accuracy": intervals["balanced_accuracy"]["value"],
        "per_class": {c: _class_scores(p, r, f, s) for c, p, r, f, s in zip(classes, precision, recall, f1, support)},
        "absent_classes": [c for c, s in zip(classes, support) if s == 0],
        "confusion": cm.tolist(),
        "intervals": intervals,
        # 6 decimals, as the probabilities: a resumed run's last-bit differences must not change its metrics.
        "ece": round(expected_calibration_error(probs, y_true), 6) if len(classes) > 1 else 0.0,
        "predictions": _predictions(probs, y_true, pred, ids),
    }


def _predictions(probs: np.ndarray, y_true: np.ndarray, pred: np.ndarray, ids: list[str] | None) -> dict:
    """Per example, as columns: id, true and predicted class index, probability of the predicted class."""
    return {
        "id": list(ids) if ids is not None else [str(i) for i in range(len(y_true))],
        "true": y_true.tolist(),
        "pred": pred.tolist(),
        "prob": [round(float(p), 6) for p in probs[np.arange(len(pred)), pred]],
    }


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (scipy's, numerically stable)."""
    from scipy.special import softmax as scipy_softmax

    return scipy_softmax(np.asarray(logits, dtype=np.float64), axis=1)


def _top_k_accuracy(logits: np.ndarray, y_true: np.ndarray, labels: np.ndarray) -> float | None:
    """Share of examples whose true class is among the TOP_K highest scores; None with K <= TOP_K classes."""
    if len(labels) <= TOP_K:  # every class is in the top K: 1.0 by definition, which says nothing
        return None
    return float(top_k_accuracy_score(y_true, logits, k=TOP_K, labels=labels))


def shown_test_metrics(test: dict, n_classes: int) -> dict:
    """`test` without top-5 accuracy when there are no more than TOP_K classes (older runs stored 1.0 for it)."""
    return test if n_classes > TOP_K else {k: v for k, v in test.items() if k != "top5_accuracy"}


def top_k_clause(test: dict, n_classes: int) -> str:
    """'; top-5 0.9812' to follow the scores sentence, or '' when top-5 says nothing (K <= TOP_K) or is missing."""
    value = shown_test_metrics(test, n_classes).get("top5_accuracy")
    return f"; top-{TOP_K} {value:.4f}" if isinstance(value, int | float) else ""


def _class_scores(precision: float, recall: float, f1: float, support: int) -> dict:
    if support == 0:
        return {"precision": None, "recall": None, "f1": None, "support": 0}
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(support)}


def _empty(classes: list[str]) -> dict:
    k = len(classes)
    return {
        "n": 0,
        "accuracy": 0.0,
        "top5_accuracy": 0.0 if k > TOP_K else None,
        "macro_f1": 0.0,
        "balanced_accuracy": 0.0,
        "per_class": {c: _class_scores(0.0, 0.0, 0.0, 0) for c in classes},
        "absent_classes": list(classes),
        "confusion": [[0] * k for _ in range(k)],
        "intervals": None,
        "ece": None,
        "predictions": {"id": [], "true": [], "pred": [], "prob": []},
    }


def top_predictions(items: Sequence, proba: np.ndarray, classes: Sequence[str], top_k: int, key: str = "file") -> list[dict]:
    """The `top_k` labels with their probabilities per input (a file, or a text), as plain JSON-ready data.

    What ``transferkit predict --json`` prints and ``POST /predict`` of ``transferkit serve`` answers:
    ``[{key: item, "predictions": [{"label": ..., "probability": ...}, ...]}, ...]``, most probable first.
    """
    rows = []
    for item, p in zip(items, proba):
        order = p.argsort()[::-1][:top_k]
        rows.append({key: str(item), "predictions": [{"label": classes[i], "probability": float(p[i])} for i in order]})
    return rows
