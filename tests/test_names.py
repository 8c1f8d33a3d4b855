"""Each backbone name means one thing: builtin:NAME the built-in, timm:NAME or a bare timm name timm's model."""

import json
import logging
import shutil
import warnings

import pytest
from huggingface_hub import constants

from transferkit.backbones import load_backbone, names
from transferkit.backbones.names import canonical_name
from transferkit.errors import ModelError, UsageError

DEPRECATION = (
    "'efficientnet_lite0' now names the built-in for compatibility; from the next release it will mean timm's "
    "efficientnet_lite0. Write 'builtin:efficientnet_lite0' for this one or 'timm:efficientnet_lite0' for timm's."
)


@pytest.fixture
def fresh_warnings(monkeypatch):
    """A process that has not announced the legacy name yet."""
    monkeypatch.setattr(names, "_warned", set())


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No hub and an empty hub cache: timm's pretrained weights cannot be had."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("timm:resnet50", "resnet50"),
        ("timm:resnet50.a1_in1k", "resnet50.a1_in1k"),
        ("timm:efficientnet_lite0", "timm:efficientnet_lite0"),
        ("builtin:efficientnet_lite1", "builtin:efficientnet_lite1"),
        ("efficientnet_lite1", "efficientnet_lite1"),
        ("hf-hub:a/b", "hf-hub:a/b"),
    ],
)
def test_canonical_names(name, shown):
    """timm:NAME is written bare, unless bare it would still mean the built-in (the one legacy name)."""
    assert canonical_name(name) == shown


@pytest.mark.parametrize(
    ("name", "shown", "arch"),
    [
        ("timm:efficientnet_lite0", "timm:efficientnet_lite0", "efficientnet_lite0"),
        ("efficientnet_lite1", "efficientnet_lite1", "efficientnet_lite1"),
        ("tf_efficientnet_lite0", "tf_efficientnet_lite0", "tf_efficientnet_lite0"),
        ("timm:resnet18", "resnet18", "resnet18"),
    ],
)
def test_timm_names_build_timm_models(name, shown, arch):
    bb = load_backbone(name, 3, weights="none")
    assert (bb.spec.name, bb.spec.arch, bb.spec.weights) == (shown, arch, "none")
    if "efficientnet_lite" in arch:  # timm's own efficientnet_liteN pads like PyTorch; the tf_ ports pad like TensorFlow
        assert type(bb.model.conv_stem).__name__ == ("Conv2dSame" if arch.startswith("tf_") else "Conv2d")
        assert bb.data_config["mean"] == ((0.5,) * 3 if arch.startswith("tf_") else (0.485, 0.456, 0.406))


def test_timm_efficientnet_lite0_goes_to_the_hub_not_the_builtin(offline_hub, fresh_warnings):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no deprecation message: the name is explicit
        with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set and 'timm:efficientnet_lite0' is not in the hub cache"):
            load_backbone("timm:efficientnet_lite0", 3)


def test_a_timm_architecture_without_weights_fails_before_any_download(offline_hub):
    with pytest.raises(ModelError, match=r"timm has no pretrained weights for 'efficientnet_lite1'.*'builtin:efficientnet_lite1'"):
        load_backbone("efficientnet_lite1", 3)
    with pytest.raises(UsageError, match=r"no weights of that tag.*resnet50\.a1_in1k"):
        load_backbone("resnet50.nosuch", 3)


def test_legacy_name_gives_the_builtin_with_one_deprecation_message(fresh_warnings, caplog):
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        with pytest.warns(FutureWarning) as record:
            bb = load_backbone("efficientnet_lite0", 3)
        again = load_backbone("efficientnet_lite0", 3)  # announced once per process
    assert [str(w.message) for w in record] == [DEPRECATION]
    assert record[0].filename == __file__  # the warning points at the caller's line, not transferkit's
    assert [r.getMessage() for r in caplog.records if "now names" in r.getMessage()] == [DEPRECATION]
    assert caplog.records[0].name.startswith("transferkit.")
    for b in (bb, again):
        assert (b.spec.name, b.spec.arch, b.spec.weights) == ("builtin:efficientnet_lite0", "tf_efficientnet_lite0", "builtin")


def test_builtin_names_never_warn(fresh_warnings, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bb = load_backbone("builtin:efficientnet_lite0", 3)
    assert bb.spec.name == "builtin:efficientnet_lite0" and not caplog.records


def test_suggestions_include_the_builtins():
    with pytest.raises(UsageError, match="Did you mean: builtin:efficientnet_lite0, efficientnet_lite0"):
        load_backbone("efficientnet_lite0x")
    with pytest.raises(UsageError, match=r"Unknown built-in 'builtin:efficientnet_lite9'.*builtin:efficientnet_lite\d"):
        load_backbone("builtin:efficientnet_lite9")


def test_a_run_saved_under_the_legacy_name_loads_without_a_message(colours_run, tmp_path, fresh_warnings, caplog):
    from transferkit import ImageClassifier

    run = shutil.copytree(colours_run[0], tmp_path / "old")
    meta = json.loads((run / "transferkit.json").read_text())
    meta["backbone"]["name"] = "efficientnet_lite0"  # what runs were saved with before the builtin: names
    (run / "transferkit.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.INFO, logger="transferkit"), warnings.catch_warnings():
        warnings.simplefilter("error")
        clf = ImageClassifier.load(run)
        clf.predict([next(colours_run[1].rglob("*.png"))])
    assert clf.model == "builtin:efficientnet_lite0" and clf.meta_.backbone["name"] == "builtin:efficientnet_lite0"
    assert not [r for r in caplog.records if "now names" in r.getMessage()]
