"""A fit's own report: report.html with its confusion matrix, training curves, per-class scores and, when the fit
had them at hand, the mistakes gallery and the data doctor's summary (confusion.png and curves.png beside it)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from transferkit.atomic import write_atomic
from transferkit.report.comparison import per_class_rows, scores_sentence
from transferkit.report.doctor import report_section, write_extras
from transferkit.report.environment import render
from transferkit.report.plots import plot_confusion, plot_history
from transferkit.runs.meta import RunMeta
from transferkit.stats.metrics import top_k_clause


def write_fit_report(out: Path, meta: RunMeta, extras: dict | None = None) -> Path:
    """A single run's report.html, confusion.png and curves.png; with `extras` (report.doctor.fit_extras) the
    mistakes gallery and the data doctor's summary, and doctor.html / issues.csv beside it."""
    test = meta.test_metrics
    confusion_png = plot_confusion(test["confusion"], meta.classes, "confusion (test)")
    curves_png = plot_history(meta.history, f"{meta.strategy.spec}: training")
    write_atomic(out / "confusion.png", base64.b64decode(confusion_png))
    write_atomic(out / "curves.png", base64.b64decode(curves_png))
    page = render(
        "fit.html.j2",
        title="transferkit fit",
        spec=meta.strategy.spec,
        backbone=meta.backbone_name,
        test=test,
        scores=scores_sentence(test, "texts" if meta.modality == "text" else "images") + top_k_clause(test, len(meta.classes)),
        calibration=meta.calibration,
        curves_png=curves_png,
        confusion_png=confusion_png,
        per_class_rows=per_class_rows(test),
        absent=test.get("absent_classes", []),
        strategy=json.dumps(meta.strategy.to_dict(), indent=1),
        training=json.dumps(meta.training, indent=1),
        extra=report_section(extras),
    )
    write_extras(extras, out)
    write_atomic(out / "report.html", page)
    return out / "report.html"
