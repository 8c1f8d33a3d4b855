"""Shared and scarce resources: one feature cache used by two processes, a full disk, an unwritable --out."""

import errno
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import write_folder
from transferkit.cache.features import FeatureCache, FeatureWriter
from transferkit.errors import CacheError

N, DIM = 8, 1280  # 8 images, efficientnet_lite0's pooled features


def tiny_images():
    from transferkit.data import ArrayImages

    arrays = np.random.default_rng(0).integers(0, 255, (N, 32, 32, 3), dtype=np.uint8)
    return ArrayImages(arrays, np.arange(N) % 2, ["a", "b"], name="tiny")


def compute_together(root: str, out: str, barrier) -> None:
    """Child process: compute features into `root`; commit only when the other process is ready to commit too."""
    torch.set_num_threads(1)
    from transferkit.backbones import load_backbone
    from transferkit.cache.features import cached_features

    commit = FeatureWriter.commit

    def commit_together(self, meta):  # the real commit, started at the same moment in both processes
        barrier.wait(timeout=300)
        return commit(self, meta)

    FeatureWriter.commit = commit_together
    bb = load_backbone("builtin:efficientnet_lite0", 2)
    bb.configure_input(64)
    arr, hit = cached_features(bb, tiny_images(), cache=FeatureCache(Path(root)), device=torch.device("cpu"), dtype=None, progress=False)
    np.save(out, np.asarray(arr))
    Path(out).with_suffix(".json").write_text(json.dumps({"hit": hit}))


@pytest.mark.subprocess
def test_two_processes_computing_the_same_features_share_one_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    root = tmp_path / "cache"
    procs = [ctx.Process(target=compute_together, args=(str(root), str(tmp_path / f"{i}.npy"), barrier)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0, 0]

    a, b = np.load(tmp_path / "0.npy"), np.load(tmp_path / "1.npy")
    assert a.shape == (N, DIM) and a.dtype == np.float16
    np.testing.assert_array_equal(a, b)
    assert [json.loads((tmp_path / f"{i}.json").read_text())["hit"] for i in range(2)] == [False, False]
    entries = sorted(os.listdir(root))
    assert len(entries) == 1 and not entries[0].startswith(".")  # one entry, no temporary folder left
    np.testing.assert_array_equal(FeatureCache(root).load(entries[0]), a)  # and it verifies


def write_entry(cache: FeatureCache, key: str, value: float) -> np.ndarray:
    w = cache.writer(key, 4, 3)
    w.array[:] = value
    return np.asarray(w.commit({"shape": [4, 3]}))


def test_second_commit_of_a_key_returns_the_first(tmp_path):
    cache = FeatureCache(tmp_path)
    first, second = cache.writer("k", 4, 3), cache.writer("k", 4, 3)
    first.array[:], second.array[:] = 1, 2
    np.testing.assert_array_equal(first.commit({"shape": [4, 3]}), 1)
    np.testing.assert_array_equal(second.commit({"shape": [4, 3]}), 1)  # lost the race: uses the winner's
    assert os.listdir(tmp_path) == ["k"]


def test_commit_replaces_a_corrupt_entry_in_its_way(tmp_path):
    cache = FeatureCache(tmp_path)
    write_entry(cache, "k", 1)
    (tmp_path / "k" / "features.npy").write_bytes(b"garbage")
    np.testing.assert_array_equal(write_entry(cache, "k", 2), 2)
    np.testing.assert_array_equal(cache.load("k"), 2)
    assert os.listdir(tmp_path) == ["k"]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def assert_cache_full_message(e: CacheError, root: Path) -> None:
    text = str(e)
    assert "feature cache is full" in text and str(root) in text
    assert "--no-cache" in text and "TRANSFERKIT_CACHE" in text


def test_full_disk_when_reserving_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(CacheError) as info:
        FeatureCache(tmp_path).writer("k", 1000, 1280)
    assert_cache_full_message(info.value, tmp_path)
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_full_disk_when_committing(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    w = cache.writer("k", 4, 3)
    w.array[:] = 1
    real = Path.write_text
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: no_space() if self.name == "manifest.json" else real(self, *a, **k))
    with pytest.raises(CacheError) as info:
        w.commit({"shape": [4, 3]})
    assert_cache_full_message(info.value, tmp_path)
    assert os.listdir(tmp_path) == [] and cache.load("k") is None


def test_fit_on_a_full_disk_says_so_and_exits_1(tmp_path, monkeypatch):
    from transferkit.cli.app import app

    data = write_folder(tmp_path / "d", per_class=4)
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(cache))
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    result = CliRunner().invoke(app, ["fit", str(data), "--out", str(tmp_path / "run"), "-q", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())  # undo rich's line wrapping
    assert "feature cache is full" in text and "--no-cache" in text and str(cache / "features") in text
    assert isinstance(result.exception, SystemExit)  # a message, not a traceback
    assert not any(p.name.startswith(".tmp-") for p in (cache / "features").iterdir())
    assert not (tmp_path / "run" / "transferkit.json").exists()


# ---------------------------------------------------------------- an unwritable run directory


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_fit_refuses_an_unwritable_out_before_training(tmp_path, monkeypatch, where):
    from transferkit.cli.app import app

    (tmp_path / "notes.txt").write_text("a file, not a folder")
    out = tmp_path / "notes.txt" / "run" if where == "under_a_file" else tmp_path / "notes.txt"
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(cache))
    result = CliRunner().invoke(app, ["fit", "digits", "--out", str(out), "-q"])
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "Cannot" in text and str(tmp_path / "notes.txt") in text and "--out" in text
    assert isinstance(result.exception, SystemExit)  # a message, not a traceback
    assert not cache.exists()  # refused before any features were computed


def test_check_writable_dir_accepts_new_and_existing_folders(tmp_path):
    from transferkit.runs.directory import check_writable_dir

    check_writable_dir(tmp_path / "new" / "deeper")
    check_writable_dir(tmp_path)
    assert os.listdir(tmp_path) == []  # the check creates nothing


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_writable_dir_refuses_a_read_only_folder(tmp_path):
    from transferkit.errors import RunError
    from transferkit.runs.directory import check_writable_dir

    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(RunError, match="does not accept new files"):
        check_writable_dir(tmp_path / "ro" / "run")
