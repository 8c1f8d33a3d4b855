"""evaluate.metrics: checked against scikit-learn called directly, on fixed random data and by hand."""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, top_k_accuracy_score

import transferkit.stats.metrics
from transferkit.errors import UsageError
from transferkit.stats.metrics import metrics

K = 8
CLASSES = [f"c{i}" for i in range(K)]
ABSENT, NEVER_PREDICTED = 3, 5  # c3 has no example in y_true; c5 has examples but never the highest score


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    y = rng.choice([c for c in range(K) if c != ABSENT], size=300)
    logits = rng.normal(size=(300, K)) + 1.5 * np.eye(K)[y]  # better than chance, far from perfect
    logits[:, NEVER_PREDICTED] -= 10
    return logits, y


def _json_ready(value) -> bool:
    """Only the types json.dumps writes as they are: no numpy scalars or arrays."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_ready(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_json_ready(v) for v in value)
    return value is None or type(value) in (int, float, str, bool)


def test_matches_scikit_learn(data):
    logits, y = data
    m = metrics(logits, y, CLASSES)
    pred = logits.argmax(1)
    assert NEVER_PREDICTED not in pred and ABSENT in pred  # the fixture covers both cases
    assert m["n"] == 300
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["top5_accuracy"] == pytest.approx(top_k_accuracy_score(y, logits, k=5, labels=range(K)))
    assert m["confusion"] == confusion_matrix(y, pred, labels=range(K)).tolist()
    present = [c for c in range(K) if c != ABSENT]
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, labels=present, average="macro", zero_division=0))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=range(K), zero_division=0)
    for c in present:
        assert m["per_class"][CLASSES[c]] == pytest.approx({"precision": p[c], "recall": r[c], "f1": f[c], "support": s[c]})


def test_absent_class_is_none_and_listed_and_leaves_macro_f1_alone(data):
    logits, y = data
    m = metrics(logits, y, CLASSES)
    assert m["per_class"]["c3"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert m["absent_classes"] == ["c3"]
    present_f1 = [v["f1"] for v in m["per_class"].values() if v["support"]]
    assert m["macro_f1"] == pytest.approx(np.mean(present_f1))
    # the old behaviour (a 0.0 for the absent class averaged in) gives a lower number
    assert m["macro_f1"] > f1_score(y, logits.argmax(1), labels=range(K), average="macro", zero_division=0)


def test_never_predicted_class_scores_zero_not_none(data):
    logits, y = data
    c5 = metrics(logits, y, CLASSES)["per_class"]["c5"]
    assert c5["support"] > 0 and c5 == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": c5["support"]}


def test_result_is_json_ready(data):
    m = metrics(*data, CLASSES)
    assert _json_ready(m)
    assert json.loads(json.dumps(m)) == m
    assert '"precision": null' in json.dumps(m)


def test_small_example_by_hand():
    # true 0 0 1 1 2 / predicted 0 1 1 1 0
    logits = np.array([[3, 1, 0], [1, 3, 0], [0, 3, 1], [1, 2, 0], [2, 0, 1]], dtype=float)
    m = metrics(logits, np.array([0, 0, 1, 1, 2]), ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}  # never predicted
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["absent_classes"] == []
    assert m["top5_accuracy"] is None  # K = 3 <= 5: the true class is always among the top 5, which says nothing


def test_docstring_example_holds():
    result = doctest.testmod(transferkit.stats.metrics)
    assert result.attempted >= 2 and result.failed == 0


@pytest.mark.filterwarnings("error")  # scikit-learn warns when k >= K; metrics must not ask it to
@pytest.mark.parametrize("k", [2, 3, 5])  # data loading refuses fewer than two classes
def test_top_k_with_few_classes_is_all_classes(k):
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 20)
    m = metrics(rng.normal(size=(20, k)), y, [str(i) for i in range(k)])
    assert m["top5_accuracy"] is None and m["n"] == 20
    assert len(m["confusion"]) == k


@pytest.mark.filterwarnings("error")
def test_one_class_present_and_predicted():
    m = metrics(np.tile([[2.0, 0.0, 0.0]], (4, 1)), np.zeros(4, dtype=int), ["a", "b", "c"])
    assert m["accuracy"] == m["macro_f1"] == 1.0 and m["absent_classes"] == ["b", "c"]
    assert m["confusion"] == [[4, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_top_k_with_six_classes_is_top_five():
    rng = np.random.default_rng(1)
    logits, y = rng.normal(size=(50, 6)), rng.integers(0, 6, 50)
    expected = np.mean([t in np.argsort(-row)[:5] for row, t in zip(logits, y)])
    assert expected < 1.0
    assert metrics(logits, y, list("abcdef"))["top5_accuracy"] == pytest.approx(expected)


def test_empty_input_gives_zeros_and_nones():
    m = metrics(np.zeros((0, 3)), np.zeros(0, dtype=int), ["a", "b", "c"])
    assert (m["n"], m["accuracy"], m["top5_accuracy"], m["macro_f1"]) == (0, 0.0, None, 0.0)
    assert m["per_class"]["a"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert m["absent_classes"] == ["a", "b", "c"]
    assert m["confusion"] == [[0] * 3] * 3
    assert _json_ready(m)


def test_logits_of_the_wrong_shape_are_refused():
    with pytest.raises(UsageError, match=r"shape \(4, 2\).*\(4, 3\)"):
        metrics(np.zeros((4, 2)), np.zeros(4, dtype=int), ["a", "b", "c"])
