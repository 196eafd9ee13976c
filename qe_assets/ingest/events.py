"""The quality event (CONTRACT §1) for the ingester: the raw_events row shape and label
normalisation; the pydantic model itself is in `event_model` (light enough for producers).

Labels are normalised here and nowhere else: `normalised_labels` and `primary_label` are Polars
expressions, so every table and transform that speaks of labels derives them the same way.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import polars as pl
from pydantic import ValidationError

from qe_assets.service.answer_counts import is_count_record, parse_count_record
from qe_assets.service.event_model import (  # noqa: F401 (re-exported: the event's one public home)
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
from qe_assets.store import sql_over_frames

DOC_DTYPE = pl.Struct(
    {"id": pl.String, "content": pl.String, "score": pl.Float64, "meta": pl.String}
)
RAW_EVENT_SCHEMA: dict[str, pl.DataType] = {
    "request_id": pl.String(),
    "question": pl.String(),
    "docs": pl.List(DOC_DTYPE),
    "answer": pl.String(),
    "evaluation": pl.String(),
    "score": pl.Float64(),
    "labels": pl.List(pl.String),
    "checks": pl.String(),
    "timestamp": pl.Datetime("us"),
    "extra": pl.String(),
    "fingerprint": pl.String(),
    "source": pl.String(),
    "payload": pl.String(),
    "model": pl.String(),
}
REJECTED_SCHEMA: dict[str, pl.DataType] = {
    "source": pl.String(),
    "payload": pl.String(),
    "field": pl.String(),
    "reason": pl.String(),
    "request_id": pl.String(),
}
# Rows of `answer_counts` (qe_assets.service.answer_counts): count records share the events' queue.
COUNT_SCHEMA: dict[str, pl.DataType] = {
    "flush_id": pl.String(),
    "model": pl.String(),
    "answers": pl.Int64(),
    "low": pl.Int64(),
    "threshold": pl.Float64(),
    "producer": pl.String(),
    "window_start": pl.Datetime("us"),
    "window_end": pl.Datetime("us"),
    "source": pl.String(),
}


def _no_counts() -> pl.DataFrame:
    return pl.DataFrame(schema=COUNT_SCHEMA)


@dataclass(frozen=True)
class ParsedRecords:
    """A batch split into rows for raw_events, rejected_events and answer_counts."""

    events: pl.DataFrame
    rejected: pl.DataFrame
    counts: pl.DataFrame = field(default_factory=_no_counts)


@dataclass(frozen=True)
class ValidatedRecords:
    """A batch after validation, before its events get their fingerprints.

    The ingester hands this to the store, whose INSERT fingerprints it (`FINGERPRINT_SQL`);
    `fingerprinted` computes the same digests apart from any store (`parse_records`).
    """

    events: pl.DataFrame  # _EVENT_COLUMNS plus docs and labels, timestamp as given
    rejected: pl.DataFrame
    received_at: datetime
    counts: pl.DataFrame = field(default_factory=_no_counts)

    def fingerprinted(self) -> ParsedRecords:
        fingerprints = sql_over_frames(_FINGERPRINT, batch_events=self.events)
        rows = self.events.join(
            fingerprints, on="pos", how="left", maintain_order="left"
        ).with_columns(
            pl.col("timestamp_given").fill_null(pl.lit(self.received_at, dtype=pl.Datetime("us")))
        )
        return ParsedRecords(
            events=rows.rename({"timestamp_given": "timestamp"}).select(list(RAW_EVENT_SCHEMA)),
            rejected=self.rejected,
            counts=self.counts,
        )


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _request_id_hint(text: str) -> str | None:
    """Best-effort request_id of a rejected record, so users can find it again."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        # The model already rejected the record; nesting deep enough to exhaust Python's stack
        # must not turn a rejection into a crash of the whole batch.
        return None
    rid = value.get("request_id") if isinstance(value, dict) else None
    if not isinstance(rid, str):
        return None
    # Python's json accepts lone surrogate escapes, which no table column can store.
    return rid.strip().encode("utf-8", errors="backslashreplace").decode() or None


def _rejection(source: str, payload: str, field: str, reason: str, rid: str | None) -> dict:
    return {
        "source": source,
        "payload": payload,
        "field": field,
        "reason": reason,
        "request_id": rid,
    }


def rejected_row(raw: bytes | str, source: str, error: BaseException) -> pl.DataFrame:
    """The rejected row of a record that passed validation but could not be stored (a value no
    column or frame can hold): the store's error, first line, as the reason."""
    text = raw.decode("utf-8", errors="backslashreplace") if isinstance(raw, bytes) else raw
    text = text.encode("utf-8", errors="backslashreplace").decode()
    message = (str(error).strip().splitlines() or [""])[0][:300]
    reason = f"payload: could not be stored ({type(error).__name__}: {message})"
    row = _rejection(source, text, "payload", reason, _request_id_hint(text))
    return pl.DataFrame([row], schema=REJECTED_SCHEMA)


# Content identity of a re-send: the typed fields, so key order and whitespace do not matter.
# A DuckDB expression over the columns of `ValidatedRecords.events` (its JSON rendering is the
# stored fingerprints' definition): the ingester computes it inside the store's INSERT.
FINGERPRINT_SQL = """
sha256(to_json({'request_id': request_id, 'question': question, 'docs': docs,
                'answer': answer, 'score': score, 'labels': labels,
                'checks': checks::JSON, 'timestamp': timestamp_given,
                'extra': extra::JSON}))
"""
# Only the key and the digest come back, so the batch's text is never copied through a result.
_FINGERPRINT = f"SELECT pos, {FINGERPRINT_SQL} AS fingerprint FROM batch_events"

_EVENT_COLUMNS: dict[str, pl.DataType] = {
    "pos": pl.Int64(),
    "request_id": pl.String(),
    "question": pl.String(),
    "answer": pl.String(),
    "evaluation": pl.String(),
    "score": pl.Float64(),
    "checks": pl.String(),
    "timestamp_given": pl.Datetime("us"),
    "extra": pl.String(),
    "source": pl.String(),
    "payload": pl.String(),
    "model": pl.String(),
}
_LABEL_COLUMNS: dict[str, pl.DataType] = {"pos": pl.Int64(), "label": pl.String()}
_DOC_COLUMNS: dict[str, pl.DataType] = {
    "pos": pl.Int64(),
    "ord": pl.Int64(),
    "id": pl.String(),
    "content": pl.String(),
    "score": pl.Float64(),
    "meta": pl.String(),
}


def parse_records(
    records: Sequence[bytes | str],
    sources: Sequence[str],
    *,
    received_at: datetime | None = None,
) -> ParsedRecords:
    """Validate raw JSON records; each one becomes exactly one event row or one rejected row.

    Fingerprints come from a private in-memory DuckDB, so parsing never holds the store's write
    lock.
    """
    return validate_records(records, sources, received_at=received_at).fingerprinted()


def _rejection_of(raw: bytes | str, source: str) -> dict[str, Any] | QualityEvent:
    """The rejected row of a record that the fast validator refused, with QualityEvent's reason;
    the model itself if it accepts the record after all (the two agree by design and by test)."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            reason = f"payload: not valid UTF-8 ({exc.reason} at byte {exc.start})"
            payload = raw.decode("utf-8", errors="backslashreplace")
            return _rejection(source, payload, "payload", reason, None)
    else:
        text = raw
    try:
        return QualityEvent.model_validate_json(text)
    except ValidationError as exc:
        field, reason = describe_errors(exc)
        payload = text.encode("utf-8", errors="backslashreplace").decode()
        return _rejection(source, payload, field, reason, _request_id_hint(text))


def validate_records(
    records: Sequence[bytes | str],
    sources: Sequence[str],
    *,
    received_at: datetime | None = None,
) -> ValidatedRecords:
    """`parse_records` without the fingerprints.

    pydantic (Rust) judges every record: `EVENT_FIELDS` validates it into plain dicts, and a
    record it refuses is judged again by `QualityEvent` for the reason. What Python does per
    record is only to hand the fields over as columns: documents and labels go into flat frames
    and are regrouped into lists by Polars, because building nested rows record by record cost
    more than validation. Payloads stay bytes until Polars checks them as UTF-8 all at once.
    """
    if len(records) != len(sources):
        raise ValueError("records and sources must have the same length")
    received_at = received_at or datetime.now(UTC).replace(tzinfo=None)
    events: dict[str, list[Any]] = {name: [] for name in _EVENT_COLUMNS}
    docs: dict[str, list[Any]] = {name: [] for name in _DOC_COLUMNS}
    labels: dict[str, list[Any]] = {name: [] for name in _LABEL_COLUMNS}
    rejected: list[dict[str, Any]] = []
    counts: list[dict[str, Any]] = []
    # The batch allocates many objects and frees them all at once, and none is part of a cycle:
    # the cyclic collector would only walk them again and again.
    collecting = gc.isenabled()
    gc.disable()
    try:
        for pos, (raw, source) in enumerate(zip(records, sources, strict=True)):
            if is_count_record(raw):
                _take_counts(raw, source, counts, rejected)
                continue
            try:
                event = EVENT_FIELDS.validate_json(raw)
            except ValidationError:
                judged = _rejection_of(raw, source)
                if isinstance(judged, dict):
                    rejected.append(judged)
                    continue
                event = judged.model_dump(exclude_unset=True)
            evaluation = event["evaluation"]
            events["pos"].append(pos)
            events["request_id"].append(event["request_id"])
            events["question"].append(event["question"])
            events["answer"].append(event["answer"])
            events["evaluation"].append(_json(evaluation))
            events["score"].append(float(evaluation["score"]))
            if event_labels := evaluation.get("labels"):
                labels["pos"].extend([pos] * len(event_labels))
                labels["label"].extend(event_labels)
            events["checks"].append(_json(evaluation.get("checks") or {}))
            stamp = event.get("timestamp")
            events["timestamp_given"].append(parse_timestamp(stamp) if stamp else None)
            extra = {k: v for k, v in event.items() if k not in _EVENT_KEYS}
            events["extra"].append(_json(extra) if extra else None)
            events["source"].append(source)
            events["payload"].append(raw if isinstance(raw, bytes) else raw.encode())
            events["model"].append(event.get("model"))
            for ord_, doc in enumerate(event["docs"]):
                score = doc.get("score")
                meta = {k: v for k, v in doc.items() if k not in _DOC_KEYS}
                docs["pos"].append(pos)
                docs["ord"].append(ord_)
                docs["id"].append(doc["id"])
                docs["content"].append(doc["content"])
                docs["score"].append(None if score is None else float(score))
                docs["meta"].append(_json(meta) if meta else None)
    finally:
        if collecting:
            gc.enable()
    return ValidatedRecords(
        _event_frame(events, docs, labels),
        pl.DataFrame(rejected, schema=REJECTED_SCHEMA),
        received_at,
        pl.DataFrame(counts, schema=COUNT_SCHEMA),
    )


def _event_frame(
    events: dict[str, list[Any]], docs: dict[str, list[Any]], labels: dict[str, list[Any]]
) -> pl.DataFrame:
    """The validated events' columns as one frame: the flat documents and labels regrouped into
    each event's lists by Polars, payloads checked as UTF-8 all at once."""
    doc_lists = (
        pl.DataFrame(docs, schema=_DOC_COLUMNS)
        .group_by("pos", maintain_order=True)
        .agg(pl.struct("id", "content", "score", "meta").alias("docs"))
    )
    label_lists = (
        pl.DataFrame(labels, schema=_LABEL_COLUMNS)
        .group_by("pos", maintain_order=True)
        .agg(pl.col("label").alias("labels"))
    )
    return (
        pl.DataFrame(events, schema={**_EVENT_COLUMNS, "payload": pl.Binary()})
        .with_columns(pl.col("payload").cast(pl.String))
        .join(doc_lists, on="pos", how="left", maintain_order="left")
        .join(label_lists, on="pos", how="left", maintain_order="left")
        .with_columns(
            pl.col("docs").fill_null(pl.lit([], dtype=RAW_EVENT_SCHEMA["docs"])),
            pl.col("labels").fill_null(pl.lit([], dtype=RAW_EVENT_SCHEMA["labels"])),
        )
    )


def _take_counts(
    raw: bytes | str, source: str, counts: list[dict[str, Any]], rejected: list[dict[str, Any]]
) -> None:
    """A count record's rows into `counts`, or one rejected row naming the field."""
    try:
        rows = parse_count_record(raw)
    except ValueError as exc:
        text = raw.decode("utf-8", errors="backslashreplace") if isinstance(raw, bytes) else raw
        reason = str(exc)
        field = getattr(exc, "field", None) or reason.split(":", 1)[0]
        rejected.append(_rejection(source, text, field, reason, None))
        return
    counts.extend({**row, "source": source} for row in rows)


def normalised_labels(labels: pl.Expr) -> pl.Expr:
    """Trim, lower-case, map Chinese aliases to the English names, drop blanks."""
    cleaned = pl.element().str.strip_chars().str.to_lowercase()
    return labels.list.eval(cleaned.replace(LABEL_ALIASES).filter(cleaned.str.len_chars() > 0))


def primary_label(labels: pl.Expr) -> pl.Expr:
    """Highest-priority known label of normalised labels; else the first; else `unspecified`."""
    chain = pl.when(labels.list.contains(KNOWN_LABELS[0])).then(pl.lit(KNOWN_LABELS[0]))
    for label in KNOWN_LABELS[1:]:
        chain = chain.when(labels.list.contains(label)).then(pl.lit(label))
    return chain.otherwise(labels.list.first()).fill_null(UNSPECIFIED)
