"""The one template environment of every page transferkit writes, and the one stylesheet they share.

The pages are jinja2 templates (``templates/*.html.j2``) with autoescaping on: every name and number from the
data (class names, folder names, labels, configs) is escaped on output; only the stylesheet (``templates/report.css``,
inlined so a page opens offline) and fragments these templates rendered themselves are marked ``|safe``. Each
image counts itself into ``<body data-loaded / data-failed>`` once decoded, so a browser (or the test suite in
headless Chromium) can see that a page rendered every plot and thumbnail.
"""

from __future__ import annotations

import functools
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"
PER_CLASS_COLUMNS = ("class", "precision", "recall", "f1", "support")


@functools.cache
def stylesheet() -> str:
    """The CSS every page inlines."""
    return (TEMPLATES / "report.css").read_text(encoding="utf-8")


@functools.cache
def environment():
    """The environment, built on first use (jinja2 is imported only by the commands that write pages)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.globals.update(css=stylesheet(), per_class_columns=PER_CLASS_COLUMNS)
    return env


def render(template: str, **context) -> str:
    """`template` (a file name under templates/) rendered with `context`."""
    return environment().get_template(template).render(**context)
