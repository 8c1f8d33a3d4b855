"""End to end through the `transferkit` command: in-process with typer's CliRunner (the same parsing, messages and exit
status), and the console script itself in a subprocess where only a new process shows the behaviour."""

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression

from conftest import invoke_cli, run_cli
from transferkit import ImageClassifier
from transferkit.data import load_data


@pytest.fixture
def digits_run(digits_probe_run, monkeypatch):
    """The session's digits probe (64 px, fp32), with its feature cache as this test's."""
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(digits_probe_run.cache))
    return digits_probe_run.out, digits_probe_run.proc


def sklearn_reference(run_dir) -> float:
    """LogisticRegression on the run's own cached features, C chosen on validation (Kornblith protocol)."""
    clf = ImageClassifier.load(run_dir)
    from transferkit.backbones import load_backbone
    from transferkit.cache.features import FeatureCache
    from transferkit.inference.extraction import resolve_device, resolve_precision
    from transferkit.training.config import TrainConfig
    from transferkit.training.trainer import Precision, Trainer

    splits = load_data("digits", seed=0)
    device = resolve_device("cpu")
    bb = load_backbone("builtin:efficientnet_lite0", 10)
    bb.configure_input(None, splits.train.preprocess_hint)
    assert bb.data_config == clf.data_config_
    trainer = Trainer(
        bb, splits, TrainConfig(), device=device, precision=Precision(resolve_precision("fp32", device), None), cache=FeatureCache.default()
    )
    f = {s: trainer.features(s) for s in ("train", "val", "test")}
    assert set(trainer.cache_hits.values()) == {"hit"}  # the reference reads the very same cached features
    best = max(
        (LogisticRegression(C=c, max_iter=3000).fit(f["train"], splits.train.labels) for c in np.logspace(-3, 3, 13)),
        key=lambda m: m.score(f["val"], splits.val.labels),
    )
    return best.score(f["test"], splits.test.labels)


@pytest.mark.slow  # the reference: 13 scikit-learn fits on 1,280 features
def test_fit_digits_feature_extraction_matches_sklearn_probe(digits_run):
    out, proc = digits_run
    meta = json.loads((out / "transferkit.json").read_text())
    acc = meta["metrics"]["test"]["accuracy"]
    reference = sklearn_reference(out)
    print(f"transferkit probe {acc:.4f}, sklearn LogisticRegression {reference:.4f}")
    assert acc >= 0.94
    assert acc >= reference - 0.005
    assert meta["strategy"]["spec"] == "feature-extraction"
    assert {k: v for k, v in meta["feature_cache"].items() if k != "engine"} == {"train": "miss", "val": "miss", "test": "miss"}
    assert meta["feature_cache"]["engine"].startswith("torch ")  # the default engine, with its precision
    assert "test accuracy" in proc.stdout
    for name in ("model.safetensors", "metrics.json", "history.csv"):
        assert (out / name).is_file()


def test_second_fit_reuses_the_feature_cache(digits_run, digits_probe_run, tmp_path):
    out, _ = digits_run
    again = invoke_cli(*digits_probe_run.args, "--out", str(tmp_path / "d2"))
    meta = json.loads((tmp_path / "d2" / "transferkit.json").read_text())
    assert {k: v for k, v in meta["feature_cache"].items() if k != "engine"} == {"train": "hit", "val": "hit", "test": "hit"}
    assert meta["feature_cache"]["engine"].startswith("torch ")  # the default engine, with its precision
    assert "Feature cache: train hit, val hit, test hit" in again.stdout
    first = json.loads((out / "transferkit.json").read_text())["metrics"]["test"]["accuracy"]
    assert meta["metrics"]["test"]["accuracy"] == first


def test_run_directory_loads_in_plain_timm_with_same_logits(digits_run):
    out, _ = digits_run
    meta = json.loads((out / "transferkit.json").read_text())
    model = timm.create_model(meta["backbone"]["arch"], num_classes=len(meta["classes"]))
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    model.eval()
    clf = ImageClassifier.load(out, precision="fp32")
    images = load_data("digits", seed=0).test.subset(range(16))
    ours = clf.decision_function(images)
    transform = timm.data.create_transform(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["data_config"].items()})
    x = torch.stack([transform(images.load(i)) for i in range(len(images))])
    with torch.no_grad():
        plain = model(x).numpy()
    np.testing.assert_allclose(ours, plain, atol=1e-4, rtol=1e-4)


def test_predict_and_evaluate_on_generated_folder(colours_run):
    out, image_folder = colours_run
    files = sorted(str(p) for p in (image_folder / "red").iterdir())[:3]
    table = invoke_cli("predict", str(out), *files)
    assert "red" in table.stdout and "probability" in table.stdout
    proc = invoke_cli("predict", str(out), *files, "--json", "--top-k", "2")
    rows = json.loads(proc.stdout)
    assert [r["file"] for r in rows] == files
    assert all(len(r["predictions"]) == 2 for r in rows)
    assert sum(r["predictions"][0]["label"] == "red" for r in rows) >= 2
    assert all(0 <= p["probability"] <= 1 for r in rows for p in r["predictions"])
    result = json.loads(invoke_cli("evaluate", str(out), str(image_folder), "--json").stdout)
    assert result["n"] == 36 and result["accuracy"] > 0.8


def test_usage_errors_exit_2_and_name_the_fix(tmp_path):
    proc = invoke_cli("fit", "digits", "--strategy", "finetune:lst=2", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "finetune:last=N" in proc.stderr
    proc = invoke_cli("fit", "digits", "--model", "resnet5O", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "Did you mean" in proc.stderr
    proc = invoke_cli("fit", "no/such/folder", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 1 and "no/such/folder does not exist" in proc.stderr
    proc = invoke_cli("predict", str(tmp_path / "nothing"), "a.png", check=False)
    assert proc.returncode == 1 and "not a finished transferkit run" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_and_inspect():
    assert "feature-extraction" in invoke_cli("fit", "--help").stdout
    info = json.loads(invoke_cli("inspect", "builtin:efficientnet_lite0", "--json").stdout)
    assert info["feature_dim"] == 1280 and len(info["blocks"]) == 8
    assert "builtin:efficientnet_lite0" in invoke_cli("models", "lite0").stdout


def test_models_lists_the_three_builtins_and_a_recommended_table_with_sources():
    listed = invoke_cli("models", "efficientnet_lite*").stdout
    builtins = listed.split("Built-in text")[0]
    assert [n for n in ("builtin:efficientnet_lite0", "builtin:efficientnet_lite1", "builtin:efficientnet_lite2") if n in builtins] == [
        "builtin:efficientnet_lite0",
        "builtin:efficientnet_lite1",
        "builtin:efficientnet_lite2",
    ]
    assert "240 px" in builtins and "260 px" in builtins
    proc = invoke_cli("models", "--recommended", env={"HF_HUB_OFFLINE": "1"})  # offline: it downloads nothing
    text = proc.stdout
    from transferkit.backbones.recommended import RECOMMENDED

    assert all(r.name in text for r in RECOMMENDED)
    assert "resnet50.a1_in1k" in text and "25.6M" in text and "81.2% @ 288 px" in text  # counted; timm's CSV
    assert "apache-2.0" in text and "results-imagenet.csv" in text and "Oquab et al. 2023" in text
    assert "Traceback" not in proc.stderr


@pytest.mark.subprocess
def test_legacy_model_name_is_said_once_in_the_cli():
    """A new process (the console script itself): the legacy name is said once per process."""
    proc = run_cli("inspect", "efficientnet_lite0", "--json")
    assert json.loads(proc.stdout)["name"] == "builtin:efficientnet_lite0"
    assert proc.stderr.count("now names the built-in for compatibility") == 1, proc.stderr
