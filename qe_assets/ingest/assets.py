"""Stage 1, ingest: the queue drained into raw_events / rejected_events, exactly once.

Per batch: claim from the queue, validate, classify against what is stored, commit both tables in
one short transaction, then ack. A crash before the commit leaves the batch claimed (it is
replayed); a crash after the commit and before the ack replays records that are now duplicates
(raw_events) or already-present rejections (rejected_events has a content key): nothing is lost
and nothing is doubled. The `raw_events` asset below runs it under the writer lock.
"""

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime

import dagster as dg
import duckdb
import polars as pl
from dagster_duckdb import DuckDBResource

from qe_assets.ingest.backlog import look_at_queues, queue_freshness, reject_share, reject_shares
from qe_assets.ingest.events import (
    FINGERPRINT_SQL,
    REJECTED_SCHEMA,
    ValidatedRecords,
    rejected_row,
    validate_records,
)
from qe_assets.ingest.queues import Batch, EventQueue, QueueUnavailable, durability_warning
from qe_assets.ingest.resource import QueueResource
from qe_assets.lib.links import dashboard_url
from qe_assets.lib.resources import PipelineSettings, duckdb_writer, exclusive_stage, writer_session
from qe_assets.lib.stages import PIPELINE_GROUP, check_result, only_selected
from qe_assets.store import (
    ConnectionFactory,
    ensure_schema,
    register_frame,
    table_counts,
    transaction,
)

_COUNT_COLUMNS = (
    "flush_id, model, answers, low, threshold, producer, window_start, window_end, source"
)
CONFLICT_REASON = (
    "request_id: conflicting duplicate (an event with this request_id and different content "
    "was ingested first)"
)

# Idempotency on request_id, decided by the store in the commit's transaction: the first arrival
# of an id wins; a later event with the same content (fingerprint) is a `duplicate`, one with
# different content a `conflict`, whether the first arrived earlier or in this batch. Only
# (fingerprint, status) is kept, one row per event in batch order: the batch's text stays in the
# registered frame, and the inserts pair the two by position.
_CLASSIFY = f"""
CREATE OR REPLACE TEMP TABLE batch_status AS
WITH incoming AS (
    SELECT pos, request_id, {FINGERPRINT_SQL} AS fingerprint FROM batch_events
)
SELECT i.fingerprint,
       CASE WHEN r.fingerprint IS NULL AND row_number() OVER same_id = 1 THEN 'new'
            WHEN i.fingerprint = coalesce(r.fingerprint, first_value(i.fingerprint) OVER same_id)
                THEN 'duplicate'
            ELSE 'conflict' END AS status
FROM incoming i LEFT JOIN raw_events r USING (request_id)
WINDOW same_id AS (PARTITION BY i.request_id ORDER BY i.pos)
ORDER BY i.pos
"""
# In batch order (a positional join keeps it), so `seq` follows arrival.
_INSERT_NEW = """
INSERT INTO raw_events (request_id, question, docs, answer, evaluation, score, labels, checks,
                        timestamp, extra, fingerprint, source, model, ingested_at)
SELECT b.request_id, b.question, b.docs, b.answer, b.evaluation, b.score, b.labels, b.checks,
       coalesce(b.timestamp_given, $ts), b.extra, s.fingerprint, b.source, b.model, $ts
FROM batch_events b POSITIONAL JOIN batch_status s
WHERE s.status = 'new'
"""
# The validator's rejections and the refused inputs, plus the conflicts. A replay after a crash
# finds its rows present (the id is a content key) and adds nothing.
_INSERT_REJECTED = """
INSERT INTO rejected_events
SELECT sha256(source || chr(10) || payload), source, payload, field, reason, request_id, $ts
FROM (
    SELECT source, payload, field, reason, request_id FROM rejected_rows
    UNION ALL
    SELECT b.source, b.payload, 'request_id', $reason, b.request_id
    FROM batch_events b POSITIONAL JOIN batch_status s
    WHERE s.status = 'conflict'
)
ON CONFLICT DO NOTHING
"""
_STATUS_COUNTS = "SELECT status, count(*) FROM batch_status GROUP BY status"

# Failures that a record's values cause (a value the validator let through that a column or a
# frame cannot hold): the batch is split to find the record, which is rejected. Anything else
# (disk full, lock, I/O) is the store's, and stops the run with the batch still claimed.
RECORD_ERRORS: tuple[type[BaseException], ...] = (
    duckdb.DataError,  # conversion, out of range
    duckdb.IntegrityError,  # constraints
    duckdb.InvalidInputException,
    pl.exceptions.PolarsError,
    ValueError,
    OverflowError,
    TypeError,
    RecursionError,
)


@dataclass
class IngestReport:
    batches: int = 0
    read: int = 0
    new: int = 0
    duplicates: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    # Count records (qe_assets.service.answer_counts): rows read, and rows new to answer_counts.
    count_rows: int = 0
    new_count_rows: int = 0

    def add(self, other: "IngestReport") -> None:
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
    validated: ValidatedRecords | None = None,
    refused: Sequence[tuple[str, str]] = (),
) -> IngestReport:
    """Write one batch in a single transaction; returns what happened to it.

    Pass `validated` (from `validate_records`) to validate before taking the write lock. The
    store fingerprints, classifies and inserts the batch in SQL, reading the validated frame
    where it lies. `refused` inputs (source, reason) were never read: each is one rejected row
    with an empty payload.
    """
    if validated is None:
        validated = validate_records(records, sources, received_at=received_at)
    received_at = validated.received_at
    rejected = pl.concat([validated.rejected, _refused_rows(refused)], how="vertical")
    register_frame(conn, "batch_events", validated.events)
    register_frame(conn, "rejected_rows", rejected)
    register_frame(conn, "count_rows", validated.counts)
    params = {"ts": received_at}
    try:
        with transaction(conn):
            conn.execute(_CLASSIFY)
            ((new,),) = conn.execute(_INSERT_NEW, params).fetchall()
            conn.execute(_INSERT_REJECTED, {**params, "reason": CONFLICT_REASON})
            statuses = dict(conn.execute(_STATUS_COUNTS).fetchall())
            # Exactly once by (flush_id, model): a replayed or re-sent flush adds nothing.
            ((new_counts,),) = conn.execute(
                f"INSERT INTO answer_counts ({_COUNT_COLUMNS}, ingested_at) "
                f"SELECT {_COUNT_COLUMNS}, $ts FROM count_rows ON CONFLICT DO NOTHING",
                params,
            ).fetchall()
    finally:
        # Registered views pin the batch's memory until the connection closes.
        for name in ("batch_events", "rejected_rows", "count_rows"):
            conn.unregister(name)
    conflicts = statuses.get("conflict", 0)
    reasons = dict(rejected.group_by("field").len().iter_rows())
    if conflicts:
        reasons["request_id"] = reasons.get("request_id", 0) + conflicts
    return IngestReport(
        batches=1,
        read=len(records),
        new=int(new),
        duplicates=statuses.get("duplicate", 0),
        rejected=rejected.height + conflicts,
        reasons=reasons,
        count_rows=validated.counts.height,
        new_count_rows=int(new_counts),
    )


def commit_isolating(
    conn: duckdb.DuckDBPyConnection,
    records: list[bytes],
    sources: list[str],
    refused: Sequence[tuple[str, str]] = (),
    *,
    received_at: datetime | None = None,
) -> IngestReport:
    """`commit_batch` for a batch whose commit failed on a record's values: halves are committed
    on their own until the records that cannot be stored are alone, and each of those becomes a
    rejected row (`payload`, with the store's error). The other records are committed as usual.

    First an empty commit (the refused inputs only): if even that fails, the failure is not the
    records' and is raised, so a broken store never turns good records into rejections."""
    total = commit_batch(conn, [], [], received_at=received_at, refused=refused)
    pending = [(records, sources)]
    while pending:
        part, part_sources = pending.pop()
        try:
            total.add(commit_batch(conn, part, part_sources, received_at=received_at))
            continue
        except RECORD_ERRORS as exc:
            if len(part) > 1:
                half = len(part) // 2
                # Popped last first: the first half is committed first, arrival order is kept.
                pending += [(part[half:], part_sources[half:]), (part[:half], part_sources[:half])]
                continue
            error = exc
        empty = validate_records([], [], received_at=received_at)
        unstorable = replace(empty, rejected=rejected_row(part[0], part_sources[0], error))
        report = commit_batch(conn, [], [], validated=unstorable)
        total.add(replace(report, read=1))
    total.batches = 1
    return total


def ingest_pending(
    queue: EventQueue,
    connection: ConnectionFactory,
    *,
    batch_size: int,
    on_batch: Callable[[IngestReport], None] | None = None,
) -> IngestReport:
    """Drain the queue batch by batch; each batch holds the write lock only for its commit.

    Batches are validated before the write lock is taken, so readers get in while we parse. On a
    queue that `reads_ahead`, a batch is committed (fingerprinted and classified by the store)
    on a helper thread while the next one is claimed and validated; acks still follow their
    commits, one batch after another.
    """
    total = IngestReport()
    with connection() as conn:
        ensure_schema(conn)

    def commit(batch: Batch, validated: ValidatedRecords | None) -> IngestReport:
        with connection() as conn:
            if validated is not None:
                try:
                    return commit_batch(
                        conn,
                        batch.records,
                        batch.sources,
                        validated=validated,
                        refused=batch.refused,
                    )
                except RECORD_ERRORS:
                    pass  # a record the store cannot hold: found and rejected below
            return commit_isolating(conn, batch.records, batch.sources, batch.refused)

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
                validated = _validated(batch)
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


def _validated(batch: Batch) -> ValidatedRecords | None:
    """The batch validated, or None when a record broke validation itself (the commit then finds
    it record by record): no input may stop the queue."""
    try:
        return validate_records(batch.records, batch.sources)
    except RECORD_ERRORS:
        return None


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            "raw_events",
            group_name=PIPELINE_GROUP,
            kinds={"duckdb", "polars", "redis"},
            description=(
                "Quality events from the queue (Redis list or Kafka topic `quality_events`, or "
                "the file inbox), validated and stored once per `request_id`. The queue sensor "
                "starts this when events wait."
            ),
        ),
        dg.AssetSpec(
            "rejected_events",
            group_name=PIPELINE_GROUP,
            kinds={"duckdb"},
            description=(
                "What the ingest refused, written in the same transaction as `raw_events`: "
                "malformed records, re-sends of a request_id with different content, inbox "
                "entries that are not regular files; each with a reason naming the field."
            ),
        ),
    ],
    check_specs=[
        dg.AssetCheckSpec(
            "queue_freshness",
            asset="raw_events",
            description=(
                "Warns when the oldest event still waiting in the queue is older than "
                "QE_MAX_QUEUE_AGE, or when the queue cannot be reached. Also reported by the "
                "queue sensor between runs."
            ),
        ),
        dg.AssetCheckSpec(
            "reject_share_by_source",
            asset="rejected_events",
            description=(
                "Warns when more than QE_MAX_REJECT_SHARE of the records one queue kind "
                "(inbox, redis, kafka) delivered in the last day were rejected."
            ),
        ),
    ],
    can_subset=True,
)
def raw_events(
    context: dg.AssetExecutionContext,
    duckdb: DuckDBResource,
    queue: QueueResource,
    settings: PipelineSettings,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    yield from only_selected(context, _ingest_stage(context, duckdb, queue, settings))


def _ingest_stage(
    context: dg.AssetExecutionContext,
    duckdb: DuckDBResource,
    queue: QueueResource,
    settings: PipelineSettings,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    total = IngestReport()

    def progress(report: IngestReport) -> None:
        context.log.info(
            f"batch of {report.read}: {report.new} new, {report.duplicates} duplicates, "
            f"{report.rejected} rejected"
        )

    queues = queue.queues()  # the configured queue, and the spool inbox beside Redis/Kafka
    with exclusive_stage(context, settings), writer_session(duckdb) as session:
        for source in queues:
            total.add(
                ingest_pending(
                    source,
                    session.connection,
                    batch_size=settings.ingest_batch_size,
                    on_batch=progress,
                )
            )

    with duckdb_writer(duckdb) as conn:
        counts = table_counts(conn)
        shares = reject_shares(conn)
    depth, warnings = _depth_and_durability(context, queues)
    yield dg.MaterializeResult(
        asset_key="raw_events",
        metadata={
            "new_rows": total.new,
            "duplicates": total.duplicates,
            "rejected": total.rejected,
            "records_read": total.read,
            # Producers' per-model answer counts (docs/rollout.md): rows read, rows new.
            "count_rows": total.count_rows,
            "new_count_rows": total.new_count_rows,
            "batches": total.batches,
            "total_rows": counts["raw_events"],
            "queue_depth_left": depth,
            "queue_durability": "; ".join(warnings) or "ok",
            "dagster/row_count": counts["raw_events"],
        },
    )
    yield dg.MaterializeResult(
        asset_key="rejected_events",
        metadata={
            "rejected": total.rejected,
            "rejected_by_field": dg.MetadataValue.json(total.reasons),
            "rejected_total": counts["rejected_events"],
            "dagster/row_count": counts["rejected_events"],
            "dashboards": dg.MetadataValue.url(dashboard_url(settings, "rejects")),
        },
    )
    look = look_at_queues(queues)
    yield check_result(
        "raw_events", "queue_freshness", queue_freshness(look, settings.max_queue_age_seconds)
    )
    yield check_result(
        "rejected_events", "reject_share_by_source", reject_share(shares, settings.max_reject_share)
    )


def _depth_and_durability(
    context: dg.AssetExecutionContext, queues: list[EventQueue]
) -> tuple[int, list[str]]:
    depth = 0
    warnings: list[str] = []
    for source in queues:
        try:
            depth += source.depth()
        except QueueUnavailable:
            context.log.warning(f"could not read the depth of the {source.name} queue")
            continue
        warning = durability_warning(source)
        if warning is not None:
            context.log.warning(warning)
            warnings.append(warning)
    return depth, warnings
