"""The dashboards' numbers: time-bucketed counts straight from the tables, one DuckDB query each.

Each query aggregates in DuckDB and returns a few hundred rows at most (buckets × series), so a
read takes one short read-only connection however long the history is. Buckets with nothing in
them are filled with zeros, so a quiet hour shows as a zero rather than as a line drawn across it.
Times are the tables' own (`annotated_at`, `rejected_at`, ...): when the pipeline or a person did
the thing, not when a run reported it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import duckdb
import polars as pl

from qe_assets.ingest.events import KNOWN_LABELS, UNSPECIFIED
from qe_assets.review.calibration import DECIDED
from qe_assets.rollout import registry as rollout_registry
from qe_assets.rollout import timeline
from qe_assets.rollout.sequential import Policy, distance_to_decision
from qe_assets.store import select_frame

STEPS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
OTHER_LABELS = "other labels"
SHOWN_LABELS = [*KNOWN_LABELS, UNSPECIFIED]

# Each: (bucket, series, value) rows for the buckets from $start on.
SAMPLES = """
    SELECT date_trunc($unit, annotated_at) AS bucket, 'annotated for training' AS series,
           count(*) AS value
    FROM annotated_samples
    WHERE route = 'train' AND duplicate_of IS NULL AND annotated_at >= $start GROUP BY ALL
    UNION ALL
    SELECT date_trunc($unit, updated_at), 'completed, ready or released', count(*)
    FROM completions WHERE status = 'ok' AND updated_at >= $start GROUP BY ALL
    UNION ALL
    SELECT date_trunc($unit, v.created_at), 'released in a dataset version', count(*)
    FROM dataset_samples d JOIN dataset_versions v USING (version)
    WHERE v.created_at >= $start GROUP BY ALL
"""
# Labels outside the known ones are free text (they may hold PII): shown together.
LABELS = f"""
    SELECT date_trunc($unit, annotated_at) AS bucket,
           CASE WHEN list_contains($labels, label) THEN label ELSE '{OTHER_LABELS}' END AS series,
           count(*) AS value
    FROM annotated_samples
    WHERE duplicate_of IS NULL AND annotated_at >= $start GROUP BY ALL
"""
REJECTS = """
    SELECT date_trunc($unit, rejected_at) AS bucket, 'invalid events' AS series,
           count(*) AS value
    FROM rejected_events WHERE rejected_at >= $start GROUP BY ALL
    UNION ALL
    SELECT date_trunc($unit, reviewed_at), 'rejected by a reviewer', count(*)
    FROM review_queue WHERE status = 'rejected' AND reviewed_at >= $start GROUP BY ALL
    UNION ALL
    SELECT date_trunc($unit, updated_at), 'rejected by the judge', count(*)
    FROM completions WHERE status = 'rejected_by_judge' AND updated_at >= $start GROUP BY ALL
"""
# A completion's time is when it took its current form (a reviewer's edit makes it `human`).
MODES = """
    SELECT date_trunc($unit, updated_at) AS bucket, mode AS series, count(*) AS value
    FROM completions WHERE status = 'ok' AND updated_at >= $start GROUP BY ALL
"""

_FILLED = """
    WITH counts AS ({counts}),
    buckets AS (SELECT range AS bucket FROM range($start, $stop, $step)),
    names AS (SELECT DISTINCT series FROM counts)
    SELECT b.bucket, n.series, coalesce(c.value, 0)::BIGINT AS value
    FROM buckets b CROSS JOIN names n
    LEFT JOIN counts c ON c.bucket = b.bucket AND c.series = n.series
    ORDER BY n.series, b.bucket
"""
# Pending reviews at the end of each bucket, per reason: every queueing adds one, every decision
# takes one away; what happened before the window is folded into its first bucket.
BACKLOG = """
    WITH moves AS (
        SELECT reason AS series, queued_at AS moved_at, 1 AS delta FROM review_queue
        UNION ALL
        SELECT reason, reviewed_at, -1 FROM review_queue WHERE reviewed_at IS NOT NULL
    ),
    per AS (
        SELECT series, greatest(date_trunc($unit, moved_at), $start) AS bucket, sum(delta) AS delta
        FROM moves GROUP BY ALL
    ),
    buckets AS (SELECT range AS bucket FROM range($start, $stop, $step)),
    names AS (SELECT DISTINCT series FROM moves)
    SELECT b.bucket, n.series,
           sum(coalesce(p.delta, 0)) OVER (PARTITION BY n.series ORDER BY b.bucket)::BIGINT
               AS value
    FROM buckets b CROSS JOIN names n
    LEFT JOIN per p ON p.bucket = b.bucket AND p.series = n.series
    ORDER BY n.series, b.bucket
"""
AGREEMENT = f"""
    WITH decided AS ({DECIDED})
    SELECT date_trunc($unit, reviewed_at) AS bucket, count(*) AS decisions,
           avg((judge_ok = human_ok)::INTEGER) AS agreement
    FROM decided WHERE reviewed_at >= $start GROUP BY 1 ORDER BY 1
"""
EVALUATIONS = """
    SELECT * FROM (
        SELECT created_at, candidate, baseline, comparison, n, win_rate, ci_low, decision
        FROM model_evaluations ORDER BY created_at DESC LIMIT 500
    ) ORDER BY created_at
"""
AB_TABLE = "ab_decisions"
# The newest looks (the current test is always among them), oldest first for the chart. Rows
# without rates (a test's start, a share set before any answer) stay: they mark the events.
AB_LIMIT = 2000
AB_DECISIONS = f"""
    SELECT * FROM (
        SELECT decision_id, decided_at, candidate, production, share, answers_production,
               low_production, answers_candidate, low_candidate, rate_production,
               rate_candidate, statistic, decision, decided_by, reason
        FROM {AB_TABLE} ORDER BY decision_id DESC LIMIT {AB_LIMIT}
    ) ORDER BY decision_id
"""


@dataclass(frozen=True)
class Window:
    unit: str  # hour | day
    start: datetime
    stop: datetime  # exclusive: the end of the current bucket

    @property
    def params(self) -> dict[str, object]:
        return {"unit": self.unit, "start": self.start, "stop": self.stop, "step": STEPS[self.unit]}


@dataclass(frozen=True)
class Series:
    window: Window
    samples: pl.DataFrame
    labels: pl.DataFrame
    rejects: pl.DataFrame
    backlog: pl.DataFrame
    modes: pl.DataFrame
    agreement: pl.DataFrame
    evaluations: pl.DataFrame
    ab: pl.DataFrame | None  # None: no A/B test table in this store yet
    ab_problem: str | None = None
    release: timeline.Rows = field(default_factory=timeline.Rows)  # the release timeline's rows
    ab_running: str | None = None  # the running test and what it waits for, in words
    ab_progress: str | None = None  # its distance to a decision (Distance.text())


def window(conn: duckdb.DuckDBPyConnection, unit: str, buckets: int) -> Window:
    """The last `buckets` buckets up to and including the current one, in the stores' clock."""
    if unit not in STEPS:
        raise ValueError(f"bucket must be one of {', '.join(STEPS)}, got {unit!r}")
    ((current,),) = conn.execute("SELECT date_trunc(?, now()::TIMESTAMP)", [unit]).fetchall()
    stop = current + STEPS[unit]
    return Window(unit, stop - buckets * STEPS[unit], stop)


def filled(
    conn: duckdb.DuckDBPyConnection, counts: str, span: Window, **params: object
) -> pl.DataFrame:
    """bucket, series, value for every bucket of the window and every series that has data."""
    return select_frame(conn, _FILLED.format(counts=counts), {**span.params, **params})


def _ab_decisions(conn: duckdb.DuckDBPyConnection) -> tuple[pl.DataFrame | None, str | None]:
    ((exists,),) = conn.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [AB_TABLE]
    ).fetchall()
    if not exists:
        return None, None
    try:
        return select_frame(conn, AB_DECISIONS), None
    except duckdb.BinderException as exc:  # a store written by another release of the A/B test
        return None, f"{AB_TABLE} has columns this page does not read: {exc}"


def _trimmed(span: Window, frames: dict[str, pl.DataFrame]) -> tuple[Window, dict[str, Any]]:
    """The window from its first bucket with anything in it: a young store's charts are not a
    long flat line with the data squeezed against the right edge."""
    starts = [f.filter(pl.col("value") != 0)["bucket"].min() for f in frames.values()]
    first = min((s for s in starts if s is not None), default=None)
    if first is None or first <= span.start:
        return span, frames
    trimmed = {name: f.filter(pl.col("bucket") >= first) for name, f in frames.items()}
    return Window(span.unit, first, span.stop), trimmed  # type: ignore[arg-type]


def _running_test(conn: duckdb.DuckDBPyConnection, policy: Policy) -> tuple[str | None, str | None]:
    """(which test runs and what it waits for, its distance to a decision), or Nones."""
    try:
        test = rollout_registry.active_test(conn)
    except (duckdb.CatalogException, duckdb.BinderException):
        return None, None
    if test is None:
        return None, None
    arms = rollout_registry.arm_counts(conn, test)
    progress = distance_to_decision(arms, test.share, policy).text()
    running = (
        f"A/B test running: {test.candidate} at {test.share:.0%} of traffic against "
        f"{test.production} since {test.started_at:%Y-%m-%d %H:%M} UTC; "
        f"{arms.answers_candidate:,} candidate and {arms.answers_production:,} production "
        f"answers so far; {progress}"
    )
    return running, progress


def read_series(
    conn: duckdb.DuckDBPyConnection,
    unit: str,
    buckets: int,
    *,
    judge_margin: float,
    policy: Policy | None = None,
) -> Series:
    span = window(conn, unit, buckets)
    ab, ab_problem = _ab_decisions(conn)
    running, progress = _running_test(conn, policy or Policy())
    span, bucketed = _trimmed(
        span,
        {
            "samples": filled(conn, SAMPLES, span),
            "labels": filled(conn, LABELS, span, labels=SHOWN_LABELS),
            "rejects": filled(conn, REJECTS, span),
            "backlog": select_frame(conn, BACKLOG, span.params),
            "modes": filled(conn, MODES, span),
        },
    )
    return Series(
        window=span,
        **bucketed,
        agreement=select_frame(
            conn, AGREEMENT, {"unit": unit, "start": span.start, "margin": judge_margin}
        ),
        evaluations=select_frame(conn, EVALUATIONS),
        ab=ab,
        ab_problem=ab_problem,
        release=timeline.read_rows(conn),
        ab_running=running,
        ab_progress=progress,
    )
