"""Issue 28's smaller defects, found by trying transferkit as a new user would: each test fails on the code before
its fix."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conftest import write_folder


@pytest.fixture
def transferkit_logs(caplog, monkeypatch):
    """caplog at INFO for transferkit's loggers (an in-process CLI test stops them propagating to caplog's root)."""
    monkeypatch.setattr(logging.getLogger("transferkit"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="transferkit"):
        yield caplog


def _spreadsheet_csv(tmp_path: Path) -> Path:
    """A CSV as spreadsheet tools write it: UTF-8 BOM, CRLF line ends, a `file` column, labels with trailing spaces."""
    root = write_folder(tmp_path / "imgs", per_class=6)
    rows = ["file,label"] + [f"{p.relative_to(tmp_path).as_posix()},{p.parent.name}  " for p in sorted(root.rglob("*.*"))]
    path = tmp_path / "bom.csv"
    path.write_bytes(("\r\n".join(rows) + "\r\n").encode("utf-8-sig"))
    return path


def test_item4_a_spreadsheet_csv_with_a_file_column_trains_with_stripped_labels(tmp_path, transferkit_logs):
    from transferkit import ImageClassifier
    from transferkit.data import detect_modality, load_data

    path = _spreadsheet_csv(tmp_path)
    assert detect_modality(path)[0] == "image"
    splits = load_data(path, seed=0)
    assert splits.classes == ["blue", "green", "red"]
    assert len(splits.summary.warnings["labels_stripped"]) == 18
    assert "label(s) with surrounding spaces, stripped" in splits.summary.line()
    clf = ImageClassifier("builtin:efficientnet_lite0", strategy="feature-extraction", image_size=32, progress=False).fit(path)
    assert list(clf.classes_) == ["blue", "green", "red"]
    assert "stripped" in transferkit_logs.text


def test_item12_cli_predict_takes_a_folder_as_python_predict_does(colours_run):
    import json

    from typer.testing import CliRunner

    from transferkit.cli import app

    run, images = colours_run
    result = CliRunner().invoke(app, ["predict", str(run), str(images), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    expected = sorted(str(p) for p in images.rglob("*.*"))
    assert [r["file"] for r in rows] == expected  # recursively, sorted
    empty = images.parent / "empty"
    empty.mkdir()
    refused = CliRunner().invoke(app, ["predict", str(run), str(empty)])
    assert refused.exit_code != 0 and "holds no image files" in refused.output and "Traceback" not in refused.output


def test_item14_top5_is_shown_only_with_more_than_five_classes(colours_run):
    import numpy as np
    from typer.testing import CliRunner

    from transferkit.cli import app
    from transferkit.runs.card import model_card
    from transferkit.stats.metrics import metrics, top_k_clause

    run, images = colours_run
    result = CliRunner().invoke(app, ["evaluate", str(run), str(images)])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "top-5" not in result.output  # 3 classes: every class is in the top 5
    assert "top-5" not in (run / "report.html").read_text()  # the fit's report, written when the run was saved
    rng = np.random.default_rng(0)
    three, six = (metrics(rng.normal(size=(30, k)), rng.integers(0, k, 30), list("abcdef"[:k])) for k in (3, 6))
    assert three["top5_accuracy"] is None and top_k_clause(three, 3) == ""
    assert top_k_clause(six, 6) == f"; top-5 {six['top5_accuracy']:.4f}"
    # An older run stored 1.0 for a 3-class top-5: its card leaves it out.
    import json

    meta = json.loads((run / "transferkit.json").read_text())
    meta["metrics"]["test"]["top5_accuracy"] = 1.0
    assert "Top-5" not in model_card(meta, "colours") and "top_5" not in model_card(meta, "colours")


def test_item15_transformers_progress_bars_stay_quiet_and_their_switch_is_restored(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    from transferkit.backbones.text import TextBackbone, load_text_backbone

    assert hf_logging.is_progress_bar_enabled()
    bb = load_text_backbone("minilm", 3)
    bb.write_trained(tmp_path)
    TextBackbone.read_trained(tmp_path, spec=bb.spec.to_dict(), n_classes=3, data_config=bb.data_config)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err, err
    assert hf_logging.is_progress_bar_enabled()  # transformers' own switch, as the library found it


def test_item17_a_wrong_path_is_an_error_without_a_detection_line_before_it(tmp_path):
    from conftest import run_cli

    proc = run_cli("fit", str(tmp_path / "x" / "icon"), "--out", str(tmp_path / "run"), check=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    assert "so images" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_item17_a_jsonl_file_missing_a_key_gets_jsonl_advice(tmp_path):
    import json

    from transferkit.data import load_data
    from transferkit.errors import DataError

    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": f"sentence {i}", "category": "ab"[i % 2]}) + "\n" for i in range(10)))
    with pytest.raises(DataError) as info:
        load_data(path)
    message = str(info.value)
    assert "no key 'label'" in message and "--label-column KEY" in message and "category" in message
    assert "path,label" not in message and "CSV" not in message


def test_item18_models_prints_only_sections_with_matches_and_did_you_mean_when_none():
    from typer.testing import CliRunner

    from transferkit.cli import app

    some = CliRunner().invoke(app, ["models", "resnet1"])
    assert some.exit_code == 0, some.output
    assert "Built-in" not in some.output and "timm architectures" in some.output and "resnet18" in some.output
    none = CliRunner().invoke(app, ["models", "resnt50"])
    assert none.exit_code == 0, none.output
    assert "Built-in" not in none.output and "timm architectures" not in none.output
    assert "No backbone matches 'resnt50'. Did you mean: resnet50" in none.output
    lite = CliRunner().invoke(app, ["models", "lite0"])
    assert "Built-in image backbones" in lite.output and "Built-in text" not in lite.output


def test_item19_help_at_80_columns_reads_as_usual_and_cuts_nothing():
    from typer.testing import CliRunner

    from transferkit.cli import app

    pages = {}
    for command in ("fit", "compare", "predict", "evaluate", "doctor", "models", "inspect", "export", "push", "serve", None):
        args = [command, "--help"] if command else ["--help"]
        result = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
        assert result.exit_code == 0, result.output
        pages[command] = " ".join(result.output.replace("│", " ").split())  # the help texts, unwrapped
        for bad in ("…", "<bool>", "{"):
            if bad in result.output:
                pytest.fail(f"transferkit {command} --help shows {bad!r}:\n{result.output}")
    assert "fit [OPTIONS] DATA" in pages["fit"] and "predict [OPTIONS] RUN [INPUTS]..." in pages["predict"]
    assert "--label-smoothing <float range> Label smoothing of the" in pages["fit"]
    assert "resnet18,convnext_tiny" in pages["compare"] and "feature-extraction,lp-ft" in pages["compare"]


def _transparent_icon(path: Path) -> Path:
    """An RGBA PNG whose transparent half stores black: composited onto white it is half white, converted to RGB
    (PIL's convert drops alpha) half black."""
    import numpy as np
    from PIL import Image

    arr = np.zeros((40, 40, 4), np.uint8)
    arr[:, :20] = (200, 40, 40, 255)  # opaque red
    Image.fromarray(arr, "RGBA").save(path)
    return path


def test_item21_an_rgba_array_is_composited_onto_white_as_its_file_is(colours_run, tmp_path):
    import numpy as np
    from PIL import Image

    from transferkit import load_classifier
    from transferkit.export.onnx import OnnxClassifier, export_run

    run, _ = colours_run
    icon = _transparent_icon(tmp_path / "icon.png")
    rgba = np.asarray(Image.open(icon))
    dropped = np.asarray(Image.open(icon).convert("RGB"))
    assert rgba.shape == (40, 40, 4)
    clf = load_classifier(run, progress=False)
    from_file = clf.predict_proba([icon])
    np.testing.assert_allclose(clf.predict_proba(rgba), from_file, atol=1e-6)
    np.testing.assert_allclose(clf.predict_proba(Image.open(icon)), from_file, atol=1e-6)
    assert np.abs(clf.predict_proba(dropped) - from_file).max() > 1e-3  # alpha dropped: another image
    # The ONNX export's classifier takes the same inputs and composites the same way.
    onnx = OnnxClassifier.load(export_run(run, "onnx", tmp_path / "model.onnx").path)
    expected = onnx.predict_proba([icon])
    np.testing.assert_allclose(onnx.predict_proba(rgba), expected, atol=1e-5)
    np.testing.assert_allclose(onnx.predict_proba([Image.open(icon)]), expected, atol=1e-5)


def test_item23_the_converted_model_is_keyed_without_the_head_so_class_counts_share_one_conversion():
    pytest.importorskip("openvino")
    import torch

    from transferkit.backbones import load_backbone
    from transferkit.inference.extraction import input_shape, pooled_cut
    from transferkit.inference.runners import model_key

    def key(bb) -> str:
        cut = pooled_cut(bb)
        return model_key(cut.module, cut.name, input_shape(bb), "direct", cut.unused)

    three, seven = load_backbone("builtin:efficientnet_lite0", 3), load_backbone("builtin:efficientnet_lite0", 7)
    assert "out_features=3" in repr(three.model) and "out_features=7" in repr(seven.model)
    assert key(three) == key(seven)  # the head is not in the converted graph
    assert key(three) != key(load_backbone("builtin:efficientnet_lite1", 3))  # another backbone
    assert key(three) != key(load_backbone("builtin:efficientnet_lite0", 3, weights="none"))  # other weights
    with torch.no_grad():
        next(p for n, p in three.model.named_parameters() if n not in three.head_param_names).add_(1.0)
    assert key(three) != key(seven)  # a changed backbone weight
    assert model_key(seven.model, "module", input_shape(seven), "direct") != key(seven)  # the whole model is another cut


def test_item22_auto_says_the_probe_accuracy_and_why_a_trial_starts_when_they_happen(tmp_path, transferkit_logs):
    import numpy as np
    from PIL import Image

    from transferkit import ImageClassifier

    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):  # noise with arbitrary labels: the probe stays far below the ceiling
        (tmp_path / "noise" / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "noise" / c / f"{i}.png")
    clf = ImageClassifier("builtin:efficientnet_lite0", strategy="auto", image_size=32, epochs=1, progress=False)
    clf.fit(tmp_path / "noise")
    messages = [r.getMessage() for r in transferkit_logs.records]
    probe = next(i for i, m in enumerate(messages) if m.startswith("auto: the frozen-feature probe reaches"))
    trial = next(i for i, m in enumerate(messages) if m.startswith("auto: ") and "so it tries lp-ft" in m)
    chose = next(i for i, m in enumerate(messages) if m.startswith("auto chose"))
    assert probe < trial < chose  # said when they happen, before the trial trains
    assert f"{clf.decision_.measurements['probe_val_acc']:.1%} validation accuracy" in messages[probe]
