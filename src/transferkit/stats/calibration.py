"""Calibration: expected calibration error, reliability bins and temperature scaling (Guo et al. 2017).

A temperature is fitted on validation logits with scipy's L-BFGS-B on log T and
folded into the linear head (weights and bias divided by T), so every consumer of
the model gets the calibrated probabilities; argmax predictions never change.
torch is imported only by `fold_temperature_`.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from transferkit.errors import UsageError
from transferkit.stats.checks import as_correct, as_labels, check_positive_int, check_same_length, is_number

if TYPE_CHECKING:  # annotations only: torch is imported by fold_temperature_ when called
    import torch

logger = logging.getLogger(__name__)

# Temperature search range of `fit_temperature`: beyond these the validation set, not the model, sets the answer.
TEMPERATURE_BOUNDS = (0.05, 20.0)


# --------------------------------------------------------------------------- calibration


def _check_probabilities(probabilities: ArrayLike, y_true: ArrayLike, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probabilities, dtype=np.float64)
    y = as_labels("y_true", y_true)
    check_positive_int("n_bins", n_bins)
    if p.ndim != 2 or p.shape[1] < 2:
        raise UsageError(f"probabilities must be an (examples, classes) array with at least 2 classes; got shape {p.shape}.")
    check_same_length("probabilities and y_true", p, y)
    if not np.all(np.isfinite(p)) or p.min() < 0 or not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise UsageError(
            "probabilities must be finite, non-negative and sum to 1 per row; got values from "
            f"{np.nanmin(p):.3g} to {np.nanmax(p):.3g}. Pass softmax(logits), not logits."
        )
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise UsageError(f"y_true must hold class indices in [0, {p.shape[1]}); got values from {y.min()} to {y.max()}.")
    return p, y


def _bin_statistics(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin (m-1)/M < confidence <= m/M (Guo et al. 2017): edges, counts, summed confidence, hits."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" puts a confidence equal to an edge in the bin below it; 0 (impossible for a max) joins bin 0.
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    return edges, counts, np.bincount(bins, confidence, n_bins), np.bincount(bins, correct.astype(float), n_bins)


def expected_calibration_error(probabilities: ArrayLike, y_true: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error over equal-width bins of the top-class confidence (Guo et al. 2017, eq. 3).

    ECE = sum over bins of (count / n) * |accuracy - mean confidence|, bins
    (m-1)/M < confidence <= m/M. As a fraction: 0.05 means predictions are,
    on average, 5 points more (or less) confident than they are right.

    Args:
        probabilities: (examples, classes) predicted probabilities, rows summing to 1.
        y_true: True class indices.
        n_bins: Number of equal-width bins on [0, 1]; 15 as Guo et al.

    Returns:
        ECE in [0, 1].

    Example:
        >>> expected_calibration_error([[0.9, 0.1], [0.6, 0.4]], [0, 1], n_bins=10)
        0.35
    """
    p, y = _check_probabilities(probabilities, y_true, n_bins)
    _, _counts, conf_sum, hits = _bin_statistics(p.max(1), p.argmax(1) == y, n_bins)
    return float(np.abs(hits - conf_sum).sum() / len(y))  # per bin count * |acc - conf| = |hits - sum(conf)|


def reliability_bins(probabilities: ArrayLike, y_true: ArrayLike, n_bins: int = 15) -> list[dict]:
    """The bins of a reliability diagram: for each, its range, count, mean confidence and accuracy.

    Same bins as `expected_calibration_error`; an empty bin has count 0 and
    None for mean_confidence and accuracy (nothing to plot).

    Args:
        probabilities: (examples, classes) predicted probabilities, rows summing to 1.
        y_true: True class indices.
        n_bins: Number of equal-width bins on [0, 1].

    Returns:
        One dict per bin: "low", "high", "count", "mean_confidence", "accuracy".

    Example:
        >>> [b["count"] for b in reliability_bins([[0.9, 0.1], [0.6, 0.4]], [0, 1], n_bins=2)]
        [0, 2]
    """
    p, y = _check_probabilities(probabilities, y_true, n_bins)
    return confidence_bins(p.max(1), p.argmax(1) == y, n_bins)


def confidence_bins(confidence: ArrayLike, correct: ArrayLike, n_bins: int = 15) -> list[dict]:
    """`reliability_bins` from each prediction's top-class confidence and whether it was right.

    What a saved run or compare.json keeps per example (the probability of the predicted class), so a
    reliability diagram can be drawn without the full probability rows.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    right = as_correct("correct", correct)
    check_positive_int("n_bins", n_bins)
    check_same_length("confidence and correct", conf, right)
    if not np.all(np.isfinite(conf)) or conf.min() < 0 or conf.max() > 1:
        raise UsageError("confidence must hold probabilities in [0, 1]: the probability of each predicted class.")
    edges, counts, conf_sum, hits = _bin_statistics(conf, right, n_bins)
    return [
        {
            "low": float(edges[i]),
            "high": float(edges[i + 1]),
            "count": int(counts[i]),
            "mean_confidence": float(conf_sum[i] / counts[i]) if counts[i] else None,
            "accuracy": float(hits[i] / counts[i]) if counts[i] else None,
        }
        for i in range(n_bins)
    ]


def _nll_and_grad(log_t: np.ndarray, logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean NLL of softmax(logits / T) and its derivative in log T: mean(s_y - E_p[s]) with s = logits / T."""
    from scipy.special import logsumexp, softmax

    s = logits / math.exp(float(log_t[0]))
    s_true = s[np.arange(len(y)), y]
    nll = float(np.mean(logsumexp(s, axis=1) - s_true))
    grad = float(np.mean(s_true - (softmax(s, axis=1) * s).sum(1)))
    return nll, np.array([grad])


def fit_temperature(logits: ArrayLike, y_true: ArrayLike) -> float:
    """Temperature T minimising the NLL of softmax(logits / T) on validation data (Guo et al. 2017).

    scipy's L-BFGS-B on log T (so T stays positive) with the exact gradient,
    started from T = 1 and bounded to `TEMPERATURE_BOUNDS` = [0.05, 20]. The
    NLL is convex in 1/T, so the bounded minimum is the global one. Dividing
    logits by T > 0 never changes their argmax, hence never the accuracy.

    Degenerate cases: when every validation example is already right, the
    NLL keeps falling as T -> 0 and has no minimum to find (L-BFGS would stop
    wherever the slope flattens); the validation set then says nothing about
    how confident errors would be, so 1.0 (leave the model as it is) is
    returned and logged. A minimum on a bound (a model
    no better than uniform gives T = 20) is returned and logged.

    Args:
        logits: (examples, classes) validation logits, not probabilities.
        y_true: True class indices of those examples.

    Returns:
        T in [0.05, 20]; divide logits by it (or `fold_temperature_` the head).

    Example:
        >>> import numpy as np
        >>> t = fit_temperature(np.array([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]]), [0, 1, 1, 1])
        >>> t > 1.0  # one confident mistake in four: soften
        True
    """
    from scipy.optimize import minimize

    z = np.asarray(logits, dtype=np.float64)
    y = as_labels("y_true", y_true)
    if z.ndim != 2 or z.shape[1] < 2 or not np.all(np.isfinite(z)):
        raise UsageError(f"logits must be a finite (examples, classes) array with at least 2 classes; got shape {z.shape}.")
    check_same_length("logits and y_true", z, y)
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise UsageError(f"y_true must hold class indices in [0, {z.shape[1]}); got values from {y.min()} to {y.max()}.")
    if np.all(z.argmax(1) == y):
        logger.info("fit_temperature: all %d validation examples are right; no temperature to fit, keeping T = 1.", len(y))
        return 1.0
    bounds = (math.log(TEMPERATURE_BOUNDS[0]), math.log(TEMPERATURE_BOUNDS[1]))
    result = minimize(_nll_and_grad, x0=np.zeros(1), args=(z, y), jac=True, method="L-BFGS-B", bounds=[bounds])
    t = float(np.clip(math.exp(float(result.x[0])), *TEMPERATURE_BOUNDS))
    if math.isclose(t, TEMPERATURE_BOUNDS[0], rel_tol=1e-3) or math.isclose(t, TEMPERATURE_BOUNDS[1], rel_tol=1e-3):
        logger.warning("fit_temperature: the best temperature is at the bound %.2f of %s.", t, TEMPERATURE_BOUNDS)
    return t


def fold_temperature_(linear_head: torch.nn.Linear, temperature: float) -> torch.nn.Linear:
    """Divide a `torch.nn.Linear`'s weight and bias by `temperature` in place; returns the same layer.

    Afterwards the plain model outputs logits / T, the calibrated logits, with
    no extra module to save or export; the argmax never changes.

    Args:
        linear_head: The final `torch.nn.Linear` of the classifier.
        temperature: T > 0 from `fit_temperature`.

    Returns:
        `linear_head`, modified.

    Example:
        >>> import torch
        >>> head = torch.nn.Linear(4, 3)
        >>> x = torch.randn(2, 4)
        >>> before = head(x)
        >>> torch.allclose(fold_temperature_(head, 2.0)(x), before / 2.0)
        True
    """
    import torch

    if not isinstance(linear_head, torch.nn.Linear):
        raise UsageError(
            f"linear_head must be a torch.nn.Linear; got {type(linear_head).__name__}. "
            "Pass the classifier's final layer (e.g. model.get_classifier() of a timm model)."
        )
    if not (is_number(temperature) and math.isfinite(temperature) and temperature > 0):
        raise UsageError(f"temperature must be a finite number above 0; got {temperature!r}. Use fit_temperature's result.")
    with torch.no_grad():
        linear_head.weight.div_(float(temperature))
        if linear_head.bias is not None:
            linear_head.bias.div_(float(temperature))
    return linear_head
