"""`transferkit predict` and `transferkit evaluate`: a trained run (or its ONNX export) on new inputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from transferkit.cli.common import (
    Device,
    Engine,
    Json,
    LabelColumn,
    Precision,
    TextColumn,
    app,
    given,
    handles_errors,
)
from transferkit.cli.render import (
    err,
    out,
    shown_path,
    wrapping_table,
)
from transferkit.errors import UsageError


@app.command()
@handles_errors
def predict(
    run: Annotated[Path, typer.Argument(help="A run directory written by fit, or a .onnx file written by export.")],
    inputs: Annotated[
        list[str] | None, typer.Argument(help="Image files (or folders) to classify; for a text run, the texts themselves.")
    ] = None,
    lines_file: Annotated[
        Path | None,
        typer.Option(
            "--file", help="A UTF-8 file with one input per line (texts for a text run, image paths otherwise); blank lines skipped."
        ),
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, help="How many classes to show per input.")] = 1,
    as_json: Json = False,
    device: Device = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="auto (default: bf16 where the CPU or GPU has it), bf16, fp16 or "
            "fp32; fp32 gives the ONNX export's probabilities within 1e-4."
        ),
    ] = None,
    engine: Engine = None,
) -> None:
    """Classify image files, or texts with a text run; prints labels and probabilities."""
    from transferkit.data.images import check_image
    from transferkit.errors import DataError
    from transferkit.stats.metrics import top_predictions

    items = list(inputs or []) + read_lines(lines_file)
    if not items:
        raise UsageError("Nothing to predict: give inputs after the run directory, or --file LINES.txt.")
    clf = load_model(run, device, precision, engine)
    key = "text" if getattr(clf, "modality", "image") == "text" else "file"
    if key == "file":
        files = expand_folders(items)
        bad = [(f, why) for f in files if (why := check_image(f))]
        if bad and all(why == "missing" for _, why in bad) and len(bad) == len(files):
            raise UsageError(
                f"{run} classifies images, and none of the inputs is a file ({items[0]}, ...). Give image files, or a text run for texts."
            )
        if bad:
            raise DataError(f"Cannot read {len(bad)} file(s): " + ", ".join(f"{f} ({why})" for f, why in bad[:5]))
        items = [str(f) for f in files]
    rows = top_predictions(items, clf.predict_proba(items), clf.classes_, top_k, key)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = wrapping_table(key, "label", "probability", *(["other classes"] if top_k > 1 else []))
    for r in rows:
        first, rest = r["predictions"][0], r["predictions"][1:]
        extra = [", ".join(f"{p['label']} {p['probability']:.3f}" for p in rest)] if top_k > 1 else []
        table.add_row(shown_path(r[key]) if key == "file" else r[key], first["label"], f"{first['probability']:.3f}", *extra)
    out.print(table)


def expand_folders(items: list[str]) -> list[Path]:
    """Paths with each folder replaced by its image files (recursively, sorted), as Python's predict reads a folder."""
    from transferkit.data.images import IMAGE_EXTENSIONS, image_files
    from transferkit.errors import DataError

    files: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if not path.is_dir():
            files.append(path)
            continue
        found = image_files(path)
        if not found:
            raise DataError(f"Folder {path} holds no image files ({', '.join(IMAGE_EXTENSIONS)}). Give a folder of images or image files.")
        files.extend(found)
    return files


def load_model(run: Path, device: str | None, precision: str | None = None, engine: str | None = None):
    """A run directory's classifier, or an exported ONNX model's."""
    if run.is_file() and run.suffix != ".onnx":
        raise UsageError(
            f"{run} is a file, and predict takes a run directory or an ONNX export (.onnx). A TorchScript "
            "export loads with torch.jit.load; predict with its run directory instead."
        )
    if run.suffix == ".onnx" and run.is_file():
        from transferkit.export.onnx import OnnxClassifier

        return OnnxClassifier.load(run, device=device or "auto")
    from transferkit.classifier import load_classifier

    return load_classifier(run, progress=False, **given(device=device, precision=precision, engine=engine))


def read_lines(path: Path | None) -> list[str]:
    """Non-blank lines of a UTF-8 file, stripped; none without a file."""
    from transferkit.errors import DataError

    if path is None:
        return []
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"Cannot read --file {path}: {e}. Give a UTF-8 text file with one input per line.") from e


@app.command()
@handles_errors
def evaluate(
    run: Annotated[Path, typer.Argument(help="A run directory written by fit.")],
    data: Annotated[
        str,
        typer.Argument(
            help="Labelled data (folder, CSV, digits, dataset name; a text file for a "
            "text run); a folder with a test/ subfolder is read from there."
        ),
    ],
    text_column: TextColumn = None,
    label_column: LabelColumn = None,
    as_json: Json = False,
    device: Device = None,
    precision: Precision = None,
    engine: Engine = None,
) -> None:
    """Measure a trained run on labelled data: accuracy, macro-F1, top-5 (with more than 5 classes), per-class scores."""
    from transferkit.classifier import load_classifier
    from transferkit.data.sources import load_eval
    from transferkit.stats.metrics import metrics, top_k_clause

    clf = load_classifier(
        run, progress=False, **given(device=device, precision=precision, engine=engine, text_column=text_column, label_column=label_column)
    )
    examples, summary = load_eval(data, clf.classes_, modality=clf.modality, **given(text_column=text_column, label_column=label_column))
    if summary.line():
        err.print(f"[yellow]{summary.line()}[/]", highlight=False)
    result = metrics(clf.decision_function(examples), examples.labels, clf.classes_)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    from transferkit.report.comparison import scores_sentence

    top_k = top_k_clause(result, len(clf.classes_))
    out.print(f"{summary.source}: {scores_sentence(result, clf.modality + 's')}{top_k}", highlight=False)
    table = Table("class", "precision", "recall", "f1", "support")
    for name, m in result["per_class"].items():
        table.add_row(name, *("-" if m[k] is None else f"{m[k]:.3f}" for k in ("precision", "recall", "f1")), str(m["support"]))
    out.print(table)
    if result["absent_classes"]:
        out.print(f"Not in the evaluated data (shown as -, left out of macro-F1): {', '.join(result['absent_classes'])}")
