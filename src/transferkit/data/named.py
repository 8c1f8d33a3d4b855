"""Named datasets: the built-in ``digits`` and torchvision's classification datasets.

``digits`` is scikit-learn's 1,797 8x8 handwritten digits (offline). torchvision
datasets (``cifar10``, ``mnist``, ...) are downloaded by torchvision into the
cache directory on first use.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from transferkit.data.images import ArrayImages, DatasetImages, ImageSet
from transferkit.errors import DataError

BUILTIN_DATASETS = ("digits",)


def cache_dir() -> Path:
    """The root of transferkit's cache: $TRANSFERKIT_CACHE, else XDG, else ~/.cache."""
    if os.environ.get("TRANSFERKIT_CACHE"):
        return Path(os.environ["TRANSFERKIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "transferkit"


def load_digits_images() -> ArrayImages:
    """scikit-learn's 8x8 digits as 8-bit grey images (values 0..16 scaled to 0..255)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    arrays = np.clip(d.images * 16, 0, 255).astype(np.uint8)
    # 8x8 is far below what ImageNet backbones see; 64 px keeps the demo fast and accurate.
    # No centre crop (strokes touch the border); bilinear beats bicubic by ~1-2 points here.
    hint = {"input_size": (3, 64, 64), "crop_pct": 1.0, "interpolation": "bilinear"}
    return ArrayImages(arrays, d.target, [str(i) for i in range(10)], name="digits", preprocess_hint=hint)


# torchvision classification datasets by name: (class name, how its train/test split is asked for).
TORCHVISION_DATASETS: dict[str, tuple[str, str]] = {
    "cifar10": ("CIFAR10", "train"),
    "cifar100": ("CIFAR100", "train"),
    "mnist": ("MNIST", "train"),
    "fashionmnist": ("FashionMNIST", "train"),
    "kmnist": ("KMNIST", "train"),
    "emnist": ("EMNIST", "train"),
    "svhn": ("SVHN", "split"),
    "stl10": ("STL10", "split"),
    "flowers102": ("Flowers102", "split"),
    "food101": ("Food101", "split"),
    "oxfordiiitpet": ("OxfordIIITPet", "split"),
    "dtd": ("DTD", "split"),
    "gtsrb": ("GTSRB", "split"),
    "eurosat": ("EuroSAT", "none"),
}


def load_torchvision(name: str, root: Path, download: bool = True) -> tuple[ImageSet, ImageSet | None]:
    """Load a torchvision dataset's train (and test, where it has one) as image sets."""
    import torchvision.datasets as tvd

    cls_name, style = TORCHVISION_DATASETS[name]
    cls = getattr(tvd, cls_name)
    extra = {"split": "byclass"} if name == "emnist" else {}

    def make(train: bool):
        if style == "train":
            return cls(root=str(root), train=train, download=download, **extra)
        if style == "split":
            split = {"oxfordiiitpet": "trainval", "stl10": "train"}.get(name, "train") if train else "test"
            return cls(root=str(root), split=split, download=download)
        return cls(root=str(root), download=download) if train else None

    try:
        train_ds, test_ds = make(True), make(False)
    except (RuntimeError, OSError) as e:  # OSError covers urllib's URLError when offline
        raise DataError(
            f"torchvision could not load '{name}' under {root}: {e}. On a machine without internet, copy the dataset files there first."
        ) from e
    return _as_image_set(train_ds, f"{name}-train"), (_as_image_set(test_ds, f"{name}-test") if test_ds else None)


def _as_image_set(ds, name: str) -> ImageSet:
    classes = [str(c) for c in getattr(ds, "classes", [])]
    data = getattr(ds, "data", None)
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = getattr(ds, "labels", None) or getattr(ds, "_labels", None)
    if targets is None:
        targets = [ds[i][1] for i in range(len(ds))]
    targets = np.asarray(targets, dtype=np.int64)
    if not classes:
        classes = [str(i) for i in range(int(targets.max()) + 1)]
    if isinstance(data, np.ndarray | torch.Tensor) and len(data) == len(targets):
        arrays = data.numpy() if isinstance(data, torch.Tensor) else data
        if arrays.ndim == 4 and arrays.shape[1] in (1, 3) and arrays.shape[-1] not in (1, 3):
            arrays = arrays.transpose(0, 2, 3, 1)  # SVHN/STL10 store NCHW
        if arrays.ndim == 4 and arrays.shape[-1] == 1:
            arrays = arrays[..., 0]
        return ArrayImages(np.ascontiguousarray(arrays), targets, classes, name=name)
    return DatasetImages(ds, range(len(targets)), targets, classes, name=name)
