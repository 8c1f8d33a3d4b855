"""The estimators' contract: settings validated before any work, scikit-learn's shape, one source of defaults."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.base import clone

from conftest import invoke_cli, write_folder
from transferkit import ImageClassifier, TextClassifier, UsageError, load_classifier
from transferkit.classifier import FITTED

BAD_SETTINGS = [  # (classifier, keyword, value, words the message must hold)
    (ImageClassifier, "optimizer", "adam", ["optimizer", "'adam'", "adamw", "sgd", "Did you mean: adamw"]),
    (ImageClassifier, "augment", "heavy", ["augment", "'heavy'", "none, light, strong"]),
    (ImageClassifier, "class_weights", "balanced", ["class_weights", "'balanced'", "auto"]),
    (ImageClassifier, "precision", "fp8", ["precision", "'fp8'", "bf16", "Did you mean"]),
    (ImageClassifier, "device", "tpu", ["device", "tpu", "cuda:N"]),
    (ImageClassifier, "bn", "frozen", ["bn", "'frozen'", "all-frozen, frozen-blocks", "Did you mean"]),
    (ImageClassifier, "strategy", "finetune:lst=1", ["finetune:lst=1", "finetune:last=N"]),
    (ImageClassifier, "lr", -1.0, ["lr", "-1.0", "> 0"]),
    (ImageClassifier, "batch_size", 0, ["batch_size", "0", ">= 1"]),
    (ImageClassifier, "epochs", 0, ["epochs", ">= 1"]),
    (ImageClassifier, "epochs", -3, ["epochs", "-3"]),
    (ImageClassifier, "image_size", 8, ["image_size", "16"]),
    (ImageClassifier, "split", (0.5, 0.5), ["split", "sum to 1"]),
    (TextClassifier, "pooling", "max", ["pooling", "'max'", "auto, mean, cls"]),
    (TextClassifier, "max_length", 1, ["max_length", "2"]),
]


@pytest.fixture
def no_work(monkeypatch):
    """Reading data or extracting features fails the test: validation must come first."""
    import transferkit.cache.features as features
    import transferkit.data as data

    def refuse(*args, **kwargs):
        raise AssertionError("data was read or features extracted before the settings were validated")

    for name in ("load_image_data", "load_text_data", "read_paths"):
        monkeypatch.setattr(data, name, refuse)
    monkeypatch.setattr(features, "extract_features", refuse)


@pytest.mark.parametrize(("cls", "name", "value", "words"), BAD_SETTINGS, ids=[f"{c.__name__}-{n}={v}" for c, n, v, _ in BAD_SETTINGS])
def test_every_bad_setting_is_refused_before_any_work(no_work, cls, name, value, words):
    with pytest.raises(UsageError) as info:
        cls(**{name: value}).fit("digits" if cls is ImageClassifier else "texts.csv")
    for w in words:
        assert w in str(info.value), f"{w!r} not in: {info.value}"


@pytest.mark.parametrize(
    ("cls", "name", "value", "words"),
    [
        (ImageClassifier, "epoch", 3, ["unknown setting 'epoch'", "Did you mean: epochs"]),
        (TextClassifier, "image_size", 64, ["image_size only applies to images"]),
        (TextClassifier, "bn", "frozen-blocks", ["bn only applies to images"]),
        (TextClassifier, "augment", "strong", ["augment only applies to images"]),
        (ImageClassifier, "max_length", 64, ["max_length only applies to texts"]),
    ],
)
def test_unknown_and_other_modality_settings_are_refused_when_given(no_work, cls, name, value, words):
    with pytest.raises(UsageError) as info:
        cls(**{name: value})
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("cls", [ImageClassifier, TextClassifier])
def test_scikit_learn_clone_params_and_repr(cls):
    clf = cls(strategy="lp-ft", epochs=3, seed=7)
    assert repr(clf) == f"{cls.__name__}(epochs=3, seed=7, strategy='lp-ft')"
    params = clf.get_params()
    assert params["epochs"] == 3 and params["strategy"] == "lp-ft" and "unknown" not in params
    twin = clone(clf)
    assert twin is not clf and twin.get_params() == params
    assert clf.set_params(epochs=5) is clf and clf.epochs == 5 and twin.epochs == 3
    with pytest.raises(Exception, match="not fitted"):
        twin.predict(["x"])


def test_fit_and_load_leave_the_same_fitted_attributes(tmp_path):
    root = write_folder(tmp_path / "c", per_class=6)
    clf = ImageClassifier(strategy="feature-extraction", image_size=32).fit(root)
    loaded = load_classifier(clf.save(tmp_path / "run"))
    assert type(loaded) is ImageClassifier
    fitted = sorted(k for k in vars(clf) if k.endswith("_") and not k.startswith("_"))
    assert fitted == sorted(FITTED) == sorted(k for k in vars(loaded) if k.endswith("_") and k != "meta_")
    for name in ("classes_", "data_config_", "strategy_", "decision_", "config_", "phases_", "metrics_", "feature_cache_", "data_summary_"):
        assert getattr(loaded, name) == getattr(clf, name), name
    files = sorted((root / "red").glob("*"))[:3]
    np.testing.assert_allclose(loaded.predict_proba(files), clf.predict_proba(files), atol=1e-6)


def test_predict_takes_a_path_a_folder_pil_images_and_arrays(tmp_path):
    from PIL import Image

    root = write_folder(tmp_path / "c", per_class=6)
    clf = ImageClassifier(strategy="feature-extraction", image_size=32).fit(root)
    one = sorted((root / "red").glob("*.png"))[0]
    by_path = clf.predict_proba(str(one))
    assert by_path.shape == (1, 3)  # one path is one image, not its characters
    np.testing.assert_allclose(clf.predict_proba(Image.open(one)), by_path, atol=1e-6)
    np.testing.assert_allclose(clf.predict_proba(np.asarray(Image.open(one).convert("RGB"))), by_path, atol=1e-6)
    assert len(clf.predict(root / "red")) == 6 and clf.score(root) > 0.5
    assert clf.predict([]) == [] and clf.predict_proba([]).shape == (0, 3)
    with pytest.raises(UsageError, match="uint8"):
        clf.predict(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(UsageError, match="Cannot classify a dict"):
        clf.predict({"a": 1})


def without_volatile(meta: dict) -> dict:
    """transferkit.json without what differs between two identical runs: times, versions, cache state, and the
    settings as given (None where omitted: what a loaded estimator's get_params returns)."""
    meta = json.loads(json.dumps(meta))
    for key in ("versions", "feature_cache", "history", "settings"):
        meta.pop(key)
    meta["metrics"].pop("train_seconds")
    meta["metrics"].pop("feature_seconds")
    for phase in meta["strategy"]["phases"]:
        phase.pop("seconds")
    return meta


def test_an_option_given_with_its_default_value_behaves_like_an_omitted_one(tmp_path):
    root = write_folder(tmp_path / "c", per_class=6)
    base = ["fit", str(root), "--strategy", "feature-extraction", "--image-size", "32", "-q", "--no-cache"]
    invoke_cli(*base, "--out", str(tmp_path / "omitted"))
    invoke_cli(
        *base,
        "--out",
        str(tmp_path / "explicit"),
        "--batch-size",
        "32",
        "--seed",
        "0",
        "--split",
        "0.7,0.15,0.15",
        "--bn",
        "all-frozen",
        "--augment",
        "none",
        "--optimizer",
        "adamw",
        "--cache-budget",
        "10",
        "--precision",
        "auto",
        "--device",
        "auto",
        "--accumulate",
        "1",
        "--label-smoothing",
        "0",
    )
    a, b = (json.loads((tmp_path / d / "transferkit.json").read_text()) for d in ("omitted", "explicit"))
    assert without_volatile(a) == without_volatile(b)


def test_inspect_and_models_cover_text_backbones():
    info = json.loads(invoke_cli("inspect", "minilm", "--json").stdout)
    assert info["modality"] == "text" and info["feature_dim"] == 384 and len(info["blocks"]) == 7
    listing = invoke_cli("models", "mini").stdout
    assert "minilm" in listing and "Built-in text backbones" in listing


def test_a_fine_tune_that_never_beats_the_probe_keeps_the_probe(tmp_path):
    """lr 3.0 wrecks the pretrained blocks in one epoch: the run ends with the probe's weights, and says so."""
    root = write_folder(tmp_path / "c", per_class=8)
    probe = ImageClassifier(strategy="feature-extraction", image_size=32, precision="fp32").fit(root)
    wrecked = ImageClassifier(strategy="finetune:all", epochs=1, lr=3.0, image_size=32, precision="fp32").fit(root)
    head, tune = wrecked.phases_
    assert tune.kept_previous is True and tune.best_epoch == 0
    assert tune.best_val_acc == head.best_val_acc == wrecked.metrics_["val_accuracy"]
    assert wrecked.metrics_["test"]["accuracy"] == pytest.approx(probe.metrics_["test"]["accuracy"], abs=0.05)


def test_probe_ties_on_validation_go_to_the_lower_loss_not_the_strongest_regularisation():
    import torch

    from transferkit.training.probe import PROBE_C_GRID, fit_linear_probe

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 4
    y = np.repeat(np.arange(3), 20)
    x = centres[y] + rng.normal(size=(60, 16))  # separable: every C classifies validation alike
    t = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    result = fit_linear_probe(torch.nn.Linear(16, 3), t, t, progress=False)
    accs = [row["val_acc"] for row in result.history]
    assert len(set(accs)) == 1, "the fixture must tie on validation accuracy"
    chosen = result.history[result.best_epoch - 1]
    assert chosen["C"] > min(PROBE_C_GRID)
    assert chosen["train_loss"] < 0.5 * np.log(3)  # not the near-uniform probabilities of the strongest penalty


@pytest.mark.parametrize("cls", [ImageClassifier, TextClassifier])
def test_every_training_setting_is_a_keyword_of_the_estimator(cls):
    """A TrainConfig field the estimator does not take could never be set, and get_params would not show it."""
    import inspect

    from transferkit.classifier import IMAGE_ONLY
    from transferkit.training.config import TrainConfig

    keywords = set(inspect.signature(cls.__init__).parameters)
    expected = set(TrainConfig.names()) - (set(IMAGE_ONLY) if cls is TextClassifier else set())
    assert expected <= keywords, sorted(expected - keywords)
    assert expected <= set(cls().get_params())
