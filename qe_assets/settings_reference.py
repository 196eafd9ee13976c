"""The configuration reference as Markdown, generated from `Settings` so it cannot drift.

`make docs` renders it into docs/configuration.md through the MkDocs hook in docs/hooks/;
`test_docs.py` checks that every variable the code reads is in it.
"""

from __future__ import annotations

import json
from typing import Any

from qe_assets.settings import CONTRACT_VARIABLES, ENVIRONMENT, OTHER_VARIABLES, Settings


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, dict):
        return f"`{json.dumps(value)}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def settings_rows() -> list[tuple[str, str, str, str]]:
    """(variable, default, validation, description) for every `Settings` field, in table order."""
    rows = []
    for name, (variable, parse) in ENVIRONMENT.items():
        field = Settings.model_fields[name]
        description = field.description or ""
        if variable not in CONTRACT_VARIABLES:
            description = f"*extension*: {description}"
        rule = getattr(parse, "rule", "")
        rows.append((variable, _default(field.default), rule, description))
    return rows


def reference_markdown() -> str:
    lines = [
        "| variable | default | accepted values | meaning |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| `{variable}` | {_cell(default)} | {_cell(rule)} | {_cell(text)} |"
        for variable, default, rule, text in settings_rows()
    ]
    lines += [
        "",
        "Read outside the settings (not shown in the launchpad):",
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
    ]
    for variable, (default, text) in OTHER_VARIABLES.items():
        marker = "" if variable in CONTRACT_VARIABLES else "*extension*: "
        lines.append(f"| `{variable}` | {default} | {marker}{_cell(text)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
