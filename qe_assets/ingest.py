"""Queue → raw_events / rejected_events, exactly once.

Per batch: claim from the queue, validate, classify against what is stored, commit both tables in
one short transaction, then ack. A crash before the commit leaves the batch claimed (it is
replayed); a crash after the commit and before the ack replays records that are now duplicates
(raw_events) or already-present rejections (rejected_events has a content key): nothing is lost
and nothing is doubled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import duckdb
import polars as pl

from qe_assets.events import (
    REJECTED_SCHEMA,
    ParsedRecords,
    ValidatedRecords,
    parse_records,
    validate_records,
)
from qe_assets.queues import Batch, EventQueue
from qe_assets.store import ConnectionFactory, ensure_schema, query_frame, transaction
from qe_assets.transforms.dedupe import CONFLICT, DUPLICATE, NEW, classify_events

_RAW_COLUMNS = (
    "request_id, question, docs, answer, evaluation, score, labels, checks, timestamp, extra, "
    "fingerprint, source, model"
)
_COUNT_COLUMNS = (
    "flush_id, model, answers, low, threshold, producer, window_start, window_end, source"
)
CONFLICT_REASON = (
    "request_id: conflicting duplicate (an event with this request_id and different content "
    "was ingested first)"
)


@dataclass
class IngestReport:
    batches: int = 0
    read: int = 0
    new: int = 0
    duplicates: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    # Count records (qe_assets.answer_counts): rows read, and rows new to answer_counts.
    count_rows: int = 0
    new_count_rows: int = 0

    def add(self, other: IngestReport) -> None:
        self.batches += other.batches
        self.read += other.read
        self.new += other.new
        self.duplicates += other.duplicates
        self.rejected += other.rejected
        self.count_rows += other.count_rows
        self.new_count_rows += other.new_count_rows
        for field_name, count in other.reasons.items():
            self.reasons[field_name] = self.reasons.get(field_name, 0) + count


def _refused_rows(refused: Sequence[tuple[str, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "source": [source for source, _ in refused],
            "payload": [""] * len(refused),
            "field": ["file"] * len(refused),
            "reason": [reason for _, reason in refused],
            "request_id": [None] * len(refused),
        },
        schema=REJECTED_SCHEMA,
    )


def commit_batch(
    conn: duckdb.DuckDBPyConnection,
    records: list[bytes],
    sources: list[str],
    *,
    received_at: datetime | None = None,
    parsed: ParsedRecords | None = None,
    refused: Sequence[tuple[str, str]] = (),
) -> IngestReport:
    """Write one batch in a single transaction; returns what happened to it.

    Pass `parsed` (from `parse_records`) to validate before taking the write lock. `refused`
    inputs (source, reason) were never read: each is one rejected row with an empty payload.
    """
    received_at = received_at or datetime.now(UTC).replace(tzinfo=None)
    if parsed is None:
        parsed = parse_records(records, sources, received_at=received_at)
    events = parsed.events
    ids = events.select("request_id").unique()
    conn.register("batch_ids", ids)
    stored = query_frame(
        conn,
        "SELECT r.request_id, r.fingerprint FROM raw_events r "
        "SEMI JOIN batch_ids USING (request_id)",
    )
    classified = classify_events(events, stored)
    new_rows = classified.filter(pl.col("status") == NEW).drop("status")
    conflicts = classified.filter(pl.col("status") == CONFLICT).select(
        "source",
        pl.col("payload"),
        pl.lit("request_id").alias("field"),
        pl.lit(CONFLICT_REASON).alias("reason"),
        "request_id",
    )
    rejected = pl.concat([parsed.rejected, conflicts, _refused_rows(refused)], how="vertical")

    conn.register("new_rows", new_rows)
    conn.register("rejected_rows", rejected)
    conn.register("count_rows", parsed.counts)
    with transaction(conn):
        conn.execute(
            f"INSERT INTO raw_events ({_RAW_COLUMNS}, ingested_at) "
            f"SELECT {_RAW_COLUMNS}, $ts FROM new_rows",
            {"ts": received_at},
        )
        conn.execute(
            """
            INSERT INTO rejected_events
            SELECT sha256(source || chr(10) || payload), source, payload, field, reason,
                   request_id, $ts
            FROM rejected_rows
            ON CONFLICT DO NOTHING
            """,
            {"ts": received_at},
        )
        # Exactly once by (flush_id, model): a replayed or re-sent flush adds nothing.
        new_counts = conn.execute(
            f"INSERT INTO answer_counts ({_COUNT_COLUMNS}, ingested_at) "
            f"SELECT {_COUNT_COLUMNS}, $ts FROM count_rows ON CONFLICT DO NOTHING",
            {"ts": received_at},
        ).fetchall()[0][0]

    reasons = rejected.group_by("field").len()
    return IngestReport(
        batches=1,
        read=len(records),
        new=new_rows.height,
        duplicates=int((classified["status"] == DUPLICATE).sum()),
        rejected=rejected.height,
        reasons=dict(zip(reasons["field"].to_list(), reasons["len"].to_list(), strict=True)),
        count_rows=parsed.counts.height,
        new_count_rows=int(new_counts),
    )


def ingest_pending(
    queue: EventQueue,
    connection: ConnectionFactory,
    *,
    batch_size: int,
    on_batch: Callable[[IngestReport], None] | None = None,
) -> IngestReport:
    """Drain the queue batch by batch; each batch holds the write lock only for its commit.

    Batches are validated before the write lock is taken, so readers get in while we parse. On a
    queue that `reads_ahead`, a batch is fingerprinted and committed on a helper thread while the
    next one is claimed and validated; acks still follow their commits, one batch after another.
    """
    total = IngestReport()
    with connection() as conn:
        ensure_schema(conn)

    def commit(batch: Batch, validated: ValidatedRecords) -> IngestReport:
        parsed = validated.fingerprinted()  # before the connection: readers still get in
        with connection() as conn:
            return commit_batch(
                conn,
                batch.records,
                batch.sources,
                received_at=validated.received_at,
                parsed=parsed,
                refused=batch.refused,
            )

    def finish(batch: Batch, committed: Future[IngestReport]) -> None:
        report = committed.result()
        batch.ack()
        total.add(report)
        if on_batch is not None:
            on_batch(report)

    in_flight: tuple[Batch, Future[IngestReport]] | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-commit") as committer:
        try:
            for batch in queue.batches(batch_size):
                validated = validate_records(batch.records, batch.sources)
                if in_flight is not None:
                    pending, in_flight = in_flight, None
                    finish(*pending)
                committed = committer.submit(commit, batch, validated)
                if queue.reads_ahead:
                    in_flight = (batch, committed)
                else:
                    finish(batch, committed)
        except BaseException as exc:
            if in_flight is not None:
                # Reading or validating the next batch failed while the previous one was being
                # committed: a commit that went through is still acked and counted (else its
                # events come back as duplicates), and one that failed is not lost from the error.
                try:
                    finish(*in_flight)
                except Exception as commit_error:
                    exc.add_note(f"the commit of the batch before also failed: {commit_error!r}")
            raise
        if in_flight is not None:
            finish(*in_flight)
    return total
