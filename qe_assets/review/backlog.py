"""What waits for a person: the review backlog (the queue backlog is `qe_assets.ingest.backlog`).

Shared by the queue sensor (which reports it between runs) and the `annotated_samples` checks
(which report it after every run), so both say the same thing the same way. One short read.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb

from qe_assets.lib.stages import Verdict, age_seconds, minutes


@dataclass(frozen=True)
class ReviewBacklog:
    pending: int
    oldest_at: datetime | None


def review_backlog(conn: duckdb.DuckDBPyConnection) -> ReviewBacklog:
    ((pending, oldest),) = conn.execute(
        "SELECT count(*), min(queued_at) FROM review_queue WHERE status = 'pending'"
    ).fetchall()
    # queued_at is stored as naive UTC, like every timestamp the stages write.
    return ReviewBacklog(int(pending), oldest.replace(tzinfo=UTC) if oldest else None)


def review_age(backlog: ReviewBacklog, max_age: float, now: datetime | None = None) -> Verdict:
    age = age_seconds(backlog.oldest_at, now or datetime.now(UTC))
    metadata: dict[str, str | int | float] = {
        "pending": backlog.pending,
        "max_age_seconds": max_age,
        "oldest_age_seconds": round(age, 1) if age is not None else -1,
    }
    if age is not None and age > max_age:
        return Verdict(
            False,
            f"the oldest pending review has waited {minutes(age)}, over QE_MAX_REVIEW_AGE "
            f"({minutes(max_age)}): `qe review list`",
            metadata,
        )
    return Verdict(True, f"{backlog.pending} pending, oldest {minutes(age or 0)} old", metadata)


def review_size(backlog: ReviewBacklog, max_pending: int) -> Verdict:
    metadata: dict[str, str | int | float] = {"pending": backlog.pending, "max": max_pending}
    if backlog.pending > max_pending:
        return Verdict(
            False,
            f"{backlog.pending} samples wait for review, over QE_MAX_REVIEW_BACKLOG "
            f"({max_pending}): they stay out of every version until someone decides",
            metadata,
        )
    return Verdict(True, f"{backlog.pending} samples wait for review", metadata)
