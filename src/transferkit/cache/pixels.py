"""Decode once for fine-tuning: each image's pixels, decoded and resized to the training size, stored as uint8.

A phase that trains on images reads every training and validation image once
per epoch; with JPEG files much of that time on a CPU goes to decoding and
resizing, the same work every epoch whenever nothing random happens to the
pixels. When a split's transform is the evaluation transform (validation
always; training with ``--augment none``), its pixels after the resize and
centre crop are stored once as a uint8 array of shape (N, H*W*3) in the
feature cache: keyed by the preprocessing and every input's identity, written
like features (temporary folder, sha256 manifest, atomic rename, verified on
read) and refused over ``--cache-budget`` with the size it needs. Epochs
(and later runs) then apply only the transform's tensor steps (ToTensor and
Normalize, the very same objects) to the stored pixels, so training sees
bit-identical inputs to decoding each epoch.

Augmentation ``light`` and ``strong`` crop from the full-size image and jitter
colours before resizing, which a stored crop cannot reproduce: those training
splits are decoded each epoch as before (their validation split is still
decoded once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math

import numpy as np
import torch

from transferkit import distributed
from transferkit.backbones.base import Backbone
from transferkit.cache.features import FeatureCache
from transferkit.data.examples import Examples
from transferkit.data.images import ImageSet, TransformedImages
from transferkit.progress import make_progress

log = logging.getLogger(__name__)

FORMAT = 1
TENSOR_STEPS = ("ToTensor", "MaybeToTensor", "Normalize")  # what runs on the stored pixels


def split_transform(transform) -> tuple[list, list] | None:
    """The evaluation transform as (pixel steps on PIL images, tensor steps from ToTensor on), or None if it has no ToTensor."""
    steps = list(getattr(transform, "transforms", []))
    names = [type(t).__name__ for t in steps]
    first = next((i for i, n in enumerate(names) if n in TENSOR_STEPS[:2]), None)
    if first is None or any(n not in TENSOR_STEPS for n in names[first:]):
        return None
    return steps[:first], steps[first:]


def pixels_key(data_config: dict, identities: list[str]) -> str:
    """A hex key that changes when the preprocessing or any input changes (not the backbone: pixels precede it)."""
    payload = {
        "format": FORMAT,
        "kind": "decoded-uint8",
        "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(data_config.items())},
        "inputs": hashlib.sha256("\n".join(identities).encode()).hexdigest(),
        "n": len(identities),
    }
    return "px-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:29]


def pixel_bytes(n: int, data_config: dict) -> int:
    _, h, w = data_config["input_size"]
    return n * h * w * 3


class _Pixels(torch.utils.data.Dataset):
    """Example i decoded and through the pixel steps, as a flat uint8 row (what the cache stores)."""

    def __init__(self, images: ImageSet, pixel_steps: list, shape: tuple[int, int]):
        self.images, self.steps, self.shape = images, pixel_steps, shape

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = self.images.load(i)
        for step in self.steps:
            img = step(img)
        arr = np.asarray(img, dtype=np.uint8)
        if arr.shape != (*self.shape, 3):
            raise ValueError(f"the preprocessing gave pixels of shape {arr.shape}, not {(*self.shape, 3)}")
        return torch.from_numpy(arr.reshape(-1).copy())


class StoredPixels(torch.utils.data.Dataset):
    """(tensor, label, index) like the backbone's dataset, from stored pixels through the transform's tensor steps."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, shape: tuple[int, int], tensor_steps: list):
        self.pixels, self.labels, self.shape, self.steps = pixels, labels, shape, tensor_steps

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int):
        x = np.array(self.pixels[i]).reshape(*self.shape, 3)  # a writable copy of the (read-only, mapped) row
        for step in self.steps:
            x = step(x)
        return x, int(self.labels[i]), i


def decoded_pixels(
    images: ImageSet, data_config: dict, pixel_steps: list, cache: FeatureCache, *, workers: int, progress: bool, label: str
) -> tuple[np.ndarray, bool]:
    """The split's stored pixels (N, H*W*3) uint8, decoded and stored on a miss; True when they came from the cache.

    Under torchrun rank 0 decodes and commits first; the other processes then read its entry.
    """
    key = pixels_key(data_config, images.identities())
    with distributed.main_first():
        hit = cache.load(key)
        if hit is not None:
            return hit, True
        _, h, w = data_config["input_size"]
        writer = cache.writer(key, len(images), h * w * 3, dtype=np.uint8)
        loader = torch.utils.data.DataLoader(_Pixels(images, pixel_steps, (h, w)), batch_size=64, num_workers=workers)
        try:
            start = 0
            with make_progress(progress) as bar:
                task = bar.add_task(f"decode {label}", total=len(images), info="uint8, once")
                for rows in loader:
                    writer.array[start : start + len(rows)] = rows.numpy()
                    start += len(rows)
                    bar.update(task, advance=len(rows))
        except BaseException:
            writer.abort()
            raise
        meta = {"kind": "decoded-uint8", "shape": [len(images), h * w * 3], "item_shape": [h, w, 3], "images": images.name}
        return writer.commit(meta), False


def _why_not(bb: Backbone, examples: Examples, augment: str, cache: FeatureCache) -> str | None:
    """Why a split's pixels cannot be stored once (None: they can)."""
    if not isinstance(examples, ImageSet):
        return f"{bb.noun}s are not images"
    if augment != "none":
        return f"augment={augment}: every epoch crops and jitters the full image anew"
    if not cache.enabled:
        return "the feature cache is off"
    data = bb.dataset(examples, "none")
    if not isinstance(data, TransformedImages) or split_transform(data.transform) is None:
        return "the backbone's preprocessing is not resize/crop then ToTensor/Normalize"
    return None


def decode_once(
    bb: Backbone, splits: dict[str, tuple[Examples, str]], cache: FeatureCache, budget: int, *, workers: int | None, progress: bool
) -> tuple[dict[str, StoredPixels], dict[str, dict]]:
    """Datasets over stored pixels for the splits (name: (examples, augment)) that allow it, and the note for the run.

    Splits missing from the returned datasets decode each epoch; the note says why, per split.
    """
    note: dict[str, dict] = {}
    ready: dict[str, ImageSet] = {}
    for name, (examples, augment) in splits.items():
        why = _why_not(bb, examples, augment, cache)
        if why is None and isinstance(examples, ImageSet):  # _why_not refuses any other kind
            ready[name] = examples
        else:
            note[name] = {"used": False, "reason": why}
    size = sum(pixel_bytes(len(ex), bb.data_config) for ex in ready.values())
    if ready and budget <= 0:  # said, not warned: --cache-budget 0 asks for this
        return {}, {**note, **{name: {"used": False, "reason": "the cache budget is 0"} for name in ready}}
    if ready and size > budget:
        reason = (
            f"the decoded {bb.noun}s would take {size / 1e9:.2f} GB on disk, over the cache budget of "
            f"{budget / 1e9:.2f} GB; decoding each epoch instead. Raise --cache-budget (cache_budget_gb) to "
            f"at least {math.ceil(size / 1e7) / 100:.2f} to decode once."
        )
        if distributed.is_main():
            log.warning("Decoded-image cache refused: %s", reason)
        return {}, {**note, **{name: {"used": False, "reason": reason, "bytes": size} for name in ready}}
    datasets = {}
    for name, examples in ready.items():
        dataset = bb.dataset(examples, "none")
        steps = split_transform(dataset.transform) if isinstance(dataset, TransformedImages) else None
        assert steps is not None, "_why_not accepts only transforms that split at ToTensor"
        pixel_steps, tensor_steps = steps
        pixels, hit = decoded_pixels(
            examples,
            bb.data_config,
            pixel_steps,
            cache,
            progress=progress,
            label=name,
            workers=examples.loader_workers() if workers is None else workers,
        )
        _, h, w = bb.data_config["input_size"]
        datasets[name] = StoredPixels(pixels, examples.labels, (h, w), tensor_steps)
        note[name] = {"used": True, "cache": "hit" if hit else "miss", "bytes": pixel_bytes(len(examples), bb.data_config)}
    if datasets and distributed.is_main():
        log.info(
            "Decoded-image cache: %s (%s); epochs read the stored pixels instead of decoding.",
            ", ".join(f"{n} {note[n]['cache']}" for n in datasets),
            f"{size / 1e6:.0f} MB",
        )
    return datasets, note
