"""MkDocs hook: render the configuration reference from `qe_assets.settings` at build time.

docs/configuration.md holds the marker; the table comes from the field table and the per-field
descriptions in `Settings`, so a new setting is documented the moment it exists.
"""

from __future__ import annotations

MARKER = "<!-- settings-reference -->"


def on_page_markdown(markdown: str, page, config, files) -> str:  # MkDocs passes all four
    if MARKER not in markdown:
        return markdown
    from qe_assets.settings_reference import reference_markdown

    return markdown.replace(MARKER, reference_markdown())
