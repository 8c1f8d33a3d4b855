"""The comparison table and the reports: compare.json, report.md and a self-contained report.html.

The HTML inlines its CSS and its plots (PNG as base64 data URIs), so it opens
offline, from anywhere, with no network request. The pages are jinja2 templates
with autoescaping on, so names from the data never become markup; the plots are
drawn with matplotlib's object API and take names verbatim (`parse_math=False`:
a class called "$5 notes" is not read as TeX).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from transferkit.atomic import write_atomic, write_json
from transferkit.compare.results import Comparison, StrategyResult
from transferkit.report.environment import render
from transferkit.report.plots import plot_accuracy_vs_time, plot_confusion, plot_learning_curves, plot_reliability, plot_validation_curves
from transferkit.report.ranking import ranking_context, ranking_markdown
from transferkit.stats.wording import format_interval

COLUMNS = (
    "strategy",
    "trainable params",
    "epochs",
    "train time",
    "fit wall time",
    "peak memory +",
    "val acc",
    "test acc (95% CI)",
    "balanced acc",
    "macro-F1",
)
TIME_NOTE = (
    "train time: the strategy's training phases (the probe's fit, the fine-tuning epochs), measured alike for "
    "every strategy; fit wall time adds loading the backbone, computing or reading the cached features "
    "(computed once, by the first strategy that needs them) and the test pass."
)


def table_note(seeds: int) -> str:
    """What the table's columns mean; with several seeds, how they are summarised."""
    if seeds < 2:
        return TIME_NOTE
    return (
        f"{TIME_NOTE} With {seeds} training seeds on the same split: val and test acc are mean ± sd (min-max) over "
        "the seeds; times, balanced acc and macro-F1 are means; peak memory the largest."
    )


def table_rows(results: list[StrategyResult]) -> list[list[str]]:
    """The comparison table as strings, one list per strategy (same columns as COLUMNS)."""
    return [
        [
            r.label,
            f"{r.trainable_params:,} ({r.trainable_share:.1%})",
            str(r.epochs) if r.epochs else "probe",
            _secs(r.seconds),
            _secs(r.wall_seconds),
            f"{r.peak_memory_mib:.0f} MiB",
            _acc(r, "val_accuracy"),
            _acc(r, "test_accuracy"),
            _plain(_seed_mean(r, "balanced_accuracy")),
            f"{r.macro_f1:.4f}",
        ]
        for r in results
    ]


def _seed_mean(r: StrategyResult, key: str) -> float | None:
    """A test score averaged over the seeds (the one run's with one seed), None when a run lacks it."""
    values = [run.get(key) for run in r.runs] or [r.metrics.get(key)]
    return None if any(v is None for v in values) else float(np.mean(values))


def _plain(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _acc(r: StrategyResult, key: str) -> str:
    """One seed: the value (and for test its Wilson 95% interval); several: mean +- sd (min-max) over the seeds."""
    spread = r.spread(key)
    if spread and spread["min"] == spread["max"]:
        return f"{spread['mean']:.4f} (every seed)"
    if spread:
        return f"{spread['mean']:.4f} ± {spread['sd']:.4f} ({spread['min']:.4f}-{spread['max']:.4f})"
    iv = (r.metrics.get("intervals") or {}).get("accuracy") if key == "test_accuracy" else None
    value = getattr(r, key)
    return f"{value:.4f} ({iv['low']:.3f}-{iv['high']:.3f})" if iv else f"{value:.4f}"


def _score(value: float | None) -> str:
    """A per-class score to 3 decimals; None (a class absent from the evaluated data) as "-"."""
    return "-" if value is None else f"{value:.3f}"


def per_class_rows(metrics: dict) -> list[list[str]]:
    return [[c, _score(m["precision"]), _score(m["recall"]), _score(m["f1"]), str(m["support"])] for c, m in metrics["per_class"].items()]


def _strategy_section(r: StrategyResult, classes: list[str]) -> dict:
    return {
        "label": r.label,
        "per_class": per_class_rows(r.metrics),
        "absent": r.metrics.get("absent_classes", []),
        "confusion_png": plot_confusion(r.metrics["confusion"], classes, f"{r.label}: confusion (test)"),
    }


def comparison_html(c: Comparison) -> str:
    """The self-contained report.html of a comparison: tables, verdict, plots inlined as PNG data URIs."""
    from transferkit.report.doctor import report_section

    classes = list(c.results[0].metrics["per_class"])
    baseline = {"rows": table_rows([c.baseline]), "sentence": pretraining_sentence(c)} if c.baseline else None
    curve = {"crossover": c.crossover() or "", "png": plot_learning_curves(c.curve)} if c.curve else None
    return render(
        "comparison.html.j2",
        title=f"transferkit compare: {c.data}",
        data=c.data,
        model=c.model,
        verdict=c.verdict(),
        split_sizes=c.split_sizes,
        seed=c.seed,
        machine=json.dumps(c.machine),
        columns=COLUMNS,
        rows=table_rows(c.results),
        time_note=table_note(c.seeds),
        baseline=baseline,
        accuracy_png=plot_accuracy_vs_time(c.results),
        curve=curve,
        best=c.winner().label,
        n_test=c.split_sizes.get("test", ""),
        paired_columns=PAIRED_COLUMNS,
        paired_rows=paired_table(c),
        cv=_cv_context(c.cv),
        reliability_png=plot_reliability(c.results),
        val_png=plot_validation_curves(c.results),
        ranking=ranking_context(c.ranking),
        strategies=[_strategy_section(r, classes) for r in c.results],
        configs=json.dumps(c.configs, indent=1),
        versions=json.dumps(c.versions, indent=1),
        extra=report_section(c.extras),
    )


PAIRED_COLUMNS = ("strategy", "minus the best (points)", "95% CI", "McNemar p", "only best right", "only it right", "reading")


def paired_table(c: Comparison) -> list[list[str]]:
    """Each strategy against the best, as strings (PAIRED_COLUMNS)."""
    return [
        [
            p["strategy"],
            f"{-p['difference'] * 100:+.1f}",
            f"{-p['high'] * 100:.1f} to {-p['low'] * 100:.1f}",
            f"{p['mcnemar_p']:.3g}",
            str(p["only_a_correct"]),
            str(p["only_b_correct"]),
            "measurably less accurate" if p["significant"] else "within noise",
        ]
        for p in c.paired()
    ]


def _cv_context(cv: dict | None) -> dict | None:
    if not cv:
        return None
    return {
        "k": cv["k"],
        "n": cv["n"],
        "text": f"{format_interval(cv['accuracy'], cv['low'], cv['high'])}, per fold {cv['fold_mean']:.1%} ± {cv['fold_sd']:.1%}",
    }


def pretraining_sentence(c: Comparison) -> str:
    """What pretraining is worth: the best strategy against the same architecture from random initialisation."""
    assert c.baseline is not None, "only with compare --baseline scratch"
    best = c.winner()
    gap = (best.test_accuracy - c.baseline.test_accuracy) * 100
    if gap < 1:
        return (
            f"Pretraining adds little here: random initialisation reaches {c.baseline.test_accuracy:.1%} vs "
            f"{best.test_accuracy:.1%} ({gap:.1f} points). On data this far from ImageNet (or this easy), "
            "the architecture matters more than the weights."
        )
    return (
        f"Pretraining is worth {gap:.1f} points: {best.label} reaches {best.test_accuracy:.1%}, the same "
        f"architecture from random initialisation {c.baseline.test_accuracy:.1%} with the same budget."
    )


def comparison_markdown(c: Comparison) -> str:
    lines = [f"# transferkit compare: {c.data} with {c.model}", "", c.verdict(), ""]
    lines += ranking_markdown(c.ranking) if c.ranking else []
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(c.results)]
    lines += [
        "",
        table_note(c.seeds),
        "",
        f"## Paired differences against {c.winner().label}",
        "",
        "| " + " | ".join(PAIRED_COLUMNS) + " |",
        "|" + "---|" * len(PAIRED_COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in paired_table(c)]
    cv = _cv_context(c.cv)
    if cv:
        lines += ["", f"Cross-validated probe ({cv['k']}-fold on train+val, {cv['n']} examples): {cv['text']}."]
    if c.baseline:
        lines += ["", "## Value of pretraining", "", pretraining_sentence(c)]
    if c.curve:
        lines += ["", "## Learning curve", "", c.crossover() or "", "", "| strategy | examples/class | test acc |", "|---|---|---|"]
        lines += [f"| {r.strategy} | {r.train_per_class:.0f} | {r.test_accuracy:.4f} |" for r in c.curve]
    lines += ["", f"Machine: {c.machine}", ""]
    return "\n".join(lines)


def write_comparison(c: Comparison, out: Path) -> dict[str, Path]:
    """Write compare.json, report.md and report.html into `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "compare.json", "markdown": out / "report.md", "html": out / "report.html"}
    write_json(paths["json"], c.to_dict())
    write_atomic(paths["markdown"], comparison_markdown(c))
    write_atomic(paths["html"], comparison_html(c))
    if c.extras and c.extras.get("doctor"):
        from transferkit.report.doctor import write_extras

        write_extras(c.extras, out)
        paths["doctor"] = out / "doctor.html"
    return paths


def _secs(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds < 1 else f"{seconds:.1f} s"


def scores_sentence(m: dict, noun: str = "examples") -> str:
    """Accuracy, balanced accuracy and macro-F1 of a metrics dict, each with its 95% interval, in one line."""
    iv = m.get("intervals")
    if not iv:
        return f"accuracy {m['accuracy']:.1%}, macro-F1 {m['macro_f1']:.1%} on {m['n']} {noun}"
    parts = [
        f"{name} {format_interval(e['value'], e['low'], e['high'])}"
        for name, e in (("accuracy", iv["accuracy"]), ("balanced accuracy", iv["balanced_accuracy"]), ("macro-F1", iv["macro_f1"]))
    ]
    return ", ".join(parts) + f" on {m['n']} {noun} (accuracy: Wilson interval; the others: bootstrap over {noun})"


IMBALANCE_RATIO = 3.0  # largest class over smallest beyond which the output suggests --class-weights auto


def imbalance_hint(train_counts: list[int]) -> str | None:
    """A suggestion when the training classes are imbalanced (largest > 3x the smallest), else None."""
    counts = [c for c in train_counts if c > 0]
    if len(counts) < 2 or max(counts) <= IMBALANCE_RATIO * min(counts):
        return None
    return (
        f"The training classes are imbalanced (largest {max(counts)}, smallest {min(counts)}: "
        f"{max(counts) / min(counts):.1f}x); read balanced accuracy and per-class recall beside accuracy, and "
        "try --class-weights auto."
    )
