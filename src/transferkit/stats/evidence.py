"""Evidence behind a number: intervals, paired tests and a cross-validated probe (calibration: `calibration`).

Everything a comparison verdict, `auto`'s decision or a report states about
accuracy goes through here, so that a number a user will compare carries its
interval and a claimed winner carries a paired test. Every random step is
seeded and deterministic.

The statistics come from the kept libraries: Wilson intervals and the exact
McNemar test from statsmodels, the metrics and the logistic-regression probe
from scikit-learn, the temperature fit from scipy's L-BFGS-B. What is written
here (the percentile bootstrap, equal-width ECE, temperature scaling) follows
the cited papers and is tested against direct reference computations.

Importing this module is cheap: statsmodels, scikit-learn, scipy and torch are
imported inside the functions that use them, and torch only by
`fold_temperature_`, so the package imports without torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
from numpy.typing import ArrayLike

from transferkit.errors import UsageError
from transferkit.stats.wording import format_interval, ratio_phrase  # noqa: F401  (re-exported: evidence's wording)

logger = logging.getLogger(__name__)

# L2 strength of `cross_validated_probe` when C is not given: scikit-learn's default, on standardised features.
DEFAULT_PROBE_C = 1.0
# `default_cv_folds` turns the probe on up to this many feature values (examples x dimension): 5 L-BFGS fits of
# e.g. 5,000 x 768 features take a few seconds on a laptop CPU.
MAX_CV_CELLS = 4_000_000
# Resampled index matrices are drawn this many values at a time (8 MB of int64), whatever n_boot x n is.
_CHUNK_VALUES = 1_000_000


# --------------------------------------------------------------------------- validation helpers

def _is_number(value) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _check_confidence(confidence: float) -> float:
    """Return alpha = 1 - confidence after checking 0 < confidence < 1."""
    if not (_is_number(confidence) and 0.0 < confidence < 1.0):
        raise UsageError(f"confidence must be a number strictly between 0 and 1, e.g. 0.95; got {confidence!r}.")
    return 1.0 - float(confidence)


def _check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise UsageError(f"{name} must be an integer of at least {minimum}; got {value!r}.")
    return int(value)


def _as_labels(name: str, values: ArrayLike) -> np.ndarray:
    """A 1-D integer array of class indices, or a UsageError naming `name`."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise UsageError(f"{name} must be a 1-D array of class indices; got shape {arr.shape}.")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not (np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
            raise UsageError(f"{name} must hold integer class indices; got dtype {arr.dtype}. Pass labels.astype(int).")
    return arr.astype(np.int64)


def _as_correct(name: str, values: ArrayLike) -> np.ndarray:
    """A 1-D boolean correctness array (bool or 0/1), or a UsageError naming `name`."""
    arr = np.asarray(values)
    if arr.ndim != 1 or not (arr.dtype == bool or np.isin(arr, (0, 1)).all()):
        raise UsageError(f"{name} must be a 1-D array of per-example correctness (True/False or 0/1); "
                         f"got shape {arr.shape}, dtype {arr.dtype}. Pass predictions == labels.")
    return arr.astype(bool)


def _check_same_length(names: str, *arrays: np.ndarray) -> int:
    lengths = [len(a) for a in arrays]
    if len(set(lengths)) != 1:
        raise UsageError(f"{names} must describe the same examples; got lengths {lengths}.")
    if lengths[0] == 0:
        raise UsageError(f"{names} are empty: an interval needs at least one example.")
    return lengths[0]


# --------------------------------------------------------------------------- intervals

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
    alpha = _check_confidence(confidence)
    n = _check_positive_int("n", n, minimum=0)
    successes = _check_positive_int("successes", successes, minimum=0)
    if successes > n:
        raise UsageError(f"successes must be at most n; got successes={successes}, n={n}.")
    if n == 0:
        return 0.0, 1.0
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(successes, n, alpha=alpha, method="wilson")
    return float(max(0.0, low)), float(min(1.0, high))


def _resamples(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of bootstrap index rows; row b is the b-th `rng.integers(0, n, size=n)` of `default_rng(seed)`.

    Drawing a (rows, n) block gives the same numbers as drawing its rows one
    by one, so the blocks only bound memory; they do not change the resamples.
    """
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_VALUES // n)
    for start in range(0, n_boot, rows):
        yield rng.integers(0, n, size=(min(rows, n_boot - start), n))


def _percentile_interval(stats: np.ndarray, alpha: float) -> tuple[float, float]:
    """Percentile bootstrap interval (Efron & Tibshirani 1993, ch. 13); numpy's default linear quantiles."""
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_interval(metric: Callable[[np.ndarray, np.ndarray], float], y_true: ArrayLike, y_pred: ArrayLike, *,
                       n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> tuple[float, float]:
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
    alpha = _check_confidence(confidence)
    n_boot = _check_positive_int("n_boot", n_boot)
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    n = _check_same_length("y_true and y_pred", y_true, y_pred)
    stats = [float(metric(y_true[idx], y_pred[idx])) for block in _resamples(n, n_boot, seed) for idx in block]
    return _percentile_interval(np.asarray(stats), alpha)


# --------------------------------------------------------------------------- metrics with intervals

def _bootstrap_confusions(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, K, K) confusion counts (true rows, predicted columns) of the same resamples as `bootstrap_interval`."""
    k2, out = n_classes * n_classes, []
    for block in _resamples(len(y_true), n_boot, seed):
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


def score_with_intervals(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int, *, seed: int = 0, n_boot: int = 2000,
                         confidence: float = 0.95) -> dict:
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

    _check_confidence(confidence)
    n_classes = _check_positive_int("n_classes", n_classes)
    n_boot = _check_positive_int("n_boot", n_boot)
    y_true, y_pred = _as_labels("y_true", y_true), _as_labels("y_pred", y_pred)
    n = _check_same_length("y_true and y_pred", y_true, y_pred)
    for name, arr in (("y_true", y_true), ("y_pred", y_pred)):
        if arr.min() < 0 or arr.max() >= n_classes:
            raise UsageError(f"{name} must hold class indices in [0, {n_classes}); got values from {arr.min()} to {arr.max()}. "
                             f"Pass n_classes = the number of classes of the task.")
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
        "balanced_accuracy": _interval_entry(balanced, *_percentile_interval(_balanced_accuracy_from_counts(cm), alpha), boot),
        "macro_f1": _interval_entry(macro_f1, *_percentile_interval(_macro_f1_from_counts(cm), alpha), boot),
        "per_class_recall": _per_class_recall(y_true, y_pred, n_classes, confidence),
    }


# --------------------------------------------------------------------------- paired comparison

@dataclass(frozen=True)
class PairedDifference:
    """Accuracy difference of model A minus model B on the same examples, with its evidence.

    `low`/`high` are the paired percentile bootstrap interval of the
    difference (examples resampled jointly for both models); `mcnemar_p` is
    the exact McNemar test on the discordant pairs. `significant` follows the
    interval; in borderline cases the two can disagree, so reports show both.
    """

    n: int
    accuracy_a: float
    accuracy_b: float
    difference: float  # accuracy_a - accuracy_b, as a fraction
    low: float
    high: float
    mcnemar_p: float
    only_a_correct: int  # discordant: A right, B wrong
    only_b_correct: int  # discordant: A wrong, B right
    confidence: float = 0.95
    method: str = field(default="paired bootstrap over examples; exact McNemar")

    @property
    def significant(self) -> bool:
        """True when the interval of the difference excludes 0."""
        return self.low > 0.0 or self.high < 0.0

    def to_dict(self) -> dict:
        """JSON-ready fields plus `significant`."""
        return {**asdict(self), "significant": self.significant}


def _mcnemar_p(only_a: int, only_b: int, both: int, neither: int) -> float:
    """Exact (binomial) McNemar p-value; 1.0 without discordant pairs, where the test has nothing to weigh.

    statsmodels 0.15 also gives 1.0 there; the guard keeps that independent of its version.
    """
    if only_a + only_b == 0:
        return 1.0
    from statsmodels.stats.contingency_tables import mcnemar

    return float(mcnemar([[both, only_a], [only_b, neither]], exact=True).pvalue)


def paired_difference(correct_a: ArrayLike, correct_b: ArrayLike, *, n_boot: int = 2000, seed: int = 0,
                      confidence: float = 0.95) -> PairedDifference:
    """Compare two models' accuracy on the same examples: difference, paired interval and exact McNemar test.

    Pairing matters: both models err on the hard examples, so the difference
    varies far less than two independent accuracies would suggest. Resample b
    draws the example indices `rng.integers(0, n, size=n)` of
    `np.random.default_rng(seed)` (as `bootstrap_interval`) and applies them
    to both models.

    Args:
        correct_a: Per-example correctness of model A (bool or 0/1).
        correct_b: Per-example correctness of model B on the same examples, in the same order.
        n_boot: Number of bootstrap resamples.
        seed: Seed of the resampling.
        confidence: Coverage of the interval.

    Returns:
        A `PairedDifference`.

    Example:
        >>> d = paired_difference([True] * 90 + [False] * 10, [True] * 70 + [False] * 30, n_boot=500)
        >>> round(d.difference, 2), d.significant
        (0.2, True)
    """
    alpha = _check_confidence(confidence)
    n_boot = _check_positive_int("n_boot", n_boot)
    a, b = _as_correct("correct_a", correct_a), _as_correct("correct_b", correct_b)
    n = _check_same_length("correct_a and correct_b", a, b)
    delta = a.astype(np.float64) - b.astype(np.float64)  # per example: +1 only A right, -1 only B right
    diffs = np.concatenate([delta[block].mean(1) for block in _resamples(n, n_boot, seed)])
    low, high = _percentile_interval(diffs, alpha)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    both, neither = int((a & b).sum()), int((~a & ~b).sum())
    return PairedDifference(n=n, accuracy_a=float(a.mean()), accuracy_b=float(b.mean()), difference=float(delta.mean()),
                            low=low, high=high, mcnemar_p=_mcnemar_p(only_a, only_b, both, neither),
                            only_a_correct=only_a, only_b_correct=only_b, confidence=confidence,
                            method=f"paired bootstrap ({n_boot} resamples over examples, seed {seed}); exact McNemar")


def paired_difference_over_seeds(correct_a: ArrayLike, correct_b: ArrayLike, *, n_boot: int = 2000, seed: int = 0,
                                 confidence: float = 0.95) -> PairedDifference:
    """`paired_difference` for models trained with several seeds: rows are seeds, columns the same examples.

    Each example's correctness is averaged over a model's seeds (a deterministic model, such as the
    probe, has identical rows), and the paired bootstrap resamples examples of those averages, so
    the interval covers the test examples' variation with the seeds' variation averaged in. The exact
    McNemar test needs one right/wrong per example and model: it compares the first seed of each.
    With one seed each this is `paired_difference` exactly.

    Args:
        correct_a: (seeds_a, examples) correctness of model A, bool or 0/1 (a 1-D array is one seed).
        correct_b: (seeds_b, examples) correctness of model B on the same examples.
        n_boot: Number of bootstrap resamples.
        seed: Seed of the resampling.
        confidence: Coverage of the interval.

    Example:
        >>> d = paired_difference_over_seeds([[1, 1, 0, 1]] * 2, [[1, 0, 0, 1], [1, 1, 0, 1]], n_boot=200)
        >>> d.difference
        0.125
    """
    a, b = (np.atleast_2d(np.asarray(x)) for x in (correct_a, correct_b))
    rows = [_as_correct(name, row) for name, arr in (("correct_a", a), ("correct_b", b)) for row in arr]
    a, b = np.array(rows[:len(a)]), np.array(rows[len(a):])
    if len(a) == 1 and len(b) == 1:
        return paired_difference(a[0], b[0], n_boot=n_boot, seed=seed, confidence=confidence)
    first = paired_difference(a[0], b[0], n_boot=1, seed=seed, confidence=confidence)
    alpha = _check_confidence(confidence)
    # Per example, in units of 1 / (seeds_a * seeds_b): integers, so resampled sums are exact and a difference of
    # exactly 0 stays 0 (float means of thirds summed to 8e-19 once, and read as "excludes 0").
    units = a.sum(0).astype(np.int64) * len(b) - b.sum(0).astype(np.int64) * len(a)
    scale = len(units) * len(a) * len(b)
    delta = units / (len(a) * len(b))
    diffs = np.concatenate([units[block].sum(1) / scale
                            for block in _resamples(len(units), _check_positive_int("n_boot", n_boot), seed)])
    low, high = _percentile_interval(diffs, alpha)
    return PairedDifference(n=len(delta), accuracy_a=float(a.mean()), accuracy_b=float(b.mean()),
                            difference=float(delta.mean()), low=low, high=high, mcnemar_p=first.mcnemar_p,
                            only_a_correct=first.only_a_correct, only_b_correct=first.only_b_correct,
                            confidence=confidence,
                            method=f"paired bootstrap ({n_boot} resamples over examples of the correctness averaged "
                                   f"over {len(a)} and {len(b)} seeds, seed {seed}); exact McNemar on the first seeds")


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
        return {"n": self.n, "k": self.k, "C": self.C, "accuracy": self.accuracy, "low": self.low, "high": self.high,
                "confidence": self.confidence, "fold_accuracies": list(self.fold_accuracies), "fold_mean": self.fold_mean,
                "fold_sd": self.fold_sd, "seed": self.seed, "classes": self.classes.tolist(),
                "method": f"stratified {self.k}-fold, standardised features, L2 logistic regression (C={self.C:g}), "
                          f"Wilson interval over out-of-fold predictions"}


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
    n = _check_positive_int("n_examples", n_examples, minimum=0)
    d = _check_positive_int("feature_dim", feature_dim, minimum=1)
    return 5 if n >= 2 and n * d <= MAX_CV_CELLS else 0


def _cv_folds(labels: np.ndarray, k: int) -> int:
    """k, reduced to the smallest class count so every fold holds every class; at least 2."""
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise UsageError(f"labels must hold at least 2 classes for a probe; got only {classes.tolist()}.")
    smallest = int(counts.min())
    if smallest < 2:
        rare = classes[counts < 2].tolist()
        raise UsageError(f"Cross-validation needs at least 2 examples of every class; classes {rare} have 1. "
                         "Add examples of them, or leave them out of the probe.")
    if smallest < k:
        logger.info("cross_validated_probe: %d folds instead of %d (the smallest class has %d examples).", smallest, k, smallest)
    return min(k, smallest)


def _check_probe_inputs(features: ArrayLike, labels: ArrayLike, k: int, C: float | None) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float64)
    y = _as_labels("labels", labels)
    _check_positive_int("k", k, minimum=2)
    if C is not None and not (_is_number(C) and math.isfinite(C) and C > 0):
        raise UsageError(f"C must be a finite number above 0, or None for {DEFAULT_PROBE_C}; got {C!r}.")
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise UsageError(f"features must be a finite (examples, dimension) array; got shape {x.shape}.")
    _check_same_length("features and labels", x, y)
    return x, y


def cross_validated_probe(features: ArrayLike, labels: ArrayLike, *, k: int = 5, seed: int = 0, C: float | None = None,
                          confidence: float = 0.95) -> CVProbe:
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

    _check_confidence(confidence)
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
    return CVProbe(n=len(y), k=k, C=c, accuracy=hits / len(y), low=low, high=high, fold_accuracies=tuple(fold_acc),
                   classes=classes, probabilities=probabilities, fold_of=fold_of, confidence=confidence, seed=seed)


def _fit_predict_fold(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, classes: np.ndarray, C: float) -> np.ndarray:
    """Probabilities of x_test, columns in `classes` order, from a probe fitted on the training folds only."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000)).fit(x_train, y_train)
    out = np.zeros((len(x_test), len(classes)))
    out[:, np.searchsorted(classes, model.classes_)] = model.predict_proba(x_test)
    return out
