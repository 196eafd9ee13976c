"""The DuckDB schema: every table's DDL, applied once per schema digest, and the stages'
watermarks."""

from __future__ import annotations

import hashlib

import duckdb

SCHEMA_VERSION = 1


SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS raw_events_seq;
CREATE TABLE IF NOT EXISTS raw_events (
    request_id   VARCHAR PRIMARY KEY,
    question     VARCHAR NOT NULL,
    docs         STRUCT(id VARCHAR, content VARCHAR, score DOUBLE, meta VARCHAR)[] NOT NULL,
    answer       VARCHAR NOT NULL,
    evaluation   JSON NOT NULL,
    score        DOUBLE NOT NULL,
    labels       VARCHAR[] NOT NULL,
    checks       JSON,
    timestamp    TIMESTAMP NOT NULL,
    extra        JSON,
    fingerprint  VARCHAR NOT NULL,
    source       VARCHAR NOT NULL,
    ingested_at  TIMESTAMP NOT NULL,
    -- Monotonic ingest order: downstream stages pick up new events by watermark, not by
    -- anti-joining the whole history.
    seq          BIGINT NOT NULL DEFAULT nextval('raw_events_seq')
);
CREATE TABLE IF NOT EXISTS rejected_events (
    rejected_id  VARCHAR PRIMARY KEY,  -- sha256(source, payload): a replay after a crash is a no-op
    source       VARCHAR NOT NULL,
    payload      VARCHAR NOT NULL,
    field        VARCHAR NOT NULL,
    reason       VARCHAR NOT NULL,
    request_id   VARCHAR,
    rejected_at  TIMESTAMP NOT NULL
);
CREATE SEQUENCE IF NOT EXISTS annotated_samples_seq;
CREATE TABLE IF NOT EXISTS annotated_samples (
    sample_id        VARCHAR PRIMARY KEY,  -- request_id '#' primary label, % and # escaped
    request_id       VARCHAR NOT NULL,
    event_seq        BIGINT NOT NULL,      -- raw_events.seq it came from
    label            VARCHAR NOT NULL,
    labels           VARCHAR[] NOT NULL,   -- every label, normalised
    language         VARCHAR NOT NULL,     -- zh | en: the language of instruction and prefix
    question         VARCHAR NOT NULL,
    original_answer  VARCHAR NOT NULL,
    context_docs     STRUCT(id VARCHAR, content VARCHAR, score DOUBLE, meta VARCHAR)[] NOT NULL,
    instruction      VARCHAR NOT NULL,
    prompt           VARCHAR NOT NULL,
    score            DOUBLE NOT NULL,
    confidence       DOUBLE NOT NULL,
    route            VARCHAR NOT NULL,     -- train | review
    route_reason     VARCHAR,
    question_key     VARCHAR NOT NULL,     -- md5 of the normalised question: drives the split
    dedup_key        VARCHAR NOT NULL,     -- md5 of normalised question + context + answer
    duplicate_of     VARCHAR,              -- the sample kept for the same dedup_key
    annotated_at     TIMESTAMP NOT NULL,
    seq              BIGINT NOT NULL DEFAULT nextval('annotated_samples_seq')
);
CREATE SEQUENCE IF NOT EXISTS completions_seq;
CREATE TABLE IF NOT EXISTS completions (
    sample_id   VARCHAR PRIMARY KEY,
    completion  VARCHAR,
    mode        VARCHAR NOT NULL,          -- naive | llm | human
    status      VARCHAR NOT NULL,          -- ok | failed | rejected_by_judge | rejected
    model       VARCHAR,
    error       VARCHAR,                   -- failed: error class ('judge:' prefix: the judge's)
    -- llm: HTTP requests sent for this sample, retries included, summed over runs (0 = cache hit).
    attempts    INTEGER NOT NULL,
    created_at  TIMESTAMP NOT NULL,
    updated_at  TIMESTAMP NOT NULL,
    -- Renewed on every write: the dataset stage finds ready samples by watermark.
    seq         BIGINT NOT NULL,
    -- Tokens billed for this sample (regeneration + judge, failed calls included), summed over
    -- runs; a cache hit adds nothing.
    prompt_tokens      BIGINT NOT NULL DEFAULT 0,
    completion_tokens  BIGINT NOT NULL DEFAULT 0,
    judge_model        VARCHAR,
    judge_original_score    DOUBLE,       -- 1..10, the judge's score of the original answer
    judge_completion_score  DOUBLE,       -- 1..10, of this completion
    judge_verdict      VARCHAR            -- the judge's JSON verdict as returned
);
CREATE TABLE IF NOT EXISTS dataset_versions (
    version             VARCHAR PRIMARY KEY,  -- v001, v002, ...
    number              INTEGER NOT NULL UNIQUE,
    jsonl_path          VARCHAR NOT NULL,
    chat_path           VARCHAR NOT NULL,
    manifest_path       VARCHAR NOT NULL,
    sample_count        INTEGER NOT NULL,
    train_count         INTEGER NOT NULL,
    validation_count    INTEGER NOT NULL,
    sha256              VARCHAR NOT NULL,     -- of the JSONL file
    chat_sha256         VARCHAR NOT NULL,
    manifest_sha256     VARCHAR NOT NULL,
    label_counts        JSON NOT NULL,
    settings            JSON NOT NULL,
    max_completion_seq  BIGINT NOT NULL,      -- watermark: completions up to here are exported
    created_at          TIMESTAMP NOT NULL
);
-- Version numbers handed to cuts, committed before a cut writes anything: a number is never given
-- twice, so a version's name never stands for other bytes, even after a cut that failed or died
-- once its files had their names (that number stays unused: a gap in dataset_versions).
CREATE TABLE IF NOT EXISTS dataset_version_claims (
    number      INTEGER PRIMARY KEY,
    version     VARCHAR NOT NULL,
    claimed_at  TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS dataset_samples (
    version    VARCHAR NOT NULL,
    sample_id  VARCHAR NOT NULL,
    split      VARCHAR NOT NULL,              -- train | validation
    PRIMARY KEY (version, sample_id)
);
CREATE TABLE IF NOT EXISTS fine_tune_runs (
    run_id            VARCHAR PRIMARY KEY,    -- <version>-<backend>-<attempt>
    dataset_version   VARCHAR NOT NULL,
    backend           VARCHAR NOT NULL,       -- none | openai | command
    status            VARCHAR NOT NULL, -- running|succeeded|failed|cancelled|skipped|rejected
    base_model        VARCHAR,
    job_id            VARCHAR,                -- provider job id, persisted before following it
    model_id          VARCHAR,                -- the resulting fine-tuned model
    training_file_id  VARCHAR,
    validation_file_id VARCHAR,
    recipe            JSON,                   -- exactly what was (or would be) run
    metrics           JSON,
    message           VARCHAR,
    dagster_run_id    VARCHAR,
    created_at        TIMESTAMP NOT NULL,
    updated_at        TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS review_queue (
    sample_id    VARCHAR PRIMARY KEY,
    reason       VARCHAR NOT NULL,   -- low_confidence | spot_check | judge_check
    status       VARCHAR NOT NULL,   -- pending | accepted | edited | rejected
    reviewer     VARCHAR,
    note         VARCHAR,
    queued_at    TIMESTAMP NOT NULL,
    reviewed_at  TIMESTAMP
);
CREATE TABLE IF NOT EXISTS watermarks (
    stage       VARCHAR PRIMARY KEY,
    seq         BIGINT NOT NULL,
    updated_at  TIMESTAMP NOT NULL
);
-- LLM responses already paid for, so a re-run never pays twice. Only usable answers are kept:
-- failures are retried, not replayed.
CREATE TABLE IF NOT EXISTS llm_cache (
    cache_key          VARCHAR PRIMARY KEY,  -- sha256 of the request JSON: model, messages, params
    purpose            VARCHAR NOT NULL,     -- regenerate | judge
    parent_key         VARCHAR,              -- judge: the cache_key of the answer it judged
    model              VARCHAR NOT NULL,
    content            VARCHAR NOT NULL,
    finish_reason      VARCHAR,
    prompt_tokens      BIGINT NOT NULL,
    completion_tokens  BIGINT NOT NULL,
    created_at         TIMESTAMP NOT NULL
);
-- The evaluation gate (qe_assets/evaluation). Added with IF NOT EXISTS, so an existing store
-- gains them on its next write connection.
CREATE TABLE IF NOT EXISTS evaluation_set (
    sample_id        VARCHAR PRIMARY KEY,  -- held out of every training file, for good
    question_key     VARCHAR NOT NULL,     -- later samples with this question are held out too
    dataset_version  VARCHAR NOT NULL,     -- the cut that held it out
    added_at         TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS model_evaluations (
    evaluation_id    VARCHAR PRIMARY KEY,  -- sha256(candidate, baseline, judge, items): re-runs
    candidate        VARCHAR NOT NULL,     -- fine_tune_runs.model_id
    baseline         VARCHAR NOT NULL,     -- the production model (or the base model)
    dataset_version  VARCHAR,              -- the candidate's training version
    n                INTEGER NOT NULL,     -- judged pairs: wins + ties + losses
    wins             INTEGER NOT NULL,
    ties             INTEGER NOT NULL,
    losses           INTEGER NOT NULL,
    failed           INTEGER NOT NULL,     -- not judged: an answer or the verdict failed
    win_rate         DOUBLE NOT NULL,      -- (wins + ties / 2) / n
    ci_low           DOUBLE NOT NULL,      -- 95 % Wilson lower bound of win_rate
    decision         VARCHAR NOT NULL,     -- promote | block | insufficient_data
    reason           VARCHAR NOT NULL,
    judge_model      VARCHAR NOT NULL,
    per_label        JSON NOT NULL,
    prompt_tokens    BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    estimated_cost   DOUBLE NOT NULL,
    dagster_run_id   VARCHAR,
    -- production: the gate's comparison; icl: against production with k train examples in its
    -- prompt (reported, never gating)
    comparison       VARCHAR NOT NULL DEFAULT 'production',
    created_at       TIMESTAMP NOT NULL
);
-- The gate's retries (issue #26): `retry` when the decision is insufficient_data because too many
-- items failed (the next run evaluates again), `attempts` counts the evaluations of this row.
ALTER TABLE model_evaluations ADD COLUMN IF NOT EXISTS retry BOOLEAN DEFAULT false;
ALTER TABLE model_evaluations ADD COLUMN IF NOT EXISTS attempts INTEGER DEFAULT 1;
CREATE TABLE IF NOT EXISTS evaluation_items (
    evaluation_id    VARCHAR NOT NULL,
    sample_id        VARCHAR NOT NULL,
    label            VARCHAR NOT NULL,
    candidate_answer VARCHAR,
    baseline_answer  VARCHAR,
    candidate_first  BOOLEAN NOT NULL,     -- the candidate's answer was shown as answer 1
    verdict          VARCHAR NOT NULL,     -- win | loss | tie | failed (the candidate's side)
    winner           VARCHAR,              -- the judge's "1" | "2" | "tie"
    reason           VARCHAR,
    error            VARCHAR,              -- why a failed item was not judged
    PRIMARY KEY (evaluation_id, sample_id)
);
CREATE SEQUENCE IF NOT EXISTS promoted_models_seq;
-- Append-only: the newest row names the production model (promotions and rollbacks alike).
CREATE TABLE IF NOT EXISTS promoted_models (
    promotion_id     BIGINT NOT NULL DEFAULT nextval('promoted_models_seq'),
    model            VARCHAR NOT NULL,
    promoted_at      TIMESTAMP NOT NULL,
    promoted_by      VARCHAR NOT NULL,     -- gate | the person who ran qe models
    evaluation_id    VARCHAR,              -- the evaluation that passed (gate)
    action           VARCHAR NOT NULL,     -- promote | rollback
    reason           VARCHAR
);
-- The A/B rollout (qe_assets/service/rollout.py, docs/rollout.md). Which model answered an event:
-- added
-- to an existing raw_events on its next write connection (NULL for events before it).
ALTER TABLE raw_events ADD COLUMN IF NOT EXISTS model VARCHAR;
-- Answers per model from the producers' count records, exactly once per (flush_id, model).
CREATE TABLE IF NOT EXISTS answer_counts (
    flush_id      VARCHAR NOT NULL,    -- unique per flush of one producer process
    model         VARCHAR NOT NULL,
    answers       BIGINT NOT NULL,     -- capture calls for this model, skipped ones included
    low           BIGINT NOT NULL,     -- of those, score < the producer's capture threshold
    threshold     DOUBLE NOT NULL,     -- that threshold
    producer      VARCHAR NOT NULL,    -- host:pid
    window_start  TIMESTAMP NOT NULL,  -- UTC: the answers were counted in this window
    window_end    TIMESTAMP NOT NULL,
    source        VARCHAR NOT NULL,
    ingested_at   TIMESTAMP NOT NULL,
    PRIMARY KEY (flush_id, model)
);
-- Append-only: every decision of the A/B test and every change a person made; the newest row is
-- the rollout state (rollout.json is written from it).
CREATE SEQUENCE IF NOT EXISTS ab_decisions_seq;
CREATE TABLE IF NOT EXISTS ab_decisions (
    decision_id         BIGINT NOT NULL DEFAULT nextval('ab_decisions_seq'),
    candidate           VARCHAR NOT NULL,
    production          VARCHAR NOT NULL,
    share               DOUBLE NOT NULL,    -- the candidate's traffic share after this decision
    answers_production  BIGINT NOT NULL,
    low_production      BIGINT NOT NULL,
    answers_candidate   BIGINT NOT NULL,
    low_candidate       BIGINT NOT NULL,
    rate_production     DOUBLE,
    rate_candidate      DOUBLE,
    statistic           DOUBLE,             -- mSPRT mixture likelihood ratio (reject at 1/alpha)
    decision            VARCHAR NOT NULL,   -- start | continue | promote | rollback | set_share
    reason              VARCHAR NOT NULL,
    decided_by          VARCHAR NOT NULL,   -- ab_test | gate | the person who ran qe models
    test_started_at     TIMESTAMP NOT NULL, -- counts from here on are the test's
    per_label           JSON,
    dagster_run_id      VARCHAR,
    decided_at          TIMESTAMP NOT NULL
);
-- Where each version was published (qe_assets/release/publish.py, docs/publishing.md): one row per
-- version and QE_PUBLISH_URL; `location` is the manifest, the commit marker readers look for.
CREATE TABLE IF NOT EXISTS version_publications (
    version          VARCHAR NOT NULL,
    destination      VARCHAR NOT NULL,   -- QE_PUBLISH_URL when it was published (no secrets)
    location         VARCHAR NOT NULL,
    manifest_sha256  VARCHAR NOT NULL,
    files            INTEGER NOT NULL,
    bytes            BIGINT NOT NULL,
    seconds          DOUBLE NOT NULL,    -- of the last publishing pass
    status           VARCHAR NOT NULL,   -- published | unpublished | deleted
    updated_at       TIMESTAMP NOT NULL,
    PRIMARY KEY (version, destination)
);
-- `qe forget` (qe_assets/release/forget.py): versions replaced by a version without a subject's
-- samples,
-- models trained on them, and what each request did (no personal text).
CREATE TABLE IF NOT EXISTS version_supersessions (
    version        VARCHAR PRIMARY KEY,  -- the superseded version (its files stay immutable)
    superseded_by  VARCHAR,              -- NULL: every sample of it was forgotten
    forget_id      VARCHAR NOT NULL,
    superseded_at  TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS flagged_models (
    model            VARCHAR NOT NULL,
    dataset_version  VARCHAR NOT NULL,
    forget_id        VARCHAR NOT NULL,
    reason           VARCHAR NOT NULL,
    flagged_at       TIMESTAMP NOT NULL,
    PRIMARY KEY (model, forget_id)
);
CREATE TABLE IF NOT EXISTS forget_requests (
    forget_id     VARCHAR PRIMARY KEY,
    matched_by    VARCHAR NOT NULL,      -- request_id | match
    terms         INTEGER NOT NULL,      -- how many ids or texts were given
    terms_sha256  VARCHAR NOT NULL,      -- of the sorted terms: proves which request, holds none
    counts        JSON NOT NULL,         -- rows and files touched, per table / kind
    versions      JSON NOT NULL,         -- superseded -> superseding
    models        JSON NOT NULL,         -- flagged models
    requested_by  VARCHAR NOT NULL,
    requested_at  TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS schema_info (key VARCHAR PRIMARY KEY, value VARCHAR);
INSERT OR IGNORE INTO schema_info VALUES ('schema_version', '1');
"""


TABLES = (
    "raw_events",
    "rejected_events",
    "annotated_samples",
    "completions",
    "dataset_versions",
    "dataset_samples",
    "fine_tune_runs",
    "review_queue",
)


# Which SCHEMA a store was last brought up to. Every write connection ensures the schema and a
# long run opens dozens: running the DDL (and its INSERT) each time cost far more than reading
# this one row (docs/performance.md). Any change to SCHEMA changes the digest, so a new table or
# column still lands.
_SCHEMA_DIGEST = hashlib.sha256(SCHEMA.encode("utf-8")).hexdigest()


def ensure_schema(conn: duckdb.DuckDBPyConnection) -> None:
    """Create what SCHEMA names and the store lacks; a no-op read on a current store."""
    try:
        rows = conn.execute("SELECT value FROM schema_info WHERE key = 'schema_digest'").fetchall()
    except duckdb.CatalogException:  # a new file: no schema_info yet
        rows = []
    if rows == [(_SCHEMA_DIGEST,)]:
        return
    conn.execute(SCHEMA)
    conn.execute("INSERT OR REPLACE INTO schema_info VALUES ('schema_digest', ?)", [_SCHEMA_DIGEST])


def table_counts(conn: duckdb.DuckDBPyConnection) -> dict[str, int]:
    existing = {
        row[0]
        for row in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
        ).fetchall()
    }
    counts: dict[str, int] = {}
    for table in TABLES:
        if table in existing:
            counts[table] = int(conn.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0])
        else:
            counts[table] = 0
    return counts


def watermark(conn: duckdb.DuckDBPyConnection, stage: str) -> int:
    """The last upstream `seq` a stage has consumed (0 before its first run)."""
    rows = conn.execute("SELECT seq FROM watermarks WHERE stage = ?", [stage]).fetchall()
    return int(rows[0][0]) if rows else 0


def set_watermark(conn: duckdb.DuckDBPyConnection, stage: str, seq: int) -> None:
    conn.execute(
        """
        INSERT INTO watermarks VALUES (?, ?, now()::TIMESTAMP)
        ON CONFLICT (stage) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at
        """,
        [stage, seq],
    )
