"""A fitted run is calibrated: the temperature is fitted on validation and folded into the head, so the saved
weights alone (plain timm, strict loading) give the calibrated probabilities, and no prediction changes."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from transferkit import ImageClassifier
from transferkit.data import load_data
from transferkit.stats.calibration import expected_calibration_error, fit_temperature
from transferkit.stats.metrics import softmax


@pytest.fixture(scope="module")
def fitted(digits_probe_run):
    """The session's digits probe, loaded as predict loads it (fp32), and the splits it was fitted on."""
    out = digits_probe_run.out
    return ImageClassifier.load(out, precision="fp32"), load_data("digits", seed=0), out


def test_the_temperature_is_fitted_on_validation_and_folded_into_the_head(fitted):
    clf, splits, out = fitted
    cal = json.loads((out / "transferkit.json").read_text())["metrics"]["calibration"]
    t = cal["temperature"]
    val = clf.decision_function(splits.val)  # calibrated logits = raw logits / T
    raw = val * t
    assert fit_temperature(raw, splits.val.labels) == pytest.approx(t, rel=1e-2)  # T is the fit of the raw logits
    assert fit_temperature(val, splits.val.labels) == pytest.approx(1.0, abs=1e-2)  # nothing left to calibrate
    # The fit saw the probe's logits on the cached (float16) features, these come from the images in fp32: a few
    # examples change confidence bin, so the binned ECE agrees to a few thousandths, not exactly.
    assert cal["val_ece_before"] == pytest.approx(expected_calibration_error(softmax(raw), splits.val.labels), abs=5e-3)
    assert cal["val_ece_after"] == pytest.approx(expected_calibration_error(softmax(val), splits.val.labels), abs=5e-3)
    assert (raw.argmax(1) == val.argmax(1)).all()  # the argmax, hence every prediction, is unchanged
    test = clf.metrics_["test"]
    assert test["ece"] == pytest.approx(cal["test_ece_after"]) and "test_ece_before" in cal


def test_plain_timm_strict_loading_gives_the_calibrated_logits(fitted):
    import timm

    clf, splits, out = fitted
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=len(clf.classes_))
    model.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    model.eval()
    loader = torch.utils.data.DataLoader(clf.backbone_.dataset(splits.test.subset(range(32)), "none"), batch_size=32)
    x = next(iter(loader))[0]
    with torch.no_grad():
        plain = model(x).numpy()
    ours = clf.decision_function(splits.test.subset(range(32)))
    np.testing.assert_allclose(plain, ours, atol=1e-4)
    np.testing.assert_allclose(softmax(plain), clf.predict_proba(splits.test.subset(range(32))), atol=1e-5)
