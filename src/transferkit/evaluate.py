"""Metrics: accuracy, top-k, macro-F1, per-class precision/recall/F1, confusion matrix."""

from __future__ import annotations

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts with true classes as rows and predicted classes as columns."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return m


def top_k_accuracy(logits: np.ndarray, y_true: np.ndarray, k: int) -> float:
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1)[:, :k]
    return float((top == np.asarray(y_true)[:, None]).any(axis=1).mean())


def metrics(logits: np.ndarray, y_true: np.ndarray, classes: list[str]) -> dict:
    """Every metric transferkit reports, as plain JSON-ready numbers.

    Example:
        >>> m = metrics(np.array([[2.0, 0.1], [0.2, 1.0]]), np.array([0, 1]), ["cat", "dog"])
        >>> m["accuracy"], m["macro_f1"]
        (1.0, 1.0)
    """
    y_true = np.asarray(y_true)
    pred = logits.argmax(1)
    cm = confusion(y_true, pred, len(classes))
    tp = np.diag(cm).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(cm.sum(0) > 0, tp / cm.sum(0), 0.0)
        recall = np.where(cm.sum(1) > 0, tp / cm.sum(1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = (cm.sum(1) > 0) | (cm.sum(0) > 0)  # classes seen in truth or predictions, as sklearn
    return {
        "n": int(len(y_true)),
        "accuracy": float((pred == y_true).mean()) if len(y_true) else 0.0,
        "top5_accuracy": top_k_accuracy(logits, y_true, 5),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for c, p, r, f, s in zip(classes, precision, recall, f1, cm.sum(1))},
        "confusion": cm.tolist(),
    }
