"""The cross-validated linear probe: out-of-fold accuracy and probabilities of a logistic regression on features
(scikit-learn), the evidence behind backbone ranking, auto's decision and the doctor's label checks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from transferkit.errors import UsageError
from transferkit.stats.checks import as_labels, check_confidence, check_positive_int, check_same_length, is_number
from transferkit.stats.intervals import wilson_interval

logger = logging.getLogger(__name__)

# L2 strength of `cross_validated_probe` when C is not given: scikit-learn's default, on standardised features.
DEFAULT_PROBE_C = 1.0
# `default_cv_folds` turns the probe on up to this many feature values (examples x dimension): 5 L-BFGS fits of
# e.g. 5,000 x 768 features take a few seconds on a laptop CPU.
MAX_CV_CELLS = 4_000_000
# Resampled index matrices are drawn this many values at a time (8 MB of int64), whatever n_boot x n is.


# --------------------------------------------------------------------------- cross-validated probe


@dataclass(frozen=True, eq=False)
class CVProbe:
    """Out-of-fold results of a cross-validated linear probe.

    `probabilities[i]` comes from the one model whose training folds left
    example i out (its test fold is `fold_of[i]`); columns follow `classes`.
    """

    n: int
    k: int  # folds actually used (reduced to the smallest class count)
    C: float
    accuracy: float  # of all out-of-fold predictions
    low: float  # Wilson interval of `accuracy`
    high: float
    fold_accuracies: tuple[float, ...]
    classes: np.ndarray  # label value of each probability column
    probabilities: np.ndarray  # (n, len(classes)), rows sum to 1
    fold_of: np.ndarray  # (n,) index of the fold in which each example was tested
    confidence: float = 0.95
    seed: int = 0

    @property
    def fold_mean(self) -> float:
        return float(np.mean(self.fold_accuracies))

    @property
    def fold_sd(self) -> float:
        """Sample standard deviation (ddof = 1) of the per-fold accuracies."""
        return float(np.std(self.fold_accuracies, ddof=1))

    def to_dict(self) -> dict:
        """JSON-ready summary; the per-example arrays are left out (they are data, not a result)."""
        return {
            "n": self.n,
            "k": self.k,
            "C": self.C,
            "accuracy": self.accuracy,
            "low": self.low,
            "high": self.high,
            "confidence": self.confidence,
            "fold_accuracies": list(self.fold_accuracies),
            "fold_mean": self.fold_mean,
            "fold_sd": self.fold_sd,
            "seed": self.seed,
            "classes": self.classes.tolist(),
            "method": f"stratified {self.k}-fold, standardised features, L2 logistic regression (C={self.C:g}), "
            f"Wilson interval over out-of-fold predictions",
        }


def default_cv_folds(n_examples: int, feature_dim: int) -> int:
    """Folds of the cross-validated probe to run by default: 5 when cheap, 0 (off) otherwise.

    Rule: 5 when 2 <= n_examples and n_examples * feature_dim <= `MAX_CV_CELLS`
    (4,000,000, e.g. 5,000 examples of 768-d features: five L-BFGS fits in a
    few seconds on a laptop CPU), else 0.

    Args:
        n_examples: Examples of train + validation together.
        feature_dim: Length of one feature vector.

    Returns:
        5 or 0.

    Example:
        >>> default_cv_folds(1000, 768), default_cv_folds(100_000, 2048)
        (5, 0)
    """
    n = check_positive_int("n_examples", n_examples, minimum=0)
    d = check_positive_int("feature_dim", feature_dim, minimum=1)
    return 5 if n >= 2 and n * d <= MAX_CV_CELLS else 0


def _cv_folds(labels: np.ndarray, k: int) -> int:
    """k, reduced to the smallest class count so every fold holds every class; at least 2."""
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise UsageError(f"labels must hold at least 2 classes for a probe; got only {classes.tolist()}.")
    smallest = int(counts.min())
    if smallest < 2:
        rare = classes[counts < 2].tolist()
        raise UsageError(
            f"Cross-validation needs at least 2 examples of every class; classes {rare} have 1. "
            "Add examples of them, or leave them out of the probe."
        )
    if smallest < k:
        logger.info("cross_validated_probe: %d folds instead of %d (the smallest class has %d examples).", smallest, k, smallest)
    return min(k, smallest)


def _check_probe_inputs(features: ArrayLike, labels: ArrayLike, k: int, C: float | None) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float64)
    y = as_labels("labels", labels)
    check_positive_int("k", k, minimum=2)
    if C is not None and not (is_number(C) and math.isfinite(C) and C > 0):
        raise UsageError(f"C must be a finite number above 0, or None for {DEFAULT_PROBE_C}; got {C!r}.")
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise UsageError(f"features must be a finite (examples, dimension) array; got shape {x.shape}.")
    check_same_length("features and labels", x, y)
    return x, y


def cross_validated_probe(
    features: ArrayLike, labels: ArrayLike, *, k: int = 5, seed: int = 0, C: float | None = None, confidence: float = 0.95
) -> CVProbe:
    """Stratified k-fold estimate of a linear probe's accuracy, and out-of-fold probabilities for every example.

    Each fold fits `StandardScaler` + L2 multinomial `LogisticRegression`
    (lbfgs, max_iter=1000) on the other folds. Standardising, with statistics
    of the training folds only, makes one C mean the same on any backbone's
    features (their scales differ by orders of magnitude) and helps L-BFGS
    converge. C=None uses the fixed `DEFAULT_PROBE_C` = 1.0 rather than a
    search: choosing C by these same folds would leak the test folds into the
    estimate, and a nested search costs ~10x. The estimate is of this fixed-C
    probe; a probe whose C is tuned does as well or better.

    Folds: `StratifiedKFold(k, shuffle=True, random_state=seed)`, with k
    reduced to the smallest class count (each fold then holds every class);
    a class with fewer than 2 examples is an error.

    Args:
        features: (examples, dimension) features, e.g. of train + validation.
        labels: Class of each example (integers).
        k: Number of folds.
        seed: Seed of the fold shuffle (the fit itself is deterministic).
        C: Inverse L2 strength of scikit-learn's LogisticRegression; None for 1.0.
        confidence: Coverage of the accuracy interval.

    Returns:
        A `CVProbe`: accuracy and Wilson interval over all out-of-fold
        predictions, per-fold accuracies, and the out-of-fold probabilities.

    Example:
        >>> import numpy as np
        >>> x = np.r_[np.zeros((10, 2)), np.ones((10, 2))] + np.random.default_rng(0).normal(0, 0.1, (20, 2))
        >>> cross_validated_probe(x, [0] * 10 + [1] * 10).accuracy
        1.0
    """
    from sklearn.model_selection import StratifiedKFold

    check_confidence(confidence)
    x, y = _check_probe_inputs(features, labels, k, C)
    c = float(DEFAULT_PROBE_C if C is None else C)
    k = _cv_folds(y, k)
    classes = np.unique(y)
    probabilities, fold_of, fold_acc = np.zeros((len(y), len(classes))), np.full(len(y), -1), []
    for fold, (train, test) in enumerate(StratifiedKFold(k, shuffle=True, random_state=seed).split(x, y)):
        probabilities[test] = _fit_predict_fold(x[train], y[train], x[test], classes, c)
        fold_of[test] = fold
        fold_acc.append(float((classes[probabilities[test].argmax(1)] == y[test]).mean()))
    hits = int((classes[probabilities.argmax(1)] == y).sum())
    low, high = wilson_interval(hits, len(y), confidence)
    return CVProbe(
        n=len(y),
        k=k,
        C=c,
        accuracy=hits / len(y),
        low=low,
        high=high,
        fold_accuracies=tuple(fold_acc),
        classes=classes,
        probabilities=probabilities,
        fold_of=fold_of,
        confidence=confidence,
        seed=seed,
    )


def _fit_predict_fold(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, classes: np.ndarray, C: float) -> np.ndarray:
    """Probabilities of x_test, columns in `classes` order, from a probe fitted on the training folds only."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000)).fit(x_train, y_train)
    out = np.zeros((len(x_test), len(classes)))
    out[:, np.searchsorted(classes, model.classes_)] = model.predict_proba(x_test)
    return out
