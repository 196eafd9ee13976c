"""Small charts embedded in materialization metadata (markdown with an inline PNG)."""

from __future__ import annotations

import base64
import functools
import io
import threading
import warnings
from types import ModuleType


@functools.cache
def _pyplot() -> ModuleType:
    # Imported on the first chart, not with the definitions: matplotlib's start-up cost
    # (docs/performance.md) would otherwise be paid by every code-server load and CLI call.
    import matplotlib

    matplotlib.use("Agg")  # no display here, and no GUI toolkit in a run worker
    import matplotlib.pyplot as plt

    # Labels outside the known four may be Chinese: use a CJK font when one is installed
    # (Debian: fonts-noto-cjk); without one such a label shows as boxes, nothing fails.
    plt.rcParams["font.sans-serif"] = [
        "Noto Sans CJK SC",
        "WenQuanYi Zen Hei",
        *plt.rcParams["font.sans-serif"],
    ]
    return plt


def import_in_background() -> None:
    """Start importing matplotlib on a helper thread: a step that will draw a chart after long
    work (a version cut, most of it in Polars and in file writes, outside the GIL) no longer
    waits for the import at its end."""
    threading.Thread(target=_pyplot, name="import-matplotlib", daemon=True).start()


def label_share_png(counts: dict[str, int], title: str) -> bytes:
    """A horizontal bar chart of label counts with their shares, largest first."""
    items = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    total = sum(counts.values()) or 1
    labels = [label for label, _ in items][::-1]
    values = [count for _, count in items][::-1]
    plt = _pyplot()
    height = 0.45 * len(items) + 1.0
    figure, axes = plt.subplots(figsize=(6, height), dpi=100)
    try:
        bars = axes.barh(labels, values, color="#4f6bed")
        for bar, value in zip(bars, values, strict=True):
            axes.text(
                bar.get_width(),
                bar.get_y() + bar.get_height() / 2,
                f" {value} ({value / total:.0%})",
                va="center",
                fontsize=9,
            )
        axes.set_title(title, fontsize=11)
        axes.set_xlabel("samples")
        axes.margins(x=0.25)
        axes.spines[["top", "right"]].set_visible(False)
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            figure.tight_layout()
            figure.savefig(buffer, format="png")
    finally:
        plt.close(figure)
    return buffer.getvalue()


def as_markdown_image(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"
