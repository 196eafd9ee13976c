"""Stage 4, export: the train/validation split and the two line formats of a dataset version."""

from __future__ import annotations

import polars as pl

from qe_assets.templates import Templates

TRAIN_SPLIT, VALIDATION_SPLIT = "train", "validation"
# Columns of the seed's JSONL record (CONTRACT §4), in file order; `weight` extends it for
# trainers that take a per-sample loss weight.
RECORD_COLUMNS = ("sample_id", "prompt", "completion", "label", "confidence", "score", "weight")
_BUCKETS = 10_000


def assign_split(frame: pl.DataFrame, validation_share: float) -> pl.DataFrame:
    """Add `split` from `question_key` (hex digest of the normalised question).

    The bucket depends on the question alone, so the same question lands on the same side in
    every version, and never on both.
    """
    bucket = pl.col("question_key").str.slice(0, 8).str.to_integer(base=16) % _BUCKETS
    return frame.with_columns(
        split=pl.when(bucket < round(validation_share * _BUCKETS))
        .then(pl.lit(VALIDATION_SPLIT))
        .otherwise(pl.lit(TRAIN_SPLIT))
    )


def records(frame: pl.DataFrame) -> pl.DataFrame:
    """The seed's record; `weight` is the confidence, the seed's suggested loss weight (§7.3)."""
    return frame.select(*RECORD_COLUMNS[:-1], pl.col("confidence").alias("weight"))


def chat_lines(
    frame: pl.DataFrame,
    templates: Templates,
    *,
    system_message: bool = True,
    weight_threshold: float | None = None,
) -> pl.Series:
    """One OpenAI chat fine-tuning line per sample: {"messages": [system?, user, assistant]}.

    OpenAI accepts only weight 0 or 1 on assistant messages; with `weight_threshold` set, samples
    under it keep their place in the file but teach nothing (weight 0).
    """
    assistant = {"role": pl.lit("assistant"), "content": pl.col("completion")}
    if weight_threshold is not None:
        assistant["weight"] = (pl.col("confidence") >= weight_threshold).cast(pl.Int8)
    parts = [
        pl.struct(role=pl.lit("user"), content=pl.col("prompt")).struct.json_encode(),
        pl.struct(**assistant).struct.json_encode(),
    ]
    if system_message:
        # Looked up per row rather than joined: a join would copy every prompt of the batch.
        system = pl.col("language").replace_strict(
            templates.system, default=None, return_dtype=pl.String
        )
        parts.insert(0, pl.struct(role=pl.lit("system"), content=system).struct.json_encode())
    return frame.select(
        pl.concat_str(
            [pl.lit('{"messages":['), pl.concat_str(parts, separator=","), pl.lit("]}")]
        ).alias("line")
    ).to_series()


def label_counts(frame: pl.DataFrame) -> dict[str, int]:
    counts = frame.group_by("label").len().sort(["len", "label"], descending=[True, False])
    return dict(zip(counts["label"].to_list(), counts["len"].to_list(), strict=True))
