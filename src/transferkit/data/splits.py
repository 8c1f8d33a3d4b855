"""Stratified, seeded splits and per-class subsampling; duplicates and label conflicts across splits."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from transferkit.data.examples import SPLIT_NAMES, DataSplits, DataSummary, Examples
from transferkit.errors import DataError, UsageError

E = TypeVar("E", bound=Examples)


def validate_split(split: Sequence[float]) -> tuple[float, float, float]:
    """Check train/val/test fractions: three positive numbers summing to 1."""
    if len(split) != 3 or any(f <= 0 for f in split) or abs(sum(split) - 1) > 1e-6:
        raise UsageError(
            f"split must be three positive fractions for train,val,test that sum to 1; got {tuple(split)}. Example: --split 0.7,0.15,0.15"
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
            part.extend(idx[start : start + n])
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


def split_stratified(images: E, split: Sequence[float], seed: int, source: str) -> tuple[E, ...]:
    """Split one image set into train/val/test by `split` fractions."""
    counts = images.class_counts()
    small = {c: n for c, n in counts.items() if n < len(split)}
    noun = images.noun
    if small:
        name, n = next(iter(small.items()))
        raise DataError(
            f"Class '{name}' in {source} has {n} {noun}(s); splitting into train/val/test needs at least "
            f"{len(split)} per class. Add {noun}s to that class, remove it, or give train/ val/ test/ folders."
        )
    return tuple(images.subset(idx) for idx in stratified_indices(images.labels, split, seed))


def stratified_splits(images: Examples, split: Sequence[float], seed: int, source: str, summary: DataSummary) -> DataSplits:
    """Train, val and test by the three `split` fractions (`split_stratified`), with what the load found."""
    train, val, test = split_stratified(images, split, seed, source)
    return DataSplits(train, val, test, summary)


def subsample_per_class(images: Examples, amount: float, seed: int) -> Examples:
    """Keep a seeded share of each class: `amount` <= 1 is a fraction, > 1 a count per class (at least 1 each)."""
    if amount <= 0:
        raise UsageError(f"a training fraction must be > 0; got {amount}.")
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for c in np.unique(images.labels):
        idx = np.flatnonzero(images.labels == c)
        n = int(amount) if amount > 1 else max(1, round(len(idx) * amount))
        keep.extend(rng.permutation(idx)[: min(n, len(idx))])
    return images.subset(sorted(keep))


def drop_conflicting_labels(parts: Sequence[E], summary: DataSummary, strict: bool) -> list[E]:
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
        digests, names = images.digests or [], images.ids()
        for i in (i for i, d in enumerate(digests) if d in bad):
            summary.skip("conflicting labels", names[i])
        out.append(images.subset([i for i, d in enumerate(digests) if d not in bad]))
    summary.raise_if_strict(strict)
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
