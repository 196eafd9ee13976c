"""`qe import langfuse`: scored traces from Langfuse's public API.

Scores come from `GET /api/public/v3/scores` (newest first, `meta.cursor` for the next page,
`fields=subject,details` for the trace they judge and their comment); a trace's observations
from `GET /api/public/v2/observations?traceId=…` (cursor pagination too), and its metadata,
input and output from `GET /api/public/traces/{traceId}`. Each run reads the
scores stamped in [watermark, now - QE_IMPORT_SETTLE): the window's traces are mapped with all
their scores, their events put on the queue, then the watermark moves to the window's end.
A trace scored again later is read again: unchanged, its event is a duplicate; changed, a
conflicting duplicate (the first kept)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from qe_assets.imports.mapping import Judgement, Rules, Span, Trace, decide
from qe_assets.imports.state import (
    LANGFUSE_PUBLIC_KEY,
    LANGFUSE_SECRET_KEY,
    ImportFailed,
    ImportNotConfigured,
    JsonClient,
    NotFound,
    Outcome,
    Writer,
    load_state,
    secret,
    state_path,
)
from qe_assets.settings import Settings

SYSTEM = "langfuse"
SCORES_PAGE_MAX = 100  # the v3 scores endpoint refuses a larger limit (HTTP 400)
_FIELDS = "core,basic,io,metadata,model"
# Langfuse observation types → OpenInference span kinds the mapping reads.
_KINDS = {"GENERATION": "LLM"}


def _when(stamp: str) -> datetime:
    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def client_for(settings: Settings) -> JsonClient:
    if not settings.langfuse_url:
        raise ImportNotConfigured("QE_LANGFUSE_URL is not set (e.g. https://cloud.langfuse.com)")
    public, private = secret(LANGFUSE_PUBLIC_KEY), secret(LANGFUSE_SECRET_KEY)
    if not public or not private:
        raise ImportNotConfigured(
            f"{LANGFUSE_PUBLIC_KEY} and {LANGFUSE_SECRET_KEY} must both be set"
        )
    return JsonClient.basic(settings.langfuse_url, "QE_LANGFUSE_URL", public, private)


def _flatten(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """Nested metadata as dotted keys, as Phoenix's REST API gives it (`metadata.app.id`)."""
    if isinstance(value, Mapping):
        for key, inner in value.items():
            yield from _flatten(inner, f"{prefix}.{key}")
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from _flatten(inner, f"{prefix}.{i}")
    else:
        yield prefix, value


def _decoded(raw: Any) -> Any:
    """Observations' input/output arrive as raw text: JSON when it parses, else the text."""
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    return None if value is None else json.dumps(value, ensure_ascii=False, sort_keys=True)


def span_of(observation: Mapping[str, Any], problems: list[str]) -> Span:
    """One v2 observation as the mapping's span: OpenInference attribute names."""
    kind = str(observation.get("type") or "SPAN")
    attributes: dict[str, Any] = {}
    attributes.update(_flatten(observation.get("metadata") or {}, "metadata"))
    given_in, given_out = _decoded(observation.get("input")), _decoded(observation.get("output"))
    if (question := _text(given_in)) is not None:
        attributes["input.value"] = question
    if (answer := _text(given_out)) is not None:
        attributes["output.value"] = answer
    if observation.get("providedModelName"):
        attributes["llm.model_name"] = observation["providedModelName"]
    if kind == "GENERATION":
        messages = given_in if isinstance(given_in, list) else []
        for i, message in enumerate(m for m in messages if isinstance(m, Mapping)):
            attributes[f"llm.input_messages.{i}.message.role"] = message.get("role")
            attributes[f"llm.input_messages.{i}.message.content"] = message.get("content")
        out = given_out.get("content") if isinstance(given_out, Mapping) else given_out
        if isinstance(out, str):
            attributes["llm.output_messages.0.message.content"] = out
    if kind == "RETRIEVER":
        docs = given_out.get("documents") if isinstance(given_out, Mapping) else given_out
        if not isinstance(docs, list):
            problems.append(
                f"observation {observation.get('id')}: a retriever's output is not a list of "
                "documents; the event has no docs"
            )
            docs = []
        for i, doc in enumerate(docs):
            doc = doc.get("document", doc) if isinstance(doc, Mapping) else {}
            for name in ("id", "content", "score"):
                if doc.get(name) is not None:
                    attributes[f"retrieval.documents.{i}.document.{name}"] = doc[name]
            if "id" not in doc and "content" not in doc and "score" not in doc:
                # Keep the position: the event then names the document without content.
                attributes[f"retrieval.documents.{i}.document.id"] = None
    return Span(
        span_id=str(observation.get("id")),
        kind=_KINDS.get(kind, kind),
        start_time=str(observation.get("startTime")),
        attributes=attributes,
    )


def with_trace_fields(root: Span, trace: Mapping[str, Any]) -> Span:
    """The root observation completed by its trace (`GET /api/public/traces/{id}`): SDKs often set
    the request's metadata, input and output on the trace, not on the root observation. The
    root's own values win."""
    attributes = dict(_flatten(trace.get("metadata") or {}, "metadata"))
    for key, value in (("input.value", trace.get("input")), ("output.value", trace.get("output"))):
        if (text := _text(value)) is not None:
            attributes[key] = text
    attributes.update(root.attributes)
    return Span(root.span_id, root.kind, root.start_time, attributes)


def judgement_of(score: Mapping[str, Any]) -> Judgement | None:
    """A v3 score as a judgement: NUMERIC and BOOLEAN have a score, CATEGORICAL a label."""
    kind, value = score.get("dataType"), score.get("value")
    subject = score.get("subject") or {}
    numeric: float | None = None
    label: str | None = None
    if kind == "NUMERIC" and isinstance(value, int | float):
        numeric = float(value)
    elif kind == "BOOLEAN" and isinstance(value, bool):
        numeric = 1.0 if value else 0.0
    elif kind == "CATEGORICAL" and isinstance(value, str):
        label = value
    else:
        return None  # TEXT and CORRECTION scores judge nothing
    span = subject.get("id", "") if subject.get("kind") == "observation" else ""
    return Judgement(
        name=str(score.get("name")),
        score=numeric,
        label=label,
        explanation=score.get("comment"),
        span_id=str(span),
        key=str(score.get("id")),
    )


def _trace_of_score(score: Mapping[str, Any]) -> str | None:
    subject = score.get("subject") or {}
    if subject.get("kind") == "trace":
        return subject.get("id")
    if subject.get("kind") == "observation":
        return subject.get("traceId")
    return None


class LangfuseSource:
    def __init__(self, settings: Settings, client: JsonClient | None = None) -> None:
        self.settings = settings
        self.client = client or client_for(settings)
        self.limit = min(settings.import_page_size, SCORES_PAGE_MAX)

    def _get(self, path: str, params: Sequence[tuple[str, Any]]) -> Any:
        try:
            return self.client.get(path, params)
        except NotFound:
            raise ImportFailed(
                f"{self.settings.langfuse_url}{path} is not there (HTTP 404): check "
                "QE_LANGFUSE_URL (the v3 scores API needs Langfuse 3.179 or later)"
            ) from None

    def scores(self, params: Sequence[tuple[str, Any]] = ()) -> Iterator[dict[str, Any]]:
        cursor = None
        while True:
            body = self._get(
                "/api/public/v3/scores",
                [*params, ("limit", self.limit), ("fields", "subject,details"), ("cursor", cursor)],
            )
            yield from body.get("data") or []
            cursor = (body.get("meta") or {}).get("cursor")
            if not cursor:
                return

    def observations(self, trace_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        cursor = None
        while True:
            body = self._get(
                "/api/public/v2/observations",
                [("traceId", trace_id), ("fields", _FIELDS), ("limit", 1000), ("cursor", cursor)],
            )
            found += body.get("data") or []
            cursor = (body.get("meta") or {}).get("cursor")
            if not cursor:
                return found

    def trace(self, trace_id: str, project: str, problems: list[str]) -> Trace | None:
        rows = self.observations(trace_id)
        spans = [span_of(r, problems) for r in rows]
        roots = [s for s, r in zip(spans, rows, strict=True) if not r.get("parentObservationId")]
        if not roots:
            return None
        roots.sort(key=lambda s: (s.start_time, s.span_id))
        try:
            details = self.client.get(f"/api/public/traces/{quote(trace_id)}")
        except NotFound:
            # Langfuse serves trace reads up to ~10 minutes late (QE_IMPORT_SETTLE covers it).
            problems.append(
                f"trace {trace_id}: not readable yet; its trace-level fields are missing"
            )
            details = {}
        root = with_trace_fields(roots[0], details)
        spans = [root if s is roots[0] else s for s in spans]
        judgements = [
            j for s in self.scores([("traceId", trace_id)]) if (j := judgement_of(s)) is not None
        ]
        return Trace(SYSTEM, project, trace_id, root, spans, judgements)


def import_langfuse(
    settings: Settings,
    *,
    from_start: bool = False,
    after_write: Callable[[], None] | None = None,
    now: float | None = None,
) -> Outcome:
    """One import pass over the scores stamped since the last one (see the module's doc)."""
    source = LangfuseSource(settings)
    rules = Rules.from_settings(settings, "langfuse")
    path = state_path(settings, SYSTEM, settings.langfuse_url or "")
    state = {} if from_start else load_state(path)
    lower = _when(state["watermark"]) if state.get("watermark") else None
    clock = time.time() if now is None else now
    upper = datetime.fromtimestamp(clock - settings.import_settle_seconds, UTC)
    trace_ids: dict[str, str] = {}  # trace id → its project id, in the order first seen
    for score in source.scores():
        stamp = _when(score["timestamp"])
        if lower is not None and stamp < lower:
            break  # newest first: the rest was read by an earlier run
        if stamp >= upper:
            continue  # too fresh: the next run reads it, with the judgements that follow
        if (trace_id := _trace_of_score(score)) is not None:
            trace_ids.setdefault(trace_id, str(score.get("projectId") or ""))
    writer = Writer(settings, path, after_write)
    outcome = Outcome()
    ordered = list(trace_ids)
    for start in range(0, len(ordered), settings.import_page_size):
        events = []
        for trace_id in ordered[start : start + settings.import_page_size]:
            outcome.read += 1
            problems: list[str] = []
            trace = source.trace(trace_id, trace_ids[trace_id], problems)
            decision = decide(trace, rules) if trace is not None else None
            if decision is None or decision.outcome == "unjudged":
                outcome.gave_up += 1
                continue
            if decision.outcome == "skip":
                outcome.skipped += 1
                continue
            assert decision.event is not None
            events.append(decision.event)
            outcome.emitted += 1
            outcome.problems += problems + list(decision.problems)
        outcome.pages += 1
        writer.commit(events, {"watermark": state.get("watermark") if not from_start else None})
    writer.commit([], {"watermark": upper.isoformat()})
    return outcome
