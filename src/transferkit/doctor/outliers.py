"""Outliers: examples far from every neighbour of their own class (kNN cosine distance, robust z-scores).

The search works in blocks, so memory is O(block * n) and never the full n x n matrix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from transferkit.doctor.pairs import check_search_settings, unit_rows
from transferkit.errors import UsageError

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True, kw_only=True)
class Outlier:
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
    check_search_settings(block=block)
    unit = unit_rows(features, "features")
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
        sims = unit[start : start + block] @ unit.T
        rows = np.arange(len(sims))
        sims[rows, rows + start] = -np.inf  # not its own neighbour
        nearest = -np.partition(-sims, k - 1, axis=1)[:, :k]  # the k largest similarities, unordered
        out[start : start + block] = 1 - nearest.mean(axis=1)
    return np.clip(out, 0, 2)  # rounding can leave a duplicate at -1e-16


def outliers(features: np.ndarray, labels: np.ndarray, *, k: int = 5, z: float = OUTLIER_Z, block: int = 1024) -> list[Outlier]:
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
    return [Outlier(index=int(i), score=float(scores[i]), z=float(zs[i])) for i in flagged]
