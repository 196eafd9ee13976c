"""Human review: the queue of samples a person should look at, and what a reviewer can do.

Samples enter the queue when annotated: every non-duplicate `review` sample (confidence under the
gate) and a deterministic spot-check share of `train` samples. A pending sample is held out of
dataset versions. A reviewer then

* accepts it: its completion (an existing one — an LLM-proposed one included — else the naive
  one) goes into the next version;
* edits it: the reviewer's text becomes a `human` completion, which nothing overwrites;
* rejects it: its completion is marked `rejected` and never reaches a dataset.

Each action renews the completion's `seq`, so the next version picks it up by watermark.

In LLM mode a review sample also gets a completion with status `proposed` (see
`qe_assets.annotate.complete`): shown to the reviewer, never exported (only `ok` completions are),
until a person accepts it here, which makes it `ok`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import polars as pl

from qe_assets.lib.completions import HUMAN, OK, PROPOSED, naive_completions
from qe_assets.lib.templates import load_templates
from qe_assets.review import queue as review_queue
from qe_assets.store import select_frame, transaction

PENDING, ACCEPTED, EDITED, REJECTED = "pending", "accepted", "edited", "rejected"
LOW_CONFIDENCE, SPOT_CHECK = "low_confidence", "spot_check"
_BUCKETS = 10_000


class ReviewError(ValueError):
    """A review action that cannot apply (unknown sample, not in the queue, empty edit)."""


def enqueue_for_review(
    conn: duckdb.DuckDBPyConnection, samples: str, spot_share: float
) -> dict[str, str]:
    """Queue the review samples and the spot-check share of the train samples of `samples`
    (a registered relation of new annotated samples); returns sample_id → reason of the rows
    really queued. md5 keeps the spot check stable."""
    rows = conn.execute(
        f"""
        INSERT INTO review_queue (sample_id, reason, status, queued_at)
        SELECT sample_id,
               CASE WHEN route = 'review' THEN '{LOW_CONFIDENCE}' ELSE '{SPOT_CHECK}' END,
               '{PENDING}', now()::TIMESTAMP
        FROM {samples}
        WHERE duplicate_of IS NULL AND (
            route = 'review'
            OR ('0x' || substr(md5(sample_id), 1, 8))::UBIGINT % {_BUCKETS} < ?
        )
        ON CONFLICT DO NOTHING
        RETURNING sample_id, reason
        """,
        [round(spot_share * _BUCKETS)],
    ).fetchall()
    return dict(rows)


def list_queue(
    conn: duckdb.DuckDBPyConnection,
    *,
    status: str | None = PENDING,
    label: str | None = None,
    limit: int = 20,
) -> pl.DataFrame:
    """The first `limit` samples of the queue in priority order (see `review_queue`)."""
    rows = review_queue.page(
        conn, review_queue.QueueFilter(status=status, label=label), limit=limit
    )
    if not rows:
        return pl.DataFrame(schema={"sample_id": pl.String, "status": pl.String})
    return pl.DataFrame(rows, infer_schema_length=None)


def token_text(token: tuple[Any, ...]) -> str:
    """A ReviewItem token as text, for a web form to send back."""
    return "|".join("" if part is None else str(part) for part in token)


@dataclass(frozen=True)
class ReviewItem:
    sample: dict[str, Any]
    review: dict[str, Any]
    completion: dict[str, Any] | None
    released_in: str | None = None  # the dataset version that already holds the sample

    @property
    def token(self) -> tuple[Any, ...]:
        """What a reviewer saw: an edit made from it applies only if this is still so."""
        seq = self.completion["seq"] if self.completion else None
        return (self.review["status"], self.review["reviewed_at"], seq)


def show(conn: duckdb.DuckDBPyConnection, sample_id: str) -> ReviewItem:
    sample = select_frame(
        conn,
        "SELECT sample_id, request_id, label, labels, language, confidence, score, route, "
        "route_reason, question, context_docs, prompt, original_answer "
        "FROM annotated_samples WHERE sample_id = ?",
        [sample_id],
    ).rows(named=True)
    if not sample:
        raise ReviewError(f"no sample {sample_id!r}")
    review = select_frame(conn, "SELECT * FROM review_queue WHERE sample_id = ?", [sample_id]).rows(
        named=True
    )
    if not review:
        raise ReviewError(f"sample {sample_id!r} is not in the review queue")
    completion = select_frame(
        conn,
        "SELECT completion, mode, status, model, seq, judge_model, judge_original_score, "
        "judge_completion_score, judge_verdict FROM completions WHERE sample_id = ?",
        [sample_id],
    ).rows(named=True)
    released = conn.execute(
        "SELECT min(version) FROM dataset_samples WHERE sample_id = ?", [sample_id]
    ).fetchall()[0][0]
    return ReviewItem(sample[0], review[0], completion[0] if completion else None, released)


def open_item(conn: duckdb.DuckDBPyConnection, sample_id: str) -> ReviewItem:
    """The sample, if a review decision on it can still change a dataset.

    A sample goes into one version only and a version is never rewritten, so a decision on a
    sample some version holds would change nothing: refused rather than recorded silently."""
    item = show(conn, sample_id)
    if item.released_in is not None:
        raise ReviewError(
            f"sample {sample_id!r} is already in {item.released_in}, which is never rewritten "
            "(a sample goes into one version only)"
        )
    return item


def _record(
    conn: duckdb.DuckDBPyConnection, sample_id: str, status: str, reviewer: str, note: str | None
) -> None:
    conn.execute(
        "UPDATE review_queue SET status = ?, reviewer = ?, note = ?, "
        "reviewed_at = now()::TIMESTAMP WHERE sample_id = ?",
        [status, reviewer, note, sample_id],
    )


def _upsert_completion(
    conn: duckdb.DuckDBPyConnection,
    sample_id: str,
    *,
    completion: str | None,
    mode: str,
    status: str,
    model: str | None,
) -> None:
    conn.execute(
        """
        INSERT INTO completions (sample_id, completion, mode, status, model, error, attempts,
                                 created_at, updated_at, seq)
        VALUES (?, ?, ?, ?, ?, NULL, 0, now()::TIMESTAMP, now()::TIMESTAMP,
                nextval('completions_seq'))
        ON CONFLICT (sample_id) DO UPDATE SET
            completion = excluded.completion, mode = excluded.mode, status = excluded.status,
            model = excluded.model, error = NULL, updated_at = excluded.updated_at,
            seq = excluded.seq
        """,
        [sample_id, completion, mode, status, model],
    )


# What the checks and decisions of a list of samples read, one row per id in one query: a
# bulk decision on thousands of samples must hold the writer lock for a moment, not a minute.
_ITEMS = """
    SELECT i.sample_id, i.n, s.sample_id IS NOT NULL AS known, s.language, s.label,
           s.original_answer, q.sample_id IS NOT NULL AS queued, q.status, q.reviewer,
           q.reviewed_at, c.completion, c.mode, c.status AS completion_status, c.model, c.seq,
           d.version AS released_in
    FROM decision_ids i
    LEFT JOIN annotated_samples s USING (sample_id)
    LEFT JOIN review_queue q USING (sample_id)
    LEFT JOIN completions c USING (sample_id)
    LEFT JOIN (
        SELECT sample_id, min(version) AS version FROM dataset_samples
        WHERE sample_id IN (SELECT sample_id FROM decision_ids) GROUP BY 1
    ) d USING (sample_id)
    ORDER BY i.n
"""


def _items(conn: duckdb.DuckDBPyConnection, ids: list[str]) -> list[dict[str, Any]]:
    conn.register(
        "decision_ids", pl.DataFrame({"sample_id": ids, "n": range(len(ids))}, orient="col")
    )
    try:
        return select_frame(conn, _ITEMS).rows(named=True)
    finally:
        conn.unregister("decision_ids")


def _problem(row: dict[str, Any], seen: Mapping[str, str] | None) -> str | None:
    """The same refusals as `open_item`, and a changed `seen` token, for one row of `_ITEMS`."""
    sample_id = row["sample_id"]
    if not row["known"]:
        return f"no sample {sample_id!r}"
    if not row["queued"]:
        return f"sample {sample_id!r} is not in the review queue"
    if row["released_in"] is not None:
        return (
            f"sample {sample_id!r} is already in {row['released_in']}, which is never rewritten "
            "(a sample goes into one version only)"
        )
    if seen is not None and sample_id in seen:
        token = (row["status"], row["reviewed_at"], row["seq"])
        if token_text(token) != seen[sample_id]:
            by = f" by {row['reviewer']}" if row["reviewer"] else ""
            return (
                f"sample {sample_id!r} changed while you were looking at it (now "
                f"{row['status']}{by})"
            )
    return None


def _accepted_rows(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """The completion each accepted sample keeps: its ok or proposed one (a proposal becomes ok
    here, and only here: a person has read it), else the naive one."""
    keep = [r for r in rows if r["completion_status"] in (OK, PROPOSED) and r["completion"]]
    kept_ids = {r["sample_id"] for r in keep}
    rest = [r for r in rows if r["sample_id"] not in kept_ids]
    frames = [
        pl.DataFrame(
            {
                "sample_id": [r["sample_id"] for r in keep],
                "completion": [r["completion"] for r in keep],
                "mode": [r["mode"] for r in keep],
                "model": [r["model"] for r in keep],
            },
            schema=_DECIDED_SCHEMA,
        )
    ]
    if rest:
        samples = pl.DataFrame(
            [{k: r[k] for k in ("sample_id", "language", "label", "original_answer")} for r in rest]
        )
        naive = naive_completions(samples, load_templates())
        frames.append(
            naive.select("sample_id", "completion", "mode", "model").cast(_DECIDED_SCHEMA)
        )
    # Only a kept ok/proposed text is the one the judge scored; the naive text replacing a
    # rejected_by_judge (or failed) one is not, so its judge columns are cleared below.
    return pl.concat(frames).with_columns(
        status=pl.lit(OK), judged_text=pl.col("sample_id").is_in(list(kept_ids))
    )


def keeps_judged_text(completion: Mapping[str, Any] | None) -> bool:
    """Whether accepting keeps the completion shown (ok or proposed, with text), rather than
    the naive one: the rule of `_accepted_rows`, for the review page's wording."""
    return bool(
        completion and completion.get("status") in (OK, PROPOSED) and completion.get("completion")
    )


def accepted_text(item: ReviewItem) -> str:
    """The completion accepting `item` would export, word for word: the one shown when it is
    kept, else the naive one (offline, the original answer behind the label's prefix)."""
    if item.completion is not None and keeps_judged_text(item.completion):
        return str(item.completion["completion"])
    sample = {k: [item.sample[k]] for k in ("sample_id", "language", "label", "original_answer")}
    return str(naive_completions(pl.DataFrame(sample), load_templates())["completion"][0])


def _rejected_rows(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """Rejected samples keep whatever completion text they had (for the record), marked so."""
    return pl.DataFrame(
        {
            "sample_id": [r["sample_id"] for r in rows],
            "completion": [r["completion"] for r in rows],
            "mode": [r["mode"] or HUMAN for r in rows],
            "model": [r["model"] for r in rows],
        },
        schema=_DECIDED_SCHEMA,
    ).with_columns(status=pl.lit(REJECTED), judged_text=pl.lit(True))


_DECIDED_SCHEMA = {
    "sample_id": pl.String,
    "completion": pl.String,
    "mode": pl.String,
    "model": pl.String,
}


def _apply(
    conn: duckdb.DuckDBPyConnection,
    status: str,
    sample_ids: str | Sequence[str],
    reviewer: str,
    note: str | None,
    seen: Mapping[str, str] | None = None,
    only_pending: bool = False,
) -> int:
    """Every sample checked first, then all decided in one transaction: all or nothing.
    `seen` (sample id → `token_text` of what the reviewer saw) refuses samples that changed.

    `only_pending` (bulk decisions): samples someone decided on since the caller listed them
    are skipped, not overwritten; the check runs on the write connection, under the writer
    lock, so no decision can slip in between. Returns how many were skipped."""
    ids = [sample_ids] if isinstance(sample_ids, str) else list(dict.fromkeys(sample_ids))
    if not ids:
        return 0
    rows = _items(conn, ids)
    skipped = 0
    if only_pending:
        decided = [r for r in rows if r["queued"] and r["status"] != PENDING]
        skipped = len(decided)
        rows = [r for r in rows if not (r["queued"] and r["status"] != PENDING)]
        if not rows:
            return skipped
    problems = [p for p in (_problem(r, seen) for r in rows) if p is not None]
    if problems:
        raise ReviewError("; ".join(problems) + ("; nothing changed" if len(ids) > 1 else ""))
    decided = _accepted_rows(rows) if status == ACCEPTED else _rejected_rows(rows)
    conn.register("decided", decided)
    try:
        with transaction(conn):
            conn.execute(
                """
                INSERT INTO completions (sample_id, completion, mode, status, model, error,
                                         attempts, created_at, updated_at, seq)
                SELECT sample_id, completion, mode, status, model, NULL, 0, now()::TIMESTAMP,
                       now()::TIMESTAMP, nextval('completions_seq')
                FROM decided
                ON CONFLICT (sample_id) DO UPDATE SET
                    completion = excluded.completion, mode = excluded.mode,
                    status = excluded.status, model = excluded.model, error = NULL,
                    updated_at = excluded.updated_at, seq = excluded.seq
                """
            )
            # The judge's scores describe a text no longer stored: neither judge calibration
            # nor the export may take them for a verdict on what is kept.
            conn.execute(
                """
                UPDATE completions SET judge_model = NULL, judge_original_score = NULL,
                    judge_completion_score = NULL, judge_verdict = NULL
                WHERE sample_id IN (SELECT sample_id FROM decided WHERE NOT judged_text)
                """
            )
            conn.execute(
                "UPDATE review_queue SET status = ?, reviewer = ?, note = ?, "
                "reviewed_at = now()::TIMESTAMP "
                "WHERE sample_id IN (SELECT sample_id FROM decided)",
                [status, reviewer, note],
            )
    finally:
        conn.unregister("decided")
    return skipped


def accept(
    conn: duckdb.DuckDBPyConnection,
    sample_ids: str | Sequence[str],
    reviewer: str,
    note: str | None = None,
    *,
    seen: Mapping[str, str] | None = None,
    only_pending: bool = False,
) -> int:
    """Keep the samples' completions (an existing ok or proposed one, else the naive one) for
    training. With `only_pending`, samples no longer pending are skipped: returns how many."""
    return _apply(conn, ACCEPTED, sample_ids, reviewer, note, seen, only_pending)


def reject(
    conn: duckdb.DuckDBPyConnection,
    sample_ids: str | Sequence[str],
    reviewer: str,
    note: str | None = None,
    *,
    seen: Mapping[str, str] | None = None,
    only_pending: bool = False,
) -> int:
    """Keep the samples out of every dataset. With `only_pending`, samples no longer pending
    are skipped: returns how many."""
    return _apply(conn, REJECTED, sample_ids, reviewer, note, seen, only_pending)


def edit(
    conn: duckdb.DuckDBPyConnection,
    sample_id: str,
    completion: str,
    reviewer: str,
    note: str | None = None,
    *,
    seen: tuple[Any, ...] | str | None = None,
) -> None:
    """Make `completion` the sample's human completion. With `seen` (the `token` of the item
    the reviewer edited from, or its `token_text`), refuse if someone decided on the sample in
    the meantime."""
    if not completion.strip():
        raise ReviewError("the edited completion is empty; use reject to drop the sample")
    item = open_item(conn, sample_id)
    if seen is not None:
        seen_text = seen if isinstance(seen, str) else token_text(seen)
        if token_text(item.token) != seen_text:
            by = f" by {item.review['reviewer']}" if item.review["reviewer"] else ""
            raise ReviewError(
                f"sample {sample_id!r} changed while you were editing (now "
                f"{item.review['status']}{by}); nothing changed"
            )
    with transaction(conn):
        _upsert_completion(
            conn, sample_id, completion=completion.strip(), mode=HUMAN, status="ok", model=reviewer
        )
        _record(conn, sample_id, EDITED, reviewer, note)


def acceptance_by_label(conn: duckdb.DuckDBPyConnection) -> dict[str, dict[str, float]]:
    """Per label: reviewed count and the share accepted or edited (kept) — review metadata."""
    rows = conn.execute(
        """
        SELECT s.label, count(*) AS reviewed,
               count(*) FILTER (q.status IN ('accepted', 'edited')) / count(*) AS kept
        FROM review_queue q JOIN annotated_samples s USING (sample_id)
        WHERE q.status <> 'pending' GROUP BY 1 ORDER BY 1
        """
    ).fetchall()
    return {
        label: {"reviewed": int(n), "kept_share": round(float(kept), 4)} for label, n, kept in rows
    }
