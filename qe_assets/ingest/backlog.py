"""What waits for the pipeline: the queue backlog and the share of rejected records.

Shared by the queue sensor (which starts ingestion and reports freshness between runs) and the
`raw_events` checks (which report it after every run), so both say the same thing the same way.
Everything here is one short read: queue metadata, or a read-only query.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import duckdb

from qe_assets.ingest.queues import EventQueue, QueueUnavailable
from qe_assets.lib.stages import Verdict, age_seconds, minutes


@dataclass(frozen=True)
class QueueLook:
    """Every configured queue looked at once."""

    waiting: dict[str, str] = field(default_factory=dict)  # queue name → "12 files", "40 events"
    oldest_at: datetime | None = None
    unknown_age: list[str] = field(default_factory=list)  # queues with work whose age is unknown
    unreachable: dict[str, str] = field(default_factory=dict)  # queue name → error

    @property
    def has_work(self) -> bool:
        return bool(self.waiting)

    def describe(self) -> str:
        return ", ".join(f"{count} in {name}" for name, count in self.waiting.items()) or "empty"


def look_at_queues(queues: list[EventQueue]) -> QueueLook:
    waiting: dict[str, str] = {}
    unreachable: dict[str, str] = {}
    unknown: list[str] = []
    oldest: list[datetime] = []
    for queue in queues:
        try:
            backlog = queue.backlog()
        except QueueUnavailable as exc:
            unreachable[queue.name] = str(exc)
            continue
        if backlog.waiting == 0:
            continue
        unit = backlog.unit.removesuffix("s") if backlog.waiting == 1 else backlog.unit
        waiting[queue.name] = f"{backlog.waiting} {unit}"
        if backlog.oldest_at is None:
            unknown.append(queue.name)
        else:
            oldest.append(backlog.oldest_at)
    return QueueLook(waiting, min(oldest, default=None), unknown, unreachable)


def queue_freshness(look: QueueLook, max_age: float, now: datetime | None = None) -> Verdict:
    """Fails (a warning) when the oldest waiting event has waited longer than `max_age`
    seconds, or when a queue cannot be reached (its age is then unknown)."""
    age = age_seconds(look.oldest_at, now or datetime.now(UTC))
    metadata: dict[str, str | int | float] = {
        "waiting": look.describe(),
        "max_age_seconds": max_age,
        "oldest_age_seconds": round(age, 1) if age is not None else -1,
    }
    if look.unreachable:
        problems = "; ".join(f"{name}: {error}" for name, error in look.unreachable.items())
        return Verdict(False, f"queue unreachable, its backlog unknown: {problems}", metadata)
    if age is not None and age > max_age:
        return Verdict(
            False,
            f"the oldest waiting event has waited {minutes(age)}, over QE_MAX_QUEUE_AGE "
            f"({minutes(max_age)}): is the queue sensor running, or are runs failing?",
            metadata,
        )
    if look.unknown_age:
        unknown = ", ".join(look.unknown_age)
        return Verdict(
            True, f"{look.describe()}; how long it waited is unknown ({unknown})", metadata
        )
    return Verdict(True, f"{look.describe()}; oldest {minutes(age or 0)} old", metadata)


def reject_shares(
    conn: duckdb.DuckDBPyConnection, window: timedelta = timedelta(days=1)
) -> list[tuple[str, int, int]]:
    """(queue, events stored, records rejected) per queue kind (the first part of `source`:
    inbox, redis, kafka) over the last `window` of ingestion."""
    since = (datetime.now(UTC) - window).replace(tzinfo=None)
    return conn.execute(
        """
        WITH stored AS (
            SELECT split_part(source, ':', 1) AS queue, count(*) AS n
            FROM raw_events WHERE ingested_at >= $since GROUP BY ALL
        ), rejected AS (
            SELECT split_part(source, ':', 1) AS queue, count(*) AS n
            FROM rejected_events WHERE rejected_at >= $since GROUP BY ALL
        )
        SELECT queue, coalesce(stored.n, 0), coalesce(rejected.n, 0)
        FROM stored FULL JOIN rejected USING (queue) ORDER BY queue
        """,
        {"since": since},
    ).fetchall()


# Fewer records than this from a queue in the window say nothing about its producers.
MIN_RECORDS_FOR_SHARE = 20


def reject_share(rows: list[tuple[str, int, int]], max_share: float) -> Verdict:
    metadata: dict[str, str | int | float] = {"max_share": max_share}
    too_high = []
    for queue, stored, rejected in rows:
        total = stored + rejected
        share = rejected / total if total else 0.0
        metadata[f"reject_share/{queue}"] = round(share, 4)
        if total >= MIN_RECORDS_FOR_SHARE and share > max_share:
            too_high.append(f"{queue} {share:.0%} of {total}")
    if too_high:
        return Verdict(
            False,
            f"rejected share over QE_MAX_REJECT_SHARE ({max_share:.0%}) in the last day: "
            f'{", ".join(too_high)}; see `qe sql "SELECT field, reason, count(*) FROM '
            f'rejected_events GROUP BY ALL"`',
            metadata,
        )
    return Verdict(True, "reject share within bounds in the last day", metadata)
