"""Where labelled examples come from: one entry point per job, and which modality a source holds.

`load_data` reads a training source (image folder, CSV of image paths,
``digits``, a torchvision name, or a CSV/TSV/JSONL of texts) into seeded,
stratified train/val/test splits; `load_eval` reads all labelled examples of
a source for a trained model's classes. `detect_modality` decides images or
texts from the source's content and says why: the one place that question is
answered.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from transferkit.data.examples import DEFAULT_SPLIT, SPLIT_FOLDERS, SPLIT_NAMES, DataSplits, DataSummary, Examples
from transferkit.data.images import IMAGE_EXTENSIONS, ImageSet, image_path_column, read_csv, read_image_folder
from transferkit.data.named import BUILTIN_DATASETS, TORCHVISION_DATASETS, cache_dir, load_digits_images, load_torchvision
from transferkit.data.splits import (
    drop_conflicting_labels,
    note_cross_split_duplicates,
    split_stratified,
    stratified_indices,
    stratified_splits,
    validate_split,
)
from transferkit.data.texts import TEXT_FORMATS, load_eval_texts, load_text_data
from transferkit.errors import DataError, did_you_mean

E = TypeVar("E", bound=Examples)

MODALITIES = ("image", "text")
SNIFF_ROWS = 20  # CSV rows read to decide whether a column holds image paths


def detect_modality(source: str | Path, *, text_column: str | None = None, label_column: str | None = None) -> tuple[str, str]:
    """'image' or 'text' for a data source, and why, in words.

    A folder or a dataset name holds images; a .tsv/.jsonl holds texts; a .csv
    holds images when one of its columns names existing image files (relative
    to the CSV), else texts. Naming a text or label column means texts.

    Raises:
        DataError: `source` is neither an existing file or folder nor a dataset name.
    """
    text, path = str(source), Path(source).expanduser()
    if text in BUILTIN_DATASETS or (text.lower() in TORCHVISION_DATASETS and not path.exists()):
        return "image", f"'{text}' is a built-in image dataset"
    if path.is_dir():
        return "image", f"{path} is a folder (image folders hold one subfolder per class)"
    kind = TEXT_FORMATS.get(path.suffix.lower())
    if not path.exists():
        raise missing_source_error(text, path)
    if kind is None or not path.is_file():
        return "image", f"{path} is not a .csv/.tsv/.jsonl file"
    if kind == "csv":
        column = "path" if "path" in _csv_header(path) else image_path_column(path, SNIFF_ROWS)
        if column is not None:
            return "image", f"column '{column}' of {path.name} names image files"
    if text_column is not None or label_column is not None:
        return "text", "a text or label column was named"
    return "text", f"{path.name} is a {kind.upper()} file whose columns hold no image paths"


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return [c.strip().lower() for c in next(csv.reader(fh), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def load_data(
    source: str | Path,
    *,
    modality: str | None = None,
    split: Sequence[float] = DEFAULT_SPLIT,
    seed: int = 0,
    strict: bool = False,
    download: bool = True,
    text_column: str | None = None,
    label_column: str | None = None,
) -> DataSplits:
    """Labelled examples from a source, split train/val/test (stratified, seeded) unless the source gives splits.

    Args:
        source: an image folder, a CSV of ``path,label``, ``digits``, a torchvision name, or a
            CSV/TSV/JSONL of labelled texts.
        modality: 'image' or 'text'; None detects it (:func:`detect_modality`).

    Example:
        >>> splits = load_data("digits", seed=0)
        >>> splits.sizes()
        {'train': 1259, 'val': 270, 'test': 268}
    """
    modality = modality or detect_modality(source, text_column=text_column, label_column=label_column)[0]
    if modality == "text":
        columns = {k: v for k, v in (("text_column", text_column), ("label_column", label_column)) if v is not None}
        return load_text_data(source, split=split, seed=seed, strict=strict, **columns)
    return load_image_data(source, split=split, seed=seed, strict=strict, download=download)


def load_image_data(
    source: str | Path, *, split: Sequence[float] = DEFAULT_SPLIT, seed: int = 0, strict: bool = False, download: bool = True
) -> DataSplits:
    """Labelled images from a folder, a CSV, `digits` or a torchvision dataset name."""
    split = validate_split(split)
    text = str(source)
    path = Path(source).expanduser()
    if text in BUILTIN_DATASETS:
        summary = DataSummary(text, found=1797)
        return stratified_splits(load_digits_images(), split, seed, text, summary)
    if text.lower() in TORCHVISION_DATASETS and not path.exists():
        return _load_named(text.lower(), split, seed, download)
    if path.is_file() and path.suffix.lower() == ".csv":
        summary = DataSummary(str(path))
        [images] = drop_conflicting_labels([read_csv(path, summary, strict)], summary, strict)
        images = _require_usable(images, path, summary)
        splits = stratified_splits(images, split, seed, str(path), summary)
        note_cross_split_duplicates(splits)
        return splits
    if path.is_dir():
        return _load_folder(path, split, seed, strict)
    raise missing_source_error(text, path)


def missing_source_error(text: str, path: Path) -> DataError:
    """The error for a data source that is neither an existing file or folder nor a dataset name."""
    if not path.exists() and (path.suffix or "/" in text or "\\" in text):
        return DataError(
            f"{path} does not exist. Give an image folder, a CSV of path,label rows, a CSV/TSV/JSONL of "
            "labelled texts, 'digits' or a torchvision dataset name."
        )
    choices = list(BUILTIN_DATASETS) + sorted(TORCHVISION_DATASETS)
    return DataError(
        f"Data source '{text}' is neither a folder, a .csv file nor a dataset name."
        f"{did_you_mean(text.lower(), choices)} Built-in and torchvision names: {', '.join(choices)}."
    )


def load_eval(
    source: str | Path,
    classes: list[str],
    *,
    modality: str,
    strict: bool = False,
    text_column: str | None = None,
    label_column: str | None = None,
) -> tuple[Examples, DataSummary]:
    """All labelled examples of a source, labelled with a trained model's `classes`."""
    if modality == "text":
        columns = {k: v for k, v in (("text_column", text_column), ("label_column", label_column)) if v is not None}
        return load_eval_texts(source, classes, **columns)
    return load_eval_images(source, classes, strict=strict)


def _load_named(name: str, split: Sequence[float], seed: int, download: bool) -> DataSplits:
    train_all, test = load_torchvision(name, cache_dir() / "datasets" / name, download)
    summary = DataSummary(name, found=len(train_all) + (len(test) if test else 0))
    if test is None:
        return stratified_splits(train_all, split, seed, name, summary)
    # Keep the dataset's own test split; carve validation out of its training split.
    val_share = split[1] / (split[0] + split[1])
    tr, va = stratified_indices(train_all.labels, (1 - val_share, val_share), seed)
    return DataSplits(train_all.subset(tr), train_all.subset(va), test, summary)


def split_folders(root: Path) -> dict[str, Path]:
    """The split subfolders a folder gives (train/, val/ or valid/ or dev/, test/, ...), by split.

    Raises:
        DataError: train/ has a sibling folder that names no split (its images would be left out), or two
            folders name the same split.
    """
    names = {n: split for split, ns in SPLIT_FOLDERS.items() for n in ns}
    subdirs = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    if not any(names.get(d.name.lower()) == "train" for d in subdirs):
        return {}
    given: dict[str, Path] = {}
    for d in subdirs:
        split = names.get(d.name.lower())
        if split is None:
            accepted = ", ".join(f"{s}: {'/'.join(ns)}" for s, ns in SPLIT_FOLDERS.items())
            raise DataError(
                f"{root} has a train/ folder, so its subfolders are splits, but '{d.name}' names no split "
                f"(its images would be left out). Accepted names ({accepted}); rename or move it."
            )
        if split in given:
            raise DataError(f"{root} has two folders for the {split} split: {given[split].name}/ and {d.name}/. Keep one.")
        given[split] = d
    return given


def _load_folder(root: Path, split: Sequence[float], seed: int, strict: bool) -> DataSplits:
    summary = DataSummary(str(root))
    given = split_folders(root)
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
        splits = stratified_splits(images, split, seed, str(root), summary)
    note_cross_split_duplicates(splits)
    return splits


def _with_classes(images: E, classes: list[str], where: Path) -> E:
    """Relabel `images` to `classes` (a subset of its own); images of any other class are an error."""
    names = [images.classes[i] for i in np.unique(images.labels)]
    extra = [c for c in names if c not in classes]
    if extra:
        raise DataError(
            f"{where} has images of class(es) {extra}, which have no usable training images. "
            "Add training images for them or remove them from this split."
        )
    index = {c: i for i, c in enumerate(classes)}
    out = images.subset(range(len(images)))
    out.labels = np.asarray([index[images.classes[v]] for v in images.labels.tolist()], dtype=np.int64)
    out.classes = list(classes)
    return out


def _require_usable(images: E, where: Path, summary: DataSummary) -> E:
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
        raise DataError(
            f"{where} has {_classes(len(images.classes))} with usable images ({images.classes}); "
            "a classifier needs at least two. Add a subfolder (or CSV label) per class, "
            "each holding that class's images."
        )
    return images


def _no_images_message(where: Path, summary: DataSummary) -> str:
    missing = summary.skipped.get("missing", [])
    if missing and len(missing) == summary.n_skipped:
        base = where.parent if where.is_file() else where
        return (
            f"None of the {len(missing)} image files listed in {where} exist. Paths are read relative to {base}; "
            f"the first: {', '.join(missing[:3])}. Fix the paths or move the CSV next to the images."
        )
    if summary.n_skipped:
        return f"No usable images in {where}: {summary.skipped_line()}. Replace the broken files with images PIL can open."
    loose = where.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in where.iterdir() if p.is_file())
    if loose:
        return (
            f"No images found in class subfolders of {where}, but there are image files directly in it. "
            f"Move them into one subfolder per class (e.g. {where}/cat/1.jpg)."
        )
    return (
        f"No images found in {where}. Expected one subfolder per class holding "
        f"{', '.join(IMAGE_EXTENSIONS[:4])}, ... files (or a CSV with path,label)."
    )


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
        folder = split_folders(path).get("test", path)
        summary.source = str(folder)  # what evaluate says it read
        [images] = drop_conflicting_labels([read_image_folder(folder, classes, summary, strict)], summary, strict)
    else:
        raise DataError(f"Data source '{text}' is neither a folder, a .csv file nor a dataset name.")
    if list(images.classes) != list(classes):
        raise DataError(f"{text} has classes {images.classes}, the model was trained on {classes}.")
    if len(images) == 0:
        raise DataError(_no_images_message(Path(summary.source), summary))
    summary.found = summary.found or len(images)
    return images, summary


def _classes(n: int) -> str:
    return f"{n} {'class' if n == 1 else 'classes'}"
