"""Decode once: stored pixels give the very tensors decoding gives, are cached and reused, refused over the budget,
skipped with a reason where the transform is random, and a fine-tune on them trains exactly as one that decodes."""

import json

import numpy as np
import pytest
import torch

from conftest import TINY, invoke_cli, write_folder
from transferkit import ImageClassifier
from transferkit.backbones import load_backbone
from transferkit.cache.features import FeatureCache
from transferkit.cache.pixels import decode_once, pixels_key, split_transform
from transferkit.data import load_data


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return load_data(write_folder(tmp_path_factory.mktemp("decoded") / "colours", per_class=8), seed=0)


@pytest.fixture
def lite0():
    bb = load_backbone("builtin:efficientnet_lite0", 3)
    bb.configure_input(48)
    return bb


def test_stored_pixels_are_bit_identical_to_decoding_each_time(colours, lite0, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    data, note = decode_once(lite0, {"train": (colours.train, "none")}, cache, 10**9, workers=0, progress=False)
    assert note["train"] == {"used": True, "cache": "miss", "bytes": len(colours.train) * 48 * 48 * 3}
    plain = lite0.dataset(colours.train, "none")
    for i in range(len(colours.train)):
        x, y, j = data["train"][i]
        px, py, pj = plain[i]
        assert x.dtype == torch.float32 and torch.equal(x, px) and (y, j) == (py, pj)
    entry = cache.path(pixels_key(lite0.data_config, colours.train.identities()))
    stored = np.load(entry / "features.npy")
    assert stored.dtype == np.uint8 and stored.shape == (len(colours.train), 48 * 48 * 3)
    assert json.loads((entry / "manifest.json").read_text())["item_shape"] == [48, 48, 3]


def test_pixels_are_reused_and_rebuilt_when_the_entry_is_damaged(colours, lite0, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    splits = {"val": (colours.val, "none")}
    decode_once(lite0, splits, cache, 10**9, workers=0, progress=False)
    _again, note = decode_once(lite0, splits, cache, 10**9, workers=0, progress=False)
    assert note["val"]["cache"] == "hit"
    entry = cache.path(pixels_key(lite0.data_config, colours.val.identities()))
    with open(entry / "features.npy", "r+b") as f:  # flip bytes in the pixel data: the sha256 no longer matches
        f.seek(-10, 2)
        f.write(b"\xff" * 10)
    rebuilt, note = decode_once(lite0, splits, cache, 10**9, workers=0, progress=False)
    assert note["val"]["cache"] == "miss"
    plain = lite0.dataset(colours.val, "none")  # `again` maps the damaged file, so compare with decoding
    assert all(torch.equal(rebuilt["val"][i][0], plain[i][0]) for i in range(len(colours.val)))


def test_the_key_follows_the_preprocessing_and_the_inputs(colours, lite0):
    base = pixels_key(lite0.data_config, colours.train.identities())
    assert pixels_key(lite0.data_config, colours.val.identities()) != base
    assert pixels_key({**lite0.data_config, "input_size": (3, 64, 64)}, colours.train.identities()) != base
    assert pixels_key({**lite0.data_config, "crop_pct": 0.5}, colours.train.identities()) != base
    assert pixels_key(dict(lite0.data_config), list(colours.train.identities())) == base  # same inputs, same key


def test_random_augmentation_and_a_small_budget_are_said_not_silently_ignored(colours, lite0, tmp_path, caplog):
    cache = FeatureCache(tmp_path / "cache")
    splits = {"train": (colours.train, "light"), "val": (colours.val, "none")}
    data, note = decode_once(lite0, splits, cache, 10**9, workers=0, progress=False)
    assert set(data) == {"val"} and not note["train"]["used"] and "augment=light" in note["train"]["reason"]
    need = len(colours.val) * 48 * 48 * 3
    data, note = decode_once(lite0, splits, FeatureCache(tmp_path / "c2"), need - 1, workers=0, progress=False)
    assert not data and "Raise --cache-budget" in note["val"]["reason"] and note["val"]["bytes"] == need
    assert "Decoded-image cache refused" in caplog.text
    data, note = decode_once(lite0, splits, FeatureCache(tmp_path / "c3", enabled=False), 10**9, workers=0, progress=False)
    assert not data and note["val"]["reason"] == "the feature cache is off"


def test_split_transform_takes_the_tensor_steps_off_the_end(lite0):
    pixel, tensor = split_transform(lite0.dataset(load_data("digits", seed=0).val, "none").transform)
    assert [type(t).__name__ for t in pixel][-1] == "CenterCrop"
    assert [type(t).__name__ for t in tensor] in (["MaybeToTensor", "Normalize"], ["ToTensor", "Normalize"])
    assert split_transform(lambda img: img) is None


@pytest.mark.slow
def test_finetune_on_stored_pixels_trains_exactly_as_decoding_each_epoch(colours):
    settings = dict(TINY, strategy="finetune:all", seed=3)
    once = ImageClassifier(**settings).fit(colours)
    note = once.phases_[-1].decoded_cache
    assert note["train"]["used"] and note["val"]["used"]
    each = ImageClassifier(**settings, cache_budget_gb=0).fit(colours)
    assert each.phases_[-1].decoded_cache["train"] == {"used": False, "reason": "the cache budget is 0"}
    assert [r["val_acc"] for r in once.history_] == [r["val_acc"] for r in each.history_]
    a, b = once.model_.state_dict(), each.model_.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = ImageClassifier(**settings).fit(colours)
    assert again.phases_[-1].decoded_cache["train"]["cache"] == "hit"


def test_cli_records_the_decoded_cache_and_says_when_it_is_refused(tmp_path):
    data = write_folder(tmp_path / "colours", per_class=6)
    out = tmp_path / "run"
    proc = invoke_cli(
        "fit",
        str(data),
        "--strategy",
        "finetune:all",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--cache-budget",
        "0.000001",
        "--out",
        str(out),
    )
    assert "Decoded-image cache refused" in proc.stderr and "--cache-budget" in proc.stderr
    ok = invoke_cli("fit", str(data), "--strategy", "finetune:all", "--epochs", "1", "--image-size", "32", "--out", str(tmp_path / "run2"))
    assert "Decoded-image cache: train miss, val miss" in ok.stderr and "instead of decoding" in ok.stderr
    note = json.loads((tmp_path / "run2" / "transferkit.json").read_text())["strategy"]["phases"][-1]["decoded_cache"]
    assert note["train"]["used"] and note["val"]["cache"] == "miss"
