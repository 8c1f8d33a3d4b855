"""`transferkit models` and `transferkit inspect`: which backbones there are, and what one holds."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.table import Table

from transferkit.cli.common import (
    Json,
    app,
    handles_errors,
)
from transferkit.cli.render import (
    out,
    render_models,
    render_no_models,
    render_recommended,
)


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
    if not any(found.values()):
        return render_no_models(filter, [n for names in list_models().values() for n in names])
    render_models(found, BUILTIN_BACKBONES, BUILTIN_TEXT_BACKBONES)


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
