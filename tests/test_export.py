"""Export: ONNX and TorchScript files that reproduce the run's logits, carry their preprocessing, and predict."""

import io
import json
import re
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import invoke_cli
from transferkit import ImageClassifier
from transferkit.errors import ExportError, RunError, UsageError
from transferkit.export import onnx as ex
from transferkit.runs.directory import load_run


@pytest.fixture(scope="module")
def run(colours_run):
    """A real feature-extraction run on the built-in backbone (conftest's, shared): (run dir, image folder)."""
    return colours_run


@pytest.fixture(scope="module")
def onnx_export(run):
    """`transferkit export RUN` (ONNX by default), through the real command: (model path, stdout)."""
    proc = invoke_cli("export", str(run[0]))
    return run[0] / "model.onnx", proc.stdout


def reference_logits(run_dir, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return load_run(run_dir).model(x).numpy()


def test_cli_export_reports_parity_at_batch_1_and_3(run, onnx_export):
    path, stdout = onnx_export
    print(stdout)
    parity = re.search(r"max \|logit difference\|: batch 1 (\S+), batch 3 (\S+) \(tolerance 1e-04\)", stdout)
    assert parity and max(float(v) for v in parity.groups()) <= 1e-4
    assert f"Predict with: transferkit predict {path} IMAGE..." in stdout and f"{path}.json" in stdout


def test_onnx_export_reproduces_pytorch_with_a_dynamic_batch_axis(run, onnx_export):
    run_dir, _ = run
    path, _ = onnx_export
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    batch, *rest = model.graph.input[0].type.tensor_type.shape.dim
    assert batch.dim_param and [d.dim_value for d in rest] == [3, 64, 64]
    # A batch size the exporter never saw, run by plain onnxruntime.
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(ours, reference_logits(run_dir, x), atol=1e-4, rtol=0)


def test_preprocessing_is_written_beside_and_embedded(run, onnx_export):
    run_dir, _ = run
    path, _ = onnx_export
    meta = json.loads((run_dir / "transferkit.json").read_text())
    side = json.loads((run_dir / "model.onnx.json").read_text())
    assert side["classes"] == meta["classes"] == ["blue", "green", "red"]
    assert side["data_config"] == meta["data_config"]
    cfg = side["data_config"]
    assert cfg["input_size"] == [3, 64, 64] and cfg["mean"] == cfg["std"] == [0.5, 0.5, 0.5]
    assert {"interpolation", "crop_pct"} <= set(cfg)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["transferkit"]) == side


def test_onnx_classifier_matches_the_run(run, onnx_export):
    run_dir, images = run
    files = sorted(images.rglob("*.*"))[::4]
    onnx_clf = ex.OnnxClassifier.load(onnx_export[0], device="cpu")
    torch_clf = ImageClassifier.load(run_dir, progress=False, precision="fp32", device="cpu")
    assert onnx_clf.classes_ == torch_clf.classes_
    np.testing.assert_allclose(onnx_clf.predict_proba(files), torch_clf.predict_proba(files), atol=1e-4)
    assert onnx_clf.predict(files) == torch_clf.predict(files)


def test_onnx_classifier_falls_back_to_the_json_beside_it(onnx_export, tmp_path):
    model = onnx.load(str(onnx_export[0]))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(ExportError, match="carries no transferkit preprocessing"):
        ex.OnnxClassifier.load(bare)
    shutil.copy(f"{onnx_export[0]}.json", tmp_path / "bare.onnx.json")
    assert ex.OnnxClassifier.load(bare).classes_ == ["blue", "green", "red"]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_export_reproduces_pytorch(run, tmp_path):
    run_dir, _ = run
    result = ex.export_run(run_dir, "torchscript", tmp_path / "m.pt")
    print(f"TorchScript parity ({result.method}): {result.parity}")
    assert result.path == tmp_path / "m.pt" and set(result.parity) == {1, 3} and result.max_abs_diff <= 1e-4
    extra = {"transferkit.json": ""}
    module = torch.jit.load(str(result.path), map_location="cpu", _extra_files=extra)
    assert json.loads(extra["transferkit.json"]) == json.loads((tmp_path / "m.pt.json").read_text())
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        np.testing.assert_allclose(module(x).numpy(), reference_logits(run_dir, x), atol=1e-4, rtol=0)


def perturb_classifier_bias(proto_bytes: bytes) -> bytes:
    """Return the ONNX model with its classifier bias shifted by 0.01: an exporter bug, simulated."""
    model = onnx.load_from_string(proto_bytes)
    del model.metadata_props[:]
    bias = next(t for t in model.graph.initializer if list(t.dims) == [3])
    bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) + 0.01, bias.name))
    return model.SerializeToString()


def perturb_torchscript(data: bytes) -> bytes:
    module = torch.jit.load(io.BytesIO(data))
    with torch.no_grad():
        module.classifier.bias += 0.01
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_parity_failure_raises_and_keeps_the_previous_file(run, onnx_export, tmp_path, monkeypatch, fmt):
    run_dir, _ = run
    target = tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt")
    target.write_bytes(b"previous good export")
    if fmt == "onnx":  # reuse the module's export: the exporter's output, corrupted, goes through the real check
        good = onnx_export[0].read_bytes()
        monkeypatch.setattr(ex, "onnx_model", lambda model, example: onnx.load_from_string(perturb_classifier_bias(good)))
    else:
        real = ex.torchscript_bytes
        monkeypatch.setattr(ex, "torchscript_bytes", lambda *a: (perturb_torchscript(real(*a)[0]), "corrupted"))
    with pytest.raises(ExportError, match=r"does not reproduce the PyTorch model: max \|logit difference\| 0\.01"):
        ex.export_run(run_dir, fmt, target)
    assert target.read_bytes() == b"previous good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary or JSON file either


def test_export_arguments_are_checked(run, tmp_path):
    run_dir, _ = run
    with pytest.raises(UsageError, match="Did you mean: onnx"):
        ex.export_run(run_dir, "onx")
    with pytest.raises(UsageError, match=r"Use e\.g\. .*m\.onnx"):
        ex.export_run(run_dir, "onnx", tmp_path / "m.pt")
    with pytest.raises(RunError, match="not a finished transferkit run"):
        ex.export_run(tmp_path, "onnx")
    assert list(tmp_path.iterdir()) == []


def test_predict_on_the_onnx_file_agrees_with_the_run(run, onnx_export):
    run_dir, images = run
    files = [str(p) for c in ("red", "green", "blue") for p in sorted((images / c).iterdir())[:2]]
    from_run = json.loads(invoke_cli("predict", str(run_dir), *files, "--json").stdout)
    from_onnx = json.loads(invoke_cli("predict", str(onnx_export[0]), *files, "--json").stdout)
    assert [r["file"] for r in from_onnx] == files
    assert [r["predictions"][0]["label"] for r in from_onnx] == [r["predictions"][0]["label"] for r in from_run]
    bad = invoke_cli("export", str(run_dir), "--format", "tflite", check=False)
    assert bad.returncode == 2 and "onnx, torchscript" in bad.stderr and "Traceback" not in bad.stderr


def test_predict_on_a_run_and_on_its_export_agree(run, onnx_export, tmp_path):
    """Odd-sized real files: fp32 prediction equals the export's within 1e-4; the default (bf16 where the CPU has
    it) within the 0.02 the README states."""
    from PIL import Image

    from transferkit.export.onnx import OnnxClassifier

    rng = np.random.default_rng(3)
    files = []
    for i, (w, h) in enumerate([(37, 61), (123, 45), (64, 64), (301, 199)]):
        path = tmp_path / f"odd{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        files.append(path)
    run_dir, _ = run
    exported = OnnxClassifier.load(onnx_export[0]).predict_proba(files)
    fp32 = ImageClassifier.load(run_dir, precision="fp32").predict_proba(files)
    default = ImageClassifier.load(run_dir).predict_proba(files)
    np.testing.assert_allclose(fp32, exported, atol=1e-4)
    np.testing.assert_allclose(default, exported, atol=0.02)
    cli = json.loads(invoke_cli("predict", str(run_dir), *map(str, files), "--precision", "fp32", "--json").stdout)
    np.testing.assert_allclose([r["predictions"][0]["probability"] for r in cli], fp32.max(1), atol=1e-6)


def test_export_refuses_a_text_run_itself(tmp_path):
    from text_fixtures import topic_sentences, write_text_csv
    from transferkit import TextClassifier
    from transferkit.export.onnx import export_run

    data = write_text_csv(tmp_path / "t.csv", topic_sentences(per_class=6))
    run_dir = TextClassifier(strategy="feature-extraction", max_length=16).fit(data).save(tmp_path / "run")
    with pytest.raises(UsageError, match="transformers' format"):
        export_run(run_dir)
    assert not (run_dir / "model.onnx").exists()
