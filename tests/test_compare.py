"""compare, reports and auto: on a tiny generated folder, in real headless Chromium, and on the digits demo."""

import json
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import CHROMIUM_FLAGS, chromium_path, invoke_cli, write_folder
from transferkit import ImageClassifier
from transferkit.compare.run import compare
from transferkit.data import DataSplits, load_data, subsample_per_class
from transferkit.training.strategies import AUTO_CANDIDATE, Strategy, decide_after_trial, decide_before_trial


@pytest.fixture(scope="module")
def tiny_compare(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    data = write_folder(root / "colours", per_class=10)
    proc = invoke_cli(
        "compare",
        str(data),
        "--strategies",
        "feature-extraction,finetune:last=1",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--out",
        str(root / "out"),
        "-q",
    )
    return root / "out", proc


def test_compare_prints_the_table_and_json_holds_every_number(tiny_compare):
    out, proc = tiny_compare
    data = json.loads((out / "compare.json").read_text())
    assert [r["strategy"] for r in data["results"]] == ["feature-extraction", "finetune:last=1"]
    assert data["winner"] in ("feature-extraction", "finetune:last=1") and data["verdict"] in proc.stdout
    for r in data["results"]:
        shown = [
            f"{r['trainable_params']:,}",
            f"{r['trainable_share']:.1%}",
            f"{r['seconds']:.1f} s",
            f"{r['peak_memory_mib']:.0f} MiB",
            f"{r['val_accuracy']:.4f}",
            f"{r['test_accuracy']:.4f}",
            f"{r['macro_f1']:.4f}",
        ]
        for text in shown:
            assert text in proc.stdout, text
    fe, ft = data["results"]
    assert fe["trainable_params"] == 3 * 1280 + 3  # the head only
    assert ft["trainable_params"] > fe["trainable_params"] and 0 < ft["trainable_share"] < 1
    assert data["machine"]["cores"] >= 1 and "torch" in data["machine"]
    assert (out / "report.md").read_text().count("|") > 20


def test_report_html_is_self_contained(tiny_compare):
    out, _ = tiny_compare
    page = (out / "report.html").read_text()
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page)  # no network resource at all
    assert page.count("data:image/png;base64,") >= 3  # accuracy-vs-time + one confusion matrix per strategy


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tiny_compare, tmp_path):
    out, _ = tiny_compare
    browser = chromium_path()
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--enable-logging=stderr", "--v=0"]
    url = (out / "report.html").as_uri()
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    n_images = (out / "report.html").read_text().count("<img ")
    assert f'data-loaded="{n_images}"' in dom.stdout, dom.stderr[-2000:]
    assert "data-failed" not in dom.stdout
    assert "Failed to load resource" not in dom.stderr
    assert "<table>" in dom.stdout and "feature-extraction" in dom.stdout
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, "--window-size=1200,1600", f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # not a blank page
    assert (pixels < 100).mean() > 0.005  # dark text, lines and plot marks are drawn


def test_fit_writes_its_own_report(image_folder, tmp_path):
    invoke_cli("fit", str(image_folder), "--strategy", "feature-extraction", "--image-size", "32", "--out", str(tmp_path / "r"), "-q")
    for name in ("report.html", "confusion.png", "curves.png"):
        assert (tmp_path / "r" / name).stat().st_size > 1000
    assert Image.open(tmp_path / "r" / "confusion.png").size[0] > 100


def test_auto_rules_in_words_and_numbers():
    few = decide_before_trial(per_class=3, probe_val=0.7)
    assert few.strategy == Strategy("feature-extraction") and "only 3 training examples" in few.reason
    solved = decide_before_trial(per_class=50, probe_val=0.998)
    assert solved.strategy == Strategy("feature-extraction") and "99.8%" in solved.reason
    assert decide_before_trial(per_class=50, probe_val=0.9) is None


def test_auto_keeps_fine_tuning_only_for_a_gain_beyond_noise():
    """The issue's case: one image of a 111-image validation set is noise; 30 of 300 is a gain."""
    probe = np.array([True] * 80 + [False] * 31)
    one_more = probe.copy()
    one_more[80] = True
    kept = decide_after_trial(50, probe, one_more, 1.0, 20.0)
    assert kept.strategy == Strategy("feature-extraction")
    assert "+0.9 points" in kept.reason and "includes 0" in kept.reason and "1/20 of the cost" in kept.reason
    m = kept.measurements
    assert m["n_val"] == 111 and m["val_gain_low"] <= 0 <= m["val_gain_high"] and m["mcnemar_p"] == 1.0
    probe = np.array([True] * 240 + [False] * 60)
    better = np.array([True] * 270 + [False] * 30)
    tuned = decide_after_trial(50, probe, better, 1.0, 20.0)
    assert tuned.strategy == AUTO_CANDIDATE and "+10.0 points" in tuned.reason and "more than noise" in tuned.reason
    assert tuned.measurements["val_gain_low"] > 0 and tuned.measurements["mcnemar_p"] < 1e-6


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", seed=0)


def _within(auto: ImageClassifier, results) -> tuple[float, float]:
    best = max(r.test_accuracy for r in results)
    return auto.metrics_["test"]["accuracy"], best


@pytest.mark.slow
def test_fine_tuning_beats_feature_extraction_on_digits_and_auto_matches_the_best(digits, tmp_path):
    c = compare(
        digits,
        data_name="digits",
        model="builtin:efficientnet_lite0",
        strategies=["feature-extraction", "lp-ft"],
        settings={"progress": False},
    )
    fe, lpft = c.results
    print(f"digits 64px: feature-extraction {fe.test_accuracy:.4f}, lp-ft {lpft.test_accuracy:.4f}")
    assert fe.test_accuracy >= 0.94
    assert lpft.test_accuracy >= fe.test_accuracy + 0.01
    (paired,) = c.paired()  # feature-extraction against the best, lp-ft, on the same 268 test images
    assert paired["against"] == "lp-ft" and paired["difference"] == pytest.approx(lpft.test_accuracy - fe.test_accuracy)
    if paired["significant"]:
        assert c.verdict().startswith("lp-ft is the most accurate") and "measurably ahead" in c.verdict()
    else:
        assert c.verdict().startswith("No measurable difference on 268 test examples")
    print(c.verdict())
    auto = ImageClassifier(progress=False).fit(digits)
    acc, best = _within(auto, c.results)
    print(f"auto chose {auto.decision_.strategy.spec}: {acc:.4f} (best measured {best:.4f})")
    m = auto.decision_.measurements  # the choice follows auto's own paired test on validation
    assert (auto.decision_.strategy.spec == "lp-ft") == (m.get("val_gain_low", 0) > 0)
    assert acc >= (best - 0.01 if auto.decision_.strategy.spec == "lp-ft" else fe.test_accuracy - 0.01)
    auto.save(tmp_path / "auto")
    meta = json.loads((tmp_path / "auto" / "transferkit.json").read_text())
    assert meta["strategy"]["requested"] == "auto" and meta["strategy"]["auto"]["reason"]
    assert meta["strategy"]["auto"]["measurements"]["probe_val_acc"] > 0.9


@pytest.mark.slow
def test_small_data_fine_tuning_does_not_collapse_and_auto_matches_the_best(digits):
    small = DataSplits(subsample_per_class(digits.train, 10, 0), digits.val, digits.test, digits.summary)
    assert len(small.train) == 100
    c = compare(
        small,
        data_name="digits@10",
        model="builtin:efficientnet_lite0",
        strategies=["feature-extraction", "lp-ft", "finetune:all"],
        settings={"progress": False},
    )
    fe, lpft, ft = c.results
    print(
        f"digits 10/class: feature-extraction {fe.test_accuracy:.4f}, lp-ft {lpft.test_accuracy:.4f}, finetune:all {ft.test_accuracy:.4f}"
    )
    assert lpft.test_accuracy >= fe.test_accuracy - 0.02
    assert ft.test_accuracy >= fe.test_accuracy - 0.02
    auto = ImageClassifier(progress=False).fit(small)
    acc, best = _within(auto, c.results)
    print(f"auto chose {auto.decision_.strategy.spec}: {acc:.4f} (best measured {best:.4f})")
    # auto keeps lp-ft only when its validation gain over the probe is beyond noise (paired bootstrap on the
    # 270 validation images): its choice must follow its own recorded evidence, and never be worse than the
    # probe by more than 2 points (5 of 268 test images).
    m = auto.decision_.measurements
    print(f"auto's evidence: gain {m.get('val_gain')} ({m.get('val_gain_low')} to {m.get('val_gain_high')})")
    if auto.decision_.strategy.spec == "lp-ft":
        assert m["val_gain_low"] > 0
    else:
        assert "trial_strategy" not in m or m["val_gain_low"] <= 0
    assert acc >= fe.test_accuracy - 0.02


def test_learning_curve_crossover_and_scratch_baseline(tmp_path):
    from transferkit.report.comparison import write_comparison

    splits = load_data(write_folder(tmp_path / "colours", per_class=12), seed=0)
    settings = {"image_size": 32, "epochs": 1, "batch_size": 8, "progress": False, "precision": "fp32"}
    c = compare(
        splits,
        data_name="colours",
        model="builtin:efficientnet_lite0",
        strategies=["feature-extraction", "finetune:last=1"],
        fractions=[0.5, 1.0],
        baseline="scratch",
        settings=settings,
    )
    assert len(c.curve) == 4  # 2 strategies x (0.5, full)
    assert sorted({r.train_per_class for r in c.curve}) == [4.0, 8.0]  # 50% and all of 8 training images per class
    assert "feature extraction" in c.crossover() or "overtakes" in c.crossover()
    assert c.baseline is not None and c.baseline.label.startswith("scratch")
    paths = write_comparison(c, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert len(data["learning_curve"]) == 4 and data["crossover"] == c.crossover()
    assert data["baseline"]["test_accuracy"] == c.baseline.test_accuracy
    page = paths["html"].read_text()
    assert "Learning curves" in page and "Value of pretraining" in page
