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
`qe_assets.assets.complete`): shown to the reviewer, never exported (only `ok` completions are),
until a person accepts it here, which makes it `ok`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import polars as pl

from qe_assets import review_queue
from qe_assets.store import query_frame, transaction
from qe_assets.templates import load_templates
from qe_assets.transforms.completions import HUMAN, OK, PROPOSED, naive_completions

PENDING, ACCEPTED, EDITED, REJECTED = "pending", "accepted", "edited", "rejected"
LOW_CONFIDENCE, SPOT_CHECK = "low_confidence", "spot_check"
_BUCKETS = 10_000


class ReviewError(ValueError):
    """A review action that cannot apply (unknown sample, not in the queue, empty edit)."""


def enqueue_for_review(conn: duckdb.DuckDBPyConnection, samples: str, spot_share: float) -> None:
    """Queue the review samples and the spot-check share of the train samples of `samples`
    (a registered relation of new annotated samples). md5 keeps the spot check stable."""
    conn.execute(
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
        """,
        [round(spot_share * _BUCKETS)],
    )


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
    sample = query_frame(
        conn,
        "SELECT sample_id, request_id, label, labels, language, confidence, score, route, "
        "route_reason, question, context_docs, prompt, original_answer "
        "FROM annotated_samples WHERE sample_id = ?",
        [sample_id],
    ).rows(named=True)
    if not sample:
        raise ReviewError(f"no sample {sample_id!r}")
    review = query_frame(conn, "SELECT * FROM review_queue WHERE sample_id = ?", [sample_id]).rows(
        named=True
    )
    if not review:
        raise ReviewError(f"sample {sample_id!r} is not in the review queue")
    completion = query_frame(
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


Decision = Callable[[duckdb.DuckDBPyConnection, ReviewItem, str, "str | None"], None]


def _apply(
    conn: duckdb.DuckDBPyConnection,
    decide: Decision,
    sample_ids: str | Sequence[str],
    reviewer: str,
    note: str | None,
    seen: Mapping[str, str] | None = None,
) -> None:
    """Every sample checked first, then all decided in one transaction: all or nothing.
    `seen` (sample id → `token_text` of what the reviewer saw) refuses samples that changed."""
    ids = [sample_ids] if isinstance(sample_ids, str) else list(dict.fromkeys(sample_ids))
    items, problems = [], []
    for sample_id in ids:
        try:
            item = open_item(conn, sample_id)
            if seen is not None and sample_id in seen:
                _check_unchanged(item, seen[sample_id])
            items.append(item)
        except ReviewError as exc:
            problems.append(str(exc))
    if problems:
        raise ReviewError("; ".join(problems) + ("; nothing changed" if len(ids) > 1 else ""))
    with transaction(conn):
        for item in items:
            decide(conn, item, reviewer, note)


def _check_unchanged(item: ReviewItem, seen: str) -> None:
    if token_text(item.token) != seen:
        by = f" by {item.review['reviewer']}" if item.review["reviewer"] else ""
        raise ReviewError(
            f"sample {item.sample['sample_id']!r} changed while you were looking at it (now "
            f"{item.review['status']}{by}); nothing changed"
        )


def _accept(
    conn: duckdb.DuckDBPyConnection, item: ReviewItem, reviewer: str, note: str | None
) -> None:
    current = item.completion
    # A proposed completion becomes ok here, and only here: a person has read it.
    if current is not None and current["status"] in (OK, PROPOSED) and current["completion"]:
        completion, mode, model = current["completion"], current["mode"], current["model"]
    else:
        naive = naive_completions(pl.DataFrame([item.sample]), load_templates()).row(0, named=True)
        completion, mode, model = naive["completion"], naive["mode"], None
    sample_id = item.sample["sample_id"]
    _upsert_completion(conn, sample_id, completion=completion, mode=mode, status="ok", model=model)
    _record(conn, sample_id, ACCEPTED, reviewer, note)


def _reject(
    conn: duckdb.DuckDBPyConnection, item: ReviewItem, reviewer: str, note: str | None
) -> None:
    current = item.completion or {}
    sample_id = item.sample["sample_id"]
    _upsert_completion(
        conn,
        sample_id,
        completion=current.get("completion"),
        mode=current.get("mode") or HUMAN,
        status=REJECTED,
        model=current.get("model"),
    )
    _record(conn, sample_id, REJECTED, reviewer, note)


def accept(
    conn: duckdb.DuckDBPyConnection,
    sample_ids: str | Sequence[str],
    reviewer: str,
    note: str | None = None,
    *,
    seen: Mapping[str, str] | None = None,
) -> None:
    """Keep the samples' completions (an existing ok or proposed one, else the naive one) for
    training."""
    _apply(conn, _accept, sample_ids, reviewer, note, seen)


def reject(
    conn: duckdb.DuckDBPyConnection,
    sample_ids: str | Sequence[str],
    reviewer: str,
    note: str | None = None,
    *,
    seen: Mapping[str, str] | None = None,
) -> None:
    """Keep the samples out of every dataset."""
    _apply(conn, _reject, sample_ids, reviewer, note, seen)


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
