"""`transferkit fit` and `transferkit compare`: train one strategy, or several side by side."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

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
from transferkit.cli.render import (
    out,
    render_comparison,
    render_fit,
    say_how_to_continue,
    say_what_compare_kept,
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
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            rich_help_panel=OUTPUT,
            help="Run directory to write; one holding a finished run is replaced only with --overwrite.",
        ),
    ] = Path("runs/latest"),
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
    label_smoothing: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=0.5,
            rich_help_panel=TRAIN,
            help="Label smoothing of the loss: the share of each target spread over all classes (default 0).",
        ),
    ] = None,
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
            help="Replace the finished run in OUT, or start over although OUT holds an unfinished fit's checkpoint; "
            "without it both are refused. Files in OUT that transferkit did not write are kept.",
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
    from transferkit.runs.directory import check_writable_dir

    show_library_messages(quiet or not distributed.is_main())
    if resume and overwrite:
        raise UsageError("--resume continues the fit in OUT and --overwrite starts it over: give one of them.")
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
    columns = given(text_column=text_column, label_column=label_column)
    check_writable_dir(out_dir)
    with writing(out_dir, "fit"):  # one fit at a time into OUT, from before the data is read to the end of the save
        fit_into(out_dir, data, options, model=model, models=models, columns=columns, overwrite=overwrite, log=log, log_to=log_to)


def fit_into(
    out_dir: Path,
    data: str,
    options: dict,
    *,
    model: str | None,
    models: str | None,
    columns: dict,
    overwrite: bool,
    log: str | None,
    log_to: str | None,
) -> None:
    """fit's work, with OUT held: check OUT, choose the backbone (--models), train, save, render."""
    from transferkit import distributed
    from transferkit.runs.directory import check_out_dir, recover_interrupted_save
    from transferkit.tracking import log_fit_report, open_run

    resume = options["resume"]
    recover_interrupted_save(out_dir)  # a save killed between its renames left the run (and its checkpoints) beside OUT
    check_out_dir(out_dir, resume=resume, overwrite=overwrite)  # before training, not after it
    choice = None
    if models:
        choice = choose_for_fit(data, models, model, resume, options, columns)
        model = choice.chosen
    with open_run(log, out=out_dir, run_name=f"{out_dir.name}-{options['strategy'] or 'auto'}", to=log_to) as tracker:
        clf = classifier_for(data, model, columns.get("text_column"), columns.get("label_column"), options | {"tracker": tracker})
        try:
            clf.fit(data, backbone_choice=choice.to_dict() if choice else None)
        except KeyboardInterrupt:
            say_how_to_continue(out_dir, resume)
            raise typer.Exit(130) from None
        clf.save(out_dir, overwrite=overwrite or resume)
        if tracker is not None:
            log_fit_report(tracker, clf.run_meta(), out_dir)
    if distributed.is_main():
        render_fit(clf, out_dir)


@contextlib.contextmanager
def writing(out_dir: Path, what: str) -> Iterator[None]:
    """OUT held by this process (under torchrun, by rank 0, the one that writes it) while a command writes it."""
    from transferkit import distributed
    from transferkit.runs.lock import run_folder_lock

    with run_folder_lock(out_dir, what) if distributed.is_main() else contextlib.nullcontext():
        yield


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


def _say_result(r) -> None:
    """One line as each strategy of a comparison finishes."""
    out.print(f"  {r.label}: test {r.test_accuracy:.4f} in {r.seconds:.1f} s")


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
            help="Strategies to run on the same split, comma-separated without spaces (e.g. "
            "feature-extraction,lp-ft; default: feature-extraction, finetune:last=2, finetune:all and lp-ft; with "
            "several --models, feature-extraction only).",
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
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            metavar="",
            rich_help_panel=OUTPUT,
            help="Continue an interrupted comparison in OUT: what finished (OUT/compare.json) is kept, the rest runs; "
            "the data and options must be the same.",
        ),
    ] = False,
    quiet: Quiet = False,
    log: Log = None,
    log_to: LogTo = None,
) -> None:
    """Run strategies side by side on one split: accuracy with intervals, time, parameters, memory; a paired test.

    The verdict names a winner only when the paired test says the difference is more than noise. Each backbone x
    strategy x seed is written to OUT as it finishes: after Ctrl-C (or a crash), compare --resume continues.
    """
    from transferkit.compare.options import unfinished_comparison
    from transferkit.compare.run import check_models, check_repeats, check_runs, strategies_for
    from transferkit.data.sources import detect_modality, load_data
    from transferkit.distributed import refuse_torchrun
    from transferkit.runs.directory import check_writable_dir

    refuse_torchrun("compare")
    show_library_messages(quiet)
    check_writable_dir(out_dir)  # before any work: a bad --out must not cost the whole comparison
    check_repeats(seeds, cv)
    fracs = [float(f) for f in fractions.split(",")] if fractions else []
    names = check_models(model, models.split(",") if models else None, fracs, baseline, cv)
    columns = given(text_column=text_column, label_column=label_column)
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
        | {"progress": not quiet}
    )
    specs = strategies_for(names, strategies.split(",") if strategies else None, baseline)
    check_runs(detect_modality(data, **columns)[0], names, specs, settings)  # before the data is read
    run_args = dict(
        model=model,
        strategies=strategies.split(",") if strategies else None,
        fractions=fracs,
        baseline=baseline,
        settings=settings,
        seeds=seeds,
        cv=cv,
        models=models.split(",") if models else None,
    )
    with writing(out_dir, "compare"):  # one comparison at a time into OUT
        previous = unfinished_comparison(out_dir, resume)
        splits = load_data(data, **given(split=parse_split(split), seed=seed), **columns)
        sizes = " / ".join(f"{n:,} {k}" for k, n in splits.sizes().items())
        out.print(
            f"Comparing on {data}: {sizes} {splits.train.noun}s, {len(splits.classes)} classes; "
            f"{'backbones ' + models if models else 'backbone ' + (model or 'the default')}"
        )
        result, paths = compare_into(out_dir, data, splits, previous, run_args, log=log, log_to=log_to)
    render_comparison(result)
    out.print(f"Reports: {paths['html']}, {paths['markdown']}, {paths['json']}")


def compare_into(out_dir: Path, data: str, splits, previous: dict | None, run_args: dict, *, log: str | None, log_to: str | None):
    """compare's work, with OUT held: every finished backbone x strategy x seed written as it finishes (so Ctrl-C keeps
    it, and says so), then the whole comparison; -> (Comparison, the report paths)."""
    from transferkit.compare.run import compare as run_compare
    from transferkit.report.comparison import write_comparison
    from transferkit.tracking import log_comparison, open_run

    with open_run(log, out=out_dir, run_name=f"{out_dir.name}-compare", to=log_to) as tracker:
        try:
            result = run_compare(
                splits,
                data_name=data,
                on_result=_say_result,
                tracker=tracker,
                resume_from=previous,
                on_partial=lambda partial: write_comparison(partial, out_dir),
                **run_args,
            )
        except KeyboardInterrupt:
            say_what_compare_kept(out_dir)
            raise typer.Exit(130) from None
        paths = write_comparison(result, out_dir)
        if tracker is not None:
            log_comparison(tracker, result.to_dict(), paths)
    return result, paths
