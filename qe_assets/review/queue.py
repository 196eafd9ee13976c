"""Reading the review queue: filters, the priority order, pages, totals and reviewer progress.

Shared by `qe review` and the review page (`qe serve`), so both show the same queue in the same
order. Read-only: decisions are written by `qe_assets.review.decisions`.

The order (docs/review.md states it for people) puts first what is most worth a reviewer's
minute, by a priority that adds four parts:

* label risk: factuality_error 3, incomplete_answer 2, overconfidence 1.5, low_relevance 1,
  any other label 0.5 — a wrong fact taught to a model costs more than a loose answer;
* judge doubt, 0..2: 2 when the judge scored the proposed completion and the original alike,
  0 when it saw a difference of 5 points or more (a clear call needs a person least); 1 when no
  judge looked;
* recurrence, 0..3: ln of how many samples share the question — a fix there helps many users;
* low confidence, 0..1: 1 - confidence.

Ties go to the longest waiting sample, then the sample id, so pages are stable.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import duckdb

from qe_assets.review.calibration import JUDGE_CHECK

PENDING = "pending"
STATUSES = ("pending", "accepted", "edited", "rejected")
# Why a sample was queued: review.LOW_CONFIDENCE, review.SPOT_CHECK, and the judge's approvals
# held for a person (qe_assets.annotate.complete).
REASONS = ("low_confidence", "spot_check", JUDGE_CHECK)
LABEL_RISK = {
    "factuality_error": 3.0,
    "incomplete_answer": 2.0,
    "overconfidence": 1.5,
    "low_relevance": 1.0,
}
OTHER_LABEL_RISK = 0.5
MAX_PAGE = 500
# Beyond this a page offset finds nothing anyway; DuckDB's OFFSET is a BIGINT.
MAX_OFFSET = 10**9
# Hours an age filter may name (over a century): `hours * 3.6e9` microseconds must fit a BIGINT.
MAX_AGE_HOURS = 1e6

_RISK_CASE = (
    "CASE s.label "
    + " ".join(f"WHEN '{label}' THEN {weight}" for label, weight in LABEL_RISK.items())
    + f" ELSE {OTHER_LABEL_RISK} END"
)
# One expression over the narrow columns below; `margin` is NULL when no judge scored the sample.
PRIORITY_SQL = f"""(
    {_RISK_CASE}
    + CASE WHEN c.judge_completion_score IS NULL OR c.judge_original_score IS NULL THEN 1.0
           ELSE 2.0 * greatest(0.0, 1.0 - abs(c.judge_completion_score
                                             - c.judge_original_score) / 5.0) END
    + least(ln(coalesce(r.n, 1)), 3.0)
    + (1.0 - s.confidence)
)"""


@dataclass(frozen=True)
class QueueFilter:
    """What a reviewer narrows the queue to; None means any. Ages are in hours."""

    status: str | None = PENDING
    reason: str | None = None
    label: str | None = None
    language: str | None = None
    min_confidence: float | None = None
    max_confidence: float | None = None
    min_judge_score: float | None = None  # the judge's 1..10 score of the completion
    max_judge_score: float | None = None
    min_age_hours: float | None = None  # queued at least this long ago
    max_age_hours: float | None = None
    reviewer: str | None = None

    def __post_init__(self) -> None:
        for name in ("min_age_hours", "max_age_hours"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_AGE_HOURS:
                raise ValueError(f"{name} must be from 0 to {MAX_AGE_HOURS:g} hours, got {value!r}")

    def where(self) -> tuple[str, dict[str, Any]]:
        """The WHERE clause over q (review_queue), s (annotated_samples), c (completions)."""
        clauses, params = ["true"], {}
        column = {
            "status": "q.status = $status",
            "reason": "q.reason = $reason",
            "label": "s.label = $label",
            "language": "s.language = $language",
            "min_confidence": "s.confidence >= $min_confidence",
            "max_confidence": "s.confidence <= $max_confidence",
            "min_judge_score": "c.judge_completion_score >= $min_judge_score",
            "max_judge_score": "c.judge_completion_score <= $max_judge_score",
            "min_age_hours": "q.queued_at <= now()::TIMESTAMP "
            "- to_microseconds(CAST($min_age_hours * 3.6e9 AS BIGINT))",
            "max_age_hours": "q.queued_at >= now()::TIMESTAMP "
            "- to_microseconds(CAST($max_age_hours * 3.6e9 AS BIGINT))",
            "reviewer": "q.reviewer = $reviewer",
        }
        for name, clause in column.items():
            value = getattr(self, name)
            if value is not None and value != "":
                clauses.append(clause)
                params[name] = value
        return " AND ".join(clauses), params

    def describe(self) -> str:
        """`label=factuality_error, max_confidence=0.4` — for confirmations and messages."""
        parts = [
            f"{f.name}={getattr(self, f.name)}"
            for f in fields(self)
            if getattr(self, f.name) not in (None, "")
        ]
        return ", ".join(parts) or "no filter"

    def params(self) -> dict[str, str]:
        """The filter as query-string parameters (for links that keep it)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "status":
                out[f.name] = value or "all"
            elif value is not None and value != "":
                out[f.name] = str(value)
        return out


def _float(value: str | None, name: str) -> float | None:
    if value is None or not value.strip():
        return None
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


# The numeric bounds a queue filter takes, by their query/CLI names.
NUMBER_FILTERS = (
    "min_confidence",
    "max_confidence",
    "min_judge_score",
    "max_judge_score",
    "min_age_hours",
    "max_age_hours",
)


def filter_from(params: dict[str, str]) -> QueueFilter:
    """A QueueFilter from query-string or form values; ValueError names a bad field."""
    status = (params.get("status") or PENDING).strip()
    if status not in (*STATUSES, "all"):
        raise ValueError(f"status must be one of {', '.join(STATUSES)} or all, got {status!r}")
    reason = (params.get("reason") or "").strip() or None
    if reason is not None and reason not in REASONS:
        raise ValueError(f"reason must be one of {', '.join(REASONS)}, got {reason!r}")
    numbers = {name: _float(params.get(name), name) for name in NUMBER_FILTERS}
    return QueueFilter(
        status=None if status == "all" else status,
        reason=reason,
        label=(params.get("label") or "").strip() or None,
        language=(params.get("language") or "").strip() or None,
        reviewer=(params.get("reviewer_filter") or "").strip() or None,
        **numbers,
    )


def _ranked(where: str) -> str:
    """The filtered queue's keys and priority, over narrow columns only (the long texts of the
    page are read for its rows alone, after the top-N)."""
    return f"""
        WITH recurring AS (
            SELECT question_key, count(*) AS n FROM annotated_samples GROUP BY 1
        )
        SELECT q.sample_id, q.queued_at, {PRIORITY_SQL} AS priority
        FROM review_queue q
        JOIN annotated_samples s USING (sample_id)
        LEFT JOIN completions c USING (sample_id)
        LEFT JOIN recurring r ON r.question_key = s.question_key
        WHERE {where}
    """


def count(conn: duckdb.DuckDBPyConnection, queue_filter: QueueFilter) -> int:
    where, params = queue_filter.where()
    ((n,),) = conn.execute(
        f"""
        SELECT count(*) FROM review_queue q
        JOIN annotated_samples s USING (sample_id)
        LEFT JOIN completions c USING (sample_id)
        WHERE {where}
        """,
        params,
    ).fetchall()
    return int(n)


def matching_ids(conn: duckdb.DuckDBPyConnection, queue_filter: QueueFilter) -> list[str]:
    """Every sample id the filter matches, in queue order (for bulk actions)."""
    where, params = queue_filter.where()
    rows = conn.execute(
        f"SELECT sample_id FROM ({_ranked(where)}) ORDER BY priority DESC, queued_at, sample_id",
        params,
    ).fetchall()
    return [row[0] for row in rows]


def page(
    conn: duckdb.DuckDBPyConnection,
    queue_filter: QueueFilter,
    *,
    limit: int = 50,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """One page of the filtered queue in priority order, with what a list shows of each."""
    where, params = queue_filter.where()
    params = {
        **params,
        "limit": max(1, min(limit, MAX_PAGE)),
        "offset": max(0, min(offset, MAX_OFFSET)),
    }
    cursor = conn.execute(
        f"""
        WITH top AS (
            SELECT * FROM ({_ranked(where)})
            ORDER BY priority DESC, queued_at, sample_id
            LIMIT $limit OFFSET $offset
        )
        SELECT t.sample_id, round(t.priority, 2) AS priority, q.reason, q.status, s.label,
               s.language, round(s.confidence, 3) AS confidence,
               c.judge_original_score, c.judge_completion_score,
               c.status AS completion_status, c.mode AS completion_mode,
               left(s.question, 80) AS question, q.queued_at, q.reviewer, q.reviewed_at,
               q.note
        FROM top t
        JOIN review_queue q USING (sample_id)
        JOIN annotated_samples s USING (sample_id)
        LEFT JOIN completions c USING (sample_id)
        ORDER BY t.priority DESC, t.queued_at, t.sample_id
        """,
        params,
    )
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


@dataclass(frozen=True)
class Progress:
    reviewer: str
    accepted: int
    edited: int
    rejected: int
    today: int
    last_at: datetime | None

    @property
    def total(self) -> int:
        return self.accepted + self.edited + self.rejected


def progress(conn: duckdb.DuckDBPyConnection) -> list[Progress]:
    """Decisions per reviewer, most active first; `today` counts UTC today."""
    rows = conn.execute(
        """
        SELECT reviewer,
               count(*) FILTER (status = 'accepted'),
               count(*) FILTER (status = 'edited'),
               count(*) FILTER (status = 'rejected'),
               count(*) FILTER (reviewed_at >= current_date::TIMESTAMP),
               max(reviewed_at)
        FROM review_queue WHERE status <> 'pending' AND reviewer IS NOT NULL
        GROUP BY 1 ORDER BY count(*) DESC, 1
        """
    ).fetchall()
    return [Progress(r[0], int(r[1]), int(r[2]), int(r[3]), int(r[4]), r[5]) for r in rows]


def choices(conn: duckdb.DuckDBPyConnection) -> dict[str, list[str]]:
    """Labels and languages present in the queue, for the filter menus."""
    labels = conn.execute(
        "SELECT DISTINCT s.label FROM review_queue q JOIN annotated_samples s USING (sample_id) "
        "ORDER BY 1"
    ).fetchall()
    languages = conn.execute(
        "SELECT DISTINCT s.language FROM review_queue q "
        "JOIN annotated_samples s USING (sample_id) ORDER BY 1"
    ).fetchall()
    return {"labels": [r[0] for r in labels], "languages": [r[0] for r in languages]}
