"""compare's options checked before any work, and the comparison an interrupted run left to continue.

Checks that need nothing but the values given (and OUT's compare.json): a bad seed count, contradictory
backbone options, or a comparison that would overwrite an unfinished one are refused before data is read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from transferkit.errors import RunError, UsageError


def check_repeats(seeds: int, cv: int | None) -> None:
    """Refuse a bad seed count or fold count before any work."""
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise UsageError(f"--seeds (seeds) must be a whole number of at least 1; got {seeds!r}.")
    if cv is not None and (not isinstance(cv, int) or isinstance(cv, bool) or cv == 1 or cv < 0):
        raise UsageError(f"--cv (cv) must be 0 (off) or at least 2 folds; got {cv!r}.")


def check_models(
    model: str | None, models: Sequence[str] | None, fractions: Sequence[float], baseline: str | None, cv: int | None
) -> list[str | None]:
    """The backbones to compare ([model] without --models); contradictory options refused before any work."""
    if not models:
        return [model]
    if model is not None:
        names = ",".join(m.strip() for m in models)
        raise UsageError(f"Give --model (one backbone) or --models (several), not both; got --model {model} and --models {names}.")
    return list(check_several_models(models, fractions, baseline, cv))


def check_several_models(models: Sequence[str], fractions: Sequence[float], baseline: str | None, cv: int | None) -> list[str]:
    """The backbones of --models, stripped; repeats, blanks and options that need one backbone refused."""
    names = [m.strip() for m in models]
    if any(not m for m in names) or len(set(names)) != len(names):
        raise UsageError(f"--models needs distinct, comma-separated backbone names; got '{','.join(names)}'.")
    if len(names) > 1 and (fractions or baseline):
        raise UsageError(
            "--fractions and --baseline run on one backbone; with --models, rank the backbones first, "
            "then run them with --model on the one chosen."
        )
    if len(names) > 1 and cv == 0:
        raise UsageError(
            "--cv 0 turns off the cross-validated probe, which is what ranks several --models; leave --cv out (5 folds) or give at least 2."
        )
    return names


def unfinished_comparison(out: Path, resume: bool) -> dict | None:
    """Before any work: the content of OUT/compare.json to continue (`resume`), or None to start a comparison.

    Raises:
        UsageError: `resume` without a compare.json in `out`; or, without `resume`, an unfinished one there (starting
            over would overwrite what it finished).
        RunError: compare.json cannot be read.
    """
    path = Path(out) / "compare.json"
    if not path.is_file():
        if resume:
            raise UsageError(f"--resume found no {path}: there is no comparison to continue. Run compare without --resume.")
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunError(f"Cannot read {path} ({e}). Compare into another --out, or delete it to start over.") from e
    if not resume and isinstance(saved, dict) and saved.get("complete") is False:
        raise UsageError(
            f"{path} holds an unfinished comparison ({len(saved.get('results') or [])} finished; still to run: "
            f"{', '.join(saved.get('pending') or [])}). Continue it with --resume, or compare into another --out "
            "(or delete it to start over)."
        )
    return saved if resume else None
