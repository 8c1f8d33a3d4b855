"""Frozen-prefix caching: the split is exact, cached outputs reproduce the uncached forward, the key tracks
weights, preprocessing and the cut, and partial fine-tuning trains on them (or says why not)."""

import json

import numpy as np
import pytest
import timm
import torch

from conftest import TINY, finetune_phase_alone, invoke_cli, write_folder
from transferkit import ImageClassifier
from transferkit.backbones import Backbone, BackboneSpec, ImageBackbone, load_backbone
from transferkit.backbones.base import NoPrefix
from transferkit.backbones.prefix import split_frozen_prefix
from transferkit.cache.features import FeatureCache, cached_features, feature_key
from transferkit.data import load_data
from transferkit.inference.extraction import prefix_cut


def random_head_(bb: Backbone) -> Backbone:
    """New heads start at zero (all logits 0); parity needs logits that depend on the input."""
    torch.manual_seed(0)
    torch.nn.init.normal_(bb.model.get_classifier().weight, std=0.05)
    return bb


def small_vit() -> Backbone:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, depth=4)
    return ImageBackbone(model, BackboneSpec("vit-small-test", "vit_tiny_patch16_224", "none", "random"))


@pytest.fixture(scope="module")
def lite0():
    return random_head_(load_backbone("builtin:efficientnet_lite0", 3))


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return load_data(write_folder(tmp_path_factory.mktemp("prefix") / "colours", per_class=10), seed=0)


@pytest.mark.parametrize(
    "make",
    [lambda: load_backbone("builtin:efficientnet_lite0", 3), lambda: load_backbone("resnet18", 3, weights="none"), small_vit],
    ids=["builtin:efficientnet_lite0", "resnet18", "vit"],
)
def test_suffix_of_prefix_is_the_model_at_every_cut(make):
    bb = random_head_(make())
    bb.model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = bb.model(x)
        for top in range(1, len(bb.blocks)):
            split = split_frozen_prefix(bb, top)
            assert not isinstance(split, NoPrefix), split
            torch.testing.assert_close(split.suffix(split.prefix(x)), expected, rtol=0, atol=1e-5)
            trainable = {id(p) for p in split.suffix.parameters()}
            top_params = dict(bb.model.named_parameters())
            for block in bb.blocks[len(bb.blocks) - top :]:  # the suffix holds the model's own tensors
                assert all(id(top_params[n]) in trainable for n in block.param_names)
            for block in bb.blocks[: len(bb.blocks) - top]:
                assert not any(id(top_params[n]) in trainable for n in block.param_names)
    assert split_frozen_prefix(bb, 0) == NoPrefix("every block is frozen")
    assert split_frozen_prefix(bb, len(bb.blocks)) == NoPrefix("nothing is frozen")


def test_cached_prefix_outputs_give_the_uncached_logits_within_bf16_tolerance(lite0, colours, tmp_path):
    lite0.configure_input(64)
    cfg = lite0.data_config
    images = colours.train
    data = lite0.dataset(images)
    x = torch.stack([data[i][0] for i in range(len(images))])
    with torch.no_grad():
        uncached = lite0.model.eval()(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_error = (lite0.model(x).float() - uncached).abs().max()  # what bf16 costs without any cache
    assert uncached.abs().max() > 1.0  # a real signal, not zeros
    split = split_frozen_prefix(lite0, 2)
    cut = prefix_cut(split, cfg["input_size"])
    for dtype, tolerance in ((None, 1e-3 * uncached.abs().max()), (torch.bfloat16, 1.5 * bf16_error)):
        kw = dict(cache=FeatureCache(tmp_path), device=torch.device("cpu"), dtype=dtype, progress=False, cut=cut)
        _cached, hit = cached_features(lite0, images, **kw)
        again, hit2 = cached_features(lite0, images, **kw)
        assert (hit, hit2) == (False, True) and again.dtype == np.float16 and again.shape == (len(images), cut.size)
        with torch.no_grad():
            via_cache = split.suffix(torch.from_numpy(np.asarray(again, np.float32)).view(len(images), *cut.shape))
        assert (via_cache - uncached).abs().max() <= tolerance, dtype  # fp32: float16 storage only
        assert (via_cache.argmax(1) == uncached.argmax(1)).float().mean() >= 0.95


def test_prefix_key_changes_with_weights_preprocessing_and_cut_not_with_the_trained_top(colours):
    bb = random_head_(load_backbone("builtin:efficientnet_lite0", 3))
    bb.configure_input(64)
    cfg = bb.data_config
    ids = colours.train.identities()

    def key(top: int = 2, config: dict = cfg) -> str:
        return feature_key(bb, config, "float32", ids, prefix_cut(split_frozen_prefix(bb, top), config["input_size"]).name)

    base = key()
    assert key() == base
    assert key(top=3) != base  # cut point
    assert key(config={**cfg, "input_size": (3, 96, 96)}) != base  # preprocessing
    assert (
        feature_key(bb, {**cfg, "mean": (0.4, 0.4, 0.4)}, "float32", ids, prefix_cut(split_frozen_prefix(bb, 2), cfg["input_size"]).name)
        != base
    )
    top = dict(bb.model.named_parameters())[bb.blocks[-1].param_names[0]]
    with torch.no_grad():
        top.add_(1.0)  # what fine-tuning changes: not an input of the cached part
    assert key() == base
    frozen = dict(bb.model.named_parameters())[bb.blocks[0].param_names[0]]
    with torch.no_grad():
        frozen.mul_(1.01)  # different weights below the cut
    assert key() != base


def test_partial_finetune_trains_the_top_on_cached_outputs_and_reuses_them(colours):
    pretrained = load_backbone("builtin:efficientnet_lite0", 3).model.state_dict()
    clf = ImageClassifier(strategy="finetune:last=1", **TINY).fit(colours)
    note = clf.phases_[-1].prefix_cache
    assert note["used"] and (note["train"], note["val"]) == ("miss", "miss") and note["bytes"] > 0
    trained = clf.model_.state_dict()
    for block in clf.backbone_.blocks[:-1]:
        assert all(torch.equal(trained[n], pretrained[n]) for n in block.param_names)
    bb, alone = finetune_phase_alone(colours, "finetune:last=1")
    assert alone["prefix_cache"]["used"]
    trained = bb.model.state_dict()
    top = bb.blocks[-1].param_names
    assert any(not torch.equal(trained[n], pretrained[n]) for n in top)  # the suffix trained the model's own weights
    for block in bb.blocks[:-1]:
        assert all(torch.equal(trained[n], pretrained[n]) for n in block.param_names)
    again = ImageClassifier(strategy="finetune:last=1", **TINY).fit(colours)
    assert (again.phases_[-1].prefix_cache["train"], again.phases_[-1].prefix_cache["val"]) == ("hit", "hit")
    np.testing.assert_allclose(again.predict_proba(colours.test), clf.predict_proba(colours.test), atol=1e-5)


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        (dict(strategy="finetune:last=1", cache_budget_gb=0), "the cache budget is 0"),
        (dict(strategy="finetune:last=1", augment="light"), "augment=light"),
        (dict(strategy="finetune:last=1", cache=False), "the feature cache is off"),
        (dict(strategy="gradual"), "gradual unfreezing"),
        (dict(strategy="finetune:all"), "nothing is frozen"),
    ],
)
def test_prefix_cache_is_skipped_with_the_reason_recorded(colours, settings, reason):
    clf = ImageClassifier(**{**TINY, "epochs": 1, **settings}).fit(colours)
    note = clf.phases_[-1].prefix_cache
    assert not note["used"] and reason in note["reason"]


def test_cli_refuses_a_prefix_cache_over_the_budget_and_trains_on_images(tmp_path):
    data = write_folder(tmp_path / "colours", per_class=8)
    out = tmp_path / "run"
    proc = invoke_cli(
        "fit",
        str(data),
        "--strategy",
        "finetune:last=1",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--cache-budget",
        "0.000001",
        "--out",
        str(out),
        "-q",
    )
    assert "Frozen-prefix cache refused" in proc.stderr and "--cache-budget" in proc.stderr
    note = json.loads((out / "transferkit.json").read_text())["strategy"]["phases"][-1]["prefix_cache"]
    assert not note["used"] and note["bytes"] > 1000
    # -q keeps warnings only; the cache's use is an info message
    ok = invoke_cli(
        "fit", str(data), "--strategy", "finetune:last=1", "--epochs", "1", "--image-size", "32", "--out", str(tmp_path / "run2")
    )
    assert "Frozen-prefix cache: blocks up to" in ok.stderr
