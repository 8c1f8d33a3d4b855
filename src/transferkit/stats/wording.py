"""Numbers in words: cost ratios that read right and values with their intervals."""

from __future__ import annotations

import math
from numbers import Real

from transferkit.errors import UsageError


def _is_number(value) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool)


def ratio_phrase(a_seconds: float, b_seconds: float, *, what: str = "time") -> str:
    """How A's cost reads next to B's: "9.5x faster", "2.0x slower", "1/40 of the time", "40x the time".

    Below 10x the ratio is given with one decimal; from 10x on as a whole
    fraction or multiple, so a large gap never prints as "0.0x". Ratios that
    round to 1.0 read "about the same time".

    Args:
        a_seconds: Cost of A in seconds (>= 0).
        b_seconds: Cost of B in seconds (>= 0).
        what: The noun for the cost, e.g. "training time".

    Returns:
        A phrase to follow "A took ...", e.g. "A took 1/40 of the training time of B".

    Example:
        >>> ratio_phrase(3.0, 120.0, what="training time"), ratio_phrase(10.0, 4.0)
        ('1/40 of the training time', '2.5x slower')
    """
    for name, value in (("a_seconds", a_seconds), ("b_seconds", b_seconds)):
        if not (_is_number(value) and math.isfinite(value) and value >= 0):
            raise UsageError(f"{name} must be a finite number of seconds, at least 0; got {value!r}.")
    if a_seconds == 0 or b_seconds == 0:
        if a_seconds == b_seconds:
            return f"about the same {what}"
        return f"a negligible fraction of the {what}" if a_seconds == 0 else f"far more {what} (the other's was too short to measure)"
    ratio = max(a_seconds, b_seconds) / min(a_seconds, b_seconds)
    short = f"{ratio:.1f}"
    if short == "1.0":
        return f"about the same {what}"
    faster = a_seconds < b_seconds
    if float(short) < 10:
        return f"{short}x faster" if faster else f"{short}x slower"
    return f"1/{ratio:.0f} of the {what}" if faster else f"{ratio:.0f}x the {what}"


def format_interval(value: float | None, low: float | None, high: float | None, percent: bool = True, *, confidence: float = 0.95) -> str:
    """A value with its interval: "96.3% (95% CI 93.3-98.0)", or "n/a" when the value is None.

    Args:
        value: The estimate, a fraction when percent=True.
        low: Lower end of the interval (None to show the value alone).
        high: Upper end of the interval.
        percent: Show fractions as percentages with one decimal; else three decimals.
        confidence: Coverage named in the text.

    Returns:
        The text; a negative bound switches "a-b" to "a to b" so signs stay readable.

    Example:
        >>> format_interval(0.963, 0.933, 0.980), format_interval(-0.012, -0.03, 0.005)
        ('96.3% (95% CI 93.3-98.0)', '-1.2% (95% CI -3.0 to 0.5)')
    """
    if value is None:
        return "n/a"
    scale, unit, digits = (100.0, "%", 1) if percent else (1.0, "", 3)

    def num(v: float) -> str:
        return f"{v * scale:.{digits}f}"

    if low is None or high is None:
        return f"{num(value)}{unit}"
    sep = " to " if low < 0 or high < 0 else "-"
    return f"{num(value)}{unit} ({confidence * 100:g}% CI {num(low)}{sep}{num(high)})"
