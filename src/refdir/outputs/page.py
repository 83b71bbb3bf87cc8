"""What the HTML pages share: figures as PNG data URIs and plain tables.

A module of its own so that ``report`` and the sections drawn in other modules (``front_plot``) use one
copy without importing each other: the report imports its sections, the sections import only this.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path


def png_uri(fig) -> str:
    """The figure as a ``data:`` URI (then closed): the page embeds its images and needs no other file."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def save_png(path: Path, data_uri: str) -> None:
    """A figure already rendered for the page, also written as a PNG file (atomically)."""
    from refdir.core.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(base64.b64decode(data_uri.split(",", 1)[1]))


def html_table(headers: list[str], rows: list[list]) -> str:
    """An HTML table; floats to four decimals, missing or NaN values as a dash."""

    def cell(v):
        if v is None:
            return "—"
        if isinstance(v, float):
            return "—" if math.isnan(v) else f"{v:.4f}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
