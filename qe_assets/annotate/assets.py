"""Stage 2, annotate: new raw events → annotated_samples, batch by batch, by watermark."""

from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import duckdb
import polars as pl
from dagster_duckdb import DuckDBResource

from qe_assets.annotate.labels import AnnotateConfig, annotate_events
from qe_assets.lib.links import dashboard_url
from qe_assets.lib.pii import redacted_label_counts
from qe_assets.lib.resources import (
    PipelineSettings,
    duckdb_writer,
    exclusive_stage,
    writer_session,
)
from qe_assets.lib.stages import PIPELINE_GROUP, check_result, only_selected
from qe_assets.lib.templates import load_templates
from qe_assets.review.backlog import ReviewBacklog, review_age, review_backlog, review_size
from qe_assets.review.decisions import (
    LOW_CONFIDENCE,
    SPOT_CHECK,
    acceptance_by_label,
    enqueue_for_review,
)
from qe_assets.settings import Settings
from qe_assets.store import (
    ConnectionFactory,
    register_frame,
    select_frame,
    set_watermark,
    transaction,
    watermark,
)

STAGE = "annotated_samples"
_SAMPLE_COLUMNS = (
    "sample_id, request_id, event_seq, label, labels, language, question, original_answer, "
    "context_docs, instruction, prompt, score, confidence, route, route_reason"
)
_COLUMNS = f"{_SAMPLE_COLUMNS}, question_key, dedup_key, duplicate_of"


def annotate_config(settings: Settings) -> AnnotateConfig:
    return AnnotateConfig(
        top_k=settings.context_top_k,
        max_chars=settings.context_max_chars,
        confidence_factor=settings.confidence_factor,
        min_confidence=settings.min_confidence,
        language=settings.instruction_language,
    )


def read_new_events(conn: duckdb.DuckDBPyConnection, after: int, limit: int) -> pl.DataFrame:
    """The next raw events past `after` (a raw_events.seq), in ingest order.

    The batch's last seq first, from the seq column alone: then the rows are read by a range
    that the scan prunes by itself, and no sort has to carry their documents around."""
    ((last,),) = conn.execute(
        "SELECT max(seq) FROM (SELECT seq FROM raw_events WHERE seq > ? ORDER BY seq LIMIT ?)",
        [after, limit],
    ).fetchall()
    rows = select_frame(
        conn,
        """
        SELECT request_id, seq, question, docs, answer, score, labels
        FROM raw_events WHERE seq > ? AND seq <= ?
        """,
        [after, last if last is not None else after],
    )
    return rows if rows["seq"].is_sorted() else rows.sort("seq")


def annotated_batch(raw: pl.DataFrame, config: AnnotateConfig) -> pl.DataFrame:
    """Annotated samples of `raw`, before their keys (see `commit_samples`); touches no store."""
    return annotate_events(raw, config, load_templates())


# The batch's keys and duplicates, decided by the store in the INSERT that writes it. md5 in
# DuckDB: stable across library versions, unlike Polars' hash. The first sample of a dedup_key
# is kept: an earlier kept one from the store, else the batch's first; the others point at it in
# duplicate_of. Only the narrow key columns are joined and sorted; the samples' text is paired
# with them by position, in batch order. RETURNING names the rows really written: the stage's
# counts are of those, and only those enter the review queue (a sample_id already stored is
# skipped, never counted twice).
# Skipped by a filter on the narrow keys, not ON CONFLICT DO NOTHING, which was most of the
# INSERT's time on rows this wide (docs/performance.md). It looks only at the batch's event_seq
# range, which the zone maps prune to a few row groups: a stored sample with the same sample_id
# has the same request_id, so it came from the same raw event (request_id is raw_events' key and
# rows are never deleted) and carries that event's seq. Should that ever not hold, the primary
# key still refuses the row.
_WRITTEN = dict.fromkeys(("sample_id", "label", "route", "duplicate_of"), pl.String)
_INSERT_SAMPLES = f"""
WITH keys AS (
    SELECT batch_row, sample_id, md5(question_norm) AS question_key, md5(dedup_text) AS dedup_key
    FROM batch_samples
), kept AS (
    SELECT dedup_key, arg_min(sample_id, seq) AS earlier
    FROM annotated_samples SEMI JOIN keys USING (dedup_key)
    WHERE duplicate_of IS NULL
    GROUP BY dedup_key
), stored AS (
    SELECT sample_id FROM annotated_samples
    WHERE event_seq BETWEEN $low AND $high AND sample_id IN (SELECT sample_id FROM keys)
), marked AS (
    SELECT k.question_key, k.dedup_key,
           coalesce(kept.earlier, CASE WHEN row_number() OVER same_key > 1
                                       THEN first_value(k.sample_id) OVER same_key END)
               AS duplicate_of,
           k.sample_id IN (SELECT sample_id FROM stored) AS already_stored
    FROM keys k LEFT JOIN kept USING (dedup_key)
    WINDOW same_key AS (PARTITION BY k.dedup_key ORDER BY k.batch_row)
    ORDER BY k.batch_row
)
INSERT INTO annotated_samples ({_COLUMNS}, annotated_at)
SELECT {_SAMPLE_COLUMNS}, question_key, dedup_key, duplicate_of, now()::TIMESTAMP
FROM batch_samples POSITIONAL JOIN marked
WHERE NOT already_stored
RETURNING sample_id, label, route, duplicate_of
"""


def commit_samples(
    conn: duckdb.DuckDBPyConnection, samples: pl.DataFrame, last_seq: int, spot_share: float
) -> pl.DataFrame:
    """Key the batch, mark its duplicates against the kept samples, write it, queue its review
    samples and move the watermark to `last_seq`, in one transaction; returns the rows written
    (sample_id, label, route, duplicate_of, and review_reason: why it was queued for review,
    null when it was not)."""
    register_frame(conn, "batch_samples", samples.with_row_index("batch_row"))
    try:
        with transaction(conn):
            span = {"low": samples["event_seq"].min(), "high": samples["event_seq"].max()}
            written = pl.DataFrame(
                conn.execute(_INSERT_SAMPLES, span).fetchall(), schema=_WRITTEN, orient="row"
            )
            register_frame(conn, "new_samples", written)
            queued = enqueue_for_review(conn, "new_samples", spot_share)
            set_watermark(conn, STAGE, last_seq)
    finally:
        conn.unregister("batch_samples")
    return written.with_columns(
        review_reason=pl.col("sample_id").replace_strict(
            queued, default=None, return_dtype=pl.String
        )
    )


def annotate_pending(
    connection: ConnectionFactory,
    config: AnnotateConfig,
    *,
    batch_size: int,
    spot_share: float,
    on_batch: Callable[[pl.DataFrame], None] | None = None,
) -> int:
    """Annotate every raw event past the watermark, batch by batch; returns how many.

    Each connection commits a batch on a helper thread while this thread reads the batch after
    it (through a cursor: a connection of its own to the same database, which MVCC keeps apart
    from the commit) and annotates it (Polars, on the other core); the connection then closes
    behind us (see `WriterSession`). Batches still commit one after another, each with its
    watermark, so a crash replays at most the uncommitted ones.
    """
    with connection() as conn:
        raw = read_new_events(conn, watermark(conn, STAGE), batch_size)
    if raw.is_empty():
        return 0
    batch: pl.DataFrame | None = annotated_batch(raw, config)
    last_seq = int(raw["seq"].max())
    done = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="annotate-commit") as committer:
        while batch is not None:
            with connection() as conn, closing(conn.cursor()) as reader:
                committed = committer.submit(commit_samples, conn, batch, last_seq, spot_share)
                try:
                    ahead = read_new_events(reader, last_seq, batch_size)
                    batch = None if ahead.is_empty() else annotated_batch(ahead, config)
                except BaseException as exc:
                    # The commit must end before its connection does; its failure is kept too.
                    if (error := committed.exception()) is not None:
                        exc.add_note(f"the commit of the batch before also failed: {error!r}")
                    raise
                samples = committed.result()
            done += samples.height
            if on_batch is not None:
                on_batch(samples)
            if not ahead.is_empty():
                last_seq = int(ahead["seq"].max())
    return done


def redacted_outcomes(reviewed: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """`acceptance_by_label` with PII redacted from the labels; merged labels are re-weighted."""
    counts = redacted_label_counts({k: v["reviewed"] for k, v in reviewed.items()})
    kept = redacted_label_counts({k: v["reviewed"] * v["kept_share"] for k, v in reviewed.items()})
    return {
        label: {"reviewed": int(n), "kept_share": round(kept[label] / n, 4)}
        for label, n in counts.items()
    }


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            "annotated_samples",
            deps=["raw_events"],
            group_name=PIPELINE_GROUP,
            kinds={"duckdb", "polars"},
            description=(
                "One sample per new raw event: primary label by priority (English or Chinese "
                "labels), top-k context documents by score, a correction instruction per label "
                "and language, the prompt (context + instruction + question), confidence = "
                "min(1, score × factor), and the route: `train`, or `review` for a human when the "
                "confidence is under the gate. Exact duplicates are kept once; the others point "
                "at it in `duplicate_of`."
            ),
        ),
        dg.AssetSpec(
            "review_queue",
            deps=["raw_events"],
            group_name=PIPELINE_GROUP,
            kinds={"duckdb"},
            description=(
                "Samples waiting for a person (`qe review`): the low-confidence ones, plus a "
                "spot-check share of `train` samples. Written with `annotated_samples`; a sample "
                "stays out of every version until it is decided."
            ),
        ),
    ],
    check_specs=[
        dg.AssetCheckSpec(
            "review_backlog_size",
            asset="review_queue",
            description="Warns when more than QE_MAX_REVIEW_BACKLOG samples wait for review.",
        ),
        dg.AssetCheckSpec(
            "review_backlog_age",
            asset="review_queue",
            description=(
                "Warns when the oldest pending review is older than QE_MAX_REVIEW_AGE; also "
                "reported by the queue sensor between runs."
            ),
        ),
    ],
    can_subset=True,
)
def annotated_samples(
    context: dg.AssetExecutionContext, duckdb: DuckDBResource, settings: PipelineSettings
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    yield from only_selected(context, _annotate_stage(context, duckdb, settings))


@dataclass
class _Annotated:
    """What this run annotated, batch by batch, as the stage's metadata reports it."""

    log: Callable[[str], None]
    new: int = 0
    duplicates: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    routes: Counter[str] = field(default_factory=Counter)
    # Why each newly queued sample waits for a person: low confidence, or a spot check of a
    # `train` sample; `qe status` counts both, so the run says both.
    queued: Counter[str] = field(default_factory=Counter)

    def add(self, batch: pl.DataFrame) -> None:
        self.new += batch.height
        self.duplicates += int(batch["duplicate_of"].is_not_null().sum())
        self.labels.update(dict(batch.group_by("label").len().iter_rows()))
        self.routes.update(dict(batch.group_by("route").len().iter_rows()))
        reasons = batch["review_reason"].drop_nulls()
        self.queued.update(dict(reasons.value_counts().iter_rows()))
        self.log(f"annotated {batch.height} events ({self.new} so far)")


@dataclass(frozen=True)
class _StoreFigures:
    total: int
    backlog: ReviewBacklog
    reviewed: dict[str, dict[str, float]]
    last_hour: int
    last_day: int


def _store_figures(duckdb: DuckDBResource) -> _StoreFigures:
    with duckdb_writer(duckdb) as conn:
        ((total,),) = conn.execute("SELECT count(*) FROM annotated_samples").fetchall()
        # The seed's "sample production rate": train samples annotated per hour.
        ((last_hour, last_day),) = conn.execute(
            """
            SELECT count(*) FILTER (annotated_at > now()::TIMESTAMP - INTERVAL 1 HOUR),
                   count(*) FILTER (annotated_at > now()::TIMESTAMP - INTERVAL 24 HOUR)
            FROM annotated_samples WHERE route = 'train' AND duplicate_of IS NULL
            """
        ).fetchall()
        return _StoreFigures(
            int(total), review_backlog(conn), acceptance_by_label(conn), last_hour, last_day
        )


def _samples_metadata(
    run: _Annotated, labels: Counter[str], store: _StoreFigures, settings: Settings
) -> dict[str, Any]:
    metadata: dict[str, dg.RawMetadataValue] = {
        "new_samples": run.new,
        "new_train": run.routes.get("train", 0),
        "new_review": run.routes.get("review", 0),
        "new_duplicates": run.duplicates,
        "review_queue_size": store.backlog.pending,
        "train_samples_last_hour": int(store.last_hour),
        "train_samples_per_hour_24h": round(store.last_day / 24, 2),
        "total_samples": store.total,
        "dagster/row_count": store.total,
        "new_label_counts": dg.MetadataValue.json(dict(labels.most_common())),
        "dashboards": dg.MetadataValue.url(dashboard_url(settings, "labels")),
    }
    # One numeric entry per label so the Plots tab charts each over time.
    for label, count in labels.items():
        metadata[f"new_label/{label}"] = count
    return metadata


def _review_metadata(
    run: _Annotated,
    reviewed: dict[str, dict[str, float]],
    store: _StoreFigures,
    settings: Settings,
) -> dict[str, Any]:
    review: dict[str, dg.RawMetadataValue] = {
        "pending": store.backlog.pending,
        "dagster/row_count": store.backlog.pending,
        "new_queued": sum(run.queued.values()),
        "new_low_confidence": run.queued.get(LOW_CONFIDENCE, 0),
        "new_spot_check": run.queued.get(SPOT_CHECK, 0),
        "dashboards": dg.MetadataValue.url(dashboard_url(settings, "backlog")),
    }
    for label, outcome in reviewed.items():
        review[f"review_kept_share/{label}"] = outcome["kept_share"]
    if reviewed:
        review["review_outcomes"] = dg.MetadataValue.json(reviewed)
    return review


def _annotate_stage(
    context: dg.AssetExecutionContext, duckdb: DuckDBResource, settings: PipelineSettings
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    run = _Annotated(context.log.info)
    with exclusive_stage(context, settings), writer_session(duckdb) as session:
        annotate_pending(
            session.connection,
            annotate_config(settings),
            batch_size=settings.ingest_batch_size,
            spot_share=settings.spot_check_share,
            on_batch=run.add,
        )
    store = _store_figures(duckdb)
    labels, reviewed = run.labels, store.reviewed
    if settings.pii_redaction:
        # Labels are free text: what holds PII must not reach Dagster's run storage either.
        labels = Counter(redacted_label_counts(labels))
        reviewed = redacted_outcomes(reviewed)
    yield dg.MaterializeResult(
        asset_key="annotated_samples", metadata=_samples_metadata(run, labels, store, settings)
    )
    yield dg.MaterializeResult(
        asset_key="review_queue", metadata=_review_metadata(run, reviewed, store, settings)
    )
    backlog = store.backlog
    yield check_result(
        "review_queue",
        "review_backlog_size",
        review_size(backlog, settings.max_review_backlog),
    )
    yield check_result(
        "review_queue",
        "review_backlog_age",
        review_age(backlog, settings.max_review_age_seconds),
    )
