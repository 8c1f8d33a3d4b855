"""Export a trained run to ONNX or TorchScript, checked for output parity.

An export is only written once the exported model, loaded back by its own
runtime (onnxruntime, ``torch.jit.load``), reproduces the PyTorch model's
logits on sample inputs at batch sizes 1 and 3 within ``TOLERANCE``. Next to
the model goes its preprocessing (``<file>.json``: the timm data config and the
class names), which the ONNX file also carries in its ``metadata_props`` and
the TorchScript file in its extra files, so either is usable on its own.

Example:
    >>> result = export_run("runs/plants", "onnx")          # doctest: +SKIP
    >>> result.path, result.max_abs_diff
    (PosixPath('runs/plants/model.onnx'), 2.1e-05)
    >>> OnnxClassifier.load(result.path).predict(["photo.jpg"])  # doctest: +SKIP
    ['rose']
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from transferkit.atomic import write_atomic, write_json
from transferkit.errors import ExportError, UsageError, did_you_mean
from transferkit.runs.directory import library_versions, load_run
from transferkit.runs.meta import RunMeta

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}  # format -> default file name in the run
OPSET = 18  # the lowest opset torch's dynamo ONNX exporter emits; onnxruntime >= 1.14 runs it
TOLERANCE = 1e-4  # largest accepted |logit difference| between the export and PyTorch, fp32
PARITY_BATCHES = (1, 3)  # 1 and a size above 1 prove the batch axis is dynamic
INPUT_NAME, OUTPUT_NAME = "input", "logits"
METADATA_KEY = "transferkit"  # ONNX metadata_props key / TorchScript extra file holding the preprocessing JSON
EXPORT_FORMAT_VERSION = 1
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how closely it reproduces the PyTorch model."""

    format: str
    path: Path
    preprocess_path: Path
    method: str  # the exporter used, e.g. "torch.onnx.export (dynamo, opset 18)"
    parity: dict[int, float]  # batch size -> max |logit difference| against PyTorch
    tolerance: float
    seconds: float

    @property
    def max_abs_diff(self) -> float:
        return max(self.parity.values())


def export_run(run_dir: str | Path, format: str = "onnx", out: str | Path | None = None) -> ExportResult:
    """Export a run directory's model in fp32 after checking it reproduces the PyTorch logits.

    Args:
        run_dir: a run directory written by ``fit`` / ``ImageClassifier.save``.
        format: ``onnx`` (opset 18, dynamic batch axis) or ``torchscript``.
        out: the file to write; None (or a folder) takes ``model.onnx`` / ``model.torchscript.pt`` in it.

    Raises:
        UsageError: unknown format, or an `out` whose suffix does not fit the format.
        ExportError: the exporter fails, a package is missing, or parity is worse than ``TOLERANCE``.
    """
    fmt = check_format(format)
    path = output_path(Path(run_dir), fmt, out)
    run = load_run(run_dir)
    refusal = run.backbone.export_refusal()
    if refusal:
        raise UsageError(refusal.replace("RUN", str(run_dir)))
    return export_model(run.model, preprocess_info(run.meta, fmt), fmt, path)


def check_format(format: str) -> str:
    if format not in FORMATS:
        raise UsageError(f"format must be one of {', '.join(FORMATS)}; got '{format}'.{did_you_mean(format, FORMATS)}")
    return format


def output_path(run_dir: Path, fmt: str, out: str | Path | None) -> Path:
    """Where the export goes: `out`, or the format's default name inside `out` (a folder) or the run."""
    if out is None or Path(out).is_dir():
        return Path(out or run_dir) / FORMATS[fmt]
    out = Path(out)
    if (fmt == "onnx") != (out.suffix == ".onnx"):
        fix = out.with_suffix(".onnx") if fmt == "onnx" else out.with_suffix(".pt")
        raise UsageError(
            f"out '{out}' does not fit format {fmt}: ONNX files end in .onnx and only they do "
            f"(predict recognises an ONNX model by its suffix). Use e.g. {fix}."
        )
    return out


def preprocess_info(meta: RunMeta, fmt: str) -> dict:
    """The self-description saved with an export: classes, the timm data config, provenance."""
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "model_format": fmt,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "classes": list(meta.classes),
        "data_config": dict(meta.data_config),
        "backbone": meta.backbone,
        "versions": library_versions(),
    }


def export_model(model: nn.Module, preprocess: dict, fmt: str, path: Path) -> ExportResult:
    """Export `model` (fp32, eval), check parity in memory, then write it and its preprocessing atomically."""
    started = time.perf_counter()
    data, method, parity = checked_export(model, preprocess, fmt, path)
    write_atomic(path, data)
    preprocess_path = path.with_name(path.name + ".json")
    write_json(preprocess_path, preprocess)
    return ExportResult(fmt, path, preprocess_path, method, parity, TOLERANCE, time.perf_counter() - started)


def checked_export(model: nn.Module, preprocess: dict, fmt: str, path: Path) -> tuple[bytes, str, dict[int, float]]:
    """The exported model's bytes, the exporter used and the parity per batch size; nothing is written.

    Raises:
        ExportError: parity is worse than TOLERANCE (the message names `path` as not written).
    """
    model = model.eval()
    samples = sample_inputs(preprocess["data_config"]["input_size"])
    if fmt == "onnx":
        data, method = onnx_bytes(model, samples[-1], preprocess)
        parity = max_abs_diffs(model, onnx_runner(data), samples)
    else:
        data, method = torchscript_bytes(model, samples[-1], preprocess)
        parity = max_abs_diffs(model, torchscript_runner(data), samples)
    worst = max(parity.values())
    if not worst <= TOLERANCE:  # also catches NaN
        raise ExportError(
            f"The {fmt} export ({method}) does not reproduce the PyTorch model: max |logit difference| "
            f"{worst:.3g} > tolerance {TOLERANCE:g} (per batch size: {_fmt_parity(parity)}). Nothing "
            f"was written to {path}. Try the other format, or report the backbone to transferkit."
        )
    return data, method, parity


def sample_inputs(input_size: Sequence[int], seed: int = 0) -> list[torch.Tensor]:
    """Seeded standard-normal batches (the scale of normalised images) at each of PARITY_BATCHES."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *input_size, generator=gen) for n in PARITY_BATCHES]


def max_abs_diffs(model: nn.Module, run: Callable[[torch.Tensor], np.ndarray], samples: Sequence[torch.Tensor]) -> dict[int, float]:
    """Max |exported - PyTorch| logit difference per sample batch, keyed by batch size."""
    diffs = {}
    with torch.no_grad():
        for x in samples:
            ours = run(x)
            reference = model(x).numpy()
            if ours.shape != reference.shape:
                raise ExportError(
                    f"The export returned shape {ours.shape} for a batch of {len(x)}; PyTorch returns "
                    f"{reference.shape}. The batch axis is not dynamic; nothing was written."
                )
            diffs[len(x)] = float(np.abs(ours - reference).max())
    return diffs


def _fmt_parity(parity: dict[int, float]) -> str:
    return ", ".join(f"batch {n}: {d:.3g}" for n, d in parity.items())


# --------------------------------------------------------------------------- ONNX


def require_onnx() -> None:
    missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(
            f"ONNX export and inference need {', '.join(ONNX_PACKAGES)}; missing: {', '.join(missing)}. "
            "Install them with: pip install 'transferkit[export]'"
        )


def onnx_model(model: nn.Module, example: torch.Tensor):
    """The `onnx.ModelProto` of `model` from torch's dynamo exporter, with a dynamic batch axis."""
    require_onnx()
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    except Exception as e:  # torch.export / onnxscript raise many types; all mean "cannot export this model"
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.onnx.export cannot export {type(model).__name__}: {first}. Try --format torchscript.") from e
    if program is None:  # only the legacy exporter (dynamo=False) returns None
        raise ExportError(f"torch.onnx.export returned no ONNX program for {type(model).__name__}. Try --format torchscript.")
    return program.model_proto


def onnx_bytes(model: nn.Module, example: torch.Tensor, preprocess: dict) -> tuple[bytes, str]:
    """The serialised ONNX model with the preprocessing JSON in its metadata_props."""
    proto = onnx_model(model, example)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(preprocess)
    try:
        data = proto.SerializeToString()
    except ValueError as e:  # protobuf refuses messages over 2 GiB
        raise ExportError(
            f"The ONNX model is too large for one file ({e}); ONNX external data is not supported yet. Use --format torchscript."
        ) from e
    return data, f"torch.onnx.export (dynamo, opset {OPSET})"


def onnx_session(model: bytes | str | Path, providers: Sequence = ("CPUExecutionProvider",)):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: onnxruntime's warnings are not actionable for users
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=list(providers))


def onnx_runner(data: bytes) -> Callable[[torch.Tensor], np.ndarray]:
    session = onnx_session(data)
    return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]


# --------------------------------------------------------------------------- TorchScript


def torchscript_bytes(model: nn.Module, example: torch.Tensor, preprocess: dict) -> tuple[bytes, str]:
    """`torch.jit.script` (keeps every shape dynamic), else `torch.jit.trace`; parity then checks batch sizes."""
    buf = io.BytesIO()
    with _quiet_jit_deprecation():
        try:
            module, method = torch.jit.script(model), "torch.jit.script"
        except Exception:  # a model timm cannot script is traced instead
            try:
                with torch.no_grad():
                    module, method = torch.jit.trace(model, (example,), check_trace=False), "torch.jit.trace"
            except Exception as e:
                raise ExportError(
                    f"TorchScript can neither script nor trace {type(model).__name__}: {str(e).strip()[:300]}. Try --format onnx."
                ) from e
        torch.jit.save(module, buf, _extra_files={f"{METADATA_KEY}.json": json.dumps(preprocess)})
    return buf.getvalue(), method


def torchscript_runner(data: bytes) -> Callable[[torch.Tensor], np.ndarray]:
    with _quiet_jit_deprecation():
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    return lambda x: module(x).numpy()


@contextlib.contextmanager
def _quiet_jit_deprecation():
    """torch marks torch.jit deprecated (FutureWarning); the user asked for TorchScript, so it is noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        yield


# --------------------------------------------------------------------------- inference


class OnnxClassifier:
    """Classify images with an exported ONNX model, preprocessed exactly as transferkit does (the inputs of
    :meth:`transferkit.ImageClassifier.predict`).

    Args:
        path: a ``.onnx`` file written by :func:`export_run` (``transferkit export``).
        device: ``auto`` (CUDA where onnxruntime has it, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Example:
        >>> clf = OnnxClassifier.load("runs/plants/model.onnx")   # doctest: +SKIP
        >>> clf.predict(["photo.jpg"]), clf.classes_
        (['rose'], ['daisy', 'rose'])
    """

    # set by `load` (fitted state ends in _)
    session_: Any  # onnxruntime.InferenceSession
    preprocess_: dict  # the preprocessing record written at export: classes, data_config, ...
    classes_: list[str]
    data_config_: dict
    transform_: Callable[[Image.Image], torch.Tensor]  # a decoded RGB image -> the model's input tensor

    def __init__(self, path: str | Path, *, device: str = "auto"):
        self.path = path
        self.device = device

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto") -> OnnxClassifier:
        """Open the model and read its preprocessing (embedded metadata, else the ``.json`` beside it)."""
        clf = cls(path, device=device)
        require_onnx()
        if not Path(path).is_file():
            raise ExportError(f"{path} is not a file. Write one with: transferkit export RUN --format onnx")
        providers = onnx_providers(device)
        try:
            clf.session_ = onnx_session(path, providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ExportError(f"onnxruntime cannot load {path}: {str(e).strip()[:300]}. Export it again.") from e
        clf.preprocess_ = read_onnx_preprocess(Path(path), clf.session_)
        clf.classes_ = list(clf.preprocess_["classes"])
        clf.data_config_ = {k: tuple(v) if isinstance(v, list) else v for k, v in clf.preprocess_["data_config"].items()}
        from transferkit.data.images import make_transform

        clf.transform_ = make_transform(clf.data_config_)  # a decoded RGB image -> the model's input tensor
        return clf

    def decision_function(self, images, batch_size: int = 64) -> np.ndarray:
        """Raw logits, one row per image: what :meth:`transferkit.ImageClassifier.predict` takes (paths, a folder,
        PIL images, HWC uint8 arrays), decoded the same way (transparency composited onto white)."""
        from transferkit.data.images import as_image_set

        examples = as_image_set(images, self.classes_)
        logits = []
        for start in range(0, len(examples), batch_size):
            chunk = range(start, min(start + batch_size, len(examples)))
            logits.append(self.logits(torch.stack([self.transform_(examples.load(i)) for i in chunk])))
        return np.concatenate(logits) if logits else np.zeros((0, len(self.classes_)), np.float32)

    def logits(self, x: torch.Tensor) -> np.ndarray:
        """The model's logits for a batch of preprocessed inputs (N, C, H, W)."""
        return self.session_.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]

    def predict_proba(self, images, batch_size: int = 64) -> np.ndarray:
        """Class probabilities, one row per image (columns follow `classes_`)."""
        from scipy.special import softmax

        return softmax(self.decision_function(images, batch_size), axis=1)

    def predict(self, images) -> list[str]:
        """Predicted class names."""
        return [self.classes_[i] for i in self.decision_function(images).argmax(1)]


def onnx_providers(device: str) -> list:
    """onnxruntime execution providers for a transferkit device name."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device in ("auto", "cpu"):
        wanted = ["CUDAExecutionProvider"] if device == "auto" else []
        return [p for p in wanted if p in available] + ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        index = device.partition(":")[2] or "0"
        return [("CUDAExecutionProvider", {"device_id": int(index)}), "CPUExecutionProvider"]
    raise UsageError(
        f"device '{device}' is not available to onnxruntime (it has: {', '.join(available)}). "
        "Use --device cpu or auto, or install onnxruntime-gpu for CUDA."
    )


def read_onnx_preprocess(path: Path, session) -> dict:
    """The preprocessing an export carries: its metadata_props entry, else ``<file>.json`` beside it."""
    embedded = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    sidecar = path.with_name(path.name + ".json")
    try:
        info = json.loads(embedded) if embedded else json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ExportError(
            f"{path} carries no transferkit preprocessing and {sidecar} is missing, so its input "
            "size, normalisation and class names are unknown. Export it with: transferkit export RUN "
            "--format onnx"
        ) from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"Cannot read the preprocessing of {path}: {e}. Export it again.") from e
    if not isinstance(info, dict) or not isinstance(info.get("classes"), list) or not isinstance(info.get("data_config"), dict):
        raise ExportError(f"The preprocessing of {path} lacks 'classes' or 'data_config'. Export it again.")
    return info
