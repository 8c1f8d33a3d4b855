"""The comparison's verdict: a winner only when a paired test on the test examples says so.

Every strategy is compared with the most accurate one on the same test examples
(:func:`transferkit.stats.paired.paired_difference_over_seeds`: a paired bootstrap
interval of the accuracy difference and an exact McNemar p-value). A strategy
whose interval includes 0 is *within noise* of the best; the verdict then names
no winner and recommends the cheapest strategy within noise. Costs are worded by
:func:`transferkit.stats.wording.ratio_phrase` ("9.5x faster", "1/40 of the training
time"), never "0.0x".

The functions take the comparison's rows duck-typed (``label``, ``seconds``,
``test_accuracy``, ``val_accuracy``, ``test_correct``), so this module depends on
:mod:`transferkit.stats.paired` alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

import numpy as np

from transferkit.stats.paired import PairedDifference, paired_difference_over_seeds
from transferkit.stats.wording import ratio_phrase


class Row(Protocol):
    """What the verdict reads of a comparison row (`compare.results.StrategyResult` is one)."""

    @property
    def label(self) -> str: ...
    @property
    def seconds(self) -> float: ...
    @property
    def test_accuracy(self) -> float: ...
    @property
    def val_accuracy(self) -> float: ...
    @property
    def test_correct(self) -> np.ndarray: ...


R = TypeVar("R", bound=Row)


def best_of(results: Sequence[R]) -> R:
    """The most accurate on test (mean over seeds); ties go to validation accuracy, then the shorter training."""
    return max(results, key=lambda r: (r.test_accuracy, r.val_accuracy, -r.seconds))


def paired_against_best(results: Sequence[R], seed: int = 0) -> list[tuple[R, PairedDifference]]:
    """(strategy, best minus strategy) for every strategy but the best, in the table's order."""
    best = best_of(results)
    return [(r, paired_difference_over_seeds(best.test_correct, r.test_correct, seed=seed)) for r in results if r is not best]


def cost_phrase(a: Row, b: Row) -> str:
    """How A's training time reads beside B's: "9.5x faster to train than B", "1/40 of B's training time"."""
    phrase = ratio_phrase(a.seconds, b.seconds, what="training time")
    if phrase.endswith(("faster", "slower")):
        return f"{phrase} to train than {b.label}"
    if phrase.startswith("about the same"):
        return f"{phrase} as {b.label}"
    return f"{phrase} of {b.label}"


def _points(d: PairedDifference) -> str:
    sep = " to " if d.low < 0 or d.high < 0 else "-"
    return f"{d.difference * 100:+.1f} points (95% CI {_bound(d.low)}{sep}{_bound(d.high)}; McNemar p = {d.mcnemar_p:.2g})"


def _bound(fraction: float) -> str:
    """An interval end in points, one decimal; more when one would print a nonzero end as 0.0 (it reads as 'includes 0')."""
    points = fraction * 100
    for digits in (1, 2, 3):
        text = f"{points:.{digits}f}"
        if points == 0 or float(text) != 0:
            return text
    return f"{points:.1e}"


def verdict(results: Sequence[R], paired: list[tuple[R, PairedDifference]], seeds: int = 1) -> str:
    """One or two sentences: the winner with its evidence, or no measurable difference and the cheapest within noise.

    `paired` is `paired_against_best(results)`, computed once by the caller for the verdict and the table.
    """
    best = best_of(results)
    n = len(best.test_correct[0]) if len(best.test_correct) else 0
    if len(results) == 1:
        return f"{best.label} reached {best.test_accuracy:.1%} test accuracy on {n} test examples."
    within = [r for r, d in paired if not d.significant]
    worse = [r for r, d in paired if d.significant]
    noise = (
        ""
        if seeds > 1
        else (
            " With one training seed, differences inside these intervals are noise; "
            "--seeds 3 measures how much the seed moves each strategy."
        )
    )
    if not within:
        runner, d = max(paired, key=lambda p: p[0].test_accuracy)
        return (
            f"{best.label} is the most accurate ({best.test_accuracy:.1%}), measurably ahead of every other "
            f"strategy on {n} test examples: {_points(d)} over the runner-up {runner.label}, and "
            f"{cost_phrase(best, runner)}."
        )
    closest, d = max(((r, d) for r, d in paired if r in within), key=lambda p: p[0].test_accuracy)
    cheapest = min([best, *within], key=lambda r: r.seconds)
    names = ", ".join(r.label for r in within)
    text = (
        f"No measurable difference on {n} test examples between {best.label} ({best.test_accuracy:.1%}) and "
        f"{names}: {best.label} minus {closest.label} is {_points(d)}, an interval that includes 0."
    )
    if cheapest is best:
        text += f" {best.label} is also the cheapest of them to train."
    else:
        text += f" The cheapest within noise is {cheapest.label} ({cheapest.test_accuracy:.1%}), {cost_phrase(cheapest, best)}: choose it."
    if worse:
        text += f" Measurably less accurate: {', '.join(r.label for r in worse)}."
    return text + noise


def paired_rows(results: Sequence[R], paired: list[tuple[R, PairedDifference]]) -> list[dict]:
    """The paired-difference table (`paired` from `paired_against_best`): each strategy against the best, JSON-ready."""
    best = best_of(results)
    return [{"strategy": r.label, "against": best.label, **d.to_dict()} for r, d in paired]
