"""The data doctor's algorithms: confident learning against cleanlab, blocked similarity searches against brute force."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_predict

from transferkit.doctor import label_issues
from transferkit.doctor.label_issues import find_label_issues
from transferkit.doctor.outliers import outlier_scores, outliers
from transferkit.doctor.pairs import SimilarPair, classify_pairs, near_duplicates
from transferkit.errors import UsageError


@pytest.fixture(scope="module")
def cleanlab():
    """cleanlab's filter and count modules: AGPL-3.0, so a test-only reference that transferkit never imports."""
    return pytest.importorskip("cleanlab.filter"), pytest.importorskip("cleanlab.count")


# --- confident learning -------------------------------------------------------------------------


@functools.cache
def noisy_blobs(seed: int, classes: int, n: int, std: float = 2.0, flip: float = 0.05):
    """Gaussian blobs with `flip` of the labels moved to another class; out-of-sample probabilities from 5-fold CV."""
    features, truth = make_blobs(n_samples=n, centers=classes, n_features=5, cluster_std=std, random_state=seed)
    rng = np.random.default_rng(seed)
    flipped = rng.choice(n, round(flip * n), replace=False)
    labels = truth.copy()
    labels[flipped] = (truth[flipped] + rng.integers(1, classes, len(flipped))) % classes
    probs = cross_val_predict(LogisticRegression(max_iter=1000), features, labels, cv=5, method="predict_proba")
    return labels, probs, flipped


def cleanlab_issues(cleanlab_filter, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its "too few examples in class k" notice, for the tiny-class fixtures
        return cleanlab_filter.find_label_issues(
            labels, probs, filter_by="prune_by_noise_rate", return_indices_ranked_by="self_confidence", n_jobs=1
        )


def rounded(probs: np.ndarray, decimals: int) -> np.ndarray:
    """Probabilities rounded as a coarse model would report them: many exact ties in margins and remainders."""
    out = np.round(probs, decimals)
    return out / out.sum(axis=1, keepdims=True)


def with_extra_class(labels, probs, members):
    """Add a class K held by `members` (none: a class no example has), with a small probability everywhere."""
    probs = np.hstack([probs, np.full((len(probs), 1), 1e-3)])
    labels = labels.copy()
    labels[list(members)] = probs.shape[1] - 1
    return labels, probs / probs.sum(axis=1, keepdims=True)


MAIN_FIXTURES = [(0, 3, 200), (1, 4, 300), (2, 5, 400), (3, 6, 600)]


def variant(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probs) of a main fixture ("blobs-KxN") or of a case where cleanlab's conventions matter."""
    if name.startswith("blobs-"):
        return noisy_blobs(*next(f for f in MAIN_FIXTURES if name == f"blobs-{f[1]}x{f[2]}"))[:2]
    labels, probs, _ = noisy_blobs(4, 4, 400)
    rows = np.concatenate([np.arange(400), np.arange(150)])
    return {
        "rounded-2-decimals": lambda: (labels, rounded(probs, 2)),
        "rounded-1-decimal": lambda: (labels, rounded(probs, 1)),  # ties everywhere
        "float32": lambda: (labels, probs.astype(np.float32)),
        "one-example-class": lambda: with_extra_class(labels, probs, [0]),  # never pruned
        "two-example-class": lambda: with_extra_class(labels, probs, [0, 1]),
        "absent-class": lambda: with_extra_class(labels, probs, []),  # threshold 2: nothing counted in it
        "duplicated-rows": lambda: (labels[rows], probs[rows]),  # identical margins
        "heavy-overlap": lambda: noisy_blobs(5, 5, 500, std=6.0)[:2],  # many examples above no threshold
        "20pc-noise": lambda: noisy_blobs(6, 3, 450, std=0.7, flip=0.2)[:2],
    }[name]()


VARIANTS = [f"blobs-{c}x{n}" for _, c, n in MAIN_FIXTURES] + [
    "rounded-2-decimals",
    "rounded-1-decimal",
    "float32",
    "one-example-class",
    "two-example-class",
    "absent-class",
    "duplicated-rows",
    "heavy-overlap",
    "20pc-noise",
]


@pytest.mark.parametrize("name", VARIANTS)
def test_flags_what_cleanlab_flags_in_the_same_order(cleanlab, name):
    labels, probs = variant(name)
    expected = cleanlab_issues(cleanlab[0], labels, probs)
    issues = find_label_issues(labels, probs)
    assert len(expected) > 0
    np.testing.assert_array_equal(issues.indices, expected)
    np.testing.assert_array_equal(issues.confident_joint, cleanlab[1].compute_confident_joint(labels, probs))


def coarse_fixture(seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A small random problem with probabilities on a 0.05-0.2 grid: ties in margins, thresholds and counts."""
    rng = np.random.default_rng(seed)
    classes, n = int(rng.integers(3, 5)), int(rng.integers(20, 80))
    truth = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)) * rng.uniform(0.5, 3) + np.eye(classes)[truth] * rng.uniform(0.5, 4)
    grid = rng.choice([0.05, 0.1, 0.2])
    probs = np.round(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True) / grid) * grid + 1e-9
    labels = np.where(rng.random(n) < 0.15, rng.integers(0, classes, n), truth)
    if rng.random() < 0.3 and not np.any(labels == classes - 1):
        labels[0] = classes - 1  # a one-example class
    return (labels, probs / probs.sum(axis=1, keepdims=True)) if len(np.unique(labels)) > 1 else None


def test_matches_cleanlab_on_small_coarse_problems(cleanlab):
    # Each convention (default-sort ties in margins and ranks, argmax among several confident classes, the
    # one-example-per-class rule, unflagging top predictions) changes the result on some of these seeds when
    # altered; the one-example rule only on 7 of the first 3000 (132, 1547 and 2494 among them). All of the
    # first 3000 seeds agreed with cleanlab when measured; 302 of them run here.
    for seed in [*range(300), 1547, 2494]:
        if (problem := coarse_fixture(seed)) is not None:
            np.testing.assert_array_equal(
                find_label_issues(*problem).indices, cleanlab_issues(cleanlab[0], *problem), err_msg=f"seed {seed}"
            )


@pytest.mark.parametrize(("seed", "classes", "n"), MAIN_FIXTURES)
def test_reports_the_noise_estimate_and_per_issue_details(cleanlab, seed, classes, n):
    labels, probs, _ = noisy_blobs(seed, classes, n)
    issues = find_label_issues(labels, probs)
    np.testing.assert_allclose(issues.confident_joint / n, cleanlab[1].estimate_joint(labels, probs))
    np.testing.assert_array_equal(issues.confident_joint.sum(axis=1), np.bincount(labels, minlength=classes))
    np.testing.assert_allclose(issues.noise_matrix.sum(axis=0), 1.0)
    np.testing.assert_allclose(issues.thresholds, [probs[labels == j, j].mean() for j in range(classes)])
    np.testing.assert_array_equal(issues.suggested_labels, probs[issues.indices].argmax(axis=1))
    np.testing.assert_array_equal(issues.self_confidence, probs[issues.indices, labels[issues.indices]])
    assert np.all(np.diff(issues.self_confidence) >= 0)
    assert np.all(issues.suggested_labels != labels[issues.indices])  # a flagged label is never the top prediction


def test_finds_the_injected_flips():
    found = flagged = injected = 0
    for seed, classes, n in MAIN_FIXTURES:
        labels, probs, flipped = noisy_blobs(seed, classes, n)
        issues = set(find_label_issues(labels, probs).indices.tolist())
        found += len(issues & set(flipped.tolist()))
        flagged += len(issues)
        injected += len(flipped)
    # Measured: precision 66/75 = 0.88, recall 66/75 = 0.88. Misses and false flags both lie where the blobs
    # overlap: the cross-validated model is wrong on 5-10% of the examples there whatever their label, and
    # pruning stops at the estimated number of errors per class pair.
    assert found / flagged >= 0.8
    assert found / injected >= 0.8


def test_calibration_rounds_as_cleanlab_on_tie_heavy_joints(cleanlab):
    # Small integer joints make equal rounding remainders common: the case where the arithmetic order matters.
    rng = np.random.default_rng(0)
    for _ in range(500):
        classes = int(rng.integers(2, 8))
        joint = rng.integers(0, 6, size=(classes, classes))
        np.fill_diagonal(joint, np.maximum(joint.diagonal(), 1))
        joint = np.asfortranarray(joint)  # the module's layout (see label_issues._calibrate)
        counts = joint.sum(axis=1) + rng.integers(0, 20, classes)
        expected = cleanlab[1].calibrate_confident_joint(joint, np.repeat(np.arange(classes), counts))
        np.testing.assert_array_equal(label_issues._calibrate(joint, counts), expected)


def test_a_class_with_one_example_keeps_it():
    labels, probs = with_extra_class(*noisy_blobs(4, 4, 400)[:2], [0])
    probs[0] = [0.97, 0.01, 0.01, 0.0, 0.01]  # the only member of class 4 looks like a 0
    assert 0 not in find_label_issues(labels, probs).indices


@pytest.mark.parametrize(
    ("labels", "probs", "message"),
    [
        ([0, 1, 1], [[0.9, 0.1], [0.2, 0.8]], "one entry per row"),
        ([0, 1], [0.9, 0.1], "must be 2-D"),
        ([0, 2], [[0.9, 0.1], [0.2, 0.8]], r"in \[0, 2\).*got 2 at index 1"),
        ([0, 0], [[0.9, 0.1], [0.2, 0.8]], "at least 2 classes"),
        ([0.0, 1.0], [[0.9, 0.1], [0.2, 0.8]], "integer class indices"),
        ([0, 1], [[2.0, -1.0], [0.2, 0.8]], "softmax"),
        ([0, 1], [[0.5, 0.1], [0.2, 0.8]], "row 0 sums to 0.6000"),
    ],
)
def test_label_issues_refuse_bad_input(labels, probs, message):
    with pytest.raises(UsageError, match=message):
        find_label_issues(np.array(labels), np.array(probs))


# --- near-duplicates --------------------------------------------------------------------------


def with_near_copies(n: int, d: int, copies: int, seed: int, noise: float = 0.05) -> np.ndarray:
    """n random vectors, the last `copies` of them noisy copies of earlier ones."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x[n - copies :] = x[rng.choice(n - copies, copies)] + noise * rng.normal(size=(copies, d))
    return x


def brute_force_pairs(a: np.ndarray, b: np.ndarray | None, threshold: float) -> dict[tuple[int, int], float]:
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sims = unit(a) @ unit(a if b is None else b).T
    i, j = np.nonzero(np.triu(sims >= threshold, k=1) if b is None else sims >= threshold)
    # A similarity within rounding of the threshold would make the comparison a coin toss: the fixtures avoid it.
    assert not np.any(np.abs(sims - threshold) < 1e-9)
    return {(int(p), int(q)): float(sims[p, q]) for p, q in zip(i, j)}


@pytest.mark.parametrize("block", [1, 3, 7, 16, 50, 64, 1000])
def test_blocked_pairs_equal_the_full_matrix_within_one_set(block):
    x = with_near_copies(50, 12, copies=8, seed=0)
    expected = brute_force_pairs(x, None, 0.9)
    pairs = near_duplicates(x, threshold=0.9, block=block)
    assert {(p.i, p.j) for p in pairs} == set(expected) and len(pairs) == len(expected) >= 8
    for p in pairs:
        assert p.i < p.j and p.cosine == pytest.approx(expected[(p.i, p.j)], abs=1e-12)
    assert [p.cosine for p in pairs] == sorted((p.cosine for p in pairs), reverse=True)


@pytest.mark.parametrize("block", [1, 4, 10, 37, 100])
def test_blocked_pairs_equal_the_full_matrix_across_two_sets(block):
    x = with_near_copies(60, 12, copies=0, seed=1)
    train, test = x[:37], np.vstack([x[:5] + 0.05 * np.random.default_rng(2).normal(size=(5, 12)), x[37:]])
    expected = brute_force_pairs(train, test, 0.9)
    pairs = near_duplicates(train, test, threshold=0.9, block=block)
    assert {(p.i, p.j) for p in pairs} == set(expected) and {(k, k) for k in range(5)} <= set(expected)


def test_threshold_minus_one_returns_every_pair_once():
    x = np.random.default_rng(3).normal(size=(23, 4))
    pairs = near_duplicates(x, threshold=-1.0, block=5)
    assert sorted((p.i, p.j) for p in pairs) == [(i, j) for i in range(23) for j in range(i + 1, 23)]


def test_exact_copies_and_zero_vectors():
    x = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, 4.0, 6.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    pairs = near_duplicates(x, block=2)
    assert [(p.i, p.j) for p in pairs] == [(0, 2)] and pairs[0].cosine == pytest.approx(1.0, abs=1e-6)


def test_pairs_are_classified_by_split_and_label():
    pairs = [SimilarPair(0, 1, 0.99), SimilarPair(0, 2, 0.98), SimilarPair(2, 3, 0.97), SimilarPair(1, 4, 0.96)]
    splits = ["train", "test", "train", "train", "val"]
    findings = classify_pairs(pairs, splits, np.array(["cat", "dog", "cat", "dog", "dog"]))
    assert [f.kind for f in findings] == ["leakage", "duplicate", "conflict", "leakage"]
    assert (findings[0].split_i, findings[0].split_j, findings[0].label_i, findings[0].label_j) == ("train", "test", "cat", "dog")
    assert type(findings[0].label_i) is str  # not numpy.str_: reports serialise plain values


def test_pairs_across_two_sets_use_each_sets_splits():
    train = np.eye(3)
    test = np.array([[1.0, 0.01, 0.0], [0.0, 0.0, 1.0]])
    pairs = near_duplicates(train, test)
    findings = classify_pairs(pairs, ["train"] * 3, [0, 1, 2], splits_b=["test"] * 2, labels_b=[0, 1])
    assert [(f.i, f.j, f.kind, f.label_i, f.label_j) for f in findings] == [(2, 1, "leakage", 2, 1), (0, 0, "leakage", 0, 0)]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: near_duplicates(np.eye(3), threshold=1.5), "threshold must be a cosine similarity"),
        (lambda: near_duplicates(np.eye(3), block=0), "block must be an integer >= 1"),
        (lambda: near_duplicates(np.eye(3), np.eye(4)), "same width"),
        (lambda: near_duplicates(np.ones(3)), "features_a must be a 2-D"),
        (lambda: near_duplicates(np.array([[np.inf, 1.0]])), "NaN or infinite"),
        (lambda: classify_pairs([], ["train"], [0], splits_b=["test"]), "both splits_b and labels_b"),
        (lambda: classify_pairs([SimilarPair(0, 5, 1.0)], ["train"] * 2, [0, 1]), r"pair \(0, 5\) is out of range"),
        (lambda: classify_pairs([], ["train"] * 2, [0]), "labels_a has 1 entries"),
    ],
)
def test_similarity_searches_refuse_bad_settings(call, message):
    with pytest.raises(UsageError, match=message):
        call()


# --- outliers ---------------------------------------------------------------------------------


def classes_with_outliers(per_class: int = 100, classes: int = 4, d: int = 32, planted: int = 6, seed: int = 0):
    """Gaussian classes around random directions, plus `planted` examples given a random direction of their own."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    labels = np.repeat(np.arange(classes), per_class)
    x = centres[labels] + 0.5 * rng.normal(size=(len(labels), d))
    where = rng.choice(len(labels), planted, replace=False)
    x[where] = 3 * rng.normal(size=(planted, d))
    return x, labels, where


def brute_force_scores(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = 1 - unit @ unit.T
    np.fill_diagonal(dist, np.inf)
    dist[labels[:, None] != labels[None, :]] = np.inf
    return np.array([np.sort(row)[:k].mean() for row in dist])


@pytest.mark.parametrize("block", [1, 7, 33, 100, 4096])
def test_blocked_outlier_scores_equal_the_full_matrix(block):
    x, labels, _ = classes_with_outliers(per_class=40, classes=3, d=8)
    np.testing.assert_allclose(outlier_scores(x, labels, k=5, block=block), brute_force_scores(x, labels, 5), atol=1e-12)


def test_planted_outliers_are_found_and_little_else():
    for seed in range(3):
        x, labels, planted = classes_with_outliers(seed=seed)
        flagged = [o.index for o in outliers(x, labels)]
        assert set(planted) <= set(flagged)
        assert len(flagged) - len(planted) <= 2  # measured: no clean example flagged on these seeds
        assert flagged[: len(planted)] == sorted(flagged[: len(planted)], key=lambda i: -outlier_scores(x, labels)[i])


def test_clean_classes_flag_almost_nothing():
    x, labels, _ = classes_with_outliers(planted=0, seed=5)
    assert len(outliers(x, labels)) <= len(labels) // 100  # measured: none of 400


def test_small_classes_and_duplicates():
    x = np.vstack([np.tile([1.0, 0.0, 0.0], (20, 1)), [[0.0, 1.0, 0.0], [0.0, 1.0, 0.1]], [[0.0, 0.0, 1.0]]])
    labels = np.array([0] * 20 + [1, 1] + [2])
    scores = outlier_scores(x, labels, k=5)
    assert np.all(scores[:20] == 0)  # exact duplicates: distance 0, and log(0) must not break the rule
    assert scores[20] == pytest.approx(scores[21]) and np.isnan(scores[22])  # 1 neighbour; alone in its class
    assert 22 not in [o.index for o in outliers(x, labels)]  # the one-example class is never flagged


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be an integer >= 1"),
        ({"z": -1.0}, "z must be a number > 0"),
        ({"block": 2.5}, "block must be an integer"),
    ],
)
def test_outliers_refuse_bad_settings(kwargs, message):
    with pytest.raises(UsageError, match=message):
        outliers(np.eye(4), np.zeros(4, dtype=int), **kwargs)


def test_doctor_imports_only_numpy_scipy_and_the_errors_module():
    # Pure NumPy/SciPy by design (no torch): the data doctor must run where no deep-learning stack is installed.
    import ast
    import pathlib

    import transferkit.doctor.label_issues
    import transferkit.doctor.outliers
    import transferkit.doctor.pairs

    for module in (transferkit.doctor.label_issues, transferkit.doctor.outliers, transferkit.doctor.pairs):
        tree = ast.parse(pathlib.Path(module.__file__).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        allowed = {
            "__future__",
            "logging",
            "dataclasses",
            "typing",
            "collections.abc",
            "numpy",
            "scipy",
            "scipy.stats",
            "transferkit.doctor.pairs",
        }
        assert imported - allowed == {"transferkit.errors"}, module.__name__
