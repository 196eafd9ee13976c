"""One judged trace → one quality event (docs/events.md, "Importing"): pure functions, shared by
the Phoenix and Langfuse importers.

Nothing is guessed: a document without content keeps no content (the ingester rejects the event
naming `docs.N.content`), a request-id key that a trace lacks leaves the event without a
`request_id` (rejected naming it), a score outside [0, 1] stays as it is (rejected naming
`evaluation.score`). The event's text is deterministic (sorted keys, no fetch time), so a replay
is a duplicate in `raw_events` and a changed judgement a conflicting one."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qe_assets.settings import Settings

_DOC_KEY = re.compile(r"retrieval\.documents\.(\d+)\.document\.(id|content|score)")
_MESSAGE_KEY = re.compile(r"llm\.(input|output)_messages\.(\d+)\.message\.(role|content)")


@dataclass(frozen=True)
class Judgement:
    """One evaluation of a span or trace: Phoenix's span annotation, Langfuse's score."""

    name: str
    score: float | None
    label: str | None = None
    explanation: str | None = None
    span_id: str = ""
    # Sorts judgements of one name: the same order every run, whatever the server's order.
    key: str = ""


@dataclass(frozen=True)
class Span:
    """A span (Phoenix) or observation (Langfuse) as the mapping needs it: flat attributes."""

    span_id: str
    kind: str  # OpenInference span kind: CHAIN, RETRIEVER, LLM, ... (Langfuse: its type)
    start_time: str
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Trace:
    system: str  # "phoenix" / "langfuse"
    project: str
    trace_id: str
    root: Span
    spans: Sequence[Span]  # every span of the trace, the root included
    judgements: Sequence[Judgement]


@dataclass(frozen=True)
class Rules:
    evaluators: Mapping[str, str]
    label_map: Mapping[str, str]
    threshold: float
    request_id_key: str | None
    tenant: str | None

    @classmethod
    def from_settings(cls, settings: Settings, system: str) -> Rules:
        """The rules for one source: its own QE_<SOURCE>_* mapping where set, else the shared
        QE_IMPORT_* one."""

        def own(name: str) -> Any:
            value = getattr(settings, f"{system}_{name}", None)
            return getattr(settings, f"import_{name}") if value is None else value

        return cls(
            evaluators=own("evaluators"),
            label_map={k.strip().lower(): v for k, v in own("label_map").items()},
            threshold=settings.import_threshold,
            request_id_key=own("request_id_key"),
            tenant=settings.import_tenant,
        )


@dataclass(frozen=True)
class Decision:
    """`emit` (with the event), `skip` (judged, not low enough) or `unjudged` (no judgement
    that counts yet: kept pending)."""

    outcome: str
    event: dict[str, Any] | None = None
    problems: tuple[str, ...] = ()


def event_line(event: Mapping[str, Any]) -> str:
    """The event's one canonical text: the same bytes for the same content, every run."""
    return json.dumps(event, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _indexed(attributes: Mapping[str, Any], pattern: re.Pattern[str]) -> dict[tuple[str, ...], Any]:
    found: dict[tuple[str, ...], Any] = {}
    for key, value in attributes.items():
        match = pattern.fullmatch(key)
        if match:
            found[match.groups()] = value
    return found


def documents(span: Span) -> tuple[list[dict[str, Any]], list[str]]:
    """A retriever span's `retrieval.documents.{i}.document.{id,content,score}` as event docs,
    in position order, and a problem line per document without content (kept without it)."""
    parts = _indexed(span.attributes, _DOC_KEY)
    positions = sorted({int(position) for position, _ in parts})
    docs: list[dict[str, Any]] = []
    problems: list[str] = []
    for position in positions:
        doc: dict[str, Any] = {}
        for name in ("id", "content", "score"):
            value = parts.get((str(position), name))
            if value is not None:
                doc[name] = value
        if "content" not in doc:
            problems.append(
                f"span {span.span_id}: retrieval.documents.{position} has no content "
                "(the event is rejected naming it; content is never guessed)"
            )
        docs.append(doc)
    return docs, problems


def _messages(span: Span, direction: str) -> list[dict[str, Any]]:
    parts = _indexed(span.attributes, _MESSAGE_KEY)
    by_position: dict[int, dict[str, Any]] = {}
    for (way, position, name), value in parts.items():
        if way == direction:
            by_position.setdefault(int(position), {})[name] = value
    return [by_position[p] for p in sorted(by_position)]


def _ordered(spans: Sequence[Span], kind: str) -> list[Span]:
    return sorted((s for s in spans if s.kind == kind), key=lambda s: (s.start_time, s.span_id))


def question_of(trace: Trace) -> str | None:
    """The root's `input.value`, else the last user message of the last LLM span."""
    value = trace.root.attributes.get("input.value")
    if isinstance(value, str):
        return value
    for span in reversed(_ordered(trace.spans, "LLM")):
        users = [m for m in _messages(span, "input") if m.get("role") == "user"]
        if users and isinstance(users[-1].get("content"), str):
            return str(users[-1]["content"])
    return None


def answer_of(trace: Trace) -> str | None:
    """The root's `output.value`, else the last LLM span's last output message."""
    value = trace.root.attributes.get("output.value")
    if isinstance(value, str):
        return value
    for span in reversed(_ordered(trace.spans, "LLM")):
        outputs = _messages(span, "output")
        if outputs and isinstance(outputs[-1].get("content"), str):
            return str(outputs[-1]["content"])
    return None


def model_of(trace: Trace) -> str | None:
    for span in reversed(_ordered(trace.spans, "LLM")):
        name = span.attributes.get("llm.model_name")
        if isinstance(name, str) and name.strip():
            return name
    return None


def counted(judgements: Sequence[Judgement], rules: Rules) -> list[Judgement]:
    """The judgements that count (configured ones, or all when none are), in a fixed order."""
    chosen = [j for j in judgements if not rules.evaluators or j.name in rules.evaluators]
    return sorted(chosen, key=lambda j: (j.name, j.span_id, j.key))


def badness(judgement: Judgement, rules: Rules) -> float | None:
    """The judgement's score with higher = better (a `lower` evaluator's score is flipped)."""
    if judgement.score is None:
        return None
    if rules.evaluators.get(judgement.name) == "lower":
        return 1.0 - judgement.score
    return judgement.score


def evaluation_of(judgements: Sequence[Judgement], rules: Rules) -> dict[str, Any] | None:
    """`{score, labels, checks}` from the counted judgements, or None when none has a score."""
    chosen = counted(judgements, rules)
    scores = [s for s in (badness(j, rules) for j in chosen) if s is not None]
    if not scores:
        return None
    labels: list[str] = []
    checks: dict[str, Any] = {}
    for judgement in chosen:
        raw = (judgement.label or judgement.name).strip().lower()
        mapped = rules.label_map.get(raw)
        if mapped and mapped not in labels:
            labels.append(mapped)
        name, n = judgement.name, 2
        while name in checks:  # one judge on several spans: every judgement is kept
            name, n = f"{judgement.name}#{n}", n + 1
        checks[name] = {
            "label": judgement.label,
            "score": judgement.score,
            "explanation": judgement.explanation,
        }
    return {"score": min(scores), "labels": labels, "checks": checks}


def decide(trace: Trace, rules: Rules) -> Decision:
    """Emit, skip or keep pending one trace; the event is built only for `emit`."""
    evaluation = evaluation_of(trace.judgements, rules)
    if evaluation is None:
        return Decision("unjudged")
    if evaluation["score"] >= rules.threshold:
        return Decision("skip")
    problems: list[str] = []
    event: dict[str, Any] = {
        "evaluation": evaluation,
        "origin": {
            "system": trace.system,
            "project": trace.project,
            "trace_id": trace.trace_id,
            "span_id": trace.root.span_id,
        },
        "timestamp": trace.root.start_time,
    }
    if rules.request_id_key:
        request_id = trace.root.attributes.get(f"metadata.{rules.request_id_key}")
        if request_id is None:
            problems.append(
                f"trace {trace.trace_id}: no metadata.{rules.request_id_key} on the root span "
                "(QE_IMPORT_REQUEST_ID_KEY); the event is rejected naming request_id"
            )
        else:
            event["request_id"] = str(request_id)
    else:
        event["request_id"] = f"{trace.system}:{trace.trace_id}"
    question, answer = question_of(trace), answer_of(trace)
    if question is not None:
        event["question"] = question
    if answer is not None:
        event["answer"] = answer
    retrievers = _ordered(trace.spans, "RETRIEVER")
    docs: list[dict[str, Any]] = []
    if retrievers:
        docs, doc_problems = documents(retrievers[-1])
        problems += doc_problems
    event["docs"] = docs
    if (model := model_of(trace)) is not None:
        event["model"] = model
    if rules.tenant:
        event["tenant"] = rules.tenant
    return Decision("emit", event, tuple(problems))
