"""Moved to `qe_assets.service.event_model` (the light service package); this path keeps
working, private names included (`qe_assets.events` re-exports them too)."""

from qe_assets.service.event_model import (  # noqa: F401
    _DOC_KEYS,
    _EVENT_KEYS,
    EVENT_FIELDS,
    KNOWN_LABELS,
    LABEL_ALIASES,
    UNSPECIFIED,
    Doc,
    Evaluation,
    QualityEvent,
    _DocFields,
    _EvaluationFields,
    _EventFields,
    describe_errors,
    parse_timestamp,
    validate_event,
)
