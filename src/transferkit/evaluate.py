"""Metrics: accuracy, top-k, macro-F1, per-class precision/recall/F1, confusion matrix (computed by scikit-learn);
the top-k predictions per input, as predict and serve give them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, top_k_accuracy_score

from transferkit.errors import UsageError

TOP_K = 5


def metrics(logits: np.ndarray, y_true: np.ndarray, classes: list[str]) -> dict:
    """Every metric transferkit reports, as plain JSON-ready numbers.

    Args:
        logits: scores of shape (n, K), columns in the order of `classes`; the prediction is the argmax.
        y_true: true class indices in ``range(K)``, shape (n,).
        classes: the K class names.

    Returns:
        ``n``, ``accuracy``, ``top5_accuracy`` (top-min(5, K): 1.0 by definition when K <= 5),
        ``macro_f1``, ``per_class`` ({name: {precision, recall, f1, support}}), ``absent_classes`` and
        ``confusion`` (true classes as rows, predicted as columns, K x K).

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
        raise UsageError(f"metrics: logits have shape {logits.shape}, expected (n, K) = ({len(y_true)}, {len(classes)}): "
                         "one row per label in y_true and one column per class, in the order of `classes`.")
    pred = logits.argmax(1)
    cm = confusion_matrix(y_true, pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    present = labels[support > 0]
    return {
        "n": int(len(y_true)),
        "accuracy": float(np.trace(cm) / len(y_true)),
        "top5_accuracy": _top_k_accuracy(logits, y_true, labels),
        "macro_f1": float(f1_score(y_true, pred, labels=present, average="macro", zero_division=0)),
        "per_class": {c: _class_scores(p, r, f, s) for c, p, r, f, s in zip(classes, precision, recall, f1, support)},
        "absent_classes": [c for c, s in zip(classes, support) if s == 0],
        "confusion": cm.tolist(),
    }


def _top_k_accuracy(logits: np.ndarray, y_true: np.ndarray, labels: np.ndarray) -> float:
    """Share of examples whose true class is among the min(TOP_K, K) highest scores."""
    if TOP_K >= len(labels):  # every class is in the top K: scikit-learn would warn that the score is meaningless
        return 1.0
    return float(top_k_accuracy_score(y_true, logits, k=TOP_K, labels=labels))


def _class_scores(precision: float, recall: float, f1: float, support: int) -> dict:
    if support == 0:
        return {"precision": None, "recall": None, "f1": None, "support": 0}
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(support)}


def _empty(classes: list[str]) -> dict:
    k = len(classes)
    return {"n": 0, "accuracy": 0.0, "top5_accuracy": 0.0, "macro_f1": 0.0,
            "per_class": {c: _class_scores(0.0, 0.0, 0.0, 0) for c in classes}, "absent_classes": list(classes),
            "confusion": [[0] * k for _ in range(k)]}


def top_predictions(items: Sequence, proba: np.ndarray, classes: Sequence[str], top_k: int,
                    key: str = "file") -> list[dict]:
    """The `top_k` labels with their probabilities per input (a file, or a text), as plain JSON-ready data.

    What ``transferkit predict --json`` prints and ``POST /predict`` of ``transferkit serve`` answers:
    ``[{key: item, "predictions": [{"label": ..., "probability": ...}, ...]}, ...]``, most probable first.
    """
    rows = []
    for item, p in zip(items, proba):
        order = p.argsort()[::-1][:top_k]
        rows.append({key: str(item), "predictions": [{"label": classes[i], "probability": float(p[i])} for i in order]})
    return rows
