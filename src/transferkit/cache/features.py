"""The feature cache: frozen computations done once, stored on disk, keyed by what determines them.

The key covers the backbone identity and weights digest, the cut point, the
preprocessing, the engine and its compute precision and every input's identity. Features are
stored as float16 ``.npy`` with a manifest holding the file's sha256, written
to a temporary folder and renamed into place (atomic), verified on read and
rebuilt when stale or corrupt. Extraction streams batches into a memory-mapped
file, so memory stays flat however many images there are.

Processes may share one cache: when two compute the same key at once, the
first rename wins and the other uses the winner's verified entry. The file's
disk blocks are reserved before extraction, so a full disk is a
:class:`~transferkit.errors.CacheError` naming the cache (never a crash
mid-write), and a failed write leaves nothing behind. A process killed
mid-extraction (kill -9, power loss) leaves only its ``.tmp-*`` folder, which
is never read and is removed by the next process that writes to the cache.

Under torchrun the processes of one job share the extraction: each computes a
contiguous share of the images into its own shard file inside rank 0's
temporary folder, and rank 0 assembles them, commits the entry as above, and
every process then reads the one verified entry.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transferkit import distributed
from transferkit.atomic import pid_alive, sha256_file
from transferkit.backbones.base import Backbone
from transferkit.cache import DEFAULT_CACHE_BUDGET_GB  # noqa: F401  (re-exported: the cache's budget)
from transferkit.data.examples import Examples
from transferkit.data.named import cache_dir
from transferkit.errors import CacheError
from transferkit.inference.extraction import CUT_POINT, Cut, extract_features, input_shape, pooled_cut
from transferkit.inference.runners import EngineInfo, frozen_runner, plan_engine
from transferkit.inference.settings import default_engine

FORMAT = 1

STALE_TMP_SECONDS = 3600  # a temporary folder this old is abandoned even if its pid was reused


def feature_key(backbone: Backbone, data_config: dict, precision: str, identities: list[str], cut: str = CUT_POINT) -> str:
    """A hex key that changes when anything that determines the features changes."""
    ident = hashlib.sha256("\n".join(identities).encode()).hexdigest()
    payload = {
        "format": FORMAT,
        "backbone": backbone.spec.to_dict(),
        "cut": cut,
        "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(data_config.items())},
        "precision": precision,
        "inputs": ident,
        "n": len(identities),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class FeatureCache:
    """Feature arrays on disk under `root`, one folder per key."""

    root: Path
    enabled: bool = True

    @classmethod
    def default(cls, enabled: bool = True) -> FeatureCache:
        return cls(cache_dir() / "features", enabled)

    def path(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str) -> np.ndarray | None:
        """The cached array for `key`, or None when absent, stale or corrupt (which is removed)."""
        if not self.enabled:
            return None
        folder = self.path(key)
        if not folder.is_dir():
            return None
        try:  # from here a missing file means a damaged entry, which would also block the commit's rename
            manifest = json.loads((folder / "manifest.json").read_text())
            data = folder / "features.npy"
            if manifest.get("key") != key or manifest.get("sha256") != sha256_file(data):
                raise ValueError("manifest does not match the data")
            arr = np.load(data, mmap_mode="r")
            if list(arr.shape) != manifest["shape"]:
                raise ValueError("shape mismatch")
            return arr
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            shutil.rmtree(folder, ignore_errors=True)  # corrupt: rebuild
            return None

    def writer(self, key: str, n: int, dim: int, dtype: type = np.float16) -> FeatureWriter:
        return FeatureWriter(self, key, n, dim, dtype)


class FeatureWriter:
    """Streams rows into a memory-mapped file (float16 features; uint8 pixels) in a temporary folder; `commit` renames it in.

    Raises:
        CacheError: the cache folder cannot be written or its disk is full.
    """

    def __init__(self, cache: FeatureCache, key: str, n: int, dim: int, dtype: type = np.float16):
        self.cache, self.key = cache, key
        self.tmp = cache.root / f".tmp-{key}-{os.getpid()}-{time.time_ns()}"
        try:
            cache.root.mkdir(parents=True, exist_ok=True)
            remove_abandoned_tmp_(cache.root)
            self.tmp.mkdir()
            data = self.tmp / "features.npy"
            self.array = np.lib.format.open_memmap(data, mode="w+", dtype=dtype, shape=(n, dim))
            _reserve_disk(data)
        except OSError as e:
            self.abort()
            raise cache_failure(e, cache.root) from e

    def commit(self, meta: dict) -> np.ndarray:
        """Finish the file, write its manifest and rename the folder into place; returns the stored array."""
        try:
            self.array.flush()
            del self.array
            data = self.tmp / "features.npy"
            manifest = {"format": FORMAT, "key": self.key, "sha256": sha256_file(data), "created": time.time(), **meta}
            (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        except OSError as e:
            self.abort()
            raise cache_failure(e, self.cache.root) from e
        final = self.cache.path(self.key)
        for _ in range(2):
            try:
                os.replace(self.tmp, final)
                return np.load(final / "features.npy", mmap_mode="r")
            except OSError as e:
                # Renaming onto a non-empty folder fails: another process committed this key first.
                # Use theirs if it verifies; a corrupt one is removed by `load`, so the second try can rename.
                failure = e
                theirs = self.cache.load(self.key)
                if theirs is not None:
                    self.abort()
                    return theirs
        self.abort()
        raise cache_failure(failure, self.cache.root) from failure

    def abort(self) -> None:
        self.__dict__.pop("array", None)
        shutil.rmtree(self.tmp, ignore_errors=True)


def remove_abandoned_tmp_(root: Path) -> list[Path]:
    """Delete `.tmp-<key>-<pid>-<ns>` folders whose process is gone or that are over an hour old.

    Such folders are what a killed extraction leaves; `load` never reads them, so
    removing them only frees disk. Returns the folders removed.
    """
    removed = []
    for tmp in root.glob(".tmp-*"):
        parts = tmp.name.split("-")
        try:
            pid, age = int(parts[2]), time.time() - tmp.stat().st_mtime
        except (IndexError, ValueError, OSError):
            continue  # not ours, or removed meanwhile
        if pid != os.getpid() and (not pid_alive(pid) or age > STALE_TMP_SECONDS):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _reserve_disk(path: Path) -> None:
    """Allocate the file's blocks now: a full disk then fails here with ENOSPC, not with SIGBUS mid-write."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows: sparse files, best effort
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # file systems without fallocate
            raise
    finally:
        os.close(fd)


def cache_failure(e: OSError, root: Path) -> CacheError:
    """A CacheError that says what went wrong writing the cache under `root`, and the ways around it."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return CacheError(
            f"The feature cache is full: no space left on the device holding {root} ({e.strerror}). "
            "Free space there, set TRANSFERKIT_CACHE to a folder on a disk with room, or pass "
            "--no-cache (cache=False in Python) to compute features without storing them."
        )
    return CacheError(
        f"Cannot write the feature cache at {root}: {e}. Set TRANSFERKIT_CACHE to a writable folder, "
        "or pass --no-cache (cache=False in Python)."
    )


def cached_features(
    backbone: Backbone,
    images: Examples,
    *,
    cache: FeatureCache,
    device: torch.device,
    dtype: torch.dtype | None,
    batch_size: int = 128,
    workers: int | None = None,
    progress: bool = True,
    label: str = "features",
    cut: Cut | None = None,
    engine: str | None = None,
) -> tuple[np.ndarray, bool]:
    """The `cut`'s outputs (default: pooled features) for `images` from the cache, computed and stored on a miss.

    The key takes the preprocessing from `backbone.data_config`, and the engine and its precision.

    Returns:
        (float16 array of shape (N, cut.size), True when it came from the cache).
    """
    arr, hit, _ = cached_features_info(
        backbone,
        images,
        cache=cache,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        label=label,
        cut=cut,
        engine=engine,
    )
    return arr, hit


def cached_features_info(
    backbone: Backbone,
    images: Examples,
    *,
    cache: FeatureCache,
    device: torch.device,
    dtype: torch.dtype | None,
    batch_size: int = 128,
    workers: int | None = None,
    progress: bool = True,
    label: str = "features",
    cut: Cut | None = None,
    engine: str | None = None,
) -> tuple[np.ndarray, bool, EngineInfo]:
    """:func:`cached_features`, and the engine that computed the outputs (the planned one on a hit).

    The key holds the planned engine; when conversion falls back to torch, the torch key is looked up again.
    """
    cut = cut or pooled_cut(backbone)
    engine = engine or default_engine()
    plan = plan_engine(engine, device, dtype, image_input=len(input_shape(backbone)) == 3)

    def key_for(info: EngineInfo) -> str:
        return feature_key(backbone, backbone.data_config, info.cache_tag, images.identities(), cut.name)

    hit = cache.load(key_for(plan))
    if distributed.all_true(hit is not None) and hit is not None:  # every process asks (a collective), then narrows
        return hit, True, plan
    runner = frozen_runner(cut, input_shape(backbone), device=device, precision=dtype, engine=engine)
    info = runner[1]
    if info.cache_tag != plan.cache_tag:
        hit = cache.load(key_for(info))
        if distributed.all_true(hit is not None) and hit is not None:
            return hit, True, info
    key = key_for(info)
    extract = Extraction(
        device=device, dtype=dtype, batch_size=batch_size, workers=workers, progress=progress, label=label, cut=cut, runner=runner
    )
    meta = {
        "backbone": backbone.spec.to_dict(),
        "cut": cut.name,
        "precision": info.cache_tag,
        "engine": info.to_dict(),
        "shape": [len(images), cut.size],
        "item_shape": list(cut.shape),
        "images": images.name,
    }
    if distributed.active():
        return sharded_features(backbone, images, cache, key, meta, extract), False, info
    if not cache.enabled:
        return extract.run(backbone, images), False, info
    writer = cache.writer(key, len(images), cut.size)
    try:
        extract.run(backbone, images, out=writer.array)
    except BaseException:
        writer.abort()
        raise
    return writer.commit(meta), False, info


@dataclass(frozen=True, kw_only=True)
class Extraction:
    """How features are computed on a miss (the arguments of `extract_features` but the examples and `out`)."""

    device: torch.device
    dtype: torch.dtype | None
    batch_size: int
    workers: int | None
    progress: bool
    label: str
    cut: Cut
    runner: tuple[Callable, EngineInfo]

    def run(self, backbone: Backbone, images: Examples, out: np.ndarray | None = None) -> np.ndarray:
        return extract_features(
            backbone,
            images,
            device=self.device,
            dtype=self.dtype,
            batch_size=self.batch_size,
            workers=self.workers,
            out=out,
            progress=self.progress,
            label=self.label,
            cut=self.cut,
            runner=self.runner,
        )


def sharded_features(backbone: Backbone, images: Examples, cache: FeatureCache, key: str, meta: dict, extract: Extraction) -> np.ndarray:
    """Features of `images` computed by every process of the group, each its `distributed.shard`; all get all rows.

    With the cache: rank 0 opens the entry's temporary folder, each process writes
    ``shard-<rank>.npy`` into it (its own file, so a shared file system across nodes
    never sees two writers of one file), rank 0 copies the shards into the entry and
    commits it, and every process reads the committed, verified entry. The disk holds
    the features twice until the shards are removed. Without the cache the shards
    are gathered in memory.
    """
    part = images.subset(distributed.shard(len(images)))
    if not cache.enabled:
        return distributed.gather_rows(extract.run(backbone, part))
    writer: FeatureWriter | None = None

    def open_entry() -> Path:
        nonlocal writer
        writer = cache.writer(key, len(images), extract.cut.size)
        return writer.tmp

    folder = distributed.on_main(open_entry)
    if len(part):  # more processes than images leaves some with none (and no file)
        write_shard(backbone, part, folder / f"shard-{distributed.rank()}.npy", cache.root, extract)
    distributed.barrier()

    def commit() -> None:
        if writer is None:  # on_main ran open_entry on this same process first
            raise RuntimeError("sharded_features: the cache entry was not opened on the main process")
        commit_shards_(writer, len(images), meta)

    distributed.on_main(commit)
    return _read_committed(cache, key)


def write_shard(backbone: Backbone, images: Examples, path: Path, root: Path, extract: Extraction) -> None:
    """Extract `images` into a new float16 .npy at `path`, streamed batch by batch."""
    try:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(len(images), extract.cut.size))
        extract.run(backbone, images, out=out)
        out.flush()
        del out
    except OSError as e:
        raise cache_failure(e, root) from e


SHARD_ROWS = 4096  # rows copied at a time when rank 0 assembles the shards: memory stays flat


def commit_shards_(writer: FeatureWriter, n: int, meta: dict) -> None:
    """Copy every process's shard file into `writer`'s array, in rank order, remove them and commit the entry."""
    try:
        for r in range(distributed.world_size()):
            rows, path = distributed.shard(n, r), writer.tmp / f"shard-{r}.npy"
            if not len(rows):
                continue
            shard = np.load(path, mmap_mode="r")
            for i in range(0, len(rows), SHARD_ROWS):
                stop = min(i + SHARD_ROWS, len(rows))
                writer.array[rows.start + i : rows.start + stop] = shard[i:stop]
            del shard
            path.unlink()
    except OSError as e:
        writer.abort()
        raise cache_failure(e, writer.cache.root) from e
    except BaseException:
        writer.abort()
        raise
    writer.commit(meta)


ENTRY_WAIT_SECONDS = 60  # a network file system may show another node's new folder only after its attribute cache expires


def _read_committed(cache: FeatureCache, key: str) -> np.ndarray:
    """The entry rank 0 has just committed, waiting for it to appear where nodes share the cache over a network."""
    deadline = time.monotonic() + ENTRY_WAIT_SECONDS
    while not cache.path(key).is_dir() and time.monotonic() < deadline:
        time.sleep(0.5)
    arr = cache.load(key)
    if arr is None:
        raise CacheError(
            f"The feature cache entry {cache.path(key)} that rank 0 wrote cannot be read here. "
            "Put TRANSFERKIT_CACHE on a file system every node shares, or pass --no-cache."
        )
    return arr
