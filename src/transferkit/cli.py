"""The command line: parse arguments, call the library, render the result with rich.

One function per subcommand; its signature is the CLI spec. Computation lives
in the library; this module converts options at the boundary and renders.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from transferkit.errors import TransferkitError, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Adapt a pretrained model to your labelled images or texts: transfer learning (feature "
                       "extraction), fine-tuning or LoRA, measured on your data.")
# Pipes and CI logs get a wide fixed width so tables are not squeezed into 80 columns.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)


def handles_errors(fn):
    """Turn transferkit's own errors into a clear message and exit status (2 = usage, 1 = other)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TransferkitError as e:
            err.print(f"[bold red]Error:[/] {escape(str(e))}", highlight=False)  # a message may hold [brackets]
            raise typer.Exit(e.exit_code) from e
        except KeyboardInterrupt:
            err.print("[yellow]Interrupted.[/]")
            raise typer.Exit(130) from None
    return wrapper


def parse_split(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError as e:
        raise typer.BadParameter(f"'{text}' is not three comma-separated fractions, e.g. 0.7,0.15,0.15") from e


Model = Annotated[str | None, typer.Option("--model", "-m", help="Images: built-in efficientnet_lite0 (offline, the default) or "
                                           "any timm model. Texts: built-in minilm (offline, the default), a hub name or "
                                           "a save_pretrained folder.")]
TextColumn = Annotated[str | None, typer.Option(help="Text data: the column holding the text (default 'text').")]
LabelColumn = Annotated[str | None, typer.Option(help="Text data: the column holding the label (default 'label').")]
MaxLength = Annotated[int | None, typer.Option(min=2, help="Text models: tokens per text (default 128); longer "
                                                            "texts are truncated.")]
Seed = Annotated[int, typer.Option(help="Random seed for the split, initialisation and data order.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Precision = Annotated[str, typer.Option(help="auto (bf16 where the hardware has it), bf16, fp16 or fp32.")]
CacheBudget = Annotated[float, typer.Option(min=0.0, help="GB of disk the outputs of frozen blocks may take: with "
                                            "augmentation off, finetune:last=N computes the frozen blocks once into "
                                            "the cache and trains only the rest (refused, with a message, over this "
                                            "budget; 0 turns it off).")]
Log = Annotated[str | None, typer.Option(
    metavar="tensorboard|mlflow", help="Also log settings, per-epoch metrics, results and the report to 'tensorboard' or "
                                       "'mlflow' (off by default; needs: pip install \"transferkit\\[log]\").")]
LogTo = Annotated[str | None, typer.Option(
    metavar="DIR|URI", help="Where --log writes: a TensorBoard root folder (default OUT/tensorboard), or an MLflow "
                            "tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///OUT/mlflow.db).")]


@app.command()
@handles_errors
def fit(
    data: Annotated[str, typer.Argument(help="Image folder (one subfolder per class; train/ val/ test/ used if "
                                             "present), a CSV of path,label, 'digits', a torchvision name (cifar10), "
                                             "or labelled texts: a CSV/TSV/JSONL with text and label columns.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")] = Path("runs/latest"),
    model: Model = None,
    strategy: Annotated[str, typer.Option("--strategy", "-s", help="auto (measures, chooses and says why), "
                                          "feature-extraction (frozen backbone, head on cached features), "
                                          "finetune:last=N, finetune:all, lp-ft, gradual or lora.")] = "auto",
    text_column: TextColumn = None,
    label_column: LabelColumn = None,
    max_length: MaxLength = None,
    pooling: Annotated[str, typer.Option(help="Text models: auto (the model's own), mean or cls.")] = "auto",
    weights: Annotated[str | None, typer.Option(help="Local .safetensors/.pth weights, or 'none' for random init.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Fine-tuning epochs (image phases).")] = None,
    head_epochs: Annotated[int | None, typer.Option(min=1, help="Epochs of the head on cached features.")] = None,
    lr: Annotated[float | None, typer.Option(min=0.0, help="Head learning rate (backbone blocks get less).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Fine-tuning batch size (under torchrun: the global batch, "
                                                        "split evenly over the processes).")] = 32,
    image_size: Annotated[int | None, typer.Option(min=16, help="Input size in pixels (default: the backbone's).")] = None,
    split: Annotated[str, typer.Option(help="train,val,test fractions when the data gives no split.")] = "0.7,0.15,0.15",
    seed: Seed = 0,
    device: Device = "auto",
    precision: Precision = "auto",
    bn: Annotated[str, typer.Option(help="BatchNorm while fine-tuning: all-frozen (every BN layer keeps its stored "
                                         "statistics) or frozen-blocks (trainable blocks update theirs).")] = "all-frozen",
    augment: Annotated[str, typer.Option(help="Training augmentation for fine-tuning: none, light or strong.")] = "none",
    optimizer: Annotated[str, typer.Option(help="adamw or sgd.")] = "adamw",
    label_smoothing: Annotated[float, typer.Option(min=0.0, max=0.5)] = 0.0,
    accumulate: Annotated[int, typer.Option(min=1, help="Gradient accumulation steps.")] = 1,
    patience: Annotated[int | None, typer.Option(min=1, help="Stop a phase after N epochs without a better "
                                                             "validation accuracy (best weights are kept anyway).")] = None,
    class_weights: Annotated[str | None, typer.Option(help="'auto': weight the loss by inverse class frequency.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted fit from OUT/checkpoints.")] = False,
    strict: Annotated[bool, typer.Option(help="Fail on unreadable images instead of skipping them.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the feature cache.")] = False,
    cache_budget: CacheBudget = 10.0,  # features.DEFAULT_CACHE_BUDGET_GB (not imported: --help stays fast)
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    log: Log = None,
    log_to: LogTo = None,
) -> None:
    """Train a classifier on DATA and write a run directory (model.safetensors, transferkit.json, metrics).

    A checkpoint is written to OUT/checkpoints after every epoch; an interrupted
    fit (Ctrl-C, a crash) continues exactly with the same command plus --resume.

    On several GPUs (or CPU processes), launch it with torchrun, e.g.
    torchrun --nproc_per_node 4 -m transferkit fit DATA --out OUT: PyTorch DDP,
    NCCL on GPUs and gloo on CPU; only rank 0 writes OUT. A checkpoint resumes at
    any number of processes.
    """
    from transferkit import distributed
    from transferkit.runs import check_writable_dir
    from transferkit.tracking import log_fit_report, open_run

    check_writable_dir(out_dir)  # before training, not after it
    common = dict(strategy=strategy, weights=weights, split=parse_split(split), strict=strict, cache=not no_cache,
                  progress=not quiet, checkpoint_dir=out_dir / "checkpoints", resume=resume, epochs=epochs,
                  head_epochs=head_epochs, lr=lr, batch_size=batch_size, seed=seed, device=device, precision=precision,
                  optimizer=optimizer, label_smoothing=label_smoothing, accumulate=accumulate, patience=patience,
                  class_weights=class_weights)
    with open_run(log, out=out_dir, run_name=f"{out_dir.name}-{strategy}", to=log_to) as tracker:
        if is_text_data(data, text_column, label_column):
            from transferkit.text import TextClassifier

            reject_image_options(image_size=image_size, augment=augment if augment != "none" else None,
                                 bn=bn if bn != "all-frozen" else None)
            clf = TextClassifier(model or "minilm", **text_options(text_column, label_column, max_length),
                                 pooling=pooling, tracker=tracker, **common)
        else:
            from transferkit.classifier import ImageClassifier

            reject_text_options(max_length=max_length, pooling=pooling if pooling != "auto" else None)
            clf = ImageClassifier(model or "efficientnet_lite0", image_size=image_size, bn=bn, augment=augment,
                                  cache_budget_gb=cache_budget, tracker=tracker, **common)
        try:
            clf.fit(data)
        except KeyboardInterrupt:
            again = " ".join(sys.argv[1:]) + ("" if resume else " --resume")
            err.print(f"[yellow]Interrupted.[/] Finished epochs are saved in {out_dir / 'checkpoints'}. "
                      f"Continue with:\n  transferkit {again}", highlight=False)
            raise typer.Exit(130) from None
        clf.save(out_dir)
        log_fit_report(tracker, clf, out_dir)
    if distributed.is_main():
        render_fit(clf, out_dir)


def is_text_data(data: str, text_column: str | None, label_column: str | None) -> bool:
    """Labelled texts: a column option was given, or the file is a TSV/JSONL or a CSV without a 'path' column."""
    from transferkit.text.data import is_text_file

    return text_column is not None or label_column is not None or is_text_file(data)


def text_options(text_column: str | None, label_column: str | None, max_length: int | None) -> dict:
    given = {"text_column": text_column, "label_column": label_column, "max_length": max_length}
    return {k: v for k, v in given.items() if v is not None}


def reject_image_options(**given) -> None:
    used = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
    if used:
        raise UsageError(f"{', '.join(used)} only apply to images, and this data is text. Leave them out.")


def reject_text_options(**given) -> None:
    used = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
    if used:
        raise UsageError(f"{', '.join(used)} only apply to text models, and this data is images (for labelled "
                         "texts give a CSV/TSV/JSONL with --text-column/--label-column).")


def render_fit(clf, out_dir: Path) -> None:
    summary = clf.data_summary_
    if summary.line():
        err.print(f"[yellow]{summary.line()}[/]", highlight=False)
    sizes = clf.metrics_["split_sizes"]
    out.print(f"Data: {sizes['train']} train / {sizes['val']} val / {sizes['test']} test {clf.noun}, "
              f"{len(clf.classes_)} classes")
    out.print(f"Backbone: {clf.backbone_.spec.name} ({clf.backbone_.load_report})")
    if clf.feature_cache_:
        out.print("Feature cache: " + ", ".join(f"{k} {v}" for k, v in clf.feature_cache_.items()))
    if clf.decision_:
        out.print(f"auto chose [bold]{clf.decision_.strategy.spec}[/]: {clf.decision_.reason}")
    test = clf.metrics_["test"]
    out.print(f"Strategy {clf.strategy_.spec}: test accuracy [bold]{test['accuracy']:.4f}[/], "
              f"macro-F1 {test['macro_f1']:.4f}, val accuracy {clf.metrics_['val_accuracy']:.4f}, "
              f"{clf.metrics_['train_seconds']:.1f} s")
    out.print(f"Run saved to {out_dir}. Predict with: transferkit predict {out_dir} "
              f"{'TEXT... or --file LINES.txt' if clf.noun == 'texts' else 'IMAGE...'}")


@app.command()
@handles_errors
def predict(
    run: Annotated[Path, typer.Argument(help="A run directory written by fit, or a .onnx file written by export.")],
    inputs: Annotated[list[str] | None, typer.Argument(help="Image files to classify; for a text run, the texts "
                                                             "themselves.")] = None,
    lines_file: Annotated[Path | None, typer.Option("--file", help="A UTF-8 file with one input per line (texts for a "
                                                                  "text run, image paths otherwise); blank lines skipped.")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="How many classes to show per input.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    device: Device = "auto",
) -> None:
    """Classify image files, or texts with a text run; prints labels and probabilities."""
    from transferkit.errors import DataError

    items = list(inputs or []) + read_lines(lines_file)
    if not items:
        raise UsageError("Nothing to predict: give inputs after the run directory, or --file LINES.txt.")
    key = "text" if run.is_dir() and run_modality(run) == "text" else "file"
    if key == "text":
        from transferkit.text import TextClassifier

        clf = TextClassifier.load(run, progress=False, device=device)
    else:
        from transferkit.data import check_image

        clf = load_image_model(run, device)
        items = [Path(f) for f in items]
        bad = [(f, r) for f in items if (r := check_image(f))]
        if bad:
            raise DataError(f"Cannot read {len(bad)} file(s): " + ", ".join(f"{f} ({r})" for f, r in bad[:5]))
    rows = predictions(items, clf.predict_proba(items), clf.classes_, top_k, key)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(key, "label", "probability", *(["other classes"] if top_k > 1 else []))
    for r in rows:
        first, rest = r["predictions"][0], r["predictions"][1:]
        extra = [", ".join(f"{p['label']} {p['probability']:.3f}" for p in rest)] if top_k > 1 else []
        table.add_row(r[key], first["label"], f"{first['probability']:.3f}", *extra)
    out.print(table)


def run_modality(run: Path) -> str:
    from transferkit.runs import run_modality as modality

    return modality(run)


def load_image_model(run: Path, device: str):
    if run.suffix == ".onnx" and run.is_file():
        from transferkit.export import OnnxClassifier

        return OnnxClassifier.load(run, device=device)
    from transferkit.classifier import ImageClassifier

    return ImageClassifier.load(run, progress=False, device=device)


def read_lines(path: Path | None) -> list[str]:
    """Non-blank lines of a UTF-8 file, stripped; none without a file."""
    from transferkit.errors import DataError

    if path is None:
        return []
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"Cannot read --file {path}: {e}. Give a UTF-8 text file with one input per line.") from e


def predictions(items: list, proba, classes: list[str], top_k: int, key: str = "file") -> list[dict]:
    """Top-k labels with probabilities per input (a file, or a text), as plain data."""
    rows = []
    for f, p in zip(items, proba):
        order = p.argsort()[::-1][:top_k]
        rows.append({key: str(f), "predictions": [{"label": classes[i], "probability": float(p[i])} for i in order]})
    return rows


@app.command()
@handles_errors
def evaluate(
    run: Annotated[Path, typer.Argument(help="A run directory written by fit.")],
    data: Annotated[str, typer.Argument(help="Labelled data (folder, CSV, digits, dataset name; a text file for a "
                                             "text run); all of it is used.")],
    text_column: TextColumn = None,
    label_column: LabelColumn = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    device: Device = "auto",
) -> None:
    """Measure a trained run on labelled data: accuracy, top-5, macro-F1, per-class scores."""
    from transferkit.evaluate import metrics

    if run.is_dir() and run_modality(run) == "text":
        from transferkit.text import TextClassifier
        from transferkit.text.data import load_eval_texts

        clf = TextClassifier.load(run, progress=False, device=device, **text_options(text_column, label_column, None))
        images, summary = load_eval_texts(data, clf.classes_, text_column=clf.text_column, label_column=clf.label_column)
    else:
        from transferkit.classifier import ImageClassifier
        from transferkit.data import load_eval_images

        clf = ImageClassifier.load(run, progress=False, device=device)
        images, summary = load_eval_images(data, clf.classes_)
    if summary.line():
        err.print(f"[yellow]{summary.line()}[/]", highlight=False)
    result = metrics(clf.decision_function(images), images.labels, clf.classes_)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    out.print(f"{result['n']} {clf.noun}: accuracy [bold]{result['accuracy']:.4f}[/], top-5 {result['top5_accuracy']:.4f}, "
              f"macro-F1 {result['macro_f1']:.4f}")
    table = Table("class", "precision", "recall", "f1", "support")
    for name, m in result["per_class"].items():
        table.add_row(name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    out.print(table)


@app.command()
@handles_errors
def models(filter: Annotated[str, typer.Argument(help="Wildcard filter, e.g. 'resnet*' or 'vit'.")] = "") -> None:
    """List built-in (offline) backbones and timm architectures matching FILTER."""
    from transferkit.backbones import BUILTIN_BACKBONES, list_models

    found = list_models(filter)
    out.print("[bold]Built-in (offline weights):[/]")
    for name in found["builtin"]:
        out.print(f"  {name}  {BUILTIN_BACKBONES[name].description}")
    names = found["timm"]
    out.print(f"[bold]timm architectures ({len(names)}; weights download from the hub):[/]")
    out.print("  " + "  ".join(names[:200]) + (" ..." if len(names) > 200 else ""), soft_wrap=False)


@app.command()
@handles_errors
def inspect(
    model: Annotated[str, typer.Argument(help="Backbone name (built-in or timm).")] = "efficientnet_lite0",
    weights: Annotated[str | None, typer.Option(help="Local weights file, or 'none' for random init.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a backbone's blocks in order with parameter counts, feature size and input config."""
    from transferkit.backbones import describe, load_backbone

    info = describe(load_backbone(model, weights=weights))
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    out.print(f"[bold]{info['name']}[/] (timm {info['arch']}, weights: {info['weights']}): "
              f"{info['total_params']:,} parameters, {info['feature_dim']} features")
    table = Table("#", "block", "parameters", "tensors")
    for b in info["blocks"]:
        table.add_row(str(b["index"]), b["name"], f"{b['params']:,}", str(b["tensors"]))
    table.add_row("", f"head ({info['head']['name']})", f"{info['head']['params']:,}", "")
    out.print(table)
    i = info["input"]
    out.print(f"Input: {i['size']}, mean {i['mean']}, std {i['std']}, {i['interpolation']}, crop {i['crop_pct']}")
    out.print("finetune:last=N trains the head plus the last N blocks above.")


@app.command()
@handles_errors
def compare(
    data: Annotated[str, typer.Argument(help="Labelled data as for fit; default: the built-in digits demo.")] = "digits",
    model: Model = None,
    strategies: Annotated[str, typer.Option(help="Comma-separated strategies to run on the same split.")] =
        "feature-extraction,finetune:last=2,finetune:all,lp-ft",
    fractions: Annotated[str | None, typer.Option(help="Training fractions per class for a learning curve, "
                                                       "e.g. 0.05,0.2,1.0.")] = None,
    baseline: Annotated[str | None, typer.Option(help="'scratch': also train the architecture from random "
                                                      "initialisation, to show what pretraining is worth.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where compare.json and the reports go.")] = Path("runs/compare"),
    epochs: Annotated[int | None, typer.Option(min=1, help="Fine-tuning epochs for every strategy.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Fine-tuning batch size.")] = 32,
    image_size: Annotated[int | None, typer.Option(min=16)] = None,
    text_column: TextColumn = None,
    label_column: LabelColumn = None,
    max_length: MaxLength = None,
    split: Annotated[str, typer.Option(help="train,val,test fractions when the data gives no split.")] = "0.7,0.15,0.15",
    seed: Seed = 0,
    device: Device = "auto",
    precision: Precision = "auto",
    cache_budget: CacheBudget = 10.0,  # features.DEFAULT_CACHE_BUDGET_GB (not imported: --help stays fast)
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    log: Log = None,
    log_to: LogTo = None,
) -> None:
    """Run strategies side by side on the same split: accuracy, time, trainable parameters, memory; name the winner."""
    from transferkit.compare import compare as run_compare
    from transferkit.distributed import refuse_torchrun
    from transferkit.report import write_comparison
    from transferkit.tracking import log_comparison, open_run

    refuse_torchrun("compare")
    fracs = [float(f) for f in fractions.split(",")] if fractions else []
    with open_run(log, out=out_dir, run_name=f"{out_dir.name}-compare", to=log_to) as tracker:
        settings = dict(epochs=epochs, batch_size=batch_size, seed=seed, device=device, precision=precision,
                        progress=not quiet)
        if is_text_data(data, text_column, label_column):
            from transferkit.text import load_text_data

            reject_image_options(image_size=image_size)
            columns = text_options(text_column, label_column, None)
            splits = load_text_data(data, split=parse_split(split), seed=seed, **columns)
            model, noun = model or "minilm", "texts"
            settings |= columns | text_options(None, None, max_length)
        else:
            from transferkit.data import load_data

            reject_text_options(max_length=max_length)
            splits = load_data(data, split=parse_split(split), seed=seed)
            model, noun = model or "efficientnet_lite0", "images"
            settings |= {"image_size": image_size, "cache_budget_gb": cache_budget}
        if splits.summary.line():
            err.print(f"[yellow]{splits.summary.line()}[/]", highlight=False)
        out.print(f"Comparing on {data}: {splits.sizes()} {noun}, {len(splits.classes)} classes, model {model}")

        def live(r):
            out.print(f"  {r.label}: test {r.test_accuracy:.4f} in {r.seconds:.1f} s")

        result = run_compare(splits, data_name=data, model=model, strategies=strategies.split(","), fractions=fracs,
                             baseline=baseline, settings=settings, on_result=live, tracker=tracker)
        paths = write_comparison(result, out_dir)
        log_comparison(tracker, result, paths)
    render_comparison(result)
    out.print(f"Reports: {paths['html']}, {paths['markdown']}, {paths['json']}")


def render_comparison(c) -> None:
    from transferkit.report import COLUMNS, pretraining_sentence, table_rows

    table = Table(*COLUMNS, title="transfer learning vs fine-tuning")
    winner = c.winner()
    for r, row in zip(c.results, table_rows(c.results)):
        table.add_row(*row, style="bold green" if r is winner else None)
    out.print(table)
    out.print(f"[bold]{c.verdict()}[/]")
    if c.curve:
        out.print(c.crossover())
    if c.baseline:
        out.print(pretraining_sentence(c))


@app.command()
@handles_errors
def export(
    run: Annotated[Path, typer.Argument(help="A run directory written by fit.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="onnx (opset 18, dynamic batch axis) or torchscript.")] = "onnx",
    out_file: Annotated[Path | None, typer.Option("--out", "-o", help="File to write (default: RUN/model.onnx or "
                                                  "RUN/model.torchscript.pt).")] = None,
) -> None:
    """Export a run's model (fp32) to ONNX or TorchScript, checked to reproduce its outputs, with its preprocessing."""
    from transferkit.distributed import refuse_torchrun
    from transferkit.export import export_run

    refuse_torchrun("export")
    if run.is_dir() and run_modality(run) == "text":
        raise UsageError(f"export handles image runs. A text run's encoder is already in transformers' format: "
                         f"AutoModel.from_pretrained('{run / 'encoder'}') plus {run / 'head.safetensors'} (see README).")
    render_export(export_run(run, fmt, out_file))


def render_export(result) -> None:
    parity = ", ".join(f"batch {n} {d:.2e}" for n, d in result.parity.items())
    out.print(f"Exported {result.format} with {result.method} to {result.path} ({result.seconds:.1f} s)")
    out.print(f"Parity with PyTorch, max |logit difference|: {parity} (tolerance {result.tolerance:.0e})")
    out.print(f"Preprocessing and classes: {result.preprocess_path}")
    if result.format == "onnx":
        out.print(f"Predict with: transferkit predict {result.path} IMAGE...")


def main() -> None:
    app()
