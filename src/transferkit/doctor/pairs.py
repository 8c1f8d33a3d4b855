"""Near-duplicates and leakage: examples whose feature vectors are nearly parallel, classified as train/test
leakage, label conflicts or plain duplicates.

The search works in blocks, so memory is O(block^2) and never the full n x n matrix.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from transferkit.errors import UsageError

logger = logging.getLogger(__name__)

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


def near_duplicates(
    features_a: np.ndarray, features_b: np.ndarray | None = None, *, threshold: float = DUPLICATE_THRESHOLD, block: int = 1024
) -> list[SimilarPair]:
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
    check_search_settings(threshold=threshold, block=block)
    a = unit_rows(features_a, "features_a")
    b = a if features_b is None else unit_rows(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise UsageError(
            f"features_a and features_b must have the same width; got {a.shape[1]} and {b.shape[1]}. "
            "Extract both sets with the same backbone."
        )
    within = features_b is None
    tiles = [
        _pairs_in_tile(a, b, i0, j0, block, threshold, within)
        for i0 in range(0, len(a), block)
        for j0 in range(i0 if within else 0, len(b), block)
    ]  # within one set: the upper triangle of tiles
    i = np.concatenate([tile[0] for tile in tiles] + [np.zeros(0, dtype=np.int64)])
    j = np.concatenate([tile[1] for tile in tiles] + [np.zeros(0, dtype=np.int64)])
    cos = np.concatenate([tile[2] for tile in tiles] + [np.zeros(0)])
    order = np.lexsort((j, i, -cos))
    return [SimilarPair(int(i[k]), int(j[k]), float(cos[k])) for k in order]


def _pairs_in_tile(
    a: np.ndarray, b: np.ndarray, i0: int, j0: int, block: int, threshold: float, within: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, cosine) arrays of the pairs at or above threshold in the tile a[i0:i0+block] x b[j0:j0+block]."""
    sims = a[i0 : i0 + block] @ b[j0 : j0 + block].T
    ii, jj = np.nonzero(sims >= threshold)
    if within:  # a diagonal tile holds each pair twice, and the self pairs
        keep = ii + i0 < jj + j0
        ii, jj = ii[keep], jj[keep]
    return ii + i0, jj + j0, sims[ii, jj].astype(np.float64)


def classify_pairs(
    pairs: Sequence[SimilarPair],
    splits_a: Sequence[str],
    labels_a: Sequence | np.ndarray,
    *,
    splits_b: Sequence[str] | None = None,
    labels_b: Sequence | np.ndarray | None = None,
) -> list[PairFinding]:
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
        raise UsageError(
            "classify_pairs needs both splits_b and labels_b (pairs across two sets) or neither (pairs "
            f"within one set); got splits_b={'set' if splits_b is not None else None}, "
            f"labels_b={'set' if labels_b is not None else None}."
        )
    splits_j, labels_j = (splits_a, labels_a) if splits_b is None or labels_b is None else (splits_b, labels_b)
    for name, seq, other in (("labels_a", labels_a, splits_a), ("labels_b", labels_j, splits_j)):
        if len(seq) != len(other):
            raise UsageError(f"{name} has {len(seq)} entries but its splits have {len(other)}; give one of each per example.")
    findings = []
    for p in pairs:
        if not (0 <= p.i < len(splits_a) and 0 <= p.j < len(splits_j)):
            raise UsageError(
                f"pair ({p.i}, {p.j}) is out of range for sets of {len(splits_a)} and {len(splits_j)} examples. "
                "Pass the splits and labels of the features given to near_duplicates."
            )
        si, sj, li, lj = str(splits_a[p.i]), str(splits_j[p.j]), _plain(labels_a[p.i]), _plain(labels_j[p.j])
        kind = "leakage" if si != sj else ("conflict" if li != lj else "duplicate")
        findings.append(PairFinding(p.i, p.j, p.cosine, kind, si, sj, li, lj))
    return findings


def _plain(value: object) -> object:
    """A NumPy scalar as the Python value it holds (for reports and JSON); anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def unit_rows(features: np.ndarray, name: str) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), in float32 for float32 input and float64 otherwise."""
    x = np.asarray(features)
    if x.ndim != 2 or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise UsageError(f"{name} must be a 2-D numeric array (n examples x d dimensions); got shape {x.shape}, dtype {x.dtype}.")
    x = x.astype(np.result_type(x.dtype, np.float32) if np.issubdtype(x.dtype, np.floating) else np.float64, copy=False)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise UsageError(
            f"{name} has NaN or infinite values in {int(bad.sum())} rows (first: row {int(np.argmax(bad))}). "
            "Drop those examples or fix the feature extraction."
        )
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def check_search_settings(*, threshold: float = 0.0, block: int = 1) -> None:
    """Validate the settings of the blocked similarity searches before any data is read."""
    if not (isinstance(threshold, (int, float, np.number)) and -1 <= threshold <= 1):
        raise UsageError(
            f"threshold must be a cosine similarity in [-1, 1]; got {threshold!r}. The default, {DUPLICATE_THRESHOLD}, finds near-copies."
        )
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise UsageError(
            f"block must be an integer >= 1 (rows per step; memory grows with its square); got {block!r}. 1024 suits most machines."
        )
