"""Stage 2, annotate: raw events → sample skeletons with label, context, instruction, prompt,
confidence and route. Pure Polars; the store adds keys (hashes) and duplicates as it writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from qe_assets.ingest.events import normalised_labels, primary_label
from qe_assets.lib.completions import neutralise
from qe_assets.lib.templates import Templates

TRAIN, REVIEW = "train", "review"
# Any Han character marks the question as Chinese; everything else is answered in English.
_HAN = r"\p{Han}"


@dataclass(frozen=True)
class AnnotateConfig:
    top_k: int = 3
    max_chars: int = 500
    confidence_factor: float = 1.5
    min_confidence: float = 0.6
    language: str = "auto"  # auto | zh | en


def _escape_id_part(part: pl.Expr) -> pl.Expr:
    # `%` first, so the `%` of an escape is never escaped again.
    return part.str.replace_all("%", "%25", literal=True).str.replace_all("#", "%23", literal=True)


def sample_id(request_id: pl.Expr, label: pl.Expr) -> pl.Expr:
    """`request_id#label`, with `%` and `#` percent-escaped in both parts.

    Request ids and unknown labels are free text, so both may hold a `#`: unescaped, `a#b` +
    `c` and `a` + `b#c` would share an id. Escaped, the only bare `#` is the separator and the
    id decodes back to its two parts (injective); ids without `%` or `#` stay as they were.
    """
    return pl.concat_str([_escape_id_part(request_id), pl.lit("#"), _escape_id_part(label)])


def sample_id_parts(ids: pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    """(request_id, label) of a `sample_id`: the inverse of `sample_id`."""

    def unescape(part: pl.Expr) -> pl.Expr:
        # Every `%` of an escaped part starts `%23` or `%25`: `%23` first cannot eat a `%25`.
        return part.str.replace_all("%23", "#", literal=True).str.replace_all(
            "%25", "%", literal=True
        )

    return (
        unescape(ids.str.extract(r"(?s)^(.*)#[^#]*$", 1)),
        unescape(ids.str.extract(r"#([^#]*)$", 1)),
    )


def detect_language(text: pl.Expr) -> pl.Expr:
    return pl.when(text.str.contains(_HAN)).then(pl.lit("zh")).otherwise(pl.lit("en"))


def normalise_text(text: pl.Expr) -> pl.Expr:
    """Case- and whitespace-insensitive form used for duplicate detection and the split."""
    return text.str.to_lowercase().str.replace_all(_WHITESPACE_TO_COLLAPSE, " ").str.strip_chars()


# Exactly what `\s+` → " " does (runs of two or more, or one that is not a plain space, become a
# space), except that a lone plain space is not a match: prose, whose every space `\s+` matched
# and rewrote, now mostly has nothing to replace, and the step takes half the time.
_WHITESPACE_TO_COLLAPSE = r"\s{2,}|[^\S ]"


def select_context(docs: pl.Expr, top_k: int, max_chars: int) -> pl.Expr:
    """Top-k documents by score (missing = 0), ties kept in retrieval order, content truncated."""
    element = pl.element()
    return docs.list.eval(
        element.sort_by(
            element.struct.field("score").fill_null(0.0), descending=True, maintain_order=True
        )
        .head(top_k)
        .struct.with_fields(pl.field("content").str.slice(0, max_chars))
    )


def build_prompts(frame: pl.DataFrame, templates: Templates) -> pl.DataFrame:
    """prompt = numbered context block, instruction, question heading and question (seed §4.1)."""
    headings = templates.per_language().select("language", "document", "question_heading")
    blocks = (
        frame.select("sample_id", "language", "context_docs")
        .join(headings.select("language", "document"), on="language", how="left")
        .explode("context_docs")
        .drop_nulls("context_docs")
        .with_columns(position=pl.int_range(pl.len()).over("sample_id") + 1)
        .group_by("sample_id", maintain_order=True)
        .agg(
            pl.concat_str(
                pl.col("document").str.replace(
                    "{n}", pl.col("position").cast(pl.String), literal=True
                ),
                # Documents are data: quoted between markers they cannot close themselves, so
                # an instruction inside one stays inside its quote.
                pl.lit(" <<<"),
                neutralise(pl.col("context_docs").struct.field("content")),
                pl.lit(">>>"),
            )
            .str.join("\n")
            .alias("context_block")
        )
    )
    return (
        frame.join(blocks, on="sample_id", how="left", maintain_order="left")
        .join(headings.drop("document"), on="language", how="left", maintain_order="left")
        .with_columns(
            prompt=pl.concat_str(
                [
                    (pl.col("context_block") + "\n\n").fill_null(""),
                    pl.col("instruction"),
                    pl.lit("\n\n"),
                    pl.col("question_heading"),
                    pl.lit("\n"),
                    pl.col("question"),
                ]
            )
        )
        .drop("context_block", "question_heading")
    )


def annotate_events(
    raw: pl.DataFrame, config: AnnotateConfig, templates: Templates
) -> pl.DataFrame:
    """One sample per event (its primary label).

    Needs request_id, seq, question, docs, answer, score, labels. The route is `review` when the
    confidence is under the gate: such samples wait for a human instead of being dropped, and
    every event is annotated either way, so nothing stays pending forever.
    """
    language = (
        detect_language(pl.col("question"))
        if config.language == "auto"
        else pl.lit(config.language)
    )
    # Rounded so that equal inputs give equal, readable confidences in files and checks.
    confidence = pl.min_horizontal(pl.lit(1.0), pl.col("score") * config.confidence_factor).round(6)
    frame = raw.select(
        pl.col("request_id"),
        pl.col("seq").alias("event_seq"),
        pl.col("question"),
        pl.col("answer").alias("original_answer"),
        pl.col("score"),
        normalised_labels(pl.col("labels")).alias("labels"),
        language.alias("language"),
        select_context(pl.col("docs"), config.top_k, config.max_chars).alias("context_docs"),
        confidence.alias("confidence"),
    ).with_columns(
        label=primary_label(pl.col("labels")),
        question_norm=normalise_text(pl.col("question")),
    )
    frame = frame.with_columns(
        sample_id=sample_id(pl.col("request_id"), pl.col("label")),
        route=pl.when(pl.col("confidence") >= config.min_confidence)
        .then(pl.lit(TRAIN))
        .otherwise(pl.lit(REVIEW)),
        route_reason=pl.when(pl.col("confidence") >= config.min_confidence)
        .then(pl.lit(None, dtype=pl.String))
        .otherwise(
            pl.format(
                "confidence {} below gate {}",
                pl.col("confidence").round(3),
                pl.lit(config.min_confidence),
            )
        ),
        # What makes two samples the same training example.
        dedup_text=pl.concat_str(
            [
                pl.col("question_norm"),
                pl.col("context_docs")
                .list.eval(normalise_text(pl.element().struct.field("content")))
                .list.join("\u241e"),
                normalise_text(pl.col("original_answer")),
            ],
            separator="\u241f",
        ),
    )
    frame = templates.attach(frame, "instructions", "instruction")
    return build_prompts(frame, templates)
