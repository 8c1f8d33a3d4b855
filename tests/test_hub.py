"""Runs in timm's hub layout, the model card, the hub download and push paths on a loopback Hub, int8 ONNX.

Everything real: a trained run, timm's own `local-dir:` / `hf-hub:` loaders, huggingface_hub's ModelCard
parser and its download / upload code talking HTTP to a local server (tests/hub_server.py), ONNX Runtime's
static quantization.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import invoke_cli
from hub_server import LoopbackHub
from transferkit import ImageClassifier
from transferkit.cli.app import app
from transferkit.data.images import make_transform, open_image
from transferkit.errors import ExportError, UsageError
from transferkit.export.int8 import quantize_run
from transferkit.export.onnx import OnnxClassifier
from transferkit.runs.card import metric_intervals, model_card
from transferkit.runs.directory import load_run, read_meta
from transferkit.runs.hub import files_to_upload, push_run
from transferkit.stats.intervals import score_with_intervals, wilson_interval
from transferkit.stats.wording import format_interval

HUB_REPO = "timm/tf_efficientnet_lite0.in1k"


@pytest.fixture(scope="module")
def run(colours_run):
    """A real feature-extraction run on the built-in backbone (conftest's, shared): (run dir, image folder)."""
    return colours_run


def read_meta_dict(run_dir) -> dict:
    """transferkit.json's content as checked and read by read_meta."""
    return read_meta(run_dir).to_dict()


def some_images(images, n=6):
    return sorted(p for p in images.rglob("*") if p.is_file())[:n]


def cli(*args, env_extra=None, drop=(), check=True):
    """The real `transferkit` command in a subprocess, with hub variables set (and `drop` removed)."""
    env = {k: v for k, v in os.environ.items() if k not in drop} | {"COLUMNS": "200"} | (env_extra or {})
    proc = subprocess.run([sys.executable, "-m", "transferkit", *args], capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"transferkit {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def hub_env(hub, home, **extra):
    """Point huggingface_hub at the loopback server, with its own cache; uploads on the LFS path (no Xet)."""
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1", **extra}


# --------------------------------------------------------------------------- timm's hub layout


def test_plain_timm_loads_a_run_with_its_classes_and_preprocessing(run):
    run_dir, images = run
    meta = read_meta_dict(run_dir)
    model = timm.create_model(f"local-dir:{run_dir}", pretrained=True).eval()
    assert model.pretrained_cfg["label_names"] == meta["classes"] == ["blue", "green", "red"]
    config = timm.data.resolve_model_data_config(model)
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()} == meta["data_config"]
    files = some_images(images)
    timm_transform = timm.data.create_transform(**config)
    ours_transform = make_transform({k: tuple(v) if isinstance(v, list) else v for k, v in meta["data_config"].items()})
    x = torch.stack([timm_transform(Image.open(f).convert("RGB")) for f in files])
    assert torch.equal(x, torch.stack([ours_transform(open_image(f)) for f in files]))
    with torch.no_grad():
        plain = model(x).numpy()
    ours = ImageClassifier.load(run_dir, precision="fp32").decision_function(files)
    np.testing.assert_allclose(plain, ours, atol=1e-4, rtol=0)


def test_config_json_is_timms_own_hub_config(run):
    run_dir, _ = run
    config = json.loads((run_dir / "config.json").read_text())
    meta = read_meta_dict(run_dir)
    assert config["architecture"] == "tf_efficientnet_lite0" and config["num_classes"] == 3
    assert config["num_features"] == 1280 and config["label_names"] == meta["classes"]
    cfg = config["pretrained_cfg"]
    assert {k: cfg[k] for k in meta["data_config"]} == meta["data_config"]  # input size, mean, std, interpolation, crop
    assert cfg["num_classes"] == 3 and not {"hf_hub_id", "url", "file"} & set(cfg)  # no source of the base weights


def test_a_run_is_a_backbone_for_the_next_fit(run):
    """--model local-dir:RUN starts from the trained weights with a new head; a bare folder name says how to give it."""
    from transferkit.backbones import load_backbone

    run_dir, _ = run
    bb = load_backbone(f"local-dir:{run_dir}", 3)
    assert bb.spec.arch == "tf_efficientnet_lite0" and bb.spec.weights == f"dir:{run_dir.resolve()}"
    assert list(bb.data_config["input_size"]) == [3, 64, 64]
    trained = load_file(run_dir / "model.safetensors")
    state = bb.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items() if not k.startswith("classifier"))
    assert not bb.model.get_classifier().weight.any()  # a new, zeroed head
    with pytest.raises(UsageError, match=f"--model local-dir:{run_dir}"):
        load_backbone(str(run_dir), 3)
    with pytest.raises(UsageError, match=r"holds no config\.json"):
        load_backbone(f"local-dir:{run_dir / 'missing'}", 3)


# --------------------------------------------------------------------------- the model card


def test_model_card_parses_and_holds_the_metrics(run):
    run_dir, _ = run
    card = ModelCard.load(run_dir / "README.md")
    meta, test = read_meta_dict(run_dir), read_meta_dict(run_dir)["metrics"]["test"]
    assert card.data.library_name == "timm" and card.data.pipeline_tag == "image-classification"
    assert {"transferkit", "transfer-learning", "timm"} <= set(card.data.tags)
    assert card.data.base_model is None  # built-in weights: the package is named in the body, no hub repo claimed
    results = {r.metric_type: r for r in card.data.eval_results}
    assert results["accuracy"].metric_value == round(test["accuracy"], 4) and results["accuracy"].dataset_split == "test"
    assert results["f1"].metric_value == round(test["macro_f1"], 4)
    low, high = wilson_interval(round(test["accuracy"] * test["n"]), test["n"])
    assert format_interval(test["accuracy"], low, high) in card.text
    assert f"| Accuracy | {test['accuracy']:.4f} | {low:.4f} - {high:.4f} | wilson |" in card.text
    assert "feature-extraction" in card.text and f"local-dir:{run_dir.name}" in card.text
    assert all(f"`{c}`" in card.text for c in meta["classes"])


def test_the_cards_timm_snippet_runs_and_agrees_with_transferkit(run):
    run_dir, images = run
    snippet = re.search(r"```python\n(.*?)```", (run_dir / "README.md").read_text(), re.S).group(1)
    photo = some_images(images, 1)[0]
    scope = {}
    exec(snippet.replace("hf-hub:REPO_ID", f"local-dir:{run_dir}").replace("photo.jpg", str(photo)), scope)
    assert scope["label"] == ImageClassifier.load(run_dir).predict([photo])[0] and 0 < scope["probability"] <= 1


def test_card_uses_intervals_the_run_records_else_computes_them(run):
    run_dir, _ = run
    meta = read_meta_dict(run_dir)
    recorded = meta["metrics"]["test"]["intervals"]["accuracy"]  # what fit measured: the card shows it as given
    assert (
        metric_intervals(meta["metrics"]["test"], 3)["accuracy"]["low"],
        metric_intervals(meta["metrics"]["test"], 3)["accuracy"]["high"],
    ) == (recorded["low"], recorded["high"])
    test = {k: v for k, v in meta["metrics"]["test"].items() if k != "intervals"}  # a run without them
    computed = metric_intervals(test, 3)
    y_true = np.repeat(np.repeat(np.arange(3), 3), np.ravel(test["confusion"]))
    y_pred = np.repeat(np.tile(np.arange(3), 3), np.ravel(test["confusion"]))
    assert computed["macro_f1"] == score_with_intervals(y_true, y_pred, 3)["macro_f1"]
    assert computed["accuracy"]["method"] == "wilson"
    shapes = [
        {"accuracy_interval": [0.5, 0.99]},
        {"intervals": {"accuracy": {"value": 1.0, "low": 0.5, "high": 0.99, "method": "wilson"}}},
        {"accuracy": {"value": 1.0, "low": 0.5, "high": 0.99, "method": "wilson"}},
    ]
    for recorded in shapes:
        given = {**test, **recorded}
        assert (metric_intervals(given, 3)["accuracy"]["low"], metric_intervals(given, 3)["accuracy"]["high"]) == (0.5, 0.99)
        text = model_card({**meta, "metrics": {**meta["metrics"], "test": given}}, "run")
        assert "| 0.5000 - 0.9900 |" in text
        ModelCard(text)  # still parses


def test_card_shows_a_comparison_the_run_holds(run):
    """A run that holds compare.json's results (its `results` rows) gets the comparison table in its card."""
    from transferkit.compare.results import StrategyResult

    def row(strategy, trainable, epochs, seconds, memory, val, test):
        return StrategyResult(
            strategy=strategy,
            label=strategy,
            trainable_params=trainable,
            total_params=3400000,
            epochs=epochs,
            seconds=seconds,
            peak_memory_mib=memory,
            val_accuracy=val,
            test_accuracy=test,
            macro_f1=test,
            train_per_class=8,
        ).row()

    rows = [row("feature-extraction", 3843, 0, 1.5, 10.0, 1.0, 1.0), row("lp-ft", 3400000, 5, 40.0, 300.0, 0.98, 0.97)]
    text = model_card({**read_meta_dict(run[0]), "comparison": {"results": rows}}, "run")
    assert "## Comparison (same split and seed)" in text and "| lp-ft | 3400000 | 5 | 40 | 0.98 | 0.97 |" in text
    ModelCard(text)


def test_a_text_runs_card_says_how_transformers_loads_it(run):
    """The card of a text run's transferkit.json (pooling and max length in its data config) parses and loads."""
    meta = read_meta_dict(run[0]) | {
        "modality": "text",
        "data_config": {"pooling": "mean", "max_length": 64},
        "backbone": {"name": "minilm", "arch": "bert", "weights": "builtin"},
    }
    card = ModelCard(model_card(meta, "reviews"))
    assert card.data.pipeline_tag == "text-classification" and card.data.library_name is None
    assert 'AutoModel.from_pretrained("reviews/encoder")' in card.text and "max_length=64" in card.text
    assert "mask.sum(1)" in card.text  # mean pooling over the attention mask


# --------------------------------------------------------------------------- downloads from a loopback Hub


def lite0_repo_files(tmp_path) -> dict[str, bytes]:
    """The built-in Lite0 weights saved as timm publishes timm/tf_efficientnet_lite0.in1k (save_for_hf)."""
    from timm.models import save_for_hf

    from transferkit.backbones.vision import BUILTIN_BACKBONES, map_state_dict, read_weights_file

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = read_weights_file(BUILTIN_BACKBONES["builtin:efficientnet_lite0"].weights_path())
    mapped, _ = map_state_dict(source, model, ("classifier.weight", "classifier.bias"))
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    save_for_hf(model, tmp_path / "published", safe_serialization=True)
    return {p.name: p.read_bytes() for p in (tmp_path / "published").iterdir()}


@pytest.mark.subprocess
def test_fit_downloads_from_the_hub_caches_and_works_offline(run, tmp_path):
    run_dir, images = run
    hub = LoopbackHub().start()
    hub.add_repo(HUB_REPO, lite0_repo_files(tmp_path))
    home = tmp_path / "hf"
    args = ["fit", str(images), "--model", "tf_efficientnet_lite0.in1k", "--strategy", "feature-extraction", "--image-size", "64", "-q"]
    try:
        cli(*args, "--out", str(tmp_path / "online"), env_extra=hub_env(hub, home))
    finally:
        hub.stop()
    assert ("GET", f"/{HUB_REPO}/resolve/main/model.safetensors") in hub.log  # timm asked huggingface_hub for it
    snapshots = list((home / "hub" / "models--timm--tf_efficientnet_lite0.in1k" / "snapshots").glob("*/model.safetensors"))
    assert len(snapshots) == 1
    online = read_meta_dict(tmp_path / "online")
    assert online["backbone"]["weights"] == "hub" and online["backbone"]["arch"] == "tf_efficientnet_lite0"
    # The hub's copy of the built-in weights trains the same model as the built-in weights do.
    hub_state, builtin_state = load_file(tmp_path / "online" / "model.safetensors"), load_file(run_dir / "model.safetensors")
    assert all(torch.equal(hub_state[k], builtin_state[k]) for k in builtin_state if not k.startswith("classifier"))
    assert ModelCard.load(tmp_path / "online" / "README.md").data.base_model == HUB_REPO

    requests = len(hub.log)
    cli(*args, "--out", str(tmp_path / "offline"), env_extra=hub_env(hub, home, HF_HUB_OFFLINE="1"))  # server stopped
    assert len(hub.log) == requests
    assert read_meta_dict(tmp_path / "offline")["metrics"]["test"] == online["metrics"]["test"]

    failed = cli(*args, "--out", str(tmp_path / "none"), env_extra=hub_env(hub, tmp_path / "empty", HF_HUB_OFFLINE="1"), check=False)
    message = failed.stderr.strip()
    print(message)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr and message.count("\n") == 0
    assert message.startswith("Error: HF_HUB_OFFLINE is set and 'tf_efficientnet_lite0.in1k' is not in the hub cache")
    assert all(s in message for s in ("connect", "--weights FILE", "the built-in 'builtin:efficientnet_lite0'", "--weights none"))


# --------------------------------------------------------------------------- push


@pytest.mark.subprocess
def test_push_uploads_the_run_and_timm_loads_it_back(run, tmp_path):
    run_dir = shutil.copytree(run[0], tmp_path / "colours")
    for local in ("checkpoints/last.pt", "tensorboard/events.out", "mlflow.db"):  # what a fit leaves that stays local
        (run_dir / local).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / local).write_bytes(b"local only")
    hub = LoopbackHub().start()
    try:
        env = hub_env(hub, tmp_path / "hf", HF_TOKEN=hub.token)
        proc = cli("push", str(run_dir), "me/colours", "--private", "--revision", "v1", env_extra=env)
        pushed = hub.repos["me/colours"].files("v1")
        assert set(pushed) - {".gitattributes"} == set(files_to_upload(run_dir))
        assert {"model.safetensors", "config.json", "README.md", "transferkit.json", "metrics.json"} <= set(pushed)
        assert not any(p.startswith(("checkpoints", "tensorboard", "mlflow")) for p in pushed)
        assert all(pushed[f] == (run_dir / f).read_bytes() for f in files_to_upload(run_dir))
        assert set(hub.repos["me/colours"].files("main")) == {".gitattributes"} and hub.repos["me/colours"].private
        assert ("POST", "/me/colours.git/info/lfs/objects/batch") in hub.log  # the weights went the LFS way
        assert "hf-hub:me/colours@v1" in proc.stdout
        loaded = load_back(env, tmp_path)
    finally:
        hub.stop()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = load_run(run[0]).model(x).numpy()
    np.testing.assert_allclose(np.array(loaded["timm_logits"]), reference, atol=1e-4, rtol=0)
    assert loaded["labels"] == ["blue", "green", "red"]
    assert loaded["transferkit"] == {"arch": "tf_efficientnet_lite0", "weights": "hub", "input_size": [3, 64, 64]}
    assert loaded["anonymous"] == "RepositoryNotFoundError"  # private: without the token nothing is served


LOAD_BACK = """
import json, timm, torch
from huggingface_hub import hf_hub_download
from transferkit.backbones import load_backbone
model = timm.create_model("hf-hub:me/colours@v1", pretrained=True).eval()
x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = model(x).tolist()
bb = load_backbone("hf-hub:me/colours@v1", 3)
try:
    hf_hub_download("me/colours", "config.json", revision="v1", token=False, cache_dir=EMPTY)
    anonymous = "downloaded"
except Exception as e:
    anonymous = type(e).__name__
print(json.dumps({"timm_logits": logits, "labels": model.pretrained_cfg["label_names"], "anonymous": anonymous,
                  "transferkit": {"arch": bb.spec.arch, "weights": bb.spec.weights,
                                  "input_size": list(bb.data_config["input_size"])}}))
"""


def load_back(env: dict, tmp_path) -> dict:
    """timm and transferkit load the pushed repository in a fresh process pointed at the loopback Hub."""
    code = LOAD_BACK.replace("EMPTY", repr(str(tmp_path / "anonymous-cache")))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.subprocess
def test_push_without_a_token_or_with_a_bad_repo_id_says_what_to_do(run, tmp_path):
    proc = cli("push", str(run[0]), "me/colours", env_extra={"HF_HOME": str(tmp_path / "no-login")}, drop=("HF_TOKEN",), check=False)
    assert proc.returncode == 2 and "hf auth login" in proc.stderr and "HF_TOKEN" in proc.stderr
    assert "Traceback" not in proc.stderr
    with pytest.raises(UsageError, match="owner/name"):
        push_run(run[0], "no owner here", token="x")


# --------------------------------------------------------------------------- int8 ONNX


@pytest.fixture(scope="module")
def int8_run(run, tmp_path_factory):
    """`transferkit export RUN --format onnx --int8` on a copy of the run: (run dir, stdout)."""
    run_dir = shutil.copytree(run[0], tmp_path_factory.mktemp("int8") / "run")
    return run_dir, cli("export", str(run_dir), "--format", "onnx", "--int8").stdout


def test_int8_export_reports_accuracy_and_speed_and_predicts_alike(run, int8_run):
    run_dir, stdout = int8_run
    print(stdout)
    info = json.loads((run_dir / "model.int8.onnx.json").read_text())
    q = info["quantization"]
    assert re.search(rf"Test accuracy \(n = 6\): fp32 {q['fp32_test_accuracy']:.4f}, int8 {q['int8_test_accuracy']:.4f}", stdout)
    assert f"int8 {q['speed_ratio']:.2f}x the fp32 speed" in stdout and q["drop_points"] <= 1
    assert "the run's 6 validation images" in q["calibration"] and (run_dir / "model.onnx").is_file()
    assert info["data_config"] == read_meta_dict(run_dir)["data_config"]
    files = some_images(run[1], 12)
    int8 = OnnxClassifier.load(run_dir / "model.int8.onnx")
    assert int8.data_config_ == OnnxClassifier.load(run_dir / "model.onnx").data_config_  # the same preprocessing
    assert int8.predict(files) == ImageClassifier.load(run_dir).predict(files)
    onnx_snippet = re.findall(r"```python\n(.*?)```", (run_dir / "README.md").read_text(), re.S)[1]
    scope = {}
    exec(onnx_snippet.replace('"run/model.onnx"', repr(str(run_dir / "model.int8.onnx"))).replace("photo.jpg", str(files[0])), scope)
    assert scope["label"] == ImageClassifier.load(run_dir).predict([files[0]])[0]


def test_int8_refuses_a_model_that_loses_accuracy_unless_forced(int8_run, tmp_path):
    """Calibrated on flat grey images, int8 clips real images' activations and loses accuracy: refused."""
    run_dir, _ = int8_run
    for k, name in enumerate(("blue", "green", "red")):
        (tmp_path / "grey" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 40), (120 + 4 * k + i,) * 3).save(tmp_path / "grey" / name / f"{i}.png")
    target = tmp_path / "grey.onnx"
    proc = invoke_cli("export", str(run_dir), "--int8", "--calibration", str(tmp_path / "grey"), "--out", str(target), check=False)
    message = proc.stderr.strip()
    print(message)
    assert proc.returncode == 1 and message.count("\n") == 0 and "Traceback" not in message
    assert re.search(r"int8 loses \d+\.\d points of test accuracy .* more than 1\. Nothing was written", message)
    assert "--force" in message and not target.exists()
    forced = quantize_run(run_dir, target, calibration=tmp_path / "grey", force=True)
    assert forced.drop_points > 1 and forced.forced and target.is_file()
    refused = CliRunner().invoke(app, ["export", str(run_dir), "--int8", "--format", "torchscript"])
    assert refused.exit_code == 2
    broken = shutil.copytree(run_dir, tmp_path / "moved")
    meta = json.loads((broken / "transferkit.json").read_text())
    meta["data"]["source"] = str(tmp_path / "gone")
    (broken / "transferkit.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="cannot be read again"):
        quantize_run(broken)
