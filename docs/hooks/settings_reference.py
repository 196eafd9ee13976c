"""MkDocs hook: refuse to build a site whose configuration reference is stale.

docs/configuration.md holds the reference itself (written by `make docs-config` from
`qe_assets.settings`, so it reads the same on a Git host); this hook fails the build when the
file differs from what the code generates now, naming the command that fixes it.
"""

from __future__ import annotations

from mkdocs.exceptions import PluginError


def on_page_markdown(markdown: str, page, config, files) -> str:  # MkDocs passes all four
    from qe_assets.settings.reference import BEGIN, with_reference

    if BEGIN in markdown and with_reference(markdown) != markdown:
        raise PluginError(
            f"{page.file.src_path} is out of date with qe_assets/settings.py: run `make docs-config`"
        )
    return markdown
