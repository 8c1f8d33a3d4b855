"""Labelled images: decoding, the folder / CSV / path readers, transforms.

Every image source becomes an :class:`ImageSet` (an :class:`~transferkit.data.examples.Examples`
whose `load(i)` decodes example i to an RGB PIL image): an image folder (one
subfolder per class), a CSV file with ``path,label`` columns (paths relative
to the CSV), in-memory arrays, a torch dataset.

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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps

from transferkit.data.examples import DataSummary, Examples, IntArrayLike
from transferkit.errors import DataError, UsageError, did_you_mean

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
AUGMENTATIONS = ("none", "light", "strong")

# --------------------------------------------------------------------------- decoding


def open_image(path: str | Path | IO[bytes]) -> Image.Image:
    """Decode an image file to RGB with its EXIF orientation applied.

    Raises:
        DataError: the file is missing or is not a decodable image.
    """
    try:
        with Image.open(path) as img:
            return to_rgb(ImageOps.exif_transpose(img))
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
    return FileCheck(image_problem(data), hashlib.blake2b(data, digest_size=16).hexdigest())


def image_problem(data: bytes, max_pixels: int | None = None) -> str | None:
    """Why `data` cannot be used as an image (``empty``, ``too large``, ``truncated``, ``unreadable``), or None.

    `max_pixels` (default ``PIL.Image.MAX_IMAGE_PIXELS``) is checked against the size the header declares,
    before any pixel buffer is allocated: a decompression bomb is refused without being decoded.
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if not data:
        return "empty"
    try:
        with Image.open(io.BytesIO(data)) as img:
            if limit and img.width * img.height > limit:
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


class ImageSet(Examples):
    """Labelled images of one split: `load(i)` decodes example i to RGB."""

    modality = "image"
    noun = "image"

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError


class FileImages(ImageSet):
    """Images stored as files; identity is (path, size, mtime). `digests` are content hashes, when scanned."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: IntArrayLike,
        classes: Sequence[str],
        name: str = "files",
        digests: Sequence[str] | None = None,
    ):
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

    def subset(self, indices: IntArrayLike) -> FileImages:
        idx = [int(i) for i in indices]
        digests = [self.digests[i] for i in idx] if self.digests is not None else None
        return FileImages([self.paths[i] for i in idx], self.labels[idx], self.classes, self.name, digests)


class ArrayImages(ImageSet):
    """Images held in memory as uint8 arrays (N,H,W) or (N,H,W,C)."""

    def __init__(self, arrays: np.ndarray, labels: IntArrayLike, classes: Sequence[str], name: str, preprocess_hint: dict | None = None):
        super().__init__(labels, classes, name)
        self.arrays = arrays
        self.preprocess_hint = preprocess_hint or {}

    def load(self, i: int) -> Image.Image:
        return to_rgb(Image.fromarray(self.arrays[i]))

    def identities(self) -> list[str]:
        return [f"{self.name}|{hashlib.blake2b(a.tobytes(), digest_size=10).hexdigest()}" for a in self.arrays]

    def loader_workers(self) -> int:
        return 0  # already decoded: worker processes would only copy the arrays

    def subset(self, indices: IntArrayLike) -> ArrayImages:
        idx = list(indices)
        return ArrayImages(self.arrays[idx], self.labels[idx], self.classes, self.name, self.preprocess_hint)


class DatasetImages(ImageSet):
    """A torch/torchvision dataset yielding (PIL image or array, label)."""

    def __init__(self, dataset, indices: IntArrayLike, labels: IntArrayLike, classes: Sequence[str], name: str):
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

    def subset(self, indices: IntArrayLike) -> DatasetImages:
        idx = list(indices)
        return DatasetImages(self.dataset, [self.indices[i] for i in idx], self.labels[idx], self.classes, self.name)


# --------------------------------------------------------------------------- readers


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
    summary.raise_if_strict(strict)
    return checks


def _digests(checks: Sequence[FileCheck], keep: Sequence[int]) -> list[str]:
    """The content hashes of the kept files: each decodes, so inspect_image read it whole and hashed it."""
    return [d for i in keep if (d := checks[i].digest) is not None]


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
    seen: set[str] = {top}
    found: list[Path] = []
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
        found.extend(Path(dirpath, f) for f in filenames if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
    return sorted(found)


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively and sorted, as `predict` reads a folder (hidden entries ignored)."""
    return _list_images(folder, DataSummary(str(folder)))


def read_image_folder(root: Path, classes: list[str] | None, summary: DataSummary, strict: bool) -> FileImages:
    """Read one folder of class subfolders; `classes` fixes the label order when given."""
    found = _folder_classes(root, summary)
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(
            f"{root} has class folder(s) {unknown} not present in the training split {classes}. "
            "Every split must use the training split's classes."
        )
    paths, labels = [], []
    for label, name in enumerate(classes):
        if name in found:
            for p in _list_images(root / name, summary):
                paths.append(p)
                labels.append(label)
    checks = _scan_files(paths, summary, strict)
    keep = [i for i, c in enumerate(checks) if c.reason is None]
    return FileImages([paths[i] for i in keep], [labels[i] for i in keep], classes, name=str(root), digests=_digests(checks, keep))


def read_csv(path: Path, summary: DataSummary, strict: bool, classes: list[str] | None = None) -> FileImages:
    """Read `path,label` rows; paths are relative to the CSV's folder.

    The header is matched without regard to case or surrounding spaces; without a ``path`` column, the column whose
    values name existing image files (:func:`image_path_column`, e.g. ``file``) holds the paths. Blank lines are
    ignored; labels are stripped of surrounding spaces (counted as a warning in `summary`); a row without a path or
    a label is skipped as an incomplete row, and with `classes` given, a row with another label as an unknown class.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"Cannot read CSV {path}: {e}. Save it as UTF-8 text whose first line is: path,label") from e
    header = [c.strip().lower() for c in rows[0]] if rows else []
    column = "path" if "path" in header else (image_path_column(path) or "").lower()
    if column not in header or "label" not in header:
        raise DataError(
            f"CSV {path} needs a header with columns 'path' (or any column naming image files) and 'label'; "
            f"found {header[:10]}. Write the first line as: path,label"
        )
    col_path, col_label = header.index(column), header.index("label")
    paths, names = [], []
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        rel = row[col_path].strip() if col_path < len(row) else ""
        raw = row[col_label] if col_label < len(row) else ""
        name = raw.strip()
        if not rel or not name:
            summary.found += 1
            summary.skip("incomplete row", f"{path} row {n}")
            continue
        if name != raw:
            summary.warn("labels_stripped", f"{path.name} row {n} ({raw!r})")
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
    summary.raise_if_strict(strict)
    return FileImages([paths[i] for i in keep], [index[names[i]] for i in keep], classes, name=str(path), digests=_digests(checks, keep))


def image_path_column(path: Path, sniff_rows: int = 20) -> str | None:
    """The first column of a CSV whose first `sniff_rows` values are mostly existing image files (relative to the
    CSV's folder), stripped of surrounding spaces; None when no column is, or the file cannot be read."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = [r for _, r in zip(range(sniff_rows), reader)]
            columns = [c for c in reader.fieldnames or [] if c is not None]
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    for column in columns:
        values = [(r.get(column) or "").strip() for r in rows]
        values = [v for v in values if v]
        images = [v for v in values if Path(v).suffix.lower() in IMAGE_EXTENSIONS and (path.parent / v).is_file()]
        if values and len(images) * 2 > len(values):
            return column.strip()
    return None


def read_paths(paths: Sequence[str | Path], labels: Sequence, summary: DataSummary, strict: bool) -> FileImages:
    """Image files with their labels given in Python, scanned like a folder (unreadable files skipped and counted)."""
    if len(paths) != len(labels):
        raise UsageError(f"got {len(paths)} paths and {len(labels)} labels; they must pair up one to one.")
    files = [Path(p) for p in paths]
    classes = sorted({str(v) for v in labels})
    checks = _scan_files(files, summary, strict)
    keep = [i for i, c in enumerate(checks) if c.reason is None]
    return FileImages(
        [files[i] for i in keep],
        [classes.index(str(labels[i])) for i in keep],
        classes,
        name="paths",
        digests=_digests(checks, keep),
    )


# --------------------------------------------------------------------------- transforms


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
    common = dict(
        input_size=size,
        mean=data_config["mean"],
        std=data_config["std"],
        interpolation=data_config.get("interpolation", "bilinear"),
        is_training=True,
    )
    if augment == "light":
        # Mild crops and colour only: no flips, which would corrupt digits and text.
        return create_transform(**common, scale=(0.7, 1.0), ratio=(0.9, 1.1), hflip=0.0, color_jitter=0.1)
    if augment == "strong":
        return create_transform(**common, scale=(0.35, 1.0), hflip=0.5, auto_augment="rand-m7-mstd0.5", re_prob=0.2)
    raise UsageError(f"augment must be one of {', '.join(AUGMENTATIONS)}; got '{augment}'.{did_you_mean(augment, AUGMENTATIONS)}")


class TransformedImages(torch.utils.data.Dataset):
    """An ImageSet as a torch Dataset of (tensor, label, index)."""

    def __init__(self, images: ImageSet, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images.load(i)), int(self.images.labels[i]), i


class MemoryImages(ImageSet):
    """Images given as PIL images in memory (any mode: converted to RGB when loaded)."""

    def __init__(self, images: Sequence[Image.Image], labels: IntArrayLike, classes: Sequence[str], name: str = "images"):
        super().__init__(labels, classes, name)
        self.images = list(images)

    def load(self, i: int) -> Image.Image:
        return to_rgb(self.images[i].copy())

    def identities(self) -> list[str]:
        return [f"{self.name}|{hashlib.blake2b(img.tobytes(), digest_size=10).hexdigest()}" for img in self.images]

    def subset(self, indices: IntArrayLike) -> MemoryImages:
        idx = [int(i) for i in indices]
        return MemoryImages([self.images[i] for i in idx], self.labels[idx], self.classes, self.name)

    def loader_workers(self) -> int:
        return 0


def as_image_set(inputs, classes: list[str], labels: Sequence[str] | None = None) -> ImageSet:
    """What `predict` and `score` take, as an ImageSet: a path, a folder (every image in it), a list of paths,
    PIL images or HWC uint8 arrays (an N x H x W x C array is N images).

    Each is decoded as a file is: an RGBA image or array (H, W, 4) is composited onto white. (PIL's
    ``Image.open(p).convert("RGB")`` drops the alpha instead, showing the colour under transparent pixels, often
    black: another image than the file's.)

    Raises:
        UsageError: an input of another kind, or labels that are not the model's classes.
    """
    if isinstance(inputs, ImageSet):
        return inputs
    items = _image_items(inputs)
    index = {c: i for i, c in enumerate(classes)}
    if labels is not None:
        if len(labels) != len(items):
            raise UsageError(f"got {len(items)} images and {len(labels)} labels; they must pair up one to one.")
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise UsageError(f"labels {unknown[:5]} are not classes of this model ({', '.join(classes)}).")
    ids = [index[v] for v in labels] if labels is not None else [0] * len(items)
    if all(isinstance(x, Path) for x in items):
        return FileImages(items, ids, classes, name="predict")
    return MemoryImages([x if isinstance(x, Image.Image) else Image.open(x) for x in items], ids, classes)


def _image_items(inputs) -> list:
    """Paths and PIL images, one per image."""
    if isinstance(inputs, str | Path):
        path = Path(inputs).expanduser()
        if path.is_dir():
            return list(image_files(path))
        return [path]
    if isinstance(inputs, Image.Image):
        return [inputs]
    if isinstance(inputs, np.ndarray):
        return _array_images(inputs)
    if not isinstance(inputs, Sequence):
        raise UsageError(
            f"Cannot classify a {type(inputs).__name__}: give an image path, a folder, a PIL image, an HWC uint8 array, or a list of those."
        )
    items: list[Path | Image.Image] = []
    for x in inputs:
        if isinstance(x, str | Path):
            items.append(Path(x).expanduser())
        elif isinstance(x, Image.Image):
            items.append(x)
        elif isinstance(x, np.ndarray) and x.ndim in (2, 3):
            items.extend(_array_images(x))
        else:
            raise UsageError(f"Cannot classify a {type(x).__name__} in the list: give image paths, PIL images or HWC uint8 arrays.")
    return items


def _array_images(arr: np.ndarray) -> list[Image.Image]:
    """An H x W (grey), H x W x C or N x H x W x C uint8 array as PIL images."""
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3, 4) or (arr.ndim >= 3 and arr.shape[-1] not in (1, 3, 4)):
        raise UsageError(
            f"An image array must be uint8 with shape HxW, HxWxC or NxHxWxC (C = 1, 3 or 4); got "
            f"{arr.dtype} {tuple(arr.shape)}. Convert with (x * 255).astype('uint8') and channels last."
        )
    frames = list(arr) if arr.ndim == 4 else [arr]
    return [Image.fromarray(f[..., 0] if f.ndim == 3 and f.shape[-1] == 1 else f) for f in frames]
