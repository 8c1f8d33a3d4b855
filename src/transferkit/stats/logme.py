"""LogME: how well a backbone's features suit the user's labels, without training.

You, Liu, Wang and Long, "LogME: Practical Assessment of Pre-trained Models
for Transfer Learning", ICML 2021. For each class c the one-hot column y_c is
modelled as a Bayesian linear regression on the features F (n x d):

    y = F w + e,   w ~ N(0, alpha^-1 I_d),   e ~ N(0, beta^-1 I_n)

and the log marginal evidence, maximised over (alpha, beta), is

    log p(y | F) = n/2 log beta + d/2 log alpha - n/2 log 2pi
                   - beta/2 ||F m - y||^2 - alpha/2 m^T m - 1/2 log|A|

with A = alpha I + beta F^T F and m = beta A^-1 F^T y. The score is the mean
over classes of that maximum divided by n (nats per example): higher means a
linear head on these features should fit the labels better. It needs one
eigendecomposition of the features and no gradient step, so ranking ten
backbones costs ten feature extractions.

Everything is expressed in the spectrum of F: with F = U diag(sqrt(s)) V^T
(r = rank of F, at most min(n, d)), z = U^T y and rest = ||y||^2 - ||z||^2,

    gamma      = sum_i beta s_i / (alpha + beta s_i)
    m^T m      = sum_i beta^2 s_i z_i^2 / (alpha + beta s_i)^2
    ||Fm - y||^2 = sum_i alpha^2 z_i^2 / (alpha + beta s_i)^2 + rest
    log|A|     = sum_i log(alpha + beta s_i) + (d - r) log alpha

so each iteration costs O(r) per class. The d - r directions where F^T F is
zero (all of them beyond n when n < d) each add log alpha to log|A|, which
cancels the matching part of d/2 log alpha: the evidence is exact for n < d
too, with no d x d matrix ever formed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.stats

from transferkit.errors import UsageError

logger = logging.getLogger(__name__)

# The fixed point converges linearly; 1e-10 relative change in alpha and beta puts the evidence
# within ~1e-12 of its maximum on well-posed problems, and 10_000 steps is far past what they need
# (tens to hundreds). A class whose evidence has no finite maximiser (labels orthogonal to every
# feature direction: alpha -> inf) stops at the cap, where the evidence is already at its supremum.
TOLERANCE = 1e-10
MAX_ITERATIONS = 10_000


@dataclass(frozen=True)
class Spectrum:
    """The parts of F and Y the evidence depends on (see the module docstring).

    Attributes:
        s: (r,) nonzero eigenvalues of F^T F (squared singular values of F).
        z2: (r, k) squared projections of each target column on the left singular vectors.
        rest: (k,) squared norm of each target outside the span of F.
        n: number of examples.
        d: feature dimension.
    """

    s: np.ndarray
    z2: np.ndarray
    rest: np.ndarray
    n: int
    d: int


@dataclass(frozen=True)
class RankAgreement:
    """Kendall's tau between two rankings, with what it rests on.

    Attributes:
        tau: Kendall's tau-b in [-1, 1]; 1 is the same order.
        p_value: two-sided p-value of tau = 0 (scipy's exact test for small n without ties).
        n: number of items ranked.
    """

    tau: float
    p_value: float
    n: int


def logme_score(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME of features for classification labels: mean per-class log evidence per example.

    Higher is better. Comparable across backbones on the same labelled examples
    (the score is invariant to scaling and rotating the features), not across
    data sets. Classes are the distinct values in `labels`.

    Args:
        features: (n, d) real features, one row per example.
        labels: (n,) integer (or string) class labels, at least two distinct.

    Returns:
        The LogME score in nats per example.

    Raises:
        UsageError: shapes disagree, a value is NaN or infinite, labels are
            not discrete, there is only one class, or every feature is zero.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> y = rng.integers(0, 3, 100)
        >>> good = np.eye(3)[y] + 0.1 * rng.normal(size=(100, 3))
        >>> logme_score(good, y) > logme_score(rng.normal(size=(100, 3)), y)
        True
    """
    features, labels = _check_inputs(features, labels)
    targets = (labels[:, None] == np.unique(labels)[None, :]).astype(np.float64)  # one-hot, one column per class
    evidence, _, _ = maximise_evidence(spectrum(features, targets))
    return float(np.mean(evidence) / len(labels))


def spectrum(features: np.ndarray, targets: np.ndarray) -> Spectrum:
    """Eigendecompose the smaller Gram matrix of `features` once and project `targets` on it.

    For n >= d this is the d x d matrix F^T F (a matrix product and a small
    eigendecomposition are cheaper than the SVD of a tall F); for n < d the
    n x n matrix F F^T. Either way the cost is O(n d min(n, d)) and the memory
    O(min(n, d)^2).

    Args:
        features: (n, d) float64 features, finite.
        targets: (n, k) float64 regression targets (one-hot columns for LogME).

    Returns:
        The Spectrum.

    Example:
        >>> spectrum(np.eye(3)[:, :2], np.ones((3, 1))).s
        array([1., 1.])
    """
    n, d = features.shape
    if n >= d:
        s, vecs = np.linalg.eigh(features.T @ features)
        projected = vecs.T @ (features.T @ targets)  # = sqrt(s_i) z_i: the right vectors map onto the left ones
    else:
        s, vecs = np.linalg.eigh(features @ features.T)
        projected = vecs.T @ targets
    # Eigenvalues below numpy's matrix_rank tolerance are rounding noise of a zero: treat them as
    # exactly zero (their direction then belongs to `rest`), which is also what keeps 1/sqrt(s) finite.
    keep = s > s.max(initial=0.0) * max(n, d) * np.finfo(np.float64).eps
    if not keep.any():
        raise UsageError("features are all zero, so LogME is undefined. Pass the backbone's features, not an empty or zero array.")
    s = s[keep]
    z = projected[keep] / np.sqrt(s)[:, None] if n >= d else projected[keep]
    z2 = z**2
    rest = np.maximum((targets**2).sum(axis=0) - z2.sum(axis=0), 0.0)  # clip: rounding may make a zero slightly negative
    return Spectrum(s=s, z2=z2, rest=rest, n=n, d=d)


def log_evidence(spec: Spectrum, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Log marginal evidence log p(y | F, alpha, beta) of each target column.

    The paper's formula, rewritten with t_i = beta s_i / alpha (no d x d matrix,
    and finite at alpha = inf, where w = 0 and y is pure noise):

        n/2 log beta - n/2 log 2pi - beta/2 (sum_i z_i^2 / (1 + t_i) + rest) - 1/2 sum_i log(1 + t_i)

    (beta/2 ||Fm - y||^2 + alpha/2 m^T m sums to the beta/2 term; d/2 log alpha - 1/2 log|A| to the last.)

    Args:
        spec: the Spectrum of the features and targets.
        alpha: (k,) prior precisions of the weights, > 0 (inf allowed).
        beta: (k,) noise precisions, > 0 and finite.

    Returns:
        (k,) log evidence in nats (not divided by n).

    Example:
        >>> spec = spectrum(np.eye(2), np.eye(2))
        >>> log_evidence(spec, np.ones(2), np.ones(2)).round(4)
        array([-2.781, -2.781])
    """
    t = beta * spec.s[:, None] / alpha  # signal-to-prior ratio of each direction, (r, k)
    return (
        spec.n / 2 * np.log(beta)
        - spec.n / 2 * np.log(2 * np.pi)
        - beta / 2 * ((spec.z2 / (1 + t)).sum(axis=0) + spec.rest)
        - np.log1p(t).sum(axis=0) / 2
    )


def maximise_evidence(spec: Spectrum) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximise the evidence of every target column over (alpha, beta): Algorithm 1 of You et al.

    MacKay's fixed point: gamma = sum beta s_i / (alpha + beta s_i) (the
    effective number of parameters), alpha = gamma / m^T m,
    beta = (n - gamma) / ||F m - y||^2, from alpha = beta = 1 as in the paper,
    until both change by less than TOLERANCE (relative). It runs to
    convergence rather than for a fixed few steps or to a loose (percent-level)
    change, so the score is the maximum itself, not an approximation that
    depends on the stopping rule. Measured: 9-20 steps when n > d and the
    features carry the labels; up to ~600 when n < d; hundreds to a few
    thousand (each O(r) per class) on random features, whose supremum lies
    far out towards alpha -> inf.

    The supremum can also lie at a boundary, which the iteration approaches
    without reaching: alpha -> inf when no feature direction explains the
    target (gamma -> 0); there the limit is taken exactly (alpha = inf,
    beta = n / ||y||^2, w = 0). Or beta -> inf, a noiseless fit (possible when
    n <= d; gamma -> n); there the last iterate is kept, within ~TOLERANCE
    nats of the supremum.

    Args:
        spec: the Spectrum of the features and targets.

    Returns:
        (evidence, alpha, beta), each (k,): the maximised log evidence in nats and its maximiser.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> f = rng.normal(size=(50, 3))
        >>> y = f @ np.ones((3, 1)) + 0.1 * rng.normal(size=(50, 1))
        >>> ev, alpha, beta = maximise_evidence(spectrum(f, y))
        >>> bool(80 < beta[0] < 130)  # the noise precision is about 1 / 0.1^2
        True
    """
    k = spec.z2.shape[1]
    alpha, beta = np.ones(k), np.ones(k)
    active = np.arange(k)  # columns still iterating; each step costs O(r) per active column
    for _ in range(MAX_ITERATIONS):
        new_alpha, new_beta, gamma = _fixed_point_step(spec, active, alpha[active], beta[active])
        no_weights = (gamma <= TOLERANCE) | ~np.isfinite(new_alpha)  # alpha -> inf
        no_noise = ~no_weights & ((spec.n - gamma <= TOLERANCE * spec.n) | ~np.isfinite(new_beta))  # beta -> inf
        moving = ~(no_weights | no_noise)
        converged = (
            moving
            & (np.abs(new_alpha - alpha[active]) <= TOLERANCE * alpha[active])
            & (np.abs(new_beta - beta[active]) <= TOLERANCE * beta[active])
        )
        alpha[active[moving]], beta[active[moving]] = new_alpha[moving], new_beta[moving]
        cols = active[no_weights]
        alpha[cols] = np.inf
        beta[cols] = spec.n / (spec.z2[:, cols].sum(axis=0) + spec.rest[cols])  # the noise-only model's optimum
        active = active[moving & ~converged]
        if len(active) == 0:
            break
    else:
        logger.warning(
            "LogME: %d of %d targets did not converge in %d fixed-point iterations; their evidence is "
            "taken at the last iterate, which is below the maximum.",
            len(active),
            k,
            MAX_ITERATIONS,
        )
    return log_evidence(spec, alpha, beta), alpha, beta


def _fixed_point_step(spec: Spectrum, cols: np.ndarray, alpha: np.ndarray, beta: np.ndarray):
    """One MacKay update (alpha, beta) of the target columns `cols`, and gamma at the old values.

    An update is inf (or NaN) where m^T m or the residual is exactly zero: the caller treats that as the boundary.
    """
    z2 = spec.z2[:, cols]
    shrink = 1 / (1 + alpha / (beta * spec.s[:, None]))  # beta s / (alpha + beta s): how much of z_i the posterior keeps
    gamma = shrink.sum(axis=0)
    mtm = (shrink**2 * z2 / spec.s[:, None]).sum(axis=0)  # m_i = shrink_i z_i / sqrt(s_i)
    resid = ((1 - shrink) ** 2 * z2).sum(axis=0) + spec.rest[cols]
    with np.errstate(divide="ignore", invalid="ignore"):
        return gamma / mtm, (spec.n - gamma) / resid, gamma


def kendall_tau(a: np.ndarray, b: np.ndarray) -> RankAgreement:
    """How well two rankings of the same items agree (e.g. LogME scores vs fine-tuned accuracy).

    Args:
        a: (m,) scores of m items (higher or lower first: only the order matters).
        b: (m,) other scores of the same items, in the same item order.

    Returns:
        Kendall's tau-b, its p-value and m.

    Raises:
        UsageError: lengths differ, fewer than two items, a NaN, or a constant input (no order to compare).

    Example:
        >>> round(kendall_tau(np.array([1.0, 2.0, 3.0]), np.array([10.0, 30.0, 20.0])).tau, 3)
        0.333
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise UsageError(
            f"kendall_tau needs two 1-D arrays of the same length; got shapes {a.shape} and {b.shape}. "
            "Pass one score per item in each, in the same item order."
        )
    if len(a) < 2:
        raise UsageError(f"kendall_tau needs at least 2 items; got {len(a)}. Rank two or more models.")
    for name, x in (("a", a), ("b", b)):
        if not np.isfinite(x).all():
            raise UsageError(
                f"kendall_tau: {name} has a NaN or infinite value at index {int(np.argmin(np.isfinite(x)))}. "
                "Drop that item from both rankings."
            )
        if np.all(x == x[0]):
            raise UsageError(
                f"kendall_tau: {name} is constant ({x[0]!r} for every item), so it ranks nothing. Pass scores that differ between items."
            )
    result = scipy.stats.kendalltau(a, b)
    return RankAgreement(tau=float(result.statistic), p_value=float(result.pvalue), n=len(a))


def _check_inputs(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate LogME's arguments; return float64 features and 1-D labels."""
    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2:
        raise UsageError(
            f"features must be 2-D (n examples x d dimensions); got shape {features.shape}. "
            "Reshape with features.reshape(len(features), -1)."
        )
    if labels.ndim != 1 or len(labels) != len(features):
        raise UsageError(f"labels must be 1-D with one entry per row of features ({len(features)}); got shape {labels.shape}.")
    if not (np.issubdtype(features.dtype, np.number) or features.dtype == bool):
        raise UsageError(f"features must be numeric; got dtype {features.dtype}.")
    if np.issubdtype(labels.dtype, np.floating) or np.issubdtype(labels.dtype, np.complexfloating):
        raise UsageError(
            f"labels must be class ids (integers or strings); got dtype {labels.dtype}. "
            "Convert with labels.astype(int) if they are whole numbers."
        )
    features = features.astype(np.float64, copy=False)
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise UsageError(
            f"features has NaN or infinite values in {int(bad.sum())} rows (first: row {int(np.argmax(bad))}). "
            "Drop those examples or fix the feature extraction."
        )
    classes = np.unique(labels)
    if len(classes) < 2:
        raise UsageError(
            f"labels have {len(classes)} distinct class(es) ({classes.tolist()}); LogME needs at least 2. "
            "Pass the labelled set with every class."
        )
    return features, labels
