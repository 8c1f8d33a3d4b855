"""Where labelled examples come from, how they are split, decoded and transformed.

Every source becomes an :class:`ImageSet`: a list of examples that can each be
decoded to an RGB PIL image, with integer labels and the class names. Sources:

* an image folder (one subfolder per class; ``train/`` ``val/`` ``test/``
  subfolders are used as given),
* a CSV file with ``path,label`` columns (paths relative to the CSV),
* the built-in ``digits`` (scikit-learn's 1,797 8x8 handwritten digits),
* torchvision's classification datasets by name (``cifar10``, ``mnist``, ...),
  downloaded by torchvision into the cache directory on first use.

Splits that are not given are made stratified and seeded (70/15/15 by
default).

Messy folders are expected. Hidden files and folders (``.DS_Store``, AppleDouble
``._photo.jpg``, ``.git/``) are ignored without a report. Symlinked folders are
followed unless they lead back into a folder already being scanned (a loop).
Every candidate file is read once, decoded at reduced scale and hashed; a file
that cannot be used is skipped and counted in the :class:`DataSummary` under
its reason (``strict=True`` makes any skip an error instead):

=====================  ========================================================
``missing``             listed (CSV, dangling symlink) but not there
``not a file``          a FIFO, socket or folder where an image was expected
``empty``               zero bytes
``truncated``           the image data ends early
``unreadable``          not an image PIL can decode (e.g. text named .jpg)
``too large``           the header declares more than ``PIL.Image.MAX_IMAGE_PIXELS``
                        pixels (a decompression bomb); refused before decoding
``conflicting labels``  identical bytes under two classes: every copy is
                        skipped, since neither label can be trusted
``symlink loop``        a symlinked folder pointing back at one being scanned
``incomplete row``      a CSV row without a path or a label
``unknown class``       a CSV row whose label the model does not know (evaluation)
=====================  ========================================================

Some findings change nothing but are counted as warnings in the summary:
``duplicates_across_splits`` (a val/test file whose bytes also appear in an
earlier split: its score measures memory, not generalisation; the file is
kept) and ``empty_classes`` (class folders with no usable image: the class is
left out). Identical files within one class are kept.

Decoding gives 8-bit RGB whatever the file holds: grey, palette (with or
without transparency), alpha (composited onto white), 16-bit (scaled by its
own range), CMYK; the first frame of an animation; EXIF orientation applied.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import stat
import warnings
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from transferkit.errors import DataError, UsageError, did_you_mean

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLIT_NAMES = ("train", "val", "test")
DEFAULT_SPLIT = (0.7, 0.15, 0.15)
BUILTIN_DATASETS = ("digits",)


def cache_dir() -> Path:
    """The root of transferkit's cache: $TRANSFERKIT_CACHE, else XDG, else ~/.cache."""
    if os.environ.get("TRANSFERKIT_CACHE"):
        return Path(os.environ["TRANSFERKIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "transferkit"


# --------------------------------------------------------------------------- decoding


def open_image(path: str | Path) -> Image.Image:
    """Decode an image file to RGB with its EXIF orientation applied.

    Raises:
        DataError: the file is missing or is not a decodable image.
    """
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except Exception as e:  # PIL raises many types on malformed bytes (OSError, SyntaxError, struct.error, ...)
        raise DataError(f"Cannot decode image {path}: {e}. Remove or replace the file.") from e


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited onto white."""
    if img.mode == "RGB":
        img.load()
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grey: scale to 8 bits by the image's own range.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


@dataclass(frozen=True)
class FileCheck:
    """What scanning one file found: why it cannot be used (None: it decodes) and its content hash."""

    reason: str | None
    digest: str | None = None


def inspect_image(path: str | Path) -> FileCheck:
    """Read a file once: check that it is a regular, non-empty, decodable image and hash its bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return FileCheck("missing")
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return FileCheck("unreadable")
    if not stat.S_ISREG(st.st_mode):
        return FileCheck("not a file")  # reading a FIFO would block forever
    if st.st_size == 0:
        return FileCheck("empty")
    try:
        data = Path(path).read_bytes()
    except OSError:
        return FileCheck("unreadable")
    return FileCheck(_decode_problem(data), hashlib.blake2b(data, digest_size=16).hexdigest())


def _decode_problem(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            # Refuse by the header's declared size, before any pixel buffer is allocated.
            if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:
                return "too large"
            img.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reads every byte
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "too large"
    except Exception as e:  # PIL raises many types on malformed bytes (OSError, SyntaxError, struct.error, ...)
        return "truncated" if "truncated" in str(e).lower() else "unreadable"
    return None


def check_image(path: str | Path) -> str | None:
    """Return why `path` cannot be used as an image, or None when it decodes."""
    return inspect_image(path).reason


# --------------------------------------------------------------------------- image sets


class ImageSet:
    """Labelled images of one split: `load(i)` decodes example i to RGB.

    Subclasses hold the examples; this base holds labels and class names.
    """

    def __init__(self, labels: Sequence[int], classes: Sequence[str], name: str):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.name = name
        self.preprocess_hint: dict = {}  # a built-in dataset's suggested size/crop, overridable

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def identities(self) -> list[str]:
        """One string per example that changes when the example's content may have."""
        raise NotImplementedError

    def subset(self, indices: Sequence[int]) -> ImageSet:
        raise NotImplementedError

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts)}


class FileImages(ImageSet):
    """Images stored as files; identity is (path, size, mtime). `digests` are content hashes, when scanned."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], classes: Sequence[str], name: str = "files",
                 digests: Sequence[str] | None = None):
        super().__init__(labels, classes, name)
        self.paths = [Path(p) for p in paths]
        self.digests = list(digests) if digests is not None else None

    def load(self, i: int) -> Image.Image:
        return open_image(self.paths[i])

    def identities(self) -> list[str]:
        out = []
        for p in self.paths:
            st = p.stat()
            out.append(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}")
        return out

    def subset(self, indices: Sequence[int]) -> FileImages:
        idx = [int(i) for i in indices]
        digests = [self.digests[i] for i in idx] if self.digests is not None else None
        return FileImages([self.paths[i] for i in idx], self.labels[idx], self.classes, self.name, digests)


class ArrayImages(ImageSet):
    """Images held in memory as uint8 arrays (N,H,W) or (N,H,W,C)."""

    def __init__(self, arrays: np.ndarray, labels: Sequence[int], classes: Sequence[str], name: str,
                 preprocess_hint: dict | None = None):
        super().__init__(labels, classes, name)
        self.arrays = arrays
        self.preprocess_hint = preprocess_hint or {}

    def load(self, i: int) -> Image.Image:
        return to_rgb(Image.fromarray(self.arrays[i]))

    def identities(self) -> list[str]:
        return [f"{self.name}|{hashlib.blake2b(a.tobytes(), digest_size=10).hexdigest()}" for a in self.arrays]

    def subset(self, indices: Sequence[int]) -> ArrayImages:
        idx = list(indices)
        return ArrayImages(self.arrays[idx], self.labels[idx], self.classes, self.name, self.preprocess_hint)


class DatasetImages(ImageSet):
    """A torch/torchvision dataset yielding (PIL image or array, label)."""

    def __init__(self, dataset, indices: Sequence[int], labels: Sequence[int], classes: Sequence[str], name: str):
        super().__init__(labels, classes, name)
        self.dataset, self.indices = dataset, list(indices)

    def load(self, i: int) -> Image.Image:
        img = self.dataset[self.indices[i]][0]
        if isinstance(img, torch.Tensor):
            img = img.numpy().transpose(1, 2, 0) if img.ndim == 3 else img.numpy()
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        return to_rgb(img)

    def identities(self) -> list[str]:
        # A named dataset's files are fixed by name and checksum: position is identity.
        return [f"{self.name}|{j}" for j in self.indices]

    def subset(self, indices: Sequence[int]) -> DatasetImages:
        idx = list(indices)
        return DatasetImages(self.dataset, [self.indices[i] for i in idx], self.labels[idx], self.classes, self.name)


# --------------------------------------------------------------------------- summary and splits


WARNING_TEXT = {
    "duplicates_across_splits": "val/test file(s) identical to a file in an earlier split (kept; their score "
                                "measures memory, not generalisation)",
    "empty_classes": "class folder(s) without usable images, left out",
}


@dataclass
class DataSummary:
    """What was found, what was skipped by reason, and warnings that changed nothing, each with its paths."""

    source: str
    found: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def skip(self, reason: str, path: str) -> None:
        self.skipped.setdefault(reason, []).append(path)

    def warn(self, kind: str, path: str) -> None:
        self.warnings.setdefault(kind, []).append(path)

    def skipped_line(self) -> str | None:
        """One line on the skipped files, or None when none were skipped."""
        if not self.n_skipped:
            return None
        reasons = ", ".join(f"{len(v)} {k}" for k, v in sorted(self.skipped.items()))
        first = [p for v in self.skipped.values() for p in v][:3]
        more = ", ..." if self.n_skipped > 3 else ""
        return f"Skipped {self.n_skipped} of {self.found} files in {self.source} ({reasons}): {', '.join(first)}{more}"

    def line(self) -> str | None:
        """Skipped files and warnings, one line each, or None when there is nothing to say."""
        lines = [self.skipped_line()] if self.n_skipped else []
        for kind, paths in sorted(self.warnings.items()):
            more = ", ..." if len(paths) > 3 else ""
            lines.append(f"Warning: {len(paths)} {WARNING_TEXT.get(kind, kind)}: {', '.join(paths[:3])}{more}")
        return "\n".join(lines) or None

    def to_dict(self) -> dict:
        return {"source": self.source, "found": self.found,
                "skipped": {k: len(v) for k, v in self.skipped.items()},
                "first_skipped": [p for v in self.skipped.values() for p in v][:10],
                "warnings": {k: len(v) for k, v in self.warnings.items()}}


@dataclass
class DataSplits:
    """Train, validation and test image sets sharing one class list."""

    train: ImageSet
    val: ImageSet
    test: ImageSet
    summary: DataSummary

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def validate_split(split: Sequence[float]) -> tuple[float, float, float]:
    """Check train/val/test fractions: three positive numbers summing to 1."""
    if len(split) != 3 or any(f <= 0 for f in split) or abs(sum(split) - 1) > 1e-6:
        raise UsageError(
            f"split must be three positive fractions for train,val,test that sum to 1; got {tuple(split)}. "
            "Example: --split 0.7,0.15,0.15"
        )
    return (float(split[0]), float(split[1]), float(split[2]))


def stratified_indices(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices into len(fractions) parts, each class spread by its share; seeded.

    Every class gets at least one example in every part, so a class needs at
    least as many examples as there are parts.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        counts = _largest_remainder(len(idx), fractions)
        start = 0
        for part, n in zip(parts, counts):
            part.extend(idx[start:start + n])
            start += n
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _largest_remainder(n: int, fractions: Sequence[float]) -> list[int]:
    """Integer counts summing to n, proportional to fractions, each at least 1."""
    raw = [n * f for f in fractions]
    counts = [max(1, int(r)) for r in raw]
    while sum(counts) < n:
        i = max(range(len(raw)), key=lambda k: raw[k] - counts[k])
        counts[i] += 1
    while sum(counts) > n:
        i = max(range(len(raw)), key=lambda k: counts[k] - raw[k] if counts[k] > 1 else -1)
        counts[i] -= 1
    return counts


def split_stratified(images: ImageSet, split: Sequence[float], seed: int, source: str) -> tuple[ImageSet, ...]:
    """Split one image set into train/val/test by `split` fractions."""
    counts = images.class_counts()
    small = {c: n for c, n in counts.items() if n < len(split)}
    noun = getattr(images, "noun", "image")  # what one example is: "image", or "text" for a TextSet
    if small:
        name, n = next(iter(small.items()))
        raise DataError(
            f"Class '{name}' in {source} has {n} {noun}(s); splitting into train/val/test needs at least "
            f"{len(split)} per class. Add {noun}s to that class, remove it, or give train/ val/ test/ folders."
        )
    return tuple(images.subset(idx) for idx in stratified_indices(images.labels, split, seed))


# --------------------------------------------------------------------------- sources


def _scan_files(paths: list[Path], summary: DataSummary, strict: bool, workers: int = 8) -> list[FileCheck]:
    """Check every file decodes and hash it (in threads: PIL and hashlib release the GIL); record skips."""
    summary.found += len(paths)
    with warnings.catch_warnings():
        # Between 1x and 2x Image.MAX_IMAGE_PIXELS PIL only warns; a scan refuses those files too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            checks = list(pool.map(inspect_image, paths))
    for p, c in zip(paths, checks):
        if c.reason is not None:
            summary.skip(c.reason, str(p))
    _raise_if_strict(summary, strict)
    return checks


def _raise_if_strict(summary: DataSummary, strict: bool) -> None:
    if strict and summary.n_skipped:
        raise DataError(f"{summary.skipped_line()}. Remove or fix these files, or drop --strict to skip them.")


def _is_within(inner: str, outer: str) -> bool:
    return os.path.commonpath([inner, outer]) == outer


def _folder_classes(root: Path, summary: DataSummary) -> list[str]:
    real_root = os.path.realpath(root)
    classes = []
    for d in sorted(root.iterdir()):
        if d.name.startswith(".") or not d.is_dir():
            continue
        if _is_within(real_root, os.path.realpath(d)):  # a symlink to the dataset or above it
            summary.found += 1
            summary.skip("symlink loop", str(d))
            continue
        classes.append(d.name)
    return classes


def _list_images(folder: Path, summary: DataSummary) -> list[Path]:
    """Image files under `folder`, recursively: hidden entries ignored, symlinked folders followed once."""
    top = os.path.realpath(folder)
    seen, found = {top}, []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            real = os.path.realpath(os.path.join(dirpath, d))
            if real in seen or _is_within(top, real):  # already scanned, or an ancestor: a loop
                summary.found += 1
                summary.skip("symlink loop", os.path.join(dirpath, d))
                continue
            seen.add(real)
            keep.append(d)
        dirnames[:] = keep  # os.walk descends only into these
        found.extend(Path(dirpath, f) for f in filenames
                     if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
    return sorted(found)


def read_image_folder(root: Path, classes: list[str] | None, summary: DataSummary, strict: bool) -> FileImages:
    """Read one folder of class subfolders; `classes` fixes the label order when given."""
    found = _folder_classes(root, summary)
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{root} has class folder(s) {unknown} not present in the training split {classes}. "
                        "Every split must use the training split's classes.")
    paths, labels = [], []
    for label, name in enumerate(classes):
        if name in found:
            for p in _list_images(root / name, summary):
                paths.append(p)
                labels.append(label)
    checks = _scan_files(paths, summary, strict)
    keep = [i for i, c in enumerate(checks) if c.reason is None]
    return FileImages([paths[i] for i in keep], [labels[i] for i in keep], classes, name=str(root),
                      digests=[checks[i].digest for i in keep])


def drop_conflicting_labels(parts: Sequence[FileImages], summary: DataSummary, strict: bool) -> list[FileImages]:
    """Skip every copy of a file whose identical bytes carry two different labels, across all `parts`.

    The parts must share one class list (the training split's).
    """
    labels_of: dict[str, set[int]] = defaultdict(set)
    for images in parts:
        for d, label in zip(images.digests or [], images.labels.tolist()):
            labels_of[d].add(label)
    bad = {d for d, labels in labels_of.items() if len(labels) > 1}
    if not bad:
        return list(parts)
    out = []
    for images in parts:
        digests = images.digests or []
        for i in (i for i, d in enumerate(digests) if d in bad):
            summary.skip("conflicting labels", str(images.paths[i]))
        out.append(images.subset([i for i, d in enumerate(digests) if d not in bad]))
    _raise_if_strict(summary, strict)
    return out


def note_cross_split_duplicates(splits: DataSplits) -> None:
    """Warn about val/test files whose bytes also appear in an earlier split; they stay in."""
    seen: set[str] = set()
    for name in SPLIT_NAMES:
        images = getattr(splits, name)
        digests = getattr(images, "digests", None)
        if digests is None:
            return
        if name != "train":
            for p, d in zip(images.paths, digests):
                if d in seen:
                    splits.summary.warn("duplicates_across_splits", str(p))
        seen.update(digests)


def read_csv(path: Path, summary: DataSummary, strict: bool, classes: list[str] | None = None) -> FileImages:
    """Read `path,label` rows; paths are relative to the CSV's folder.

    The header is matched without regard to case or surrounding spaces; blank
    lines are ignored; a row without a path or a label is skipped as an
    incomplete row, and with `classes` given, a row with another label as an
    unknown class.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"Cannot read CSV {path}: {e}. Save it as UTF-8 text whose first line is: path,label") from e
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if "path" not in header or "label" not in header:
        raise DataError(f"CSV {path} needs a header with columns 'path' and 'label'; found {header[:10]}. "
                        "Write the first line as: path,label")
    col_path, col_label = header.index("path"), header.index("label")
    paths, names = [], []
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        rel = row[col_path].strip() if col_path < len(row) else ""
        name = row[col_label].strip() if col_label < len(row) else ""
        if not rel or not name:
            summary.found += 1
            summary.skip("incomplete row", f"{path} row {n}")
            continue
        paths.append(path.parent / rel)
        names.append(name)
    classes = classes or sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    checks = _scan_files(paths, summary, strict)
    keep = []
    for i, c in enumerate(checks):
        if c.reason is None and names[i] not in index:
            summary.skip("unknown class", str(paths[i]))
        elif c.reason is None:
            keep.append(i)
    _raise_if_strict(summary, strict)
    return FileImages([paths[i] for i in keep], [index[names[i]] for i in keep], classes, name=str(path),
                      digests=[checks[i].digest for i in keep])


def read_paths(paths: Sequence[str | Path], labels: Sequence, summary: DataSummary, strict: bool) -> FileImages:
    """Image files with their labels given in Python, scanned like a folder (unreadable files skipped and counted)."""
    if len(paths) != len(labels):
        raise UsageError(f"got {len(paths)} paths and {len(labels)} labels; they must pair up one to one.")
    paths = [Path(p) for p in paths]
    classes = sorted({str(v) for v in labels})
    checks = _scan_files(paths, summary, strict)
    keep = [i for i, c in enumerate(checks) if c.reason is None]
    return FileImages([paths[i] for i in keep], [classes.index(str(labels[i])) for i in keep], classes, name="paths",
                      digests=[checks[i].digest for i in keep])


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
        raise DataError(f"torchvision could not load '{name}' under {root}: {e}. On a machine without "
                        "internet, copy the dataset files there first.") from e
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


def load_data(source: str | Path, *, split: Sequence[float] = DEFAULT_SPLIT, seed: int = 0,
              strict: bool = False, download: bool = True) -> DataSplits:
    """Load labelled images from a folder, a CSV, `digits` or a torchvision dataset name.

    Example:
        >>> splits = load_data("digits", seed=0)
        >>> splits.sizes()
        {'train': 1259, 'val': 270, 'test': 268}
    """
    split = validate_split(split)
    text = str(source)
    path = Path(source).expanduser()
    if text in BUILTIN_DATASETS:
        summary = DataSummary(text, found=1797)
        return DataSplits(*split_stratified(load_digits_images(), split, seed, text), summary)
    if text.lower() in TORCHVISION_DATASETS and not path.exists():
        return _load_named(text.lower(), split, seed, download)
    if path.is_file() and path.suffix.lower() == ".csv":
        summary = DataSummary(str(path))
        [images] = drop_conflicting_labels([read_csv(path, summary, strict)], summary, strict)
        images = _require_usable(images, path, summary)
        splits = DataSplits(*split_stratified(images, split, seed, str(path)), summary)
        note_cross_split_duplicates(splits)
        return splits
    if path.is_dir():
        return _load_folder(path, split, seed, strict)
    choices = list(BUILTIN_DATASETS) + sorted(TORCHVISION_DATASETS)
    raise DataError(f"Data source '{text}' is neither a folder, a .csv file nor a dataset name."
                    f"{did_you_mean(text.lower(), choices)} Built-in and torchvision names: {', '.join(choices)}.")


def _load_named(name: str, split: Sequence[float], seed: int, download: bool) -> DataSplits:
    train_all, test = load_torchvision(name, cache_dir() / "datasets" / name, download)
    summary = DataSummary(name, found=len(train_all) + (len(test) if test else 0))
    if test is None:
        return DataSplits(*split_stratified(train_all, split, seed, name), summary)
    # Keep the dataset's own test split; carve validation out of its training split.
    val_share = split[1] / (split[0] + split[1])
    tr, va = stratified_indices(train_all.labels, (1 - val_share, val_share), seed)
    return DataSplits(train_all.subset(tr), train_all.subset(va), test, summary)


def _load_folder(root: Path, split: Sequence[float], seed: int, strict: bool) -> DataSplits:
    summary = DataSummary(str(root))
    given = {s: root / s for s in SPLIT_NAMES if (root / s).is_dir()}
    if "train" in given:
        train = read_image_folder(given["train"], None, summary, strict)
        parts = {s: read_image_folder(given[s], train.classes, summary, strict) for s in given if s != "train"}
        train, *rest = drop_conflicting_labels([train, *parts.values()], summary, strict)
        train = _require_usable(train, given["train"], summary)
        parts = {s: _with_classes(p, train.classes, given[s]) for s, p in zip(parts, rest)}
        if "val" not in parts or "test" not in parts:
            # Carve the missing split(s) out of train, stratified.
            missing = [s for s in ("val", "test") if s not in parts]
            fracs = [split[0]] + [split[SPLIT_NAMES.index(s)] for s in missing]
            pieces = split_stratified(train, [f / sum(fracs) for f in fracs], seed, str(given["train"]))
            train = pieces[0]
            parts.update(zip(missing, pieces[1:]))
        splits = DataSplits(train, parts["val"], parts["test"], summary)
    else:
        [images] = drop_conflicting_labels([read_image_folder(root, None, summary, strict)], summary, strict)
        images = _require_usable(images, root, summary)
        splits = DataSplits(*split_stratified(images, split, seed, str(root)), summary)
    note_cross_split_duplicates(splits)
    return splits


def _with_classes(images: ImageSet, classes: list[str], where: Path) -> ImageSet:
    """Relabel `images` to `classes` (a subset of its own); images of any other class are an error."""
    names = [images.classes[i] for i in np.unique(images.labels)]
    extra = [c for c in names if c not in classes]
    if extra:
        raise DataError(f"{where} has images of class(es) {extra}, which have no usable training images. "
                        "Add training images for them or remove them from this split.")
    index = {c: i for i, c in enumerate(classes)}
    out = images.subset(range(len(images)))
    out.labels = np.asarray([index[images.classes[v]] for v in images.labels.tolist()], dtype=np.int64)
    out.classes = list(classes)
    return out


def _require_usable(images: ImageSet, where: Path, summary: DataSummary) -> ImageSet:
    """Dataset-level checks: some images, at least two classes; classes without images are left out."""
    if len(images) == 0:
        raise DataError(_no_images_message(where, summary))
    counts = images.class_counts()
    empty = [c for c, n in counts.items() if n == 0]
    for c in empty:
        summary.warn("empty_classes", str(where / c) if where.is_dir() else c)
    if empty:
        images = _with_classes(images, [c for c in images.classes if c not in empty], where)
    if len(images.classes) < 2:
        raise DataError(f"{where} has {len(images.classes)} class with usable images ({images.classes}); "
                        "a classifier needs at least two. Add a subfolder (or CSV label) per class, "
                        "each holding that class's images.")
    return images


def _no_images_message(where: Path, summary: DataSummary) -> str:
    if summary.n_skipped:
        return (f"No usable images in {where}: {summary.skipped_line()}. "
                "Replace the broken files with images PIL can open.")
    loose = where.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in where.iterdir() if p.is_file())
    if loose:
        return (f"No images found in class subfolders of {where}, but there are image files directly in it. "
                f"Move them into one subfolder per class (e.g. {where}/cat/1.jpg).")
    return (f"No images found in {where}. Expected one subfolder per class holding "
            f"{', '.join(IMAGE_EXTENSIONS[:4])}, ... files (or a CSV with path,label).")


# --------------------------------------------------------------------------- transforms and loaders


def resolve_data_config(model_config: dict, image_size: int | None, hint: dict | None = None) -> dict:
    """The backbone's preprocessing (timm data config), then a dataset's hint, then `image_size`."""
    cfg = {**model_config, **(hint or {})}
    if image_size is not None:
        if image_size < 16:
            raise UsageError(f"--image-size must be at least 16 pixels; got {image_size}.")
        cfg["input_size"] = (3, image_size, image_size)
    return cfg


def make_transform(data_config: dict, augment: str = "none"):
    """A torchvision transform from a timm data config; augmentation for training only."""
    from timm.data import create_transform

    if augment == "none":
        return create_transform(**data_config, is_training=False)
    size = data_config["input_size"]
    common = dict(input_size=size, mean=data_config["mean"], std=data_config["std"],
                  interpolation=data_config.get("interpolation", "bilinear"), is_training=True)
    if augment == "light":
        # Mild crops and colour only: no flips, which would corrupt digits and text.
        return create_transform(**common, scale=(0.7, 1.0), ratio=(0.9, 1.1), hflip=0.0, color_jitter=0.1)
    if augment == "strong":
        return create_transform(**common, scale=(0.35, 1.0), hflip=0.5, auto_augment="rand-m7-mstd0.5",
                                re_prob=0.2)
    raise UsageError(f"--augment must be one of none, light, strong; got '{augment}'.{did_you_mean(augment, ['none', 'light', 'strong'])}")


class TransformedImages(torch.utils.data.Dataset):
    """An ImageSet as a torch Dataset of (tensor, label, index)."""

    def __init__(self, images: ImageSet, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images.load(i)), int(self.images.labels[i]), i


def load_eval_images(source: str | Path, classes: list[str], *, strict: bool = False) -> tuple[ImageSet, DataSummary]:
    """All labelled images of a source, labelled with a trained model's `classes`.

    A folder with a ``test/`` subfolder is read from there; a dataset name gives its test split.
    """
    text, path = str(source), Path(source).expanduser()
    summary = DataSummary(text)
    if text in BUILTIN_DATASETS:
        images: ImageSet = load_digits_images()
    elif text.lower() in TORCHVISION_DATASETS and not path.exists():
        train, test = load_torchvision(text.lower(), cache_dir() / "datasets" / text.lower())
        images = test or train
    elif path.is_file() and path.suffix.lower() == ".csv":
        [images] = drop_conflicting_labels([read_csv(path, summary, strict, classes)], summary, strict)
    elif path.is_dir():
        folder = path / "test" if (path / "test").is_dir() else path
        [images] = drop_conflicting_labels([read_image_folder(folder, classes, summary, strict)], summary, strict)
    else:
        raise DataError(f"Data source '{text}' is neither a folder, a .csv file nor a dataset name.")
    if list(images.classes) != list(classes):
        raise DataError(f"{text} has classes {images.classes}, the model was trained on {classes}.")
    if len(images) == 0:
        raise DataError(f"No images found in {text}.")
    summary.found = summary.found or len(images)
    return images, summary


def subsample_per_class(images: ImageSet, amount: float, seed: int) -> ImageSet:
    """Keep a seeded share of each class: `amount` <= 1 is a fraction, > 1 a count per class (at least 1 each)."""
    if amount <= 0:
        raise UsageError(f"a training fraction must be > 0; got {amount}.")
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(images.labels):
        idx = np.flatnonzero(images.labels == c)
        n = int(amount) if amount > 1 else max(1, round(len(idx) * amount))
        keep.extend(rng.permutation(idx)[:min(n, len(idx))])
    return images.subset(sorted(keep))
