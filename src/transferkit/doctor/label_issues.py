"""Label issues: examples whose given label the model's out-of-sample probabilities contradict.

Confident learning (Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels",
JAIR 70, 2021), from arrays: labels and out-of-fold probabilities in, a LabelIssues record out.

Confident learning follows cleanlab 2.x's `cleanlab.filter.find_label_issues(
labels, pred_probs, filter_by="prune_by_noise_rate")` convention by convention
(cleanlab is AGPL-3.0: it is the test suite's reference, and none of its code
is here), down to ties: equal margins, self-confidences and rounding remainders
are ordered by NumPy's default sort, as cleanlab orders them, and the
calibration's floating-point arithmetic runs in the same order. The result is
the same flagged set, in the same order, as cleanlab's on the same machine. The
price is cleanlab's: NumPy's default sort is not stable (with AVX-512 it uses
sorting networks), so on exact ties (rounded or duplicated probabilities) which
of two tied examples is flagged may differ between CPUs. A fixed tie rule would
make the output portable, but changed the flagged set by one or two examples on
4 to 13 of 40 test fixtures (depending on the rule).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from transferkit.errors import UsageError

logger = logging.getLogger(__name__)

# --- confident learning -------------------------------------------------------------------------

# Probabilities within this of a threshold, or of the top probability, count as equal: the
# probabilities come from float32 softmaxes, whose rounding error is of order 1e-7.
PROB_SLACK = 1e-6
# A class's threshold is at least twice the slack, so a class the model never predicts
# (mean self-confidence ~0) does not make every example "confidently" of that class.
MIN_THRESHOLD = 2 * PROB_SLACK
# Threshold of a class with no labelled example: above any probability, so nothing is counted in it.
ABSENT_CLASS_THRESHOLD = 2.0
# Pruning leaves at least this many examples with each given label (cleanlab's min_examples_per_class),
# and a class with no more than this many examples is not pruned at all.
MIN_KEPT_PER_CLASS = 1


@dataclass(frozen=True, eq=False)
class LabelIssues:
    """Examples whose given label is likely wrong, and the noise estimate behind them.

    Attributes:
        indices: (m,) flagged example indices, most suspicious (lowest self-confidence) first.
        suggested_labels: (m,) the model's top class for each flagged example.
        self_confidence: (m,) the predicted probability of the given label for each flagged example.
        confident_joint: (K, K) calibrated counts; entry [i, j] estimates how many examples are
            labelled i whose true class is j. Rows sum to the label counts.
        noise_matrix: (K, K) estimated P(given label = i | true class = j); columns sum to 1
            (a column of zeros for a class no example is estimated to belong to).
        thresholds: (K,) per-class thresholds t_j, the mean predicted probability of class j
            over the examples labelled j.
    """

    indices: np.ndarray
    suggested_labels: np.ndarray
    self_confidence: np.ndarray
    confident_joint: np.ndarray
    noise_matrix: np.ndarray
    thresholds: np.ndarray


def find_label_issues(labels: np.ndarray, pred_probs: np.ndarray) -> LabelIssues:
    """Flag examples whose label the model contradicts, by confident learning with pruning by noise rate.

    `pred_probs` must be out-of-sample: row k from a model that never saw
    example k (cross-validation, e.g. scikit-learn's
    `cross_val_predict(..., method="predict_proba")`). In-sample probabilities
    have memorised the noisy labels and flag almost nothing.

    The steps (Northcutt et al. 2021, Sections 3.1-3.2):

    1. Thresholds t_j: the mean p_j over the examples labelled j.
    2. Confident joint C[i, j]: examples labelled i with p_j >= t_j; one with
       several such classes goes to its overall argmax (cleanlab's rule; the
       paper's is the argmax among those classes); diagonal entries are at least
       1; rows are then scaled to the label counts and rounded, keeping row sums.
    3. Prune by noise rate: with given label i, for each j != i, flag the
       C[i, j] examples with the largest margin p_j - p_i, after moving counts
       onto the diagonal so that at least one example per class stays unflagged
       (classes with a single example are never pruned).
    4. Unflag examples whose given label is (within 1e-6 of) the top prediction.
    5. Rank by self-confidence p_given, lowest first.

    Args:
        labels: (n,) integer labels in [0, K).
        pred_probs: (n, K) out-of-sample predicted probabilities; rows sum to 1.

    Returns:
        The LabelIssues.

    Raises:
        UsageError: shapes disagree, labels outside [0, K), fewer than 2 classes, or rows that
            are not probabilities (logits passed by mistake).

    Example:
        >>> probs = np.array([[.9, .1], [.8, .2], [.7, .3], [.2, .8], [.1, .9], [.8, .2], [.3, .7], [.25, .75]])
        >>> labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])  # example 5 looks like a 0
        >>> issues = find_label_issues(labels, probs)
        >>> issues.indices, issues.suggested_labels
        (array([5]), array([0]))
    """
    labels, pred_probs = _check_label_inputs(labels, pred_probs)
    thresholds = confident_thresholds(labels, pred_probs)
    joint = calibrated_confident_joint(labels, pred_probs, thresholds)
    flagged = _prune_by_noise_rate(labels, pred_probs, _prune_counts(joint))
    flagged &= ~_given_label_is_top(labels, pred_probs)
    indices = np.flatnonzero(flagged)
    self_confidence = pred_probs[indices, labels[indices]]
    order = np.argsort(self_confidence)  # default sort: ties as cleanlab (module docstring)
    indices = indices[order]
    col_sums = joint.sum(axis=0, keepdims=True)
    return LabelIssues(
        indices=indices,
        suggested_labels=pred_probs[indices].argmax(axis=1),
        self_confidence=self_confidence[order],
        confident_joint=joint,
        noise_matrix=np.divide(joint, col_sums, out=np.zeros(joint.shape), where=col_sums > 0),
        thresholds=thresholds,
    )


def confident_thresholds(labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray:
    """Per-class thresholds t_j: mean predicted probability of class j over the examples labelled j.

    Args:
        labels: (n,) integer labels in [0, K).
        pred_probs: (n, K) predicted probabilities.

    Returns:
        (K,) thresholds, at least MIN_THRESHOLD; ABSENT_CLASS_THRESHOLD for a class with no example.

    Example:
        >>> confident_thresholds(np.array([0, 0, 1]), np.array([[0.9, 0.1], [0.7, 0.3], [0.4, 0.6]]))
        array([0.8, 0.6])
    """
    thresholds = np.full(pred_probs.shape[1], ABSENT_CLASS_THRESHOLD)
    for j in np.unique(labels):
        thresholds[j] = pred_probs[labels == j, j].mean()
    return np.maximum(thresholds, MIN_THRESHOLD)


def calibrated_confident_joint(labels: np.ndarray, pred_probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The confident joint C[given i, true j], calibrated so that row i sums to the count of label i.

    Args:
        labels: (n,) integer labels in [0, K).
        pred_probs: (n, K) predicted probabilities.
        thresholds: (K,) from `confident_thresholds`.

    Returns:
        (K, K) integer counts.

    Example:
        >>> probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.4, 0.6], [0.2, 0.8]])
        >>> labels = np.array([0, 0, 0, 1])
        >>> calibrated_confident_joint(labels, probs, confident_thresholds(labels, probs))
        array([[3, 0],
               [0, 1]])
    """
    above = pred_probs >= thresholds - PROB_SLACK
    n_above = above.sum(axis=1)
    # One class above its threshold: that class. Several: the overall argmax (which need not be one of them).
    guess = np.where(n_above > 1, pred_probs.argmax(axis=1), above.argmax(axis=1))
    counted = n_above > 0  # an example above no threshold is confident of nothing and is not counted
    n_classes = pred_probs.shape[1]
    joint = np.zeros((n_classes, n_classes), dtype=np.int64, order="F")  # column-major: see _calibrate
    np.add.at(joint, (labels[counted], guess[counted]), 1)
    np.fill_diagonal(joint, np.maximum(joint.diagonal(), 1))  # every class keeps one confident example
    return _calibrate(joint, np.bincount(labels, minlength=n_classes))


def _calibrate(joint: np.ndarray, label_counts: np.ndarray) -> np.ndarray:
    """Scale each row of counts to its label count, then round keeping the row sums.

    Row i becomes joint[i] * label_counts[i] / joint[i].sum(), the whole is then rescaled to sum to
    n (a no-op in exact arithmetic, and one ulp of difference in floating point), and each row is
    rounded half to even with the rounding error moved onto the entries with the largest (or
    smallest) remainders. The arithmetic runs in the same order as cleanlab's and the remainders
    are ordered by NumPy's default sort, as cleanlab's are: many remainders are equal in exact
    arithmetic (1 * 56 / 42 and 40 * 56 / 42 both end in 1/3), and which entry gets the extra unit
    is then decided by the last bits. Splitting such ties by a fixed rule instead (exact integer
    remainders, lower or higher column first) changed the flagged set by one or two examples on
    4 to 13 of 40 Gaussian-blob fixtures (3-6 classes, 200-2150 examples); this order agreed on all 40. The joint is column-major, as
    cleanlab's (a transposed confusion matrix) is, so that the total is summed in the same order.
    """
    scaled = (joint.T / joint.sum(axis=1) * label_counts).T  # row sums >= 1: the diagonal is at least 1
    scaled = scaled / scaled.sum() * label_counts.sum()
    rounded = np.round(scaled)
    remainders = scaled - rounded
    for i in range(len(scaled)):
        missing = int(np.round(scaled[i].sum()) - rounded[i].sum())  # |missing| <= K / 2: one pass suffices
        order = np.argsort(remainders[i])  # ascending; default (unstable) sort on purpose, see above
        if missing > 0:
            rounded[i, order[::-1][:missing]] += 1
        elif missing < 0:
            rounded[i, order[:-missing]] -= 1
    return rounded.astype(np.int64)


def _prune_counts(joint: np.ndarray) -> np.ndarray:
    """How many examples to flag for each (given i, true j != i): the joint with each diagonal raised to >= 1.

    What a raised diagonal entry gains is taken in equal parts from the row's nonzero entries,
    counting them as (nonzero entries in the row - 1, at least 1) (cleanlab's rule: exact when
    the diagonal was nonzero), then clipped at 0 and truncated to integers.
    """
    diagonal = joint.diagonal()
    raised = np.maximum(diagonal, MIN_KEPT_PER_CLASS)
    shares = np.maximum(np.count_nonzero(joint, axis=1) - 1, 1)
    counts = np.maximum(joint - ((raised - diagonal) / shares)[:, None], 0)
    np.fill_diagonal(counts, raised)
    return np.floor(counts).astype(np.int64)


def _prune_by_noise_rate(labels: np.ndarray, pred_probs: np.ndarray, prune: np.ndarray) -> np.ndarray:
    """Mask of examples flagged: for given label i and true j, the prune[i, j] largest margins p_j - p_i."""
    flagged = np.zeros(len(labels), dtype=bool)
    for i in range(prune.shape[0]):
        members = np.flatnonzero(labels == i)
        if len(members) <= MIN_KEPT_PER_CLASS:
            continue  # too few examples to remove any and keep one
        probs = pred_probs[members]
        for j in np.flatnonzero(prune[i] > 0):
            if j == i:
                continue
            margin = probs[:, j] - probs[:, i]
            flagged[members[np.argsort(-margin)[: prune[i, j]]]] = True  # default sort: ties as cleanlab
    return flagged


def _given_label_is_top(labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray:
    """Whether the given label is the top prediction once it is favoured by PROB_SLACK (first argmax on ties)."""
    favoured = pred_probs.copy()
    favoured[np.arange(len(labels)), labels] += PROB_SLACK
    return favoured.argmax(axis=1) == labels


def _check_label_inputs(labels: np.ndarray, pred_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate find_label_issues's arguments; return int64 labels and floating-point probabilities."""
    labels = np.asarray(labels)
    pred_probs = np.asarray(pred_probs)
    if not np.issubdtype(pred_probs.dtype, np.floating):
        pred_probs = pred_probs.astype(np.float64)  # float32 stays float32: margins and ties as the caller computed them
    if pred_probs.ndim != 2 or pred_probs.shape[1] < 2:
        raise UsageError(f"pred_probs must be 2-D (n examples x K >= 2 classes); got shape {pred_probs.shape}.")
    if labels.ndim != 1 or len(labels) != len(pred_probs):
        raise UsageError(f"labels must be 1-D with one entry per row of pred_probs ({len(pred_probs)}); got shape {labels.shape}.")
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.bool_)):
        raise UsageError(
            f"labels must be integer class indices in [0, {pred_probs.shape[1]}); got dtype {labels.dtype}. "
            "Map class names to the column order of pred_probs first."
        )
    labels = labels.astype(np.int64)
    bad = (labels < 0) | (labels >= pred_probs.shape[1])
    if bad.any():
        raise UsageError(
            f"labels must be in [0, {pred_probs.shape[1]}) (the columns of pred_probs); got {labels[bad][0]} "
            f"at index {int(np.argmax(bad))}. Pass probabilities for every class."
        )
    if len(np.unique(labels)) < 2:
        raise UsageError(f"labels must contain at least 2 classes; got only {np.unique(labels).tolist()}.")
    if not np.isfinite(pred_probs).all() or (pred_probs < 0).any() or (pred_probs > 1 + PROB_SLACK).any():
        raise UsageError(
            "pred_probs must be probabilities in [0, 1]; got a value outside (or NaN). If they are logits, apply a softmax first."
        )
    sums = pred_probs.sum(axis=1)
    if not np.allclose(sums, 1, atol=1e-3):
        row = int(np.argmax(np.abs(sums - 1)))
        raise UsageError(
            f"each row of pred_probs must sum to 1; row {row} sums to {sums[row]:.4f}. "
            "Apply a softmax to logits, or divide each row by its sum."
        )
    return labels, pred_probs
