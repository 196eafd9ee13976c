"""DuckDB schema and the few read/write helpers every stage shares.

DuckDB allows one writing process per file, and while it holds the file no other process can open
it, not even read-only. Writers therefore open a connection per short transaction and close it
right after; readers (`qe sql`, the sensor) retry for a bounded, visible wait.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path
from types import TracebackType
from typing import Any

import duckdb
import polars as pl

SCHEMA_VERSION = 1
_LOG = logging.getLogger("qe_assets.store")

# What the batch loops of the writing stages take: a fresh write connection per transaction
# (`WriterSession.connection` in the assets, `connect` in tests).
ConnectionFactory = Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]]

# Settings of every writing connection. Writers close after each short transaction, so each batch
# ends in a checkpoint; DuckDB's checkpoint vacuum then merged the small row groups of earlier
# batches again and again (1, 2, 4, 8 ... batches rewritten), tripling the checkpoint time of a
# long ingest and leaving the file half as large again. Only small tables (watermarks, review
# queue, fine-tune runs) ever update or delete rows, so there is little space to reclaim.
# Text is stored with ZSTD: what the stages write is mostly long text (documents, prompts,
# completions) in which the same knowledge-base passages come back again and again. DuckDB's own
# choice (dictionary + FSST) checkpointed far slower and gave a larger file on the bench's events
# (docs/performance.md); numeric columns keep their own encodings.
# A batch commit larger than `checkpoint_threshold` checkpoints at once and skips the write-ahead
# log (DuckDB's auto_checkpoint_skip_wal_threshold): a stage's batch (tens of MB of text) was
# written twice, to the WAL at commit and into the file at close, and is now written once. Small
# commits (a review decision, a watermark) still go through the WAL.
WRITER_CONFIG: dict[str, str | int] = {
    "max_vacuum_tasks": 0,
    "force_compression": "zstd",
    "checkpoint_threshold": "1MB",
}

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
-- The A/B rollout (qe_assets/service/rollout.py, docs/rollout.md). Which model answered an event: added
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
-- `qe forget` (qe_assets/release/forget.py): versions replaced by a version without a subject's samples,
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


# How long `qe sql` may hold the file at most (its --timeout), and how long a write connection
# waits for readers: longer than that, so a reader never fails a writer. Before these bounds a
# query of minutes made a concurrent run fail after the writer's 60 s wait (issue 26).
READ_SECONDS_MAX = 300.0
WRITER_WAIT_SECONDS = READ_SECONDS_MAX + 60.0


class DatabaseBusy(RuntimeError):
    """The database stayed locked by a writer for longer than the caller was willing to wait."""


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


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    # "different configuration": this process has the file open with other settings (a
    # read-only connection beside a write one); it is closed again in a moment, like a lock.
    return (
        "lock" in text
        or "conflicting" in text
        or "being used" in text
        or "different configuration" in text
    )


@contextmanager
def connect(
    database: str | Path,
    *,
    read_only: bool = False,
    wait_seconds: float | None = None,
    on_wait: Callable[[float], None] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open DuckDB, waiting (bounded) while another process holds the file; always closes."""
    conn = open_connection(
        database, read_only=read_only, wait_seconds=wait_seconds, on_wait=on_wait, config=config
    )
    try:
        yield conn
    finally:
        conn.close()


def open_connection(
    database: str | Path,
    *,
    read_only: bool = False,
    wait_seconds: float | None = None,
    on_wait: Callable[[float], None] | None = None,
    config: Mapping[str, Any] | None = None,
) -> duckdb.DuckDBPyConnection:
    """`connect` without the context: the caller closes. Writers get WRITER_CONFIG, then
    `config` on top (memory limit and the like); readers get `config` alone. The wait defaults
    to 60 s for a reader and to WRITER_WAIT_SECONDS, past the longest `qe sql`, for a writer."""
    path = Path(database)
    if wait_seconds is None:
        wait_seconds = 60.0 if read_only else WRITER_WAIT_SECONDS
    settings = {**(config or {})} if read_only else {**WRITER_CONFIG, **(config or {})}
    # Locked only once the time zone below is set (`qe sql` locks its sandbox).
    lock = bool(settings.pop("lock_configuration", False))
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_seconds
    delay = 0.02
    warned = False
    while True:
        try:
            conn = duckdb.connect(str(path), read_only=read_only, config=settings)
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            if not _is_lock_error(exc):
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DatabaseBusy(
                    f"{path} stayed locked by another process for {wait_seconds:.0f}s: {exc}"
                ) from exc
            if on_wait is not None:
                on_wait(remaining)
            elif not read_only and not warned:
                # Writers queue on the writer lock, so what holds the file is a reader (`qe sql`
                # most likely): say why the stage stands still.
                _LOG.warning(
                    "%s is open in another process (a reader such as qe sql): waiting up to "
                    "%.0fs for it",
                    path,
                    remaining,
                )
                warned = True
            time.sleep(min(delay, remaining))
            # Readers poll fast: writers leave only short gaps between their transactions.
            delay = min(delay * 2, 0.05 if read_only else 0.5)
            continue
        try:
            # Every TIMESTAMP the stages write is UTC (Python's datetime.now(UTC) and SQL's
            # now()::TIMESTAMP alike); DuckDB would otherwise cast now() in the machine's zone.
            conn.execute("SET TimeZone = 'UTC'")
            if lock:
                conn.execute("SET lock_configuration = true")
        except BaseException:
            conn.close()
            raise
        return conn


class DatabaseCloseFailed(RuntimeError):
    """A write connection's close (its checkpoint) failed on the session's helper thread."""


class WriterSession:
    """Short write connections to one database, one after another, each closed on a helper thread.

    Closing a write connection is when DuckDB checkpoints: it compresses what the transaction
    wrote into the file, about a third of a long ingest's time. That work needs no Python, so it
    runs on a second core while the stage prepares its next batch in Python and Polars. The next
    `connection()` waits for it first (a process must not reopen a file it is still closing), and
    leaving the session waits for the last one, so the stage's writer lock outlives every close.
    A failed close is raised from the next `connection()` or the session's exit.
    """

    def __init__(self, database: str | Path, *, config: Mapping[str, Any] | None = None) -> None:
        self.database = Path(database)
        self.config = dict(config or {})
        self._closing: threading.Thread | None = None
        self._close_error: BaseException | None = None

    def __enter__(self) -> WriterSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.wait()
            return
        # The body's error is the one to report; still never leave a close running.
        with suppress(Exception):
            self.wait()

    def wait(self) -> None:
        """Block until the last connection is closed; raise what its close raised."""
        if self._closing is not None:
            self._closing.join()
            self._closing = None
        if self._close_error is not None:
            error, self._close_error = self._close_error, None
            # Raised from the next batch's `connection()`: say that it is the previous close
            # (its transaction had committed) rather than let it pass for this batch's failure.
            raise DatabaseCloseFailed(
                f"closing the previous write connection to {self.database} failed after its "
                f"transaction committed: {error!r}"
            ) from error

    def _close(self, conn: duckdb.DuckDBPyConnection) -> None:
        try:
            conn.close()
        except BaseException as exc:  # handed to the thread that waits
            self._close_error = exc

    @contextmanager
    def connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A write connection with the schema in place; closed behind the caller on success,
        at once when the body fails (its transaction is rolled back by the close)."""
        self.wait()
        conn = open_connection(self.database, config=self.config)
        try:
            ensure_schema(conn)
            yield conn
        except BaseException:
            with suppress(Exception):  # the body's error is the one to report
                conn.close()
            raise
        self._closing = threading.Thread(
            target=self._close, args=(conn,), name="duckdb-close", daemon=True
        )
        self._closing.start()


def writer_lock_path(database: str | Path) -> Path:
    return Path(f"{database}.writer.lock")


# Writer locks this process holds (lock path -> holds), so that a query a stage makes through
# `writer_connection` while its `writer_lock` is taken does not wait for itself. Process-wide, not
# per thread: a stage's LLM pages and commits run on worker threads.
_HELD: dict[str, int] = {}
_HELD_GUARD = threading.Lock()


def holds_writer_lock(database: str | Path) -> bool:
    with _HELD_GUARD:
        return _HELD.get(str(writer_lock_path(database).absolute()), 0) > 0


def _mark_held(path: Path, step: int) -> None:
    key = str(path.absolute())
    with _HELD_GUARD:
        _HELD[key] = _HELD.get(key, 0) + step
        if _HELD[key] <= 0:
            del _HELD[key]


@contextmanager
def writer_lock(
    database: str | Path,
    *,
    on_wait: Callable[[str], None] | None = None,
    poll_seconds: float = 0.1,
    report_seconds: float = 30.0,
    wait_seconds: float | None = None,
) -> Iterator[None]:
    """The right to write to `database`, exclusive across the processes of this host: held by a
    writing stage for the whole stage, and by every other write (a run's queries between stages,
    a reviewer's transaction) for its one short transaction (see `writer_connection`).

    DuckDB's own file lock guards a transaction, not a stage: a stage that claims queue records,
    commits and acks over many short transactions must not interleave with another run's. A
    kernel lock (flock) does this without races and is released by the kernel when its holder
    exits or is killed, so a crash never leaves it taken. `on_wait(holder)` is called when the
    lock is busy, and again every `report_seconds` while waiting. Stages wait as long as it takes
    (another run's stage ends); with `wait_seconds`, `DatabaseBusy` is raised after that long.
    """
    path = writer_lock_path(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = None if wait_seconds is None else time.monotonic() + wait_seconds
    try:
        reported_at: float | None = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    holder = os.pread(fd, 256, 0).decode("utf-8", errors="replace").strip()
                    raise DatabaseBusy(
                        f"{database} stayed locked by a writer ({holder or 'another process'}) "
                        f"for {wait_seconds:.0f}s"
                    ) from None
                if on_wait is not None and (
                    reported_at is None or now - reported_at >= report_seconds
                ):
                    holder = os.pread(fd, 256, 0).decode("utf-8", errors="replace").strip()
                    on_wait(holder or "another process")
                    reported_at = now
                time.sleep(poll_seconds)
        # Who holds it, for the next waiter's message; never read for correctness.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        _mark_held(path, 1)
        try:
            yield
        finally:
            _mark_held(path, -1)
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def writer_connection(
    database: str | Path,
    *,
    config: Mapping[str, Any] | None = None,
    wait_seconds: float | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """One short write connection with the schema in place, under the writer lock (taken here
    unless this process holds it already, as a stage does), closed before the lock is released.

    Every write outside a stage's `WriterSession` comes through here, so writers never race on
    DuckDB's own file lock: they queue on the writer lock, and only short read-only readers
    (`qe sql`, the sensor) can make `open_connection` wait. `wait_seconds` bounds both waits
    (None: as long as a stage takes for the lock, then `open_connection`'s default).
    """
    lock = (
        nullcontext()
        if holds_writer_lock(database)
        else writer_lock(database, wait_seconds=wait_seconds, on_wait=on_wait)
    )
    started = time.monotonic()
    with lock:
        spent = time.monotonic() - started
        left = WRITER_WAIT_SECONDS if wait_seconds is None else max(0.0, wait_seconds - spent)
        with connect(database, config=config, wait_seconds=left) as conn:
            ensure_schema(conn)
            yield conn


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


def select_frame(
    conn: duckdb.DuckDBPyConnection, query: str, params: dict | list | None = None
) -> pl.DataFrame:
    """Run a SELECT on a store connection and return it as a Polars frame."""
    relation = conn.sql(query, params=params)
    if relation is None:
        raise ValueError("select_frame needs a query that returns rows")
    return relation.pl()


def register_frame(conn: duckdb.DuckDBPyConnection, name: str, frame: pl.DataFrame) -> None:
    """Make `frame` readable by SQL on `conn` as `name`, in place.

    Handed over as Arrow with Polars' own string views: registering the frame itself converts
    every string column to classic Arrow strings first, a copy of all the batch's text."""
    conn.register(name, frame.to_arrow(compat_level=pl.CompatLevel.newest()))


def owned_copy(column: str) -> pl.Expr:
    """The string column rebuilt into buffers of its own.

    Every column of a frame from `select_frame` keeps the memory of the whole query result alive,
    so a narrow column kept past its batch (ids, say) would keep every prompt of that batch too.
    """
    return pl.concat_str([pl.col(column), pl.lit("")]).alias(column)


# The private in-memory DuckDB of `sql_over_frames`, one per process (a forked child makes its own):
# a new database per call cost time and fresh memory for every call.
_PRIVATE_LOCK = threading.Lock()
_private: tuple[int, duckdb.DuckDBPyConnection] | None = None
# A parent's database as a forked child inherits it: never used, and never freed either, since
# its destructor would wait for worker threads that do not exist in the child.
_inherited: list[duckdb.DuckDBPyConnection] = []
PRIVATE_MEMORY_LIMIT = "1GB"


def _private_database() -> duckdb.DuckDBPyConnection:
    global _private
    with _PRIVATE_LOCK:
        if _private is None or _private[0] != os.getpid():
            if _private is not None:
                _inherited.append(_private[1])
            conn = duckdb.connect(config={"memory_limit": PRIVATE_MEMORY_LIMIT})
            conn.execute("SET GLOBAL TimeZone = 'UTC'")
            _private = (os.getpid(), conn)
        return _private[1]


def sql_over_frames(query: str, **frames: pl.DataFrame) -> pl.DataFrame:
    """Run a query over in-memory frames in a private DuckDB: no store, no lock, no waiting.

    Each call has a connection of its own (a cursor of the process's private database), so
    threads may call it at once; the frames are visible to that connection only."""
    with _private_database().cursor() as conn:
        for name, frame in frames.items():
            register_frame(conn, name, frame)
        return select_frame(conn, query)


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


@contextmanager
def transaction(conn: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN … COMMIT, rolled back on any error (crashes roll back by themselves)."""
    conn.execute("BEGIN TRANSACTION")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
