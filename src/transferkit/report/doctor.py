"""What `transferkit doctor` writes: doctor.html (each finding with its thumbnails, pairs side by side) and issues.csv.

Both are written atomically (atomic.py). The page is self-contained: thumbnails
are inline PNG data URIs (texts are shown as text), so it opens offline. The
CSV holds every finding, one row each (`diagnose.CSV_COLUMNS`); the page shows
the first `SHOWN_PER_KIND` of each kind and says how many more the CSV has.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

from transferkit.atomic import write_atomic, write_json
from transferkit.doctor.findings import CSV_COLUMNS, KINDS, Diagnosis, Finding
from transferkit.report.environment import render
from transferkit.report.gallery import example_view

if TYPE_CHECKING:
    from transferkit.training.fit import ReportInputs

SHOWN_PER_KIND = 60  # findings of one kind shown with thumbnails; issues.csv has all of them
# A fit's report runs the doctor's checks only up to this many examples (all splits): the outlier search is
# O(n^2 d / classes) on 1280-d features and the near-copy search O(n^2) on 256-pixel thumbnails (~1e11
# multiply-adds at 20,000 examples, seconds on a CPU) after one decode of every example; beyond, it points
# to `transferkit doctor`, whose time the user chooses to spend.
MAX_REPORT_EXAMPLES = 20_000


def method_sentence(d: Diagnosis) -> str:
    """How the findings were made, with their thresholds, in one paragraph."""
    label = (
        "Label errors: confident learning (Northcutt et al., JAIR 2021) on out-of-sample probabilities of every "
        f"train and val example, each from {d.folds}-fold probes that never saw it (logistic regression and "
        f"cosine k-NN, averaged; accuracy {d.probe_accuracy:.1%}); estimated share of wrong labels "
        f"{d.estimated_label_errors:.1%}."
        if d.folds
        else "Label errors: not checked."
    )
    return (
        f"{label} Near-duplicates: {d.measure} at or above {d.threshold:g}, searched over every pair "
        f"(across splits: leakage; within a split: conflict under different labels, duplicate under the same); "
        f"each pair also shows the cosine similarity of its centred {d.model} features, which does not decide. "
        "Outliers: mean cosine distance to their 5 nearest same-class neighbours, modified z-score of its log "
        "above 3.5."
    )


def _caption(f: Finding) -> str:
    if f.kind == "label":
        return f"given {f.given_label}, suggested {f.suggested_label}; score {f.score:.3f} (1 - p(given))"
    if f.other_id is not None:
        return f"similarity {f.score:.3f}, feature cosine {f.cosine:.3f}" if f.cosine is not None else f"similarity {f.score:.3f}"
    if f.kind == "outlier":
        return f"mean distance to its nearest same-class neighbours {f.score:.3f}"
    return "byte-identical to a file in an earlier split"


def _finding_context(d: Diagnosis, f: Finding) -> dict:
    examples = getattr(d.splits, f.split)
    item = {
        "view": example_view(examples, f.index),
        "id": f.id,
        "split": f.split,
        "given": f.given_label,
        "caption": _caption(f),
        "other": None,
    }
    if f.other_split is not None and f.other_index is not None:
        other = getattr(d.splits, f.other_split)
        item["other"] = {"view": example_view(other, f.other_index), "id": f.other_id, "split": f.other_split, "given": f.other_label}
    return item


def doctor_html(d: Diagnosis) -> str:
    """The self-contained doctor.html of a diagnosis."""
    if d.splits is None:
        raise ValueError("doctor_html needs the Diagnosis's splits (the examples to show); diagnose() keeps them.")
    counts = d.counts()
    sections = []
    for kind, text in KINDS.items():
        found = d.of_kind(kind)
        if found:
            shown = found[:SHOWN_PER_KIND]
            sections.append(
                {
                    "kind": kind,
                    "text": text[0].upper() + text[1:] + ".",
                    "count": len(found),
                    "shown": len(shown),
                    "more": len(found) > len(shown),
                    "entries": [_finding_context(d, f) for f in shown],
                }
            )
    return render("doctor.html.j2", d=d, kinds=KINDS, counts=counts, sections=sections, method=method_sentence(d))


def issues_csv(d: Diagnosis) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(d.to_rows())
    return buf.getvalue()


def write_doctor_report(d: Diagnosis, out: Path) -> dict[str, Path]:
    """Write doctor.html, issues.csv and doctor.json into `out`; returns their paths."""
    out = Path(out)
    paths = {"html": out / "doctor.html", "csv": out / "issues.csv", "json": out / "doctor.json"}
    write_atomic(paths["csv"], issues_csv(d))
    write_json(paths["json"], d.to_dict())
    write_atomic(paths["html"], doctor_html(d))
    return paths


# --- the fit and compare reports' part -------------------------------------------------------


def fit_extras(inputs: ReportInputs) -> dict:
    """What a fit adds to its report, made while its examples are at hand: the mistakes gallery and the doctor.

    `inputs.features`: the pretrained features of every split when the fit cached them (None otherwise); the
    doctor then runs its checks without probes (folds=0: near-duplicates, leakage, outliers): seconds
    for thousands of examples, most of it decoding each image once more for its thumbnail. Its files are rendered now, as text, so that the
    estimator does not keep the examples (the thumbnails' source) alive after the fit.
    """
    import json

    from transferkit.doctor.findings import diagnose_features
    from transferkit.report.gallery import mistakes_html

    splits, features, data_name, model_name = inputs.splits, inputs.features, inputs.data_name, inputs.model_name
    doctor = None
    if features is not None and sum(splits.sizes().values()) <= MAX_REPORT_EXAMPLES:
        d = diagnose_features(splits, features, data_name=data_name, model_name=model_name, folds=0)
        doctor = {
            "summary": d.summary_line(),
            "threshold": d.threshold,
            "files": {
                "doctor.html": doctor_html(d),
                "issues.csv": issues_csv(d),
                "doctor.json": json.dumps(d.to_dict(), indent=2, default=str) + "\n",
            },
        }
    return {
        "gallery": mistakes_html(splits.test, inputs.test_probs, list(splits.classes)),
        "doctor": doctor,
        "data": data_name,
        "model": model_name,
        "noun": f"{splits.train.noun}s",
    }


def report_section(extras: dict | None) -> str:
    """The HTML the fit and compare reports include: the doctor's summary with its link, and the mistakes gallery."""
    if not extras:
        return ""
    d = extras.get("doctor")
    command = f"transferkit doctor {extras['data']} --model {extras['model']}"
    return render(
        "doctor_section.html.j2",
        summary=d["summary"] if d else None,
        noun=extras.get("noun", "examples"),
        threshold=d["threshold"] if d else "",
        command=command,
        gallery=extras.get("gallery", ""),
        best=extras.get("best"),
        limit=f"{MAX_REPORT_EXAMPLES:,}",
    )


def write_extras(extras: dict | None, out: Path) -> None:
    """doctor.html, issues.csv and doctor.json of a fit's or comparison's doctor into `out`, when it ran."""
    for name, text in ((extras or {}).get("doctor") or {}).get("files", {}).items():
        write_atomic(Path(out) / name, text)
