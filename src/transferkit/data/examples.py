"""The modality-neutral base of labelled examples: labels, classes, identities, subsets; what a load found.

An :class:`Examples` is one split of labelled examples of either modality
(images in :mod:`transferkit.data.images`, texts in :mod:`transferkit.data.texts`):
integer labels, the class names, one identity string per example for the
feature cache, and `load(i)`, which gives the example itself (an RGB PIL image,
or a string). Everything that works on labels alone (splits, subsampling,
summaries) works on both.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

from transferkit.errors import DataError

SPLIT_NAMES = ("train", "val", "test")
# Folder names a dataset's own split may have, by split (matched without regard to case).
SPLIT_FOLDERS = {"train": ("train", "training"), "val": ("val", "valid", "validation", "dev"), "test": ("test", "testing")}
DEFAULT_SPLIT = (0.7, 0.15, 0.15)

IntArrayLike = Sequence[int] | np.ndarray  # class indices or example positions: a list, or a NumPy integer array


class Examples:
    """Labelled examples of one split. Subclasses hold the examples; this base holds labels and class names.

    Attributes:
        noun: what one example is called in messages ("image", "text").
        digests: content hashes where known (duplicate and conflict checks), else None.

    Subclasses whose examples have names (a file path, or "file:row" for a text) keep them in `paths`;
    `ids()` is the contract that reads them.
    """

    noun = "example"
    modality = ""  # "image" or "text": which backbones and classifier take these examples

    def __init__(self, labels: IntArrayLike, classes: Sequence[str], name: str):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.name = name
        self.digests: list[str] | None = None
        self.preprocess_hint: dict = {}  # a built-in dataset's suggested input size/crop, overridable

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> Any:
        """Example i as the backbone's preprocessing takes it (an RGB image, a string)."""
        raise NotImplementedError

    def identities(self) -> list[str]:
        """One string per example that changes when the example's content may have."""
        raise NotImplementedError

    def subset(self, indices: IntArrayLike) -> Self:
        """The examples at `indices`, in that order, as the same kind of set."""
        raise NotImplementedError

    def ids(self) -> list[str]:
        """One readable name per example (path, file:row, dataset[index]) for reports and exported predictions."""
        return [str(p) for p in getattr(self, "paths", [f"{self.name}[{i}]" for i in range(len(self))])]

    def loader_workers(self) -> int:
        """Decoding processes worth starting: none for small or in-memory sets, else up to 4."""
        return 0 if len(self) < 256 else min(4, os.cpu_count() or 1)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts)}


WARNING_TEXT = {
    "duplicates_across_splits": "val/test file(s) identical to a file in an earlier split (kept; their score "
    "measures memory, not generalisation)",
    "empty_classes": "class folder(s) without usable images, left out",
    "labels_stripped": "label(s) with surrounding spaces, stripped",
}


@dataclass
class DataSummary:
    """What was found, what was skipped by reason, and warnings that changed nothing, each with its paths."""

    source: str
    found: int = 0
    noun: str = "image"  # what was counted: "image" (files) or "text" (rows)
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
        what = "files" if self.noun == "image" else f"{self.noun}s"
        return f"Skipped {self.n_skipped} of {self.found} {what} in {self.source} ({reasons}): {', '.join(first)}{more}"

    def line(self) -> str | None:
        """Skipped files and warnings, one line each, or None when there is nothing to say."""
        skipped = self.skipped_line()
        lines = [skipped] if skipped is not None else []
        for kind, paths in sorted(self.warnings.items()):
            more = ", ..." if len(paths) > 3 else ""
            lines.append(f"Warning: {len(paths)} {WARNING_TEXT.get(kind, kind)}: {', '.join(paths[:3])}{more}")
        return "\n".join(lines) or None

    def raise_if_strict(self, strict: bool) -> None:
        """With `strict`, any skipped example is an error naming them."""
        if strict and self.n_skipped:
            raise DataError(f"{self.skipped_line()}. Remove or fix these files, or drop --strict to skip them.")

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "found": self.found,
            "skipped": {k: len(v) for k, v in self.skipped.items()},
            "first_skipped": [p for v in self.skipped.values() for p in v][:10],
            "warnings": {k: len(v) for k, v in self.warnings.items()},
        }


@dataclass
class DataSplits:
    """Train, validation and test examples sharing one class list."""

    train: Examples
    val: Examples
    test: Examples
    summary: DataSummary

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}
