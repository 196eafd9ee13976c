"""Stage 1, capture: the queue drained into raw_events, exactly once."""

from collections.abc import Iterator

import dagster as dg
from dagster_duckdb import DuckDBResource

from qe_assets.assets import PIPELINE_GROUP, check_result, only_selected
from qe_assets.backlog import look_at_queues, queue_freshness, reject_share, reject_shares
from qe_assets.ingest import IngestReport, ingest_pending
from qe_assets.queues import EventQueue, QueueUnavailable, durability_warning
from qe_assets.resources import (
    PipelineSettings,
    QueueResource,
    duckdb_writer,
    exclusive_stage,
    writer_session,
)
from qe_assets.store import table_counts
from qe_assets.web.links import dashboard_url


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
