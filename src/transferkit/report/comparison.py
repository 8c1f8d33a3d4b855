"""The comparison table and the reports: compare.json, report.md and a self-contained report.html.

The HTML inlines its CSS and its plots (PNG as base64 data URIs), so it opens
offline, from anywhere, with no network request. The pages are jinja2 templates
with autoescaping on, so names from the data never become markup; the plots are
drawn with matplotlib's object API and take names verbatim (`parse_math=False`:
a class called "$5 notes" is not read as TeX).
"""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path

import numpy as np

from transferkit.atomic import write_atomic, write_json
from transferkit.compare.results import Comparison, StrategyResult
from transferkit.report.plots import new_figure, png_base64
from transferkit.report.ranking import ranking_context, ranking_markdown
from transferkit.stats.wording import format_interval

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}.verdict{font-size:1.15em;background:#eef6ee;
padding:.6em 1em;border-left:4px solid #3a3}img{max-width:100%;border:1px solid #eee}.grid{display:flex;
flex-wrap:wrap;gap:1em}.grid figure{margin:0;width:48%}pre{background:#f7f7f7;padding:1em;overflow-x:auto}"""

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


def plot_accuracy_vs_time(results: list[StrategyResult]) -> str:
    fig, ax = new_figure()
    for r in results:
        span = _accuracy_span(r)
        err = [[max(0.0, r.test_accuracy - span[0]) * 100], [max(0.0, span[1] - r.test_accuracy) * 100]] if span else None
        ax.errorbar(r.seconds, r.test_accuracy * 100, yerr=err, fmt="o", capsize=4, markersize=7)
        ax.annotate(r.label, (r.seconds, r.test_accuracy * 100), textcoords="offset points", xytext=(5, 5), parse_math=False)
    ax.set_xscale("log")
    ax.set_xlabel("training time (s, log scale)")
    ax.set_ylabel("test accuracy (%); bars: 95% interval, or min-max over seeds")
    ax.set_title("Accuracy vs training time")
    ax.grid(alpha=0.3)
    return png_base64(fig)


def plot_learning_curves(curve: list[StrategyResult]) -> str:
    fig, ax = new_figure()
    for spec in dict.fromkeys(r.strategy for r in curve):
        pts = sorted((r.train_per_class, r.test_accuracy * 100) for r in curve if r.strategy == spec)
        ax.plot(*zip(*pts), marker="o", label=spec)
    ax.set_xscale("log")
    ax.set_xlabel("training examples per class (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Learning curves")
    ax.legend()
    ax.grid(alpha=0.3)
    return png_base64(fig)


def _accuracy_span(r: StrategyResult) -> tuple[float, float] | None:
    """What an error bar spans: min-max over the seeds, else the Wilson 95% interval of the one run."""
    spread = r.spread("test_accuracy")
    if spread:
        return spread["min"], spread["max"]
    iv = (r.metrics.get("intervals") or {}).get("accuracy")
    return (iv["low"], iv["high"]) if iv else None


def plot_reliability(results: list[StrategyResult]) -> str:
    """Reliability diagram: accuracy against mean confidence per confidence bin (15 bins), one line per strategy."""
    from transferkit.stats.calibration import confidence_bins

    fig, ax = new_figure(5, 5)
    ax.plot([0, 100], [0, 100], color="#999", linestyle="--", label="perfectly calibrated")
    for r in results:
        p = r.metrics.get("predictions") or {}
        if not p.get("prob"):
            continue
        bins = [b for b in confidence_bins(p["prob"], np.asarray(p["true"]) == np.asarray(p["pred"])) if b["count"]]
        ax.plot(
            [b["mean_confidence"] * 100 for b in bins],
            [b["accuracy"] * 100 for b in bins],
            marker="o",
            label=f"{r.label} (ECE {r.metrics.get('ece', 0):.3f})",
        )
    ax.set_xlabel("confidence of the predicted class (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Reliability (test, after temperature scaling)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return png_base64(fig)


def plot_validation_curves(results: list[StrategyResult]) -> str | None:
    """Validation accuracy per fine-tuning epoch of each strategy that has epochs (first seed)."""
    rows = {r.label: [h for h in r.history if "C" not in h] for r in results}
    rows = {k: v for k, v in rows.items() if v}
    if not rows:
        return None
    fig, ax = new_figure()
    for label, hist in rows.items():
        ax.plot(range(1, len(hist) + 1), [h["val_acc"] * 100 for h in hist], marker="o", label=label)
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Validation accuracy per epoch")
    ax.legend()
    ax.grid(alpha=0.3)
    return png_base64(fig)


def plot_confusion(matrix: list[list[int]], classes: list[str], title: str) -> str:
    m = np.asarray(matrix)
    size = min(8, 2 + 0.4 * len(classes))
    fig, ax = new_figure(size, size)
    ax.imshow(m, cmap="Blues")
    if len(classes) <= 20:
        ax.set_xticks(range(len(classes)), classes, rotation=90, parse_math=False)
        ax.set_yticks(range(len(classes)), classes, parse_math=False)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, parse_math=False)
    return png_base64(fig)


def plot_history(history: list[dict], title: str) -> str:
    fig, ax = new_figure()
    rows = [r for r in history if "C" not in r]
    if rows:
        ax.plot(range(1, len(rows) + 1), [r["val_acc"] * 100 for r in rows], marker="o", label="validation")
        ax.plot(range(1, len(rows) + 1), [r["train_acc"] * 100 for r in rows], marker=".", label="train")
        ax.set_xlabel("epoch (all image phases)")
    else:
        probe = [r for r in history if "C" in r]
        ax.plot([r["C"] for r in probe], [r["val_acc"] * 100 for r in probe], marker="o", label="validation")
        ax.set_xscale("log")
        ax.set_xlabel("probe regularisation C (log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, parse_math=False)
    ax.legend()
    ax.grid(alpha=0.3)
    return png_base64(fig)


_PER_CLASS_COLUMNS = ("class", "precision", "recall", "f1", "support")

# The pages as jinja2 templates with autoescaping on: every name and number from the data (class names, folder
# names, labels, configs) is escaped on output, and only the CSS constant of this module is marked |safe.
# Each image counts itself into <body data-loaded / data-failed> once decoded: a browser (or the CI test in
# headless Chromium) can see the page rendered every plot.
_TEMPLATES = {
    "page.html": """<!doctype html>
<html><head><meta charset='utf-8'><title>{{ title }}</title><style>{{ css|safe }}</style></head>
<body>
{% block body %}{% endblock %}
</body></html>
""",
    "macros.html": """
{%- macro table(header, rows) -%}
<table><thead><tr>{% for h in header %}<th>{{ h }}</th>{% endfor %}</tr></thead><tbody>
{% for row in rows %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
{%- endmacro %}
{%- macro figure(b64, alt) -%}
<figure><img alt="{{ alt }}" onload="var d=document.body.dataset;d.loaded=(+d.loaded||0)+1" \
onerror="var d=document.body.dataset;d.failed=(+d.failed||0)+1" src="data:image/png;base64,{{ b64 }}">\
<figcaption>{{ alt }}</figcaption></figure>
{%- endmacro %}
{%- macro per_class(rows, absent) -%}
{{ table(per_class_columns, rows) }}
{% if absent %}
<p>Not in the evaluated data, so without precision or recall (-) and left out of macro-F1: {{ absent|join(", ") }}.</p>
{% endif %}
{%- endmacro %}
""",
    "comparison.html": """{% extends "page.html" %}
{% block body %}
{% from "macros.html" import table, figure, per_class %}
<h1>transferkit compare: {{ data }} with {{ model }}</h1>
<p class='verdict'>{{ verdict }}</p>
<p>Split: {{ split_sizes }}; seed {{ seed }}; machine: {{ machine }}</p>
{% if ranking %}
<h2>Backbones</h2>
<p class='verdict'>{{ ranking.reason }}</p>
{{ table(ranking.columns, ranking.rows) }}
<p>{{ ranking.agreement }}</p>
<p>{{ ranking.note }}</p>
{{ figure(ranking.png, "backbones: accuracy vs latency, Pareto front") }}
{% endif %}
<h2>Side by side</h2>
{{ table(columns, rows) }}
<p>{{ time_note }}</p>
{% if baseline %}
<h2>Value of pretraining</h2>
{{ table(columns, baseline.rows) }}
<p>{{ baseline.sentence }}</p>
{% endif %}
<h2>Paired differences against {{ best }}</h2>
<p>Each strategy's test accuracy minus the best's on the same {{ n_test }} test examples: paired bootstrap 95% interval
and exact McNemar p-value. An interval that includes 0 means no measurable difference. Accuracy intervals elsewhere
are Wilson 95%; balanced accuracy and macro-F1 intervals are bootstrap over examples.</p>
{{ table(paired_columns, paired_rows) }}
{% if cv %}
<p>Cross-validated probe ({{ cv.k }}-fold on train+val, {{ cv.n }} examples): {{ cv.text }}.</p>
{% endif %}
<h2>Accuracy vs training time</h2>
{{ figure(accuracy_png, "accuracy vs time") }}
<h2>Calibration</h2>
{{ figure(reliability_png, "reliability diagram") }}
{% if val_png %}
<h2>Validation curves</h2>
{{ figure(val_png, "validation accuracy per epoch") }}
{% endif %}
{% if curve %}
<h2>Learning curves</h2>
<p>{{ curve.crossover }}</p>
{{ figure(curve.png, "learning curves") }}
{% endif %}
<h2>Per strategy</h2>
<div class='grid'>
{% for s in strategies %}
{{ figure(s.confusion_png, s.label ~ " confusion matrix") }}
{% endfor %}
</div>
{% for s in strategies %}
<h3>{{ s.label }}: per-class precision / recall</h3>
{{ per_class(s.per_class, s.absent) }}
{% endfor %}
{{ extra|safe }}
<h2>Resolved configurations</h2>
<pre>{{ configs }}</pre>
<h2>Versions</h2>
<pre>{{ versions }}</pre>
{% endblock %}
""",
    "fit.html": """{% extends "page.html" %}
{% block body %}
{% from "macros.html" import figure, per_class %}
<h1>transferkit fit: {{ spec }} on {{ backbone }}</h1>
<p class='verdict'>Test {{ scores }}; top-5 {{ "%.4f"|format(test["top5_accuracy"]) }}.</p>
{% if calibration %}
<p>Calibrated by temperature scaling on validation: T = {{ "%.3f"|format(calibration["temperature"]) }}, folded into
the head; test ECE {{ "%.3f"|format(calibration.get("test_ece_before", 0)) }} before,
{{ "%.3f"|format(calibration.get("test_ece_after", 0)) }} after.</p>
{% endif %}
<div class='grid'>
{{ figure(curves_png, "training curves") }}
{{ figure(confusion_png, "confusion matrix") }}
</div>
<h2>Per class</h2>
{{ per_class(per_class_rows, absent) }}
{{ extra|safe }}
<h2>Strategy and phases</h2>
<pre>{{ strategy }}</pre>
<h2>Training configuration</h2>
<pre>{{ training }}</pre>
{% endblock %}
""",
}


@functools.cache
def _templates():
    """The template environment, built on first use (jinja2 is imported only by the commands that write reports)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.DictLoader(_TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.globals.update(css=CSS, per_class_columns=_PER_CLASS_COLUMNS)
    return env


def _render(template: str, **context) -> str:
    return _templates().get_template(template).render(**context)


def _score(value: float | None) -> str:
    """A per-class score to 3 decimals; None (a class absent from the evaluated data) as "-"."""
    return "-" if value is None else f"{value:.3f}"


def _per_class_rows(metrics: dict) -> list[list[str]]:
    return [[c, _score(m["precision"]), _score(m["recall"]), _score(m["f1"]), str(m["support"])] for c, m in metrics["per_class"].items()]


def _strategy_section(r: StrategyResult, classes: list[str]) -> dict:
    return {
        "label": r.label,
        "per_class": _per_class_rows(r.metrics),
        "absent": r.metrics.get("absent_classes", []),
        "confusion_png": plot_confusion(r.metrics["confusion"], classes, f"{r.label}: confusion (test)"),
    }


def comparison_html(c: Comparison) -> str:
    """The self-contained report.html of a comparison: tables, verdict, plots inlined as PNG data URIs."""
    from transferkit.report.doctor import report_section

    classes = list(c.results[0].metrics["per_class"])
    baseline = {"rows": table_rows([c.baseline]), "sentence": pretraining_sentence(c)} if c.baseline else None
    curve = {"crossover": c.crossover() or "", "png": plot_learning_curves(c.curve)} if c.curve else None
    return _render(
        "comparison.html",
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
    if c.cv:
        cv = _cv_context(c.cv)
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


def write_fit_report(out: Path, meta: dict, history: list[dict], extras: dict | None = None) -> Path:
    """A single run's report.html, confusion.png and curves.png; with `extras` (doctor_report.fit_extras) the
    mistakes gallery and the data doctor's summary, and doctor.html / issues.csv beside it."""
    from transferkit.report.doctor import report_section, write_extras

    test = meta["metrics"]["test"]
    confusion_png = plot_confusion(test["confusion"], meta["classes"], "confusion (test)")
    curves_png = plot_history(history, f"{meta['strategy']['spec']}: training")
    write_atomic(out / "confusion.png", base64.b64decode(confusion_png))
    write_atomic(out / "curves.png", base64.b64decode(curves_png))
    page = _render(
        "fit.html",
        title="transferkit fit",
        spec=meta["strategy"]["spec"],
        backbone=meta["backbone"]["name"],
        test=test,
        scores=scores_sentence(test, "texts" if meta.get("modality") == "text" else "images"),
        calibration=meta["metrics"].get("calibration"),
        curves_png=curves_png,
        confusion_png=confusion_png,
        per_class_rows=_per_class_rows(test),
        absent=test.get("absent_classes", []),
        strategy=json.dumps(meta["strategy"], indent=1),
        training=json.dumps(meta.get("training", {}), indent=1),
        extra=report_section(extras),
    )
    write_extras(extras, out)
    write_atomic(out / "report.html", page)
    return out / "report.html"


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
