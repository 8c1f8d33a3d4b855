"""The command line: typer options -> a library call -> rich rendering; nothing here decides anything.

* :mod:`~transferkit.cli.app`     the typer app and its commands (fit, compare, predict, evaluate, export, ...)
* :mod:`~transferkit.cli.common`  options shared by several commands, error handling, data detection
* :mod:`~transferkit.cli.render`  tables and sentences for the console
* :mod:`~transferkit.cli.doctor`  `transferkit doctor`

Importing this package loads neither torch nor timm, so `transferkit --help` stays fast.
"""

from transferkit.cli.app import app, main

__all__ = ["app", "main"]
