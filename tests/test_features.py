import logging

import numpy as np
import pytest
import torch

from transferkit.backbones import load_backbone
from transferkit.cache.features import FeatureCache, cached_features, feature_key
from transferkit.data import load_data


@pytest.fixture(scope="module")
def setup():
    bb = load_backbone("builtin:efficientnet_lite0", 10)
    images = load_data("digits").val.subset(range(40))
    bb.configure_input(None, images.preprocess_hint)
    return bb, images, bb.data_config


def test_cache_miss_then_hit_gives_identical_features(setup, tmp_path):
    bb, images, _cfg = setup
    cache = FeatureCache(tmp_path)
    kw = dict(cache=cache, device=torch.device("cpu"), dtype=None, progress=False)
    first, hit1 = cached_features(bb, images, **kw)
    second, hit2 = cached_features(bb, images, **kw)
    assert (hit1, hit2) == (False, True)
    assert first.dtype == np.float16 and first.shape == (40, 1280)
    np.testing.assert_array_equal(first, second)
    assert not list(tmp_path.glob(".tmp-*"))  # nothing half-written left behind


def test_corrupt_cache_entry_is_detected_and_rebuilt(setup, tmp_path):
    bb, images, _cfg = setup
    cache = FeatureCache(tmp_path)
    kw = dict(cache=cache, device=torch.device("cpu"), dtype=None, progress=False)
    good, _ = cached_features(bb, images, **kw)
    good = np.array(good)
    data = next(tmp_path.glob("*/features.npy"))
    raw = bytearray(data.read_bytes())
    raw[-10:] = b"\x00" * 10
    data.write_bytes(bytes(raw))
    again, hit = cached_features(bb, images, **kw)
    assert not hit
    np.testing.assert_array_equal(good, again)


def test_key_changes_with_weights_preprocessing_inputs_and_cut(setup):
    bb, images, cfg = setup
    ids = images.identities()
    base = feature_key(bb, cfg, "float32", ids)
    assert base == feature_key(bb, dict(cfg), "float32", list(ids))
    other_weights = load_backbone("builtin:efficientnet_lite0", 10, weights="none")
    assert feature_key(other_weights, cfg, "float32", ids) != base
    assert feature_key(bb, {**cfg, "input_size": (3, 96, 96)}, "float32", ids) != base
    assert feature_key(bb, cfg, "bfloat16", ids) != base
    assert feature_key(bb, cfg, "float32", ids[:-1]) != base
    assert feature_key(bb, cfg, "float32", ids, cut="blocks.5") != base


def test_out_of_memory_halves_the_batch_and_gives_the_same_features(setup, caplog, monkeypatch):
    """No GPU here: a backbone that raises torch's real OutOfMemoryError above 8 images stands in for one."""
    from transferkit.inference.extraction import extract_features

    # The CLI, run in-process by other tests, stops transferkit's logger propagating; caplog listens at the root.
    monkeypatch.setattr(logging.getLogger("transferkit"), "propagate", True)
    bb, images, _cfg = setup
    kw = dict(device=torch.device("cpu"), dtype=None, progress=False, batch_size=32, engine="torch")  # CUDA's engine
    expected = extract_features(bb, images, **kw)
    real = bb.features

    def small_memory(x):
        if len(x) > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x)

    bb.features = small_memory
    try:
        with caplog.at_level(logging.WARNING, logger="transferkit"):
            got = extract_features(bb, images, **kw)
    finally:
        bb.features = real
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), atol=2e-3)
    log = caplog.text
    assert "out of memory at batch size 32: halving to 16" in log and "halving to 8" in log
    assert log.count("halving") == 2  # the smaller size sticks for the following batches
