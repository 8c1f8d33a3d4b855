"""What `transferkit compare` measured, as typed records: a row per strategy and the comparison around them.

The verdict (:mod:`transferkit.compare.verdict`) reads these records; the pages (:mod:`transferkit.report.comparison`)
render them; nothing here draws or writes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from transferkit.compare import verdict as verdicts
from transferkit.compare.ranking import Ranking
from transferkit.runs.meta import PhaseRecord
from transferkit.stats.paired import PairedDifference


@dataclass(kw_only=True)
class StrategyResult:
    """One row of the comparison table."""

    strategy: str
    label: str
    trainable_params: int
    total_params: int
    epochs: int
    seconds: float  # training: the strategy's phases (probe fit, epochs), the same measure for every strategy
    peak_memory_mib: float
    val_accuracy: float
    test_accuracy: float
    macro_f1: float
    train_per_class: float
    metrics: dict = field(repr=False, default_factory=dict)
    phases: list[PhaseRecord] = field(repr=False, default_factory=list)
    history: list = field(repr=False, default_factory=list)
    wall_seconds: float = 0.0  # the whole fit: backbone loading, features (computed or read from the cache), test pass
    runs: list = field(repr=False, default_factory=list)  # one dict per training seed (scores, per-example predictions)

    @classmethod
    def from_dict(cls, d: dict) -> StrategyResult:
        """A row of compare.json back as a result (`Comparison.to_dict()`'s "results"), to resume a comparison."""
        names = (
            "strategy",
            "label",
            "trainable_params",
            "total_params",
            "epochs",
            "seconds",
            "peak_memory_mib",
            "val_accuracy",
            "test_accuracy",
            "macro_f1",
            "train_per_class",
            "wall_seconds",
        )
        return cls(
            **{k: d[k] for k in names if k in d},
            metrics=d.get("metrics") or {},
            phases=[PhaseRecord.from_dict(p) for p in d.get("phases") or []],
            history=d.get("history") or [],
            runs=d.get("runs") or [],
        )

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / self.total_params

    @property
    def test_correct(self) -> np.ndarray:
        """(seeds, test examples) booleans: which test examples each seed's model got right."""
        preds = [run["predictions"] for run in self.runs] or [self.metrics.get("predictions") or {"true": [], "pred": []}]
        return np.array([np.asarray(p["true"]) == np.asarray(p["pred"]) for p in preds], dtype=bool)

    def spread(self, key: str) -> dict | None:
        """Mean, sample sd, min and max of a per-seed score (None with fewer than 2 seeds)."""
        values = [run[key] for run in self.runs]
        if len(values) < 2:
            return None
        return {
            "mean": float(np.mean(values)),
            "sd": float(np.std(values, ddof=1)),
            "min": float(min(values)),
            "max": float(max(values)),
            "seeds": len(values),
        }

    def row(self) -> dict:
        keys = (
            "strategy",
            "label",
            "trainable_params",
            "total_params",
            "epochs",
            "seconds",
            "wall_seconds",
            "peak_memory_mib",
            "val_accuracy",
            "test_accuracy",
            "macro_f1",
            "train_per_class",
        )
        iv = (self.metrics.get("intervals") or {}).get("accuracy") or {}
        return {k: getattr(self, k) for k in keys} | {
            "trainable_share": self.trainable_share,
            "test_accuracy_low": iv.get("low"),
            "test_accuracy_high": iv.get("high"),
            "balanced_accuracy": self.metrics.get("balanced_accuracy"),
            "ece": self.metrics.get("ece"),
            "test_accuracy_spread": self.spread("test_accuracy"),
            "val_accuracy_spread": self.spread("val_accuracy"),
        }


@dataclass(kw_only=True)
class Comparison:
    """Everything `transferkit compare` shows and writes."""

    data: str
    model: str
    seed: int
    results: list[StrategyResult]
    curve: list[StrategyResult] = field(default_factory=list)
    baseline: StrategyResult | None = None
    configs: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    split_sizes: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    seeds: int = 1
    cv: dict | None = None  # the cross-validated probe on train + val (crossval.CVProbe.to_dict())
    noun: str = "examples"
    train_class_counts: list = field(default_factory=list)
    ranking: Ranking | None = None  # several backbones (compare --models): ranked with their costs
    extras: dict | None = field(default=None, repr=False)  # mistakes gallery and data doctor (report.doctor.fit_extras)
    pending: list[str] = field(default_factory=list)  # labels not finished yet: an unfinished comparison, written as it runs
    options: dict | None = None  # what `compare --resume` must match (compare.run.comparison_options)

    def winner(self) -> StrategyResult:
        return verdicts.best_of(self.results)

    def verdict(self) -> str:
        """The winner only when the paired test says so; else no measurable difference and the cheapest within noise."""
        said = verdicts.verdict(self.results, self._pairs, self.seeds)
        if not self.pending:
            return said
        return (
            f"Unfinished: {len(self.pending)} still to run ({', '.join(self.pending)}); continue with compare --resume. "
            f"Of what finished: {said}"
        )

    def paired(self) -> list[dict]:
        return verdicts.paired_rows(self.results, self._pairs)

    @functools.cached_property
    def _pairs(self) -> list[tuple[StrategyResult, PairedDifference]]:
        """The paired tests against the best, computed once for the verdict, the tables and compare.json."""
        return verdicts.paired_against_best(self.results, self.seed)

    def crossover(self) -> str | None:
        """Where, on this data, fine-tuning overtakes feature extraction along the learning curve."""
        if not self.curve:
            return None
        by_n: dict[float, dict[str, float]] = {}
        for r in self.curve:
            by_n.setdefault(r.train_per_class, {})[r.strategy] = r.test_accuracy
        for n in sorted(by_n):
            accs = by_n[n]
            fe = accs.get("feature-extraction")
            better = [s for s, a in accs.items() if s != "feature-extraction" and fe is not None and a > fe]
            if better:
                return f"fine-tuning ({', '.join(better)}) overtakes feature extraction from about {n:.0f} examples per class"
        return "feature extraction stays at least as accurate as fine-tuning at every training size measured"

    def to_dict(self) -> dict:
        return {
            "data": self.data,
            "model": self.model,
            "seed": self.seed,
            "seeds": self.seeds,
            "split_sizes": self.split_sizes,
            "results": [
                r.row()
                | {
                    "phases": [p.to_dict() for p in r.phases],
                    "metrics": _without_predictions(r.metrics),
                    "runs": r.runs or [{"seed": self.seed, "predictions": r.metrics.get("predictions")}],
                    "history": r.history,
                }
                for r in self.results
            ],
            "winner": self.winner().strategy,
            "verdict": self.verdict(),
            "paired": self.paired(),
            "cross_validated_probe": self.cv,
            "train_class_counts": self.train_class_counts,
            "learning_curve": [r.row() for r in self.curve],
            "crossover": self.crossover(),
            "baseline": self.baseline.row() | {"metrics": self.baseline.metrics} if self.baseline else None,
            "configs": self.configs,
            "machine": self.machine,
            "backbone_ranking": self.ranking.to_dict() if self.ranking else None,
            "complete": not self.pending,
            "pending": self.pending,
            "options": self.options,
        }


def _without_predictions(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "predictions"}
