"""Stage 3, completions: one completion per new `train` sample (naive mode offline)."""

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

from qe_assets.assets.annotate import annotated_samples
from qe_assets.resources import WRITER_POOL, PipelineSettings, duckdb_writer
from qe_assets.store import query_frame, set_watermark, transaction, watermark
from qe_assets.templates import load_templates
from qe_assets.transforms.annotate import TRAIN
from qe_assets.transforms.completions import naive_completions

STAGE = "completions"
_COLUMNS = "sample_id, completion, mode, status, model, error, attempts"


def complete_next_batch(conn: duckdb.DuckDBPyConnection, batch_size: int) -> tuple[int, int]:
    """Complete the train samples of the next range of annotated samples past the watermark.

    Returns (samples scanned, completions written); (0, 0) when there is nothing new.
    """
    low = watermark(conn, STAGE)
    ((high, scanned),) = conn.execute(
        """
        SELECT max(seq), count(*) FROM (
            SELECT seq FROM annotated_samples WHERE seq > ? ORDER BY seq LIMIT ?
        )
        """,
        [low, batch_size],
    ).fetchall()
    if not scanned:
        return 0, 0
    samples = query_frame(
        conn,
        """
        SELECT sample_id, language, label, original_answer FROM annotated_samples
        WHERE seq > ? AND seq <= ? AND route = ? AND duplicate_of IS NULL
        ORDER BY seq
        """,
        [low, high, TRAIN],
    )
    conn.register("new_completions", naive_completions(samples, load_templates()))
    with transaction(conn):
        # DO NOTHING: a completion that already exists (a human's, say) is never overwritten.
        conn.execute(
            f"""
            INSERT INTO completions ({_COLUMNS}, created_at, updated_at, seq)
            SELECT {_COLUMNS}, now()::TIMESTAMP, now()::TIMESTAMP, nextval('completions_seq')
            FROM new_completions ON CONFLICT DO NOTHING
            """
        )
        set_watermark(conn, STAGE, int(high))
    return int(scanned), samples.height


@dg.asset(
    deps=[annotated_samples],
    group_name="complete",
    kinds={"duckdb", "polars"},
    pool=WRITER_POOL,
    description=(
        "A completion for every new `train` sample. Naive mode (the offline default): a "
        "label-specific prefix in the sample's language followed by the original answer. "
        "Review samples wait for a human; duplicates are skipped."
    ),
)
def completions(
    context: dg.AssetExecutionContext, duckdb: DuckDBResource, settings: PipelineSettings
) -> dg.MaterializeResult:
    scanned_total = written_total = 0
    while True:
        with duckdb_writer(duckdb) as conn:
            scanned, written = complete_next_batch(conn, settings.ingest_batch_size)
        if not scanned:
            break
        scanned_total += scanned
        written_total += written
        context.log.info(f"completed {written} of {scanned} new samples")
    with duckdb_writer(duckdb) as conn:
        rows = conn.execute(
            "SELECT mode, status, count(*) FROM completions GROUP BY ALL"
        ).fetchall()
    total = sum(count for _, _, count in rows)
    metadata: dict[str, dg.RawMetadataValue] = {
        "new_completions": written_total,
        "samples_scanned": scanned_total,
        "mode": "naive",
        "total_completions": total,
        "dagster/row_count": total,
    }
    for mode, status, count in rows:
        metadata[f"total/{mode}/{status}"] = count
    return dg.MaterializeResult(metadata=metadata)
