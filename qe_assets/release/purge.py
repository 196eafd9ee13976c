"""`qe purge`: redact the raw text the tables keep once it has served its purpose.

The export redacts PII on the way into the dataset files, but the tables keep what was received
(for audit, review and re-export). Purging replaces, in place, the text of samples that are
already in a dataset version and older than a cut-off, and of their raw events and completions,
with its redacted form (the same detectors as the export, `transforms/pii.py`). Free-form JSON
that cannot be redacted as text without breaking it (`raw_events.checks`, `raw_events.extra`,
documents' `meta`) is dropped, and `raw_events.evaluation` is rebuilt from the score and the
redacted labels. Keys are kept as they are: `request_id` and `sample_id` tie the tables together
(an id holding PII is only pseudonymised in exports). Samples never exported (duplicates,
rejected or still under review) and rejected events are not touched. `llm_cache` entries older
than the cut-off whose answer holds PII are deleted (see `_purge_cache`).

Runs under the store's writer lock, one short transaction per batch, like every writing stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from qe_assets.lib.pii import redact
from qe_assets.store import WriterSession, select_frame, transaction, writer_lock

BATCH_SIZE = 5_000

_SAMPLES = """
    SELECT s.seq, s.sample_id, s.request_id, s.label, s.labels, s.question, s.original_answer,
           s.context_docs, s.prompt
    FROM annotated_samples s
    WHERE s.seq > $after AND s.annotated_at < now()::TIMESTAMP - to_seconds($age)
      AND EXISTS (SELECT 1 FROM dataset_samples d WHERE d.sample_id = s.sample_id)
    ORDER BY s.seq LIMIT $limit
"""
_EVENTS = """
    SELECT e.request_id, e.question, e.answer, e.docs, e.labels, e.score
    FROM raw_events e SEMI JOIN purge_batch USING (request_id)
    WHERE e.ingested_at < now()::TIMESTAMP - to_seconds($age)
"""
# The cache has no link to samples: its old entries are judged by their own text.
_CACHE = """
    SELECT cache_key, content FROM llm_cache
    WHERE cache_key > $after AND created_at < now()::TIMESTAMP - to_seconds($age)
    ORDER BY cache_key LIMIT $limit
"""
_COMPLETIONS = """
    SELECT c.sample_id, c.completion, c.judge_verdict
    FROM completions c SEMI JOIN purge_batch USING (sample_id)
"""


@dataclass
class PurgeCounts:
    """Rows whose text changed, per table (a row already clean is left alone)."""

    raw_events: int = 0
    annotated_samples: int = 0
    completions: int = 0
    llm_cache: int = 0  # entries deleted


def _redact_lists(frame: pl.DataFrame, column: str, text_field: str | None) -> pl.DataFrame:
    """Redact the strings of a list column (or one String field of a list of structs)."""
    flat = frame.select(pl.int_range(pl.len()).alias("_row"), column).explode(column)
    present = flat[column].is_not_null()
    if text_field is None:
        values, _ = redact(flat, [column])
    else:
        fields = flat[column].struct.unnest()
        texts, _ = redact(fields, [text_field])
        # Free-form per-document metadata is dropped rather than redacted as text (JSON).
        rebuilt = texts.with_columns(pl.lit(None, dtype=pl.String).alias("meta"))
        values = flat.with_columns(rebuilt.select(pl.struct(pl.all()).alias(column)))
    nested = (
        values.filter(present)
        .group_by("_row")
        .agg(pl.col(column))
        .join(
            pl.DataFrame({"_row": range(frame.height)}, schema={"_row": pl.Int64}),
            on="_row",
            how="right",
        )
        .sort("_row")
    )
    empty = pl.lit([], dtype=frame.schema[column])
    return frame.with_columns(nested[column].fill_null(empty).alias(column))


def _changed(before: pl.DataFrame, after: pl.DataFrame, columns: list[str]) -> pl.Series:
    flags = [before[c].ne_missing(after[c]) for c in columns]
    return pl.DataFrame(flags).select(pl.any_horizontal(pl.all())).to_series()


def _update(
    conn: duckdb.DuckDBPyConnection, table: str, key: str, frame: pl.DataFrame, assign: str
) -> None:
    conn.register("purged", frame)
    conn.execute(f"UPDATE {table} SET {assign} FROM purged WHERE {table}.{key} = purged.{key}")
    conn.unregister("purged")


def _purge_samples(conn: duckdb.DuckDBPyConnection, batch: pl.DataFrame) -> int:
    texts = ["label", "question", "original_answer", "prompt"]
    after, _ = redact(batch, texts)
    after = _redact_lists(_redact_lists(after, "labels", None), "context_docs", "content")
    changed = after.filter(_changed(batch, after, [*texts, "labels", "context_docs"]))
    if changed.height:
        assign = ", ".join(f"{c} = purged.{c}" for c in [*texts, "labels", "context_docs"])
        _update(conn, "annotated_samples", "sample_id", changed, assign)
    return changed.height


# Only rows something changes in are rewritten, so a second purge writes nothing.
_UPDATE_EVENTS = """
    UPDATE raw_events SET question = p.question, answer = p.answer, docs = p.docs,
        labels = p.labels, checks = NULL, extra = NULL, evaluation = p.evaluation
    FROM (SELECT *, json_object('score', score, 'labels', labels) AS evaluation FROM purged) p
    WHERE raw_events.request_id = p.request_id AND (
        raw_events.question IS DISTINCT FROM p.question
        OR raw_events.answer IS DISTINCT FROM p.answer
        OR raw_events.docs IS DISTINCT FROM p.docs
        OR raw_events.labels IS DISTINCT FROM p.labels
        OR raw_events.checks IS NOT NULL OR raw_events.extra IS NOT NULL
        OR raw_events.evaluation::VARCHAR IS DISTINCT FROM p.evaluation::VARCHAR)
"""


def _purge_events(conn: duckdb.DuckDBPyConnection, events: pl.DataFrame) -> int:
    """Redact the events' text, drop their free-form JSON and rebuild `evaluation` from the
    score and the redacted labels; returns the rows rewritten."""
    if events.is_empty():
        return 0
    after, _ = redact(events, ["question", "answer"])
    after = _redact_lists(_redact_lists(after, "labels", None), "docs", "content")
    conn.register("purged", after)
    ((rewritten,),) = conn.execute(_UPDATE_EVENTS).fetchall()
    conn.unregister("purged")
    return int(rewritten)


def _purge_completions(conn: duckdb.DuckDBPyConnection, completions: pl.DataFrame) -> int:
    texts = ["completion", "judge_verdict"]
    after, _ = redact(completions, texts)
    changed = after.filter(_changed(completions, after, texts))
    if changed.height:
        assign = "completion = purged.completion, judge_verdict = purged.judge_verdict"
        _update(conn, "completions", "sample_id", changed, assign)
    return changed.height


def _purge_cache(session: WriterSession, params: dict[str, Any]) -> int:
    """Delete old cache entries whose answer holds PII, with the verdicts that judged them: a
    cache entry is only money saved (an identical request is paid again), and a judge's JSON
    cannot be redacted as text without risking its syntax."""
    deleted, after = 0, ""
    while True:
        with session.connection() as conn:
            entries = select_frame(conn, _CACHE, {**params, "after": after})
            if entries.is_empty():
                return deleted
            redacted, _ = redact(entries, ["content"])
            holding = entries.filter(_changed(entries, redacted, ["content"])).select("cache_key")
            if holding.height:
                conn.register("holding", holding)
                with transaction(conn):
                    conn.execute(
                        "DELETE FROM llm_cache WHERE cache_key IN (SELECT cache_key FROM holding) "
                        "OR parent_key IN (SELECT cache_key FROM holding)"
                    )
                deleted += holding.height
        after = str(entries["cache_key"].max())


def _purge_samples_batches(session: WriterSession, params: dict[str, Any]) -> PurgeCounts:
    """Exported samples past the age, a batch per transaction, with their events and
    completions."""
    counts, after = PurgeCounts(), 0
    while True:
        with session.connection() as conn:
            batch = select_frame(conn, _SAMPLES, {**params, "after": after})
            if batch.is_empty():
                return counts
            conn.register("purge_batch", batch)
            events = select_frame(conn, _EVENTS, {"age": params["age"]})
            completions = select_frame(conn, _COMPLETIONS)
            with transaction(conn):
                counts.annotated_samples += _purge_samples(conn, batch.drop("seq"))
                counts.raw_events += _purge_events(conn, events)
                counts.completions += _purge_completions(conn, completions)
        after = int(batch["seq"].max())


def purge_exported(
    database: str | Path,
    older_than_seconds: float,
    *,
    config: dict[str, Any] | None = None,
    batch_size: int = BATCH_SIZE,
) -> PurgeCounts:
    """Redact, in place, the text of exported samples (and of their events and completions)
    annotated more than `older_than_seconds` ago, and delete old LLM cache entries holding PII;
    returns the rows changed per table."""
    params: dict[str, Any] = {"age": older_than_seconds, "limit": batch_size}
    with writer_lock(database), WriterSession(database, config=config) as session:
        counts = _purge_samples_batches(session, params)
        counts.llm_cache = _purge_cache(session, params)
    return counts
