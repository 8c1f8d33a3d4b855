"""int8 ONNX: ONNX Runtime static quantization, calibrated on the run's validation images, checked on its test images.

The fp32 ONNX model (``RUN/model.onnx``, exported and parity-checked first when it
is not there) is quantized by ONNX Runtime's ``quantize_static`` in the QDQ format
with unsigned 8-bit activations, signed 8-bit per-channel weights and MinMax
calibration: the settings ONNX Runtime recommends for x86 CPUs with VNNI (and the
best of those tried on digits, see the README). Before anything is written, both
models classify the run's test split and run the same batch in alternating rounds
in this process, so the accuracy change and the speed ratio are measured, not
assumed. An int8 model that loses more than ``MAX_DROP_POINTS`` points of test
accuracy is refused unless ``force``: calibration on images unlike the test
images (or a model that does not survive 8 bits) shows up here, not in production.

The int8 file carries the same preprocessing and classes as the fp32 export
(``metadata_props`` and ``<file>.json``), so ``transferkit predict RUN/model.int8.onnx``
and :class:`transferkit.export.onnx.OnnxClassifier` run it with the same preprocessing.

Example:
    >>> r = quantize_run("runs/plants")        # doctest: +SKIP
    >>> r.int8_accuracy - r.fp32_accuracy, r.speed_ratio
    (0.0, 1.8)
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.atomic import write_atomic, write_json
from transferkit.errors import ExportError, TransferkitError, UsageError
from transferkit.export.onnx import (
    FORMATS,
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAME,
    export_model,
    onnx_session,
    preprocess_info,
    require_onnx,
)
from transferkit.runs.directory import load_run
from transferkit.runs.meta import RunMeta

INT8_FILE = "model.int8.onnx"
MAX_DROP_POINTS = 1.0  # largest accepted loss of test accuracy, in percentage points, without force
MAX_CALIBRATION = 1000  # images fed to calibration at most (evenly spaced over the validation split)
BATCH = 32  # images per batch for calibration, accuracy and timing
TIMING_ROUNDS = 7  # alternating fp32 / int8 runs of one batch; the median of each is compared
METHOD = "onnxruntime quantize_static (QDQ, uint8 activations, int8 per-channel weights, MinMax calibration)"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Int8Result:
    """What the int8 export wrote, and how it compares with the fp32 ONNX model on the run's test split."""

    path: Path | None  # None: refused and not written
    fp32_path: Path
    fp32_accuracy: float
    int8_accuracy: float
    n_test: int
    calibration: str  # what calibrated, in words
    fp32_ms: float  # per image, median over TIMING_ROUNDS runs of one batch
    int8_ms: float
    timing_batch: int
    method: str
    forced: bool
    seconds: float

    @property
    def drop_points(self) -> float:
        """Test accuracy lost by int8, in percentage points (negative: int8 was more accurate)."""
        return 100.0 * (self.fp32_accuracy - self.int8_accuracy)

    @property
    def speed_ratio(self) -> float:
        """fp32 time / int8 time for the same batch (above 1: int8 is faster)."""
        return self.fp32_ms / self.int8_ms

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "calibration": self.calibration,
            "test_n": self.n_test,
            "fp32_test_accuracy": self.fp32_accuracy,
            "int8_test_accuracy": self.int8_accuracy,
            "drop_points": round(self.drop_points, 4),
            "fp32_ms_per_image": round(self.fp32_ms, 4),
            "int8_ms_per_image": round(self.int8_ms, 4),
            "speed_ratio": round(self.speed_ratio, 3),
            "timing_batch": self.timing_batch,
            "forced": self.forced,
        }


def quantize_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    calibration: str | Path | None = None,
    force: bool = False,
    max_drop_points: float = MAX_DROP_POINTS,
) -> Int8Result:
    """Write an int8 ONNX model of a run, calibrated and checked as the module doc says.

    Args:
        run_dir: a run directory written by ``fit``.
        out: the .onnx file to write; None (or a folder) takes ``model.int8.onnx`` in it (or in the run).
        calibration: labelled images (a folder, CSV, dataset name) to calibrate on instead of the run's
            validation split; the run's test split still measures the result.
        force: write the model although it loses more than `max_drop_points` of test accuracy.
        max_drop_points: the accepted loss of test accuracy in percentage points.

    Raises:
        UsageError: a text run, or an `out` that is not an .onnx file.
        ExportError: the run's data cannot be read again, the export fails, or (without force) int8 loses
            more than `max_drop_points` points of test accuracy; nothing is written then.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    path = _output_path(run_dir, out)
    run = load_run(run_dir)
    refusal = run.backbone.export_refusal()
    if refusal:
        raise UsageError(refusal.replace("RUN", str(run_dir)))
    require_onnx()
    splits = run_splits(run.meta)
    calibrate, what = _calibration_examples(run.meta, splits.val, calibration)
    fp32_path, fp32 = fp32_onnx(run, run_dir)
    transform = _transform(run.meta)
    int8 = quantize_bytes(fp32, _batches(calibrate, transform))
    fp32_session, int8_session = onnx_session(fp32), onnx_session(int8)
    acc32, acc8 = accuracies((fp32_session, int8_session), splits.test, transform)
    batch = next(_batches(splits.test, transform))
    ms32, ms8 = timings((fp32_session, int8_session), batch)
    result = Int8Result(
        path, fp32_path, acc32, acc8, len(splits.test), what, ms32, ms8, len(batch), METHOD, force, time.perf_counter() - started
    )
    if result.drop_points > max_drop_points and not force:
        raise ExportError(
            f"int8 loses {result.drop_points:.1f} points of test accuracy ({acc32:.2%} fp32 -> {acc8:.2%} "
            f"int8, n = {len(splits.test)}; calibrated on {what}), more than {max_drop_points:g}. Nothing "
            f"was written to {path}. Use the fp32 {fp32_path.name}, calibrate on images like the test "
            "images (--calibration DATA), or write it anyway with --force."
        )
    _write_int8(path, int8, run.meta, result)
    return result


def _output_path(run_dir: Path, out: str | Path | None) -> Path:
    if out is None or Path(out).is_dir():
        return Path(out or run_dir) / INT8_FILE
    if Path(out).suffix != ".onnx":
        raise UsageError(
            f"out '{out}' does not fit an int8 ONNX export: ONNX files end in .onnx. Use e.g. {Path(out).with_suffix('.onnx')}."
        )
    return Path(out)


def run_splits(meta: RunMeta):
    """The run's train/val/test split, read again from its data source with its seed, checked against its sizes."""
    from transferkit.data.sources import load_image_data

    source = meta.data.get("source")
    recorded = meta.metrics.get("split_sizes")
    fix = "Run the export where the run's data is, at the same path and with the same files"
    try:
        if not isinstance(source, str):
            raise TypeError(f"the run records no data source ({source!r})")
        splits = load_image_data(source, seed=int(meta.training.get("seed") or 0))
    except (TransferkitError, TypeError) as e:
        raise ExportError(
            f"int8 needs the run's validation and test images, and its data source {source!r} cannot be read again ({str(e)[:200]}). {fix}."
        ) from e
    if (recorded and splits.sizes() != recorded) or list(splits.classes) != list(meta.classes):
        raise ExportError(
            f"The run's data {source} no longer gives its split ({splits.sizes()} now, {recorded} when "
            f"fitted; classes {len(splits.classes)} vs {len(meta.classes)}), so its test images are "
            f"unknown (a fit with --split is not read again either). {fix}."
        )
    return splits


def _calibration_examples(meta: RunMeta, val, calibration: str | Path | None):
    """The images to calibrate on (at most MAX_CALIBRATION, evenly spaced) and a phrase naming them."""
    if calibration is None:
        examples, what = val, f"the run's {len(val)} validation images"
    else:
        from transferkit.data.sources import load_eval_images

        examples, _ = load_eval_images(calibration, list(meta.classes))
        what = f"{len(examples)} images of {calibration}"
    if len(examples) == 0:
        raise ExportError(f"There are no images to calibrate on ({what}). Give --calibration DATA with images.")
    if len(examples) > MAX_CALIBRATION:
        examples = examples.subset(np.linspace(0, len(examples) - 1, MAX_CALIBRATION).round().astype(int))
        what += f" ({MAX_CALIBRATION} of them, evenly spaced)"
    return examples, what


def fp32_onnx(run, run_dir: Path) -> tuple[Path, bytes]:
    """RUN/model.onnx when it is this run's export (same classes, preprocessing, backbone), else exported now."""
    path = run_dir / FORMATS["onnx"]
    expected = preprocess_info(run.meta, "onnx")
    if path.is_file():
        session = onnx_session(path)
        embedded = json.loads(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY) or "{}")
        if all(embedded.get(k) == expected[k] for k in ("classes", "data_config", "backbone")):
            return path, path.read_bytes()
        log.info("%s belongs to another model; exporting the run again.", path)
    export_model(run.model, expected, "onnx", path)
    return path, path.read_bytes()


def _transform(meta: RunMeta):
    from transferkit.data.images import make_transform

    return make_transform({k: tuple(v) if isinstance(v, list) else v for k, v in meta.data_config.items()})


def _batches(examples, transform, size: int = BATCH):
    """Preprocessed float32 NCHW batches of `examples`, in order, decoded one batch at a time."""
    for start in range(0, len(examples), size):
        yield np.stack([transform(examples.load(i)).numpy() for i in range(start, min(start + size, len(examples)))])


def quantize_bytes(fp32: bytes, calibration_batches) -> bytes:
    """The int8 QDQ model of an fp32 ONNX model, calibrated on the given batches (ONNX Runtime)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration_batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    with tempfile.TemporaryDirectory() as tmp:
        source, prepared, target = Path(tmp) / "fp32.onnx", Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(fp32)
        try:
            quant_pre_process(str(source), str(prepared))  # shape inference and graph fusions, as ORT advises
            quantize_static(
                str(prepared),
                str(target),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        except Exception as e:  # onnxruntime raises its own Fail types and ValueErrors
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ExportError(f"ONNX Runtime cannot quantize this model ({first}). Use the fp32 export.") from e
        return target.read_bytes()


def accuracies(sessions, examples, transform) -> tuple[float, ...]:
    """Test accuracy of each session on `examples`, on the same preprocessed batches."""
    hits, start = [0] * len(sessions), 0
    for batch in _batches(examples, transform):
        labels = examples.labels[start : start + len(batch)]
        for k, session in enumerate(sessions):
            hits[k] += int((session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0].argmax(1) == labels).sum())
        start += len(batch)
    return tuple(h / max(len(examples), 1) for h in hits)


def timings(sessions, batch: np.ndarray, rounds: int = TIMING_ROUNDS) -> tuple[float, ...]:
    """Milliseconds per image of each session on `batch`: one warm-up, then alternating rounds, the medians."""
    times: list[list[float]] = [[] for _ in sessions]
    for session in sessions:
        session.run([OUTPUT_NAME], {INPUT_NAME: batch})
    for _ in range(rounds):
        for k, session in enumerate(sessions):
            started = time.perf_counter()
            session.run([OUTPUT_NAME], {INPUT_NAME: batch})
            times[k].append(time.perf_counter() - started)
    return tuple(1000.0 * float(np.median(t)) / len(batch) for t in times)


def _write_int8(path: Path, int8: bytes, meta: RunMeta, result: Int8Result) -> None:
    """The int8 model with the run's preprocessing (embedded and beside it) and its measured comparison."""
    import onnx

    info = {**preprocess_info(meta, "onnx"), "quantization": result.to_dict()}
    model = onnx.load_from_string(int8)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != METADATA_KEY]  # the fp32 entry is replaced
    del model.metadata_props[:]
    for key, value in [*kept, (METADATA_KEY, json.dumps(info))]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    write_atomic(path, model.SerializeToString())
    write_json(path.with_name(path.name + ".json"), info)
