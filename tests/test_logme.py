"""LogME against a direct maximisation of the evidence formula, its invariances, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from transferkit.errors import UsageError
from transferkit.stats.logme import kendall_tau, log_evidence, logme_score, maximise_evidence, spectrum


def direct_evidence(features: np.ndarray, y: np.ndarray, log_alpha: float, log_beta: float) -> float:
    """The paper's formula as written, with the d x d matrix A: independent of the spectral implementation."""
    alpha, beta = np.exp(log_alpha), np.exp(log_beta)
    n, d = features.shape
    a = alpha * np.eye(d) + beta * features.T @ features
    m = beta * np.linalg.solve(a, features.T @ y)
    _, logdet = np.linalg.slogdet(a)
    return (
        n / 2 * np.log(beta)
        + d / 2 * np.log(alpha)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * np.sum((features @ m - y) ** 2)
        - alpha / 2 * m @ m
        - logdet / 2
    )


def direct_maximum(features: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Best of Nelder-Mead runs over (log alpha, log beta) from several starts."""
    best = None
    for start in [(0.0, 0.0), (4.0, 2.0), (-2.0, 3.0), (6.0, -1.0)]:
        res = scipy.optimize.minimize(
            lambda x: -direct_evidence(features, y, *x),
            start,
            method="Nelder-Mead",
            options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 4000},
        )
        if best is None or res.fun < best.fun:
            best = res
    return -best.fun, best.x


def classification_data(n: int, d: int, seed: int, classes: int = 3, noise: float = 2.0):
    """Gaussian features and labels from a noisy linear rule of them: an interior maximum for every class."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, d))
    labels = np.argmax(features @ rng.normal(size=(d, classes)) + noise * rng.normal(size=(n, classes)), axis=1)
    return features, labels


@pytest.mark.parametrize(("n", "d", "seed"), [(60, 8, 0), (60, 8, 1), (60, 8, 2), (30, 50, 0), (30, 50, 3)])
def test_fixed_point_reaches_the_direct_maximum(n, d, seed):
    features, labels = classification_data(n, d, seed)
    targets = np.eye(3)[labels]
    evidence, alpha, beta = maximise_evidence(spectrum(features, targets))
    for c in range(3):
        best, (log_alpha, log_beta) = direct_maximum(features, targets[:, c])
        assert evidence[c] == pytest.approx(best, rel=1e-6)  # measured agreement: ~1e-14
        if not np.isfinite(alpha[c]) or beta[c] > 1e8:
            continue  # supremum at alpha -> inf or beta -> inf: the optimiser stops anywhere far out; only the value compares
        assert np.log(alpha[c]) == pytest.approx(log_alpha, abs=1e-3)
        assert np.log(beta[c]) == pytest.approx(log_beta, abs=1e-3)
        # And the spectral formula is the direct one at the same point.
        assert log_evidence(spectrum(features, targets[:, [c]]), alpha[[c]], beta[[c]])[0] == pytest.approx(
            direct_evidence(features, targets[:, c], np.log(alpha[c]), np.log(beta[c])), rel=1e-9
        )


def test_score_is_the_mean_maximised_evidence_per_example():
    features, labels = classification_data(60, 8, seed=4)
    targets = np.eye(3)[labels]
    expected = np.mean([direct_maximum(features, targets[:, c])[0] for c in range(3)]) / len(labels)
    assert logme_score(features, labels) == pytest.approx(expected, rel=1e-6)


def test_rank_deficient_features_match_the_direct_maximum():
    features, labels = classification_data(60, 5, seed=5)
    features = np.hstack([features, features[:, :3]])  # duplicated columns: F^T F is singular
    targets = np.eye(3)[labels]
    evidence, _, _ = maximise_evidence(spectrum(features, targets))
    for c in range(3):
        assert evidence[c] == pytest.approx(direct_maximum(features, targets[:, c])[0], rel=1e-6)


def test_features_that_carry_the_labels_score_higher():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    centres = rng.normal(size=(4, 16))
    scores = [logme_score(centres[labels] + noise * rng.normal(size=(200, 16)), labels) for noise in (0.3, 1.0, 3.0)]
    random = logme_score(rng.normal(size=(200, 16)), labels)
    assert scores[0] > scores[1] > scores[2] > random
    assert kendall_tau(np.array(scores), -np.array([0.3, 1.0, 3.0])).tau == pytest.approx(1.0)


def test_invariant_to_scale_rotation_order_and_class_names():
    features, labels = classification_data(80, 6, seed=6)
    base = logme_score(features, labels)
    rng = np.random.default_rng(1)
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    perm = rng.permutation(80)
    names = np.array(["cat", "dog", "emu"])[labels]
    # Scaling F by c is absorbed by alpha -> alpha / c^2; an isotropic prior does not see rotations.
    for variant in (
        logme_score(1e-3 * features, labels),
        logme_score(1e3 * features, labels),
        logme_score(features @ rotation, labels),
        logme_score(features[perm], labels[perm]),
        logme_score(features, (labels + 1) % 3),
        logme_score(features, names),
    ):
        assert variant == pytest.approx(base, rel=1e-9)


def test_zero_columns_change_nothing_and_exercise_the_wide_branch():
    # Zero columns add (d - r) log alpha to log|A| and d/2 log alpha alike: the evidence is unchanged.
    # With 30 examples, 8 columns go through F^T F and 48 columns through F F^T.
    features, labels = classification_data(30, 8, seed=7)
    wide = np.hstack([features, np.zeros((30, 40))])
    assert logme_score(wide, labels) == pytest.approx(logme_score(features, labels), rel=1e-9)


def test_noiseless_fit_stops_at_the_beta_limit():
    # n < d: y is in the span of F and the supremum can be at beta -> inf, where y ~ N(0, F F^T / alpha).
    # Its value there is analytic (maximised over alpha); the direct d x d formula is too ill-conditioned
    # at beta ~ 1e10 to serve as the reference.
    features, labels = classification_data(20, 100, seed=0)
    spec = spectrum(features, np.eye(3)[labels])
    evidence, alpha, beta = maximise_evidence(spec)
    noiseless = np.flatnonzero(beta > 1e8)
    assert len(noiseless) > 0
    for c in noiseless:
        best_alpha = 20 / (spec.z2[:, c] / spec.s).sum()
        limit = -10 * np.log(2 * np.pi) - np.log(spec.s).sum() / 2 + 10 * np.log(best_alpha) - 10
        assert evidence[c] == pytest.approx(limit, rel=1e-8)
        assert alpha[c] == pytest.approx(best_alpha, rel=1e-6)


def test_labels_orthogonal_to_every_feature_stop_at_the_supremum():
    # y has a zero projection on the features: the supremum is at alpha -> inf (w = 0) with beta = n / ||y||^2.
    features = np.zeros((40, 3))
    features[:20, 0] = np.tile([1.0, -1.0], 10)
    features[20:, 1] = np.tile([1.0, -1.0], 10)
    features[:, 2] = np.tile([1.0, 1.0, -1.0, -1.0], 10)
    y = np.ones((40, 1))
    evidence, alpha, beta = maximise_evidence(spectrum(features, y))
    assert np.isfinite(evidence[0]) and alpha[0] > 1e8
    assert beta[0] == pytest.approx(1.0, rel=1e-6)
    assert evidence[0] == pytest.approx(-40 / 2 * np.log(2 * np.pi) - 40 / 2, rel=1e-6)


def test_kendall_tau_is_scipys():
    a, b = np.array([0.1, 0.4, 0.35, 0.8, 0.2]), np.array([1.0, 3.0, 4.0, 5.0, 2.0])
    got = kendall_tau(a, b)
    expected = scipy.stats.kendalltau(a, b)
    assert (got.tau, got.p_value, got.n) == (pytest.approx(expected.statistic), pytest.approx(expected.pvalue), 5)
    assert kendall_tau(a, -a).tau == pytest.approx(-1.0)


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        ([1.0, 2.0], [1.0, 2.0, 3.0], "same length"),
        ([1.0], [2.0], "at least 2"),
        ([1.0, np.nan, 2.0], [1.0, 2.0, 3.0], "a has a NaN"),
        ([1.0, 2.0, 3.0], [5.0, 5.0, 5.0], "b is constant"),
    ],
)
def test_kendall_tau_refuses(a, b, message):
    with pytest.raises(UsageError, match=message):
        kendall_tau(np.array(a), np.array(b))


@pytest.mark.parametrize(
    ("features", "labels", "message"),
    [
        (np.ones((10, 3)), np.zeros(10, dtype=int), "1 distinct class"),
        (np.ones((10, 3)), np.arange(9) % 2, "one entry per row"),
        (np.ones(10), np.arange(10) % 2, "must be 2-D"),
        (np.where(np.eye(10, 3) == 1, np.nan, 1.0), np.arange(10) % 2, "NaN or infinite values in 3 rows .first: row 0"),
        (np.ones((10, 3)), (np.arange(10) % 2).astype(float), "class ids"),
        (np.zeros((10, 3)), np.arange(10) % 2, "all zero"),
    ],
)
def test_bad_input_is_refused_with_the_fix(features, labels, message):
    with pytest.raises(UsageError, match=message):
        logme_score(features, labels)


def test_logme_imports_only_numpy_scipy_and_the_errors_module():
    # Pure NumPy/SciPy by design (no torch): the data doctor must run where no deep-learning stack is installed.
    import ast
    import pathlib

    import transferkit.stats.logme as module

    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    allowed = {"__future__", "logging", "dataclasses", "typing", "collections.abc", "numpy", "scipy", "scipy.stats"}
    assert imported - allowed == {"transferkit.errors"}
