"""What every CLI command shares: the typer app, option types, error handling, the log handler.

Command modules (`cli.py`, `cli_doctor.py`) import from here and register on `app`; nothing here computes.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from transferkit import __version__
from transferkit.cli.render import err, out
from transferkit.errors import NameDeprecationWarning, TransferkitError
from transferkit.training.config import DEFAULT_CACHE_BUDGET_GB, DEFAULT_ENGINE, TrainConfig

DEFAULTS = TrainConfig(engine=DEFAULT_ENGINE)  # for help texts; a bad $TRANSFERKIT_ENGINE is refused by the command


def _untyped_flags(params: list[Any]) -> list[Any]:
    """Flags (-h/--help, --recommended, ...) take no value: no type after them in the help (typer shows <bool>)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class Command(TyperCommand):
    """A typer command whose help reads as usual: DATA and [INPUTS]... in the usage (typer writes {data}), flags
    without a type."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:  # typer's vendored click.Context
        pieces = [re.sub(r"\{([a-z_]+)\}", lambda m: m[1].upper(), p) for p in super().collect_usage_pieces(ctx)]
        return [re.sub(r"\[([a-z_]+)\]", lambda m: f"[{m[1].upper()}]", p) for p in pieces]

    def get_params(self, ctx: Any) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))


class Group(TyperGroup):
    """The `transferkit` group, its flags untyped like its commands'."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))


class App(typer.Typer):
    """typer's app whose commands are :class:`Command` unless a command names another class."""

    def command(self, name: str | None = None, *, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Callable:
        return super().command(name, cls=cls or Command, **kwargs)


app = App(
    cls=Group,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Adapt a pretrained model to your labelled images or texts: transfer learning (feature "
    "extraction), fine-tuning or LoRA, measured on your data.",
)
DATA, MODEL, TRAIN, OUTPUT, LOGGING = "Data", "Model", "Training", "Output", "Logging"


def version_callback(value: bool) -> None:
    if value:
        out.print(f"transferkit {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", metavar="", callback=version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Adapt a pretrained model to your labelled images or texts, measured on your data."""
    import warnings

    # A deprecated name is said once on the transferkit logger; Python's warning would repeat it with a source line.
    warnings.filterwarnings("ignore", category=NameDeprecationWarning)


def show_library_messages(quiet: bool) -> None:
    """Library logs (data, backbone, cache, decisions) on stderr as they happen; -q keeps warnings only."""
    from rich.logging import RichHandler

    logger = logging.getLogger("transferkit")
    logger.handlers[:] = [RichHandler(console=err, show_time=False, show_path=False, show_level=False, markup=False, rich_tracebacks=False)]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    if quiet:  # transformers' own loading and writing messages and bars too
        import os

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


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


def parse_split(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError as e:
        raise typer.BadParameter(f"'{text}' is not three comma-separated fractions, e.g. 0.7,0.15,0.15") from e


def given(**options) -> dict:
    """The options the user gave: None means left out, so the library's default applies."""
    return {k: v for k, v in options.items() if v is not None}


Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        rich_help_panel=MODEL,
        help="Images: a built-in (offline) "
        "builtin:efficientnet_lite0 (the default), builtin:efficientnet_lite1 or "
        "builtin:efficientnet_lite2; or any timm model by its timm name (timm:NAME is "
        "always timm's). Texts: built-in minilm (offline, the default), a hub name or "
        "a save_pretrained folder.",
    ),
]
Models = Annotated[
    str | None,
    typer.Option(
        rich_help_panel=MODEL,
        help="Several backbones, comma-separated without spaces (e.g. resnet18,convnext_tiny; the built-ins are "
        "builtin:efficientnet_lite0, _lite1 and _lite2): each is measured on your data and ranked by the "
        "cross-validated probe, with its costs.",
    ),
]
TextColumn = Annotated[str | None, typer.Option(rich_help_panel=DATA, help="Text data: the column holding the text (default 'text').")]
LabelColumn = Annotated[str | None, typer.Option(rich_help_panel=DATA, help="Text data: the column holding the label (default 'label').")]
MaxLength = Annotated[
    int | None, typer.Option(min=2, rich_help_panel=MODEL, help="Text models: tokens per text (default 128); longer texts are truncated.")
]
Split = Annotated[
    str | None, typer.Option(rich_help_panel=DATA, help="train,val,test fractions when the data gives no split (default 0.7,0.15,0.15).")
]
Seed = Annotated[
    int | None,
    typer.Option(rich_help_panel=TRAIN, help=f"Random seed for the split, initialisation and data order (default {DEFAULTS.seed})."),
]
Device = Annotated[str | None, typer.Option(help="auto (default), cpu, cuda or cuda:N.")]
Precision = Annotated[str | None, typer.Option(help="auto (default: bf16 where the hardware has it), bf16, fp16 or fp32.")]
Engine = Annotated[
    str | None,
    typer.Option(
        metavar="auto|torch|openvino",
        help="Engine of frozen passes (extraction, "
        "predict): auto (default: OpenVINO on the CPU when the openvino extra is "
        "installed, else torch; $TRANSFERKIT_ENGINE sets another default), torch or "
        "openvino.",
    ),
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        min=1, rich_help_panel=TRAIN, help=f"Fine-tuning batch size (default {DEFAULTS.batch_size}; under torchrun the global batch)."
    ),
]
Epochs = Annotated[int | None, typer.Option(min=1, rich_help_panel=TRAIN, help="Fine-tuning epochs (default 5).")]
ImageSize = Annotated[int | None, typer.Option(min=16, rich_help_panel=MODEL, help="Input size in pixels (default: the backbone's).")]
CacheBudget = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        rich_help_panel=OUTPUT,
        help=f"GB of disk the outputs of frozen "
        f"blocks, and training images decoded once, may take (default {DEFAULT_CACHE_BUDGET_GB:g}; 0 turns both "
        "off).",
    ),
]
Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", metavar="", rich_help_panel=OUTPUT, help="Warnings only: no progress bars or messages.")
]
Log = Annotated[
    str | None,
    typer.Option(
        metavar="tensorboard|mlflow",
        rich_help_panel=LOGGING,
        help='Also log settings, per-epoch metrics, results and the report (needs: pip install "transferkit\\[log]").',
    ),
]
LogTo = Annotated[
    str | None,
    typer.Option(
        metavar="DIR|URI",
        rich_help_panel=LOGGING,
        help="Where --log writes (default OUT/tensorboard, or $MLFLOW_TRACKING_URI, else sqlite:///OUT/mlflow.db).",
    ),
]
Json = Annotated[bool, typer.Option("--json", metavar="", help="Print JSON.")]


def classifier_for(data: str, model: str | None, text_column: str | None, label_column: str | None, options: dict):
    """The estimator for DATA's modality (detected from its content, and said), with the options given."""
    from transferkit.classifier import CLASSIFIERS
    from transferkit.data.sources import detect_modality

    modality, why = detect_modality(data, text_column=text_column, label_column=label_column)
    logging.getLogger("transferkit.cli.app").info("Data %s: %s, so %s.", data, why, f"{modality}s")
    columns = given(text_column=text_column, label_column=label_column)
    return CLASSIFIERS[modality](model, **columns, **given(**options))
