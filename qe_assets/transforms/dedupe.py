"""Idempotency on `request_id`: which incoming events are new, re-sends, or conflicts."""

from __future__ import annotations

import polars as pl

NEW, DUPLICATE, CONFLICT = "new", "duplicate", "conflict"


def classify_events(incoming: pl.DataFrame, stored: pl.DataFrame) -> pl.DataFrame:
    """Add `status` to `incoming` (needs request_id, fingerprint), keeping its order.

    `stored` holds request_id and fingerprint of rows already in raw_events for those ids.
    The first arrival of an id wins: a later event with the same content is a `duplicate`,
    one with different content a `conflict`, whether the first arrived earlier or in this batch.
    """
    stored_fp = stored.select("request_id", pl.col("fingerprint").alias("_stored_fp"))
    reference = pl.coalesce("_stored_fp", pl.col("fingerprint").first().over("request_id"))
    return (
        incoming.join(stored_fp, on="request_id", how="left", maintain_order="left")
        .with_columns(
            status=pl.when(
                pl.col("_stored_fp").is_null() & pl.col("request_id").is_first_distinct()
            )
            .then(pl.lit(NEW))
            .when(pl.col("fingerprint") == reference)
            .then(pl.lit(DUPLICATE))
            .otherwise(pl.lit(CONFLICT))
        )
        .drop("_stored_fp")
    )
