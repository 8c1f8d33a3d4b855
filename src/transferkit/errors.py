"""Exception types of transferkit.

Every error a user can cause is one of these, and its message says what was
wrong, the value received, the valid choices and the fix. The CLI turns them
into a one-paragraph message and exit status 2 (usage) or 1 (everything else).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import TypeVar


class TransferkitError(Exception):
    """Base class of every error transferkit raises on purpose."""

    exit_code = 1


class UsageError(TransferkitError, ValueError):
    """A parameter or option has a value transferkit cannot use."""

    exit_code = 2


class DataError(TransferkitError):
    """The labelled data cannot be read or cannot be used as given."""


class ModelError(TransferkitError):
    """A backbone or weights file cannot be loaded."""


class CacheError(TransferkitError):
    """The feature cache cannot be written: a full disk, no permission, a read-only file system."""


class ResourceError(TransferkitError):
    """The machine ran out of something (device memory) that a smaller setting would avoid."""


class RunError(TransferkitError):
    """A run directory is missing, incomplete or of an unknown format."""


class ExportError(TransferkitError):
    """A model cannot be exported, or the exported file does not reproduce the PyTorch model's outputs."""


class TrackingError(TransferkitError):
    """Experiment logging cannot start: its library is not installed, or the tracking store refuses the run."""


class ServeError(TransferkitError):
    """The model server cannot start: its packages are missing, or the address cannot be listened on."""


class RequestError(TransferkitError):
    """An HTTP request to the model server cannot be answered as sent.

    `status` is the HTTP status to answer with (4xx for what the client can fix, 503 for an overloaded
    server); `details` go into the JSON body beside the message (the file concerned, the reason).
    """

    def __init__(self, message: str, status: int = 400, **details: object):
        super().__init__(message)
        self.status = status
        self.details = details


class NotFittedError(TransferkitError, AttributeError):
    """A method that needs a fitted model was called before `fit`."""


class NameDeprecationWarning(FutureWarning):
    """A name that will mean something else in the next release (the CLI shows its log line instead)."""


def did_you_mean(value: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ' Did you mean: a, b?' for the closest choices, or ''."""
    # 0.5: short names one character apart ('fp8' / 'fp16') still match; choices deduplicated (names listed twice).
    close = difflib.get_close_matches(value, list(dict.fromkeys(choices)), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


T = TypeVar("T")


def check_choice(name: str, value: T, choices: Iterable) -> T:
    """`value` if it is one of `choices`, else a UsageError naming the parameter, the value and the choices."""
    choices = list(choices)
    if value in choices:
        return value
    shown = ", ".join("None" if c is None else str(c) for c in choices)
    near = did_you_mean(value, [c for c in choices if isinstance(c, str)]) if isinstance(value, str) else ""
    raise UsageError(f"{name} must be one of {shown}; got {value!r}.{near}")
