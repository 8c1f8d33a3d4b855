"""Tests of transferkit.stats (intervals, paired, crossval, calibration) against statsmodels, scikit-learn, scipy, loops."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp, softmax
from scipy.stats import binom
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint

from transferkit.errors import UsageError
from transferkit.stats import checks, crossval, intervals, paired
from transferkit.stats.calibration import (
    TEMPERATURE_BOUNDS,
    expected_calibration_error,
    fit_temperature,
    fold_temperature_,
    reliability_bins,
)
from transferkit.stats.crossval import cross_validated_probe, default_cv_folds
from transferkit.stats.intervals import bootstrap_interval, score_with_intervals, wilson_interval
from transferkit.stats.paired import paired_difference
from transferkit.stats.wording import format_interval, ratio_phrase

# --------------------------------------------------------------------------- fixtures


def labels_and_predictions(n: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """5-class task: y_true uses classes 0-2 only, y_pred also predicts class 3 (never true); class 4 is in neither."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 3, n)
    y_pred = np.where(rng.random(n) < 0.7, y_true, rng.integers(0, 4, n))
    return y_true, y_pred


def correctness_from_table(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-example correctness of two models with the given 2x2 counts, shuffled so order does not matter."""
    a = np.r_[np.ones(both), np.ones(only_a), np.zeros(only_b), np.zeros(neither)].astype(bool)
    b = np.r_[np.ones(both), np.zeros(only_a), np.ones(only_b), np.zeros(neither)].astype(bool)
    order = np.random.default_rng(1).permutation(len(a))
    return a[order], b[order]


def calibrated_logits(n: int, n_classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): a calibrated model by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, (n, n_classes))
    cumulative = softmax(z, axis=1).cumsum(1)
    y = np.minimum((rng.random((n, 1)) > cumulative).sum(1), n_classes - 1)
    return z, y


def nll(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(logsumexp(logits, axis=1) - logits[np.arange(len(y)), y]))


# --------------------------------------------------------------------------- Wilson


@pytest.mark.parametrize(("successes", "n"), [(0, 10), (10, 10), (3, 17), (45, 50), (1, 1), (0, 1), (250, 1000)])
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_wilson_matches_statsmodels(successes, n, confidence):
    expected = proportion_confint(successes, n, alpha=1 - confidence, method="wilson")
    assert wilson_interval(successes, n, confidence) == pytest.approx(expected, abs=1e-12)


def test_wilson_empty_and_bad_input():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(UsageError, match="successes must be at most n"):
        wilson_interval(11, 10)
    with pytest.raises(UsageError, match="confidence"):
        wilson_interval(1, 10, confidence=95)


# --------------------------------------------------------------------------- bootstrap


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_bootstrap_matches_direct_resampling_loop():
    y_true, y_pred = labels_and_predictions()
    rng = np.random.default_rng(7)
    stats = []
    for _ in range(300):
        idx = rng.integers(0, len(y_true), len(y_true))
        stats.append(balanced_accuracy_score(y_true[idx], y_pred[idx]))
    expected = tuple(np.percentile(stats, [2.5, 97.5]))
    assert bootstrap_interval(balanced_accuracy_score, y_true, y_pred, n_boot=300, seed=7) == pytest.approx(expected, abs=1e-12)
    assert bootstrap_interval(balanced_accuracy_score, y_true, y_pred, n_boot=300, seed=8) != pytest.approx(expected, abs=1e-12)


def sklearn_macro_f1(y_true, y_pred):
    return f1_score(y_true, y_pred, labels=np.union1d(y_true, y_pred), average="macro", zero_division=0.0)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_score_with_intervals_matches_sklearn_and_bootstrap_interval():
    y_true, y_pred = labels_and_predictions()
    s = score_with_intervals(y_true, y_pred, 5, seed=3, n_boot=200)
    assert s["n"] == 80
    assert s["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y_true, y_pred), abs=1e-12)
    assert s["macro_f1"]["value"] == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-12)  # sklearn's default labels
    for key, metric in (("balanced_accuracy", balanced_accuracy_score), ("macro_f1", sklearn_macro_f1)):
        expected = bootstrap_interval(metric, y_true, y_pred, n_boot=200, seed=3)
        assert (s[key]["low"], s[key]["high"]) == pytest.approx(expected, abs=1e-12)
        assert s[key]["low"] <= s[key]["value"] <= s[key]["high"]
        assert s[key]["method"] == "bootstrap (200 resamples over examples, seed 3)"
    hits = int((y_true == y_pred).sum())
    assert s["accuracy"]["value"] == hits / 80
    assert (s["accuracy"]["low"], s["accuracy"]["high"]) == pytest.approx(wilson_interval(hits, 80))
    json.dumps(s)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.filterwarnings("ignore:A single label was found")
def test_every_resample_matches_sklearn():
    """n_boot=1: the interval is the metric of resample 0, so each seed checks one resample exactly."""
    y_true, y_pred = labels_and_predictions(n=12, seed=5)  # small: resamples often lose a class
    for seed in range(25):
        s = score_with_intervals(y_true, y_pred, 5, seed=seed, n_boot=1)
        assert s["balanced_accuracy"]["low"] == pytest.approx(
            bootstrap_interval(balanced_accuracy_score, y_true, y_pred, n_boot=1, seed=seed)[0], abs=1e-12
        )
        assert s["macro_f1"]["low"] == pytest.approx(
            bootstrap_interval(sklearn_macro_f1, y_true, y_pred, n_boot=1, seed=seed)[0], abs=1e-12
        )


def test_per_class_recall_and_absent_classes():
    y_true, y_pred = labels_and_predictions()
    recall = score_with_intervals(y_true, y_pred, 5, n_boot=10)["per_class_recall"]
    assert [r["class"] for r in recall] == [0, 1, 2, 3, 4]
    for c in (0, 1, 2):
        support, hits = int((y_true == c).sum()), int(((y_true == c) & (y_pred == c)).sum())
        assert recall[c]["n"] == support and recall[c]["value"] == hits / support
        assert (recall[c]["low"], recall[c]["high"]) == pytest.approx(wilson_interval(hits, support))
    assert recall[3] == {"value": None, "low": None, "high": None, "method": "wilson", "class": 3, "n": 0}


def test_score_with_intervals_rejects_bad_labels():
    with pytest.raises(UsageError, match=r"y_pred must hold class indices in \[0, 3\)"):
        score_with_intervals([0, 1, 2], [0, 1, 3], 3)
    with pytest.raises(UsageError, match="same examples"):
        score_with_intervals([0, 1, 2], [0, 1], 3)
    with pytest.raises(UsageError, match="empty"):
        score_with_intervals([], [], 3)


# --------------------------------------------------------------------------- paired difference


def test_mcnemar_matches_statsmodels_on_fixed_table():
    a, b = correctness_from_table(both=40, only_a=9, only_b=3, neither=8)
    d = paired_difference(a, b, n_boot=500)
    reference = mcnemar([[40, 9], [3, 8]], exact=True).pvalue
    assert d.mcnemar_p == pytest.approx(reference, abs=1e-12)
    assert d.mcnemar_p == pytest.approx(2 * binom.cdf(3, 12, 0.5), abs=1e-12)  # exact McNemar is a two-sided sign test
    assert (d.only_a_correct, d.only_b_correct, d.n) == (9, 3, 60)
    assert d.difference == pytest.approx(6 / 60)
    assert (d.accuracy_a, d.accuracy_b) == pytest.approx((49 / 60, 43 / 60))


def test_paired_interval_matches_direct_loop():
    a, b = correctness_from_table(both=40, only_a=9, only_b=3, neither=8)
    rng = np.random.default_rng(4)
    diffs = []
    for _ in range(400):
        idx = rng.integers(0, 60, 60)
        diffs.append(a[idx].mean() - b[idx].mean())
    d = paired_difference(a, b, n_boot=400, seed=4)
    assert (d.low, d.high) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])), abs=1e-12)


@pytest.mark.parametrize("only_a", [1, 2])
def test_models_differing_on_one_or_two_examples_are_not_significant(only_a):
    a, b = correctness_from_table(both=170, only_a=only_a, only_b=0, neither=30)
    d = paired_difference(a, b)
    assert d.mcnemar_p >= 0.5
    assert d.low <= 0.0 <= d.high
    assert not d.significant


def test_strongly_different_models_are_significant():
    a, b = correctness_from_table(both=110, only_a=70, only_b=10, neither=10)
    d = paired_difference(a, b)
    assert d.significant and d.low > 0.0
    assert d.mcnemar_p < 1e-6
    reverse = paired_difference(b, a)
    assert reverse.significant and reverse.high < 0.0
    assert reverse.difference == pytest.approx(-d.difference)


def test_identical_models_have_p_one_and_zero_interval():
    a = np.array([True, False, True, True])
    d = paired_difference(a, a.copy())
    assert (d.mcnemar_p, d.difference, d.low, d.high, d.significant) == (1.0, 0.0, 0.0, 0.0, False)
    assert json.loads(json.dumps(d.to_dict()))["significant"] is False


def test_paired_difference_rejects_unpaired_input():
    with pytest.raises(UsageError, match="correct_a and correct_b must describe the same examples"):
        paired_difference([True, False], [True])
    with pytest.raises(UsageError, match="correct_b must be a 1-D array of per-example correctness"):
        paired_difference([True, False], [0.3, 2])


# --------------------------------------------------------------------------- calibration


def test_ece_hand_computed():
    p = np.array([[0.95, 0.05], [0.85, 0.15], [0.55, 0.45], [0.3, 0.7]])
    y = np.array([0, 1, 0, 1])
    # 5 bins of width 0.2. (0.8, 1]: 0.95 right, 0.85 wrong -> acc 0.5, conf 0.9, gap 0.4, weight 2/4.
    # (0.4, 0.6]: 0.55 right -> gap 0.45, weight 1/4. (0.6, 0.8]: 0.7 right -> gap 0.3, weight 1/4.
    assert expected_calibration_error(p, y, n_bins=5) == pytest.approx(0.5 * 0.4 + 0.25 * 0.45 + 0.25 * 0.3)
    bins = reliability_bins(p, y, n_bins=5)
    assert [b["count"] for b in bins] == [0, 0, 1, 1, 2]
    assert bins[4]["mean_confidence"] == pytest.approx(0.9) and bins[4]["accuracy"] == 0.5
    assert bins[0]["mean_confidence"] is None and bins[0]["accuracy"] is None
    assert (bins[2]["low"], bins[2]["high"]) == pytest.approx((0.4, 0.6))


def test_ece_bins_are_closed_on_the_right():
    assert [b["count"] for b in reliability_bins([[0.6, 0.4]], [0], n_bins=5)] == [0, 0, 1, 0, 0]
    assert [b["count"] for b in reliability_bins([[1.0, 0.0]], [0], n_bins=5)] == [0, 0, 0, 0, 1]
    assert [b["count"] for b in reliability_bins([[0.5, 0.5]], [0], n_bins=2)] == [1, 0]


def test_ece_matches_direct_definition_on_random_data():
    rng = np.random.default_rng(2)
    p = softmax(rng.normal(0, 2, (500, 3)), axis=1)
    y = rng.integers(0, 3, 500)
    conf, correct, ece = p.max(1), p.argmax(1) == y, 0.0
    for m in range(1, 16):  # Guo et al. 2017, eq. 3
        in_bin = (conf > (m - 1) / 15) & (conf <= m / 15)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    assert expected_calibration_error(p, y) == pytest.approx(ece, abs=1e-12)


def test_ece_rejects_logits():
    with pytest.raises(UsageError, match="Pass softmax"):
        expected_calibration_error([[3.0, -1.0]], [0])


def test_temperature_scaling_fixes_an_over_confident_model():
    z, y = calibrated_logits(4000)
    over = 5.0 * z  # the same ranking, five times too confident
    val, test = slice(0, 2000), slice(2000, None)
    t = fit_temperature(over[val], y[val])
    assert 4.0 < t < 6.0
    reference = minimize_scalar(lambda s: nll(over[val] / s, y[val]), bounds=TEMPERATURE_BOUNDS, method="bounded")
    assert t == pytest.approx(reference.x, rel=1e-3)
    assert nll(over[test] / t, y[test]) < nll(over[test], y[test]) - 0.1
    ece_before = expected_calibration_error(softmax(over[test], axis=1), y[test])
    ece_after = expected_calibration_error(softmax(over[test] / t, axis=1), y[test])
    assert ece_after < 0.5 * ece_before
    assert np.array_equal((over / t).argmax(1), over.argmax(1))


def test_temperature_degenerate_cases_stay_bounded(caplog):
    huge = np.array([[100.0, 0.0, 0.0], [0.0, 100.0, 0.0], [0.0, 0.0, 100.0]] * 5)
    assert fit_temperature(huge, [0, 1, 2] * 5) == 1.0  # all right: nothing to fit
    assert fit_temperature(huge / 50, [0, 1, 2] * 5) == 1.0  # all right with modest margins: the NLL still falls as T -> 0
    one_wrong = fit_temperature(huge, [0, 1, 2] * 4 + [0, 1, 1])
    assert TEMPERATURE_BOUNDS[0] <= one_wrong <= TEMPERATURE_BOUNDS[1] and one_wrong > 1.0
    always_lowest = fit_temperature(np.array([[10.0, 5.0, 0.0]] * 6), [2] * 6)  # worse than uniform: T -> infinity
    assert always_lowest == pytest.approx(TEMPERATURE_BOUNDS[1])
    assert "at the bound" in caplog.text


def test_fold_temperature_reproduces_scaled_logits():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    for bias in (True, False):
        head = torch.nn.Linear(8, 4, bias=bias)
        before = head(x).detach()
        assert fold_temperature_(head, 2.5) is head
        after = head(x).detach()
        assert torch.allclose(after, before / 2.5, atol=1e-6)
        assert torch.equal(after.argmax(1), before.argmax(1))
    with pytest.raises(UsageError, match="temperature must be a finite number above 0"):
        fold_temperature_(head, 0.0)
    with pytest.raises(UsageError, match=r"linear_head must be a torch\.nn\.Linear; got Conv2d"):
        fold_temperature_(torch.nn.Conv2d(1, 1, 1), 2.0)


# --------------------------------------------------------------------------- cross-validated probe


def blobs(per_class: int = 30, n_classes: int = 3, dim: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (n_classes, dim))
    y = np.repeat(np.arange(n_classes), per_class)
    return centres[y] + rng.normal(0, 1, (len(y), dim)), y


def test_probe_on_separable_data():
    x, y = blobs()
    probe = cross_validated_probe(x, y, seed=3)
    assert probe.k == 5 and probe.n == 90 and probe.C == 1.0
    assert probe.accuracy >= 0.95
    assert probe.low <= probe.accuracy <= probe.high
    assert (probe.low, probe.high) == pytest.approx(wilson_interval(round(probe.accuracy * 90), 90))
    assert probe.probabilities.shape == (90, 3)
    assert np.allclose(probe.probabilities.sum(1), 1.0)
    assert len(probe.fold_accuracies) == 5 and probe.fold_sd >= 0.0
    assert probe.fold_mean == pytest.approx(probe.accuracy, abs=0.02)  # folds of 18 examples each
    json.dumps(probe.to_dict())


def test_probe_fold_bookkeeping_matches_stratified_kfold():
    x, y = blobs()
    probe = cross_validated_probe(x, y, seed=3)
    for fold, (_, test) in enumerate(StratifiedKFold(5, shuffle=True, random_state=3).split(x, y)):
        assert np.array_equal(np.flatnonzero(probe.fold_of == fold), np.sort(test))
    again = cross_validated_probe(x, y, seed=3)
    assert np.array_equal(again.probabilities, probe.probabilities)


def test_probe_probabilities_are_out_of_sample():
    """One-hot identity features with random labels: a model that saw an example memorises it, one that did not cannot."""
    n, rng = 40, np.random.default_rng(0)
    x, y = np.eye(n), rng.permutation(np.repeat(np.arange(4), n // 4))
    in_sample = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(x, y).predict_proba(x)
    assert in_sample[np.arange(n), y].min() > 0.5  # memorised
    probe = cross_validated_probe(x, y)
    own_label = probe.probabilities[np.arange(n), y]
    assert own_label.max() < 0.4  # chance is 0.25: nothing of an example's own label leaked into its prediction
    assert probe.accuracy < 0.6


def test_probe_reduces_folds_and_keeps_label_values():
    x, y = blobs(per_class=10)
    y = np.array([2, 5, 7])[y]
    keep = np.r_[0:10, 10:20, 20:23]  # class 7 keeps 3 examples
    probe = cross_validated_probe(x[keep], y[keep])
    assert probe.k == 3
    assert probe.classes.tolist() == [2, 5, 7]
    assert probe.probabilities.shape == (23, 3)
    with pytest.raises(UsageError, match=r"classes \[7\] have 1"):
        cross_validated_probe(x[:21], y[:21])
    with pytest.raises(UsageError, match="at least 2 classes"):
        cross_validated_probe(x[:10], y[:10])
    with pytest.raises(UsageError, match="C must be a finite number above 0"):
        cross_validated_probe(x, y, C=-1.0)


def test_default_cv_folds_rule():
    assert default_cv_folds(1000, 768) == 5
    assert default_cv_folds(100_000, 2048) == 0
    assert default_cv_folds(crossval.MAX_CV_CELLS // 4, 4) == 5
    assert default_cv_folds(crossval.MAX_CV_CELLS // 4 + 1, 4) == 0
    assert default_cv_folds(1, 10) == 0


# --------------------------------------------------------------------------- wording


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (10.0, 95.0, "9.5x faster"),
        (95.0, 10.0, "9.5x slower"),
        (3.0, 120.0, "1/40 of the time"),
        (120.0, 3.0, "40x the time"),
        (10.0, 10.2, "about the same time"),
        (0.0, 0.0, "about the same time"),
        (0.0, 5.0, "a negligible fraction of the time"),
    ],
)
def test_ratio_phrase_examples(a, b, expected):
    assert ratio_phrase(a, b) == expected


def test_ratio_phrase_never_prints_zero_or_one_times():
    values = [0.0, 1e-6, 0.003, 0.5, 0.99, 1.0, 1.04, 9.96, 10.0, 60.0, 3600.0, 1e7]
    for a in values:
        for b in values:
            phrase = ratio_phrase(a, b, what="training time")
            assert "0.0x" not in phrase and "1.0x" not in phrase and "1/0" not in phrase and "1/1 " not in phrase, (a, b, phrase)
            assert not phrase.startswith("0"), (a, b, phrase)
    assert ratio_phrase(9.96, 1.0) == "10x the time"  # rounds to 10.0: switches to the whole-number form
    with pytest.raises(UsageError, match="a_seconds"):
        ratio_phrase(-1.0, 2.0)


def test_format_interval():
    assert format_interval(0.963, 0.933, 0.980) == "96.3% (95% CI 93.3-98.0)"
    assert format_interval(-0.012, -0.03, 0.005) == "-1.2% (95% CI -3.0 to 0.5)"
    assert format_interval(0.0345, 0.02, 0.05, percent=False, confidence=0.9) == "0.035 (90% CI 0.020-0.050)"
    assert format_interval(None, None, None) == "n/a"
    assert format_interval(0.5, None, None) == "50.0%"


# --------------------------------------------------------------------------- import hygiene


def test_module_imports_only_numpy_and_stdlib_at_top_level():
    """The statistics modules must not need torch, and stay cheap: heavy libraries load inside functions."""
    for module in (checks, crossval, intervals, paired):
        tree = ast.parse(Path(module.__file__).read_text())
        top = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                top.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                top.add(node.module if node.module.startswith("transferkit") else node.module.split(".")[0])
        assert top <= {
            "__future__",
            "logging",
            "math",
            "collections",
            "dataclasses",
            "typing",
            "numpy",
            "transferkit.errors",
            "transferkit.stats.wording",
            "transferkit.stats.checks",
            "transferkit.stats.intervals",
        }, (module, top)


def test_confidence_bins_equal_reliability_bins_from_the_top_class_alone():
    """A run keeps only each prediction's probability; with 10 classes many are below 0.5 and must bin as they are."""
    from transferkit.stats.calibration import confidence_bins, reliability_bins

    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(10) * 0.7, size=500)
    y = rng.integers(0, 10, 500)
    assert (p.max(1) < 0.5).sum() > 100
    assert confidence_bins(p.max(1), p.argmax(1) == y) == reliability_bins(p, y)


def test_seed_averaged_difference_is_exact_so_a_zero_lower_end_is_not_significant():
    """Digits, lp-ft vs finetune:all over 3 seeds (session 5): per-example differences in thirds whose float sums
    gave a lower end of 8e-19, read as "excludes 0" and a winner. In exact arithmetic the end is 0: no winner."""
    from fractions import Fraction

    from transferkit.stats.paired import paired_difference_over_seeds

    n, k = 268, 3
    thirds = {35: 1, 66: 1, 105: 1, 117: 2, 123: 2, 133: 1, 200: 1, 237: -2, 258: 1}  # A right minus B right, in seeds
    a, b = np.ones((k, n), bool), np.ones((k, n), bool)
    for i, d in thirds.items():
        (b if d > 0 else a)[: abs(d), i] = False
    got = paired_difference_over_seeds(a, b)
    rng = np.random.default_rng(0)
    units = a.sum(0).astype(int) * k - b.sum(0).astype(int) * k
    exact = [float(Fraction(int(units[rng.integers(0, n, size=n)].sum()), n * k * k)) for _ in range(2000)]
    assert (got.low, got.high) == tuple(np.quantile(exact, [0.025, 0.975]))
    assert got.low == 0.0 and not got.significant
    assert got.difference == pytest.approx(sum(thirds.values()) / (k * n))
