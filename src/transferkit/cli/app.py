"""The command line: parse arguments, call the library, render the result with rich.

One function per subcommand; its signature is the CLI spec. Computation lives
in the library; this module converts options at the boundary and renders.
Options left out are None and are not passed on, so every default lives in
the library. Library messages arrive through :mod:`logging`: a rich handler
shows them on stderr as they happen, and -q keeps only warnings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from transferkit.cli.common import (
    DATA,
    MODEL,
    OUTPUT,
    TRAIN,
    BatchSize,
    CacheBudget,
    Device,
    Engine,
    Epochs,
    ImageSize,
    Json,
    LabelColumn,
    Log,
    LogTo,
    MaxLength,
    Model,
    Models,
    Precision,
    Quiet,
    Seed,
    Split,
    TextColumn,
    app,
    classifier_for,
    given,
    handles_errors,
    parse_split,
    show_library_messages,
)
from transferkit.cli.doctor import doctor
from transferkit.cli.render import (
    err,
    out,
    render_comparison,
    render_export,
    render_fit,
    render_int8,
    render_recommended,
    say_how_to_continue,
    shown_path,
    wrapping_table,
)
from transferkit.errors import UsageError


@app.command()
@handles_errors
def fit(
    data: Annotated[
        str,
        typer.Argument(
            help="Image folder (one subfolder per class; train/ val/ test/ used if "
            "present), a CSV of image paths and labels, 'digits', a torchvision name "
            "(cifar10), or labelled texts: a CSV/TSV/JSONL with text and label columns."
        ),
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", rich_help_panel=OUTPUT, help="Run directory to write.")] = Path("runs/latest"),
    model: Model = None,
    models: Models = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            "--strategy",
            "-s",
            rich_help_panel=TRAIN,
            help="auto (default: measures, chooses and says why), feature-extraction, finetune:last=N, finetune:all, lp-ft, gradual, lora.",
        ),
    ] = None,
    text_column: TextColumn = None,
    label_column: LabelColumn = None,
    max_length: MaxLength = None,
    pooling: Annotated[str | None, typer.Option(rich_help_panel=MODEL, help="Text models: auto (default), mean or cls.")] = None,
    weights: Annotated[
        str | None, typer.Option(rich_help_panel=MODEL, help="Local .safetensors/.pth weights, or 'none' for random init.")
    ] = None,
    epochs: Epochs = None,
    head_epochs: Annotated[
        int | None,
        typer.Option(min=1, rich_help_panel=TRAIN, help="AdamW epochs of the head on cached features (default: the L-BFGS probe)."),
    ] = None,
    lr: Annotated[float | None, typer.Option(min=0.0, rich_help_panel=TRAIN, help="Head learning rate (backbone blocks get less).")] = None,
    batch_size: BatchSize = None,
    image_size: ImageSize = None,
    split: Split = None,
    seed: Seed = None,
    device: Device = None,
    precision: Precision = None,
    engine: Engine = None,
    bn: Annotated[
        str | None, typer.Option(rich_help_panel=TRAIN, help="BatchNorm while fine-tuning: all-frozen (default) or frozen-blocks.")
    ] = None,
    augment: Annotated[str | None, typer.Option(rich_help_panel=TRAIN, help="Image augmentation: none (default), light or strong.")] = None,
    optimizer: Annotated[str | None, typer.Option(rich_help_panel=TRAIN, help="adamw (default) or sgd.")] = None,
    label_smoothing: Annotated[float | None, typer.Option(min=0.0, max=0.5, rich_help_panel=TRAIN)] = None,
    accumulate: Annotated[int | None, typer.Option(min=1, rich_help_panel=TRAIN, help="Gradient accumulation steps.")] = None,
    patience: Annotated[
        int | None, typer.Option(min=1, rich_help_panel=TRAIN, help="Stop a phase after N epochs without a better validation accuracy.")
    ] = None,
    class_weights: Annotated[
        str | None, typer.Option(rich_help_panel=TRAIN, help="'auto': weight the loss by inverse class frequency.")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            metavar="",
            rich_help_panel=OUTPUT,
            help="Continue an interrupted fit from OUT/checkpoints; with a larger --epochs, train a fit longer.",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            metavar="",
            rich_help_panel=OUTPUT,
            help="Start over although OUT holds an unfinished fit's checkpoint (a finished run in OUT is always replaced whole).",
        ),
    ] = False,
    strict: Annotated[
        bool, typer.Option("--strict", metavar="", rich_help_panel=DATA, help="Fail on unreadable files instead of skipping them.")
    ] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", metavar="", rich_help_panel=OUTPUT, help="Do not read or write the feature cache.")
    ] = False,
    cache_budget: CacheBudget = None,
    quiet: Quiet = False,
    log: Log = None,
    log_to: LogTo = None,
) -> None:
    """Train a classifier on DATA and write a run directory (model, transferkit.json, metrics, report).

    A checkpoint is written to OUT/checkpoints after every epoch: an interrupted fit continues with --resume.

    Several GPUs or CPU processes (PyTorch DDP; only rank 0 writes OUT): torchrun --nproc_per_node 4 -m transferkit fit DATA
    """
    from transferkit import distributed
    from transferkit.runs.directory import check_out_dir
    from transferkit.tracking import log_fit_report, open_run

    show_library_messages(quiet or not distributed.is_main())
    if resume and overwrite:
        raise UsageError("--resume continues the fit in OUT and --overwrite starts it over: give one of them.")
    check_out_dir(out_dir, resume=resume, overwrite=overwrite)  # before training, not after it
    options = dict(
        strategy=strategy,
        weights=weights,
        split=parse_split(split),
        strict=strict,
        cache=not no_cache,
        progress=not quiet,
        checkpoint_dir=out_dir / "checkpoints",
        resume=resume,
        epochs=epochs,
        head_epochs=head_epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        device=device,
        precision=precision,
        optimizer=optimizer,
        label_smoothing=label_smoothing,
        accumulate=accumulate,
        patience=patience,
        class_weights=class_weights,
        image_size=image_size,
        bn=bn,
        augment=augment,
        cache_budget_gb=cache_budget,
        max_length=max_length,
        pooling=pooling,
        engine=engine,
    )
    choice = None
    if models:
        choice = choose_for_fit(data, models, model, resume, options, given(text_column=text_column, label_column=label_column))
        model = choice.chosen
    with open_run(log, out=out_dir, run_name=f"{out_dir.name}-{strategy or 'auto'}", to=log_to) as tracker:
        clf = classifier_for(data, model, text_column, label_column, options | {"tracker": tracker})
        try:
            clf.fit(data, backbone_choice=choice.to_dict() if choice else None)
        except KeyboardInterrupt:
            say_how_to_continue(out_dir, resume)
            raise typer.Exit(130) from None
        clf.save(out_dir)
        if tracker is not None:
            log_fit_report(tracker, clf.run_meta(), out_dir)
    if distributed.is_main():
        render_fit(clf, out_dir)


def choose_for_fit(data: str, models: str, model: str | None, resume: bool, options: dict, columns: dict):
    """fit --models: the backbone ranked first on DATA's split by the cross-validated probe (compare.choose_backbone)."""
    from transferkit.compare.run import choose_backbone
    from transferkit.data.sources import load_data
    from transferkit.distributed import refuse_torchrun

    refuse_torchrun("fit --models")
    if model is not None or resume:
        raise UsageError(
            f"--models chooses the backbone; leave {'--model' if model else '--resume'} out (a resumed fit "
            "continues the backbone in its checkpoint)."
        )
    splits = load_data(data, **given(split=options["split"], seed=options["seed"]), **columns)
    keep = ("seed", "device", "precision", "image_size", "max_length", "pooling", "cache", "progress", "cache_budget_gb", "engine")
    return choose_backbone(splits, models.split(","), settings=given(**{k: options.get(k) for k in keep}))


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
    from transferkit.errors import DataError
    from transferkit.stats.metrics import top_predictions

    items = list(inputs or []) + read_lines(lines_file)
    if not items:
        raise UsageError("Nothing to predict: give inputs after the run directory, or --file LINES.txt.")
    clf = load_model(run, device, precision, engine)
    key = "text" if getattr(clf, "modality", "image") == "text" else "file"
    if key == "file":
        from transferkit.data.images import check_image

        items = [Path(f) for f in items]
        bad = [(f, r) for f in items if (r := check_image(f))]
        if bad and all(r == "missing" for _, r in bad) and len(bad) == len(items):
            raise UsageError(
                f"{run} classifies images, and none of the inputs is a file ({items[0]}, ...). Give image files, or a text run for texts."
            )
        if bad:
            raise DataError(f"Cannot read {len(bad)} file(s): " + ", ".join(f"{f} ({r})" for f, r in bad[:5]))
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
    """Measure a trained run on labelled data: accuracy, top-5, macro-F1, per-class scores."""
    from transferkit.classifier import load_classifier
    from transferkit.data.sources import load_eval
    from transferkit.stats.metrics import metrics

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

    out.print(f"{summary.source}: {scores_sentence(result, clf.modality + 's')}; top-5 {result['top5_accuracy']:.4f}", highlight=False)
    table = Table("class", "precision", "recall", "f1", "support")
    for name, m in result["per_class"].items():
        table.add_row(name, *("-" if m[k] is None else f"{m[k]:.3f}" for k in ("precision", "recall", "f1")), str(m["support"]))
    out.print(table)
    if result["absent_classes"]:
        out.print(f"Not in the evaluated data (shown as -, left out of macro-F1): {', '.join(result['absent_classes'])}")


@app.command()
@handles_errors
def models(
    filter: Annotated[str, typer.Argument(help="Wildcard filter, e.g. 'resnet*' or 'vit'.")] = "",
    recommended: Annotated[
        bool,
        typer.Option(
            "--recommended",
            help="A short curated table of hub backbones known to transfer well, with where each number comes from (downloads nothing).",
        ),
    ] = False,
) -> None:
    """List built-in (offline) image and text backbones and timm architectures matching FILTER."""
    from transferkit.backbones import BUILTIN_BACKBONES, BUILTIN_TEXT_BACKBONES, list_models

    if recommended:
        from transferkit.backbones.recommended import recommended_table

        return render_recommended(recommended_table())
    found = list_models(filter)
    out.print("[bold]Built-in image backbones (offline weights):[/]")
    for name in found["builtin"]:
        out.print(f"  {name}  {BUILTIN_BACKBONES[name].description}")
    out.print("[bold]Built-in text backbones (offline weights; any transformers encoder on the hub works too):[/]")
    for name in found["builtin_text"]:
        out.print(f"  {name}  {BUILTIN_TEXT_BACKBONES[name].description}")
    names = found["timm"]
    out.print(f"[bold]timm architectures ({len(names)}; weights download from the hub):[/]")
    out.print("  " + "  ".join(names[:200]) + (" ..." if len(names) > 200 else ""), soft_wrap=False)


@app.command()
@handles_errors
def inspect(
    model: Annotated[
        str, typer.Argument(help="Backbone name: built-in (builtin:efficientnet_lite0, minilm), timm, or a transformers folder.")
    ] = "builtin:efficientnet_lite0",
    weights: Annotated[str | None, typer.Option(help="Local weights file, or 'none' for random init.")] = None,
    as_json: Json = False,
) -> None:
    """Show a backbone's blocks in order with parameter counts, feature size and input config."""
    from transferkit.backbones import load_backbone

    info = load_backbone(model, weights=weights).describe()
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    out.print(
        f"[bold]{info['name']}[/] ({info['modality']}, {info['arch']}, weights: {info['weights']}): "
        f"{info['total_params']:,} parameters, {info['feature_dim']} features"
    )
    table = Table("#", "block", "parameters", "tensors")
    for b in info["blocks"]:
        table.add_row(str(b["index"]), b["name"], f"{b['params']:,}", str(b["tensors"]))
    table.add_row("", f"head ({info['head']['name']})", f"{info['head']['params']:,}", "")
    out.print(table)
    out.print("Input: " + ", ".join(f"{k} {v}" for k, v in info["input"].items()))
    out.print("finetune:last=N trains the head plus the last N blocks above.")


@app.command()
@handles_errors
def compare(
    data: Annotated[str, typer.Argument(help="Labelled data as for fit; default: the built-in digits demo.")] = "digits",
    model: Model = None,
    models: Models = None,
    strategies: Annotated[
        str | None,
        typer.Option(
            rich_help_panel=TRAIN,
            help="Comma-separated strategies to run on the "
            "same split (default feature-extraction,finetune:last=2,finetune:all,lp-ft; with several "
            "--models, feature-extraction only).",
        ),
    ] = None,
    fractions: Annotated[
        str | None, typer.Option(rich_help_panel=DATA, help="Training fractions per class for a learning curve, e.g. 0.05,0.2,1.0.")
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            rich_help_panel=TRAIN,
            help="'scratch': also train the architecture from random initialisation, to show what pretraining is worth.",
        ),
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", rich_help_panel=OUTPUT, help="Where compare.json and the reports go.")] = Path(
        "runs/compare"
    ),
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    image_size: ImageSize = None,
    text_column: TextColumn = None,
    label_column: LabelColumn = None,
    max_length: MaxLength = None,
    split: Split = None,
    seed: Seed = None,
    device: Device = None,
    precision: Precision = None,
    engine: Engine = None,
    cache_budget: CacheBudget = None,
    seeds: Annotated[
        int,
        typer.Option(
            min=1,
            rich_help_panel=TRAIN,
            help="Train each strategy with this many seeds (seed, seed+1, ...) on the same split; the table shows mean ± sd.",
        ),
    ] = 1,
    cv: Annotated[
        int | None,
        typer.Option(
            min=0,
            rich_help_panel=TRAIN,
            help="Folds of the cross-validated probe on train+val (0: off; default 5 when train+val x feature size <= 4M values).",
        ),
    ] = None,
    quiet: Quiet = False,
    log: Log = None,
    log_to: LogTo = None,
) -> None:
    """Run strategies side by side on one split: accuracy with intervals, time, parameters, memory; a paired test.

    The verdict names a winner only when the paired test says the difference is more than noise.
    """
    from transferkit.compare.run import check_models, check_repeats
    from transferkit.compare.run import compare as run_compare
    from transferkit.data.sources import load_data
    from transferkit.distributed import refuse_torchrun
    from transferkit.report.comparison import write_comparison
    from transferkit.runs.directory import check_writable_dir
    from transferkit.tracking import log_comparison, open_run

    refuse_torchrun("compare")
    show_library_messages(quiet)
    check_writable_dir(out_dir)  # before any work: a bad --out must not cost the whole comparison
    check_repeats(seeds, cv)
    fracs = [float(f) for f in fractions.split(",")] if fractions else []
    check_models(model, models.split(",") if models else None, fracs, baseline, cv)
    columns = given(text_column=text_column, label_column=label_column)
    splits = load_data(data, **given(split=parse_split(split), seed=seed), **columns)
    settings = (
        given(
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            device=device,
            precision=precision,
            engine=engine,
            image_size=image_size,
            cache_budget_gb=cache_budget,
            max_length=max_length,
        )
        | columns
    )
    settings["progress"] = not quiet
    sizes = " / ".join(f"{n:,} {k}" for k, n in splits.sizes().items())
    out.print(
        f"Comparing on {data}: {sizes} {splits.train.noun}s, {len(splits.classes)} classes; "
        f"{'backbones ' + models if models else 'backbone ' + (model or 'the default')}"
    )
    with open_run(log, out=out_dir, run_name=f"{out_dir.name}-compare", to=log_to) as tracker:

        def live(r):
            out.print(f"  {r.label}: test {r.test_accuracy:.4f} in {r.seconds:.1f} s")

        specs = strategies.split(",") if strategies else None
        result = run_compare(
            splits,
            data_name=data,
            model=model,
            strategies=specs,
            fractions=fracs,
            baseline=baseline,
            settings=settings,
            on_result=live,
            tracker=tracker,
            seeds=seeds,
            cv=cv,
            models=models.split(",") if models else None,
        )
        paths = write_comparison(result, out_dir)
        if tracker is not None:
            log_comparison(tracker, result.to_dict(), paths)
    render_comparison(result)
    out.print(f"Reports: {paths['html']}, {paths['markdown']}, {paths['json']}")


@app.command()
@handles_errors
def export(
    run: Annotated[Path, typer.Argument(help="A run directory written by fit.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="onnx (opset 18, dynamic batch axis) or torchscript.")] = "onnx",
    out_file: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="File to write (default: RUN/model.onnx, RUN/model.torchscript.pt, or RUN/model.int8.onnx with --int8)."
        ),
    ] = None,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            metavar="",
            help="Also write an int8 ONNX model (ONNX Runtime static "
            "quantization calibrated on the run's validation images), after measuring its test "
            "accuracy and speed against the fp32 one.",
        ),
    ] = False,
    calibration: Annotated[
        str | None,
        typer.Option(metavar="DATA", help="With --int8: calibrate on these labelled images instead of the run's validation split."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", metavar="", help="With --int8: write it even if it loses more than 1 point of test accuracy.")
    ] = False,
) -> None:
    """Export a run's model (fp32) to ONNX or TorchScript, checked to reproduce its outputs, with its preprocessing."""
    from transferkit.distributed import refuse_torchrun
    from transferkit.export.onnx import export_run

    refuse_torchrun("export")
    if (calibration is not None or force) and not int8:
        raise UsageError("--calibration and --force apply to --int8 only: add --int8, or leave them out.")
    if int8:
        if fmt != "onnx":
            raise UsageError(f"--int8 writes an ONNX model; it does not combine with --format {fmt}. Use --format onnx.")
        from transferkit.export.int8 import quantize_run

        render_int8(quantize_run(run, out_file, calibration=calibration, force=force))
        return
    render_export(export_run(run, fmt, out_file))


SERVING = "Serving"


@app.command()
@handles_errors
def push(
    run: Annotated[Path, typer.Argument(help="A run directory written by fit.")],
    repo_id: Annotated[str, typer.Argument(help="The Hub repository, owner/name (created if missing).")],
    private: Annotated[bool, typer.Option("--private", metavar="", help="Create the repository private.")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to commit to (created if missing; default: main).")] = None,
) -> None:
    """Upload a run (model, config.json, model card, metrics, exports; not checkpoints) to the Hugging Face Hub.

    Uses the token the Hub tools use (HF_TOKEN, or hf auth login); HF_ENDPOINT selects another Hub.
    """
    from transferkit.runs.hub import push_run

    result = push_run(run, repo_id, private=private, revision=revision)
    out.print(f"Pushed {len(result.files)} files ({result.bytes / 1e6:.1f} MB) to {result.url} ({result.revision}): {result.commit_url}")
    source = repo_id if result.revision == "main" else f"{repo_id}@{result.revision}"
    out.print(
        f'Load with timm: timm.create_model("hf-hub:{source}", pretrained=True); fine-tune further with: '
        f"transferkit fit DATA --model hf-hub:{source}"
    )


@app.command()
@handles_errors
def serve(
    run: Annotated[Path, typer.Argument(help="A run directory written by fit, or a .onnx file written by export.")],
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for the network).")
    ] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="Port (default 8000; 0 takes a free one).")] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Processes, each with its own copy of the model and its share of the cores (default 1).")
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(min=1, rich_help_panel=SERVING, help="Most inputs per forward pass (default 64); 1 turns batching off.")
    ] = None,
    batch_wait: Annotated[
        float | None,
        typer.Option(
            min=0.0, rich_help_panel=SERVING, help="Milliseconds a batch may wait for requests still arriving to join it (default 5)."
        ),
    ] = None,
    max_inputs: Annotated[
        int | None, typer.Option(min=1, rich_help_panel=SERVING, help="Most images or texts per request (default 64).")
    ] = None,
    max_upload_mb: Annotated[
        float | None, typer.Option(min=0.001, rich_help_panel=SERVING, help="Most MB per request body (default 32).")
    ] = None,
    read_timeout: Annotated[
        float | None, typer.Option(min=0.001, rich_help_panel=SERVING, help="Seconds a request body may take to arrive (default 30).")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0.001, rich_help_panel=SERVING, help="Seconds a request may wait for its answer (default 60).")
    ] = None,
    device: Device = None,
    precision: Precision = None,
    quiet: Quiet = False,
) -> None:
    """Serve a trained run over HTTP: POST /predict, GET /info, /healthz, a page at / and API docs at /docs.

    Ctrl-C or SIGTERM lets the requests in flight finish, then exits.
    """
    from transferkit.serve import require_serve

    require_serve()
    from transferkit.serve.config import ServeConfig
    from transferkit.serve.server import open_socket, url_of
    from transferkit.serve.server import run as run_server

    show_library_messages(quiet)
    config = ServeConfig(
        **given(
            max_batch=max_batch,
            batch_wait_ms=batch_wait,
            max_inputs=max_inputs,
            max_upload_mb=max_upload_mb,
            read_timeout_s=read_timeout,
            timeout_s=timeout,
        )
    )
    sock = open_socket(host, port)  # a taken port fails now, not after the model has loaded
    if workers and workers > 1:  # each process gets its share of the cores, not all of them
        import os

        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

    def ready(info: dict) -> None:
        what = f"{len(info['classes'])} classes" if "classes" in info else f"{info['workers']} workers"
        out.print(
            f"Serving {run} ({what}) at {url_of(sock)}: the page at /, POST /predict, API docs at /docs. Ctrl-C stops.", highlight=False
        )

    run_server(run, sock, config=config, on_ready=ready, **given(workers=workers, device=device, precision=precision))
    out.print("Stopped.")


app.command()(doctor)


def main() -> None:
    app()
