"""report: the HTML pages escape every name from the data, inline every image, and keep their sections.

No model is trained: a Comparison of two hand-made StrategyResults and a fake fit meta dict stand in.
"""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferkit.compare.results import Comparison, StrategyResult
from transferkit.report.comparison import (
    COLUMNS,
    comparison_html,
    comparison_markdown,
    scores_sentence,
    table_rows,
    write_comparison,
)
from transferkit.report.fit import write_fit_report
from transferkit.runs.meta import RunMeta
from transferkit.stats.metrics import metrics

SCRIPT = "<script>alert(1)</script>"
QUOTES = "&\"'"
HOSTILE = (SCRIPT, QUOTES)
CLASSES = [f"cat {SCRIPT}", f"dog {QUOTES}", "eel"]  # eel never appears in y_true: an absent class
COMPARISON_SECTIONS = [
    "Side by side",
    "Value of pretraining",
    f"Paired differences against finetune {QUOTES}",
    "Accuracy vs training time",
    "Calibration",
    "Learning curves",
    "Per strategy",
    "Resolved configurations",
    "Versions",
]
FIT_SECTIONS = ["Per class", "Strategy and phases", "Training configuration"]


class Page(HTMLParser):
    """The parts of a page the tests look at: every start tag with its attributes, headings and text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.headings: dict[str, list[str]] = {"h1": [], "h2": [], "h3": []}
        self.text: list[str] = []
        self._open: str | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._open = tag if tag in self.headings else self._open

    def handle_endtag(self, tag):
        self._open = None if tag == self._open else self._open

    def handle_data(self, data):
        self.text.append(data)
        if self._open:
            self.headings[self._open].append(data.strip())

    def all(self, tag: str) -> list[dict]:
        return [attrs for t, attrs in self.tags if t == tag]


def _test_metrics() -> dict:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 24)  # classes 0 and 1 only
    return metrics(rng.normal(size=(24, 3)) + 3 * np.eye(3)[y], y, CLASSES)


def _result(strategy: str, label: str, test_accuracy: float, seconds: float, train_per_class: float = 8.0) -> StrategyResult:
    return StrategyResult(
        strategy=strategy,
        label=label,
        trainable_params=3843 if strategy == "feature-extraction" else 11_000_000,
        total_params=11_000_000,
        epochs=0 if strategy == "feature-extraction" else 2,
        seconds=seconds,
        peak_memory_mib=12.0,
        val_accuracy=test_accuracy,
        test_accuracy=test_accuracy,
        macro_f1=0.5,
        train_per_class=train_per_class,
        metrics=_test_metrics(),
    )


@pytest.fixture(scope="module")
def comparison() -> Comparison:
    results = [
        _result("feature-extraction", f"feature-extraction {SCRIPT}", 0.70, 2.0),
        _result("finetune:last=1", f"finetune {QUOTES}", 0.80, 20.0),
    ]
    curve = [_result(r.strategy, r.label, acc, 1.0, n) for r in results for n, acc in ((4.0, 0.5), (8.0, r.test_accuracy))]
    return Comparison(
        data=f"folder {SCRIPT} {QUOTES}",
        model="resnet18",
        seed=0,
        results=results,
        curve=curve,
        baseline=_result("finetune:last=1", "random init", 0.40, 20.0),
        configs={"note": SCRIPT + QUOTES},
        machine={"cores": 2, "host": QUOTES},
        split_sizes={"train": 24, "val": 6, "test": 24},
        versions={"transferkit": SCRIPT},
    )


@pytest.fixture(scope="module")
def comparison_page(comparison) -> str:
    return comparison_html(comparison)


@pytest.fixture(scope="module")
def fit_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fit")
    history = [{"epoch": i, "train_acc": 0.5 + 0.1 * i, "val_acc": 0.4 + 0.1 * i} for i in range(3)]
    meta = RunMeta.from_dict(
        {
            "metrics": {"test": _test_metrics()},
            "classes": CLASSES,
            "backbone": {"name": f"net {QUOTES}"},
            "data_config": {},
            "strategy": {
                "spec": f"feature-extraction {SCRIPT}",
                "phases": [
                    {
                        "name": "head",
                        "on_features": True,
                        "epochs_run": 1,
                        "best_epoch": 1,
                        "best_val_acc": 0.5,
                        "seconds": 1.0,
                        "lrs": {"head": 1e-3},
                    }
                ],
            },
            "training": {"batch_size": 8, "comment": SCRIPT},
            "history": history,
        }
    )
    assert write_fit_report(out, meta) == out / "report.html"
    return out


@pytest.fixture(scope="module")
def fit_page(fit_dir) -> str:
    return (fit_dir / "report.html").read_text()


@pytest.fixture(params=["comparison", "fit"])
def page(request, comparison_page, fit_page) -> str:
    return comparison_page if request.param == "comparison" else fit_page


def test_hostile_names_are_escaped_never_markup(page):
    parsed = Page(page)
    assert SCRIPT not in page and QUOTES not in page  # neither raw ...
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&amp;&#34;&#39;" in page  # ... but escaped
    assert not parsed.all("script")  # no tag was injected
    text = "".join(parsed.text)
    assert SCRIPT in text and QUOTES in text  # and a reader sees the names as they are


def test_every_image_is_an_inline_png_counted_on_load(page):
    images = Page(page).all("img")
    assert images
    for img in images:
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
        assert img["onload"] == "var d=document.body.dataset;d.loaded=(+d.loaded||0)+1"
        assert img["onerror"] == "var d=document.body.dataset;d.failed=(+d.failed||0)+1"
        assert img["alt"]
    assert page.count("<img ") == len(images)  # the Chromium test counts images this way


def test_the_page_is_self_contained(page):
    parsed = Page(page)
    assert not parsed.all("link") and not parsed.all("script") and not parsed.all("iframe")
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page)
    assert len(parsed.all("style")) == 1 and "border-collapse" in page
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")


def test_comparison_page_has_its_sections_tables_and_verdict(comparison, comparison_page):
    parsed = Page(comparison_page)
    assert parsed.headings["h1"] == [f"transferkit compare: {comparison.data} with resnet18"]
    assert parsed.headings["h2"] == COMPARISON_SECTIONS
    assert parsed.headings["h3"] == [f"{r.label}: per-class precision / recall" for r in comparison.results]
    text = "".join(parsed.text)
    assert comparison.verdict() in text and comparison.crossover() in text
    # side by side + baseline + paired + one per-class table per strategy; images: accuracy-vs-time, reliability,
    # curves, 2 confusions
    assert len(parsed.all("table")) == 5 and len(parsed.all("img")) == 5
    assert parsed.all("p")[0] == {"class": "verdict"}
    for row in table_rows(comparison.results):
        assert all(cell in text for cell in row)
    assert all(column in text for column in COLUMNS)


def test_comparison_page_without_baseline_or_curve_drops_those_sections(comparison):
    plain = Comparison(data="d", model="m", seed=1, results=comparison.results)
    parsed = Page(comparison_html(plain))
    assert parsed.headings["h2"] == [s for s in COMPARISON_SECTIONS if s not in ("Value of pretraining", "Learning curves")]
    assert len(parsed.all("img")) == 4  # accuracy-vs-time, reliability, 2 confusions


def test_absent_classes_show_a_dash_and_are_named(page):
    """eel has no test example: its precision/recall/f1 print as '-' (not 0.000), and the page says why."""
    rows = re.findall(r"<tr><td>eel</td>(.*?)</tr>", page)
    assert rows and all(r == "<td>-</td><td>-</td><td>-</td><td>0</td>" for r in rows)
    assert "left out of macro-F1: eel." in "".join(Page(page).text)


def test_fit_report_writes_its_files_and_sections(fit_dir, fit_page):
    for name in ("report.html", "confusion.png", "curves.png"):
        assert (fit_dir / name).stat().st_size > 1000
    assert Image.open(fit_dir / "confusion.png").format == "PNG"
    parsed = Page(fit_page)
    assert parsed.headings["h1"] == [f"transferkit fit: feature-extraction {SCRIPT} on net {QUOTES}"]
    assert parsed.headings["h2"] == FIT_SECTIONS
    assert len(parsed.all("img")) == 2 and len(parsed.all("table")) == 1
    test = _test_metrics()
    assert f"Test {scores_sentence(test, 'images')}." in "".join(parsed.text) and "top-5" not in "".join(parsed.text)  # 3 classes
    assert "accuracy 100.0% (95% CI 86.2-100.0)" in scores_sentence(test, "images")  # Wilson on 24 of 24


def test_write_comparison_writes_json_markdown_and_html(comparison, tmp_path):
    paths = write_comparison(comparison, tmp_path / "out")
    assert {p.name for p in paths.values()} == {"compare.json", "report.md", "report.html"}
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert comparison_markdown(comparison).startswith(f"# transferkit compare: {comparison.data} with resnet18")
