"""The command line: parse arguments, call the library, render the result with rich.

One function per subcommand; its signature is the CLI spec. Computation lives
in the library; this module converts options at the boundary and renders.
Options left out are None and are not passed on, so every default lives in
the library. Library messages arrive through :mod:`logging`: a rich handler
shows them on stderr as they happen, and -q keeps only warnings.
"""

from __future__ import annotations

import importlib

from transferkit.cli.common import app

# Each module registers its commands on the one typer app (cli.common.app) when imported; this order is the order
# of `transferkit --help`.
COMMAND_MODULES = ("train", "use", "doctor", "backbones", "deploy")
for _module in COMMAND_MODULES:
    importlib.import_module(f"transferkit.cli.{_module}")

__all__ = ["app", "main"]


def main() -> None:
    """The `transferkit` console script."""
    app()
