"""Stage 1, capture: the queue drained into raw_events, exactly once."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from qe_assets.ingest import IngestReport, ingest_pending
from qe_assets.queues import QueueUnavailable, durability_warning
from qe_assets.resources import (
    PipelineSettings,
    duckdb_writer,
    exclusive_stage,
    writer_session,
)
from qe_assets.store import table_counts


@dg.asset(
    group_name="capture",
    kinds={"duckdb", "polars", "redis"},
    description=(
        "Quality events from the queue (Redis list or Kafka topic `quality_events`, or the "
        "file inbox), validated and stored once per `request_id`. Malformed records, and "
        "re-sends of a request_id with different content, go to `rejected_events` with a reason "
        "naming the field."
    ),
)
def raw_events(
    context: dg.AssetExecutionContext, duckdb: DuckDBResource, settings: PipelineSettings
) -> dg.MaterializeResult:
    total = IngestReport()

    def progress(report: IngestReport) -> None:
        context.log.info(
            f"batch of {report.read}: {report.new} new, {report.duplicates} duplicates, "
            f"{report.rejected} rejected"
        )

    with exclusive_stage(context, settings), writer_session(duckdb) as session:
        for queue in settings.queues():
            total.add(
                ingest_pending(
                    queue,
                    session.connection,
                    batch_size=settings.ingest_batch_size,
                    on_batch=progress,
                )
            )

    with duckdb_writer(duckdb) as conn:
        counts = table_counts(conn)
    depth = 0
    warnings: list[str] = []
    for queue in settings.queues():
        try:
            depth += queue.depth()
        except QueueUnavailable:
            context.log.warning(f"could not read the depth of the {queue.name} queue")
            continue
        warning = durability_warning(queue)
        if warning is not None:
            context.log.warning(warning)
            warnings.append(warning)
    return dg.MaterializeResult(
        metadata={
            "new_rows": total.new,
            "duplicates": total.duplicates,
            "rejected": total.rejected,
            "records_read": total.read,
            "batches": total.batches,
            "rejected_by_field": dg.MetadataValue.json(total.reasons),
            "total_rows": counts["raw_events"],
            "rejected_total": counts["rejected_events"],
            "queue_depth_left": depth,
            "queue_durability": "; ".join(warnings) or "ok",
            "dagster/row_count": counts["raw_events"],
        }
    )
