"""Stage 3, naive completions: a label-specific prefix in the sample's language + the old answer.

The offline default (seed §4.2, simple mode). LLM completions replace it when a model is
configured; both produce the same columns so the dataset stage does not care which ran.
"""

from __future__ import annotations

import polars as pl

from qe_assets.templates import Templates

NAIVE, LLM, HUMAN = "naive", "llm", "human"
OK, FAILED = "ok", "failed"
# Higher wins when a sample has completions from several sources.
MODE_RANK = {NAIVE: 1, LLM: 2, HUMAN: 3}

COMPLETION_SCHEMA: dict[str, pl.DataType] = {
    "sample_id": pl.String(),
    "completion": pl.String(),
    "mode": pl.String(),
    "status": pl.String(),
    "model": pl.String(),
    "error": pl.String(),
    "attempts": pl.Int32(),
}


def naive_completions(samples: pl.DataFrame, templates: Templates) -> pl.DataFrame:
    """Needs sample_id, language, label, original_answer; returns COMPLETION_SCHEMA columns."""
    return templates.attach(
        samples.select("sample_id", "language", "label", "original_answer"),
        "naive_prefixes",
        "prefix",
    ).select(
        "sample_id",
        (pl.col("prefix") + pl.col("original_answer")).alias("completion"),
        pl.lit(NAIVE).alias("mode"),
        pl.lit(OK).alias("status"),
        pl.lit(None, dtype=pl.String).alias("model"),
        pl.lit(None, dtype=pl.String).alias("error"),
        pl.lit(1, dtype=pl.Int32).alias("attempts"),
    )
