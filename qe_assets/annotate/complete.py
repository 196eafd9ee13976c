"""Stage 3, completions: one completion per new `train` sample.

Naive mode (the offline default) writes a label prefix + the original answer. LLM mode (with
QE_LLM_MODEL and OPENAI_API_KEY set) regenerates the answer through any OpenAI-compatible
endpoint, see `qe_assets.annotate.llm`; it also retries the samples whose calls failed on earlier
runs.
In LLM mode the samples routed to review get a completion too, stored as `proposed`: the
reviewer sees it, and only a person's accept makes it `ok` (exportable).
"""

import time
from dataclasses import dataclass
from typing import Any

import dagster as dg
import duckdb
import polars as pl
from dagster_duckdb import DuckDBResource

from qe_assets.annotate.labels import REVIEW, TRAIN
from qe_assets.annotate.llm import LLMConfig, LLMFatalError, Page, complete_with_llm
from qe_assets.lib.completions import (
    FAILED,
    LLM,
    LLM_COMPLETION_SCHEMA,
    NAIVE,
    OK,
    judge_frames,
    llm_completion_rows,
    llm_totals,
    mark_proposed,
    naive_completions,
    regeneration_requests,
)
from qe_assets.lib.completions import cache_rows as llm_cache_rows
from qe_assets.lib.links import dashboard_url
from qe_assets.lib.pii import redacted_labels
from qe_assets.lib.resources import (
    OpenAIResource,
    PipelineSettings,
    duckdb_writer,
    exclusive_stage,
)
from qe_assets.lib.stages import PIPELINE_GROUP
from qe_assets.lib.templates import load_templates
from qe_assets.review.calibration import (
    JUDGE_CHECK,
    JudgeGate,
    agreement_metadata,
    calibrate,
    gate_state,
    merged_labels,
)
from qe_assets.settings import Settings
from qe_assets.store import select_frame, set_watermark, transaction, watermark

STAGE = "completions"
_COLUMNS = "sample_id, completion, mode, status, model, error, attempts"
_LLM_COLUMNS = ", ".join(LLM_COMPLETION_SCHEMA)
_CACHE_COLUMNS = (
    "cache_key, purpose, parent_key, model, content, finish_reason, prompt_tokens, "
    "completion_tokens"
)
# What a retried or first LLM result replaces: only a failed LLM row, never a human's or an ok one.
_LLM_UPSERT = f"""
    INSERT INTO completions ({_LLM_COLUMNS}, created_at, updated_at, seq)
    SELECT {_LLM_COLUMNS}, now()::TIMESTAMP, now()::TIMESTAMP, nextval('completions_seq')
    FROM llm_rows
    ON CONFLICT (sample_id) DO UPDATE SET
        completion = excluded.completion, mode = excluded.mode, status = excluded.status,
        model = excluded.model, error = excluded.error,
        attempts = completions.attempts + excluded.attempts,
        prompt_tokens = completions.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = completions.completion_tokens + excluded.completion_tokens,
        judge_model = excluded.judge_model,
        judge_original_score = excluded.judge_original_score,
        judge_completion_score = excluded.judge_completion_score,
        judge_verdict = excluded.judge_verdict,
        updated_at = excluded.updated_at, seq = excluded.seq
    WHERE completions.status = '{FAILED}' AND completions.mode = '{LLM}'
"""
_SAMPLE_COLUMNS = "s.sample_id, s.seq, s.language, s.prompt, s.question, s.original_answer"
# While the judge is not trusted (qe_assets.review.calibration), its approvals of the batch wait
# for a
# person. The seq span lets the zone maps of annotated_samples skip the rest of history.
_HOLD_FOR_REVIEW = f"""
    INSERT INTO review_queue (sample_id, reason, status, queued_at)
    SELECT r.sample_id, '{JUDGE_CHECK}', 'pending', now()::TIMESTAMP
    FROM llm_rows r JOIN annotated_samples s USING (sample_id)
    WHERE r.status = '{OK}' AND r.judge_model IS NOT NULL
      AND s.seq BETWEEN $low AND $high
      AND ($all OR list_contains($labels, s.label))
    ON CONFLICT DO NOTHING
"""


# A naive completion reads only a sample's answer and writes it behind a prefix: a row is about a
# hundredth of an ingested event, so its transactions can hold ten times as many rows for the
# same memory, and the stage opens (and checkpoints) the store a tenth as often.
NAIVE_BATCH_FACTOR = 10


def naive_batch_rows(settings: Settings) -> int:
    """Annotated samples scanned per naive completion transaction."""
    return settings.ingest_batch_size * NAIVE_BATCH_FACTOR


def complete_next_batch(conn: duckdb.DuckDBPyConnection, batch_size: int) -> tuple[int, int]:
    """Naive mode: complete the train samples of the next range of annotated samples past the
    watermark. Returns (samples scanned, completions written); (0, 0) when there is nothing new.
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
    samples = select_frame(
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


def _jobs(conn: duckdb.DuckDBPyConnection, samples: pl.DataFrame, config: LLMConfig) -> Page:
    """Requests, cache hits and judge framing for a page of samples (sample columns + retry)."""
    templates = load_templates()
    conn.register(
        "page_requests",
        regeneration_requests(
            samples,
            templates,
            model=config.model,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
        ),
    )
    # sha256 in DuckDB over the exact request JSON: columnar, and stable across versions.
    keyed = select_frame(
        conn,
        """
        SELECT r.sample_id, r.request, sha256(r.request) AS regen_key,
               c.content AS cached_content, c.finish_reason AS cached_finish_reason
        FROM page_requests r LEFT JOIN llm_cache c ON c.cache_key = sha256(r.request)
        """,
    )
    jobs = samples.select("sample_id", "seq", "retry").join(
        keyed, on="sample_id", how="left", maintain_order="left"
    )
    judge_cache: dict[str, str] = {}
    if config.judge_model is not None:
        jobs = jobs.join(
            judge_frames(samples, templates), on="sample_id", how="left", maintain_order="left"
        )
        conn.register("page_keys", jobs.select("regen_key"))
        cached = select_frame(
            conn,
            "SELECT cache_key, content FROM llm_cache "
            "WHERE purpose = 'judge' AND parent_key IN (SELECT regen_key FROM page_keys)",
        )
        judge_cache = dict(zip(cached["cache_key"], cached["content"], strict=True))
    return Page(jobs=jobs, judge_cache=judge_cache)


@dataclass
class LLMPager:
    """Hands out the LLM work a page at a time: first the LLM rows that failed before this run
    started, then the train samples past the watermark that have no completion yet (and the
    review samples, for a proposal, when `config.propose_review`)."""

    duckdb: DuckDBResource
    config: LLMConfig
    retry_cursor: int = 0  # completions.seq of the last failed row handed out
    retry_until: int | None = None  # completions.seq at the start: later failures wait a run
    sample_cursor: int | None = None  # annotated_samples.seq of the last sample handed out

    def next_page(self) -> Page | None:
        with duckdb_writer(self.duckdb) as conn:
            if self.retry_until is None:
                ((self.retry_until,),) = conn.execute(
                    "SELECT coalesce(max(seq), 0) FROM completions"
                ).fetchall()
                self.sample_cursor = watermark(conn, STAGE)
            page = self._retries(conn)
            if page is None:
                page = self._new_samples(conn)
        return page

    def _retries(self, conn: duckdb.DuckDBPyConnection) -> Page | None:
        samples = select_frame(
            conn,
            f"""
            SELECT {_SAMPLE_COLUMNS}, s.context_docs, true AS retry, c.seq AS completion_seq
            FROM completions c JOIN annotated_samples s USING (sample_id)
            WHERE c.status = '{FAILED}' AND c.mode = '{LLM}'
              AND c.seq > $low AND c.seq <= $high
            ORDER BY c.seq LIMIT $limit
            """,
            {"low": self.retry_cursor, "high": self.retry_until, "limit": self.config.batch_size},
        )
        if samples.is_empty():
            return None
        self.retry_cursor = int(samples["completion_seq"].max())  # type: ignore[arg-type]
        return _jobs(conn, samples.drop("completion_seq"), self.config)

    def _new_samples(self, conn: duckdb.DuckDBPyConnection) -> Page | None:
        ((high,),) = conn.execute("SELECT coalesce(max(seq), 0) FROM annotated_samples").fetchall()
        samples = select_frame(
            conn,
            f"""
            SELECT {_SAMPLE_COLUMNS}, s.context_docs, false AS retry
            FROM annotated_samples s
            WHERE s.seq > $low AND s.seq <= $high AND s.route IN $routes
              AND s.duplicate_of IS NULL
              AND NOT EXISTS (SELECT 1 FROM completions c WHERE c.sample_id = s.sample_id)
            ORDER BY s.seq LIMIT $limit
            """,
            {
                "low": self.sample_cursor,
                "high": high,
                "limit": self.config.batch_size,
                "routes": [TRAIN, REVIEW] if self.config.propose_review else [TRAIN],
            },
        )
        if samples.is_empty():
            if self.sample_cursor is not None and high > self.sample_cursor:
                # Only review samples or duplicates left: let the watermark pass them.
                self.sample_cursor = int(high)
                return Page(jobs=pl.DataFrame(), scanned_to=int(high))
            return None
        full = samples.height == self.config.batch_size
        self.sample_cursor = int(samples["seq"].max()) if full else int(high)  # type: ignore[arg-type]
        page = _jobs(conn, samples, self.config)
        page.scanned_to = self.sample_cursor
        return page


def commit_llm_batch(
    duckdb_resource: DuckDBResource,
    config: LLMConfig,
    outcomes: pl.DataFrame,
    new_watermark: int | None,
    gate: JudgeGate | None = None,
) -> tuple[pl.DataFrame, int]:
    """Write a batch of outcomes, their cache entries and the watermark in one transaction;
    returns the completions rows written (review samples' ones as `proposed`) and, with an
    untrusted judge (`gate`), how many of its approvals were queued for review in the same
    transaction."""
    rows = llm_completion_rows(
        outcomes,
        model=config.model,
        judge_model=config.judge_model,
        judge_margin=config.judge_margin,
    )
    cache = llm_cache_rows(outcomes, model=config.model, judge_model=config.judge_model)
    with duckdb_writer(duckdb_resource) as conn:
        conn.register("batch_ids", rows.select("sample_id"))
        # Decided per row at commit, from the stored route: a failed proposal retried later is
        # proposed again, never turned into an exportable `ok` completion.
        review_ids = select_frame(
            conn,
            f"SELECT sample_id FROM annotated_samples SEMI JOIN batch_ids USING (sample_id) "
            f"WHERE route = '{REVIEW}'",
        )["sample_id"]
        rows = mark_proposed(rows, review_ids)
        conn.register("llm_rows", rows)
        conn.register("llm_cache_rows", cache)
        with transaction(conn):
            conn.execute(
                f"INSERT INTO llm_cache ({_CACHE_COLUMNS}, created_at) "
                f"SELECT {_CACHE_COLUMNS}, now()::TIMESTAMP FROM llm_cache_rows "
                "ON CONFLICT DO NOTHING"
            )
            conn.execute(_LLM_UPSERT)
            held = 0
            if gate is not None and not gate.trusted and not outcomes.is_empty():
                ((held,),) = conn.execute(
                    _HOLD_FOR_REVIEW,
                    {
                        "low": outcomes["seq"].min(),
                        "high": outcomes["seq"].max(),
                        "all": gate.route_all,
                        "labels": sorted(gate.labels),
                    },
                ).fetchall()
            if new_watermark is not None and new_watermark > watermark(conn, STAGE):
                set_watermark(conn, STAGE, new_watermark)
    return rows, int(held)


TOTALS_COLUMNS = ("status", "error", "attempts", "prompt_tokens", "completion_tokens")
_TOTALS_SCHEMA = {name: LLM_COMPLETION_SCHEMA[name] for name in TOTALS_COLUMNS}


def run_llm_completions(
    context: dg.AssetExecutionContext,
    duckdb_resource: DuckDBResource,
    config: LLMConfig,
    openai_resource: OpenAIResource,
    gate: JudgeGate | None = None,
) -> "dict[str, dg.RawMetadataValue]":
    pager = LLMPager(duckdb_resource, config)
    held_total = 0
    # What each commit wrote, narrowed to what the run's totals count (no texts kept).
    committed: list[pl.DataFrame] = []

    def commit(outcomes: pl.DataFrame, new_watermark: int | None) -> None:
        nonlocal held_total
        rows, held = commit_llm_batch(duckdb_resource, config, outcomes, new_watermark, gate)
        held_total += held
        committed.append(rows.select(TOTALS_COLUMNS))
        statuses = dict(rows.group_by("status").len().iter_rows())
        hits = int(outcomes["cached"].sum())
        context.log.info(
            f"committed {rows.height} LLM completions {statuses} ({hits} from cache, {held} "
            f"judge approvals held for review); watermark {new_watermark}"
        )

    started = time.monotonic()
    try:
        outcomes = complete_with_llm(openai_resource.async_client, config, pager.next_page, commit)
    except LLMFatalError as exc:
        raise dg.Failure(
            f"the LLM endpoint refused the configuration ({exc}): check OPENAI_API_KEY, "
            f"OPENAI_BASE_URL and QE_LLM_MODEL. Finished samples were committed."
        ) from None
    elapsed = time.monotonic() - started
    rows = pl.concat(committed) if committed else pl.DataFrame(schema=_TOTALS_SCHEMA)
    totals = llm_totals(
        outcomes,
        rows,
        price_input_per_1m=config.price_input_per_1m,
        price_output_per_1m=config.price_output_per_1m,
    )
    totals["elapsed_s"] = round(elapsed, 3)
    totals["calls_per_s"] = round(totals["calls"] / elapsed, 1) if elapsed else 0.0
    context.log.info(f"LLM run totals: {totals}")
    metadata: dict[str, dg.RawMetadataValue] = {
        "new_completions": int(totals["ok"]),
        "proposed_for_review": int(totals["proposed"]),
        "samples_scanned": int(totals["samples"]),
        "model": config.model,
        "judge_model": config.judge_model or "off",
        "judge/held_for_review": held_total,
    }
    metadata.update({f"llm/{name}": value for name, value in totals.items()})
    return metadata


@dg.asset(
    deps=["annotated_samples"],
    group_name=PIPELINE_GROUP,
    kinds={"duckdb", "polars", "openai"},
    description=(
        "A completion for every new `train` sample. Naive mode (the offline default): a "
        "label-specific prefix in the sample's language followed by the original answer. LLM "
        "mode (QE_LLM_MODEL + OPENAI_API_KEY): the answer regenerated from the sample's prompt, "
        "cached, committed in batches, optionally kept only when a judge scores it better than "
        "the original; failed calls are stored as `failed` and retried on the next run. While "
        "the judge agrees with the reviewers less than QE_JUDGE_MIN_AGREEMENT, its approvals "
        "wait in the review queue (reason `judge_check`). Review samples wait for a human; in "
        "LLM mode they get a `proposed` completion the reviewer sees, exported only once a "
        "person accepts it. Duplicates are skipped."
    ),
)
def completions(
    context: dg.AssetExecutionContext,
    duckdb: DuckDBResource,
    settings: PipelineSettings,
    openai: OpenAIResource,
) -> dg.MaterializeResult:
    with exclusive_stage(context, settings):
        with duckdb_writer(duckdb) as conn:
            _, gate = calibrate(conn, settings)  # what this run's judge approvals obey
        metadata = _complete_new_samples(context, duckdb, settings, openai, gate)
    with duckdb_writer(duckdb) as conn:
        rows = conn.execute(
            "SELECT mode, status, count(*) FROM completions GROUP BY ALL"
        ).fetchall()
        calibration, gate = calibrate(conn, settings)
    total = sum(count for _, _, count in rows)
    metadata["total_completions"] = total
    metadata["dagster/row_count"] = total
    for mode, status, count in rows:
        metadata[f"total/{mode}/{status}"] = count
    # Labels are free text: what holds PII must not reach Dagster's run storage.
    rename = redacted_labels(calibration.per_label) if settings.pii_redaction else {}
    labels = merged_labels(calibration, rename).items()
    metadata.update(agreement_metadata(calibration, gate, labels))
    metadata["dashboards"] = dg.MetadataValue.url(dashboard_url(settings, "completions"))
    return dg.MaterializeResult(metadata=metadata)


@dg.asset_check(
    asset=completions,
    description=(
        "Warns when the judge agrees with the reviewers' accept/reject on less than "
        "QE_JUDGE_MIN_AGREEMENT of the last QE_JUDGE_AGREEMENT_WINDOW decisions, overall or for "
        "a label (once there are QE_JUDGE_MIN_DECISIONS of them); while it fails, the judge's "
        "approvals go to review instead of straight into versions (docs/judge-calibration.md)."
    ),
)
def judge_agreement(duckdb: DuckDBResource, settings: PipelineSettings) -> dg.AssetCheckResult:
    with duckdb_writer(duckdb) as conn:
        calibration, gate = calibrate(conn, settings)
    return dg.AssetCheckResult(
        passed=gate.trusted,
        severity=dg.AssetCheckSeverity.WARN,
        description="; ".join(gate.problems) if gate.problems else None,
        metadata={
            "decisions": calibration.overall.decisions,
            "agreement": round(calibration.overall.rate or 0.0, 4),
            "min_agreement": settings.judge_min_agreement,
            "min_decisions": settings.judge_min_decisions,
            "gate": gate_state(gate),
        },
    )


def _complete_new_samples(
    context: dg.AssetExecutionContext,
    duckdb: DuckDBResource,
    settings: PipelineSettings,
    openai: OpenAIResource,
    gate: JudgeGate,
) -> dict[str, Any]:
    metadata: dict[str, Any]
    if settings.llm_model and openai.configured:
        config = LLMConfig.from_settings(settings)
        context.log.info(
            f"completions mode: llm (model {config.model}, concurrency {config.concurrency}, "
            f"batch {config.batch_size}, judge {config.judge_model or 'off'})"
        )
        metadata = {"mode": LLM, **run_llm_completions(context, duckdb, config, openai, gate)}
    else:
        missing = "QE_LLM_MODEL" if not settings.llm_model else "OPENAI_API_KEY"
        log = context.log.warning if settings.llm_model else context.log.info
        log(f"completions mode: naive ({missing} is not set)")
        scanned_total = written_total = 0
        while True:
            with duckdb_writer(duckdb) as conn:
                scanned, written = complete_next_batch(conn, naive_batch_rows(settings))
            if not scanned:
                break
            scanned_total += scanned
            written_total += written
            context.log.info(f"completed {written} of {scanned} new samples")
        metadata = {
            "mode": NAIVE,
            "new_completions": written_total,
            "samples_scanned": scanned_total,
        }
    return metadata
