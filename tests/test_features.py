import numpy as np
import pytest
import torch

from transferkit.backbones import load_backbone
from transferkit.data import load_data, make_transform, resolve_data_config
from transferkit.features import FeatureCache, cached_features, feature_key


@pytest.fixture(scope="module")
def setup():
    bb = load_backbone("efficientnet_lite0", 10)
    images = load_data("digits").val.subset(range(40))
    cfg = resolve_data_config(bb.data_config, None, images.preprocess_hint)
    return bb, images, cfg


def test_cache_miss_then_hit_gives_identical_features(setup, tmp_path):
    bb, images, cfg = setup
    cache = FeatureCache(tmp_path)
    kw = dict(cache=cache, device=torch.device("cpu"), dtype=None, progress=False)
    first, hit1 = cached_features(bb, images, make_transform(cfg), cfg, **kw)
    second, hit2 = cached_features(bb, images, make_transform(cfg), cfg, **kw)
    assert (hit1, hit2) == (False, True)
    assert first.dtype == np.float16 and first.shape == (40, 1280)
    np.testing.assert_array_equal(first, second)
    assert not list(tmp_path.glob(".tmp-*"))  # nothing half-written left behind


def test_corrupt_cache_entry_is_detected_and_rebuilt(setup, tmp_path):
    bb, images, cfg = setup
    cache = FeatureCache(tmp_path)
    kw = dict(cache=cache, device=torch.device("cpu"), dtype=None, progress=False)
    good, _ = cached_features(bb, images, make_transform(cfg), cfg, **kw)
    good = np.array(good)
    data = next(tmp_path.glob("*/features.npy"))
    raw = bytearray(data.read_bytes())
    raw[-10:] = b"\x00" * 10
    data.write_bytes(bytes(raw))
    again, hit = cached_features(bb, images, make_transform(cfg), cfg, **kw)
    assert not hit
    np.testing.assert_array_equal(good, again)


def test_key_changes_with_weights_preprocessing_inputs_and_cut(setup):
    bb, images, cfg = setup
    ids = images.identities()
    base = feature_key(bb, cfg, "float32", ids)
    assert base == feature_key(bb, dict(cfg), "float32", list(ids))
    other_weights = load_backbone("efficientnet_lite0", 10, weights="none")
    assert feature_key(other_weights, cfg, "float32", ids) != base
    assert feature_key(bb, {**cfg, "input_size": (3, 96, 96)}, "float32", ids) != base
    assert feature_key(bb, cfg, "bfloat16", ids) != base
    assert feature_key(bb, cfg, "float32", ids[:-1]) != base
    assert feature_key(bb, cfg, "float32", ids, cut="blocks.5") != base
