"""From item results to the evaluation's row, item rows, cost and the UI's markdown. Pure."""

from __future__ import annotations

import hashlib
from typing import Any

import polars as pl

from qe_assets.evaluation.engine import ItemResult
from qe_assets.evaluation.metrics import (
    LOSS,
    WIN,
    Decision,
    Tally,
    decide,
    per_label,
    tally,
)
from qe_assets.settings import estimated_cost

ITEM_COLUMNS = (
    "sample_id",
    "label",
    "candidate_answer",
    "baseline_answer",
    "candidate_first",
    "verdict",
    "winner",
    "reason",
    "error",
)
CACHE_COLUMNS = (
    "cache_key",
    "purpose",
    "model",
    "content",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
)


def evaluation_id(candidate: str, baseline: str, judge_model: str, sample_ids: list[str]) -> str:
    """The same comparison on the same items has the same id: a re-run replaces its row."""
    text = "\n".join([candidate, baseline, judge_model, *sorted(sample_ids)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def item_frame(results: list[ItemResult]) -> pl.DataFrame:
    schema = {
        "sample_id": pl.String,
        "label": pl.String,
        "candidate_answer": pl.String,
        "baseline_answer": pl.String,
        "candidate_first": pl.Boolean,
        "verdict": pl.String,
        "winner": pl.String,
        "reason": pl.String,
        "error": pl.String,
    }
    rows = [{c: getattr(r, c) for c in ITEM_COLUMNS} for r in results]
    return pl.DataFrame(rows, schema=schema, orient="row")


def cache_frame(results: list[ItemResult]) -> pl.DataFrame:
    schema = {
        "cache_key": pl.String,
        "purpose": pl.String,
        "model": pl.String,
        "content": pl.String,
        "finish_reason": pl.String,
        "prompt_tokens": pl.Int64,
        "completion_tokens": pl.Int64,
    }
    rows = [row for r in results for row in r.cache_rows]
    return pl.DataFrame(rows, schema=schema, orient="row").unique("cache_key", keep="first")


def summarize(
    items: pl.DataFrame, *, min_items: int, margin: float, max_failed_share: float
) -> tuple[Tally, dict[str, Tally], Decision]:
    overall = tally(items["verdict"])
    labels = per_label(items)
    decision = decide(
        overall, labels, min_items=min_items, margin=margin, max_failed_share=max_failed_share
    )
    return overall, labels, decision


def spend(
    results: list[ItemResult], price_input_per_1m: float, price_output_per_1m: float
) -> dict[str, Any]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {
        "calls": sum(r.calls for r in results),
        "judge_calls": sum(r.judge_calls for r in results),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "estimated_cost": estimated_cost(
            prompt, completion, price_input_per_1m, price_output_per_1m
        ),
    }


def error_counts(items: pl.DataFrame) -> dict[str, int]:
    """Items per error: the failed ones and the ones the candidate lost by failing to answer."""
    failed = items.filter(pl.col("error").is_not_null())
    return {str(e): int(n) for e, n in failed.group_by("error").len().sort("error").iter_rows()}


def _clip(text: str | None, limit: int = 300) -> str:
    flat = (text or "").replace("\n", " ").replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def examples_markdown(items: pl.DataFrame, prompts: dict[str, str], per_kind: int = 3) -> str:
    """A few won and lost pairs, for the UI: the question, both answers, the judge's reason."""
    parts = []
    for verdict, title in ((WIN, "Won"), (LOSS, "Lost")):
        chosen = items.filter(pl.col("verdict") == verdict).sort("sample_id").head(per_kind)
        parts.append(f"### {title} ({items.filter(pl.col('verdict') == verdict).height})")
        for row in chosen.iter_rows(named=True):
            parts.append(
                f"**{row['sample_id']}** ({row['label']}): {_clip(prompts.get(row['sample_id']))}"
                f"\n\n- candidate: {_clip(row['candidate_answer'])}"
                f"\n- production: {_clip(row['baseline_answer'])}"
                f"\n- judge: {_clip(row['reason'])}\n"
            )
    return "\n\n".join(parts)


def per_label_json(labels: dict[str, Tally]) -> dict[str, dict[str, float | int]]:
    return {label: t.as_dict() for label, t in labels.items()}
