"""The data doctor's findings, computed from arrays: label issues, near-duplicates and leakage, outliers.

Three checks a user should run before trusting an accuracy number:

* `find_label_issues`: examples whose given label the model's out-of-sample
  probabilities contradict (confident learning, Northcutt, Jiang and Chuang,
  "Confident Learning: Estimating Uncertainty in Dataset Labels", JAIR 70, 2021).
* `near_duplicates` and `classify_pairs`: examples whose feature vectors are
  nearly parallel, labelled as train/test leakage, label conflicts or plain
  duplicates.
* `outlier_scores` and `outliers`: examples far from every neighbour of their
  own class.

The functions take NumPy arrays and return dataclasses and lists of named
tuples; reading data, extracting features and rendering are the caller's. The
similarity searches work in blocks, so memory is O(block^2) (O(block * n) for
outliers) and never the full n x n matrix.

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

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
    return LabelIssues(indices=indices, suggested_labels=pred_probs[indices].argmax(axis=1),
                       self_confidence=self_confidence[order], confident_joint=joint,
                       noise_matrix=np.divide(joint, col_sums, out=np.zeros(joint.shape), where=col_sums > 0),
                       thresholds=thresholds)


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
        raise UsageError(f"labels must be integer class indices in [0, {pred_probs.shape[1]}); got dtype {labels.dtype}. "
                         "Map class names to the column order of pred_probs first.")
    labels = labels.astype(np.int64)
    bad = (labels < 0) | (labels >= pred_probs.shape[1])
    if bad.any():
        raise UsageError(f"labels must be in [0, {pred_probs.shape[1]}) (the columns of pred_probs); got {labels[bad][0]} "
                         f"at index {int(np.argmax(bad))}. Pass probabilities for every class.")
    if len(np.unique(labels)) < 2:
        raise UsageError(f"labels must contain at least 2 classes; got only {np.unique(labels).tolist()}.")
    if not np.isfinite(pred_probs).all() or (pred_probs < 0).any() or (pred_probs > 1 + PROB_SLACK).any():
        raise UsageError("pred_probs must be probabilities in [0, 1]; got a value outside (or NaN). "
                         "If they are logits, apply a softmax first.")
    sums = pred_probs.sum(axis=1)
    if not np.allclose(sums, 1, atol=1e-3):
        row = int(np.argmax(np.abs(sums - 1)))
        raise UsageError(f"each row of pred_probs must sum to 1; row {row} sums to {sums[row]:.4f}. "
                         "Apply a softmax to logits, or divide each row by its sum.")
    return labels, pred_probs


# --- near-duplicates and leakage --------------------------------------------------------------

# Cosine similarity at or above which two feature vectors count as near-duplicates. For unit
# vectors, cosine 0.95 is a Euclidean distance of sqrt(2 * (1 - 0.95)) = 0.32, against sqrt(2) =
# 1.41 for orthogonal ones: the pair differs in about 5% of its direction. It is meant to catch
# re-encoded, resized or lightly cropped copies of an example while leaving distinct examples of
# the same class below it. Where that boundary lies depends on the backbone (post-ReLU features,
# all positive, are more similar to each other than centred ones) and has not been measured here,
# so it is a parameter and every finding carries its similarity for the user to sort and cut. A
# high default errs towards fewer, surer findings: a false leak report costs the user's trust in
# every other finding.
DUPLICATE_THRESHOLD = 0.95

# The kinds classify_pairs assigns, most serious first.
PAIR_KINDS = ("leakage", "conflict", "duplicate")


class SimilarPair(NamedTuple):
    """Two examples whose feature vectors have cosine similarity at or above the threshold.

    Attributes:
        i: index in the first set.
        j: index in the second set (the first set again, with i < j, when there is one set).
        cosine: their cosine similarity, in [-1, 1].
    """

    i: int
    j: int
    cosine: float


class PairFinding(NamedTuple):
    """A near-duplicate pair with what it means for the data.

    Attributes:
        i, j, cosine: as in SimilarPair.
        kind: "leakage" (the two are in different splits: an evaluation example was, in effect,
            trained on), "conflict" (same split, different labels: at least one label is wrong or
            the classes overlap) or "duplicate" (same split, same label: redundant weight).
        split_i, split_j: the split of each example.
        label_i, label_j: the label of each example.
    """

    i: int
    j: int
    cosine: float
    kind: str
    split_i: str
    split_j: str
    label_i: object
    label_j: object


def near_duplicates(features_a: np.ndarray, features_b: np.ndarray | None = None, *,
                    threshold: float = DUPLICATE_THRESHOLD, block: int = 1024) -> list[SimilarPair]:
    """Pairs of examples whose feature vectors have cosine similarity >= threshold.

    With one set, every pair i < j within it (no example is paired with
    itself); with two, every pair (i in a, j in b). The similarity matrix is
    computed `block` x `block` at a time, so memory is O(block^2) besides the
    normalised copies of the features, and time O(n m d). A zero vector has
    similarity 0 with everything (its direction is undefined).

    Args:
        features_a: (n, d) feature vectors.
        features_b: (m, d) feature vectors of a second set, or None for pairs within features_a.
        threshold: the cosine similarity, in [-1, 1], at and above which a pair is reported;
            see DUPLICATE_THRESHOLD for the default.
        block: rows and columns of the similarity matrix computed at once (>= 1).

    Returns:
        The pairs, most similar first (ties by i, then j).

    Raises:
        UsageError: a bad threshold or block, features that are not 2-D and finite, or sets of different widths.

    Example:
        >>> x = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.01]])
        >>> [(p.i, p.j, round(p.cosine, 4)) for p in near_duplicates(x)]
        [(0, 2, 1.0)]
    """
    _check_search_settings(threshold=threshold, block=block)
    a = _unit_rows(features_a, "features_a")
    b = a if features_b is None else _unit_rows(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise UsageError(f"features_a and features_b must have the same width; got {a.shape[1]} and {b.shape[1]}. "
                         "Extract both sets with the same backbone.")
    within = features_b is None
    tiles = [_pairs_in_tile(a, b, i0, j0, block, threshold, within)
             for i0 in range(0, len(a), block)
             for j0 in range(i0 if within else 0, len(b), block)]  # within one set: the upper triangle of tiles
    i = np.concatenate([tile[0] for tile in tiles] + [np.zeros(0, dtype=np.int64)])
    j = np.concatenate([tile[1] for tile in tiles] + [np.zeros(0, dtype=np.int64)])
    cos = np.concatenate([tile[2] for tile in tiles] + [np.zeros(0)])
    order = np.lexsort((j, i, -cos))
    return [SimilarPair(int(i[k]), int(j[k]), float(cos[k])) for k in order]


def _pairs_in_tile(a: np.ndarray, b: np.ndarray, i0: int, j0: int, block: int, threshold: float,
                   within: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, cosine) arrays of the pairs at or above threshold in the tile a[i0:i0+block] x b[j0:j0+block]."""
    sims = a[i0:i0 + block] @ b[j0:j0 + block].T
    ii, jj = np.nonzero(sims >= threshold)
    if within:  # a diagonal tile holds each pair twice, and the self pairs
        keep = ii + i0 < jj + j0
        ii, jj = ii[keep], jj[keep]
    return ii + i0, jj + j0, sims[ii, jj].astype(np.float64)


def classify_pairs(pairs: Sequence[SimilarPair], splits_a: Sequence[str], labels_a: Sequence, *,
                   splits_b: Sequence[str] | None = None, labels_b: Sequence | None = None) -> list[PairFinding]:
    """Say what each near-duplicate pair means: leakage, a label conflict or a plain duplicate.

    A pair in different splits is "leakage", whatever its labels (an evaluation
    score is inflated by an example the model, in effect, trained on; a
    validation/test pair also means the two evaluations are not independent).
    Within one split, different labels are a "conflict" and equal ones a
    "duplicate". Leakage is reported first because it invalidates the
    evaluation; a leaked pair whose labels differ has label_i != label_j.

    Args:
        pairs: from `near_duplicates`.
        splits_a: the split name ("train", "val", "test", ...) of each example of the first set.
        labels_a: the label of each example of the first set.
        splits_b: the same for the second set when `near_duplicates` was given two sets; None with one.
        labels_b: as splits_b, for labels.

    Returns:
        One PairFinding per pair, in the order of `pairs`.

    Raises:
        UsageError: only one of splits_b / labels_b given, lengths that differ, or a pair index out of range.

    Example:
        >>> pairs = [SimilarPair(0, 1, 0.99), SimilarPair(1, 2, 0.97)]
        >>> [f.kind for f in classify_pairs(pairs, ["train", "test", "test"], [0, 0, 1])]
        ['leakage', 'conflict']
    """
    if (splits_b is None) != (labels_b is None):
        raise UsageError("classify_pairs needs both splits_b and labels_b (pairs across two sets) or neither (pairs "
                         f"within one set); got splits_b={'set' if splits_b is not None else None}, "
                         f"labels_b={'set' if labels_b is not None else None}.")
    splits_b, labels_b = (splits_a, labels_a) if splits_b is None else (splits_b, labels_b)
    for name, seq, other in (("labels_a", labels_a, splits_a), ("labels_b", labels_b, splits_b)):
        if len(seq) != len(other):
            raise UsageError(f"{name} has {len(seq)} entries but its splits have {len(other)}; give one of each per example.")
    findings = []
    for p in pairs:
        if not (0 <= p.i < len(splits_a) and 0 <= p.j < len(splits_b)):
            raise UsageError(f"pair ({p.i}, {p.j}) is out of range for sets of {len(splits_a)} and {len(splits_b)} examples. "
                             "Pass the splits and labels of the features given to near_duplicates.")
        si, sj, li, lj = str(splits_a[p.i]), str(splits_b[p.j]), _plain(labels_a[p.i]), _plain(labels_b[p.j])
        kind = "leakage" if si != sj else ("conflict" if li != lj else "duplicate")
        findings.append(PairFinding(p.i, p.j, p.cosine, kind, si, sj, li, lj))
    return findings


def _plain(value: object) -> object:
    """A NumPy scalar as the Python value it holds (for reports and JSON); anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


# --- outliers ---------------------------------------------------------------------------------

# Flag rule: a modified z-score above 3.5 (Iglewicz and Hoaglin, "How to Detect and Handle
# Outliers", ASQC 1993): (x - median) / (1.4826 * MAD) > 3.5, where 1.4826 * MAD estimates the
# standard deviation of normal data without being moved by the outliers themselves. The rule
# assumes a roughly symmetric x, and distances are not: a cosine distance grows with the square
# of the angle, so x is the log of the score. On simulated Gaussian classes with no outlier
# (4 classes x 300, k=5, three noise levels) the log rule flagged 4-5% of examples in 2-D and
# <= 0.2% from 8 to 768 dimensions; the same rule on the raw scores flagged up to 23% in 2-D and 4% in 8-D.
OUTLIER_Z = 3.5
# Added to scores before the log: float32 cosine similarities resolve ~1e-7, so smaller distances
# are indistinguishable from 0 (an exact duplicate), which must not become log 0 = -inf.
LOG_FLOOR = 1e-6
MAD_TO_SD = 1.4826
# When more than half the scores are equal the MAD is 0; Iglewicz and Hoaglin then scale the
# mean absolute deviation instead (1.2533 = sqrt(pi / 2), its ratio to the sd of normal data).
MEAN_AD_TO_SD = 1.2533


class Outlier(NamedTuple):
    """An example far from every neighbour of its own class.

    Attributes:
        index: the example.
        score: mean cosine distance (1 - cosine similarity, in [0, 2]) to its k nearest same-class neighbours.
        z: the modified z-score of log(score) among all examples' (see OUTLIER_Z).
    """

    index: int
    score: float
    z: float


def outlier_scores(features: np.ndarray, labels: np.ndarray, *, k: int = 5, block: int = 1024) -> np.ndarray:
    """Mean cosine distance from each example to its k nearest neighbours with the same label.

    A class with m <= k examples uses its m - 1 others; an example alone in its
    class has no neighbours and gets NaN. Computed per class, `block` rows at a
    time: memory O(block * m) for a class of m examples, never m x m.

    Args:
        features: (n, d) feature vectors.
        labels: (n,) labels (any type numpy can compare).
        k: neighbours to average over (>= 1).
        block: rows of the similarity matrix computed at once (>= 1).

    Returns:
        (n,) scores in [0, 2]; NaN for an example alone in its class.

    Example:
        >>> x = np.array([[1.0, 0.0], [1.0, 0.1], [1.0, -0.1], [0.0, 1.0]])
        >>> outlier_scores(x, np.zeros(4, dtype=int), k=2).round(2)
        array([0.  , 0.01, 0.01, 0.95])
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UsageError(f"k must be an integer >= 1 (neighbours per example); got {k!r}. 5 is a common choice.")
    _check_search_settings(block=block)
    unit = _unit_rows(features, "features")
    labels = np.asarray(labels)
    if labels.shape != (len(unit),):
        raise UsageError(f"labels must be 1-D with one entry per row of features ({len(unit)}); got shape {labels.shape}.")
    scores = np.full(len(unit), np.nan)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) > 1:
            scores[members] = _class_scores(unit[members], min(k, len(members) - 1), block)
    return scores


def _class_scores(unit: np.ndarray, k: int, block: int) -> np.ndarray:
    """Mean cosine distance of each row of one class to its k nearest other rows of that class."""
    out = np.empty(len(unit))
    for start in range(0, len(unit), block):
        sims = unit[start:start + block] @ unit.T
        rows = np.arange(len(sims))
        sims[rows, rows + start] = -np.inf  # not its own neighbour
        nearest = -np.partition(-sims, k - 1, axis=1)[:, :k]  # the k largest similarities, unordered
        out[start:start + block] = 1 - nearest.mean(axis=1)
    return np.clip(out, 0, 2)  # rounding can leave a duplicate at -1e-16


def outliers(features: np.ndarray, labels: np.ndarray, *, k: int = 5, z: float = OUTLIER_Z,
             block: int = 1024) -> list[Outlier]:
    """Examples far from every neighbour of their own class, by a robust threshold on `outlier_scores`.

    An example is flagged when the modified z-score of its log score over the
    whole data set, (x - median) / (1.4826 * MAD) with x = log(score + 1e-6),
    exceeds `z` (Iglewicz and Hoaglin, 1993: 3.5; the log makes the skewed
    distances roughly symmetric, see OUTLIER_Z). Unlike a quantile rule, which
    flags a fixed fraction of every data set, clean or not, this flags nothing
    when no score stands out. The threshold is one for the whole data set, so
    a class much more varied than the others has more of its examples flagged;
    an example alone in its class is never flagged (no neighbour to be far from).

    Args:
        features: (n, d) feature vectors.
        labels: (n,) labels.
        k: neighbours to average over (>= 1).
        z: modified z-score above which an example is flagged (> 0).
        block: rows of the similarity matrix computed at once (>= 1).

    Returns:
        The flagged examples, highest score first.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = np.vstack([np.eye(8)[0] + 0.05 * rng.normal(size=(60, 8)), [np.eye(8)[1]]])
        >>> [o.index for o in outliers(x, np.zeros(61, dtype=int))]
        [60]
    """
    if isinstance(z, bool) or not (isinstance(z, (int, float, np.number)) and z > 0):
        raise UsageError(f"z must be a number > 0 (a modified z-score); got {z!r}. {OUTLIER_Z} is the usual choice.")
    scores = outlier_scores(features, labels, k=k, block=block)
    logs = np.log(scores + LOG_FLOOR)
    scored = logs[np.isfinite(logs)]  # NaN: alone in its class
    if len(scored) == 0:
        return []
    median = np.median(scored)
    spread = MAD_TO_SD * np.median(np.abs(scored - median)) or MEAN_AD_TO_SD * np.mean(np.abs(scored - median))
    if spread == 0:
        return []  # every score equal: nothing stands out
    zs = (logs - median) / spread
    flagged = np.flatnonzero(np.nan_to_num(zs, nan=-np.inf) > z)
    flagged = flagged[np.argsort(-scores[flagged], kind="stable")]
    return [Outlier(int(i), float(scores[i]), float(zs[i])) for i in flagged]


def _unit_rows(features: np.ndarray, name: str) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), in float32 for float32 input and float64 otherwise."""
    x = np.asarray(features)
    if x.ndim != 2 or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise UsageError(f"{name} must be a 2-D numeric array (n examples x d dimensions); got shape {x.shape}, dtype {x.dtype}.")
    x = x.astype(np.result_type(x.dtype, np.float32) if np.issubdtype(x.dtype, np.floating) else np.float64, copy=False)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise UsageError(f"{name} has NaN or infinite values in {int(bad.sum())} rows (first: row {int(np.argmax(bad))}). "
                         "Drop those examples or fix the feature extraction.")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _check_search_settings(*, threshold: float = 0.0, block: int = 1) -> None:
    """Validate the settings of the blocked similarity searches before any data is read."""
    if not (isinstance(threshold, (int, float, np.number)) and -1 <= threshold <= 1):
        raise UsageError(f"threshold must be a cosine similarity in [-1, 1]; got {threshold!r}. "
                         f"The default, {DUPLICATE_THRESHOLD}, finds near-copies.")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise UsageError(f"block must be an integer >= 1 (rows per step; memory grows with its square); got {block!r}. "
                         "1024 suits most machines.")
