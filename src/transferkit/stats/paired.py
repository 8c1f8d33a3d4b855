"""Paired comparisons of two models on the same examples: the paired bootstrap difference and McNemar's exact test,
over one seed or several. A sentence that names a winner is backed by one of these.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
from numpy.typing import ArrayLike

from transferkit.stats.checks import as_correct, check_confidence, check_positive_int, check_same_length
from transferkit.stats.intervals import percentile_interval, resamples

logger = logging.getLogger(__name__)


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


def paired_difference(
    correct_a: ArrayLike, correct_b: ArrayLike, *, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95
) -> PairedDifference:
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
    alpha = check_confidence(confidence)
    n_boot = check_positive_int("n_boot", n_boot)
    a, b = as_correct("correct_a", correct_a), as_correct("correct_b", correct_b)
    n = check_same_length("correct_a and correct_b", a, b)
    delta = a.astype(np.float64) - b.astype(np.float64)  # per example: +1 only A right, -1 only B right
    diffs = np.concatenate([delta[block].mean(1) for block in resamples(n, n_boot, seed)])
    low, high = percentile_interval(diffs, alpha)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    both, neither = int((a & b).sum()), int((~a & ~b).sum())
    return PairedDifference(
        n=n,
        accuracy_a=float(a.mean()),
        accuracy_b=float(b.mean()),
        difference=float(delta.mean()),
        low=low,
        high=high,
        mcnemar_p=_mcnemar_p(only_a, only_b, both, neither),
        only_a_correct=only_a,
        only_b_correct=only_b,
        confidence=confidence,
        method=f"paired bootstrap ({n_boot} resamples over examples, seed {seed}); exact McNemar",
    )


def paired_difference_over_seeds(
    correct_a: ArrayLike, correct_b: ArrayLike, *, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95
) -> PairedDifference:
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
    rows = [as_correct(name, row) for name, arr in (("correct_a", a), ("correct_b", b)) for row in arr]
    a, b = np.array(rows[: len(a)]), np.array(rows[len(a) :])
    if len(a) == 1 and len(b) == 1:
        return paired_difference(a[0], b[0], n_boot=n_boot, seed=seed, confidence=confidence)
    first = paired_difference(a[0], b[0], n_boot=1, seed=seed, confidence=confidence)
    alpha = check_confidence(confidence)
    # Per example, in units of 1 / (seeds_a * seeds_b): integers, so resampled sums are exact and a difference of
    # exactly 0 stays 0 (float means of thirds summed to 8e-19 once, and read as "excludes 0").
    units = a.sum(0).astype(np.int64) * len(b) - b.sum(0).astype(np.int64) * len(a)
    scale = len(units) * len(a) * len(b)
    delta = units / (len(a) * len(b))
    diffs = np.concatenate([units[block].sum(1) / scale for block in resamples(len(units), check_positive_int("n_boot", n_boot), seed)])
    low, high = percentile_interval(diffs, alpha)
    return PairedDifference(
        n=len(delta),
        accuracy_a=float(a.mean()),
        accuracy_b=float(b.mean()),
        difference=float(delta.mean()),
        low=low,
        high=high,
        mcnemar_p=first.mcnemar_p,
        only_a_correct=first.only_a_correct,
        only_b_correct=first.only_b_correct,
        confidence=confidence,
        method=f"paired bootstrap ({n_boot} resamples over examples of the correctness averaged "
        f"over {len(a)} and {len(b)} seeds, seed {seed}); exact McNemar on the first seeds",
    )
