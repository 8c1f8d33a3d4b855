"""Figures for the HTML reports: matplotlib's object API (pyplot's global state and backend stay untouched), PNG inline."""

from __future__ import annotations

import base64
import io


def new_figure(width: float = 6, height: float = 4):
    """A figure and its axes, built without pyplot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def png_base64(fig) -> str:
    """The figure as a base64 PNG, for a data: URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()
