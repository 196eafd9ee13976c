"""Importers: where `qe import phoenix|langfuse` reads judged traces, and how it maps them.

The keys (QE_PHOENIX_API_KEY, QE_LANGFUSE_PUBLIC_KEY, QE_LANGFUSE_SECRET_KEY) are not settings:
settings reach the Dagster launchpad and every dataset manifest; the importers read the keys
from the environment when they connect (`qe_assets.imports.clients.secret`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from qe_assets.settings.parsing import (
    SettingsError,
    _bool,
    _duration,
    _float,
    _int,
    _json_object,
    _ruled,
    _string_map,
    _text,
)

DIRECTIONS = ("higher", "lower")
DEFAULT_LABEL_MAP = {
    "hallucinated": "factuality_error",
    "incorrect": "factuality_error",
    "incomplete": "incomplete_answer",
    "irrelevant": "low_relevance",
    "unrelated": "low_relevance",
}


def _base_url(name: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise SettingsError(f"{name} must be an http:// or https:// base URL; got {raw!r}")
        if parts.username or parts.password:
            # A key in the URL would be printed in every error naming the URL.
            raise SettingsError(f"{name} must not hold credentials; use the key variables")
        return value

    return _ruled(parse, "`http://` or `https://` base URL")


def _evaluators(name: str) -> Callable[[str], dict[str, str]]:
    def parse(raw: str) -> dict[str, str]:
        value = _json_object(name)(raw)
        bad = [key for key, way in value.items() if way not in DIRECTIONS]
        if bad:
            raise SettingsError(
                f'{name} must map judgement names to "higher" or "lower" (which scores are '
                f"better); {bad[0]!r} maps to {value[bad[0]]!r}"
            )
        return value

    return _ruled(parse, 'JSON object: judgement name → `"higher"` or `"lower"` (better)')


def _label_map(name: str) -> Callable[[str], dict[str, str]]:
    return _string_map(name, "source labels to our labels", "JSON object: source label → label")


# The mapping each source may set for itself; unset, the shared QE_IMPORT_* one applies.
PER_SOURCE = ("evaluators", "label_map", "request_id_key")
SOURCES = ("phoenix", "langfuse")


# field name → (environment variable, parser). Defaults live on the model below.
ENVIRONMENT: dict[str, tuple[str, Callable[[str], Any]]] = {
    "phoenix_url": ("QE_PHOENIX_URL", _base_url("QE_PHOENIX_URL")),
    "phoenix_project": ("QE_PHOENIX_PROJECT", _text),
    "langfuse_url": ("QE_LANGFUSE_URL", _base_url("QE_LANGFUSE_URL")),
    "import_evaluators": ("QE_IMPORT_EVALUATORS", _evaluators("QE_IMPORT_EVALUATORS")),
    "import_label_map": ("QE_IMPORT_LABEL_MAP", _label_map("QE_IMPORT_LABEL_MAP")),
    "import_threshold": ("QE_IMPORT_THRESHOLD", _float("QE_IMPORT_THRESHOLD")),
    "import_request_id_key": ("QE_IMPORT_REQUEST_ID_KEY", _text),
    "import_tenant": ("QE_IMPORT_TENANT", _text),
    "import_settle_seconds": ("QE_IMPORT_SETTLE", _duration("QE_IMPORT_SETTLE")),
    "import_pending_seconds": ("QE_IMPORT_PENDING_WINDOW", _duration("QE_IMPORT_PENDING_WINDOW")),
    "import_page_size": ("QE_IMPORT_PAGE_SIZE", _int("QE_IMPORT_PAGE_SIZE")),
    "phoenix_sensor_running": ("QE_PHOENIX_SENSOR_RUNNING", _bool("QE_PHOENIX_SENSOR_RUNNING")),
    "langfuse_sensor_running": ("QE_LANGFUSE_SENSOR_RUNNING", _bool("QE_LANGFUSE_SENSOR_RUNNING")),
    "import_interval_seconds": (
        "QE_IMPORT_INTERVAL_SECONDS",
        _int("QE_IMPORT_INTERVAL_SECONDS", 5),
    ),
}
ENVIRONMENT.update(
    {
        f"{source}_{field}": (name, parse)
        for source in SOURCES
        for field, name, parse in (
            (
                "evaluators",
                f"QE_{source.upper()}_EVALUATORS",
                _evaluators(f"QE_{source.upper()}_EVALUATORS"),
            ),
            (
                "label_map",
                f"QE_{source.upper()}_LABEL_MAP",
                _label_map(f"QE_{source.upper()}_LABEL_MAP"),
            ),
            ("request_id_key", f"QE_{source.upper()}_REQUEST_ID_KEY", _text),
        )
    }
)


class ImportSettings(BaseModel):
    """Importers: where `qe import phoenix|langfuse` reads judged traces, and the mapping."""

    model_config = ConfigDict(frozen=True)

    phoenix_url: str = Field(
        "http://127.0.0.1:6006", description="Phoenix's base URL (`qe import phoenix`)."
    )
    phoenix_project: str = Field(
        "default", description="The Phoenix project (name or id) whose traces are imported."
    )
    langfuse_url: str | None = Field(
        None,
        description="Langfuse's base URL, e.g. `https://cloud.langfuse.com` (`qe import "
        "langfuse` needs it; the keys: QE_LANGFUSE_PUBLIC_KEY / QE_LANGFUSE_SECRET_KEY).",
    )
    import_evaluators: dict[str, str] = Field(
        default_factory=dict,
        description='The judgements that count, each with its better direction (`"lower"` '
        "when 1 means bad, e.g. a hallucination judge); empty: every judgement, higher is "
        "better. The event's score is the worst of them (a `lower` one counts as 1 - score).",
    )
    import_label_map: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_LABEL_MAP),
        description="A judgement's label (or, without one, its name) → the event's label; "
        "unmapped labels are not labels of the event.",
    )
    import_threshold: float = Field(
        0.7, description="A judged trace becomes an event when its score is below this."
    )
    import_request_id_key: str | None = Field(
        None,
        description="The root span's metadata key holding the request id (dotted keys of "
        "nested metadata, e.g. `app.request_id`); unset: `<system>:<trace_id>`.",
    )
    import_tenant: str | None = Field(None, description="`tenant` written on imported events.")
    import_settle_seconds: float = Field(
        30.0, description="A trace is read only this long after its root span ended."
    )
    import_pending_seconds: float = Field(
        86400.0,
        description="An unjudged trace is looked at again until it is this old, then given up.",
    )
    import_page_size: int = Field(
        500, description="Spans or scores per request (Langfuse scores: at most 100)."
    )
    phoenix_sensor_running: bool = Field(
        False, description="Start `phoenix_import_sensor` running (the UI toggle overrides it)."
    )
    langfuse_sensor_running: bool = Field(
        False, description="Start `langfuse_import_sensor` running (the UI toggle overrides it)."
    )
    import_interval_seconds: int = Field(
        300, description="How often the import sensors import, in seconds."
    )
    # Per source: unset (None) takes the shared QE_IMPORT_* value above.
    phoenix_evaluators: dict[str, str] | None = Field(
        None, description="`QE_IMPORT_EVALUATORS` for Phoenix alone (unset: the shared one)."
    )
    phoenix_label_map: dict[str, str] | None = Field(
        None, description="`QE_IMPORT_LABEL_MAP` for Phoenix alone (unset: the shared one)."
    )
    phoenix_request_id_key: str | None = Field(
        None, description="`QE_IMPORT_REQUEST_ID_KEY` for Phoenix alone (unset: the shared one)."
    )
    langfuse_evaluators: dict[str, str] | None = Field(
        None, description="`QE_IMPORT_EVALUATORS` for Langfuse alone (unset: the shared one)."
    )
    langfuse_label_map: dict[str, str] | None = Field(
        None, description="`QE_IMPORT_LABEL_MAP` for Langfuse alone (unset: the shared one)."
    )
    langfuse_request_id_key: str | None = Field(
        None, description="`QE_IMPORT_REQUEST_ID_KEY` for Langfuse alone (unset: the shared one)."
    )
