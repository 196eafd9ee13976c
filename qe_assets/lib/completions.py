"""Stage 3, naive completions: a label-specific prefix in the sample's language + the old answer.

The offline default (seed §4.2, simple mode). LLM completions replace it when a model is
configured; both produce the same columns so the dataset stage does not care which ran.
"""

from __future__ import annotations

import polars as pl

from qe_assets.lib.templates import Templates
from qe_assets.settings import estimated_cost

NAIVE, LLM, HUMAN = "naive", "llm", "human"
OK, FAILED = "ok", "failed"
# An LLM completion for a sample waiting in the review queue: shown to the reviewer, never
# exported (the export takes `ok` only) until a person accepts it.
PROPOSED = "proposed"
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
        pl.lit(0, dtype=pl.Int32).alias("attempts"),  # no LLM request made
    )


# ----- LLM mode ------------------------------------------------------------------------------
# The call itself is per sample (qe_assets.annotate.llm); what to ask, what came back and what it
# means
# for each row is decided here, over whole batches.

REJECTED_BY_JUDGE = "rejected_by_judge"
REGENERATE, JUDGE = "regenerate", "judge"
# The judge reads several texts in one message; each sits between markers it is told to treat as
# data. Marker look-alikes inside the texts are broken up so no text can close its block early.
MARKER_PATTERN = r"<<<|>>>"
MARKER_REPLACEMENT = {"<<<": "< < <", ">>>": "> > >"}
# Deterministic, short verdicts: the judge only has to return two integers and a sentence.
JUDGE_PARAMETERS: dict[str, float | int] = {"temperature": 0.0, "max_tokens": 512}

OUTCOME_SCHEMA: dict[str, pl.DataType] = {
    "sample_id": pl.String(),
    "seq": pl.Int64(),  # annotated_samples.seq
    "retry": pl.Boolean(),  # a failed row retried, not a new sample
    "regen_key": pl.String(),
    "content": pl.String(),
    "finish_reason": pl.String(),
    "error": pl.String(),
    "attempts": pl.Int32(),
    "cached": pl.Boolean(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
    "latency_s": pl.Float64(),
    "judge_key": pl.String(),
    "judge_content": pl.String(),
    "judge_error": pl.String(),
    "judge_attempts": pl.Int32(),
    "judge_cached": pl.Boolean(),
    "judge_prompt_tokens": pl.Int64(),
    "judge_completion_tokens": pl.Int64(),
    "score_original": pl.Float64(),
    "score_completion": pl.Float64(),
}

LLM_COMPLETION_SCHEMA: dict[str, pl.DataType] = {
    **COMPLETION_SCHEMA,
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
    "judge_model": pl.String(),
    "judge_original_score": pl.Float64(),
    "judge_completion_score": pl.Float64(),
    "judge_verdict": pl.String(),
}


def neutralise(text: pl.Expr) -> pl.Expr:
    """Break up judge markers inside a text (the Polars twin of `neutralise_text`)."""
    for marker, replacement in MARKER_REPLACEMENT.items():
        text = text.str.replace_all(marker, replacement, literal=True)
    return text


def neutralise_text(text: str) -> str:
    for marker, replacement in MARKER_REPLACEMENT.items():
        text = text.replace(marker, replacement)
    return text


def regeneration_requests(
    samples: pl.DataFrame,
    templates: Templates,
    *,
    model: str,
    temperature: float,
    max_tokens: int,
) -> pl.DataFrame:
    """The chat request that regenerates each sample's answer, as a JSON string.

    Needs sample_id, language, prompt. The user message is the sample's prompt unchanged (its
    documents, per-label instruction and question): what the fine-tuned model will later see. The
    JSON is both what is sent and what the cache key hashes, so equal requests share one entry.
    """
    systems = templates.llm_per_language().select("language", "regenerate_system")
    messages = pl.concat_list(
        [
            pl.struct(role=pl.lit("system"), content=pl.col("regenerate_system")),
            pl.struct(role=pl.lit("user"), content=pl.col("prompt")),
        ]
    )
    request = pl.struct(
        model=pl.lit(model),
        messages=messages,
        temperature=pl.lit(float(temperature)),
        max_tokens=pl.lit(int(max_tokens)),
    ).struct.json_encode()
    return samples.join(systems, on="language", how="left", maintain_order="left").select(
        "sample_id", request.alias("request")
    )


def judge_frames(samples: pl.DataFrame, templates: Templates) -> pl.DataFrame:
    """Everything of each sample's judge message except the regenerated answer.

    Needs sample_id, language, question, context_docs, original_answer. Returns sample_id,
    judge_system, judge_head and judge_tail: the user message is head + answer B + tail, so the
    answer (known only once the regeneration call returns) is the one piece added per call.
    Answer A is the original, B the regenerated one; every quoted text is neutralised.
    """
    texts = templates.llm_per_language()
    documents = (
        samples.select("sample_id", "context_docs")
        .explode("context_docs")
        .drop_nulls("context_docs")
        .with_columns(n=(pl.int_range(pl.len()).over("sample_id") + 1).cast(pl.String))
        .group_by("sample_id", maintain_order=True)
        .agg(
            pl.concat_str(
                pl.lit("<<<BEGIN DOCUMENT "),
                pl.col("n"),
                pl.lit(">>>\n"),
                neutralise(pl.col("context_docs").struct.field("content")),
                pl.lit("\n<<<END DOCUMENT "),
                pl.col("n"),
                pl.lit(">>>"),
            )
            .str.join("\n\n")
            .alias("documents")
        )
    )
    head = pl.concat_str(
        [
            pl.col("judge_intro"),
            pl.lit("\n\n<<<BEGIN QUESTION>>>\n"),
            neutralise(pl.col("question")),
            pl.lit("\n<<<END QUESTION>>>\n\n"),
            (pl.col("documents") + "\n\n").fill_null(""),
            pl.lit("<<<BEGIN ANSWER A>>>\n"),
            neutralise(pl.col("original_answer")),
            pl.lit("\n<<<END ANSWER A>>>\n\n<<<BEGIN ANSWER B>>>\n"),
        ]
    )
    tail = pl.concat_str([pl.lit("\n<<<END ANSWER B>>>\n\n"), pl.col("judge_reminder")])
    return (
        samples.select("sample_id", "language", "question", "original_answer")
        .join(documents, on="sample_id", how="left", maintain_order="left")
        .join(texts, on="language", how="left", maintain_order="left")
        .select(
            "sample_id",
            "judge_system",
            head.alias("judge_head"),
            tail.alias("judge_tail"),
        )
    )


def judge_request(
    model: str, judge_system: str, judge_head: str, judge_tail: str, candidate: str
) -> dict[str, object]:
    """The judge call for one regenerated answer (built per call: the answer is new)."""
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": judge_system},
            {"role": "user", "content": judge_head + neutralise_text(candidate) + judge_tail},
        ],
        **JUDGE_PARAMETERS,
    }


def outcome_frame(records: list[dict[str, object]]) -> pl.DataFrame:
    """Per-sample call outcomes (dicts with OUTCOME_SCHEMA keys) as a frame."""
    return pl.DataFrame(records, schema=OUTCOME_SCHEMA, orient="row")


def llm_completion_rows(
    outcomes: pl.DataFrame,
    *,
    model: str,
    judge_model: str | None,
    judge_margin: float,
) -> pl.DataFrame:
    """completions rows (LLM_COMPLETION_SCHEMA) for a batch of outcomes.

    failed: the regeneration failed (error = its class), or the judge did ('judge:' + class);
    rejected_by_judge: judged, and the new answer does not beat the original by `judge_margin`;
    ok otherwise. `attempts` and tokens are what this run spent (the upsert adds them up).
    """
    judged = judge_model is not None
    regen_failed = pl.col("error").is_not_null()
    judge_failed = pl.lit(judged) & pl.col("judge_error").is_not_null()
    # No verdict counts as not beating the original: only a proven improvement is kept.
    beats = ((pl.col("score_completion") - pl.col("score_original")) >= judge_margin).fill_null(
        False
    )
    status = (
        pl.when(regen_failed | judge_failed)
        .then(pl.lit(FAILED))
        .when(pl.lit(judged) & ~beats)
        .then(pl.lit(REJECTED_BY_JUDGE))
        .otherwise(pl.lit(OK))
    )
    error = pl.coalesce(pl.col("error"), pl.lit("judge:") + pl.col("judge_error"))
    return outcomes.select(
        "sample_id",
        pl.when(regen_failed)
        .then(pl.lit(None, dtype=pl.String))
        .otherwise(pl.col("content").str.strip_chars())
        .alias("completion"),
        pl.lit(LLM).alias("mode"),
        status.alias("status"),
        pl.lit(model).alias("model"),
        error.alias("error"),
        (pl.col("attempts") + pl.col("judge_attempts").fill_null(0))
        .cast(pl.Int32)
        .alias("attempts"),
        (pl.col("prompt_tokens") + pl.col("judge_prompt_tokens").fill_null(0)).alias(
            "prompt_tokens"
        ),
        (pl.col("completion_tokens") + pl.col("judge_completion_tokens").fill_null(0)).alias(
            "completion_tokens"
        ),
        pl.lit(judge_model, dtype=pl.String).alias("judge_model"),
        pl.col("score_original").alias("judge_original_score"),
        pl.col("score_completion").alias("judge_completion_score"),
        pl.col("judge_content").alias("judge_verdict"),
    )


def mark_proposed(rows: pl.DataFrame, review_ids: pl.Series) -> pl.DataFrame:
    """LLM completion rows of samples routed to review become `proposed`, whatever the judge
    said (its verdict stays on the row for the reviewer): only a person makes them `ok`.
    Failed rows stay failed, so the next run retries them (and proposes again)."""
    return rows.with_columns(
        status=pl.when(
            pl.col("sample_id").is_in(review_ids.implode()) & (pl.col("status") != FAILED)
        )
        .then(pl.lit(PROPOSED))
        .otherwise(pl.col("status"))
    )


def cache_rows(outcomes: pl.DataFrame, *, model: str, judge_model: str | None) -> pl.DataFrame:
    """llm_cache rows for the usable answers this batch paid for (cache hits are already there).

    Failures are not cached: a later run must retry them, not replay them.
    """
    regenerated = outcomes.filter(~pl.col("cached") & pl.col("error").is_null()).select(
        pl.col("regen_key").alias("cache_key"),
        pl.lit(REGENERATE).alias("purpose"),
        pl.lit(None, dtype=pl.String).alias("parent_key"),
        pl.lit(model).alias("model"),
        pl.col("content"),
        pl.col("finish_reason"),
        "prompt_tokens",
        "completion_tokens",
    )
    judged = outcomes.filter(
        pl.col("judge_key").is_not_null()
        & ~pl.col("judge_cached").fill_null(True)
        & pl.col("judge_error").is_null()
    ).select(
        pl.col("judge_key").alias("cache_key"),
        pl.lit(JUDGE).alias("purpose"),
        pl.col("regen_key").alias("parent_key"),
        pl.lit(judge_model, dtype=pl.String).alias("model"),
        pl.col("judge_content").alias("content"),
        pl.lit("stop").alias("finish_reason"),
        pl.col("judge_prompt_tokens").alias("prompt_tokens"),
        pl.col("judge_completion_tokens").alias("completion_tokens"),
    )
    return pl.concat([regenerated, judged]).unique("cache_key", keep="first", maintain_order=True)


def llm_totals(
    outcomes: pl.DataFrame,
    rows: pl.DataFrame,
    *,
    price_input_per_1m: float,
    price_output_per_1m: float,
) -> dict[str, float | int]:
    """Run totals for metadata: outcomes by status and error, calls, cache hits, tokens, cost.

    Tokens and cost count what was billed in this run: every answered call, failed ones included
    (a truncated answer is still paid for), and nothing for cache hits.
    """
    prompt_tokens = int(rows["prompt_tokens"].sum())
    completion_tokens = int(rows["completion_tokens"].sum())
    fresh = outcomes.filter(~pl.col("cached"))
    judged = outcomes.filter(pl.col("judge_cached").is_not_null())
    latency_ms = fresh["latency_s"].drop_nulls() * 1000
    totals: dict[str, float | int] = {
        "samples": outcomes.height,
        "retried_failed": int(outcomes["retry"].sum()),
        "calls": fresh.height,
        "cache_hits": outcomes.height - fresh.height,
        "judge_calls": int((~judged["judge_cached"]).sum()),
        "judge_cache_hits": int(judged["judge_cached"].sum()),
        "http_requests": int(rows["attempts"].sum()),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "estimated_cost": estimated_cost(
            prompt_tokens, completion_tokens, price_input_per_1m, price_output_per_1m
        ),
        "latency_p50_ms": round(float(latency_ms.quantile(0.5) or 0.0), 1),
        "latency_p99_ms": round(float(latency_ms.quantile(0.99) or 0.0), 1),
    }
    for status in (OK, FAILED, REJECTED_BY_JUDGE, PROPOSED):
        totals[status] = int((rows["status"] == status).sum())
    errors = rows.filter(pl.col("status") == FAILED).group_by("error").len().sort("error")
    for error, count in errors.iter_rows():
        totals[f"error/{error}"] = int(count)
    return totals
