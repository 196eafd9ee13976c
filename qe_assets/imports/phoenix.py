"""`qe import phoenix`: judged traces from an Arize Phoenix server's REST API.

Root spans are paged by insertion id (`sort=id&order=asc`), not by start time: a trace exported
late gets a later id, so nothing slips behind the cursor. The cursor is inclusive (Phoenix
returns the span it names again), so the first row of a page equal to the cursor is skipped. A
root is read only when it ended QE_IMPORT_SETTLE ago; an unjudged one is kept pending and looked
at again on every run until QE_IMPORT_PENDING_WINDOW has passed. Each page's events go on the
queue before the cursor moves (`state.Writer`)."""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

from qe_assets.imports.mapping import Judgement, Rules, Span, Trace, decide
from qe_assets.imports.state import (
    PHOENIX_API_KEY,
    ImportFailed,
    JsonClient,
    NotFound,
    Outcome,
    Writer,
    load_state,
    secret,
    state_path,
)
from qe_assets.settings import Settings

SYSTEM = "phoenix"
# Trace and span ids per request: each id is ~40 characters of query string, and the server
# refuses request lines much past 16 KiB.
_IDS_PER_REQUEST = 100
_MAX_PAGE = 1000  # Phoenix refuses a larger `limit` (HTTP 422)


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def client_for(settings: Settings) -> JsonClient:
    key = secret(PHOENIX_API_KEY)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return JsonClient(settings.phoenix_url, "QE_PHOENIX_URL", PHOENIX_API_KEY, headers)


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class PhoenixSource:
    def __init__(self, settings: Settings, client: JsonClient | None = None) -> None:
        self.settings = settings
        self.client = client or client_for(settings)
        self.project = settings.phoenix_project
        self.base = f"/v1/projects/{urllib.parse.quote(self.project, safe='')}"

    def _get(self, path: str, params: Sequence[tuple[str, Any]]) -> Any:
        try:
            return self.client.get(f"{self.base}{path}", params)
        except NotFound:
            raise ImportFailed(
                f"no project {self.project!r} on {self.settings.phoenix_url}: check "
                "QE_PHOENIX_PROJECT"
            ) from None

    def roots(self, cursor: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Root spans after `cursor` in insertion order, and whether more follow."""
        params: list[tuple[str, Any]] = [
            ("parent_id", "null"),
            ("sort", "id"),
            ("order", "asc"),
            # One more for the cursor's own row, within Phoenix's maximum page of 1,000.
            ("limit", min(limit + (1 if cursor else 0), _MAX_PAGE)),
            ("cursor", cursor),
        ]
        body = self._get("/spans", params)
        rows = list(body.get("data") or [])
        if cursor and rows and rows[0].get("id") == cursor:
            rows = rows[1:]  # the cursor is inclusive
        return rows, body.get("next_cursor") is not None

    def _by_ids(self, path: str, key: str, ids: Sequence[str], limit: int) -> list[dict[str, Any]]:
        """Every row of `path` for `ids` (sent as repeated `key` parameters, a chunk at a time so
        the request line stays short), following each chunk's cursor to its end."""
        rows: list[dict[str, Any]] = []
        for chunk in _chunks(ids, _IDS_PER_REQUEST):
            cursor = None
            while True:
                params = [(key, i) for i in chunk] + [("limit", limit), ("cursor", cursor)]
                body = self._get(path, params)
                rows += body.get("data") or []
                cursor = body.get("next_cursor")
                if not cursor:
                    break
        return rows

    def _spans(self, trace_ids: Sequence[str]) -> list[dict[str, Any]]:
        return self._by_ids("/spans", "trace_id", trace_ids, 1000)

    def _annotations(self, span_ids: Sequence[str]) -> list[dict[str, Any]]:
        return self._by_ids("/span_annotations", "span_ids", span_ids, 10000)

    def traces(self, trace_ids: Sequence[str]) -> dict[str, Trace]:
        """The traces with every span and judgement, by trace id (a trace without its root is
        left out: it is not complete yet)."""
        by_trace: dict[str, list[dict[str, Any]]] = {}
        for span in self._spans(trace_ids):
            by_trace.setdefault(span["context"]["trace_id"], []).append(span)
        span_ids = sorted({s["context"]["span_id"] for spans in by_trace.values() for s in spans})
        judged: dict[str, list[Judgement]] = {}
        for note in self._annotations(span_ids):
            result = note.get("result") or {}
            judged.setdefault(note["span_id"], []).append(
                Judgement(
                    name=note["name"],
                    score=result.get("score"),
                    label=result.get("label"),
                    explanation=result.get("explanation"),
                    span_id=note["span_id"],
                    key=f"{note.get('identifier') or ''}/{note.get('id') or ''}",
                )
            )
        traces: dict[str, Trace] = {}
        for trace_id, rows in by_trace.items():
            spans = [
                Span(
                    span_id=r["context"]["span_id"],
                    kind=r.get("span_kind") or "UNKNOWN",
                    start_time=r["start_time"],
                    attributes=r.get("attributes") or {},
                )
                for r in rows
            ]
            roots = [s for s, r in zip(spans, rows, strict=True) if not r.get("parent_id")]
            if not roots:
                continue
            judgements = [j for s in spans for j in judged.get(s.span_id, [])]
            traces[trace_id] = Trace(SYSTEM, self.project, trace_id, roots[0], spans, judgements)
        return traces


def import_phoenix(
    settings: Settings,
    *,
    from_start: bool = False,
    after_write: Callable[[], None] | None = None,
    now: float | None = None,
    max_pages: int | None = None,
) -> Outcome:
    """One import pass: pending traces first, then new roots page by page (each page committed
    on its own). Raises ImportFailed with one line naming the setting; the cursor stays."""
    source = PhoenixSource(settings)
    rules = Rules.from_settings(settings, "phoenix")
    path = state_path(settings, SYSTEM, settings.phoenix_project)
    state = {} if from_start else load_state(path)
    cursor: str | None = state.get("cursor")
    pending: dict[str, float] = dict(state.get("pending") or {})
    writer = Writer(settings, path, after_write)
    outcome = Outcome()
    clock = time.time() if now is None else now
    window = settings.import_pending_seconds

    def judge(trace_ids: Sequence[str], first_seen: dict[str, float]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        traces = source.traces(trace_ids)
        for trace_id in trace_ids:
            outcome.read += 1
            trace = traces.get(trace_id)
            decision = decide(trace, rules) if trace is not None else None
            if decision is None or decision.outcome == "unjudged":
                seen = first_seen.get(trace_id, clock)
                if clock - seen < window:
                    pending[trace_id] = seen
                else:
                    pending.pop(trace_id, None)
                    outcome.gave_up += 1
                continue
            pending.pop(trace_id, None)
            if decision.outcome == "skip":
                outcome.skipped += 1
                continue
            assert decision.event is not None
            events.append(decision.event)
            outcome.emitted += 1
            outcome.problems += decision.problems
        return events

    # Pending traces first: a judgement that arrived since the last run emits them now.
    waiting = sorted(pending)
    for chunk in _chunks(waiting, settings.import_page_size):
        events = judge(chunk, dict(pending))
        writer.commit(events, {"cursor": cursor, "pending": pending})
    settled_before = clock - settings.import_settle_seconds
    while max_pages is None or outcome.pages < max_pages:
        rows, more = source.roots(cursor, settings.import_page_size)
        ready: list[dict[str, Any]] = []
        for row in rows:
            if _epoch(row["end_time"]) > settled_before:
                more = False  # roots after this one wait for the next run, in order
                break
            ready.append(row)
        if not ready:
            break
        outcome.pages += 1
        trace_ids = list(dict.fromkeys(r["context"]["trace_id"] for r in ready))
        events = judge(trace_ids, {})
        cursor = ready[-1]["id"]
        writer.commit(events, {"cursor": cursor, "pending": pending})
        if not more:
            break
    outcome.pending = len(pending)
    return outcome
