"""Validation of the statistics' inputs: labels, correctness vectors, confidences, counts.

Every function raises a UsageError that names the argument, the value received and what is expected.
"""

from __future__ import annotations

import logging

import numpy as np
from numpy.typing import ArrayLike

from transferkit.errors import UsageError

logger = logging.getLogger(__name__)


def is_number(value) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def check_confidence(confidence: float) -> float:
    """Return alpha = 1 - confidence after checking 0 < confidence < 1."""
    if not (is_number(confidence) and 0.0 < confidence < 1.0):
        raise UsageError(f"confidence must be a number strictly between 0 and 1, e.g. 0.95; got {confidence!r}.")
    return 1.0 - float(confidence)


def check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise UsageError(f"{name} must be an integer of at least {minimum}; got {value!r}.")
    return int(value)


def as_labels(name: str, values: ArrayLike) -> np.ndarray:
    """A 1-D integer array of class indices, or a UsageError naming `name`."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise UsageError(f"{name} must be a 1-D array of class indices; got shape {arr.shape}.")
    whole = np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))
    if arr.size and not np.issubdtype(arr.dtype, np.integer) and not whole:
        raise UsageError(f"{name} must hold integer class indices; got dtype {arr.dtype}. Pass labels.astype(int).")
    return arr.astype(np.int64)


def as_correct(name: str, values: ArrayLike) -> np.ndarray:
    """A 1-D boolean correctness array (bool or 0/1), or a UsageError naming `name`."""
    arr = np.asarray(values)
    if arr.ndim != 1 or not (arr.dtype == bool or np.isin(arr, (0, 1)).all()):
        raise UsageError(
            f"{name} must be a 1-D array of per-example correctness (True/False or 0/1); "
            f"got shape {arr.shape}, dtype {arr.dtype}. Pass predictions == labels."
        )
    return arr.astype(bool)


def check_same_length(names: str, *arrays: np.ndarray) -> int:
    lengths = [len(a) for a in arrays]
    if len(set(lengths)) != 1:
        raise UsageError(f"{names} must describe the same examples; got lengths {lengths}.")
    if lengths[0] == 0:
        raise UsageError(f"{names} are empty: an interval needs at least one example.")
    return lengths[0]


# --------------------------------------------------------------------------- intervals
