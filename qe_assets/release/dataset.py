"""Stage 4, export: the train/validation split and the two line formats of a dataset version."""

from __future__ import annotations

import polars as pl

from qe_assets.annotate.labels import sample_id_parts
from qe_assets.lib.pii import redact_series
from qe_assets.lib.templates import Templates
from qe_assets.store import sql_over_frames

TRAIN_SPLIT, VALIDATION_SPLIT = "train", "validation"
# Held out of every file for the evaluation gate (the `evaluation_set` table, never exported).
EVALUATION_SPLIT = "evaluation"
# Columns of the seed's JSONL record (CONTRACT §4), in file order; `weight` extends it for
# trainers that take a per-sample loss weight.
RECORD_COLUMNS = ("sample_id", "prompt", "completion", "label", "confidence", "score", "weight")
BUCKETS = 10_000
# Exported in place of a sample_id that holds PII. A stored sample_id always has a `#` and a
# pseudonym never does, so the two can never be mistaken for one another.
PSEUDONYM_PREFIX = "pii-"


def assign_split(
    frame: pl.DataFrame, validation_share: float, evaluation_share: float = 0.0
) -> pl.DataFrame:
    """Add `split` from `question_key` (hex digest of the normalised question).

    The bucket depends on the question alone, so the same question lands on the same side in
    every version, and never on both. Validation takes the lowest buckets, evaluation the
    highest, so changing one share never moves a question into the other.
    """
    bucket = pl.col("question_key").str.slice(0, 8).str.to_integer(base=16) % BUCKETS
    return frame.with_columns(
        split=pl.when(bucket < round(validation_share * BUCKETS))
        .then(pl.lit(VALIDATION_SPLIT))
        .when(bucket >= BUCKETS - round(evaluation_share * BUCKETS))
        .then(pl.lit(EVALUATION_SPLIT))
        .otherwise(pl.lit(TRAIN_SPLIT))
    )


def records(frame: pl.DataFrame) -> pl.DataFrame:
    """The seed's record; `weight` is the confidence, the seed's suggested loss weight (§7.3)."""
    return frame.select(*RECORD_COLUMNS[:-1], pl.col("confidence").alias("weight"))


def _prompt_messages(frame: pl.DataFrame, templates: Templates, system_message: bool) -> list:
    """The system (optional) and user messages of each sample, as encoded JSON objects."""
    parts = [pl.struct(role=pl.lit("user"), content=pl.col("prompt")).struct.json_encode()]
    if system_message:
        # Looked up per row rather than joined: a join would copy every prompt of the batch.
        system = pl.col("language").replace_strict(
            templates.system, default=None, return_dtype=pl.String
        )
        parts.insert(0, pl.struct(role=pl.lit("system"), content=system).struct.json_encode())
    return parts


def _json_list(parts: list) -> pl.Expr:
    return pl.concat_str([pl.lit("["), pl.concat_str(parts, separator=","), pl.lit("]")])


def _assistant(column: str) -> pl.Expr:
    return pl.struct(role=pl.lit("assistant"), content=pl.col(column)).struct.json_encode()


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
        *_prompt_messages(frame, templates, system_message),
        pl.struct(**assistant).struct.json_encode(),
    ]
    return frame.select(
        pl.concat_str([pl.lit('{"messages":'), _json_list(parts), pl.lit("}")]).alias("line")
    ).to_series()


def preference_pairs(frame: pl.DataFrame) -> pl.DataFrame:
    """The samples that make a trustworthy preference pair: the completion (*chosen*) is a
    human's edit or an LLM rewrite the judge approved, the original answer that triggered the
    quality event is *rejected*. A naive completion holds the original answer itself, and an
    unjudged rewrite is not known to be better: neither forms a pair."""
    trusted = (pl.col("mode") == "human") | ((pl.col("mode") == "llm") & pl.col("judged"))
    original = pl.col("original_answer").fill_null("").str.strip_chars()
    return frame.filter(
        trusted & (original != "") & (pl.col("completion").str.strip_chars() != original)
    )


def preference_lines(
    pairs: pl.DataFrame, templates: Templates, *, system_message: bool = True
) -> pl.DataFrame:
    """Per pair, `trl`: TRL's conversational preference format {"prompt": [system?, user],
    "chosen": [assistant], "rejected": [assistant]}; `openai`: OpenAI's preference fine-tuning
    format {"input": {"messages": [...]}, "preferred_output": [...],
    "non_preferred_output": [...]}."""
    prompt = _json_list(_prompt_messages(pairs, templates, system_message))
    chosen = _json_list([_assistant("completion")])
    rejected = _json_list([_assistant("original_answer")])
    return pairs.select(
        pl.concat_str(
            [
                *(pl.lit('{"prompt":'), prompt, pl.lit(',"chosen":'), chosen),
                *(pl.lit(',"rejected":'), rejected, pl.lit("}")),
            ]
        ).alias("trl"),
        pl.concat_str(
            [
                *(pl.lit('{"input":{"messages":'), prompt, pl.lit('},"preferred_output":'), chosen),
                *(pl.lit(',"non_preferred_output":'), rejected, pl.lit("}")),
            ]
        ).alias("openai"),
    )


def label_counts(frame: pl.DataFrame) -> dict[str, int]:
    counts = frame.group_by("label").len().sort(["len", "label"], descending=[True, False])
    return dict(zip(counts["label"].to_list(), counts["len"].to_list(), strict=True))


def exported_sample_ids(ids: pl.Series) -> pl.Series:
    """The sample_ids as a redacting export writes them: unchanged, or `pii-<sha256 of the id>`
    when its request id or label holds PII. Stable (a hash of the stored id) and collision-free
    (sha256 of distinct ids); the stored id stays the key in the tables."""
    frame = ids.to_frame("id").with_row_index("row")
    request, label = sample_id_parts(pl.col("id"))
    # A newline splits the two parts: no pattern spans one, so PII cannot straddle the `#`.
    text = pl.concat_str([pl.coalesce(request, pl.col("id")), label.fill_null("")], separator="\n")
    parts = frame.select(text).to_series()
    redacted, _ = redact_series(parts)
    flagged = frame.filter((redacted != parts).fill_null(False))
    if flagged.is_empty():
        return ids
    # sha256 in DuckDB: vectorised, and stable across library versions, unlike Polars' hash.
    pseudonyms = sql_over_frames(
        f"SELECT row, '{PSEUDONYM_PREFIX}' || sha256(id) AS pseudonym FROM flagged",
        flagged=flagged,
    )
    out = frame.join(pseudonyms, on="row", how="left", maintain_order="left")
    return out.select(pl.coalesce("pseudonym", "id").alias(ids.name)).to_series()


def redact_identifiers(frame: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    """`label` redacted and `sample_id` pseudonymised where they hold PII: what every exported
    file, manifest and metadata entry shows. Returns the replacements per kind in labels."""
    labels, found = redact_series(frame.get_column("label"))
    return frame.with_columns(labels, exported_sample_ids(frame.get_column("sample_id"))), found
