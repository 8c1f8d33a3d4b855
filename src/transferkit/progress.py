"""Progress bars on stderr, shown only when asked for (``progress=True``; the CLI's default, off with -q).

Messages go through :mod:`logging` (one logger per module, under ``transferkit``);
only the bars are drawn here. Without a terminal rich draws nothing, so logs and
CI output get no blank lines or control characters.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_console = Console(stderr=True)


def make_progress(enabled: bool = True) -> Progress:
    """A rich progress bar on stderr; disabled (silent) when `enabled` is False or stderr is not a terminal."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=_console,
        transient=True,
        disable=not enabled or not _console.is_terminal,
    )
