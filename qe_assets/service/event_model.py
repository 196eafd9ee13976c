"""The quality event's model (CONTRACT §1) as producers see it: pydantic only.

`capture` validates with it on the request path, so it lives in the light service package
(pydantic only); `qe_assets.ingest.events` builds the ingester's rows on top of it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, NotRequired

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    TypeAdapter,
    ValidationError,
)
from typing_extensions import TypedDict  # pydantic needs this one on Python < 3.12

# Priority order: the first of these present on an event is its primary label.
KNOWN_LABELS: tuple[str, ...] = (
    "factuality_error",
    "incomplete_answer",
    "low_relevance",
    "overconfidence",
)
UNSPECIFIED = "unspecified"
LABEL_ALIASES: dict[str, str] = {
    "事实性错误": "factuality_error",
    "回答不完整": "incomplete_answer",
    "相关性低": "low_relevance",
    "可能过度自信": "overconfidence",
    "过度自信": "overconfidence",
}

# Strict: "0.4" or true are producer bugs to surface, not values to coerce (ints are fine).
Score = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False, strict=True)]
DocScore = Annotated[float, Field(allow_inf_nan=False, strict=True)]


def _int_to_str(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _request_id_not_blank(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _model_not_blank(value: str | None) -> str | None:
    # Kept as given (it is also kept verbatim among the extra fields); only a blank name is a
    # producer bug worth a rejection.
    if value is not None and not value.strip():
        raise ValueError("must not be empty when given")
    return value


def _timestamp_iso8601(value: str | None) -> str | None:
    if value is not None:
        parse_timestamp(value)
    return value


# Many retrievers emit integer ids; accept them as their decimal text.
DocId = Annotated[StrictStr, BeforeValidator(_int_to_str)]
RequestId = Annotated[StrictStr, AfterValidator(_request_id_not_blank)]
Timestamp = Annotated[StrictStr | None, AfterValidator(_timestamp_iso8601)]
# Which model answered (the A/B rollout's arm); optional, events without it work as before.
ModelName = Annotated[StrictStr | None, AfterValidator(_model_not_blank)]


class Doc(BaseModel):
    """One retrieved document; keys beyond id/content/score are kept in `meta`."""

    model_config = ConfigDict(extra="allow")

    id: DocId
    content: StrictStr
    score: DocScore | None = None


class Evaluation(BaseModel):
    model_config = ConfigDict(extra="allow")

    score: Score
    labels: list[StrictStr] | None = None
    checks: dict[str, Any] | None = None


class QualityEvent(BaseModel):
    """One event as producers send it; unknown top-level fields are kept verbatim."""

    model_config = ConfigDict(extra="allow")

    request_id: RequestId
    question: StrictStr
    docs: list[Doc]
    answer: StrictStr
    evaluation: Evaluation
    timestamp: Timestamp = None
    model: ModelName = None


# The same rules validated into plain dicts, which is what the ingester needs and about twice as
# fast as building model instances. An optional field is absent when the record leaves it out,
# so a result equals `QualityEvent.model_dump(exclude_unset=True)`. Error messages differ from the
# model's in places (dict_type for model_type), so a record this rejects is judged again by
# QualityEvent, the one source of rejection reasons.
class _DocFields(TypedDict):
    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]

    id: DocId
    content: StrictStr
    score: NotRequired[DocScore | None]


class _EvaluationFields(TypedDict):
    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]

    score: Score
    labels: NotRequired[list[StrictStr] | None]
    checks: NotRequired[dict[str, Any] | None]


class _EventFields(TypedDict):
    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]

    request_id: RequestId
    question: StrictStr
    docs: list[_DocFields]
    answer: StrictStr
    evaluation: _EvaluationFields
    timestamp: NotRequired[Timestamp]
    model: NotRequired[ModelName]


EVENT_FIELDS = TypeAdapter(_EventFields)
_DOC_KEYS = frozenset(_DocFields.__annotations__)
# `model` stays among the extra fields too: an event's fingerprint (and its `extra` column) is
# what it was before `model` became a field, so a re-send across the upgrade is a duplicate.
_EVENT_KEYS = frozenset(_EventFields.__annotations__) - {"model"}


def parse_timestamp(value: str) -> datetime:
    """ISO-8601 → naive UTC; a timestamp without offset is taken to be UTC already."""
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not an ISO-8601 timestamp: {value[:64]!r}") from None
    if parsed.tzinfo is not None:
        try:
            parsed = parsed.astimezone(UTC).replace(tzinfo=None)
        except OverflowError:
            # pydantic makes a field error of ValueError only; anything else crashes the batch.
            raise ValueError(f"outside years 1-9999 in UTC: {value[:64]!r}") from None
    return parsed


def describe_errors(error: ValidationError) -> tuple[str, str]:
    """(first field, reason naming every failing field) from a pydantic error."""
    parts: list[str] = []
    first_field = ""
    for item in error.errors(include_url=False):
        loc = ".".join(str(p) for p in item["loc"]) or "payload"
        first_field = first_field or loc
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "model_type" and loc == "payload":
            message = "expected a JSON object"
        parts.append(f"{loc}: {message}")
    return first_field, "; ".join(parts)


def validate_event(payload: dict[str, Any] | str) -> QualityEvent:
    """Validate one event (for producers); raises pydantic.ValidationError naming the fields."""
    if isinstance(payload, str):
        return QualityEvent.model_validate_json(payload)
    return QualityEvent.model_validate(payload)
