"""`transferkit doctor DATA`: label errors, near-duplicates, leakage and outliers; a table, doctor.html, issues.csv."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from transferkit.cli.common import (
    MODEL,
    OUTPUT,
    Device,
    ImageSize,
    Json,
    LabelColumn,
    MaxLength,
    Model,
    Precision,
    Quiet,
    Seed,
    Split,
    TextColumn,
    app,
    given,
    handles_errors,
    parse_split,
    show_library_messages,
)
from transferkit.cli.render import out, wrapping_table


@app.command()
@handles_errors
def doctor(
    data: Annotated[
        str,
        typer.Argument(help="Labelled data as for fit: an image folder, a CSV, 'digits', a torchvision name, or a CSV/TSV/JSONL of texts."),
    ],
    model: Model = None,
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", rich_help_panel=OUTPUT, help="Where doctor.html, issues.csv and doctor.json go.")
    ] = Path("doctor"),
    threshold: Annotated[
        float | None,
        typer.Option(
            rich_help_panel=MODEL,
            help="Input similarity at and above which two "
            "examples are near-duplicates: images, Pearson correlation of 16x16 "
            "grey thumbnails (default 0.98); texts, Jaccard index of character "
            "3-grams (default 0.9).",
        ),
    ] = None,
    folds: Annotated[
        int | None,
        typer.Option(rich_help_panel=MODEL, help="Folds of the out-of-sample probes for the label check (default 5; 0 skips it)."),
    ] = None,
    text_column: TextColumn = None,
    label_column: LabelColumn = None,
    max_length: MaxLength = None,
    image_size: ImageSize = None,
    split: Split = None,
    seed: Seed = None,
    device: Device = None,
    precision: Precision = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", metavar="", rich_help_panel=OUTPUT, help="Do not read or write the feature cache.")
    ] = False,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Look at the data: likely label errors, near-duplicates and leakage across splits, outliers.

    Features come from the pretrained backbone (and the feature cache, which fit and compare fill); the split is
    fit's for the same --seed. Writes OUT/doctor.html (thumbnails of each finding, pairs side by side),
    OUT/issues.csv (one row per finding) and OUT/doctor.json.
    """
    import json

    from transferkit.doctor.diagnose import diagnose
    from transferkit.report.doctor import write_doctor_report
    from transferkit.runs.directory import check_writable_dir

    show_library_messages(quiet or as_json)
    check_writable_dir(out_dir)  # before any work
    options = given(threshold=threshold, folds=folds, seed=seed, device=device, precision=precision, split=parse_split(split))
    data_options = given(text_column=text_column, label_column=label_column, max_length=max_length, image_size=image_size)
    result = diagnose(data, model=model, cache=not no_cache, progress=not (quiet or as_json), **options, **data_options)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_doctor_report(result, out_dir)
    if as_json:
        out.print_json(json.dumps(result.to_dict() | {"files": {k: str(v) for k, v in paths.items()}}))
        return
    render_diagnosis(result)
    out.print(f"Wrote {paths['html']}, {paths['csv']} in {result.seconds:.1f} s.")


def render_diagnosis(d) -> None:
    """The summary table: each kind of finding, its count, its most certain examples."""
    from transferkit.doctor.findings import KINDS

    table = wrapping_table("finding", "count", "first", title=f"doctor: {d.data} ({d.model})")
    for kind, n in d.counts().items():
        first = ", ".join(_short(f) for f in d.of_kind(kind)[:3])
        table.add_row(kind, str(n), first)
    out.print(table)
    out.print(d.summary_line(), highlight=False)
    out.print(f"  near-duplicates: {d.measure} >= {d.threshold:g}; each pair also carries its centred feature cosine.", highlight=False)
    for kind in KINDS:
        if d.counts()[kind]:
            out.print(f"  {kind}: {KINDS[kind]}", highlight=False)
    for note in d.notes:
        out.print(note, highlight=False)


def _short(f) -> str:
    if f.kind == "label":
        return f"{f.id} ({f.given_label} -> {f.suggested_label})"
    if f.other_id is not None:
        return f"{f.id} ~ {f.other_id} ({f.score:.3f})"
    return f.id
