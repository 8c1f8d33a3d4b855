"""What the server runs: a run directory's classifier or an ONNX export, in two steps.

`prepare` turns one request's inputs (decoded RGB images, or texts) into model
inputs, in the request's own thread; `infer` runs a batch of prepared inputs
from any number of requests, on the one inference thread. Both steps are the
very code `transferkit predict` runs: the backbone's own `dataset` (timm's
eval transform, or the text items) and `collate`, then `inference.predict_logits`
on the device and precision `decision_function` resolves, then the same softmax;
for an ONNX file, `OnnxClassifier.transform_` and `OnnxClassifier.logits`. A batch
equal to predict's (the same inputs, in order, up to 64) gives equal probabilities.

Calibration needs nothing here: a calibrated run has its temperature folded into
the head's weights, so the logits are already the calibrated ones.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.special import softmax

from transferkit.errors import UsageError

log = logging.getLogger(__name__)


class Predictor:
    """A loaded model behind the two steps; `modality`, `classes` and `info()` describe it."""

    modality: str = "image"
    classes: list[str]

    def prepare(self, inputs: Sequence) -> list:
        raise NotImplementedError

    def infer(self, items: list) -> np.ndarray:
        """Class probabilities (float32), one row per prepared item, columns in the order of `classes`."""
        raise NotImplementedError

    def info(self) -> dict:
        raise NotImplementedError


class RunPredictor(Predictor):
    """A run directory's fitted ImageClassifier or TextClassifier, computed as its `predict_proba` computes."""

    def __init__(self, run: Path, device: str | None = None, precision: str | None = None):
        from transferkit.classifier import load_classifier
        from transferkit.inference.extraction import resolve_device, resolve_precision

        settings = {k: v for k, v in (("device", device), ("precision", precision)) if v is not None}
        self.clf = load_classifier(run, progress=False, **settings)
        self.source, self.modality, self.classes = Path(run), self.clf.modality, list(self.clf.classes_)
        self.device = resolve_device(self.clf.device or "auto")
        self.dtype = resolve_precision(self.clf.precision or "auto", self.device)
        model = self.clf.model_.to(self.device)
        if self.dtype is not None:  # as decision_function does
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        self.collate = self.clf.backbone_.collate or torch.utils.data.default_collate

    def prepare(self, inputs: Sequence) -> list:
        from transferkit.data.images import as_image_set
        from transferkit.data.texts import as_text_set

        examples = {"image": as_image_set, "text": as_text_set}[self.modality](list(inputs), self.classes)
        dataset = self.clf.backbone_.dataset(examples)
        return [dataset[i] for i in range(len(dataset))]

    def infer(self, items: list) -> np.ndarray:
        from transferkit.inference.extraction import predict_logits

        logits, _ = predict_logits(self.model, [self.collate(items)], self.device, self.dtype)
        return softmax(logits, axis=1)

    def info(self) -> dict:
        meta = self.clf.meta_
        return {
            "source": str(self.source),
            "format": "run",
            "modality": self.modality,
            "classes": self.classes,
            "backbone": meta.backbone,
            "strategy": meta.strategy.spec,
            "preprocessing": meta.data_config,
            "metrics": metrics_summary(meta.metrics),
            "calibration": meta.calibration,
            "versions": meta.versions or {},
            "inference": {"engine": "torch", "device": str(self.device), "precision": precision_name(self.dtype)},
        }


class OnnxPredictor(Predictor):
    """An ONNX export, computed as `transferkit predict MODEL.onnx` computes it (onnxruntime, fp32)."""

    def __init__(self, path: Path, device: str | None = None):
        from transferkit.export.onnx import OnnxClassifier

        self.clf = OnnxClassifier.load(path, device=device or "auto")
        self.source, self.classes = Path(path), list(self.clf.classes_)

    def prepare(self, inputs: Sequence) -> list:
        return [self.clf.transform_(image) for image in inputs]

    def infer(self, items: list) -> np.ndarray:
        return softmax(self.clf.logits(torch.stack(items)), axis=1)

    def info(self) -> dict:
        from transferkit.runs.directory import read_meta_or_none

        pre = self.clf.preprocess_
        run = read_meta_or_none(self.source.parent)  # an export inside its run directory: the run's metrics
        return {
            "source": str(self.source),
            "format": "onnx",
            "modality": "image",
            "classes": self.classes,
            "backbone": pre.get("backbone"),
            "strategy": run.strategy.spec if run else None,
            "preprocessing": pre["data_config"],
            "metrics": metrics_summary(run.metrics if run else {}),
            "calibration": run.calibration if run else None,
            "versions": pre.get("versions", {}),
            "inference": {"engine": "onnxruntime", "providers": self.clf.session_.get_providers(), "precision": "fp32"},
        }


def load_predictor(source: str | Path, device: str | None = None, precision: str | None = None) -> Predictor:
    """The predictor of a run directory, or of a ``.onnx`` file written by ``transferkit export``.

    Raises:
        UsageError: `source` is another kind of file, or `precision` is given for an ONNX file (always fp32).
        RunError, ExportError: the run or the export cannot be loaded (the messages say why).
    """
    source = Path(source)
    if source.suffix == ".onnx" and source.is_file():
        if precision not in (None, "auto", "fp32"):
            raise UsageError(f"An ONNX export computes in fp32; --precision {precision} applies to run directories.")
        return OnnxPredictor(source, device)
    if source.is_file():
        raise UsageError(f"{source} is a file, and serve takes a run directory or an ONNX export (.onnx).")
    return RunPredictor(source, device, precision)


def metrics_summary(metrics: dict) -> dict:
    """The headline numbers of a run's metrics: the test scalars (accuracy, macro-F1, top-5, n), val accuracy."""
    test = {k: v for k, v in metrics.get("test", {}).items() if k not in ("per_class", "confusion", "absent_classes")}
    return {"test": test, **{k: metrics[k] for k in ("val_accuracy", "split_sizes") if k in metrics}}


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
